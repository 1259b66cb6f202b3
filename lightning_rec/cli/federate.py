"""``federate``: federated training over simulated devices with Flower."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_rec import runs
from lightning_rec.build import build_datamodule, precision_for
from lightning_rec.config import to_plain
from lightning_rec.errors import ConfigError


def federate(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """Federated training over simulated devices with Flower (see :mod:`lightning_rec.methods.federated`).

    Returns ``{"run_dir", "history": [per-round dicts], "final": last round's metrics}``.
    """
    import numpy as np
    import torch

    from lightning_rec.methods.federated import split_devices, split_holdout
    from lightning_rec.methods.federated.device import Device, check_local_callbacks
    from lightning_rec.methods.federated.flower import STRATEGIES, _flwr, build_strategy, make_client

    fed = cfg.federation
    if fed.strategy not in STRATEGIES:
        raise ConfigError(f"federation.strategy={fed.strategy}: expected one of {', '.join(STRATEGIES)}")
    if fed.engine not in ("simulation", "server", "client"):
        raise ConfigError(f"federation.engine={fed.engine}: expected simulation, server or client")
    for key in ("rounds", "local_epochs", "num_devices", "top_m"):
        if not isinstance(fed[key], int) or fed[key] < 1:
            raise ConfigError(f"federation.{key}={fed[key]}: expected a positive integer")
    check_local_callbacks(to_plain(fed.callbacks) or {})
    fl = _flwr()
    plain = to_plain(cfg)
    data_conf, model_conf = plain["data"], dict(plain["model"])
    for key in ("new_head", "match_item_ids"):
        model_conf.pop(key, None)
    if model_conf.get("arch") == "rocket":
        raise ConfigError("federate: model=rocket is not supported; devices train model=sasrec or model=nextitnet")
    full = build_datamodule(data_conf)
    enc = full.load()
    kept, holdout = split_holdout(enc.num_users, float(fed.holdout_users), cfg.seed)
    if fed.num_devices > len(kept):
        raise ConfigError(f"federation.num_devices={fed.num_devices}: expected at most {len(kept)}, the users left "
                          f"for devices after federation.holdout_users={fed.holdout_users}")
    parts = [kept[p] for p in split_devices(len(kept), fed.num_devices, cfg.seed, fed.skew, fed.alpha,
                                            np.asarray(enc.lengths)[kept])]

    resume_state, start_round = None, 0
    if fed.engine == "client":  # a device keeps its state in its own folder; resume is the server's business
        run_dir = cfg.run_dir or os.path.join(cfg.runs_dir, f"federate-device{fed.device}")
        os.makedirs(run_dir, exist_ok=True)
    elif fed.resume:
        run_dir = str(fed.resume)
        last = os.path.join(run_dir, "federation_last.pt")
        if not os.path.exists(last):
            raise ConfigError(f"federation.resume={run_dir}: no federation_last.pt there (not a federation run folder)")
        resume_state = torch.load(last, map_location="cpu", weights_only=False)
        if resume_state["kind"] != fed.strategy:
            raise ConfigError(f"federation.resume: that run used strategy={resume_state['kind']}, not {fed.strategy}")
        start_round = int(resume_state["round"])
    else:
        run_dir = runs.claim_run_dir(cfg.run_dir) if cfg.run_dir else runs.new_run_dir(
            cfg.runs_dir, f"federate-{fed.strategy}-{cfg.data.name}")
    from lightning_rec.config import set_value

    set_value(cfg, "run_dir", run_dir)
    if fed.engine != "client" and not fed.resume:
        OmegaConf.save(cfg, os.path.join(run_dir, "config.yaml"), resolve=True)
        with open(os.path.join(run_dir, "devices.json"), "w") as f:
            json.dump({"num_users": int(enc.num_users), "devices": [[int(u) for u in p] for p in parts],
                       "holdout": [int(u) for u in holdout]}, f)
    state_dir = os.path.join(run_dir, "devices")
    precision_for(cfg)  # no GPU: the CPU, as for fit
    accelerator = str(cfg.trainer.accelerator)
    fail: dict[int, tuple[int, ...]] = {}
    crash: dict[int, tuple[int, ...]] = {}
    for spec in fed.fail or []:
        m = re.fullmatch(r"(\d+):(\d+)(:crash)?", str(spec))
        if not m:
            raise ConfigError(f"federation.fail: '{spec}' is not device:round or device:round:crash "
                              f"(e.g. \"1:2\")")
        if m[3] and fed.engine not in ("client", "server"):
            raise ConfigError(f"federation.fail: '{spec}': a crash (process exit) is for deployment "
                              f"(engine=client); use device:round to make local training fail")
        target = crash if m[3] else fail
        target[int(m[1])] = target.get(int(m[1]), ()) + (int(m[2]),)
    callbacks_conf = to_plain(fed.callbacks) or {}

    def device(d: int) -> Device:
        if not 0 <= d < len(parts):
            raise ConfigError(f"federation.device={d}: expected 0..{len(parts) - 1}")
        return Device(d, parts[d], data_conf, model_conf, fed.local_epochs, state_dir, callbacks_conf,
                      to_plain(fed.distill), accelerator, cfg.seed, eval_users=holdout)

    if fed.engine == "client":
        if fed.device is None:
            raise ConfigError("federation.device: engine=client needs the device this process is (0..N-1)")
        client = make_client(device, int(fed.device), fail.get(int(fed.device), ()), crash.get(int(fed.device), ()))
        _wait_for_server(str(fed.server_address), float(fed.get("wait_for_server", 120)))
        fl.client.start_client(server_address=fed.server_address, client=client.to_client(), insecure=True)
        return {"run_dir": run_dir, "history": [], "final": {}}

    torch.manual_seed(cfg.seed)
    # the test population: held-out users (on no device) when federation.holdout_users > 0, else every user
    everyone = Device(-1, holdout if len(holdout) else np.arange(enc.num_users), data_conf, model_conf, 1, state_dir,
                      accelerator=accelerator)
    initial = {k: v.detach().clone() for k, v in everyone.build_model().state_dict().items()}
    loggers = runs.build_loggers(cfg.logger, run_dir, bool(fed.resume))
    logger = loggers[0] if loggers else None
    if logger is not None and not fed.resume:
        logger.log_hyperparams(plain)
    strategy = build_strategy(
        fed.strategy, num_devices=fed.num_devices, initial_state=initial,
        evaluate_global=lambda state: everyone.evaluate(state, "test"), run_dir=run_dir, k=fed.k, top_m=fed.top_m,
        min_fit_fraction=fed.min_fit_fraction, start_round=start_round, resume_state=resume_state, logger=logger)
    if start_round == 0 and fed.engine != "client":  # round 0: the initial model, the baseline to improve on
        m0 = {f"test_{k.replace('@', '_at_')}": v for k, v in everyone.evaluate(initial, "test").items()}
        strategy.history.append({"round": 0, "bytes_down": 0, "bytes_up": 0, "total_bytes": 0, **m0})
        print(f"round 0 (initial model): test NDCG@10 {m0.get('test_ndcg_at_10', float('nan')):.4f}", flush=True)
    rounds = fed.rounds - start_round
    print(f"federation {run_dir}: {fed.strategy}, {fed.num_devices} devices "
          f"({', '.join(str(len(p)) for p in parts)} users), rounds {start_round + 1}..{fed.rounds}, "
          f"{fed.local_epochs} local epoch(s), engine {fed.engine}; test metrics on "
          f"{f'{len(holdout)} held-out users' if len(holdout) else 'every user'}", flush=True)
    if rounds > 0:
        config = fl.server.ServerConfig(num_rounds=rounds)
        if fed.engine == "server":
            fl.server.start_server(server_address=fed.server_address, config=config, strategy=strategy)
        else:
            _simulate(fl, device, strategy, config, fed.num_devices, fail)
    for lg in loggers:
        lg.finalize("success")
    final = strategy.history[-1] if strategy.history else {}
    print(f"federation finished: round {final.get('round', 0)} of {fed.rounds}; final test NDCG@10 "
          f"{final.get('test_ndcg_at_10', float('nan')):.4f}; {strategy.bytes_down / 1e6:.1f} MB down, "
          f"{strategy.bytes_up / 1e6:.1f} MB up; run folder: {run_dir}", flush=True)
    return {"run_dir": run_dir, "history": strategy.history, "final": final}


def _simulate(fl, device, strategy, config, num_devices: int, fail: dict[int, tuple[int, ...]]) -> None:
    """Flower's simulation engine (Ray backend), one ClientApp for every device."""
    from flwr.client import ClientApp
    from flwr.server import ServerApp, ServerAppComponents
    from flwr.simulation import run_simulation

    from lightning_rec.methods.federated.flower import make_client

    def client_fn(context):
        d = int(context.node_config["partition-id"])
        return make_client(device, d, fail.get(d, ())).to_client()

    def server_fn(context):
        return ServerAppComponents(strategy=strategy, config=config)

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=num_devices,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": max(1, min(num_devices, os.cpu_count() or 1)),
                                                 "include_dashboard": False, "log_to_driver": True}})


def _wait_for_server(address: str, seconds: float) -> None:
    """Block until something listens at ``host:port`` (a server started just before its clients takes a while)."""
    import socket
    import time

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"federation.server_address={address}: expected host:port")
    deadline, said = time.monotonic() + seconds, False
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise ConfigError(f"federation.server_address={address}: no server answered within {seconds:g} s; start "
                                  f"`federate federation.engine=server` first (or raise federation.wait_for_server)") from None
            if not said:
                print(f"waiting for the federation server at {address} (up to {seconds:g} s)", flush=True)
                said = True
            time.sleep(1)
