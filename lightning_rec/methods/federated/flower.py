"""The Flower side: one client class for every device, one strategy class for the server.

The same :class:`DeviceClient` runs in Flower's simulation (``flwr.simulation.run_simulation``,
Ray backend) and in deployment (a server process and client processes talking gRPC). What crosses
the wire:

* ``fedavg`` / ``topk``: the global weights down, the device's weights up;
* ``distill``: down, the device's teacher (per-label logits of the other devices: labels, item ids,
  values, counts); up, the device's own per-label logits. Weights never leave a device.

Each round the strategy logs bytes down/up, wall time and the test metrics (the global model on
every user's test target for ``fedavg``/``topk``; for ``distill`` each device's own model on its
users, averaged by users), and writes an atomic round checkpoint from which a federation resumes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lightning_rec.errors import ConfigError
from lightning_rec.methods.federated.core import LabelLogits, teacher_from

log = logging.getLogger(__name__)

STRATEGIES = ("fedavg", "topk", "distill")


def _flwr():
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise ConfigError("federate: Flower is not installed; pip install 'lightning_rec[federated]'") from None
    import flwr

    return flwr


# ---------------------------------------------------------------------- (de)serialisation
def state_to_arrays(state: dict[str, torch.Tensor]) -> list[np.ndarray]:
    return [v.detach().cpu().numpy() for v in state.values()]


def arrays_to_state(arrays: list[np.ndarray], template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if len(arrays) != len(template):
        raise ConfigError(f"federate: got {len(arrays)} weight arrays, the model has {len(template)} tensors")
    return {k: torch.from_numpy(np.array(a)).to(v.dtype) for (k, v), a in zip(template.items(), arrays)}


def logits_to_arrays(t: LabelLogits | None) -> list[np.ndarray]:
    if t is None:
        return []
    # item ids and counts travel as int32, logits as float32: (labels seen) x top_m x 8 bytes, about
    return [t.labels.numpy().astype(np.int32), t.items.numpy().astype(np.int32), t.values.numpy().astype(np.float32),
            t.counts.numpy().astype(np.int32)]


def arrays_to_logits(arrays: list[np.ndarray]) -> LabelLogits | None:
    if not arrays:
        return None
    labels, items, values, counts = (torch.from_numpy(np.array(a)) for a in arrays)
    return LabelLogits(labels.long(), items.long(), values.float(), counts.long())


def nbytes(arrays: list[np.ndarray]) -> int:
    return int(sum(a.nbytes for a in arrays))


# ---------------------------------------------------------------------- client
def make_client(device_factory: Callable[[int], Any], device_id: int, fail_rounds: tuple[int, ...] = (),
                crash_rounds: tuple[int, ...] = ()):
    """A Flower ``NumPyClient`` for device ``device_id``.

    An exception in local training does not end the client: ``fit`` returns no weights and an
    ``error`` metric, the server counts the device as failed for that round, and the device is
    asked again the next round (continuing from its last completed round). Fault injection for
    tests: in ``fail_rounds`` training raises; in ``crash_rounds`` the process exits at once, as a
    device that loses power would (deployment only).
    """
    fl = _flwr()

    class DeviceClient(fl.client.NumPyClient):
        def __init__(self):
            self.device = device_factory(device_id)

        def get_parameters(self, config):
            return state_to_arrays(self.device.template())

        def fit(self, parameters, config):
            rnd = int(config.get("round", 0))
            if rnd in crash_rounds:
                log.error(f"device {device_id}: exiting in round {rnd} (fault injection: crash)")
                os._exit(3)
            try:
                return self._fit(parameters, config, rnd)
            except Exception as ex:  # noqa: BLE001 - reported to the server; the device stays in the federation
                reason = f"{type(ex).__name__}: {ex}"[:500]
                log.error(f"device {device_id}: local training failed in round {rnd}: {reason}", exc_info=ex)
                return [], 0, {"device": device_id, "error": reason}

        def _fit(self, parameters, config, rnd):
            if rnd in fail_rounds:
                raise RuntimeError(f"device {device_id} failed in round {rnd} (fault injection)")
            kind = config["strategy"]
            t0 = time.perf_counter()
            if kind == "distill":
                out = self.device.train(None, arrays_to_logits(parameters), upload_logits=True,
                                        top_m=int(config["top_m"]))
                arrays = logits_to_arrays(out["upload"])
                metrics = self.device.evaluate(out["state"], "test")
            else:
                out = self.device.train(arrays_to_state(parameters, self.device.template()), None, upload_logits=False)
                arrays = state_to_arrays(out["state"])
                metrics = {}
            report = {"device": device_id, "loss": out["loss"], "train_seconds": time.perf_counter() - t0,
                      "num_users": len(self.device.users)}
            report.update({f"test_{k.replace('@', '_at_')}": v for k, v in metrics.items()})
            return arrays, out["num_examples"], report

        def evaluate(self, parameters, config):
            return 0.0, 0, {}

    return DeviceClient()


# ---------------------------------------------------------------------- server strategy
def _strategy_base():
    return _flwr().server.strategy.Strategy


def build_strategy(kind: str, **kwargs):
    """The server strategy (``fedavg``, ``topk`` or ``distill``) as a Flower ``Strategy``."""
    if kind not in STRATEGIES:
        raise ConfigError(f"federation.strategy={kind}: expected one of {', '.join(STRATEGIES)}")
    base = _strategy_base()
    cls = type("RecStrategy", (_RecStrategyMixin, base), {})
    return cls(kind=kind, **kwargs)


class _RecStrategyMixin:
    """Shared by the three strategies; mixed with ``flwr.server.strategy.Strategy`` at run time."""

    def __init__(self, kind: str, num_devices: int, initial_state: dict[str, torch.Tensor], evaluate_global,
                 run_dir: str, k: int | float = 0.8, top_m: int = 100, min_fit_fraction: float = 0.5,
                 start_round: int = 0, resume_state: dict[str, Any] | None = None, logger=None,
                 connect_timeout: float = 60.0):
        self.kind, self.num_devices, self.k, self.top_m = kind, int(num_devices), k, int(top_m)
        self.template = initial_state
        self.global_state = {k_: v.clone() for k_, v in initial_state.items()}
        self.evaluate_global, self.run_dir, self.logger = evaluate_global, run_dir, logger
        self.min_fit = max(1, int(np.ceil(min_fit_fraction * num_devices)))
        self.connect_timeout = float(connect_timeout)
        self.uploads: dict[int, LabelLogits] = {}
        self.device_reports: dict[int, dict[str, Any]] = {}
        self.cid_device: dict[str, int] = {}
        self.start_round = int(start_round)
        self.bytes_down = self.bytes_up = 0
        self.history: list[dict[str, Any]] = []
        self._t_round = time.perf_counter()
        self._round_down = 0
        if resume_state:
            self.global_state = resume_state["global_state"]
            self.uploads = {int(d): LabelLogits(**u) for d, u in resume_state.get("uploads", {}).items()}
            self.cid_device = dict(resume_state.get("cid_device", {}))
            self.bytes_down, self.bytes_up = resume_state["bytes_down"], resume_state["bytes_up"]
            self.history = resume_state.get("history", [])
            self.device_reports = {int(d): r for d, r in resume_state.get("device_reports", {}).items()}

    def __repr__(self) -> str:
        return f"RecStrategy({self.kind})"

    # -- Flower interface
    def initialize_parameters(self, client_manager):
        fl = _flwr()
        return fl.common.ndarrays_to_parameters(state_to_arrays(self.global_state) if self.kind != "distill" else [])

    def configure_fit(self, server_round, parameters, client_manager):
        fl = _flwr()
        rnd = self.start_round + server_round
        # every device if it connects within connect_timeout; at least min_fit (failures are tolerated)
        if server_round > 1 or not client_manager.wait_for(self.num_devices, timeout=self.connect_timeout):
            client_manager.wait_for(self.min_fit, timeout=600)
        clients = client_manager.sample(num_clients=client_manager.num_available(), min_num_clients=self.min_fit)
        config = {"strategy": self.kind, "round": rnd, "top_m": self.top_m}
        self._t_round = time.perf_counter()
        self._round_down = 0
        out = []
        for c in clients:
            if self.kind == "distill":
                dev = self.cid_device.get(c.cid)
                others = [u for d, u in self.uploads.items() if d != dev] if dev is not None else []
                arrays = logits_to_arrays(teacher_from(others, self.top_m)) if others and dev is not None else []
            else:
                arrays = state_to_arrays(self.global_state)
            self._round_down += nbytes(arrays)
            out.append((c, fl.common.FitIns(fl.common.ndarrays_to_parameters(arrays), dict(config))))
        return out

    def aggregate_fit(self, server_round, results, failures):
        fl = _flwr()
        rnd = self.start_round + server_round
        if not results:
            log.warning(f"round {rnd}: no device returned a result ({len(failures)} failures)")
            return None, {}
        up = 0
        reports = []
        decoded, rejected, errors = [], [], {}
        for proxy, res in results:
            if "error" in res.metrics:  # local training raised; the client is still connected
                errors[int(res.metrics["device"])] = str(res.metrics["error"])
                continue
            arrays = fl.common.parameters_to_ndarrays(res.parameters)
            up += nbytes(arrays)
            if all(np.isfinite(a).all() for a in arrays if a.dtype.kind == "f"):
                decoded.append((proxy, res, arrays))
            else:  # a diverged device must not poison the global model or the other devices' teachers
                rejected.append(int(res.metrics["device"]))
        if errors:
            log.warning(f"round {rnd}: local training failed on device(s) {sorted(errors)} "
                        f"({'; '.join(f'{d}: {e}' for d, e in sorted(errors.items()))}); counted as failures, "
                        f"asked again next round")
            failures = [*failures, *sorted(errors)]
        if rejected:
            log.warning(f"round {rnd}: device(s) {rejected} sent non-finite values (diverged local training); "
                        f"their uploads are dropped and counted as failures")
            failures = [*failures, *rejected]
        if not decoded:
            log.warning(f"round {rnd}: no usable device result ({len(failures)} failures)")
            return None, {}
        if self.kind == "distill":
            for proxy, res, arrays in decoded:
                dev = int(res.metrics["device"])
                self.cid_device[proxy.cid] = dev
                self.uploads[dev] = arrays_to_logits(arrays)
                reports.append(res.metrics)
            for r in reports:  # a device that missed this round counts with its last report
                self.device_reports[int(r["device"])] = dict(r)
            known = list(self.device_reports.values())
            users = sum(r["num_users"] for r in known)
            metrics = {k: sum(r[k] * r["num_users"] for r in known) / users
                       for k in known[0] if k.startswith("test_")}
            chosen = sorted(int(r["device"]) for r in reports)
        else:
            states, weights, devices = [], [], []
            for proxy, res, arrays in decoded:
                states.append(arrays_to_state(arrays, self.template))
                weights.append(res.num_examples)
                devices.append(int(res.metrics["device"]))
                self.cid_device[proxy.cid] = int(res.metrics["device"])
                reports.append(res.metrics)
            self.global_state, chosen = self._aggregate(states, weights, devices)
            metrics = {f"test_{k.replace('@', '_at_')}": v for k, v in self.evaluate_global(self.global_state).items()}
        self.bytes_up += up
        self.bytes_down += self._round_down
        entry = {"round": rnd, "devices": sorted(int(r["device"]) for r in reports), "aggregated": chosen,
                 "failures": len(failures), "rejected": rejected, "errors": {str(d): e for d, e in errors.items()},
                 "bytes_down": self._round_down, "bytes_up": up,
                 "total_bytes": self.bytes_down + self.bytes_up, "seconds": time.perf_counter() - self._t_round,
                 "loss": float(np.mean([r["loss"] for r in reports])), **metrics}
        self.history.append(entry)
        self._save_round(rnd)
        ndcg = metrics.get("test_ndcg_at_10")
        print(f"round {rnd}: {len(decoded)} devices ({len(failures)} failed), aggregated {chosen}; "
              f"test NDCG@10 {ndcg if ndcg is None else round(ndcg, 4)}; down {self._round_down / 1e6:.2f} MB, "
              f"up {up / 1e6:.2f} MB; {entry['seconds']:.1f} s", flush=True)
        if self.logger is not None:
            self.logger.log_metrics({k: float(v) for k, v in entry.items() if isinstance(v, (int, float))}, step=rnd)
        params = fl.common.ndarrays_to_parameters(state_to_arrays(self.global_state) if self.kind != "distill" else [])
        return params, {}

    def _aggregate(self, states, weights, devices):
        from lightning_rec.methods.topk.strategy import resolve_k, select_topk

        if self.kind == "fedavg":
            w = torch.tensor(weights, dtype=torch.float64)
            w = w / w.sum()
            chosen = list(range(len(states)))
        else:
            dists = torch.stack([torch.sqrt(sum(((s[k_].double() - self.global_state[k_].double()) ** 2).sum()
                                                for k_ in s)) for s in states])
            k = resolve_k(self.k, len(states), "federation.k")
            chosen = select_topk(dists, k)
            w = torch.zeros(len(states), dtype=torch.float64)
            w[chosen] = 1.0 / len(chosen)
        new = {}
        for key, ref in self.global_state.items():
            if not torch.is_floating_point(ref):
                new[key] = states[0][key]
                continue
            acc = torch.zeros_like(ref, dtype=torch.float64)
            for wi, s in zip(w.tolist(), states):
                if wi:
                    acc += wi * s[key].double()
            new[key] = acc.to(ref.dtype)
        return new, sorted(devices[i] for i in chosen)

    def _save_round(self, rnd: int) -> None:
        from lightning_rec.runs.checkpoint_io import atomic_torch_save

        state = {"round": rnd, "kind": self.kind, "global_state": self.global_state,
                 "uploads": {d: vars(u) for d, u in self.uploads.items()}, "cid_device": self.cid_device,
                 "bytes_down": self.bytes_down, "bytes_up": self.bytes_up, "history": self.history,
                 "device_reports": self.device_reports}
        atomic_torch_save(state, os.path.join(self.run_dir, "federation_last.pt"))
        with open(os.path.join(self.run_dir, "rounds.jsonl"), "a") as f:
            f.write(json.dumps(self.history[-1]) + "\n")

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None
