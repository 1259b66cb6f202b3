"""DDP end to end and top-k model averaging (issue #6).

Multi-process tests launch the CLI with 2 or 4 gloo processes on the CPU. Weight comparisons use
dropout 0 and a data file where every user has the same history length, so every rank's batch
holds the same number of targets and a mean over ranks equals the mean over the whole batch.
"""

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import tiny

from lightning_rec import SeqRecModule
from lightning_rec.errors import ConfigError
from lightning_rec.methods.topk.strategy import (
    TopKAveragingStrategy,
    global_batch_second_moment,
    resolve_k,
    restore_second_moment,
    select_topk,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def equal_length_file(tmp_path, users=64, length=12, items=40):
    rng = np.random.default_rng(3)
    p = tmp_path / "equal.txt"
    p.write_text("".join(f"{u} {i}\n" for u in range(1, users + 1) for i in rng.integers(1, items + 1, size=length)))
    return str(p)


def launch(tmp_path, tag, *overrides, epochs=2, launcher=None):
    """Run `fit` (with the FinalWeights probe) and return each rank's saved weights."""
    probe = tmp_path / f"probe-{tag}"
    probe.mkdir()
    env = {**os.environ, "PROBE_DIR": str(probe), "PYTHONWARNINGS": "ignore", "PYTHONPATH": HERE,
           "OMP_NUM_THREADS": "1"}
    args = [*tiny(tmp_path / tag, "+callbacks.probe._target_=ddp_probe.FinalWeights", "test_after_fit=false",
                  *overrides, epochs=epochs)]
    if "model=rocket" in overrides:
        args.remove("model.d_model=16")
    cmd = (launcher or [sys.executable, "-m", "lightning_rec"]) + ["fit", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    out = {}
    for f in sorted(f for f in os.listdir(probe) if f.startswith("weights")):
        out[int(f[len("weights"):-3])] = torch.load(probe / f, weights_only=False)
    return out, p.stdout + p.stderr


def max_diff(a, b):
    return max(float((a[n] - b[n]).abs().max()) for n in a)


# ---------------------------------------------------------------------- selection (no processes)
def test_topk_selection_excludes_a_planted_outlier():
    d = torch.tensor([0.10, 0.12, 5.0, 0.11])  # rank 2 drifted far from the global model
    assert select_topk(d, 3) == [0, 1, 3]
    assert select_topk(d, 4) == [0, 1, 2, 3]
    assert select_topk(d, 1) == [0]
    assert select_topk(torch.tensor([0.2, 0.1, 0.1, 0.3]), 2) == [1, 2]  # tie at 0.1
    assert select_topk(torch.tensor([0.2, float("nan"), 0.1]), 2) == [0, 2]  # a diverged rank is never chosen
    assert select_topk(torch.tensor([0.1, 0.1, 0.1]), 2) == [0, 1]  # ties: lower rank first


def test_k_as_count_or_fraction():
    assert resolve_k(3, 4) == 3 and resolve_k(9, 4) == 4
    assert resolve_k(0.8, 4) == 3 and resolve_k(0.8, 10) == 8 and resolve_k(1.0, 4) == 4 and resolve_k(0.1, 4) == 1
    for bad in (0, 1.5, -0.2, "two", True):
        with pytest.raises(ConfigError, match="trainer.strategy.k="):
            resolve_k(bad, 4)
    with pytest.raises(ConfigError, match="trainer.strategy.h="):
        TopKAveragingStrategy(h=0)


def _hand_strategy(rank, world, port, **kwargs):
    """Join a gloo group and return a strategy that believes it is ``rank`` of ``world`` on the CPU."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)

    class Fixed(TopKAveragingStrategy):
        world_size = property(lambda self: world)
        global_rank = property(lambda self: rank)
        is_global_zero = property(lambda self: rank == 0)
        root_device = property(lambda self: torch.device("cpu"))

    return Fixed(**kwargs)


def _spawn4(worker, tmp_path):
    """Run ``worker(rank, 4, port, tmp_path)`` in 4 processes on a free local port."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(worker, args=(4, port, str(tmp_path)), nprocs=4, join=True)


def _gloo_worker(rank, world, port, out):
    """One rank of a hand example: parameters filled with known values, one exchange."""
    import torch.distributed as dist

    net = torch.nn.Linear(2, 1)
    s = _hand_strategy(rank, world, port, k=3, h=1)
    s._lightning_module = net
    net.trainer = None
    with torch.no_grad():
        net.weight.fill_(0.0)
        net.bias.fill_(0.0)
    s._global = [p.detach().clone() for p in net.parameters()]  # global model: zeros
    with torch.no_grad():  # local models: rank r at (r+1, r+1 | r+1); rank 3 far away
        v = 100.0 if rank == 3 else float(rank + 1)
        net.weight.fill_(v)
        net.bias.fill_(v)
    s._exchange()
    torch.save({"w": net.weight.detach().clone(), "b": net.bias.detach().clone(), "hist": s.history,
                "bytes": s.comm_bytes}, os.path.join(out, f"r{rank}.pt"))
    dist.destroy_process_group()


def test_one_exchange_averages_exactly_the_k_closest_models(tmp_path):
    _spawn4(_gloo_worker, tmp_path)
    res = [torch.load(tmp_path / f"r{r}.pt", weights_only=False) for r in range(4)]
    for r in res:  # mean of ranks 0, 1, 2 (values 1, 2, 3); the outlier (100) is left out
        assert torch.allclose(r["w"], torch.full((1, 2), 2.0)) and torch.allclose(r["b"], torch.full((1,), 2.0))
        h = r["hist"][-1]
        assert h["chosen"] == [0, 1, 2]
        assert h["distances"] == pytest.approx([np.sqrt(3) * v for v in (1, 2, 3, 100)], rel=1e-6)
        assert r["bytes"] == 3 * 4 + 8  # one all-reduce of 3 float32 parameters + this rank's distance (float64)


def _gloo_state_worker(rank, world, port, out):
    """One rank of a hand example for ``average_state``: Adam state with known values, one exchange."""
    import torch.distributed as dist

    s = _hand_strategy(rank, world, port, k=3, h=1, average_state=["exp_avg_sq"])
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.ones(1, 2)).sum().backward()
    opt.step()  # creates exp_avg / exp_avg_sq
    s._lightning_module, s._optimizers = net, [opt]
    net.trainer = None
    s._global = [p.detach().clone() for p in net.parameters()]
    v = 100.0 if rank == 3 else float(rank + 1)  # rank 3 is the outlier, in weights and in state
    with torch.no_grad():
        for p in net.parameters():
            p.add_(v)
            opt.state[p]["exp_avg_sq"].fill_(v * 10)
            opt.state[p]["exp_avg"].fill_(v)
    s._exchange()
    state = {n: {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")} for n, p in net.named_parameters()}
    torch.save({"state": state, "bytes": s.comm_bytes, "chosen": s.history[-1]["chosen"]}, os.path.join(out, f"r{rank}.pt"))
    dist.destroy_process_group()


def test_average_state_averages_the_named_optimizer_state_over_the_chosen_ranks(tmp_path):
    _spawn4(_gloo_state_worker, tmp_path)
    for rank in range(4):
        r = torch.load(tmp_path / f"r{rank}.pt", weights_only=False)
        assert r["chosen"] == [0, 1, 2]
        for st in r["state"].values():
            assert torch.allclose(st["exp_avg_sq"], torch.full_like(st["exp_avg_sq"], 20.0))  # mean of 10, 20, 30
            local = 100.0 if rank == 3 else float(rank + 1)
            assert torch.allclose(st["exp_avg"], torch.full_like(st["exp_avg"], local))  # not named: stays local
        # weights (3 float32) + distance (float64) + state size (int64) + exp_avg_sq (3 float32)
        assert r["bytes"] == 3 * 4 + 8 + 8 + 3 * 4


def test_average_state_names_are_checked():
    with pytest.raises(ConfigError, match="trainer.strategy.average_state="):
        TopKAveragingStrategy(average_state="exp_avg_sq")
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.Adam(net.parameters())
    net(torch.ones(1, 2)).sum().backward()
    opt.step()
    s = TopKAveragingStrategy(k=1, h=1, average_state=["exp_avg", "momentum_buffer"])
    s._lightning_module, s._optimizers = net, [opt]
    with pytest.raises(ConfigError, match=r"no optimizer state \['momentum_buffer'\]; this optimizer keeps"):
        s._average_optimizer_state([0])


def test_global_batch_second_moment_step_matches_a_hand_computation():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    lr, (b1, b2), eps, world = 0.01, (0.9, 0.99), 1e-8, 4
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(b1, b2), eps=eps)
    for _ in range(3):
        for p in net.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    grads = [torch.randn_like(p) for p in net.parameters()]
    before = [(p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone())
              for p in net.parameters()]
    for p, g in zip(net.parameters(), grads):
        p.grad = g.clone()
    saved = global_batch_second_moment(opt, world)
    opt.step()
    restore_second_moment(saved)
    t = 4
    for p, g, (w, m, v) in zip(net.parameters(), grads, before):
        m_hat = m / (1 - b1 ** 3)
        v_batch = (v + (world - 1) * (1 - b2 ** 3) * m_hat ** 2) / world  # the all-rank batch's estimate
        m_new = b1 * m + (1 - b1) * g
        v_used = b2 * v_batch + (1 - b2) * g ** 2
        want = w - lr * (m_new / (1 - b1 ** t)) / ((v_used / (1 - b2 ** t)).sqrt() + eps)
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["exp_avg"], m_new)  # the optimizer's own state: plain Adam's
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], b2 * v + (1 - b2) * g ** 2)
    assert not torch.allclose(v_batch, v)  # the step did use another second moment
    # a parameter with no gradient at a step is not updated by Adam: its v comes back exactly
    net.bias.grad = None
    net.weight.grad = torch.randn_like(net.weight)
    v_bias, w_bias = opt.state[net.bias]["exp_avg_sq"].clone(), net.bias.detach().clone()
    saved = global_batch_second_moment(opt, world)
    opt.step()
    restore_second_moment(saved)
    torch.testing.assert_close(opt.state[net.bias]["exp_avg_sq"], v_bias)
    assert torch.equal(net.bias.detach(), w_bias)
    assert float(opt.state[net.weight]["step"]) == 5.0
    assert global_batch_second_moment(torch.optim.Adam(net.parameters()), world) == []  # no step yet
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sgd.step()
    assert global_batch_second_moment(sgd, world) is None  # state, but not Adam's
    with pytest.raises(ConfigError, match="trainer.strategy.second_moment='batch': expected one of local, global"):
        TopKAveragingStrategy(second_moment="batch")


# ---------------------------------------------------------------------- outer step (no processes)
def _one_rank_exchange(s, net, local_value):
    with torch.no_grad():
        net.weight.fill_(local_value)
    s._exchange()
    return float(net.weight[0, 0]), float(s._global[0][0, 0])


@pytest.mark.parametrize("nesterov", [True, False])
def test_outer_momentum_step_matches_a_hand_computation(nesterov):
    """One rank, k=1: the mean is the local model; the outer step follows DiLoCo's update by hand."""
    net = torch.nn.Linear(1, 1, bias=False)
    net.trainer = None
    s = TopKAveragingStrategy(k=1, h=1, outer_lr=0.5, outer_momentum=0.9, outer_nesterov=nesterov)
    s._lightning_module = net
    with torch.no_grad():
        net.weight.fill_(1.0)
    s._global = [p.detach().clone() for p in net.parameters()]  # w = 1
    # round 1: local model 3 -> delta = 1 - 3 = -2, b = -2
    #   nesterov: w = 1 - 0.5 * (-2 + 0.9 * -2) = 2.9; heavy ball: w = 1 - 0.5 * -2 = 2
    local1, w1 = _one_rank_exchange(s, net, 3.0)
    assert w1 == local1 == pytest.approx(2.9 if nesterov else 2.0)
    # round 2: local model w1 + 1 -> delta = -1, b = 0.9 * -2 - 1 = -2.8
    #   nesterov: w = 2.9 - 0.5 * (-1 + 0.9 * -2.8) = 4.66; heavy ball: w = 2 - 0.5 * -2.8 = 3.4
    _, w2 = _one_rank_exchange(s, net, w1 + 1.0)
    assert w2 == pytest.approx(4.66 if nesterov else 3.4)
    assert float(s.outer.buffers[0][0, 0]) == pytest.approx(-2.8)


def test_outer_step_defaults_are_the_plain_mean_and_options_are_checked():
    net = torch.nn.Linear(1, 1, bias=False)
    net.trainer = None
    s = TopKAveragingStrategy(k=1, h=1)
    s._lightning_module = net
    s._global = [torch.zeros(1, 1)]
    assert _one_rank_exchange(s, net, 3.0) == (3.0, 3.0) and s.outer.buffers is None
    for bad in ({"outer_lr": 0}, {"outer_lr": "1"}, {"outer_momentum": 1.0}, {"outer_momentum": -0.1}):
        with pytest.raises(ConfigError, match="trainer.strategy.outer_"):
            TopKAveragingStrategy(**bad)


# ---------------------------------------------------------------------- SVRG step (no processes)
def test_svrg_step_uses_local_minus_snapshot_plus_mean_gradient():
    torch.manual_seed(0)
    module = SeqRecModule(num_items=30, arch="sasrec", max_len=8, d_model=16, num_blocks=1, dropout=0.3)
    batch = {"inputs": torch.randint(1, 31, (4, 8)), "targets": torch.randint(1, 31, (4, 8))}
    s = TopKAveragingStrategy(svrg=True)
    s._lightning_module = module
    params = list(module.parameters())
    snapshot = [p.detach() + 0.05 * torch.randn_like(p) for p in params]
    mu = [torch.randn_like(p) for p in params]
    s._global, s.snapshot.mu, s.snapshot.batch = [t.clone() for t in snapshot], mu, batch

    def grad_at(values, seed):
        saved = [p.data for p in params]
        for p, v in zip(params, values):
            p.data = v
        torch.manual_seed(seed)
        g = torch.autograd.grad(module.train_loss(batch), params)
        for p, v in zip(params, saved):
            p.data = v
        return g

    local = [p.detach().clone() for p in params]
    expected = [a - b + m for a, b, m in zip(grad_at(local, 7), grad_at(snapshot, 7), mu)]

    def closure():
        module.zero_grad()
        loss = module.train_loss(batch)
        loss.backward()
        return loss

    torch.manual_seed(7)
    s._svrg_closure(closure)()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, atol=1e-5, rtol=1e-4)
    for p, v in zip(params, local):  # the local weights are back in place
        assert torch.equal(p.detach(), v)


# ---------------------------------------------------------------------- processes
@pytest.mark.ddp
def test_ddp_and_one_process_reach_the_same_weights_for_the_same_effective_batch(tmp_path):
    """2 ranks x 16 sequences equal 1 process x 32: Adam, 2 epochs; tolerance 1e-4 (float sums differ)."""
    data = equal_length_file(tmp_path)
    common = ("data=file", f"data.path={data}", "model.dropout=0", "data.max_len=12")
    one, _ = launch(tmp_path, "one", *common, "data.batch_size=32")
    two, log = launch(tmp_path, "two", *common, "data.batch_size=16", "trainer=ddp", "trainer.devices=2")
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    assert max_diff(two[0]["params"], two[1]["params"]) == 0.0  # ranks agree exactly
    d = max_diff(one[0]["params"], two[0]["params"])
    assert d < 1e-4, d
    # and it is not trivially equal: a different effective batch gives different weights
    other, _ = launch(tmp_path, "other", *common, "data.batch_size=16")
    assert max_diff(one[0]["params"], other[0]["params"]) > 1e-3


@pytest.mark.ddp
def test_topk_with_h1_and_all_ranks_equals_ddp_under_sgd(tmp_path):
    """Averaging models after one SGD(momentum) step each is DDP's step: momentum is linear in the gradient."""
    data = equal_length_file(tmp_path)
    common = ("data=file", f"data.path={data}", "model.dropout=0", "data.max_len=12", "data.batch_size=16",
              "optimizer=sgd", "optimizer.lr=0.5", "trainer.devices=2")
    ddp, _ = launch(tmp_path, "ddp", *common, "trainer=ddp")
    topk, log = launch(tmp_path, "topk", *common, "trainer=topk", "trainer.strategy.h=1", "trainer.strategy.k=2")
    assert max_diff(topk[0]["params"], topk[1]["params"]) == 0.0
    d = max_diff(ddp[0]["params"], topk[0]["params"])
    assert d < 1e-5, d
    assert topk[0]["round"] == 4  # 32 sequences per rank per epoch / 16 = 2 steps, 2 epochs, h=1
    # one round moves one model: P float32 + one float64 distance; DDP all-reduces P per step too
    n = sum(p.numel() for p in topk[0]["params"].values())
    assert topk[0]["comm_bytes"] == 4 * (4 * n + 8)


@pytest.mark.ddp
def test_topk_leaves_a_noisy_rank_out(tmp_path):
    common = ("trainer=topk", "trainer.devices=4", "trainer.strategy.h=2", "data.batch_size=16",
              "+callbacks.noisy_rank._target_=lightning_rec.methods.topk.NoisyRankCallback",
              "+callbacks.noisy_rank.rank=3", "+callbacks.noisy_rank.mode=lr_scale",
              "+callbacks.noisy_rank.lr_scale=30")
    topk, _ = launch(tmp_path, "k3", *common, "trainer.strategy.k=3", epochs=1)
    hist = topk[0]["history"]
    assert len(hist) >= 2 and all(h["chosen"] == [0, 1, 2] for h in hist), hist
    assert all(h["distances"][3] > max(h["distances"][:3]) for h in hist)
    for r in (1, 2, 3):  # every rank continues from the same global model
        assert max_diff(topk[0]["params"], topk[r]["params"]) == 0.0
    rows = [json.loads(line) for line in open(next((tmp_path / "k3" / "runs").glob("*/*/topk_rounds.jsonl")))]
    assert [r["round"] for r in rows] == list(range(1, len(rows) + 1))


@pytest.mark.ddp
def test_a_topk_run_that_ends_mid_round_ends_on_the_global_model(tmp_path):
    data = equal_length_file(tmp_path)  # 64 users: 4 steps of 8 per rank per epoch; h=3 leaves 2 steps over
    common = ("data=file", f"data.path={data}", "data.max_len=12", "data.batch_size=8", "trainer=topk",
              "trainer.devices=2", "trainer.strategy.h=3", "trainer.strategy.k=2", "trainer.limit_val_batches=0",
              "+callbacks.end._target_=ddp_probe.TeardownWeights")
    local, log = launch(tmp_path, "mid", *common, epochs=2)
    assert max_diff(local[0]["params"], local[1]["params"]) > 0  # on_train_end of the callbacks: still local
    probe = tmp_path / "probe-mid"
    end = [torch.load(probe / f"end{r}.pt", weights_only=False) for r in (0, 1)]
    assert end[0]["round"] == end[1]["round"] == 3  # rounds after steps 3 and 6, and one at the end
    assert max_diff(end[0]["params"], end[1]["params"]) == 0.0
    mean = {n: (local[0]["params"][n] + local[1]["params"][n]) / 2 for n in local[0]["params"]}
    assert max_diff(end[0]["params"], mean) < 1e-6
    assert "end of training" in log


def test_a_mid_round_topk_checkpoint_holds_the_global_model_under_every_name_of_a_shared_parameter(
        tmp_path, monkeypatch):
    # A rocket shares its item table (and here a block) between the nets, so the state dict has each shared
    # tensor under two or more names. Mid-round, the file's weights are the global model under all of them;
    # if an alias kept the local weights, loading the file would let it overwrite the global ones.
    from lightning_rec import RocketModule
    from lightning_rec.cli import run

    for key in ("MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    args = tiny(tmp_path, "model=rocket", "callbacks=rocket", "model.booster.d_model=16",
                      "model.light.d_model=16", "model.light.num_heads=2", "model.share_blocks=1",
                      "trainer=topk", "trainer.devices=1", "trainer.strategy.h=1000", "trainer.limit_val_batches=0",
                      "callbacks.model_checkpoint.monitor=null", "test_after_fit=false", epochs=1)
    args.remove("model.d_model=16")
    run(["fit", *args])
    path = next((tmp_path / "runs").glob("*/*/checkpoints/last.ckpt"))
    ck = torch.load(path, weights_only=False)
    assert ck["topk_averaging"]["steps_in_round"] > 0  # written mid-round: global and local models differ
    model = RocketModule(**ck["hyper_parameters"])
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    shared = [names for names in aliases.values() if len(names) > 1]
    assert any("light" in n for names in shared for n in names) and any("blocks" in n for names in shared for n in names)
    local = ck["topk_averaging"]["local_state"]  # rank 0's local model (other ranks keep theirs beside the file)
    for names in shared:
        for n in names[1:]:
            assert torch.equal(ck["state_dict"][n], ck["state_dict"][names[0]]), (n, names[0])
        assert not torch.equal(ck["state_dict"][names[0]], local[names[0]])  # the global model, not the local one
    loaded = RocketModule.load_from_checkpoint(path, weights_only=False)
    for n, v in loaded.state_dict().items():
        assert torch.equal(v, ck["state_dict"][n]), n


@pytest.mark.ddp
def test_validation_and_test_inside_a_two_process_topk_fit_equal_one_process(tmp_path):
    """The validation that picks top-k's best checkpoint, and the test after fit, run on the global model
    over users sharded between the ranks: one process evaluating the saved checkpoint gets the same."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    args = tiny(tmp_path, "data.synthetic.num_users=201", "trainer=topk", "trainer.devices=2",
                "trainer.strategy.h=3", "trainer.strategy.k=2", f"metrics_out={tmp_path / 'fit.json'}", epochs=2)
    p = subprocess.run([sys.executable, "-m", "lightning_rec", "fit", *args], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    run_dir = re.findall(r"run folder: (\S+)", p.stdout + p.stderr)[-1]
    result = json.load(open(os.path.join(run_dir, "result.json")))
    rows = list(csv.DictReader(open(os.path.join(run_dir, "csv", "version_0", "metrics.csv"))))
    val = [float(r["val/ndcg@10"]) for r in rows if r.get("val/ndcg@10")]
    assert result["best_score"] == pytest.approx(max(val), abs=1e-7)
    import pytorch_lightning as pl

    from lightning_rec.build import build_datamodule as _build_datamodule
    from lightning_rec.config import load_config, to_plain

    best = SeqRecModule.load_from_checkpoint(result["best_ckpt"], map_location="cpu", weights_only=True)
    cfg = load_config(tiny(tmp_path / "one", "data.synthetic.num_users=201", epochs=2))
    dm = _build_datamodule(to_plain(cfg)["data"])
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False)
    one_val = trainer.validate(best, datamodule=dm, verbose=False)[0]["val/ndcg@10"]
    assert one_val == pytest.approx(max(val), abs=1e-6)  # the best epoch's sharded validation, redone in one process
    one_test = trainer.test(best, datamodule=dm, verbose=False)[0]
    fit_test = json.load(open(tmp_path / "fit.json"))
    for k, v in fit_test.items():
        assert one_test[k] == pytest.approx(v, abs=1e-6), k


@pytest.mark.ddp
def test_topk_checks_for_sigterm_once_a_round_not_every_step(tmp_path):
    # Lightning broadcasts rank 0's SIGTERM flag before every batch with several ranks: a per-step collective
    # that top-k exists to avoid. Under top-k it comes at the first batch of each round only.
    data = equal_length_file(tmp_path)  # 64 users: 4 steps of 8 per rank per epoch, 8 in 2 epochs
    launch(tmp_path, "sig", "data=file", f"data.path={data}", "data.max_len=12", "data.batch_size=8",
           "trainer=topk", "trainer.devices=2", "trainer.strategy.h=3", "trainer.strategy.k=2",
           "trainer.limit_val_batches=0", "+callbacks.bc._target_=ddp_probe.BroadcastCount", epochs=2)
    got = [json.load(open(tmp_path / "probe-sig" / f"broadcasts{r}.json")) for r in (0, 1)]
    # rounds end after steps 3 and 6, so batches 1, 4 and 7 start a round
    assert got[0] == got[1] == {"calls": 3, "steps": 8}
    launch(tmp_path, "sigddp", "data=file", f"data.path={data}", "data.max_len=12", "data.batch_size=8",
           "trainer=ddp", "trainer.devices=2", "trainer.limit_val_batches=0",
           "+callbacks.bc._target_=ddp_probe.BroadcastCount", epochs=2)
    assert json.load(open(tmp_path / "probe-sigddp" / "broadcasts0.json")) == {"calls": 8, "steps": 8}  # DDP: each


@pytest.mark.ddp
def test_warmup_rounds_come_every_warmup_h_steps_then_every_h(tmp_path):
    data = equal_length_file(tmp_path)  # 64 users: 4 steps of 8 per rank per epoch, 12 in 3 epochs
    _, log = launch(tmp_path, "warm", "data=file", f"data.path={data}", "data.max_len=12", "data.batch_size=8",
                    "trainer=topk", "trainer.devices=2", "trainer.strategy.k=2", "trainer.strategy.h=4",
                    "trainer.strategy.warmup_steps=3", "trainer.strategy.warmup_h=1",
                    "trainer.strategy.second_moment=global_batch",  # runs its path in 2 processes too
                    "trainer.limit_val_batches=0", epochs=3)
    rows = [json.loads(line) for line in open(next((tmp_path / "warm" / "runs").glob("*/*/topk_rounds.jsonl")))]
    # steps 1-3 are the warm-up (a round after each), then every 4 steps: 7 and 11; the run ends mid-round
    assert [(r["step"], r["reason"]) for r in rows] == [(1, "round"), (2, "round"), (3, "round"), (7, "round"),
                                                        (11, "round"), (12, "end of training")]
    with pytest.raises(ConfigError, match="trainer.strategy.warmup_h=0: expected a positive number"):
        TopKAveragingStrategy(warmup_h=0)
    with pytest.raises(ConfigError, match="trainer.strategy.warmup_steps"):
        TopKAveragingStrategy(warmup_steps=-1)


@pytest.mark.ddp
def test_topk_resume_mid_run_equals_an_uninterrupted_run(tmp_path):
    data = equal_length_file(tmp_path)
    common = ("data=file", f"data.path={data}", "model.dropout=0", "data.max_len=12", "data.batch_size=8",
              "trainer=topk", "trainer.devices=2", "trainer.strategy.h=3", "trainer.strategy.k=1",
              "trainer.strategy.outer_lr=0.8", "trainer.strategy.outer_momentum=0.5")  # the buffer must resume too
    full, _ = launch(tmp_path, "full", *common, "+callbacks.save._target_=ddp_probe.SaveCollectives", epochs=3)
    # a save communicates nothing: each rank writes its own state (rank 0's in the file)
    saves = [json.load(open(tmp_path / "probe-full" / f"save{r}.json")) for r in (0, 1)]
    assert saves[0]["saves"] >= 3 and saves[0] == saves[1] and saves[0]["calls"] == 0
    # no rank file outlives its checkpoint (the best checkpoint is replaced as validation improves)
    folder = next((tmp_path / "full" / "runs").glob("*/*/checkpoints"))
    ckpts = sorted(p.name for p in folder.glob("*.ckpt"))
    assert sorted(p.name for p in folder.glob("*.rank1")) == [f"{c}.rank1" for c in ckpts] and len(ckpts) >= 2
    launch(tmp_path, "part", *common, epochs=1)
    last = next((tmp_path / "part" / "runs").glob("*/*/checkpoints/last.ckpt"))
    ck = torch.load(last, weights_only=False)
    state = ck["topk_averaging"]
    assert state["round"] == 2 and state["world_size"] == 2 and "optimizer_states" not in state
    # rank 1's optimizer state is in its own file beside the checkpoint, written by rank 1 (no gather)
    own = torch.load(f"{last}.rank1", weights_only=True)
    assert own["rank"] == 1 and own["save_token"] == state["save_token"]
    assert any(b.abs().sum() > 0 for b in state["outer_buffers"])
    # ranks keep their own Adam moments: the two saved optimizer states differ
    m0, m1 = ck["optimizer_states"][0]["state"][0]["exp_avg"], own["optimizer_states"][0]["state"][0]["exp_avg"]
    assert not torch.equal(m0, m1)
    resumed, log = launch(tmp_path, "part2", *common, f"ckpt_path={last}", epochs=3)
    for r in (0, 1):
        assert max_diff(full[r]["params"], resumed[r]["params"]) < 1e-6
    assert resumed[0]["round"] == full[0]["round"] == 6


@pytest.mark.ddp
def test_topk_svrg_resume_from_a_mid_round_checkpoint_is_exact(tmp_path):
    # No validation, so last.ckpt is written in the middle of a round: the local models and this
    # round's snapshot gradient must come back, not a snapshot gradient recomputed on other batches.
    data = equal_length_file(tmp_path)
    common = ("data=file", f"data.path={data}", "model.dropout=0", "data.max_len=12", "data.batch_size=8",
              "trainer=topk", "trainer.devices=2", "trainer.strategy.h=3", "trainer.strategy.k=1",
              "trainer.limit_val_batches=0", "callbacks.model_checkpoint.monitor=null",
              "trainer.strategy.svrg=true", "trainer.strategy.svrg_batches=2")
    full, _ = launch(tmp_path, "full", *common, epochs=3)
    launch(tmp_path, "part", *common, epochs=1)
    last = next((tmp_path / "part" / "runs").glob("*/*/checkpoints/last.ckpt"))
    state = torch.load(last, weights_only=False)["topk_averaging"]
    assert state["steps_in_round"] > 0 and "local_state" in state and "svrg_mu" in state
    assert "local_state" in torch.load(f"{last}.rank1", weights_only=True)
    # kept aside: the resume goes on in the run's folder and rewrites last.ckpt
    ck, own = torch.load(last, weights_only=False), torch.load(f"{last}.rank1", weights_only=False)
    lone = tmp_path / "lone.ckpt"
    torch.save(ck, lone)
    resumed, _ = launch(tmp_path, "part2", *common, f"ckpt_path={last}", epochs=3)
    for r in (0, 1):
        assert max_diff(full[r]["params"], resumed[r]["params"]) < 1e-6
    # a checkpoint written before per-rank files (every rank's state gathered into it) resumes exactly too
    ck["topk_averaging"]["optimizer_states"] = [[ck["optimizer_states"][0], own["optimizer_states"][0]]]
    ck["topk_averaging"]["local_states"] = [ck["topk_averaging"].pop("local_state"), own["local_state"]]
    old = tmp_path / "old.ckpt"
    torch.save(ck, old)
    resumed, _ = launch(tmp_path, "part3", *common, f"ckpt_path={old}", epochs=3)
    for r in (0, 1):
        assert max_diff(full[r]["params"], resumed[r]["params"]) < 1e-6
    # without rank 1's file every rank starts a new round from the global model and rank 0's Adam state: said
    # in one line, and the run goes on (no rank waits for a round the others do not run)
    resumed, log = launch(tmp_path, "part4", *common, f"ckpt_path={lone}", epochs=3)
    assert "lone.ckpt.rank1 is missing" in log and "this resume is not exact" in log
    assert resumed[0]["round"] == resumed[1]["round"] > 0


def test_topk_svrg_through_lightning_corrects_the_gradient_to_mu_at_the_snapshot(tmp_path, monkeypatch):
    from lightning_rec.cli import run

    monkeypatch.setenv("PROBE_DIR", str(tmp_path))
    monkeypatch.setenv("PROBE_FREEZE", "1")  # with a frozen item embedding, which SVRG must skip
    base = ["model.dropout=0", "trainer=topk", "trainer.devices=1", "trainer.strategy.svrg=true",
            "trainer.strategy.h=1000", "+callbacks.probe._target_=ddp_probe.SvrgProbe", "test_after_fit=false"]
    run(["fit", *tiny(tmp_path / "a", *base, epochs=1)])
    got = json.load(open(tmp_path / "svrg.json"))
    # First local step: w == w~, so g(w) - g(w~) + mu is mu, exactly.
    assert got["max_diff"] == 0.0 and got["max_mu"] > 0 and got["n"] == got["n_params"] - 1
    with pytest.raises(ConfigError, match="svrg=true: does not work with trainer.accumulate_grad_batches>1"):
        run(["fit", *tiny(tmp_path / "b", *base, "+trainer.accumulate_grad_batches=2", epochs=1)])


def test_average_state_goes_on_after_a_switch_to_sgd(tmp_path, caplog, monkeypatch):
    import logging

    from lightning_rec.cli import run

    caplog.set_level(logging.INFO)
    # the logger rank_zero_info writes to, at INFO whatever an earlier test in this process left it at
    caplog.set_level(logging.INFO, logger="pytorch_lightning.utilities.rank_zero")
    for key in ("MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    out = run(["fit", *tiny(tmp_path, "trainer=topk", "trainer.devices=1", "trainer.strategy.h=4",
                            "trainer.strategy.average_state=[exp_avg_sq]", "callbacks=swats",
                            "callbacks.optimizer_switch.mode=scheduled", "callbacks.optimizer_switch.at_epoch=1",
                            "callbacks.optimizer_switch.sgd_lr=0.1", "test_after_fit=false", epochs=2)])
    assert out["epochs"] == 2
    assert "the optimizer now keeps ['momentum_buffer'], not ['exp_avg_sq']" in caplog.text
    # The in-process fit closed its process group and gave its port back: a later multi-process
    # launch from this process (its children inherit the environment) must not find it taken.
    assert not torch.distributed.is_initialized()
    assert not {"MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE"} & set(os.environ)
    with pytest.raises(ConfigError, match=re.escape("average_state=['exp_avg_sqq']: no optimizer state")):
        run(["fit", *tiny(tmp_path / "typo", "trainer=topk", "trainer.devices=1", "trainer.strategy.h=4",
                          "trainer.strategy.average_state=[exp_avg_sqq]", epochs=1)])


@pytest.mark.ddp
def test_torchrun_launch_shares_one_run_folder(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "lightning_rec"]
    w, log = launch(tmp_path, "tr", "trainer=ddp", "trainer.devices=2", epochs=1, launcher=torchrun)
    assert sorted(w) == [0, 1] and max_diff(w[0]["params"], w[1]["params"]) == 0.0
    runs = list((tmp_path / "tr" / "runs").glob("*/*"))
    assert len(runs) == 1 and runs[0].name.startswith("torchrun-"), runs
    assert (runs[0] / "checkpoints" / "last.ckpt").exists() and (runs[0] / "config.yaml").exists()


@pytest.mark.ddp
def test_project_callbacks_under_ddp_and_topk(tmp_path):
    """Rocket's hint loss under DDP, stacking under top-k: ranks stay identical, the stack reaches every rank."""
    rocket, _ = launch(tmp_path, "rocket", "model=rocket", "callbacks=rocket", "trainer=ddp", "trainer.devices=2",
                       "model.booster.d_model=16", "model.light.d_model=16", epochs=1)
    assert max_diff(rocket[0]["params"], rocket[1]["params"]) == 0.0
    stacked, log = launch(tmp_path, "stack", "model=nextitnet", "model.num_blocks=2", "callbacks=stacking",
                          "callbacks.stacking.at_epochs=[1]", "trainer=topk", "trainer.devices=2",
                          "trainer.strategy.h=2", epochs=2)
    assert "2 -> 4 blocks" in log
    assert max_diff(stacked[0]["params"], stacked[1]["params"]) == 0.0
    assert sum(".blocks.3." in n for n in stacked[0]["params"]) > 0


def test_noisy_rank_options_are_checked():
    from lightning_rec.methods.topk import NoisyRankCallback

    with pytest.raises(ConfigError, match="callbacks.noisy_rank.mode=loud"):
        NoisyRankCallback(mode="loud")



@pytest.mark.ddp
def test_a_stack_inside_a_topk_round_stacks_the_rounds_selected_model(tmp_path, monkeypatch):
    # k=1 of 2 ranks, rank 0 made noisy: the round's selection takes rank 1. A stack before step 2 falls inside a
    # round of h=3; it must end the round first (stacking the selected model), not adopt rank 0's local model.
    data = equal_length_file(tmp_path)
    monkeypatch.setenv("PROBE_STEP", "2")  # the probe saves the weights around the stack before step 2
    _, log = launch(tmp_path, "stackmid", "data=file", f"data.path={data}", "data.max_len=12", "data.batch_size=8",
                    "model=nextitnet", "model.num_blocks=2", "callbacks=stacking", "callbacks.stacking.at_steps=[2]",
                    "trainer=topk", "trainer.devices=2", "trainer.strategy.h=3", "trainer.strategy.k=1",
                    "trainer.limit_val_batches=0", "trainer.max_steps=3",
                    "+callbacks.noisy_rank._target_=lightning_rec.methods.topk.NoisyRankCallback",
                    "+callbacks.noisy_rank.rank=0", "+callbacks.noisy_rank.mode=lr_scale",
                    "+callbacks.noisy_rank.lr_scale=30",
                    "+callbacks.stackprobe._target_=ddp_probe.StackRoundProbe", epochs=1)
    probe = tmp_path / "probe-stackmid"
    before = [torch.load(probe / f"before{r}.pt", weights_only=False) for r in (0, 1)]
    after = [torch.load(probe / f"after{r}.pt", weights_only=False) for r in (0, 1)]
    assert "2 -> 4 blocks" in log
    last = after[0]["history"][-1]
    assert (last["step"], last["reason"], last["chosen"]) == (2, "stack at step:2", [1]), after[0]["history"]
    assert max_diff(after[0]["params"], after[1]["params"]) == 0.0
    kept = [n for n in before[1]["params"] if ".blocks." not in n and not n.startswith("output.")]
    kept += [n for n in before[1]["params"] if ".blocks.0." in n]  # adjacent stacking: new block 0 is old block 0
    assert kept and any("item_embedding" in n for n in kept)
    chosen, rank0 = ({n: b["params"][n] for n in kept} for b in (before[1], before[0]))
    assert max_diff(chosen, {n: after[0]["params"][n] for n in kept}) == 0.0  # the selected model, stacked
    assert max_diff(rank0, chosen) > 1e-3  # rank 0's local model is a different one
