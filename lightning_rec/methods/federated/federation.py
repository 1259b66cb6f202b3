"""One federation from one config: the device split, the run folder, and the ServerApp's work.

The same :class:`Plan` is computed from the same config by whoever needs it: the ``federate``
command (checks, run folder), the ServerApp (rounds, evaluation, checkpoints) and every ClientApp
(its own device's users). In simulation all three are this process (the ClientApps in Ray
workers); in deployment the ServerApp runs next to the SuperLink and each ClientApp next to its
SuperNode, and they get the config from the Flower App's run config
(:mod:`lightning_rec.methods.federated.deploy`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from lightning_rec.errors import ConfigError

ENGINES = ("simulation", "deployment")


@dataclass
class Plan:
    """Everything the server and the devices agree on: computed from the config alone (no side effects)."""

    cfg: DictConfig
    plain: dict[str, Any]
    data_conf: dict[str, Any]
    model_conf: dict[str, Any]
    num_users: int
    holdout: np.ndarray
    parts: list[np.ndarray]
    fail: dict[int, tuple[int, ...]] = field(default_factory=dict)
    crash: dict[int, tuple[int, ...]] = field(default_factory=dict)

    @property
    def fed(self) -> DictConfig:
        return self.cfg.federation

    def device(self, d: int, state_dir: str):
        """Device ``d`` (its users only), keeping its local training state in ``state_dir``."""
        from lightning_rec.config import to_plain
        from lightning_rec.methods.federated.device import Device

        if not 0 <= d < len(self.parts):
            raise ConfigError(f"partition-id={d}: expected 0..{len(self.parts) - 1} "
                              f"(federation.num_devices={len(self.parts)})")
        fed = self.fed
        return Device(d, self.parts[d], self.data_conf, self.model_conf, fed.local_epochs, state_dir,
                      to_plain(fed.callbacks) or {}, to_plain(fed.distill), str(self.cfg.trainer.accelerator),
                      self.cfg.seed, eval_users=self.holdout)


def check_options(cfg: DictConfig) -> None:
    """The federation.* options, one line per mistake; before any data is read."""
    from lightning_rec.config import to_plain
    from lightning_rec.errors import is_int
    from lightning_rec.methods.federated.device import check_local_callbacks
    from lightning_rec.methods.federated.flower import STRATEGIES

    fed = cfg.federation
    if fed.strategy not in STRATEGIES:
        raise ConfigError(f"federation.strategy={fed.strategy}: expected one of {', '.join(STRATEGIES)}")
    if fed.engine in ("server", "client"):
        raise ConfigError(f"federation.engine={fed.engine}: Flower's server/client processes were replaced by a "
                          f"SuperLink and SuperNodes; start those and use federation.engine=deployment "
                          f"federation.superlink=<host:port> (docs/methods/federated.md, 'Deployment')")
    if fed.engine not in ENGINES:
        raise ConfigError(f"federation.engine={fed.engine}: expected {' or '.join(ENGINES)}")
    for key in ("rounds", "local_epochs", "num_devices", "top_m"):
        if not is_int(fed[key], 1):
            raise ConfigError(f"federation.{key}={fed[key]}: expected a positive integer")
    if not 0.0 < float(fed.min_fit_fraction) <= 1.0:
        raise ConfigError(f"federation.min_fit_fraction={fed.min_fit_fraction}: expected a fraction in (0, 1]")
    for key in ("connect_timeout", "round_timeout"):
        value = fed.get(key)
        if value is None and key == "round_timeout":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"federation.{key}={value}: expected a positive number of seconds"
                              f"{' or null (wait for every reply)' if key == 'round_timeout' else ''}")
    if fed.engine == "deployment":
        from lightning_rec.methods.federated.superlink import parse_address

        parse_address(str(fed.superlink), "federation.superlink")
    check_local_callbacks(to_plain(fed.callbacks) or {})
    fault_injection(cfg)


def fault_injection(cfg: DictConfig) -> tuple[dict[int, tuple[int, ...]], dict[int, tuple[int, ...]]]:
    """``federation.fail``: ``{device: rounds whose training raises}``, ``{device: rounds its ClientApp exits}``."""
    fed = cfg.federation
    fail: dict[int, tuple[int, ...]] = {}
    crash: dict[int, tuple[int, ...]] = {}
    for spec in fed.fail or []:
        m = re.fullmatch(r"(\d+):(\d+)(:crash)?", str(spec))
        if not m:
            raise ConfigError(f"federation.fail: '{spec}' is not device:round or device:round:crash "
                              f"(e.g. \"1:2\")")
        if m[3] and fed.engine != "deployment":
            raise ConfigError(f"federation.fail: '{spec}': a crash (the ClientApp process exits) is for deployment "
                              f"(engine=deployment); use device:round to make local training fail")
        target = crash if m[3] else fail
        target[int(m[1])] = target.get(int(m[1]), ()) + (int(m[2]),)
    return fail, crash


def make_plan(cfg: DictConfig) -> Plan:
    """Check the options, read the data, split the users into devices (deterministic by ``seed``)."""
    from lightning_rec.build import build_datamodule, precision_for
    from lightning_rec.config import to_plain
    from lightning_rec.methods.federated import split_devices, split_holdout

    check_options(cfg)
    fed = cfg.federation
    fail, crash = fault_injection(cfg)
    plain = to_plain(cfg)
    data_conf, model_conf = plain["data"], dict(plain["model"])
    for key in ("new_head", "match_item_ids"):
        model_conf.pop(key, None)
    if model_conf.get("arch") == "rocket":
        raise ConfigError("federate: model=rocket is not supported; devices train model=sasrec or model=nextitnet")
    precision_for(cfg)  # no GPU: the CPU, as for fit
    enc = build_datamodule(data_conf).load()
    kept, holdout = split_holdout(enc.num_users, float(fed.holdout_users), cfg.seed)
    if fed.num_devices > len(kept):
        raise ConfigError(f"federation.num_devices={fed.num_devices}: expected at most {len(kept)}, the users left "
                          f"for devices after federation.holdout_users={fed.holdout_users}")
    parts = [kept[p] for p in split_devices(len(kept), fed.num_devices, cfg.seed, fed.skew, fed.alpha,
                                            np.asarray(enc.lengths)[kept])]
    return Plan(cfg, plain, data_conf, model_conf, int(enc.num_users), holdout, parts, fail, crash)


def open_run(plan: Plan) -> tuple[str, dict[str, Any] | None]:
    """The run folder (new, or ``federation.resume``'s) and the resume state; writes config and split of a new run."""
    from lightning_rec import runs
    from lightning_rec.config import set_value

    cfg, fed = plan.cfg, plan.fed
    resume_state = None
    if fed.resume:
        run_dir = os.path.abspath(str(fed.resume))
        resume_state = load_resume(run_dir, str(fed.strategy))
        set_value(cfg, "federation.resume", run_dir)
    else:
        run_dir = runs.claim_run_dir(cfg.run_dir) if cfg.run_dir else runs.new_run_dir(
            cfg.runs_dir, f"federate-{fed.strategy}-{cfg.data.name}")
        run_dir = os.path.abspath(run_dir)
    set_value(cfg, "run_dir", run_dir)
    plan.plain["run_dir"] = run_dir
    plan.plain["federation"]["resume"] = cfg.federation.resume
    if not fed.resume:
        OmegaConf.save(cfg, os.path.join(run_dir, "config.yaml"), resolve=True)
        with open(os.path.join(run_dir, "devices.json"), "w") as f:
            json.dump({"num_users": plan.num_users, "devices": [[int(u) for u in p] for p in plan.parts],
                       "holdout": [int(u) for u in plan.holdout]}, f)
    return run_dir, resume_state


def load_resume(run_dir: str, strategy: str) -> dict[str, Any]:
    import torch

    last = os.path.join(run_dir, "federation_last.pt")
    if not os.path.exists(last):
        raise ConfigError(f"federation.resume={run_dir}: no federation_last.pt there (not a federation run folder)")
    state = torch.load(last, map_location="cpu", weights_only=False)
    if state["kind"] != strategy:
        raise ConfigError(f"federation.resume: that run used strategy={state['kind']}, not {strategy}")
    return state


def serve(plan: Plan, grid, run_dir: str, resume_state: dict[str, Any] | None) -> dict[str, Any]:
    """The ServerApp's work: round 0, the rounds through ``grid``, the final line.

    Returns ``{"run_dir", "history": [per-round dicts], "final": last round's metrics}`` and writes
    it to ``<run_dir>/federation_result.json``.
    """
    import torch

    from lightning_rec import runs
    from lightning_rec.methods.federated.device import Device
    from lightning_rec.methods.federated.flower import build_strategy, run_rounds

    cfg, fed = plan.cfg, plan.fed
    start_round = int(resume_state["round"]) if resume_state else 0
    state_dir = os.path.join(run_dir, "devices")
    torch.manual_seed(cfg.seed)
    # the test population: held-out users (on no device) when federation.holdout_users > 0, else every user
    everyone = Device(-1, plan.holdout if len(plan.holdout) else np.arange(plan.num_users), plan.data_conf,
                      plan.model_conf, 1, state_dir, accelerator=str(cfg.trainer.accelerator))
    initial = {k: v.detach().clone() for k, v in everyone.build_model().state_dict().items()}
    loggers = runs.build_loggers(cfg.logger, run_dir, resume_state is not None)
    logger = loggers[0] if loggers else None
    if logger is not None and resume_state is None:
        logger.log_hyperparams(plan.plain)
    strategy = build_strategy(
        fed.strategy, num_devices=fed.num_devices, initial_state=initial,
        evaluate_global=lambda state: everyone.evaluate(state, "test"), run_dir=run_dir, k=fed.k, top_m=fed.top_m,
        min_fit_fraction=fed.min_fit_fraction, start_round=start_round, resume_state=resume_state, logger=logger)
    if start_round == 0:  # round 0: the initial model, the baseline to improve on
        m0 = {f"test_{k.replace('@', '_at_')}": v for k, v in everyone.evaluate(initial, "test").items()}
        strategy.history.append({"round": 0, "bytes_down": 0, "bytes_up": 0, "total_bytes": 0, **m0})
        print(f"round 0 (initial model): test NDCG@10 {m0.get('test_ndcg_at_10', float('nan')):.4f}", flush=True)
    holdout = plan.holdout
    print(f"federation {run_dir}: {fed.strategy}, {fed.num_devices} devices "
          f"({', '.join(str(len(p)) for p in plan.parts)} users), rounds {start_round + 1}..{fed.rounds}, "
          f"{fed.local_epochs} local epoch(s), engine {fed.engine}; test metrics on "
          f"{f'{len(holdout)} held-out users' if len(holdout) else 'every user'}", flush=True)
    status = "success"
    try:
        if fed.rounds > start_round:
            run_rounds(grid, strategy, start_round + 1, int(fed.rounds), connect_timeout=float(fed.connect_timeout),
                       round_timeout=None if fed.round_timeout is None else float(fed.round_timeout))
    except BaseException:
        status = "failed"
        raise
    finally:
        for lg in loggers:
            lg.finalize(status)
    final = strategy.history[-1] if strategy.history else {}
    print(f"federation finished: round {final.get('round', 0)} of {fed.rounds}; final test NDCG@10 "
          f"{final.get('test_ndcg_at_10', float('nan')):.4f}; {strategy.bytes_down / 1e6:.1f} MB down, "
          f"{strategy.bytes_up / 1e6:.1f} MB up; run folder: {run_dir}", flush=True)
    result = {"run_dir": run_dir, "history": strategy.history, "final": final}
    with open(os.path.join(run_dir, "federation_result.json"), "w") as f:
        json.dump(result, f)
    return result
