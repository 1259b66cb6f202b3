"""Federated training on Flower: devices, simulation, deployment on loopback, failures, resume."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from lightning_rec.cli import run  # noqa: E402
from lightning_rec.errors import ConfigError  # noqa: E402
from lightning_rec.methods.federated.device import Device  # noqa: E402

SMALL = ["logger=csv", "data.synthetic.num_users=120", "data.synthetic.num_items=40", "data.max_len=15",
         "data.batch_size=16", "model.d_model=16", "federation.num_devices=2", "federation.local_epochs=2",
         "trainer.accelerator=cpu"]
FLOWER_DEPRECATION = "DEPRECATED FEATURE"  # how Flower announces a deprecated call (a log line, not a warning)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_devices_loaders_see_only_its_users(tmp_path):
    from lightning_rec.config import load_config, to_plain

    plain = to_plain(load_config(["data.synthetic.num_users=60", "data.synthetic.num_items=30", "data.max_len=10",
                                  "model.d_model=8"]))
    model = {k: v for k, v in plain["model"].items() if k not in ("new_head", "match_item_ids")}
    users = np.array([3, 10, 11, 42])
    dev = Device(0, users, plain["data"], model, 1, str(tmp_path))
    dm = dev.datamodule()
    from lightning_rec.data import SeqDataModule

    conf = {k: v for k, v in plain["data"].items() if not k.startswith("_")}
    full = SeqDataModule(**conf)
    enc = full.load()
    assert dm.num_users == 4 and dm.load().user_ids == [enc.user_ids[u] for u in users]
    assert dm.num_items == full.num_items  # the catalogue is shared, the interactions are not
    mine = set()
    for u in users:
        mine.update(enc.items[enc.indptr[u]:enc.indptr[u + 1]].tolist())
    for batch in dm.train_dataloader():
        seen = set(batch["inputs"].flatten().tolist()) | set(batch["targets"].flatten().tolist())
        assert seen - {0} <= mine
    assert len(dm.train_set) == 4 and len(dm.test_set) == 4
    with pytest.raises(ConfigError, match="data.users"):
        SeqDataModule(**{**conf, "users": [999]}).load()


def _ndcg(history, rnd):
    return next(h["test_ndcg_at_10"] for h in history if h["round"] == rnd)


@pytest.mark.ddp
def test_two_round_simulation_improves_over_round_0(tmp_path, capfd):
    """Flower's simulation engine (Ray): every device a ClientApp on this machine; the test metrics
    are on 30 held-out users that no device has. Flower warns of nothing deprecated."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run(["federate", *SMALL, f"runs_dir={tmp_path}", "federation.rounds=2", "federation.strategy=fedavg",
                   "federation.holdout_users=0.25"])
    flower = [w for w in caught if issubclass(w.category, DeprecationWarning) and
              (f"{os.sep}flwr{os.sep}" in w.filename or "flwr" in str(w.message) or "Flower" in str(w.message))]
    assert not flower, [str(w.message) for w in flower]
    logged = capfd.readouterr()
    assert FLOWER_DEPRECATION not in logged.out + logged.err
    assert "round 2: 2 devices" in logged.out
    split = json.load(open(os.path.join(out["run_dir"], "devices.json")))
    assert len(split["holdout"]) == 30 and not set(split["holdout"]) & {u for d in split["devices"] for u in d}
    assert sum(map(len, split["devices"])) == 90
    hist = out["history"]
    assert [h["round"] for h in hist] == [0, 1, 2]
    assert _ndcg(hist, 2) > _ndcg(hist, 0)
    assert hist[1]["bytes_down"] > 0 and hist[1]["bytes_up"] == hist[1]["bytes_down"]  # weights both ways
    ck = torch.load(os.path.join(out["run_dir"], "devices", "device_0.ckpt"), weights_only=False)
    assert ck["epoch"] == 4  # 2 rounds x 2 local epochs, each round continued from the device's own checkpoint


# ---------------------------------------------------------------------- deployment on loopback
def _tail(path, n=3000) -> str:
    try:
        return open(path, errors="replace").read()[-n:]
    except OSError:
        return ""


def _wait_for(what, check, procs, logs, seconds):
    """Poll ``check()`` until true; a process that exits early or a timeout fails with its log."""
    deadline = time.monotonic() + seconds
    while not check():
        for name, p in procs.items():
            if p.poll() is not None:
                log = _tail(logs[name])
                hint = " (a port is taken: another process listens there)" if "address already in use" in \
                    log.lower() else ""
                raise RuntimeError(f"{name} exited with code {p.returncode} while waiting for {what}{hint}:\n{log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {seconds} s:\n" + "\n".join(
                f"--- {name}\n{_tail(logs[name])}" for name in procs))
        time.sleep(0.3)


def _listens(port) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    """A Flower SuperLink and two SuperNodes (devices 0 and 1) on loopback, separate processes, --insecure.

    Each process runs in its own session so that the SuperExec and app processes it starts are
    killed with it; the fixture yields ``(address, logs)``.
    """
    base = tmp_path_factory.mktemp("flower")
    env = {**os.environ, "FLWR_HOME": str(base / "flwr-home"), "PYTHONWARNINGS": "ignore"}
    port, *node_ports = ports = [free_port() for _ in range(3)]
    if len(set(ports)) < 3 or any(_listens(p) for p in ports):
        pytest.fail(f"ports {ports} on 127.0.0.1: one is taken (another process listens there); rerun")
    cmds = {"superlink": ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
                          "--disable-runtime-dependency-installation"]}
    for d in range(2):
        cmds[f"supernode{d}"] = ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                                 "--port", str(node_ports[d]), "--node-config", f"partition-id={d} num-partitions=2"]
    logs = {name: base / f"{name}.log" for name in cmds}
    procs = {}
    try:
        for name, cmd in cmds.items():
            with open(logs[name], "w") as out:
                procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=base,
                                               start_new_session=True)
            if name == "superlink":
                _wait_for(f"SuperLink listening on 127.0.0.1:{port}", lambda: _listens(port), procs, logs, 60)
        _wait_for("2 SuperNodes registered", lambda: all("SuperNode ID" in _tail(logs[f"supernode{d}"], 10**6)
                                                         for d in range(2)), procs, logs, 60)
        yield f"127.0.0.1:{port}", logs
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, 15)
        for p in procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait()


def _submit(tmp_path, address, strategy, rounds, extra=(), timeout=300):
    """``python -m lightning_rec federate federation.engine=deployment``: submits the run, relays its log."""
    cmd = [sys.executable, "-m", "lightning_rec", "federate", *SMALL, f"runs_dir={tmp_path / 'runs'}",
           f"federation.rounds={rounds}", f"federation.strategy={strategy}", "federation.engine=deployment",
           f"federation.superlink={address}", "federation.connect_timeout=60", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=timeout,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    resumed = [e.split("=", 1)[1] for e in extra if e.startswith("federation.resume=")]
    run_dir = type(tmp_path)(resumed[0] if resumed else next((tmp_path / "runs").glob("federate-*/*")))
    rows = [json.loads(line) for line in open(run_dir / "rounds.jsonl")]
    assert json.load(open(run_dir / "federation_result.json"))["history"][1:] == rows
    assert FLOWER_DEPRECATION not in log
    return rows, log, run_dir


def _no_flower_deprecation(logs):
    for name, path in logs.items():
        assert FLOWER_DEPRECATION not in _tail(path, 10**7), f"{name}: {_tail(path)}"


@pytest.mark.ddp
def test_deployment_on_loopback_with_distillation_and_a_dropped_client(tmp_path, superlink):
    """SuperLink + 2 SuperNodes (separate processes); device 1's local training raises in round 1."""
    address, logs = superlink
    rows, log, run_dir = _submit(tmp_path, address, "distill", 2,
                                 ["federation.top_m=10", "federation.holdout_users=0.25", "federation.fail=['1:1']"])
    assert "test metrics on 30 held-out users" in log and "engine deployment" in log
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["failures"] == 1 and rows[0]["devices"] == [0]  # device 1's training failed in round 1 ...
    assert "RuntimeError" in rows[0]["errors"]["1"]
    assert rows[1]["devices"] == [0, 1] and rows[1]["failures"] == 0  # ... its SuperNode stayed and rejoined
    assert rows[1]["bytes_down"] > 0 and rows[0]["bytes_up"] > 0  # a teacher down, per-label logits up
    # uploads are per-label logits (labels x top_m), not weights
    n_params = sum(v.numel() for v in torch.load(run_dir / "federation_last.pt", weights_only=False)
                   ["global_state"].values())
    assert rows[1]["bytes_up"] < 4 * n_params
    first = float(log.split("round 0 (initial model): test NDCG@10 ")[1].split()[0])
    assert rows[-1]["test_ndcg_at_10"] > first
    for d in range(2):  # each device's state: in <run>/devices (no state-dir in the node config)
        assert (run_dir / "devices" / f"device_{d}.ckpt").exists()
    _no_flower_deprecation(logs)


@pytest.mark.ddp
@pytest.mark.slow  # Flower reports a crashed ClientApp after about a minute
def test_deployment_topk_aggregates_the_closest_devices_and_resumes(tmp_path, superlink):
    address, logs = superlink
    # device 1's ClientApp process exits in round 2: Flower reports it crashed, the round goes on without it
    rows, log, run_dir = _submit(tmp_path, address, "topk", 2, ["federation.k=1", "federation.fail=['1:2:crash']"])
    assert [r["round"] for r in rows] == [1, 2] and all(len(r["aggregated"]) == 1 for r in rows)
    assert rows[0]["devices"] == [0, 1] and rows[1]["devices"] == [0] and rows[1]["failures"] == 1
    assert "device 1 failed (CLIENT_APP_CRASHED" in log
    first = float(log.split("round 0 (initial model): test NDCG@10 ")[1].split()[0])
    assert rows[-1]["test_ndcg_at_10"] > first
    # resume after round 2: round 3 starts from the saved global model; devices continue their own state
    rows2, log2, _ = _submit(tmp_path, address, "topk", 3, ["federation.k=1", f"federation.resume={run_dir}"])
    assert [r["round"] for r in rows2] == [1, 2, 3] and rows2[:2] == rows
    assert "rounds 3..3" in log2 and rows2[2]["devices"] == [0, 1]
    ck = torch.load(run_dir / "devices" / "device_0.ckpt", weights_only=False)
    assert ck["epoch"] == 6  # 3 rounds x 2 local epochs
    ck = torch.load(run_dir / "devices" / "device_1.ckpt", weights_only=False)
    assert ck["epoch"] == 4  # it missed round 2
    _no_flower_deprecation(logs)


def test_federate_options_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="federation.strategy=gossip"):
        run(["federate", *SMALL, f"runs_dir={tmp_path}", "federation.strategy=gossip"])
    with pytest.raises(ConfigError, match="federation.rounds=0"):
        run(["federate", *SMALL, f"runs_dir={tmp_path}", "federation.rounds=0"])
    with pytest.raises(ConfigError, match="federation.fail: '1:2:boom' is not device:round"):
        run(["federate", *SMALL, f"runs_dir={tmp_path}", "federation.fail=['1:2:boom']"])
    with pytest.raises(ConfigError, match="federation.fail: '1:2:crash': a crash .* is for deployment"):
        run(["federate", *SMALL, f"runs_dir={tmp_path}", "federation.fail=['1:2:crash']"])
    with pytest.raises(ConfigError, match="federation.resume=.*no federation_last.pt"):
        run(["federate", *SMALL, f"runs_dir={tmp_path}", f"federation.resume={tmp_path}"])
    with pytest.raises(ConfigError, match="federation.superlink=nowhere: expected host:port"):
        run(["federate", *SMALL, f"runs_dir={tmp_path}", "federation.engine=deployment",
             "federation.superlink=nowhere"])


@pytest.mark.parametrize("override, replacement", [
    ("federation.engine=server", "federation.engine=deployment federation.superlink=<host:port>"),
    ("federation.engine=client", "federation.engine=deployment federation.superlink=<host:port>"),
    ("federation.server_address=127.0.0.1:8080", "federation.superlink=<host:port>"),
    ("federation.device=1", "--node-config \"partition-id=N num-partitions=M\""),
])
def test_the_old_server_and_client_options_name_their_replacement(tmp_path, override, replacement):
    """The options of the retired server/client processes fail in one line that names what replaced them."""
    with pytest.raises(ConfigError) as err:
        run(["federate", *SMALL, f"runs_dir={tmp_path}", override])
    message = str(err.value)
    assert "\n" not in message and message.startswith(override.split("=")[0] if "engine" not in override
                                                         else override)
    assert replacement in message and "SuperLink" in message
    assert not list(tmp_path.iterdir())  # refused before a run folder exists


def test_a_device_that_sends_non_finite_weights_is_dropped_from_the_average(tmp_path):
    """A diverged device (NaN weights) counts as a failure; the others are averaged by their example counts."""
    from lightning_rec.methods.federated.flower import build_strategy, state_to_arrays, train_res

    template = {"w": torch.zeros(3), "b": torch.zeros(1)}
    strat = build_strategy("fedavg", num_devices=3, initial_state=template, evaluate_global=lambda s: {"ndcg@10": 0.5},
                           run_dir=str(tmp_path), min_fit_fraction=0.3)
    sent = strat.configure_train(1, [0, 1, 2])  # what goes down: the global weights, to every device
    assert sorted(sent) == [0, 1, 2] and set(sent[0]["arrays"].keys()) == {"w", "b"}

    def reply(dev, value, n):  # a device's reply, as the ClientApp builds it
        state = {"w": torch.full((3,), value), "b": torch.full((1,), value)}
        return train_res(state_to_arrays(state), {"device": dev, "loss": 1.0, "train_seconds": 0.0, "num_users": n,
                                                  "num_examples": n})

    entry = strat.aggregate_train(1, [reply(0, 1.0, 10), reply(1, float("nan"), 10), reply(2, 4.0, 30)], [])
    assert entry is not None and entry["test_ndcg_at_10"] == 0.5
    assert torch.allclose(strat.global_state["w"], torch.full((3,), (10 * 1.0 + 30 * 4.0) / 40))
    assert torch.isfinite(strat.global_state["b"]).all()
    row = json.loads(open(tmp_path / "rounds.jsonl").read().splitlines()[-1])
    assert row["rejected"] == [1] and row["failures"] == 1 and row["devices"] == [0, 2]
    assert torch.load(tmp_path / "federation_last.pt", weights_only=False)["round"] == 1  # the round checkpoint
