"""Top-k checkpoints: the global model and the round state in the file, each rank's own state beside it.

A save costs no communication and rank 0 never holds every rank's Adam state at once: the file holds the
global model (mid-round too) and the round state under ``topk_averaging``; rank 0's optimizer state is the
file's own, and rank ``r >= 1`` writes its optimizer state (and, mid-round, its local model) to
``<checkpoint>.rank<r>``. A save token (global step, round, steps in the round: the same on every rank without
communicating) ties each rank's file to the save it belongs to; a missing or stale one makes every rank start
a new round from rank 0's optimizer state, which is said.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def rank_file(filepath, rank: int) -> str:
    """Where rank ``rank`` (>= 1) keeps its own state for the checkpoint ``filepath``."""
    return f"{filepath}.rank{rank}"


def to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def state_for_save(s) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The module state the file gets (the global model), its ``topk_averaging`` entry and this rank's own part."""
    module = s.lightning_module
    state = module.state_dict()
    trainer = module.trainer
    token = [int(trainer.global_step) if trainer is not None else 0, s.round, s.steps_in_round]
    extra: dict[str, Any] = {"round": s.round, "steps_in_round": s.steps_in_round, "world_size": s.world_size,
                             "comm_bytes": s.comm_bytes, "history": s.history[-20:], "save_token": token}
    if s.outer.buffers is not None:
        extra["outer_buffers"] = s.outer.state()
    if s.snapshot.mu is not None and s.steps_in_round:
        extra["svrg_mu"] = s.snapshot.state()  # the same on every rank
    own: dict[str, Any] = {"rank": s.global_rank, "world_size": s.world_size, "save_token": token,
                           "optimizer_states": []}
    if s._global is not None and s.steps_in_round:
        # mid-round: the file's weights are the global model; each rank's local model is kept too
        # a parameter shared by two submodules (e.g. a rocket's embedding table) is in the state dict under
        # every name it has; each of them must hold the global weights, or the alias loaded last wins
        named = list(module.named_parameters())
        own["local_state"] = to_cpu({n: state[n].clone() for n, _ in named if n in state})
        global_of = {id(p): g.detach().clone() for (_, p), g in zip(named, s._global)}
        for n, p in module.named_parameters(remove_duplicate=False):
            if n in state and id(p) in global_of:
                state[n] = global_of[id(p)]
    return state, extra, own


def write(checkpoint: dict[str, Any], filepath, extra: dict[str, Any], own: dict[str, Any] | None, rank: int) -> None:
    """Put the round state in ``checkpoint``; rank >= 1 writes its own part beside ``filepath`` (atomically)."""
    if own is not None and "local_state" in own and rank == 0:
        extra["local_state"] = own["local_state"]
    checkpoint["topk_averaging"] = extra
    if own is not None and rank > 0:
        from lightning_rec.runs.checkpoint_io import atomic_torch_save

        atomic_torch_save(own, rank_file(filepath, rank))


def remove(filepath, rank: int) -> None:
    if rank > 0 and os.path.exists(rank_file(filepath, rank)):
        os.remove(rank_file(filepath, rank))


def read_own(ckpt: dict[str, Any], checkpoint_path, rank: int, world: int) -> dict[str, Any] | None:
    """This rank's optimizer state and mid-round local model for the checkpoint, when it has them."""
    extra = ckpt.get("topk_averaging") or {}
    if not extra or extra.get("world_size") != world:
        return None
    if "optimizer_states" in extra:  # written before per-rank files: every rank's state is in the file
        own = {"optimizer_states": [states[rank] for states in extra["optimizer_states"]]}
        if extra.get("local_states"):
            own["local_state"] = extra["local_states"][rank]
        return own
    if rank == 0:  # its optimizer state is the file's own (Lightning loads it)
        return {"local_state": extra["local_state"]} if "local_state" in extra else {}
    path = rank_file(checkpoint_path, rank)
    own = torch.load(path, map_location="cpu", weights_only=True) if os.path.isfile(path) else None
    if own is not None and own.get("save_token") == extra.get("save_token"):
        return own
    why = "missing" if own is None else "from another save of that checkpoint"
    print(f"warning: top-k averaging: {path} is {why}", flush=True)
    return None


def restore_round_state(s, extra: dict[str, Any], same_world: bool, own: dict[str, Any] | None) -> None:
    """After the optimizers loaded: the round counter, history, outer momentum and (an exact resume) this rank's
    mid-round local model and the round's SVRG snapshot gradient."""
    if not extra:
        return
    s.round = int(extra.get("round", 0))
    s.comm_bytes = int(extra.get("comm_bytes", 0)) if same_world else 0
    s.history = list(extra.get("history", []))
    s._global = [p.detach().clone() for p in s._params()]
    s.outer.load(extra.get("outer_buffers"), s._global)
    own_local = (own or {}).get("local_state")
    if own_local is not None and same_world:
        with torch.no_grad():
            for n, p in s.lightning_module.named_parameters():
                if n in own_local:
                    p.data.copy_(own_local[n].to(p.device))
        s.steps_in_round = int(extra.get("steps_in_round", 0))
        if s.steps_in_round:
            s.snapshot.load(extra.get("svrg_mu"), s._global)  # this round's snapshot gradient
    else:
        s.steps_in_round = 0
