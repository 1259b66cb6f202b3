"""One LightningModule for both encoders: training losses, full-ranking evaluation, top-K prediction.

All constructor arguments are plain values (ints, floats, strings, lists, dicts of
those), so a checkpoint loads with ``weights_only=True`` and rebuilds the exact model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric

from lightning_rec.errors import ConfigError
from lightning_rec.losses import (
    LOSSES,
    NEG_SAMPLERS,
    LogitBuffer,
    bce_one_negative,
    full_ce,
    mixed_softmax,
    popularity_log_q,
    sampled_softmax,
)
from lightning_rec.metrics import full_ranks, metrics_from_ranks, sampled_ranks, topk_items
from lightning_rec.models import ENCODERS, block_dilations, build_encoder, normal_init_
from lightning_rec.modules.optim import build_optimizer, build_scheduler, check_training_options, parameter_groups

__all__ = ["SeqRecModule", "build_optimizer", "check_training_options"]

class SeqRecModule(pl.LightningModule):
    """Next-item prediction with NextItNet or SASRec.

    Args:
        num_items: catalogue size (from the DataModule).
        arch: ``sasrec`` or ``nextitnet``.
        d_model, num_blocks, num_heads, attention_m, ffn_dim, max_len, dropout, norm_first, layout,
        positions, attn_out_dropout, residual_alpha, kernel_size, dilations, block_dilations: encoder
            hyperparameters (see the encoders); ``num_blocks``/``block_dilations`` change when StackRec stacks.
        init_std: None keeps the encoders' own initialisation; e.g. 0.02 draws every weight from
            N(0, 0.02) as RecBole does (:func:`~lightning_rec.models.normal_init_`).
        tied_embeddings: score items with the input embedding table (else a separate one).
        loss: ``ce`` (full softmax), ``sampled_softmax`` (``num_negatives``) or ``bce``.
        neg_sampler: negatives of ``sampled_softmax``: ``uniform``, ``popularity`` (drawn in
            proportion to ``(training count + 1) ** neg_power``, counts from the DataModule) or ``mixed``
            (the batch's own targets plus ``num_negatives`` uniform items, :func:`~lightning_rec.losses.mixed_softmax`).
        logq_correction: with ``popularity`` or ``mixed``, subtract log q from every candidate's logit, so the
            sampled loss estimates the full softmax (false: popularity negatives as hard negatives).
        loss_chunk_rows: compute the loss this many positions at a time, so no (positions x candidates)
            logit tensor exists (full CE: a fused linear + cross-entropy in a reused buffer); None: all at once.
        optimizer: ``{_target_: <optimizer class>, lr, weight_decay, ...}`` (see :mod:`lightning_rec.modules.optim`).
        scheduler: ``{_target_: <schedule>, ...}`` stepped per batch, or ``{_target_: null}``.
        eval_ks: cut-offs of HR/NDCG/MRR.
        exclude_seen: drop items the user already interacted with from the ranking.
        eval_protocol: ``full`` or ``sampled`` (metric names get a ``sampled_`` prefix).
        eval_chunk_size: items scored at once in evaluation and prediction.
        compile: ``torch.compile`` the encoder when a GPU is used (ignored on the CPU).
    """

    def __init__(
        self,
        num_items: int,
        arch: str = "sasrec",
        d_model: int = 64,
        num_blocks: int = 2,
        num_heads: int = 1,
        attention_m: int = 1,
        ffn_dim: int | None = None,
        max_len: int = 200,
        dropout: float = 0.2,
        norm_first: bool = True,
        layout: str | None = None,
        positions: str = "right",
        attn_out_dropout: bool = True,
        init_std: float | None = None,
        residual_alpha: bool = True,
        kernel_size: int = 3,
        dilations: list[int] | None = None,
        block_dilations: list[int] | None = None,
        tied_embeddings: bool = True,
        loss: str = "ce",
        num_negatives: int = 256,
        neg_sampler: str = "uniform",
        neg_power: float = 1.0,
        logq_correction: bool = True,
        loss_chunk_rows: int | None = None,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        eval_ks: list[int] | None = None,
        exclude_seen: bool = True,
        eval_protocol: str = "full",
        eval_chunk_size: int = 65536,
        compile: bool = False,
    ):
        super().__init__()
        optimizer = dict(optimizer or {"_target_": "torch.optim.Adam", "lr": 1e-3})
        scheduler = dict(scheduler or {"_target_": None})
        eval_ks = list(eval_ks or [5, 10, 20])
        dilations = list(dilations or [1, 4])
        if arch not in ENCODERS:
            raise ConfigError(f"model.arch: unknown model '{arch}'; expected one of {', '.join(ENCODERS)}")
        if loss not in LOSSES:
            raise ConfigError(f"model.loss: unknown loss '{loss}'; expected one of {', '.join(LOSSES)}")
        if neg_sampler not in NEG_SAMPLERS:
            raise ConfigError(f"model.neg_sampler: unknown sampler '{neg_sampler}'; expected one of {', '.join(NEG_SAMPLERS)}")
        if not isinstance(num_negatives, int) or num_negatives < 1:
            raise ConfigError(f"model.num_negatives: expected a positive integer, got {num_negatives!r}")
        if loss_chunk_rows is not None and (isinstance(loss_chunk_rows, bool) or not isinstance(loss_chunk_rows, int)
                                            or loss_chunk_rows < 1):
            raise ConfigError(f"model.loss_chunk_rows={loss_chunk_rows!r}: expected an integer >= 1 or null")
        check_training_options(optimizer, scheduler, eval_protocol)
        if num_items < 1:
            raise ConfigError(f"num_items: expected a positive catalogue size, got {num_items}")
        self.save_hyperparameters()
        hp = self.hparams
        # Normalised defaults replace the Nones, so the checkpoint states the exact setting.
        hp.update(optimizer=optimizer, scheduler=scheduler, eval_ks=eval_ks, dilations=dilations)
        self.encoder = build_encoder(
            arch, num_items, d_model=d_model, num_blocks=num_blocks, num_heads=num_heads, attention_m=attention_m, ffn_dim=ffn_dim,
            max_len=max_len, dropout=dropout, norm_first=norm_first, layout=layout, positions=positions,
            attn_out_dropout=attn_out_dropout, init_std=init_std, residual_alpha=residual_alpha, kernel_size=kernel_size, dilations=dilations, block_dilations=block_dilations,
        )
        self.output = None
        if not tied_embeddings:
            self.output = nn.Embedding(num_items + 1, d_model, padding_idx=0)
            nn.init.normal_(self.output.weight, std=d_model**-0.5)
            if init_std is not None:  # validated by build_encoder above
                normal_init_(self.output, init_std)
        prefix = "sampled_" if eval_protocol == "sampled" else ""
        self.metric_names = [f"{prefix}{m}@{k}" for k in hp.eval_ks for m in ("hr", "ndcg", "mrr")]
        self.val_metrics = nn.ModuleDict({n.replace("@", "_at_"): MeanMetric() for n in self.metric_names})
        self.test_metrics = nn.ModuleDict({n.replace("@", "_at_"): MeanMetric() for n in self.metric_names})
        self._compiled = None
        self._neg_log_q = None  # log q of popularity negatives, from the DataModule at the first loss
        self._logit_buffer = LogitBuffer()  # chunked full CE: one scratch tensor for every step

    # ------------------------------------------------------------------ model
    @property
    def num_items(self) -> int:
        return self.hparams.num_items

    def output_weight(self) -> torch.Tensor:
        """Item scoring table (N + 1, d); row 0 is padding."""
        return self.encoder.item_embedding.weight if self.output is None else self.output.weight

    # ------------------------------------------------------------------ depth changes (StackRec)
    def encoder_changed(self) -> None:
        """Call after replacing or growing ``self.encoder`` (StackRec): drops the compiled copy and, under
        ``model.compile``, compiles the new encoder."""
        self._compiled = None
        if self.hparams.compile and self._trainer is not None:
            self.setup("fit")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A checkpoint written after a stack holds more blocks than this module was built with
        # (e.g. a config-built model resumed from a deep checkpoint): grow before weights load.
        # The same holds for a model of the right depth whose NextItNet dilations differ (adjacent
        # stacking keeps each copy's source dilation): same shapes, different function.
        hp = checkpoint.get("hyper_parameters", {})
        n = hp.get("num_blocks", self.hparams.num_blocks)
        dils = hp.get("block_dilations")
        current = block_dilations(self.encoder)
        wanted = None if current is None else [self.encoder.dilation_at(i) if dils is None else dils[i] for i in range(n)]
        if n != len(self.encoder.blocks) or current != wanted:
            like = self.output_weight()
            self.encoder.blocks = nn.ModuleList(
                self.encoder.make_block(i, None if dils is None else dils[i]).to(device=like.device, dtype=like.dtype)
                for i in range(n)
            )
            self.hparams.num_blocks = n
            self.hparams.block_dilations = dils

    def setup(self, stage: str) -> None:
        if self.hparams.compile and self._compiled is None:
            if torch.cuda.is_available() and self.device.type == "cuda" or (
                self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
            ):
                # Kept outside the module tree so state_dict keys stay unchanged.
                self.__dict__["_compiled"] = torch.compile(self.encoder, dynamic=True)
            elif not getattr(self, "_compile_skip_said", False):
                rank_zero_info("model.compile=true ignored: torch.compile is only used on a GPU")
                self._compile_skip_said = True

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, T, d) for item sequences (B, T), left-padded with 0."""
        enc = self._compiled if self._compiled is not None and self.training else self.encoder
        return enc(items)

    def user_representation(self, items: torch.Tensor) -> torch.Tensor:
        """The hidden state at the most recent position (B, d)."""
        if self.encoder.arch == "sasrec":
            return self.encoder(items, last_only=True)[:, -1]  # skips the other positions in the last block
        return self(items)[:, -1]

    def score_fn(self, h: torch.Tensor):
        w = self.output_weight()
        return lambda c0, c1: h @ w[c0:c1].T

    # ------------------------------------------------------------------ training
    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Next-item loss for hidden states (M, d) and their targets (M,)."""
        w = self.output_weight()
        hp = self.hparams
        rows = hp.get("loss_chunk_rows")
        if hp.loss == "ce":
            return full_ce(hidden, w, targets, rows, self._logit_buffer)
        if hp.loss == "sampled_softmax" and hp.neg_sampler == "mixed":
            return mixed_softmax(hidden, w, targets, hp.num_negatives, hp.logq_correction, rows)
        if hp.loss == "sampled_softmax":
            return sampled_softmax(hidden, w, targets, hp.num_negatives, self.negative_log_q(),
                                   hp.logq_correction, rows)
        return bce_one_negative(hidden, w, targets)

    def negative_log_q(self) -> torch.Tensor | None:
        """log q of the sampled-softmax negatives (None: uniform), from the DataModule's training counts."""
        if self.hparams.neg_sampler in ("uniform", "mixed"):  # mixed: log q per batch (mixed_softmax)
            return None
        if self._neg_log_q is None:
            dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            counts = getattr(dm, "popularity", None)
            if counts is None:
                raise ConfigError("model.neg_sampler=popularity: needs item counts from a DataModule "
                                  "(its `popularity`, set up by lightning_rec's SeqDataModule); use neg_sampler=uniform")
            if counts.numel() != self.num_items + 1:
                raise ConfigError(f"model.neg_sampler=popularity: the DataModule counts {counts.numel() - 1} items, "
                                  f"the model has {self.num_items}")
            self._neg_log_q = popularity_log_q(counts, self.hparams.neg_power).to(self.output_weight().device)
        return self._neg_log_q

    def on_fit_start(self) -> None:
        self._neg_log_q = None  # recomputed from this fit's data

    def on_train_end(self) -> None:
        self._logit_buffer.release()  # the chunked CE's scratch (chunk x catalogue floats) is not needed after training

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.train_loss(batch, log=True)

    def set_loss_term(self, term: Callable[..., tuple[torch.Tensor, dict[str, Any]]] | None) -> None:
        """Let ``term`` compute the training loss in place of :meth:`loss` (``None``: the plain loss again).

        The hook of knowledge distillation: :class:`~lightning_rec.methods.rocket.HintLossCallback` installs
        its term at setup (against a frozen teacher, or federated per-label teacher logits) and removes it
        at teardown. For every batch, :meth:`train_loss` calls

            ``loss, logs = term(module, inputs, hidden, targets, mask)``

        with this module, ``inputs`` (B, T) the item sequences, ``mask`` (B, T) the positions that have a
        target, ``hidden`` (M, d) this module's hidden states at those positions (with their graph) and
        ``targets`` (M,) the next items there. ``loss`` is the batch's scalar training loss (typically a
        weighted :meth:`loss` or its own CE on the same candidates, plus a term against the teacher's logits
        on :meth:`output_weight`); ``logs`` maps metric names to values: a name ending in ``_step`` is
        logged at every step (this rank's value), any other as the epoch mean over the positions, reduced
        over ranks. The term is not part of the module's state (neither state_dict nor hyperparameters).
        """
        if isinstance(term, nn.Module):
            raise TypeError("set_loss_term: expected a function, not a module (its parameters would join this one's)")
        self._loss_term = term

    def train_loss(self, batch: dict[str, torch.Tensor], log: bool = False) -> torch.Tensor:
        """The training loss of one batch (what ``training_step`` returns); logs only when ``log``.

        Strategies that need extra gradients of the same objective (SVRG's snapshot gradient in
        :class:`~lightning_rec.methods.topk.strategy.TopKAveragingStrategy`) call it with ``log=False``.
        A term installed with :meth:`set_loss_term` computes it instead of :meth:`loss`.
        """
        h = self(batch["inputs"])  # (B, T, d)
        mask = batch["targets"] != 0
        n = int(mask.sum())
        hidden, targets = h[mask], batch["targets"][mask]
        term = getattr(self, "_loss_term", None)
        if term is None:
            loss, logs = self.loss(hidden, targets), {}
        else:
            loss, logs = term(self, batch["inputs"], hidden, targets, mask)
        if log:
            self._log_loss_terms(logs, n)
            self.log("train/loss_step", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=n)
            # epoch means are reduced over ranks once per epoch; step values stay local (no per-step sync)
            self.log("train/loss_epoch", loss, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
            self.log("train/targets", float(n), on_step=False, on_epoch=True, reduce_fx="sum", batch_size=1, sync_dist=True)
        return loss

    def _log_loss_terms(self, logs: dict[str, Any], n: int) -> None:
        """A loss term's logs: ``*_step`` names each step (local), the others as epoch means reduced over ranks."""
        for name, value in logs.items():
            step = name.endswith("_step")
            self.log(name, value, on_step=step, on_epoch=not step, batch_size=n, sync_dist=not step)

    # ------------------------------------------------------------------ evaluation
    def _ranks(self, batch: dict[str, torch.Tensor], h: torch.Tensor | None = None,
               w: torch.Tensor | None = None) -> torch.Tensor:
        """Rank of each target; ``h`` (B, d) and the scoring table ``w`` default to this model's own."""
        if h is None:
            h = self.user_representation(batch["inputs"])  # (B, d)
        if w is None:
            w = self.output_weight()
        if "negatives" in batch and self.hparams.eval_protocol == "sampled":
            # One reduction, the same for every candidate, so equal scores stay exactly equal (tie rule);
            # a batched matmul may treat its last columns differently and break ties.
            cand = torch.cat([batch["target"][:, None], batch["negatives"]], 1)
            s = (h[:, None, :] * w[cand]).sum(-1)
            return sampled_ranks(s[:, 0], s[:, 1:])
        seen = batch["seen"] if self.hparams.exclude_seen else None
        return full_ranks(lambda c0, c1: h @ w[c0:c1].T, self.num_items, batch["target"], seen,
                          self.hparams.eval_chunk_size)

    def _eval_step(self, batch, stage: str, metrics: nn.ModuleDict) -> None:
        ranks = self._ranks(batch)
        prefix = "sampled_" if self.hparams.eval_protocol == "sampled" else ""
        for name, values in metrics_from_ranks(ranks, self.hparams.eval_ks).items():
            key = f"{prefix}{name}"
            m = metrics[key.replace("@", "_at_")]
            m.update(values)
            self.log(f"{stage}/{key}", m, on_step=False, on_epoch=True, prog_bar=key.startswith(f"{prefix}ndcg@10"),
                     batch_size=ranks.shape[0])

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metrics)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_metrics)

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        k = getattr(self, "predict_k", 10)
        h = self.user_representation(batch["inputs"])
        seen = batch["seen"] if getattr(self, "predict_exclude_seen", True) else None
        if seen is not None:  # ranking at a held-out item (predict.at=test|valid): it stays rankable, as in test
            seen = seen.masked_fill(seen == batch["target"][:, None], 0)
        items, scores = topk_items(self.score_fn(h), self.num_items, k, seen, self.hparams.eval_chunk_size)
        return {"user": batch["user"], "items": items, "scores": scores, "target": batch["target"]}

    # ------------------------------------------------------------------ optimisation
    def set_optimizer_factory(self, factory) -> None:
        """Let a callback build the optimizer (e.g. SWATS's SGD phase); ``None`` restores the configured one.

        ``factory(params, optimizer_options)`` is called by :meth:`configure_optimizers` at every (re)build
        (fit start, resume, ``trainer.strategy.setup_optimizers``) and returns ``(optimizer, keep_scheduler)``,
        or ``None`` to use the configured optimizer this time; ``keep_scheduler=False`` drops the configured
        LR scheduler.
        """
        self._optimizer_factory = factory

    def configure_optimizers(self):
        params = parameter_groups(self.named_parameters(), dict(self.hparams.optimizer))  # optimizer.no_weight_decay
        factory = getattr(self, "_optimizer_factory", None)
        built = factory(params, dict(self.hparams.optimizer)) if factory is not None else None
        opt, keep_scheduler = built if built is not None else (build_optimizer(dict(self.hparams.optimizer), params), True)
        def total() -> int:  # only schedules that take total_steps ask for it
            return max(int(self.trainer.estimated_stepping_batches), 1) if self._trainer is not None else 1

        sched = build_scheduler(dict(self.hparams.scheduler), opt, total) if keep_scheduler else None
        if sched is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
