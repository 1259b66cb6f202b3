"""The hint / distillation term: which one, how strong and when, with Rocket's gradient block."""

from __future__ import annotations

import functools
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from lightning_rec.errors import ConfigError, check_int
from lightning_rec.losses import distill, draw_negatives
from lightning_rec.losses.distill import HINT_KINDS, HintSpec, hint_kl, hint_mse, hint_mse_centered

SCHEDULES = ("constant", "warmup", "start_epoch")


def _kl_l2(zs, zt, valid, temperature, l2_weight):
    # the squared difference is a mean over the row's candidates: masked ones (a sampled negative equal to the
    # target) are not candidates
    n = zs.shape[-1] if valid is None else valid.sum(-1).clamp_min(1)
    return hint_kl(zs, zt, valid, temperature) + l2_weight * hint_mse(zs, zt, valid) / n


def _mse_kl(zs, zt, valid, temperature, kd_weight):
    return hint_mse(zs, zt, valid) + kd_weight * hint_kl(zs, zt, valid, temperature)


class HintLossCallback(pl.Callback):
    """Adds ``weight(t) * hint(student logits, teacher logits)`` to the student's loss.

    The module supplies the pieces (student and teacher logits on the loss's candidate set); this
    callback decides the term. With a :class:`~lightning_rec.methods.rocket.module.RocketModule` the teacher is
    the booster trained alongside: the callback gives the rocket its :meth:`spec` through
    :meth:`~lightning_rec.methods.rocket.module.RocketModule.set_hint`. With a plain
    :class:`~lightning_rec.modules.seqrec.SeqRecModule` it is a frozen model loaded from ``teacher_ckpt``
    (classic teacher-student distillation; :meth:`teacher_loss`) or, for federated distillation,
    per-label teacher logits set as ``label_teacher`` (:meth:`label_teacher_loss`); either is installed with
    :meth:`~lightning_rec.modules.seqrec.SeqRecModule.set_loss_term`. Both are removed at teardown; the
    module never holds the callback itself.

    Args:
        kind: ``mse`` (Rocket: squared logit difference summed over candidates), ``mse_centered``
            (the same on logits with each row's mean taken off, so only what the softmax sees is matched), ``kl`` (classic KD:
            ``T^2 KL(softmax(z_t/T) || softmax(z_s/T))``), ``kl_l2`` (KL plus ``l2_weight`` times
            the mean squared logit difference; the federated-distillation objective) or ``mse+kl``
            (Rocket's hint plus ``kd_weight`` times the KD term).
        weight: lambda (0.03 in the Rocket authors' code).
        schedule: ``constant``; ``warmup`` (linear, ``weight * (step + 1) / warmup_steps`` up to ``weight``, so the first
            step already has a small term, as the learning-rate warm-up does);
            ``start_epoch`` (0 before ``start_epoch``, then ``weight``).
        block_gradient: detach the teacher's logits in the hint (Rocket's gradient block): the hint
            never updates parameters only the booster uses. Default true.
        temperature: T of the KL terms (4 in the authors' code).
        student_ce_weight: factor on the student's own cross-entropy (classic KD uses
            ``1 - alpha`` = 0.1 with ``weight`` = alpha = 0.9).
        teacher_ckpt: checkpoint of a trained model to distil from (plain modules only).
        l2_weight, kd_weight: see ``kind``.
        chunk_rows: with a teacher checkpoint, the student's and teacher's logits, the loss and the term are
            computed this many positions at a time (recomputed in backward), bounding memory at
            ``chunk_rows x candidates``; None: the student's ``model.loss_chunk_rows`` (all at once when that is
            null too). A rocket takes ``model.loss_chunk_rows``.
    """

    def __init__(
        self,
        kind: str = "mse",
        weight: float = 0.03,
        schedule: str = "constant",
        warmup_steps: int = 0,
        start_epoch: int = 0,
        block_gradient: bool = True,
        temperature: float = 4.0,
        student_ce_weight: float = 1.0,
        teacher_ckpt: str | None = None,
        l2_weight: float = 1.0,
        kd_weight: float = 1.0,
        chunk_rows: int | None = None,
    ):
        if kind not in HINT_KINDS:
            raise ConfigError(f"callbacks.hint.kind={kind}: expected one of {', '.join(HINT_KINDS)}")
        if schedule not in SCHEDULES:
            raise ConfigError(f"callbacks.hint.schedule={schedule}: expected one of {', '.join(SCHEDULES)}")
        if schedule == "warmup" and int(warmup_steps) < 1:
            raise ConfigError("callbacks.hint.warmup_steps: expected a positive number of steps with schedule=warmup")
        if float(temperature) <= 0:
            raise ConfigError(f"callbacks.hint.temperature={temperature}: expected a positive number")
        self.kind, self.weight, self.schedule = kind, float(weight), schedule
        self.warmup_steps, self.start_epoch = int(warmup_steps), int(start_epoch)
        self.block_gradient, self.temperature = bool(block_gradient), float(temperature)
        self.student_ce_weight, self.teacher_ckpt = float(student_ce_weight), teacher_ckpt
        self.l2_weight, self.kd_weight = float(l2_weight), float(kd_weight)
        if chunk_rows is not None:
            check_int(chunk_rows, "callbacks.hint.chunk_rows", 1)
        self.chunk_rows = chunk_rows  # plain-model KD: positions per chunk (a rocket uses model.loss_chunk_rows)
        self.teacher = None
        # Federated distillation: per-label teacher logits (lightning_rec.methods.federated.LabelLogits)
        # instead of a teacher model; set by the federated device before it trains.
        self.label_teacher = None
        self._lookup: tuple[Any, torch.Tensor] | None = None  # (teacher, label -> row or -1)

    # ------------------------------------------------------------------ the term
    def term_fn(self):
        if self.kind == "mse":
            return hint_mse
        if self.kind == "mse_centered":
            return hint_mse_centered
        if self.kind == "kl":
            return functools.partial(hint_kl, temperature=self.temperature)
        if self.kind == "kl_l2":
            return functools.partial(_kl_l2, temperature=self.temperature, l2_weight=self.l2_weight)
        return functools.partial(_mse_kl, temperature=self.temperature, kd_weight=self.kd_weight)

    def current_weight(self, progress) -> float:
        """The weight at ``progress`` (anything with ``global_step`` and ``current_epoch``: the Trainer, or the
        module being trained); None: no schedule, the full weight."""
        if progress is None or self.schedule == "constant":
            return self.weight
        if self.schedule == "warmup":
            return self.weight * min(1.0, (progress.global_step + 1) / self.warmup_steps)
        return self.weight if progress.current_epoch >= self.start_epoch else 0.0

    def spec(self, progress) -> HintSpec:
        """The term, its weight at ``progress`` (see :meth:`current_weight`), the gradient block and the
        factor on the student's CE; what :meth:`RocketModule.set_hint` expects of a hint."""
        return HintSpec(self.term_fn(), self.current_weight(progress), self.block_gradient, self.student_ce_weight)

    # ------------------------------------------------------------------ wiring
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning_rec.methods.rocket.module import RocketModule

        rocket = isinstance(pl_module, RocketModule)
        if self.label_teacher is not None:
            if rocket:
                raise ConfigError("federated distillation trains single models (model=sasrec or nextitnet)")
            self._set_term(pl_module, self.label_teacher_loss)
            return
        if rocket and self.chunk_rows is not None:
            raise ConfigError(f"callbacks.hint.chunk_rows={self.chunk_rows}: a rocket computes its losses and hint "
                              f"in chunks of model.loss_chunk_rows; set model.loss_chunk_rows={self.chunk_rows} instead")
        if rocket and self.teacher_ckpt:
            raise ConfigError("callbacks.hint.teacher_ckpt: the rocket module's teacher is its booster; "
                              "a teacher checkpoint is for distilling a plain model")
        if rocket:
            pl_module.set_hint(self.spec)
            return
        if not self.teacher_ckpt:
            raise ConfigError("callbacks.hint: a plain model needs callbacks.hint.teacher_ckpt=<trained.ckpt> "
                              "(or use model=rocket to train a booster alongside)")
        if stage == "fit" and getattr(pl_module.hparams, "loss", None) == "bce":
            raise ConfigError("model.loss=bce: distillation compares logits over a candidate set; use ce or sampled_softmax")
        if (stage == "fit" and getattr(pl_module.hparams, "loss", None) == "sampled_softmax"
                and getattr(pl_module.hparams, "neg_sampler", None) == "mixed"):
            raise ConfigError("model.neg_sampler=mixed: distillation from a teacher checkpoint draws one shared set "
                              "of negatives for both nets; use neg_sampler=uniform or popularity")
        if stage == "fit" and self.teacher is None:
            self.teacher = self._load_teacher(pl_module)
        if self.teacher is not None:
            self._set_term(pl_module, self.teacher_loss)

    @staticmethod
    def _set_term(pl_module: pl.LightningModule, term) -> None:
        if not hasattr(pl_module, "set_loss_term"):
            raise ConfigError(f"callbacks.hint: {type(pl_module).__name__} has no set_loss_term (the hook that "
                              f"lets a distillation term compute its training loss)")
        pl_module.set_loss_term(term)

    def _load_teacher(self, pl_module: pl.LightningModule):
        from lightning_rec.modules.seqrec import SeqRecModule
        from lightning_rec.runs import load_checkpoint, resolve_checkpoint

        option = "callbacks.hint.teacher_ckpt"
        if str(self.teacher_ckpt) in ("last", "best"):  # the callback does not know runs_dir and the teacher's name
            raise ConfigError(f"{option}={self.teacher_ckpt}: give the teacher's checkpoint file or run folder "
                              f"(e.g. {option}=runs/sasrec-ml-1m/<timestamp>); last/best would have to guess "
                              f"which run is the teacher")
        self.teacher_ckpt = resolve_checkpoint(str(self.teacher_ckpt), "runs", None, option=option)
        ckpt = load_checkpoint(self.teacher_ckpt, option)
        hp = ckpt.get("hyper_parameters") or {}
        if hp.get("arch") == "rocket":
            raise ConfigError(f"callbacks.hint.teacher_ckpt={self.teacher_ckpt}: a rocket checkpoint; export a net "
                              f"from it first (python -m lightning_rec export ckpt=... net=booster out=...)")
        if hp.get("num_items") != pl_module.hparams.num_items:
            raise ConfigError(f"callbacks.hint.teacher_ckpt={self.teacher_ckpt}: teacher has {hp.get('num_items')} "
                              f"items, the student {pl_module.hparams.num_items}; use the same data")
        student_len = getattr(pl_module.hparams, "max_len", None)
        if hp.get("arch") == "sasrec" and student_len and int(hp.get("max_len") or 0) < int(student_len):
            # its position table ends there: the first longer batch would fail mid-training
            raise ConfigError(f"callbacks.hint.teacher_ckpt={self.teacher_ckpt}: a SASRec teacher of max_len "
                              f"{hp.get('max_len')}, shorter than the student's data.max_len={student_len}; train "
                              f"the student with data.max_len={hp.get('max_len')} or use a teacher trained on "
                              f"histories at least that long")
        teacher = SeqRecModule.load_from_checkpoint(self.teacher_ckpt, map_location="cpu", weights_only=True)
        teacher.eval().requires_grad_(False)
        n = sum(p.numel() for p in teacher.parameters())
        rank_zero_info(f"distilling from a frozen teacher: {hp.get('arch')} x{hp.get('num_blocks')} blocks, "
                       f"{n:,} parameters ({self.teacher_ckpt})")
        return teacher

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.teacher is not None:
            self.teacher.to(pl_module.device)

    def label_teacher_for(self, targets: torch.Tensor):
        """For positions with next item ``targets`` (m,): which have a teacher row (bool (m,)), and
        that row's candidate items (m', M) and teacher logits (m', M)."""
        lt = self.label_teacher
        if self._lookup is None or self._lookup[0] is not lt:
            lookup = torch.full((int(lt.labels.max()) + 1 if lt.labels.numel() else 1,), -1, dtype=torch.long)
            lookup[lt.labels] = torch.arange(lt.labels.numel())
            self._lookup = (lt, lookup)
        lookup = self._lookup[1]
        t = targets.cpu()
        rows = torch.full_like(t, -1)
        inside = t < lookup.numel()
        rows[inside] = lookup[t[inside]]
        sel = rows >= 0
        r = rows[sel]
        dev = targets.device
        return sel.to(dev), lt.items[r].to(dev), lt.values[r].to(dev)

    def teacher_hidden(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen teacher's hidden states (B, T, d) and scoring table, without gradients."""
        with torch.no_grad():
            self.teacher.eval()
            return self.teacher(items), self.teacher.output_weight()

    # ------------------------------------------------------------------ the loss terms (SeqRecModule.set_loss_term)
    def teacher_loss(self, module, inputs, hidden, targets, mask) -> tuple[torch.Tensor, dict[str, Any]]:
        """Classic KD: the student's own CE and the term against the frozen teacher, on the same candidates
        (the full catalogue or one shared draw of negatives), ``chunk_rows`` positions at a time."""
        ht, wt = self.teacher_hidden(inputs)
        hp = module.hparams
        negatives = log_q = None
        if hp.loss == "sampled_softmax":
            log_q = module.negative_log_q()
            negatives = draw_negatives(module.num_items, hp.num_negatives, targets.device, log_q)
            log_q = log_q if hp.logq_correction else None
        spec = self.spec(module)
        parts = distill.joint_losses(hidden, module.output_weight(), targets, negatives, ht[mask], wt, hint=spec,
                                     log_q=log_q, chunk_rows=self.chunk_rows or hp.get("loss_chunk_rows"))
        loss = spec.student_ce_weight * parts["student_ce"] + spec.weight * parts["hint"]
        return loss, {"train/hint_step": parts["hint"], "train/hint_epoch": parts["hint"],
                      "train/student_ce": parts["student_ce"]}

    def label_teacher_loss(self, module, inputs, hidden, targets, mask,
                           chunk: int = 2048) -> tuple[torch.Tensor, dict[str, Any]]:
        """Federated distillation: the module's own loss plus the term against per-label teacher logits.

        A position whose next item has a teacher row compares the student's logits on that row's
        M candidate items with the teacher's; the term is averaged over all positions.
        """
        own = module.loss(hidden, targets)
        spec = self.spec(module)
        sel, cand, zt = self.label_teacher_for(targets)
        w = module.output_weight()
        hs = hidden[sel]
        terms = []
        for i in range(0, hs.shape[0], chunk):  # bounds memory at chunk x M x d
            zs = torch.einsum("md,mkd->mk", hs[i:i + chunk], w[cand[i:i + chunk]])
            terms.append(spec.fn(zs, zt[i:i + chunk].to(zs.dtype), None))
        term = torch.cat(terms).sum() / max(1, targets.numel()) if terms else own.new_zeros(())
        loss = spec.student_ce_weight * own + spec.weight * term
        return loss, {"train/fd_term": term, "train/fd_coverage": float(sel.float().mean())}

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if hasattr(pl_module, "set_hint"):
            pl_module.set_hint(None)
        elif hasattr(pl_module, "set_loss_term"):
            pl_module.set_loss_term(None)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "weight": self.weight, "schedule": self.schedule, "block_gradient": self.block_gradient}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The schedule is a function of the restored step/epoch; a changed setting is allowed but said.
        now = self.state_dict()
        changed = {k: (state[k], now[k]) for k in now if k in state and state[k] != now[k]}
        if changed:
            rank_zero_info(f"hint loss settings differ from the checkpoint's (old, new): {changed}")
