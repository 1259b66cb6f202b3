"""Distributed training: metered DDP and top-k model averaging (topkSVRG, SPEC section 5).

:class:`MeteredDDPStrategy` is Lightning's DDP with a gradient all-reduce hook that counts the
bytes each rank contributes, so synchronous DDP and top-k averaging report communication the same
way (``comm/bytes``: payload handed to collectives by one rank, cumulative).

:class:`TopKAveragingStrategy` replaces the per-step gradient all-reduce by a model exchange
every ``h`` optimizer steps. Every rank keeps a copy of the global model ``w``. At the end of a
round each rank computes the L2 distance of its local model to ``w``; the distances are
all-gathered (one number per rank), the ``k`` closest ranks are chosen (ties to the lower rank, so
every rank chooses the same), and one all-reduce of the chosen models (the others contribute
zeros) gives their mean, the new ``w``, which every rank then continues from. A round also ends
before each validation and when training ends, so evaluation, checkpoint selection and the saved
weights are always the global model. Optimizer state (e.g. Adam moments) stays local to each rank;
a checkpoint holds rank 0's, and each other rank writes its own to ``<checkpoint>.rank<r>``.

Outer optimizer (``outer_lr``, ``outer_momentum``; defaults 1 and 0 are the plain mean): the mean
``m`` of the chosen models is treated as a step, not a destination. With the pseudo-gradient
``delta = w - m`` and a momentum buffer ``b`` (zero at the start and after a stack),
``b <- mu * b + delta`` and ``w <- w - outer_lr * (delta + mu * b)`` (Nesterov) or
``w <- w - outer_lr * b`` (heavy ball). This is the outer step of DiLoCo (Douillard et al. 2023,
outer lr 0.7, Nesterov momentum 0.9); every rank computes it from the same all-reduced mean, so it
costs no communication. The buffer is kept in checkpoints.

Optimizer state (``average_state``, e.g. ``[exp_avg_sq]``): the named per-parameter state tensors of
the optimizer (Adam's ``exp_avg`` / ``exp_avg_sq``) are averaged over the chosen ranks in the same round,
one more all-reduce of that many numbers (counted in ``comm/bytes``). Off by default: the SPEC's
method keeps optimizer state local.

Adam's second moment (``second_moment``): DDP's Adam divides by the running mean of ``g^2`` for the
gradient ``g`` of the whole batch of all N ranks; a rank's local Adam divides by that of its own 1/N of
the batch, whose noise term is N times larger: ``E[g_r^2] = mu^2 + N s^2`` against ``mu^2 + s^2``. On
parameters whose gradient is mostly noise (rare items' embedding rows) local steps are then up to
sqrt(N) times shorter. ``second_moment=global_batch`` has each local Adam step divide by an estimate of
the whole batch's second moment instead, ``v' = (v + (N - 1) m_hat^2) / N`` in bias-corrected terms (the
first moment ``m_hat`` estimates ``mu``), with no communication; the optimizer's own state is unchanged.

SVRG (``svrg=true``): at the start of each round the snapshot ``w~ = w`` and its gradient ``mu``,
averaged over ``svrg_batches`` batches drawn at random from the training set on each rank (seeded by round and rank) and all-reduced over ranks,
are computed; every local step then follows ``g_i(w) - g_i(w~) + mu`` (the snapshot gradient on
the same batch, with the same dropout masks).
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from lightning_rec.errors import ConfigError, check_int

# ---------------------------------------------------------------------- selection
SECOND_MOMENTS = ("local", "global_batch")


def resolve_k(k: int | float, world: int, option: str = "trainer.strategy.k") -> int:
    """``k`` as a count of ranks: an int is a count, a float in (0, 1] a fraction of the ranks."""
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise ConfigError(f"{option}={k!r}: expected a number of ranks (int) or a fraction in (0, 1]")
    if isinstance(k, float):
        if not 0.0 < k <= 1.0:
            raise ConfigError(f"{option}={k}: a fraction must be in (0, 1] (write an integer, e.g. k=3, for a count)")
        return max(1, min(world, int(round(k * world))))
    if not 1 <= k:
        raise ConfigError(f"{option}={k}: expected at least 1")
    return min(k, world)


def select_topk(distances: torch.Tensor, k: int) -> list[int]:
    """The ``k`` ranks with the smallest distance, ascending; ties go to the lower rank."""
    d = distances.detach().double().cpu()
    order = sorted(range(d.numel()), key=lambda r: (float(d[r]) if torch.isfinite(d[r]) else float("inf"), r))
    return sorted(order[:k])


# ---------------------------------------------------------------------- metered DDP
class _CommMeter:
    """DDP communication hook state: counts all-reduced bytes, then all-reduces as DDP would."""

    def __init__(self) -> None:
        self.bytes = 0


def _counting_allreduce(state: _CommMeter, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    buf = bucket.buffer()
    state.bytes += buf.numel() * buf.element_size()
    return default_hooks.allreduce_hook(None, bucket)


class MeteredDDPStrategy(DDPStrategy):
    """Lightning's DDP, logging the gradient bytes each rank all-reduces (``comm/bytes``)."""

    strategy_name = "metered_ddp"

    def __init__(self, **kwargs: Any) -> None:
        if "ddp_comm_hook" in kwargs:
            raise ConfigError("trainer.strategy.ddp_comm_hook: MeteredDDPStrategy installs its own; use strategy=ddp")
        self.meter = _CommMeter()
        super().__init__(**kwargs)

    def _register_ddp_hooks(self) -> None:
        # Lightning registers hooks on CUDA only; gloo supports them too, and both need counting.
        self.model.register_comm_hook(self.meter, _counting_allreduce)

    @property
    def comm_bytes(self) -> int:
        return self.meter.bytes

    def optimizer_step(self, optimizer, closure, model=None, **kwargs):
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        trainer = self.lightning_module.trainer
        if trainer is not None and (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) == 0:
            _log_comm(self, self.meter.bytes, trainer.global_step + 1)
        return out

    def on_validation_start(self) -> None:
        super().on_validation_start()
        trainer = self.lightning_module.trainer
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            _log_comm(self, self.meter.bytes, trainer.global_step)


def _log_comm(strategy, nbytes: int, step: int) -> None:
    trainer = strategy.lightning_module.trainer
    if strategy.is_global_zero and trainer is not None:
        for lg in trainer.loggers:
            lg.log_metrics({"comm/bytes": float(nbytes)}, step=int(step))


# ---------------------------------------------------------------------- top-k averaging
class TopKAveragingStrategy(DDPStrategy):
    """Top-k model averaging over torch.distributed (topkSVRG); see the module docstring.

    Args:
        k: ranks averaged each round: an int is a count, a float in (0, 1] a fraction of the ranks
            (rounded, at least 1). ``k = ranks`` is plain model averaging (local SGD).
        h: local optimizer steps per round. ``h = 1`` with ``k = ranks`` and plain SGD equals DDP.
        distance_params: fnmatch patterns of parameter names the distance is measured on (all
            parameters when null); the chosen models are always averaged on every parameter.
        svrg: correct local steps with the snapshot gradient (see the module docstring).
        svrg_batches: batches per rank sampled to estimate the snapshot gradient ``mu``.
        log_every_rounds: print the chosen ranks and distances every this many rounds (rank 0;
            every round is logged to the loggers and to ``topk_rounds.jsonl`` in the run folder).
        outer_lr: step size of the outer update along ``w - mean`` (1 with no momentum: the mean).
        outer_momentum: momentum of the outer update in [0, 1) (0: none).
        outer_nesterov: Nesterov (True) or heavy-ball momentum.
        average_state: names of per-parameter optimizer state tensors (Adam: ``exp_avg``,
            ``exp_avg_sq``) averaged over the chosen ranks each round; empty: state stays local.
        warmup_steps: for this many optimizer steps from the start of the run, rounds come every
            ``warmup_h`` steps instead of every ``h`` (post-local SGD, Lin et al., ICLR 2020: frequent
            averaging early, local steps later). 0: no warm-up.
        warmup_h: local steps per round during the warm-up (1: average after every step).
        second_moment: ``local`` (the SPEC's method): each rank's Adam divides by the second moment of
            its own gradients; ``global_batch``: by an estimate of the all-rank batch's (module docstring).
        **kwargs: passed to Lightning's :class:`DDPStrategy` (``process_group_backend``, ``timeout``...).
    """

    strategy_name = "topk_averaging"

    def __init__(self, k: int | float = 0.8, h: int = 32, distance_params: list[str] | None = None,
                 svrg: bool = False, svrg_batches: int = 4, log_every_rounds: int = 10, outer_lr: float = 1.0,
                 outer_momentum: float = 0.0, outer_nesterov: bool = True, average_state: list[str] | None = None,
                 warmup_steps: int = 0, warmup_h: int = 1, second_moment: str = "local", **kwargs: Any) -> None:
        for option, value in (("h", h), ("warmup_h", warmup_h)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"trainer.strategy.{option}={value!r}: expected a positive number of local steps")
        check_int(warmup_steps, "trainer.strategy.warmup_steps", 0)
        if second_moment not in SECOND_MOMENTS:
            raise ConfigError(f"trainer.strategy.second_moment={second_moment!r}: expected one of "
                              f"{', '.join(SECOND_MOMENTS)}")
        if isinstance(outer_lr, bool) or not isinstance(outer_lr, (int, float)) or not outer_lr > 0:
            raise ConfigError(f"trainer.strategy.outer_lr={outer_lr!r}: expected a positive number (1: the plain mean)")
        if (isinstance(outer_momentum, bool) or not isinstance(outer_momentum, (int, float))
                or not 0 <= outer_momentum < 1):
            raise ConfigError(f"trainer.strategy.outer_momentum={outer_momentum!r}: expected a number in [0, 1)")
        if not isinstance(svrg_batches, int) or svrg_batches < 1:
            raise ConfigError(f"trainer.strategy.svrg_batches={svrg_batches!r}: expected a positive integer")
        resolve_k(k, 1)  # type and range check now; the count needs the world size
        if average_state is not None and (isinstance(average_state, str) or not all(
                isinstance(x, str) for x in average_state)):
            raise ConfigError(f"trainer.strategy.average_state={average_state!r}: expected a list of optimizer state "
                              "names, e.g. [exp_avg_sq] or [exp_avg,exp_avg_sq] for Adam")
        super().__init__(**kwargs)
        self.k, self.h = k, h
        self.warmup_steps, self.warmup_h = int(warmup_steps), warmup_h
        self.second_moment = second_moment
        self._adam_seen = False  # second_moment=global_batch found Adam state once
        self.distance_params = list(distance_params) if distance_params else None
        self.svrg, self.svrg_batches = bool(svrg), svrg_batches
        self.log_every_rounds = max(1, int(log_every_rounds))
        self.outer_lr, self.outer_momentum = float(outer_lr), float(outer_momentum)
        self.outer_nesterov = bool(outer_nesterov)
        self.average_state = list(average_state) if average_state else []
        self._outer_buf: list[torch.Tensor] | None = None   # outer momentum, same on every rank
        self.round = 0                # completed rounds
        self.steps_in_round = 0       # local optimizer steps since the last exchange
        self.comm_bytes = 0           # payload this rank handed to collectives
        self.history: list[dict[str, Any]] = []   # the last rounds (chosen ranks, distances)
        self._global: list[torch.Tensor] | None = None
        self._mu: list[torch.Tensor] | None = None
        self._snapshot_batch: Any = None
        self._restored: dict[str, Any] | None = None
        self._own: dict[str, Any] | None = None      # this rank's part of the checkpoint being written
        self._extra: dict[str, Any] | None = None
        self._restored_own: dict[str, Any] | None = None
        self._state_names_seen = False  # average_state names found in the optimizer once
        self._state_note_said = False

    # -- no DDP wrapper: no per-step gradient all-reduce
    def _setup_model(self, model):
        return model

    def _register_ddp_hooks(self) -> None:
        pass

    def configure_ddp(self) -> None:
        # Lightning restores checkpoint weights before this, so the global model is the resumed one.
        self._check_svrg()
        self._sync_from_rank0()
        self._sigterm_check_per_round()

    def _sigterm_check_per_round(self) -> None:
        """Lightning broadcasts rank 0's SIGTERM flag before every training batch when there are several ranks:
        a collective each step, which holds every rank to the slowest one's pace. Under top-k it runs only at the
        first batch of a round (all ranks count the same steps, so all of them call it together). A rank that
        receives SIGTERM itself still stops after its current batch (Lightning checks its own flag every batch);
        rank 0's flag reaches the ranks that did not receive it at the start of the next round."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        original = getattr(loop, "_broadcast_sigterm_tensor", None)
        if original is None or getattr(original, "_per_round", False):
            return

        def per_round() -> None:
            if self.steps_in_round == 0:
                original()

        per_round._per_round = True
        loop._broadcast_sigterm_tensor = per_round

    def _check_svrg(self) -> None:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if not self.svrg or trainer is None:
            return
        if int(getattr(trainer, "accumulate_grad_batches", 1)) > 1:
            raise ConfigError("trainer.strategy.svrg=true: does not work with trainer.accumulate_grad_batches>1 (its "
                              "correction is per optimizer step); use a larger data.batch_size instead")
        if getattr(self.precision_plugin, "scaler", None) is not None:
            raise ConfigError("trainer.strategy.svrg=true: does not work with trainer.precision=16-mixed (the loss "
                              "scale would shrink its correction); use bf16-mixed or 32-true")

    # -- parameters
    def _params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.lightning_module.parameters()]

    def _distance_mask(self) -> list[bool]:
        names = [n for n, _ in self.lightning_module.named_parameters()]
        if not self.distance_params:
            return [True] * len(names)
        mask = [any(fnmatch.fnmatch(n, pat) for pat in self.distance_params) for n in names]
        if not any(mask):
            raise ConfigError(f"trainer.strategy.distance_params={self.distance_params}: match no parameter; "
                              f"names look like {names[:3]}")
        return mask

    def _sync_from_rank0(self) -> None:
        """Make rank 0's weights everyone's local and global model (start, resume, after a stack)."""
        params = self._params()
        if self.world_size > 1:
            with torch.no_grad():
                for p in params:
                    dist.broadcast(p.data, src=0)
        self._global = [p.detach().clone() for p in params]
        self._outer_buf = None
        self._mu = None
        self.steps_in_round = 0

    def model_changed(self) -> None:
        """Called by the stacking callback after the module's parameters changed shape."""
        self._sync_from_rank0()

    @property
    def num_selected(self) -> int:
        return resolve_k(self.k, self.world_size)

    # -- the round
    def _exchange(self, reason: str = "round", step: int | None = None) -> None:
        params = self._params()
        if self._global is None or len(self._global) != len(params):
            self._sync_from_rank0()
            return
        world, k = self.world_size, self.num_selected
        with torch.no_grad():
            mask = self._distance_mask()
            sq = torch.zeros((), dtype=torch.float64, device=params[0].device)
            for p, g, m in zip(params, self._global, mask):
                if m:
                    sq += (p.detach().double() - g.double()).pow(2).sum()
            dists = torch.zeros(world, dtype=torch.float64, device=sq.device)
            if world > 1:
                gathered = [torch.zeros_like(sq) for _ in range(world)]
                dist.all_gather(gathered, sq)
                dists = torch.stack(gathered).sqrt()
                self.comm_bytes += sq.element_size()
            else:
                dists[0] = sq.sqrt()
            chosen = select_topk(dists, k)
            flat = self._chosen_mean(params, chosen)
            offset = 0
            for i, (p, g) in enumerate(zip(params, self._global)):
                n = p.numel()
                g.copy_(self._outer_step(i, g, flat[offset:offset + n].view_as(p)))
                p.data.copy_(g)
                offset += n
            if self.average_state:
                self._average_optimizer_state(chosen)
        self.round += 1
        self.steps_in_round = 0
        self._mu = None
        self._record(chosen, dists, reason, step)

    def _average_optimizer_state(self, chosen: list[int]) -> None:
        """Average the ``average_state`` tensors of every optimizer over the chosen ranks (in place)."""
        tensors: list[torch.Tensor] = []
        present: set[str] = set()
        for opt in self.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:  # the same order on every rank
                    state = opt.state.get(p) or {}
                    present.update(k for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == p.shape)
                    tensors += [state[k] for k in self.average_state
                                 if isinstance(state.get(k), torch.Tensor) and state[k].shape == p.shape]
        missing = sorted(set(self.average_state) - present)
        if present and missing:  # the optimizer has state, not by these names
            if not self._state_names_seen:
                raise ConfigError(f"trainer.strategy.average_state={self.average_state}: no optimizer state {missing}; "
                                  f"this optimizer keeps {sorted(present)}")
            if not self._state_note_said:  # the names were there before: the optimizer changed (a switch to SGD)
                rank_zero_info(f"top-k averaging: the optimizer now keeps {sorted(present)}, not {missing}; "
                               f"average_state averages only what is there")
                self._state_note_said = True
        elif present:
            self._state_names_seen = True
        if self.world_size == 1:
            return  # the mean of one rank is its own state
        # Every rank takes part, state or not, so a rank without any never leaves the others waiting.
        n = torch.tensor([sum(t.numel() for t in tensors)], dtype=torch.int64, device=self.root_device)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        dist.all_gather(sizes, n)  # a layout that differs between ranks would corrupt the all-reduce
        self.comm_bytes += n.element_size()
        if len({int(x) for x in sizes}) != 1:
            raise RuntimeError(f"top-k averaging: ranks hold different optimizer state sizes {[int(x) for x in sizes]}")
        if not tensors:
            return  # no step taken yet, on any rank
        _unflatten_into(self._chosen_mean(tensors, chosen), tensors)

    def _chosen_mean(self, tensors: list[torch.Tensor], chosen: list[int]) -> torch.Tensor:
        """Mean over the ``chosen`` ranks of each rank's ``tensors``, flattened: one all-reduce, bytes counted."""
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        if self.world_size > 1:
            if self.global_rank not in chosen:
                flat.zero_()
            dist.all_reduce(flat)
            self.comm_bytes += flat.numel() * flat.element_size()
        return flat.div_(len(chosen))

    def _outer_step(self, i: int, w: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """The new global value of parameter ``i`` from the old ``w`` and the chosen models' mean."""
        if self.outer_lr == 1.0 and self.outer_momentum == 0.0:
            return mean
        delta = w - mean  # pseudo-gradient
        if self.outer_momentum:
            if self._outer_buf is None:  # reset with the global model (start, resume, stack)
                self._outer_buf = [torch.zeros_like(x) for x in self._global]
            buf = self._outer_buf[i]
            buf.mul_(self.outer_momentum).add_(delta)
            delta = delta + self.outer_momentum * buf if self.outer_nesterov else buf.clone()
        return w - self.outer_lr * delta

    def _record(self, chosen: list[int], dists: torch.Tensor, reason: str, step: int | None) -> None:
        trainer = self.lightning_module.trainer
        if step is None:
            step = trainer.global_step if trainer is not None else 0
        entry = {"round": self.round, "step": int(step), "reason": reason, "chosen": chosen,
                 "distances": [round(float(d), 6) for d in dists], "comm_bytes": int(self.comm_bytes)}
        self.history = (self.history + [entry])[-100:]
        if not self.is_global_zero or trainer is None:
            return
        metrics = {"topk/round": float(self.round), "comm/bytes": float(self.comm_bytes)}
        for r, d in enumerate(entry["distances"]):
            metrics[f"topk/distance_r{r}"] = d
            metrics[f"topk/chosen_r{r}"] = float(r in chosen)
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=int(step))
        root = trainer.default_root_dir
        if root and os.path.isdir(root):
            with open(os.path.join(root, "topk_rounds.jsonl"), "a") as f:
                f.write(json.dumps(entry) + "\n")
        if self.round % self.log_every_rounds == 0 or reason != "round":
            dtxt = " ".join(f"{d:.4g}" for d in entry["distances"])
            rank_zero_info(f"top-k round {self.round} (step {step}, {reason}): averaged ranks {chosen} of "
                           f"{self.world_size}; L2 distance to the global model {dtxt}")

    # -- SVRG
    def _snapshot_gradient(self, batch) -> list[torch.Tensor | None]:
        """Gradient of the module's loss at the global (snapshot) weights, on ``batch``."""
        module = self.lightning_module
        params = self._params()
        saved = [p.data for p in params]
        try:
            for p, g in zip(params, self._global):
                p.data = g
            loss = module.train_loss(batch)
            trainable = [p for p in params if p.requires_grad]  # a frozen parameter has no gradient to correct
            grads = iter(torch.autograd.grad(loss, trainable, allow_unused=True))
        finally:
            for p, s in zip(params, saved):
                p.data = s
        out = [next(grads) if p.requires_grad else None for p in params]
        return [None if g is None else g.detach() for g in out]

    def _compute_mu(self) -> None:
        trainer = self.lightning_module.trainer
        loader = trainer.train_dataloader
        ds = getattr(loader, "dataset", None)
        bs = getattr(loader, "batch_size", None) or 1
        if ds is None or not hasattr(ds, "__getitems__"):
            raise ConfigError("trainer.strategy.svrg=true: needs this project's training set (a map-style dataset "
                              "with __getitems__)")
        g = torch.Generator().manual_seed(int(trainer.current_epoch) * 1_000_003 + self.round * 101 + self.global_rank)
        total: list[torch.Tensor | None] | None = None
        device = self.root_device
        for _ in range(self.svrg_batches):
            idx = torch.randint(0, len(ds), (bs,), generator=g).tolist()
            batch = {k: v.to(device) for k, v in ds.__getitems__(idx).items()}
            grads = self._snapshot_gradient(batch)
            total = grads if total is None else [a if b is None else (b if a is None else a + b)
                                                 for a, b in zip(total, grads)]
        mu = [torch.zeros_like(p) if t is None else t / self.svrg_batches for p, t in zip(self._params(), total)]
        if self.world_size > 1:
            _unflatten_into(self._chosen_mean(mu, list(range(self.world_size))), mu)
        self._mu = mu

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self._snapshot_batch = batch

    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs):
        if self.svrg:
            if self._mu is None:
                self._compute_mu()
            closure = self._svrg_closure(closure)
        saved = None
        if self.second_moment == "global_batch" and self.world_size > 1:
            saved = self._global_batch_v(optimizer)
        try:
            out = super().optimizer_step(optimizer, closure, model, **kwargs)
        finally:
            if saved:
                restore_second_moment(saved)
        self.steps_in_round += 1
        trainer = self.lightning_module.trainer
        step = trainer.global_step if trainer is not None else 0  # 0-based index of this step
        if self.steps_in_round >= (self.warmup_h if step < self.warmup_steps else self.h):
            self._exchange(step=step + 1 if trainer is not None else None)  # counts this step
        return out

    def _global_batch_v(self, optimizer) -> list | None:
        saved = global_batch_second_moment(getattr(optimizer, "_optimizer", optimizer), self.world_size)
        if saved is None:  # state, but not Adam's
            if not self._adam_seen:
                raise ConfigError("trainer.strategy.second_moment=global_batch: needs an Adam-type optimizer (state "
                                  "exp_avg and exp_avg_sq, no amsgrad); use optimizer=adam or adamw, or "
                                  "second_moment=local")
            return None  # a switch to SGD (callbacks=swats): nothing to correct from here on
        if saved:
            self._adam_seen = True
        return saved

    def _svrg_closure(self, closure):
        def wrapped():
            rng = torch.get_rng_state()
            cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
            snap = self._snapshot_gradient(self._snapshot_batch)
            torch.set_rng_state(rng)  # same dropout masks for both gradients
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            loss = closure()
            with torch.no_grad():
                for p, s, m in zip(self._params(), snap, self._mu):
                    if p.grad is None:
                        continue
                    if s is not None:
                        p.grad.sub_(s)
                    p.grad.add_(m)
            return loss

        return wrapped

    def on_train_end(self) -> None:
        super().on_train_end()
        self.finish_round()

    def finish_round(self, reason: str = "end of training") -> None:
        """End a round now if local steps were taken since the last one (a collective: every rank calls it).

        A run that ends mid-round (no validation at its end) tests and keeps the global model, not each rank's
        local one; the EMA callback calls this from its own ``on_train_end``, which runs before this strategy's.
        """
        if self.steps_in_round and self._global is not None:
            self._exchange(reason)

    @property
    def global_params(self) -> list[torch.Tensor] | None:
        """The global model's parameters (in ``module.parameters()`` order), the same on every rank."""
        return self._global

    # -- evaluation sees the global model
    def on_validation_start(self) -> None:
        super().on_validation_start()
        trainer = self.lightning_module.trainer
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING and self.steps_in_round:
            self._exchange("validation")

    # -- checkpoints: global model + round state in the file; each rank's own optimizer state (and mid-round
    # local model) beside it, written by that rank, so a save costs no communication and rank 0 never holds
    # every rank's Adam state at once: rank 0's goes in the file as usual, rank r's in <file>.rank<r>
    def lightning_module_state_dict(self) -> dict[str, Any]:
        module = self.lightning_module
        state = module.state_dict()
        trainer = module.trainer
        # the same on every rank without communicating: ties each rank's file to this save
        token = [int(trainer.global_step) if trainer is not None else 0, self.round, self.steps_in_round]
        extra: dict[str, Any] = {"round": self.round, "steps_in_round": self.steps_in_round,
                                 "world_size": self.world_size, "comm_bytes": self.comm_bytes,
                                 "history": self.history[-20:], "save_token": token}
        if self._outer_buf is not None:
            extra["outer_buffers"] = [b.detach().cpu().clone() for b in self._outer_buf]
        if self._mu is not None and self.steps_in_round:
            extra["svrg_mu"] = [m.detach().cpu().clone() for m in self._mu]  # the same on every rank
        own: dict[str, Any] = {"rank": self.global_rank, "world_size": self.world_size, "save_token": token,
                               "optimizer_states": []}
        if self._global is not None and self.steps_in_round:
            # mid-round: the file's weights are the global model; each rank's local model is kept too
            # a parameter shared by two submodules (e.g. a rocket's embedding table) is in the state dict under
            # every name it has; each of them must hold the global weights, or the alias loaded last wins
            named = list(module.named_parameters())
            own["local_state"] = _to_cpu({n: state[n].clone() for n, _ in named if n in state})
            global_of = {id(p): g.detach().clone() for (_, p), g in zip(named, self._global)}
            for n, p in module.named_parameters(remove_duplicate=False):
                if n in state and id(p) in global_of:
                    state[n] = global_of[id(p)]
        self._own = own
        self._extra = extra
        return state

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        state = super().optimizer_state(optimizer)
        if self._own is not None and self.global_rank > 0:  # rank 0's is the file's own optimizer state
            self._own["optimizer_states"].append(_to_cpu(state))
        return state

    @staticmethod
    def rank_file(filepath, rank: int) -> str:
        """Where rank ``rank`` (>= 1) keeps its own state for the checkpoint ``filepath``."""
        return f"{filepath}.rank{rank}"

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options=None) -> None:
        extra, own = self._extra or {}, self._own
        self._extra = self._own = None
        if own is not None and "local_state" in own and self.global_rank == 0:
            extra["local_state"] = own["local_state"]
        checkpoint["topk_averaging"] = extra
        if own is not None and self.global_rank > 0:
            from lightning_rec.runs.checkpoint_io import atomic_torch_save

            atomic_torch_save(own, self.rank_file(filepath, self.global_rank))
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def remove_checkpoint(self, filepath) -> None:
        super().remove_checkpoint(filepath)  # rank 0: the file
        if self.global_rank > 0 and os.path.exists(self.rank_file(filepath, self.global_rank)):
            os.remove(self.rank_file(filepath, self.global_rank))

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        ckpt = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        self._restored = extra = ckpt.get("topk_averaging") or {}
        self._restored_own = None  # this rank's optimizer state and mid-round local model, when it has them
        if not extra or extra.get("world_size") != self.world_size:
            return ckpt
        if "optimizer_states" in extra:  # written before per-rank files: every rank's state is in the file
            r = self.global_rank
            self._restored_own = {"optimizer_states": [states[r] for states in extra["optimizer_states"]]}
            if extra.get("local_states"):
                self._restored_own["local_state"] = extra["local_states"][r]
        elif self.global_rank == 0:  # its optimizer state is the file's own (Lightning loads it)
            self._restored_own = {"local_state": extra["local_state"]} if "local_state" in extra else {}
        else:
            path = self.rank_file(checkpoint_path, self.global_rank)
            own = torch.load(path, map_location="cpu", weights_only=True) if os.path.isfile(path) else None
            if own is not None and own.get("save_token") == extra.get("save_token"):
                self._restored_own = own
            else:
                why = "missing" if own is None else "from another save of that checkpoint"
                print(f"warning: top-k averaging: {path} is {why}", flush=True)
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
            from lightning_fabric.utilities.optimizer import _optimizers_to_device

            _optimizers_to_device(self.optimizers, self.root_device)
        else:
            if extra and not same_world:
                rank_zero_warn(f"top-k averaging: the checkpoint was written by {extra.get('world_size')} ranks, "
                               f"this run has {self.world_size}; every rank starts from rank 0's optimizer state")
            super().load_optimizer_state_dict(checkpoint)
        self._restore_round_state(extra, same_world, exact)

    def _restore_round_state(self, extra: dict[str, Any], same_world: bool, exact: bool) -> None:
        if not extra:
            return
        self.round = int(extra.get("round", 0))
        self.comm_bytes = int(extra.get("comm_bytes", 0)) if same_world else 0
        self.history = list(extra.get("history", []))
        self._global = [p.detach().clone() for p in self._params()]
        bufs = extra.get("outer_buffers")
        if bufs is not None and [tuple(b.shape) for b in bufs] == [tuple(g.shape) for g in self._global]:
            self._outer_buf = [b.to(g.device, g.dtype) for b, g in zip(bufs, self._global)]
        own_local = (self._restored_own or {}).get("local_state") if exact else None
        if own_local is not None and same_world:
            with torch.no_grad():
                for n, p in self.lightning_module.named_parameters():
                    if n in own_local:
                        p.data.copy_(own_local[n].to(p.device))
            self.steps_in_round = int(extra.get("steps_in_round", 0))
            mu = extra.get("svrg_mu")
            if self.svrg and self.steps_in_round and mu is not None and len(mu) == len(self._global):
                self._mu = [m.to(g.device, g.dtype) for m, g in zip(mu, self._global)]  # this round's snapshot gradient
        else:
            self.steps_in_round = 0
        self._restored = self._restored_own = None


def global_batch_second_moment(optimizer: torch.optim.Optimizer, world: int) -> list | None:
    """Before a local Adam step: replace each ``exp_avg_sq`` ``v`` by the estimate for a batch ``world``
    times larger, ``(v + (world - 1) * bc2 * (m / bc1)^2) / world`` (``bc`` the bias corrections).

    Returns what :func:`restore_second_moment` needs to put the optimizer's own running ``v`` back after
    the step (``[]`` before the first step; None when the optimizer has state but not Adam's).
    """
    todo = []  # (state, v, m, step, betas) of every parameter with state; checked before anything changes
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p) or {}
            if not state:
                continue
            m, v, t, betas = state.get("exp_avg"), state.get("exp_avg_sq"), state.get("step"), group.get("betas")
            if (betas is None or group.get("amsgrad") or not isinstance(m, torch.Tensor)
                    or not isinstance(v, torch.Tensor) or v.shape != p.shape or t is None):
                return None
            todo.append((state, v, m, float(t), betas))
    saved: list[tuple[dict, torch.Tensor, float, float]] = []
    with torch.no_grad():
        for state, v, m, t, (b1, b2) in todo:
            if t < 1:
                continue
            bc1, bc2 = 1.0 - float(b1) ** t, 1.0 - float(b2) ** t
            # v - corrected = (world - 1) / world * (v - bc2 * (m / bc1)^2): one new tensor per parameter
            diff = torch.addcmul(v, m, m, value=-bc2 / bc1 ** 2).mul_((world - 1) / world)
            v.sub_(diff)
            saved.append((state, diff, float(b2), t))
    return saved


def restore_second_moment(saved: list[tuple[dict, torch.Tensor, float, float]]) -> None:
    """After the step: Adam updated ``v' = b2 * corrected + (1 - b2) g^2``; its own would be ``v' + b2 * diff``.
    A parameter the step skipped (no gradient this step, or a skipped step: its ``step`` count did not
    move) gets its ``v`` back unchanged."""
    with torch.no_grad():
        for state, diff, b2, t in saved:  # Adam updates exp_avg_sq in place: the same tensor as before the step
            state["exp_avg_sq"].add_(diff, alpha=b2 if float(state["step"]) != t else 1.0)


def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy consecutive slices of ``flat`` into ``tensors`` (the inverse of concatenating them)."""
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
