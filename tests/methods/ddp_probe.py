"""A callback used by DDP tests: each rank writes a fingerprint of its weights at the end of fit."""

import contextlib
import json
import os

import pytorch_lightning as pl
import torch


class WeightProbe(pl.Callback):
    def on_train_end(self, trainer, pl_module):
        out = os.environ["PROBE_DIR"]
        state = {n: float(p.detach().double().sum()) for n, p in pl_module.named_parameters()}
        grads = {n: p.grad is not None for n, p in pl_module.named_parameters()}
        with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"state": state, "num_blocks": len(pl_module.encoder.blocks), "grads": grads,
                       "ddp": isinstance(trainer.strategy.model, torch.nn.parallel.DistributedDataParallel)}, f)


class SwitchProbe(pl.Callback):
    """Each rank writes what its optimizer-switch callback decided, and its optimizer, at the end of fit."""

    def on_train_end(self, trainer, pl_module):
        sw = next(c for c in trainer.callbacks if type(c).__name__ == "OptimizerSwitchCallback")
        opt = trainer.optimizers[0]
        state = {n: float(p.detach().double().sum()) for n, p in pl_module.named_parameters()}
        with open(os.path.join(os.environ["PROBE_DIR"], f"switch{trainer.global_rank}.json"), "w") as f:
            json.dump({"phase": sw.phase, "switch_step": sw.switch_step, "switches": sw.switches, "lrs": sw.lrs,
                       "optimizer": type(opt).__name__, "lr": opt.param_groups[0]["lr"], "state": state,
                       "group_phases": [g.get("swats_phase") for g in opt.param_groups]}, f)


class FinalWeights(pl.Callback):
    """Each rank saves its parameters (and, under top-k averaging, the strategy's round state)."""

    def on_train_end(self, trainer, pl_module):
        s = trainer.strategy
        extra = {"round": getattr(s, "round", None), "history": getattr(s, "history", None),
                 "comm_bytes": getattr(s, "comm_bytes", None)}
        torch.save({"params": {n: p.detach().clone() for n, p in pl_module.named_parameters()}, **extra},
                   os.path.join(os.environ["PROBE_DIR"], f"weights{trainer.global_rank}.pt"))


class TeacherProbe(pl.Callback):
    """Checks the KD callback's in-memory teacher: frozen, in eval mode, and unchanged by the student's fit."""

    def on_train_start(self, trainer, pl_module):
        hint = next(c for c in trainer.callbacks if type(c).__name__ == "HintLossCallback")
        self.before = {n: p.detach().clone() for n, p in hint.teacher.named_parameters()}

    def on_train_end(self, trainer, pl_module):
        hint = next(c for c in trainer.callbacks if type(c).__name__ == "HintLossCallback")
        teacher = hint.teacher
        with open(os.path.join(os.environ["PROBE_DIR"], "teacher.json"), "w") as f:
            json.dump({"frozen": not any(p.requires_grad for p in teacher.parameters()),
                       "eval": not teacher.training,
                       "unchanged": all(torch.equal(self.before[n], p) for n, p in teacher.named_parameters())}, f)


class SvrgProbe(pl.Callback):
    """At the first optimizer step of a top-k SVRG run (w == w~) the corrected gradient must be mu exactly."""

    def setup(self, trainer, pl_module, stage):
        if os.environ.get("PROBE_FREEZE"):  # a frozen parameter: SVRG must leave it alone, not crash
            pl_module.encoder.item_embedding.weight.requires_grad_(False)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if getattr(self, "done", False):
            return
        self.done = True
        mu = trainer.strategy.snapshot.mu
        pairs = [(p.grad, m) for p, m in zip(pl_module.parameters(), mu) if p.grad is not None]
        with open(os.path.join(os.environ["PROBE_DIR"], "svrg.json"), "w") as f:
            json.dump({"max_diff": max(float((g - m).abs().max()) for g, m in pairs),
                       "max_mu": max(float(m.abs().max()) for _, m in pairs), "n": len(pairs),
                       "n_params": len(list(pl_module.parameters()))}, f)


class StepWeights(pl.Callback):
    """Records the raw weights after every optimizer step (class attribute, for in-process tests)."""

    steps: list = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        StepWeights.steps.append({n: t.detach().clone() for n, t in pl_module.state_dict().items()})


class TeardownWeights(pl.Callback):
    """Each rank saves its parameters at teardown, after every ``on_train_end`` (the strategy's included)."""

    def teardown(self, trainer, pl_module, stage):
        if stage == "fit":
            torch.save({"params": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
                        "round": getattr(trainer.strategy, "round", None)},
                       os.path.join(os.environ["PROBE_DIR"], f"end{trainer.global_rank}.pt"))


class StackRoundProbe(pl.Callback):
    """Around a stack before step ``PROBE_STEP``: each rank saves its local weights after the step before it
    (``before<r>.pt``) and its weights and the top-k round history at the first step after it (``after<r>.pt``)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == int(os.environ["PROBE_STEP"]):
            self._save(trainer, pl_module, "before")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == int(os.environ["PROBE_STEP"]):
            self._save(trainer, pl_module, "after")

    @staticmethod
    def _save(trainer, pl_module, tag):
        torch.save({"params": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
                    "history": list(getattr(trainer.strategy, "history", []))},
                   os.path.join(os.environ["PROBE_DIR"], f"{tag}{trainer.global_rank}.pt"))


class Boom(pl.Callback):
    """Fails the fit at the end of the first training epoch."""

    def on_train_epoch_end(self, trainer, pl_module):
        raise RuntimeError("boom")


@contextlib.contextmanager
def counting(names, counter: dict[str, int]):
    """Count calls of the named torch.distributed functions into ``counter["calls"]`` while inside."""
    dist, originals = torch.distributed, {n: getattr(torch.distributed, n) for n in names}

    def wrap(f):
        def counted(*a, **k):
            counter["calls"] += 1
            return f(*a, **k)
        return counted

    for n, f in originals.items():
        setattr(dist, n, wrap(f))
    try:
        yield
    finally:
        for n, f in originals.items():
            setattr(dist, n, f)


class BroadcastCount(pl.Callback):
    """Each rank counts torch.distributed.broadcast calls made during training (Lightning's SIGTERM check is
    the only broadcast there; top-k's exchange all-gathers and all-reduces)."""

    def on_train_start(self, trainer, pl_module):
        self.counter = {"calls": 0}
        self._inside = counting(["broadcast"], self.counter)
        self._inside.__enter__()

    def on_train_end(self, trainer, pl_module):
        self._inside.__exit__(None, None, None)
        with open(os.path.join(os.environ["PROBE_DIR"], f"broadcasts{trainer.global_rank}.json"), "w") as f:
            json.dump({"calls": self.counter["calls"], "steps": trainer.global_step}, f)


class SaveCollectives(pl.Callback):
    """Each rank counts the gather/reduce collectives run inside trainer.save_checkpoint (its barrier aside)."""

    NAMES = ("all_gather_object", "all_gather", "all_reduce", "gather_object", "broadcast_object_list")

    def on_train_start(self, trainer, pl_module):
        self.counter, self.saves, save = {"calls": 0}, 0, trainer.save_checkpoint

        def counted_save(*a, **k):
            self.saves += 1
            with counting(self.NAMES, self.counter):
                return save(*a, **k)

        trainer.save_checkpoint = counted_save

    def on_train_end(self, trainer, pl_module):
        with open(os.path.join(os.environ["PROBE_DIR"], f"save{trainer.global_rank}.json"), "w") as f:
            json.dump({"calls": self.counter["calls"], "saves": self.saves}, f)
