"""Top-k model averaging (topkSVRG, SPEC section 5): the strategy, composed of its parts.

:class:`TopKAveragingStrategy` replaces the per-step gradient all-reduce by a model exchange every ``h``
optimizer steps. Every rank keeps a copy of the global model ``w``; at the end of a round the ``k`` ranks whose
local models are closest to ``w`` are averaged (:mod:`.selection`), ``w`` moves toward their mean
(:mod:`.outer`) and every rank continues from it. A round also ends before each validation and when training
ends, so evaluation, checkpoint selection and the saved weights are always the global model
(:mod:`.rounds`). Optimizer state stays local to each rank unless ``average_state`` names some of it, and
``second_moment=global_batch`` corrects each local Adam step (:mod:`.optim_state`); ``svrg=true`` corrects
each local step with the snapshot gradient (:mod:`.svrg`). Every byte handed to a collective is counted
(:mod:`.metering`, ``comm/bytes``); checkpoints hold the global model and each rank's own state beside it
(:mod:`.checkpointing`).

Public hook for the rest of a fit (duck-typed, so callbacks need not import this package):
``add_round_listener(fn)`` / ``remove_round_listener(fn)`` (``fn(step)`` after every round, see
:mod:`.rounds`), ``round`` (rounds completed), ``global_params`` and ``finish_round()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from lightning_rec.errors import ConfigError
from lightning_rec.methods.topk import checkpointing
from lightning_rec.methods.topk.lightning_private import optimizers_to_device, sigterm_check_per_round
from lightning_rec.methods.topk.metering import MeteredDDPStrategy, _CommMeter  # noqa: F401  (its old home)
from lightning_rec.methods.topk.optim_state import (  # noqa: F401  (restore_second_moment, SECOND_MOMENTS: old home)
    SECOND_MOMENTS,
    GlobalBatchSecondMoment,
    StateAveraging,
    global_batch_second_moment,
    restore_second_moment,
)
from lightning_rec.methods.topk.outer import OuterStep
from lightning_rec.methods.topk.rounds import RoundListeners, RoundSchedule, report_round, round_entry
from lightning_rec.methods.topk.selection import (
    chosen_mean,
    distance_mask,
    distances_to_global,
    resolve_k,
    select_topk,
)
from lightning_rec.methods.topk.svrg import SnapshotGradient


class TopKAveragingStrategy(DDPStrategy):
    """Top-k model averaging over torch.distributed (topkSVRG); see the module docstring.

    Args:
        k: ranks averaged each round: an int is a count, a float in (0, 1] a fraction of the ranks
            (rounded, at least 1). ``k = ranks`` is plain model averaging (local SGD).
        h: local optimizer steps per round. ``h = 1`` with ``k = ranks`` and plain SGD equals DDP.
        distance_params: fnmatch patterns of parameter names the distance is measured on (all
            parameters when null); the chosen models are always averaged on every parameter.
        svrg: correct local steps with the snapshot gradient (:mod:`.svrg`).
        svrg_batches: batches per rank sampled to estimate the snapshot gradient ``mu``.
        log_every_rounds: print the chosen ranks and distances every this many rounds (rank 0;
            every round is logged to the loggers and to ``topk_rounds.jsonl`` in the run folder).
        outer_lr: step size of the outer update along ``w - mean`` (1 with no momentum: the mean).
        outer_momentum: momentum of the outer update in [0, 1) (0: none).
        outer_nesterov: Nesterov (True) or heavy-ball momentum.
        average_state: names of per-parameter optimizer state tensors (Adam: ``exp_avg``,
            ``exp_avg_sq``) averaged over the chosen ranks each round; empty: state stays local.
        warmup_steps: for this many optimizer steps from the start of the run, rounds come every
            ``warmup_h`` steps instead of every ``h`` (post-local SGD). 0: no warm-up.
        warmup_h: local steps per round during the warm-up (1: average after every step).
        second_moment: ``local`` (the SPEC's method) or ``global_batch`` (:mod:`.optim_state`).
        **kwargs: passed to Lightning's :class:`DDPStrategy` (``process_group_backend``, ``timeout``...).
    """

    strategy_name = "topk_averaging"

    def __init__(self, k: int | float = 0.8, h: int = 32, distance_params: list[str] | None = None,
                 svrg: bool = False, svrg_batches: int = 4, log_every_rounds: int = 10, outer_lr: float = 1.0,
                 outer_momentum: float = 0.0, outer_nesterov: bool = True, average_state: list[str] | None = None,
                 warmup_steps: int = 0, warmup_h: int = 1, second_moment: str = "local", **kwargs: Any) -> None:
        self.schedule = RoundSchedule(h, warmup_steps, warmup_h)
        if second_moment not in SECOND_MOMENTS:
            raise ConfigError(f"trainer.strategy.second_moment={second_moment!r}: expected one of "
                              f"{', '.join(SECOND_MOMENTS)}")
        self.outer = OuterStep(outer_lr, outer_momentum, outer_nesterov)
        self.snapshot = SnapshotGradient(svrg, svrg_batches)
        resolve_k(k, 1)  # type and range check now; the count needs the world size
        self.state_averaging = StateAveraging(average_state)
        super().__init__(**kwargs)
        self.k, self.h = k, h
        self.warmup_steps, self.warmup_h = int(warmup_steps), warmup_h
        self.second_moment = second_moment
        self._second_moment = GlobalBatchSecondMoment()
        self.distance_params = list(distance_params) if distance_params else None
        self.svrg, self.svrg_batches = bool(svrg), svrg_batches
        self.log_every_rounds = max(1, int(log_every_rounds))
        self.average_state = self.state_averaging.names
        self.meter = _CommMeter()     # payload this rank handed to collectives
        self.round = 0                # completed rounds
        self.steps_in_round = 0       # local optimizer steps since the last exchange
        self.history: list[dict[str, Any]] = []   # the last rounds (chosen ranks, distances)
        self._listeners = RoundListeners()
        self._global: list[torch.Tensor] | None = None
        self._restored: dict[str, Any] | None = None
        self._own: dict[str, Any] | None = None      # this rank's part of the checkpoint being written
        self._extra: dict[str, Any] | None = None
        self._restored_own: dict[str, Any] | None = None

    @property
    def comm_bytes(self) -> int:
        return self.meter.bytes

    @comm_bytes.setter
    def comm_bytes(self, value: int) -> None:
        self.meter.bytes = int(value)

    # -- the public hook (see the module docstring)
    def add_round_listener(self, fn: Callable[[int], None]) -> None:
        """Have ``fn(step)`` called on every rank right after each round, when the module is the global model."""
        self._listeners.add(fn)

    def remove_round_listener(self, fn: Callable[[int], None]) -> None:
        self._listeners.remove(fn)

    @property
    def global_params(self) -> list[torch.Tensor] | None:
        """The global model's parameters (in ``module.parameters()`` order), the same on every rank."""
        return self._global

    def finish_round(self, reason: str = "end of training") -> None:
        """End a round now if local steps were taken since the last one (a collective: every rank calls it).

        A run that ends mid-round (no validation at its end) tests and keeps the global model, not each rank's
        local one; a callback whose ``on_train_end`` needs it (EMA's runs before this strategy's) calls this.
        """
        if self.steps_in_round and self._global is not None:
            self._exchange(reason)

    def model_changed(self) -> None:
        """Called by the stacking callback after the module's parameters changed shape."""
        self._sync_from_rank0()

    @property
    def num_selected(self) -> int:
        return resolve_k(self.k, self.world_size)

    # -- no DistributedDataParallel wrapper: no per-step gradient all-reduce
    def configure_ddp(self) -> None:
        # Lightning restores checkpoint weights before this, so the global model is the resumed one.
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if self.svrg and trainer is not None:
            SnapshotGradient.check(trainer, self.precision_plugin)
        self._sync_from_rank0()
        # Lightning's SIGTERM broadcast is a collective each step; here once a round (all ranks count the same steps)
        sigterm_check_per_round(trainer, lambda: self.steps_in_round == 0)

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.lightning_module.parameters()]

    def _sync_from_rank0(self) -> None:
        """Make rank 0's weights everyone's local and global model (start, resume, after a stack)."""
        params = self._params()
        if self.world_size > 1:
            with torch.no_grad():
                for p in params:
                    dist.broadcast(p.data, src=0)
        self._global = [p.detach().clone() for p in params]
        self.outer.reset()
        self.snapshot.mu = None
        self.steps_in_round = 0

    # -- the round
    def _exchange(self, reason: str = "round", step: int | None = None) -> None:
        params = self._params()
        if self._global is None or len(self._global) != len(params):
            self._sync_from_rank0()
            return
        world, rank = self.world_size, self.global_rank
        with torch.no_grad():
            mask = distance_mask([n for n, _ in self.lightning_module.named_parameters()], self.distance_params)
            dists = distances_to_global(params, self._global, mask, world, self.meter)
            chosen = select_topk(dists, self.num_selected)
            flat = chosen_mean(params, chosen, rank, world, self.meter)
            offset = 0
            for i, (p, g) in enumerate(zip(params, self._global)):
                n = p.numel()
                g.copy_(self.outer(i, g, flat[offset:offset + n].view_as(p), self._global))
                p.data.copy_(g)
                offset += n
            if self.average_state:
                self._average_optimizer_state(chosen)
        self.round += 1
        self.steps_in_round = 0
        self.snapshot.mu = None
        trainer = self.lightning_module.trainer
        if step is None:
            step = trainer.global_step if trainer is not None else 0
        entry = round_entry(self.round, step, reason, chosen, dists, self.comm_bytes)
        self.history = (self.history + [entry])[-100:]
        if self.is_global_zero and trainer is not None:
            report_round(trainer, entry, world, self.log_every_rounds)
        self._listeners(int(step))

    def _average_optimizer_state(self, chosen: list[int]) -> None:
        device = self.root_device if self.world_size > 1 else None  # one rank: nothing to reduce
        self.state_averaging(self.optimizers, chosen, self.global_rank, self.world_size, device, self.meter)

    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs):
        if self.svrg:
            if self.snapshot.mu is None:
                trainer = self.lightning_module.trainer
                seed = int(trainer.current_epoch) * 1_000_003 + self.round * 101 + self.global_rank
                self.snapshot.compute_mu(self.lightning_module, self._params(), self._global, seed=seed,
                                         device=self.root_device, rank=self.global_rank, world=self.world_size,
                                         meter=self.meter)
            closure = self._svrg_closure(closure)
        saved = None
        if self.second_moment == "global_batch" and self.world_size > 1:
            saved = self._second_moment.before(optimizer, self.world_size)
        try:
            out = super().optimizer_step(optimizer, closure, model, **kwargs)
        finally:
            self._second_moment.after(saved)
        self.steps_in_round += 1
        trainer = self.lightning_module.trainer
        step = trainer.global_step if trainer is not None else 0  # 0-based index of this step
        if self.schedule.due(self.steps_in_round, step):
            self._exchange(step=step + 1 if trainer is not None else None)  # counts this step
        return out

    def _svrg_closure(self, closure):
        return self.snapshot.closure(closure, self.lightning_module, self._params(), self._global)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self.snapshot.batch = batch

    def on_train_end(self) -> None:
        super().on_train_end()
        self.finish_round()

    # -- evaluation sees the global model
    def on_validation_start(self) -> None:
        super().on_validation_start()
        trainer = self.lightning_module.trainer
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING and self.steps_in_round:
            self._exchange("validation")

    # -- checkpoints (:mod:`.checkpointing`)
    rank_file = staticmethod(checkpointing.rank_file)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        state, self._extra, self._own = checkpointing.state_for_save(self)
        return state

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        state = super().optimizer_state(optimizer)
        if self._own is not None and self.global_rank > 0:  # rank 0's is the file's own optimizer state
            self._own["optimizer_states"].append(checkpointing.to_cpu(state))
        return state

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options=None) -> None:
        extra, own = self._extra or {}, self._own
        self._extra = self._own = None
        checkpointing.write(checkpoint, filepath, extra, own, self.global_rank)
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def remove_checkpoint(self, filepath) -> None:
        super().remove_checkpoint(filepath)  # rank 0: the file
        checkpointing.remove(filepath, self.global_rank)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        ckpt = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        self._restored = ckpt.get("topk_averaging") or {}
        self._restored_own = checkpointing.read_own(ckpt, checkpoint_path, self.global_rank, self.world_size)
        return ckpt

    def load_optimizer_state_dict(self, checkpoint) -> None:
        extra = self._restored or {}
        same_world = extra.get("world_size") == self.world_size
        own = self._restored_own
        exact = own is not None
        if same_world and self.world_size > 1:  # every rank must take the same path, or rounds would not line up
            flag = torch.tensor([int(exact)], device=self.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            exact = bool(flag.item())
            if not exact:
                rank_zero_info("warning: top-k averaging: a rank's own state for this checkpoint is missing (its "
                               "<checkpoint>.rank<r> file); every rank starts from rank 0's optimizer state and the "
                               "global model, a new round, so this resume is not exact")
        if exact and own.get("optimizer_states"):
            for optimizer, state in zip(self.optimizers, own["optimizer_states"]):
                optimizer.load_state_dict(state)
            optimizers_to_device(self.optimizers, self.root_device)
        else:
            if extra and not same_world:
                rank_zero_warn(f"top-k averaging: the checkpoint was written by {extra.get('world_size')} ranks, "
                               f"this run has {self.world_size}; every rank starts from rank 0's optimizer state")
            super().load_optimizer_state_dict(checkpoint)
        checkpointing.restore_round_state(self, extra, same_world, own if exact else None)
        self._restored = self._restored_own = None
