"""Federated training on Flower (issue #7): devices, simulation, deployment on loopback, failures, resume."""

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
def test_two_round_simulation_improves_over_round_0(tmp_path):
    """Flower's simulation engine (Ray): every device a ClientApp on this machine; the test metrics
    are on 30 held-out users that no device has."""
    out = run(["federate", *SMALL, f"runs_dir={tmp_path}", "federation.rounds=2", "federation.strategy=fedavg",
               "federation.holdout_users=0.25"])
    split = json.load(open(os.path.join(out["run_dir"], "devices.json")))
    assert len(split["holdout"]) == 30 and not set(split["holdout"]) & {u for d in split["devices"] for u in d}
    assert sum(map(len, split["devices"])) == 90
    hist = out["history"]
    assert [h["round"] for h in hist] == [0, 1, 2]
    assert _ndcg(hist, 2) > _ndcg(hist, 0)
    assert hist[1]["bytes_down"] > 0 and hist[1]["bytes_up"] == hist[1]["bytes_down"]  # weights both ways
    ck = torch.load(os.path.join(out["run_dir"], "devices", "device_0.ckpt"), weights_only=False)
    assert ck["epoch"] == 4  # 2 rounds x 2 local epochs, each round continued from the device's own checkpoint


def _deploy(tmp_path, strategy, rounds, extra=(), fail_device=None, fail_round=None, server_dir="server"):
    port = free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    common = [*SMALL, f"federation.rounds={rounds}", f"federation.strategy={strategy}",
              f"federation.server_address=127.0.0.1:{port}", *extra]
    if fail_device is not None:
        common.append(f"federation.fail=['{fail_device}:{fail_round}']")
    server = subprocess.Popen([sys.executable, "-m", "lightning_rec", "federate", *common, "federation.engine=server",
                               f"runs_dir={tmp_path / server_dir}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=tmp_path, env=env)
    time.sleep(3)
    clients = [subprocess.Popen([sys.executable, "-m", "lightning_rec", "federate", *common, "federation.engine=client",
                                 f"federation.device={d}", f"run_dir={tmp_path / f'device{d}'}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path, env=env)
               for d in range(2)]
    try:
        log, _ = server.communicate(timeout=420)
    finally:
        for c in clients:
            try:
                c.wait(timeout=60)
            except subprocess.TimeoutExpired:
                c.kill()
    assert server.returncode == 0, log[-3000:]
    resumed = [e.split("=", 1)[1] for e in extra if e.startswith("federation.resume=")]
    run_dir = resumed[0] if resumed else next((tmp_path / server_dir).glob("federate-*/*"))
    run_dir = type(tmp_path)(run_dir)
    rows = [json.loads(line) for line in open(run_dir / "rounds.jsonl")]
    return rows, log, run_dir


@pytest.mark.ddp
def test_deployment_on_loopback_with_distillation_and_a_dropped_client(tmp_path):
    rows, log, run_dir = _deploy(tmp_path, "distill", 3, ["federation.top_m=10", "federation.holdout_users=0.25"],
                                 fail_device=1, fail_round=2)
    assert "test metrics on 30 held-out users" in log
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[1]["failures"] == 1 and rows[1]["devices"] == [0]  # device 1's training failed in round 2 ...
    assert "RuntimeError" in rows[1]["errors"]["1"]
    assert rows[2]["devices"] == [0, 1] and rows[2]["failures"] == 0  # ... its client stayed and rejoined
    assert rows[1]["bytes_down"] > 0 and rows[0]["bytes_up"] > 0  # teachers down, per-label logits up
    # uploads are per-label logits (labels x top_m), not weights
    n_params = sum(v.numel() for v in torch.load(run_dir / "federation_last.pt", weights_only=False)
                   ["global_state"].values())
    assert rows[2]["bytes_up"] < 4 * n_params
    assert "round 0 (initial model)" in log
    first = float(log.split("round 0 (initial model): test NDCG@10 ")[1].split()[0])
    assert rows[-1]["test_ndcg_at_10"] > first


@pytest.mark.ddp
def test_deployment_topk_aggregates_the_closest_devices_and_resumes(tmp_path):
    # device 1's process exits in round 2: Flower counts the lost client as a failure and the round ends
    rows, log, run_dir = _deploy(tmp_path, "topk", 2, ["federation.k=1"], fail_device=1, fail_round="2:crash")
    assert [r["round"] for r in rows] == [1, 2] and all(len(r["aggregated"]) == 1 for r in rows)
    assert rows[0]["devices"] == [0, 1] and rows[1]["devices"] == [0] and rows[1]["failures"] == 1
    first = float(log.split("round 0 (initial model): test NDCG@10 ")[1].split()[0])
    assert rows[-1]["test_ndcg_at_10"] > first
    # resume after round 2: round 3 starts from the saved global model; devices continue their own state
    rows2, log2, _ = _deploy(tmp_path, "topk", 3, ["federation.k=1", f"federation.resume={run_dir}"])
    assert [r["round"] for r in rows2] == [1, 2, 3] and rows2[:2] == rows
    assert "rounds 3..3" in log2
    ck = torch.load(tmp_path / "device0" / "devices" / "device_0.ckpt", weights_only=False)
    assert ck["epoch"] == 6  # 3 rounds x 2 local epochs


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


def test_a_device_that_sends_non_finite_weights_is_dropped_from_the_average(tmp_path):
    """A diverged device (NaN weights) counts as a failure; the others are averaged as usual."""
    import flwr as fl

    from lightning_rec.methods.federated.flower import build_strategy, state_to_arrays

    template = {"w": torch.zeros(3), "b": torch.zeros(1)}
    strat = build_strategy("fedavg", num_devices=3, initial_state=template, evaluate_global=lambda s: {"ndcg@10": 0.5},
                           run_dir=str(tmp_path), min_fit_fraction=0.3)

    class Proxy:
        def __init__(self, cid):
            self.cid = cid

    def result(dev, value, n):
        state = {"w": torch.full((3,), value), "b": torch.full((1,), value)}
        res = fl.common.FitRes(fl.common.Status(fl.common.Code.OK, ""),
                               fl.common.ndarrays_to_parameters(state_to_arrays(state)), n,
                               {"device": dev, "loss": 1.0, "train_seconds": 0.0, "num_users": n})
        return Proxy(str(dev)), res

    results = [result(0, 1.0, 10), result(1, float("nan"), 10), result(2, 4.0, 30)]
    params, _ = strat.aggregate_fit(1, results, [])
    assert params is not None
    assert torch.allclose(strat.global_state["w"], torch.full((3,), (10 * 1.0 + 30 * 4.0) / 40))
    row = json.loads(open(tmp_path / "rounds.jsonl").read().splitlines()[-1])
    assert row["rejected"] == [1] and row["failures"] == 1 and row["devices"] == [0, 2]
