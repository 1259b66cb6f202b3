"""The Flower side (Message API): one ClientApp for every device, a ServerApp that drives the rounds.

The same apps run in Flower's simulation (``flwr.simulation.run_simulation``, Ray backend) and in
deployment (a SuperLink, one SuperNode per device, the app submitted with ``flwr run``; see
:mod:`lightning_rec.methods.federated.deploy`). The ServerApp's ``main`` drives the rounds itself
through the :class:`~flwr.serverapp.Grid` (:func:`run_rounds`): Flower's strategies average
weights, and two of ours do not (top-k keeps the closest device models, distillation sends each
device a teacher built from the other devices and never sees weights). What crosses the wire, in
``RecordDict`` s:

* ``fedavg`` / ``topk``: the global weights down, the device's weights up (``ArrayRecord`` keyed by
  the model's state names);
* ``distill``: down, the device's teacher (per-label logits of the other devices: labels, item ids,
  values, counts); up, the device's own per-label logits. Weights never leave a device;
* a ``ConfigRecord`` down (strategy, round, top_m), a ``MetricRecord`` up (device, loss, seconds,
  users, examples; for ``distill`` the device's own test metrics) and, when local training raised,
  a ``ConfigRecord`` with the error.

Before the first round (and for a SuperNode that joins later) the server asks every node which
device it is (a ``query`` message answered from the node's ``partition-id``), so a device's
teacher never contains its own logits, also after a restart that gave the nodes new ids.

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

from lightning_rec.errors import ConfigError, LightningRecError
from lightning_rec.methods.federated.core import LabelLogits, teacher_for

log = logging.getLogger(__name__)

STRATEGIES = ("fedavg", "topk", "distill")
LOGIT_FIELDS = ("labels", "items", "values", "counts")


class FederationError(LightningRecError):
    """The federation cannot go on (too few devices connected, no device identified)."""


def _flwr():
    try:
        import flwr  # noqa: F401
        from flwr.app import ArrayRecord  # noqa: F401  (the Message API: Flower >= 1.21)
    except ImportError:
        raise ConfigError("federate: Flower (with the Message API) is not installed; "
                          "pip install 'lightning_rec[federated]'") from None
    import flwr

    return flwr


# ---------------------------------------------------------------------- (de)serialisation
def state_to_arrays(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def arrays_to_state(arrays: dict[str, np.ndarray], template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if set(arrays) != set(template):
        missing, extra = sorted(set(template) - set(arrays)), sorted(set(arrays) - set(template))
        raise ConfigError(f"federate: got {len(arrays)} weight arrays, the model has {len(template)} tensors "
                          f"(missing {missing[:3]}, unexpected {extra[:3]})")
    return {k: torch.from_numpy(np.array(arrays[k])).to(v.dtype) for k, v in template.items()}


def logits_to_arrays(t: LabelLogits | None) -> dict[str, np.ndarray]:
    if t is None:
        return {}
    # item ids and counts travel as int32, logits as float32: (labels seen) x top_m x 8 bytes, about
    return {"labels": t.labels.numpy().astype(np.int32), "items": t.items.numpy().astype(np.int32),
            "values": t.values.numpy().astype(np.float32), "counts": t.counts.numpy().astype(np.int32)}


def arrays_to_logits(arrays: dict[str, np.ndarray]) -> LabelLogits | None:
    if not arrays:
        return None
    labels, items, values, counts = (torch.from_numpy(np.array(arrays[k])) for k in LOGIT_FIELDS)
    return LabelLogits(labels.long(), items.long(), values.float(), counts.long())


def nbytes(arrays: dict[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in arrays.values()))


def to_record(arrays: dict[str, np.ndarray]):
    from flwr.app import Array, ArrayRecord

    rec = ArrayRecord()
    for k, a in arrays.items():
        rec[k] = Array.from_numpy_ndarray(np.ascontiguousarray(a))
    return rec


def from_record(rec) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in rec.items()}


def train_ins(arrays: dict[str, np.ndarray], config: dict[str, Any]):
    """The content of a ``train`` message: what goes down to one device."""
    from flwr.app import ConfigRecord, RecordDict

    return RecordDict({"arrays": to_record(arrays), "config": ConfigRecord(dict(config))})


def train_res(arrays: dict[str, np.ndarray], metrics: dict[str, int | float], error: str | None = None):
    """The content of a device's reply: its upload, its report and, if local training raised, why."""
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    content = RecordDict({"arrays": to_record(arrays), "metrics": MetricRecord(dict(metrics))})
    if error is not None:
        content["status"] = ConfigRecord({"error": error})
    return content


# ---------------------------------------------------------------------- client
def make_client_app(resolve: Callable[[Any], tuple[Any, tuple[int, ...], tuple[int, ...]]]):
    """The ClientApp every device runs; ``resolve(context)`` gives ``(device, fail_rounds, crash_rounds)``
    for the node's ``partition-id``.

    An exception in local training does not end the device: the reply carries no upload and the
    error, the server counts the device as failed for that round, and asks it again the next round
    (continuing from its last completed round). Fault injection for tests: in ``fail_rounds``
    training raises; in ``crash_rounds`` the ClientApp process exits at once, as a device that loses
    power would (deployment only).
    """
    _flwr()
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.query()
    def identify(msg, context):
        """Which device this node is: its ``partition-id`` (``num-partitions`` when set)."""
        cfg = context.node_config
        if "partition-id" not in cfg:
            raise ConfigError("this SuperNode has no partition-id; start it with "
                              "--node-config \"partition-id=N num-partitions=M\"")
        report = {"device": int(cfg["partition-id"]), "num_partitions": int(cfg.get("num-partitions", -1))}
        return Message(RecordDict({"metrics": MetricRecord(report)}), reply_to=msg)

    @app.train()
    def train(msg, context):
        device, fail_rounds, crash_rounds = resolve(context)
        config = msg.content["config"]
        rnd = int(config.get("round", 0))
        if rnd in crash_rounds:
            log.error(f"device {device.id}: exiting in round {rnd} (fault injection: crash)")
            os._exit(3)
        try:
            content = _train(device, msg.content, rnd, fail_rounds)
        except Exception as ex:  # noqa: BLE001 - reported to the server; the device stays in the federation
            reason = f"{type(ex).__name__}: {ex}"[:500]
            log.error(f"device {device.id}: local training failed in round {rnd}: {reason}", exc_info=ex)
            content = train_res({}, {"device": device.id}, error=reason)
        return Message(content, reply_to=msg)

    return app


def _train(device, content, rnd: int, fail_rounds: tuple[int, ...]):
    if rnd in fail_rounds:
        raise RuntimeError(f"device {device.id} failed in round {rnd} (fault injection)")
    config = content["config"]
    received = from_record(content["arrays"])
    t0 = time.perf_counter()
    if config["strategy"] == "distill":
        out = device.train(None, arrays_to_logits(received), upload_logits=True, top_m=int(config["top_m"]))
        arrays = logits_to_arrays(out["upload"])
        metrics = device.evaluate(out["state"], "test")
    else:
        out = device.train(arrays_to_state(received, device.template()), None, upload_logits=False)
        arrays = state_to_arrays(out["state"])
        metrics = {}
    report = {"device": device.id, "loss": out["loss"], "train_seconds": time.perf_counter() - t0,
              "num_users": len(device.users), "num_examples": int(out["num_examples"])}
    report.update({f"test_{k.replace('@', '_at_')}": v for k, v in metrics.items()})
    return train_res(arrays, report)


# ---------------------------------------------------------------------- server strategy
def build_strategy(kind: str, **kwargs) -> RecStrategy:
    """The server strategy (``fedavg``, ``topk`` or ``distill``)."""
    if kind not in STRATEGIES:
        raise ConfigError(f"federation.strategy={kind}: expected one of {', '.join(STRATEGIES)}")
    return RecStrategy(kind=kind, **kwargs)


class RecStrategy:
    """What goes down to each device in a round and how the replies are combined, for the three strategies.

    Engine-free: :func:`run_rounds` moves the ``RecordDict`` s through Flower's Grid.
    """

    def __init__(self, kind: str, num_devices: int, initial_state: dict[str, torch.Tensor], evaluate_global,
                 run_dir: str, k: int | float = 0.8, top_m: int = 100, min_fit_fraction: float = 0.5,
                 start_round: int = 0, resume_state: dict[str, Any] | None = None, logger=None):
        self.kind, self.num_devices, self.k, self.top_m = kind, int(num_devices), k, int(top_m)
        self.template = initial_state
        self.global_state = {k_: v.clone() for k_, v in initial_state.items()}
        self.evaluate_global, self.run_dir, self.logger = evaluate_global, run_dir, logger
        self.min_fit = max(1, int(np.ceil(min_fit_fraction * num_devices)))
        self.uploads: dict[int, LabelLogits] = {}
        self.device_reports: dict[int, dict[str, Any]] = {}
        self.start_round = int(start_round)
        self.bytes_down = self.bytes_up = 0
        self.history: list[dict[str, Any]] = []
        self._t_round = time.perf_counter()
        self._round_down = 0
        if resume_state:
            self.global_state = resume_state["global_state"]
            self.uploads = {int(d): LabelLogits(**u) for d, u in resume_state.get("uploads", {}).items()}
            self.bytes_down, self.bytes_up = resume_state["bytes_down"], resume_state["bytes_up"]
            self.history = resume_state.get("history", [])
            self.device_reports = {int(d): r for d, r in resume_state.get("device_reports", {}).items()}

    def __repr__(self) -> str:
        return f"RecStrategy({self.kind})"

    def configure_train(self, rnd: int, devices: list[int]) -> dict[int, Any]:
        """The ``train`` message content for each of ``devices`` (device id -> RecordDict)."""
        config = {"strategy": self.kind, "round": int(rnd), "top_m": self.top_m}
        self._t_round = time.perf_counter()
        self._round_down = 0
        out = {}
        for dev in devices:
            if self.kind == "distill":  # the average of the other devices' last uploads, never its own
                arrays = logits_to_arrays(teacher_for(self.uploads, dev, self.top_m))
            else:
                arrays = state_to_arrays(self.global_state)
            self._round_down += nbytes(arrays)
            out[dev] = train_ins(arrays, config)
        return out

    def aggregate_train(self, rnd: int, results: list[Any], failures: list[Any]) -> dict[str, Any] | None:
        """Combine the replies (``RecordDict`` s of the devices that answered) of round ``rnd``.

        ``failures``: devices that did not answer (a Flower error, a lost node, a timeout). A reply
        with an error (local training raised) or non-finite values also counts as a failure.
        Returns the round's history entry, or None when no device gave a usable result.
        """
        failures = list(failures)
        if not results:
            log.warning(f"round {rnd}: no device returned a result ({len(failures)} failures)")
            return None
        up = 0
        reports = []
        decoded, rejected, errors = [], [], {}
        for res in results:
            metrics = dict(res["metrics"])
            if "status" in res:  # local training raised; the device is still in the federation
                errors[int(metrics["device"])] = str(res["status"]["error"])
                continue
            arrays = from_record(res["arrays"])
            up += nbytes(arrays)
            if all(np.isfinite(a).all() for a in arrays.values() if a.dtype.kind == "f"):
                decoded.append((metrics, arrays))
            else:  # a diverged device must not poison the global model or the other devices' teachers
                rejected.append(int(metrics["device"]))
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
            return None
        if self.kind == "distill":
            for metrics, arrays in decoded:
                self.uploads[int(metrics["device"])] = arrays_to_logits(arrays)
                reports.append(metrics)
            for r in reports:  # a device that missed this round counts with its last report
                self.device_reports[int(r["device"])] = dict(r)
            known = list(self.device_reports.values())
            users = sum(r["num_users"] for r in known)
            metrics = {k: sum(r[k] * r["num_users"] for r in known) / users
                       for k in known[0] if k.startswith("test_")}
            chosen = sorted(int(r["device"]) for r in reports)
        else:
            states, weights, devices = [], [], []
            for m, arrays in decoded:
                states.append(arrays_to_state(arrays, self.template))
                weights.append(m["num_examples"])
                devices.append(int(m["device"]))
                reports.append(m)
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
        return entry

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
                 "uploads": {d: vars(u) for d, u in self.uploads.items()},
                 "bytes_down": self.bytes_down, "bytes_up": self.bytes_up, "history": self.history,
                 "device_reports": self.device_reports}
        atomic_torch_save(state, os.path.join(self.run_dir, "federation_last.pt"))
        with open(os.path.join(self.run_dir, "rounds.jsonl"), "a") as f:
            f.write(json.dumps(self.history[-1]) + "\n")


# ---------------------------------------------------------------------- the round loop (ServerApp main)
def _reason(msg) -> str:
    from flwr.common.constant import ErrorCode

    names = {v: k for k, v in vars(ErrorCode).items() if isinstance(v, int)}
    return f"{names.get(msg.error.code, msg.error.code)}: {(msg.error.reason or '').strip()[:300]}"


def exchange(grid, contents: dict[int, Any], message_type: str, group: str, timeout: float | None,
             poll: float = 0.5) -> tuple[dict[int, Any], dict[int, str]]:
    """Send one message per node (node id -> RecordDict) and collect the replies.

    Returns ``(replies, failures)``: node -> reply content, and node -> why there is none (an error
    reply: the ClientApp raised or crashed, the node went away; or no reply within ``timeout``).
    """
    from flwr.app import Message

    pending: dict[str, int] = {}
    failures: dict[int, str] = {}
    for node, content in contents.items():
        ids = list(grid.push_messages([Message(content, dst_node_id=int(node), message_type=message_type,
                                               group_id=group)]))
        if ids and ids[0]:
            pending[ids[0]] = node
        else:
            failures[node] = "the SuperLink did not accept the message (node gone?)"
    replies: dict[int, Any] = {}
    deadline = None if timeout is None else time.monotonic() + float(timeout)
    while pending:
        for msg in grid.pull_messages(list(pending)):
            node = pending.pop(msg.metadata.reply_to_message_id, None)
            if node is None:
                continue
            if msg.has_error():
                failures[node] = _reason(msg)
            else:
                replies[node] = msg.content
        if not pending:
            break
        if deadline is not None and time.monotonic() >= deadline:
            for node in pending.values():
                failures[node] = f"no reply within federation.round_timeout={timeout:g} s"
            break
        time.sleep(poll)
    return replies, failures


def _wait_for_nodes(grid, want: int, at_least: int, seconds: float) -> set[int]:
    """The connected nodes: all ``want`` if they connect within ``seconds``, else at least ``at_least``."""
    deadline, said = time.monotonic() + float(seconds), False
    while True:
        nodes = set(grid.get_node_ids())
        if len(nodes) >= want:
            return nodes
        if time.monotonic() >= deadline:
            if len(nodes) >= at_least:
                return nodes
            raise FederationError(f"{len(nodes)} SuperNode(s) connected within federation.connect_timeout="
                                  f"{seconds:g} s; a round needs at least {at_least} of the {want} devices "
                                  f"(federation.min_fit_fraction)")
        if not said:
            print(f"waiting for {want} SuperNodes ({len(nodes)} connected; up to {seconds:g} s)", flush=True)
            said = True
        time.sleep(0.5)


def identify_nodes(grid, nodes, num_devices: int, timeout: float | None) -> dict[int, int | None]:
    """node id -> device id (its ``partition-id``), None for a node that did not say or is out of range."""
    from flwr.app import RecordDict

    replies, failures = exchange(grid, {n: RecordDict() for n in nodes}, "query", "identify", timeout)
    out: dict[int, int | None] = {n: None for n in failures}
    for node, why in failures.items():
        log.warning(f"SuperNode {node}: did not say which device it is ({why}); left out")
    for node, content in replies.items():
        m = content["metrics"]
        dev, parts = int(m["device"]), int(m["num_partitions"])
        if not 0 <= dev < num_devices or parts not in (-1, num_devices):
            log.warning(f"SuperNode {node}: partition-id={dev} num-partitions={parts}, but the federation has "
                        f"federation.num_devices={num_devices} (partition-id 0..{num_devices - 1}); left out")
            dev = None
        out[node] = dev
    return out


def run_rounds(grid, strategy: RecStrategy, first: int, last: int, *, connect_timeout: float = 120.0,
               round_timeout: float | None = None) -> None:
    """Rounds ``first..last`` through the Grid: the ServerApp's main loop.

    Every round goes to every connected device (at least ``strategy.min_fit``; the first round waits
    up to ``connect_timeout`` for all of them). A device that fails a round (an error, a lost node,
    no reply within ``round_timeout``) is left out of that round and asked again the next.
    """
    nodes: dict[int, int | None] = {}
    live = _wait_for_nodes(grid, strategy.num_devices, strategy.min_fit, connect_timeout)
    for rnd in range(first, last + 1):
        if rnd > first:
            live = set(grid.get_node_ids())
            if len(live) < strategy.min_fit:
                live = _wait_for_nodes(grid, strategy.min_fit, strategy.min_fit, connect_timeout)
        nodes = {n: d for n, d in nodes.items() if n in live}
        new = [n for n in live if n not in nodes]
        if new:
            nodes.update(identify_nodes(grid, new, strategy.num_devices, round_timeout))
        node_of: dict[int, int] = {}
        for node, dev in nodes.items():
            if dev is None:
                continue
            if dev in node_of:
                log.warning(f"round {rnd}: SuperNodes {node_of[dev]} and {node} both are device {dev}; "
                            f"using {node_of[dev]}")
                continue
            node_of[dev] = node
        if len(node_of) < strategy.min_fit:
            raise FederationError(f"round {rnd}: {len(node_of)} device(s) identified, a round needs "
                                  f"{strategy.min_fit} (federation.min_fit_fraction); check the SuperNodes' "
                                  f"--node-config partition-id")
        contents = strategy.configure_train(rnd, sorted(node_of))
        replies, failed = exchange(grid, {node_of[d]: c for d, c in contents.items()}, "train", str(rnd),
                                   round_timeout)
        device_of = {n: d for d, n in node_of.items()}
        for node, why in failed.items():
            log.warning(f"round {rnd}: device {device_of[node]} failed ({why})")
        strategy.aggregate_train(rnd, list(replies.values()), sorted(device_of[n] for n in failed))


def make_server_app(main: Callable[[Any, Any], None]):
    """A ServerApp whose ``@app.main()`` is ``main(grid, context)``."""
    _flwr()
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def _main(grid, context) -> None:
        main(grid, context)

    return app


def simulate(server_app, client_app, num_devices: int) -> None:
    """Flower's simulation engine (Ray backend): one virtual SuperNode per device, on this machine."""
    from flwr.simulation import run_simulation

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_devices,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": max(1, min(num_devices, os.cpu_count() or 1)),
                                                 "include_dashboard": False, "log_to_driver": True}})
