"""Rocket Launching (Zhou et al., AAAI 2018): a booster and a light net trained together.

The two nets share the item embedding table (and optionally their bottom blocks); each has its
own head. The loss is ``CE(light) + CE(booster) + lambda * hint``; the hint term and its gradient
block come from :class:`~lightning_rec.methods.rocket.HintLossCallback` (through :meth:`RocketModule.set_hint`).
Without that callback the two nets simply train side by side. Only the light net ships:
``python -m lightning_rec export`` writes it as a plain :class:`~lightning_rec.modules.seqrec.SeqRecModule` checkpoint.

The rocket holds its two nets by composition, not by inheriting from the single-model module: each
net is an encoder plus an optional output table registered on the rocket (state_dict keys
``booster.*``, ``light.*``, ``booster_head.weight``, ``light_head.weight``), and a
:class:`SeqRecModule` *scorer* built around the same modules (kept outside the module tree, so it
adds no keys and no parameters) does that net's ranking, prediction and export.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MeanMetric

from lightning_rec.errors import ConfigError, check_int
from lightning_rec.losses import draw_negatives
from lightning_rec.losses.distill import HintSpec, joint_losses
from lightning_rec.metrics import metrics_from_ranks
from lightning_rec.models import ENCODERS, build_encoder, check_shape_options
from lightning_rec.modules.optim import build_optimizer, build_scheduler, check_training_options
from lightning_rec.modules.seqrec import SeqRecModule

NETS = ("light", "booster")
NET_KEYS = ("arch", "d_model", "num_blocks", "num_heads", "attention_m", "ffn_dim", "dropout", "norm_first", "layout", "positions", "residual_alpha",
            "kernel_size", "dilations", "attn_out_dropout", "init_std")


class ProjectedEmbedding(nn.Module):
    """A narrower view of a shared embedding table: ``rows @ proj.T`` (no bias, so padding stays 0)."""

    def __init__(self, shared: nn.Embedding, d_out: int):
        super().__init__()
        self.shared = shared
        self.proj = nn.Linear(shared.embedding_dim, d_out, bias=False)
        nn.init.normal_(self.proj.weight, std=shared.embedding_dim**-0.5)

    @property
    def weight(self) -> torch.Tensor:  # (N+1, d_out): the table the net sees
        return self.proj(self.shared.weight)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return self.proj(self.shared(items))


def _net_conf(conf: dict[str, Any] | None, role: str) -> dict[str, Any]:
    conf = dict(conf or {})
    unknown = sorted(set(conf) - set(NET_KEYS))
    if unknown:
        raise ConfigError(f"model.{role}: unknown option '{unknown[0]}'; expected some of {', '.join(NET_KEYS)}")
    if conf.get("arch") not in ENCODERS:
        raise ConfigError(f"model.{role}.arch: expected one of {', '.join(ENCODERS)}, got {conf.get('arch')!r}")
    check_shape_options(conf, f"model.{role}")
    return conf


def _block_difference(a: nn.Module, b: nn.Module) -> str:
    """The first way two blocks are built differently (parameter shapes, layer settings such as a dilation or a
    layout), or '' when they are alike. Dropout rates are not compared: a shared block trains with the booster's."""
    def signature(block: nn.Module) -> dict[str, Any]:
        sig: dict[str, Any] = {}
        for name, mod in block.named_modules():
            if isinstance(mod, nn.Dropout) or "dropout" in name.rsplit(".", 1)[-1]:
                continue  # a dropout, or the Identity that stands for one switched off (attn_out_dropout=false)
            sig[f"{name or 'block'} type"] = type(mod).__name__
            for k, v in vars(mod).items():
                if (not k.startswith("_") and k != "training" and "dropout" not in k
                        and isinstance(v, (bool, int, float, str, tuple))):
                    sig[f"{name + '.' if name else ''}{k}"] = v
        for name, t in block.state_dict().items():
            sig[f"{name} shape"] = tuple(t.shape)
        return sig

    sa, sb = signature(a), signature(b)
    for key in sorted(set(sa) | set(sb)):
        if sa.get(key) != sb.get(key):
            return f"{key}: {sa.get(key, 'absent')} in the booster, {sb.get(key, 'absent')} in the light net"
    return ""


class RocketModule(pl.LightningModule):
    """Booster and light net with a shared item embedding; evaluation reports both, the light net ships.

    Args:
        num_items: catalogue size.
        booster, light: encoder settings of each net (``arch``, ``d_model``, ``num_blocks``,
            ``num_heads``, ``dropout``, ...), as for the single models; either architecture can
            take either role.
        share_embedding: one item embedding table for both nets (a bias-free projection feeds a
            narrower light net); false gives each net its own table.
        share_blocks: the light net's first ``share_blocks`` blocks are the booster's (same
            architecture and width required).
        own_heads: each net scores items with its own output table (else with its item table).
        loss: ``ce`` or ``sampled_softmax`` (``num_negatives`` shared by both nets and the hint).
        loss_chunk_rows: positions per chunk when computing logits, loss and hint (memory bound
            for large catalogues); None computes all rows at once.
        compile: accepted for the shared model config; the two-net module is not compiled.
        Others as :class:`SeqRecModule`.

    Metrics are logged as ``{stage}/light/...`` and ``{stage}/booster/...``; ``predict`` and the
    plain scoring methods (:meth:`forward`, :meth:`user_representation`, :meth:`score_fn`,
    :meth:`output_weight`) use the light net. There is no ``encoder``: StackRec stacks one net after export.
    """

    def __init__(
        self,
        num_items: int,
        booster: dict[str, Any] | None = None,
        light: dict[str, Any] | None = None,
        share_embedding: bool = True,
        share_blocks: int = 0,
        own_heads: bool = True,
        loss: str = "ce",
        num_negatives: int = 256,
        loss_chunk_rows: int | None = None,
        max_len: int = 200,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        eval_ks: list[int] | None = None,
        exclude_seen: bool = True,
        eval_protocol: str = "full",
        eval_chunk_size: int = 65536,
        compile: bool = False,
        arch: str = "rocket",
    ):
        args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        booster = _net_conf(booster or {"arch": "sasrec", "d_model": 128, "num_blocks": 4, "num_heads": 2}, "booster")
        light = _net_conf(light or {"arch": "sasrec", "d_model": 128, "num_blocks": 1}, "light")
        optimizer = dict(optimizer or {"name": "adam", "lr": 1e-3})
        scheduler = dict(scheduler or {"name": "none"})
        eval_ks = list(eval_ks or [5, 10, 20])
        if loss not in ("ce", "sampled_softmax"):
            raise ConfigError(f"model.loss={loss}: the rocket module compares logits over a candidate set; "
                              f"expected ce or sampled_softmax")
        check_training_options(optimizer, scheduler, eval_protocol)
        check_int(share_blocks, "model.share_blocks", 0)
        if loss_chunk_rows is not None:
            check_int(loss_chunk_rows, "model.loss_chunk_rows", 1)
        if share_blocks and (booster["arch"] != light["arch"]
                             or share_blocks > min(booster.get("num_blocks", 2), light.get("num_blocks", 1))):
            raise ConfigError(f"model.share_blocks={share_blocks}: needs the same arch in both nets and at most as "
                              f"many blocks as the shallower net has")
        self.save_hyperparameters(args)
        self.hparams.update(booster=booster, light=light, optimizer=optimizer, scheduler=scheduler, eval_ks=eval_ks)

        def build(conf):
            return build_encoder(conf["arch"], num_items, max_len=max_len, **{k: v for k, v in conf.items() if k != "arch"})

        # Registration order (booster, light, booster_head, light_head) fixes the parameter order, so
        # optimizer states of existing checkpoints resume in place.
        self.booster = build(booster)
        self.light = build(light)
        if share_embedding:
            shared = self.booster.item_embedding
            self.light.item_embedding = (shared if self.light.d_model == self.booster.d_model
                                         else ProjectedEmbedding(shared, self.light.d_model))
        for i in range(share_blocks):
            # the light net runs (and export_net rebuilds) this block from its own settings: they must build the same
            differ = _block_difference(self.booster.blocks[i], self.light.blocks[i])
            if differ:
                raise ConfigError(f"model.share_blocks={share_blocks}: block {i} of the booster and of the light net "
                                  f"are built differently ({differ}); sharing needs the same block settings "
                                  f"(d_model, num_heads, ffn_dim, layout, norm_first, residual_alpha, attention_m; "
                                  f"kernel_size and dilations for nextitnet)")
            self.light.blocks[i] = self.booster.blocks[i]
        self.booster_head = self.light_head = None
        if own_heads:
            self.booster_head = nn.Embedding(num_items + 1, self.booster.d_model, padding_idx=0)
            self.light_head = nn.Embedding(num_items + 1, self.light.d_model, padding_idx=0)
            for head in (self.booster_head, self.light_head):
                nn.init.normal_(head.weight, std=head.embedding_dim**-0.5)
                with torch.no_grad():
                    head.weight[0].zero_()
        prefix = "sampled_" if eval_protocol == "sampled" else ""
        base = [f"{prefix}{m}@{k}" for k in eval_ks for m in ("hr", "ndcg", "mrr")]
        self.metric_names = [f"{net}/{n}" for net in NETS for n in base]
        self.val_metrics = nn.ModuleDict({n.replace("@", "_at_").replace("/", "__"): MeanMetric() for n in self.metric_names})
        self.test_metrics = nn.ModuleDict({n.replace("@", "_at_").replace("/", "__"): MeanMetric() for n in self.metric_names})
        # A plain dict is no submodule: the scorers add nothing to state_dict() or parameters().
        self.scorers: dict[str, SeqRecModule] = {name: self._scorer(name) for name in NETS}
        self._hint: Callable[[pl.LightningModule], HintSpec | None] | None = None
        self._optimizer_factory = None

    def _scorer(self, name: str) -> SeqRecModule:
        """A :class:`SeqRecModule` around this rocket's encoder and head of net ``name`` (the same modules, not
        copies): its ranking, prediction and scoring are that net's. Built on the meta device, so the
        encoder it would make for itself, then replaced, takes no memory."""
        hp = self.hparams
        conf = dict(hp[name])
        arch = conf.pop("arch")
        head = self.light_head if name == "light" else self.booster_head
        with torch.device("meta"):
            scorer = SeqRecModule(
                num_items=hp.num_items, arch=arch, max_len=hp.max_len, tied_embeddings=head is None,
                loss=hp.loss, num_negatives=hp.num_negatives, optimizer=dict(hp.optimizer),
                scheduler=dict(hp.scheduler), eval_ks=list(hp.eval_ks), exclude_seen=hp.exclude_seen,
                eval_protocol=hp.eval_protocol, eval_chunk_size=hp.eval_chunk_size, **conf,
            )
        scorer.encoder = self.light if name == "light" else self.booster
        if head is not None:
            scorer.output = head
        return scorer

    # ------------------------------------------------------------------ the nets
    @property
    def num_items(self) -> int:
        return self.hparams.num_items

    def net(self, name: str) -> tuple[nn.Module, torch.Tensor]:
        """(encoder, scoring table (N+1, d)) of ``light`` or ``booster``."""
        scorer = self.scorers[name]
        return scorer.encoder, scorer.output_weight()

    def booster_only_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Parameters the light net never uses (the gradient block keeps the hint away from these)."""
        light_ids = {id(p) for p in self.light_parameters()}
        out = [(f"booster.{n}", p) for n, p in self.booster.named_parameters() if id(p) not in light_ids]
        if self.booster_head is not None:
            out += [(f"booster_head.{n}", p) for n, p in self.booster_head.named_parameters()]
        return out

    def light_parameters(self) -> list[nn.Parameter]:
        ps = {id(p): p for p in self.light.parameters()}
        if self.light_head is not None:
            ps.update({id(p): p for p in self.light_head.parameters()})
        return list(ps.values())

    def describe(self) -> str:
        b, li = self.hparams.booster, self.hparams.light
        n_b = sum(p.numel() for _, p in self.booster_only_parameters())
        n_l = sum(p.numel() for p in self.light_parameters())
        return (f"rocket: booster {b['arch']} x{b.get('num_blocks')} d={self.booster.d_model}, light {li['arch']} "
                f"x{li.get('num_blocks')} d={self.light.d_model}; light net {n_l:,} parameters, booster-only {n_b:,}")

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """The light net's hidden states (B, T, d)."""
        return self.light(items)

    def user_representation(self, items: torch.Tensor, net: str = "light") -> torch.Tensor:
        return self.scorers[net].user_representation(items)

    def output_weight(self) -> torch.Tensor:
        """The light net's scoring table (N + 1, d)."""
        return self.scorers["light"].output_weight()

    def score_fn(self, h: torch.Tensor):
        return self.scorers["light"].score_fn(h)

    # ------------------------------------------------------------------ training
    def set_hint(self, hint: Callable[[pl.LightningModule], HintSpec | None] | None) -> None:
        """Install the hint between the nets (``None``: none; the nets then train side by side).

        ``hint(module)`` is called with this module at every training batch (so a schedule can read its
        ``global_step`` and ``current_epoch``) and returns that step's
        :class:`~lightning_rec.losses.distill.HintSpec`, or None for no hint: the term
        ``fn(z_light, z_booster, valid) -> (m,)`` on both nets' logits over the loss's candidates, its weight,
        whether the booster's logits are detached (Rocket's gradient block) and the factor on the light
        net's CE. :class:`~lightning_rec.methods.rocket.HintLossCallback` installs its ``spec`` at setup and
        removes it at teardown. The hint is not part of the module's state (state_dict, hyperparameters).
        """
        if isinstance(hint, nn.Module):
            raise TypeError("set_hint: expected a function, not a module (its parameters would join the rocket's)")
        self._hint = hint

    def loss_parts(self, batch: dict[str, torch.Tensor], spec=None, teacher_ce: bool = True) -> dict[str, torch.Tensor]:
        """``student_ce`` (light), ``teacher_ce`` (booster) and, with a hint spec, ``hint``: the pieces
        the hint-loss callback weighs. Sampled negatives are drawn once and shared by both nets."""
        mask = batch["targets"] != 0
        targets = batch["targets"][mask]
        hl = self.light(batch["inputs"])[mask]
        hb = self.booster(batch["inputs"])[mask]
        _, wl = self.net("light")
        _, wb = self.net("booster")
        negatives = None
        if self.hparams.loss == "sampled_softmax":
            negatives = draw_negatives(self.num_items, self.hparams.num_negatives, targets.device)
        return joint_losses(hl, wl, targets, negatives, hb, wb, teacher_ce=teacher_ce, hint=spec,
                            chunk_rows=self.hparams.loss_chunk_rows)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.train_loss(batch, log=True)

    def train_loss(self, batch: dict[str, torch.Tensor], log: bool = False) -> torch.Tensor:
        """Both nets' losses plus the weighted hint for one batch; logs only when ``log``."""
        spec = self._hint(self) if self._hint is not None else None
        parts = self.loss_parts(batch, spec)
        n = int((batch["targets"] != 0).sum())
        loss = parts["student_ce"] * (spec.student_ce_weight if spec else 1.0) + parts["teacher_ce"]
        if spec is not None:
            loss = loss + spec.weight * parts["hint"]
        if log:
            if spec is not None:
                # each step's value (local), and the epoch mean reduced over ranks
                self.log("train/hint_step", parts["hint"], on_step=True, on_epoch=False, batch_size=n)
                self.log("train/hint_epoch", parts["hint"], on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
                self.log("train/hint_weight", float(spec.weight), on_step=True, on_epoch=False, batch_size=1)
            self.log("train/loss_step", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=n)
            # epoch means are reduced over ranks once per epoch; step values stay local (no per-step sync)
            self.log("train/loss_epoch", loss, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
            self.log("train/light_ce", parts["student_ce"], on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
            self.log("train/booster_ce", parts["teacher_ce"], on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
            self.log("train/targets", float(n), on_step=False, on_epoch=True, reduce_fx="sum", batch_size=1, sync_dist=True)
        return loss

    # ------------------------------------------------------------------ optimisation
    def set_optimizer_factory(self, factory) -> None:
        """As :meth:`SeqRecModule.set_optimizer_factory` (SWATS's SGD phase): ``factory(params, optimizer_options)``
        returns ``(optimizer, keep_scheduler)`` or None for the configured optimizer; ``None`` removes it."""
        self._optimizer_factory = factory

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        factory = self._optimizer_factory
        built = factory(params, dict(self.hparams.optimizer)) if factory is not None else None
        opt, keep_scheduler = built if built is not None else (build_optimizer(dict(self.hparams.optimizer), params), True)

        def total() -> int:  # only schedules that take total_steps ask for it
            return max(int(self.trainer.estimated_stepping_batches), 1) if self._trainer is not None else 1

        sched = build_scheduler(dict(self.hparams.scheduler), opt, total) if keep_scheduler else None
        if sched is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ evaluation and prediction
    def _eval_step(self, batch, stage: str, metrics: nn.ModuleDict) -> None:
        prefix = "sampled_" if self.hparams.eval_protocol == "sampled" else ""
        for net in NETS:
            ranks = self.scorers[net]._ranks(batch)
            for name, values in metrics_from_ranks(ranks, self.hparams.eval_ks).items():
                key = f"{net}/{prefix}{name}"
                m = metrics[key.replace("@", "_at_").replace("/", "__")]
                m.update(values)
                self.log(f"{stage}/{key}", m, on_step=False, on_epoch=True,
                         prog_bar=key == f"light/{prefix}ndcg@10", batch_size=ranks.shape[0])

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metrics)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_metrics)

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        """The light net's top-K (``predict_k``, ``predict_exclude_seen`` as set on this module)."""
        light = self.scorers["light"]
        for option in ("predict_k", "predict_exclude_seen"):
            if hasattr(self, option):
                setattr(light, option, getattr(self, option))
        return light.predict_step(batch, batch_idx, dataloader_idx)

    # ------------------------------------------------------------------ export
    def export_net(self, name: str = "light") -> SeqRecModule:
        """One net as a standalone :class:`SeqRecModule` that scores exactly as it does here."""
        if name not in NETS:
            raise ConfigError(f"net={name}: expected light or booster")
        scorer = self.scorers[name]
        model = SeqRecModule(**dict(scorer.hparams))
        sd = {f"encoder.{k}": v.detach().clone() for k, v in scorer.encoder.state_dict().items()
              if not k.startswith("item_embedding.")}
        with torch.no_grad():  # a projected shared table is materialised: same rows, no projection at run time
            sd["encoder.item_embedding.weight"] = scorer.encoder.item_embedding.weight.detach().clone()
        if scorer.output is not None:
            sd["output.weight"] = scorer.output.weight.detach().clone()
        model.load_state_dict(sd)
        return model


def net_parameters(model: SeqRecModule) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def scoring_latency(model: SeqRecModule, items: torch.Tensor, repeats: int = 10, chunk: int = 65536) -> float:
    """Median seconds to score every item for a batch of users (representation + full ranking)."""
    import statistics
    import time

    from lightning_rec.metrics import topk_items

    model.eval()

    def once():
        h = model.user_representation(items)
        topk_items(model.score_fn(h), model.num_items, 10, None, chunk)
        if items.is_cuda:
            torch.cuda.synchronize()

    for _ in range(2):
        once()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
