"""AdaShift against a hand computation, the SWATS estimate, and the optimizer switch in real runs."""

import copy
import json
import math
import os
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from conftest import fit_in_processes, tiny
from pytorch_lightning.strategies import SingleDeviceStrategy

from lightning_rec.cli import run
from lightning_rec.errors import ConfigError
from lightning_rec.methods.optim_switch import OptimizerSwitchCallback
from lightning_rec.methods.optim_switch.optim import AdaShift, PerGroupSwitch, SwatsEstimate, swats_gamma

GRADS = [[0.5, -1.0], [2.0, 0.25], [-1.0, 1.0], [0.1, 3.0], [1.5, -0.5]]


def run_adashift(**kw):
    x = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = AdaShift([x], **kw)
    seen = []
    for g in GRADS:
        x.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        seen.append(x.detach().clone().tolist())
    return seen


def test_adashift_first_steps_by_hand():
    lr, b1, b2, n = 0.1, 0.5, 0.9, 2
    seen = run_adashift(lr=lr, betas=(b1, b2), n=n, reduction="none", eps=0.0)
    assert seen[0] == seen[1] == [1.0, -2.0]  # no update while the window of n = 2 gradients fills
    x = [1.0, -2.0]
    v = [0.0, 0.0]
    for t in range(2, 5):  # steps 3, 4, 5 (0-based t): shift out g_{t-2}
        k = t - 1
        for j in range(2):
            v[j] = b2 * v[j] + (1 - b2) * GRADS[t - 2][j] ** 2
            m = (GRADS[t][j] + b1 * GRADS[t - 1][j]) / (1 + b1)
            x[j] -= lr * m / math.sqrt(v[j] / (1 - b2**k))
        assert seen[t] == pytest.approx(x, rel=1e-12), t


def test_adashift_max_reduction_and_max_of_last_q_by_hand():
    lr, b1, b2 = 0.1, 0.5, 0.9
    seen = run_adashift(lr=lr, betas=(b1, b2), n=2, reduction="max", eps=0.0)
    # step 3: v = (1 - b2) * max(g1^2) = 0.1 * 1.0 (one value for the whole tensor), bias-corrected -> 1.0
    m = [(GRADS[2][j] + b1 * GRADS[1][j]) / (1 + b1) for j in range(2)]
    assert seen[2] == pytest.approx([1.0 - lr * m[0] / 1.0, -2.0 - lr * m[1] / 1.0], rel=1e-12)
    # the paper's variant: largest of the last q = 2 shifted squared gradients (element-wise)
    q = run_adashift(lr=lr, betas=(b1, b2), n=1, reduction="none", second_moment="max_last_q", q=2, eps=0.0)
    x, v = [1.0, -2.0], [0.0, 0.0]
    for t in range(1, 5):  # n = 1: step t shifts out g_{t-1}
        k = t
        for j in range(2):
            window = [GRADS[i][j] ** 2 for i in range(max(0, t - 2), t)]  # last q shifted gradients
            v[j] = b2 * v[j] + (1 - b2) * max(window)
            x[j] -= lr * GRADS[t][j] / math.sqrt(v[j] / (1 - b2**k))
        assert q[t] == pytest.approx(x, rel=1e-12), t


@pytest.mark.parametrize("bias_correction", [False, True])
def test_adashift_chen2021_is_the_papers_equation_11_by_hand(bias_correction):
    # V_z = b2 V_{z-q} + (1 - b2) max{R^2_{z-q} .. R^2_z}; M_z = sum_i b1^i R_{z-i} / sum_i b1^i over the same q + 1
    grads = [[0.5, -1.0], [2.0, 0.25], [-1.0, 1.0], [0.1, 3.0], [1.5, -0.5], [-0.3, 0.2], [0.7, -2.0]]
    lr, b1, b2, q = 0.1, 0.5, 0.9, 2
    x = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = AdaShift([x], lr=lr, betas=(b1, b2), q=q, n=99, reduction="none", second_moment="chen2021", eps=0.0,
                   bias_correction=bias_correction)
    seen = []
    for g in grads:
        x.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        seen.append(x.detach().clone().tolist())
    assert seen[0] == seen[1] == [1.0, -2.0]  # q + 1 = 3 gradients are needed (n is not used)
    # written out for element j, steps z = 2..6 (0-based); V_{z-2} exists from z = 4 on
    want, v, k = [1.0, -2.0], {}, {}
    for z in range(2, 7):
        for j in range(2):
            phi = max(grads[z][j] ** 2, grads[z - 1][j] ** 2, grads[z - 2][j] ** 2)
            v[z, j] = b2 * v.get((z - 2, j), 0.0) + (1 - b2) * phi
            k[z, j] = k.get((z - 2, j), 0) + 1
            m = (grads[z][j] + b1 * grads[z - 1][j] + b1**2 * grads[z - 2][j]) / (1 + b1 + b1**2)
            vhat = v[z, j] / (1 - b2 ** k[z, j]) if bias_correction else v[z, j]
            want[j] -= lr * m / math.sqrt(vhat)
        assert seen[z] == pytest.approx(want, rel=1e-12), z
    # z = 4 is the first step with a V two steps back: 0.9 * V_2 + 0.1 * phi_4, element 0: phi_2 = 4, phi_4 = 2.25
    assert v[4, 0] == pytest.approx(0.9 * 0.4 + 0.225)


def test_adashift_chen2021_state_survives_a_checkpoint_round_trip():
    grads = [torch.randn(3, 2, dtype=torch.float64) for _ in range(8)]

    def run(split):
        torch.manual_seed(0)
        x = torch.nn.Parameter(torch.ones(3, 2, dtype=torch.float64))
        opt = AdaShift([x], lr=0.05, q=3, second_moment="chen2021", reduction="row_max")
        for i, g in enumerate(grads):
            if i == split:
                state = opt.state_dict()
                x2 = torch.nn.Parameter(x.detach().clone())
                opt = AdaShift([x2], lr=0.05, q=3, second_moment="chen2021", reduction="row_max")
                opt.load_state_dict(state)
                x = x2
            x.grad = g.clone()
            opt.step()
        return x.detach()

    assert torch.equal(run(split=-1), run(split=5))


def test_adashift_row_max_gives_each_row_its_own_scale_by_hand():
    # A 2 x 2 table (rows = items) and a bias; row 1 has no gradient at step 0, so at step 1 it has no
    # scale yet and must not move although its gradient is non-zero; the bias is reduced as a whole.
    lr, b2 = 0.1, 0.9
    grads = [[[1.0, -2.0], [0.0, 0.0]], [[0.5, 0.5], [3.0, -1.0]], [[-1.0, 0.25], [0.5, 2.0]], [[2.0, 1.0], [-1.0, 1.0]]]
    bias_grads = [[0.5, -1.0], [2.0, 0.25], [-1.0, 1.0], [0.1, 3.0]]
    w = torch.nn.Parameter(torch.tensor([[1.0, -1.0], [2.0, 0.5]], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([0.0, 1.0], dtype=torch.float64))
    opt = AdaShift([w, b], lr=lr, betas=(0.0, b2), n=1, reduction="row_max", eps=0.0)
    x, xb = [[1.0, -1.0], [2.0, 0.5]], [0.0, 1.0]
    v, vb = [0.0, 0.0], 0.0
    for t, (g, gb) in enumerate(zip(grads, bias_grads)):
        w.grad, b.grad = torch.tensor(g, dtype=torch.float64), torch.tensor(gb, dtype=torch.float64)
        opt.step()
        if t >= 1:  # n = 1: step t shifts out g_{t-1}; beta1 = 0 makes m = g_t
            k = t
            for r in range(2):
                v[r] = b2 * v[r] + (1 - b2) * max(e * e for e in grads[t - 1][r])
                if v[r] > 0:  # a row with no scale yet does not move
                    x[r] = [x[r][j] - lr * g[r][j] / math.sqrt(v[r] / (1 - b2**k)) for j in range(2)]
            vb = b2 * vb + (1 - b2) * max(e * e for e in bias_grads[t - 1])
            xb = [xb[j] - lr * gb[j] / math.sqrt(vb / (1 - b2**k)) for j in range(2)]
        assert w.detach().tolist() == [pytest.approx(row, rel=1e-12) for row in x], t
        assert b.detach().tolist() == pytest.approx(xb, rel=1e-12), t
        if t == 1:
            assert w.detach()[1].tolist() == [2.0, 0.5] and w.detach()[0].tolist() != [1.0, -1.0]
    assert w.detach()[1].tolist() != [2.0, 0.5]  # row 1 moved once it had a scale
    # the whole-tensor max would have given row 1 row 0's scale at step 1
    w3 = torch.nn.Parameter(torch.tensor([[1.0, -1.0], [2.0, 0.5]], dtype=torch.float64))
    opt3 = AdaShift([w3], lr=lr, betas=(0.0, b2), n=1, reduction="max")
    for g in grads[:2]:
        w3.grad = torch.tensor(g, dtype=torch.float64)
        opt3.step()
    assert w3.detach()[1].tolist() != [2.0, 0.5]


@pytest.mark.parametrize("reduction", ["max", "none"])
def test_adashift_waits_for_a_non_zero_shifted_gradient(reduction):
    """Behind a zero-initialised residual weight a block's first gradients are exactly 0.

    The first shifted gradient that is non-zero is the one of step 3 (0-based 2); with n = 1 it is
    shifted out at step 4, which is the first update. Before that, v would be 0 and the newer
    non-zero gradients would be divided by eps (the step that sent AdaShift to NaN on SASRec).
    """
    lr, b2 = 0.1, 0.9
    x = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = AdaShift([x], lr=lr, betas=(0.0, b2), n=1, reduction=reduction, eps=1e-8)
    grads = [[0.0, 0.0], [0.0, 0.0], [0.5, -1.0], [0.2, 0.4]]
    seen = []
    for g in grads:
        x.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        seen.append(x.detach().clone().tolist())
    assert seen[0] == seen[1] == seen[2] == [1.0, -2.0]  # no step while every shifted gradient was 0
    # step 4: v = (1 - b2) phi(g_3^2), k = 1, so vhat = phi(g_3^2); m = g_4 (beta1 = 0)
    vhat = [1.0, 1.0] if reduction == "max" else [0.25, 1.0]
    expect = [[1.0, -2.0][j] - lr * grads[3][j] / (math.sqrt(vhat[j]) + 1e-8) for j in range(2)]
    assert seen[3] == pytest.approx(expect, rel=1e-9)


def test_adashift_element_without_a_scale_does_not_move():
    x = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = AdaShift([x], lr=0.1, betas=(0.0, 0.9), n=1, reduction="none")
    for g in ([1.0, 0.0], [1.0, 3.0]):  # entry 1's shifted gradient is 0 at the first update
        x.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    assert x[1].item() == 0.0 and x[0].item() == pytest.approx(-0.1)


def test_adashift_state_survives_a_checkpoint_round_trip():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(3))
    opt = AdaShift([a], lr=0.01, n=3)
    for _ in range(5):
        a.grad = torch.randn(3)
        opt.step()
    sd = torch.load(_save(opt.state_dict()), weights_only=True)
    b = torch.nn.Parameter(a.detach().clone())
    opt2 = AdaShift([b], lr=0.01, n=3)
    opt2.load_state_dict(sd)
    g = torch.randn(3)
    a.grad, b.grad = g.clone(), g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(a, b)


def _save(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_bad_adashift_settings():
    with pytest.raises(ConfigError, match="optimizer.reduction=mean"):
        AdaShift([torch.nn.Parameter(torch.zeros(1))], reduction="mean")
    with pytest.raises(ConfigError, match="mode=scheduled needs at_step or at_epoch"):
        OptimizerSwitchCallback(mode="scheduled")


# ---------------------------------------------------------------------- SWATS
def test_swats_gamma_recovers_the_sgd_rate_of_an_sgd_step():
    g = torch.tensor([0.3, -1.2, 2.0])
    assert swats_gamma(-0.05 * g, g) == pytest.approx(0.05, rel=1e-6)  # float32 inputs
    assert swats_gamma(torch.zeros(3), g) is None


def test_swats_estimate_by_hand():
    e = SwatsEstimate(beta2=0.9, rtol=1e-6)
    assert not e.update(0.3)  # never at k = 1
    assert e.value == pytest.approx(0.3)
    assert not e.update(0.5)
    ema = 0.9 * (0.1 * 0.3) + 0.1 * 0.5
    assert e.value == pytest.approx(ema / (1 - 0.81))
    c = SwatsEstimate(beta2=0.999)
    assert not c.update(0.05) and c.update(0.05)  # a constant projection has converged at k = 2


def test_swats_on_a_quadratic_where_the_answer_is_known():
    """Adam on f(x) = a/2 ||x||^2 with one coordinate: gamma_k = -p_k / g_k, computed here by hand."""
    a, lr, b1, b2, eps = 2.0, 0.1, 0.9, 0.999, 1e-8
    x = torch.nn.Parameter(torch.tensor([3.0], dtype=torch.float64))
    opt = torch.optim.Adam([x], lr=lr, betas=(b1, b2), eps=eps)
    est = SwatsEstimate(beta2=b2)
    m = v = 0.0
    xv = 3.0
    ema = 0.0
    for k in range(1, 6):
        g = a * xv
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        step = -lr * (m / (1 - b1**k)) / (math.sqrt(v / (1 - b2**k)) + eps)
        gamma = -step / g
        ema = b2 * ema + (1 - b2) * gamma
        before = x.detach().clone()
        x.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
        est.update(swats_gamma(x.detach() - before, x.grad))
        xv += step
        assert est.gamma == pytest.approx(gamma, rel=1e-9)
        assert est.value == pytest.approx(ema / (1 - b2**k), rel=1e-9)


# ---------------------------------------------------------------------- in real runs
def _ckpt(out, name="last.ckpt"):
    return torch.load(os.path.join(out["run_dir"], "checkpoints", name), weights_only=True)


def _switch_state(ck):
    return next(v for k, v in ck["callbacks"].items() if k.startswith("OptimizerSwitchCallback"))


def test_a_run_that_never_switches_says_so(monkeypatch):
    from types import SimpleNamespace

    import lightning_rec.methods.optim_switch.callback as mod

    said = []
    monkeypatch.setattr(mod, "rank_zero_info", said.append)
    trainer = SimpleNamespace(global_step=40, current_epoch=2)  # Lightning's value after 2 completed epochs
    auto = OptimizerSwitchCallback(min_steps=100)
    auto.estimates = [SwatsEstimate(0.999, 1e-6)]
    auto.estimates[0].update(0.25)
    auto.on_train_end(trainer, None)
    assert "no switch in 40 steps" in said[-1] and "estimate 0.25" in said[-1] and "deadline_epoch" in said[-1]
    sched = OptimizerSwitchCallback(mode="scheduled", at_epoch=5)
    for epoch in (0, 1):
        sched.on_train_epoch_start(SimpleNamespace(current_epoch=epoch), None)
    sched.on_train_end(trainer, None)
    assert "scheduled at epoch 5): not reached in 40 steps (2 epochs)" in said[-1]
    switched = OptimizerSwitchCallback(mode="scheduled", at_epoch=1)
    switched.phases = ["sgd"]
    switched.on_train_end(trainer, None)
    assert len(said) == 2


@pytest.mark.parametrize("clip", [None, 0.001])
def test_automatic_switch_recovers_the_rate_of_a_plain_sgd_phase(tmp_path, clip, monkeypatch):
    # SGD without momentum as the "adaptive" phase: every step is -lr * g, so SWATS must estimate lr.
    # With clipping (0.001 clips every step), g is the clipped gradient the optimizer stepped with.
    extra = [f"trainer.gradient_clip_val={clip}"] if clip else []
    import lightning_rec.methods.optim_switch.callback as switch_module

    said = []  # Lightning's own logger may not propagate to caplog in a full run: read the call itself
    monkeypatch.setattr(switch_module, "rank_zero_info", lambda msg, *a, **k: said.append(str(msg)))
    out = run(["fit", *tiny(tmp_path, "optimizer=sgd", "optimizer.momentum=0", "optimizer.lr=0.05", "callbacks=swats",
                           "callbacks.optimizer_switch.min_steps=3", "callbacks.optimizer_switch.rtol=1e-4",
                           "test_after_fit=false", *extra, epochs=1)])
    assert any("with optimizer=sgd: the first phase is already SGD" in m for m in said)
    st = _switch_state(_ckpt(out))
    assert st["phase"] == "sgd" and st["switch_step"] == 3 and st["switches"] == 1
    # clipped steps are ~1e-6 per weight, so float32 rounding of the step costs precision
    assert st["lrs"][0] == pytest.approx(0.05, rel=1e-3 if clip else 1e-4)


class ExchangingStrategy(SingleDeviceStrategy):
    """Moves the weights after every third optimizer step, as top-k averaging's exchange does after the
    optimizer (here: halfway to zero, an outer step of 0.5 towards a zero average)."""

    def __init__(self):
        super().__init__(device="cpu")
        self.steps = 0

    def optimizer_step(self, optimizer, closure, model=None, **kwargs):
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        self.steps += 1
        if self.steps % 3 == 0:
            with torch.no_grad():
                for p in self.lightning_module.parameters():
                    p.mul_(0.5)
        return out


class GammaRecorder(pl.Callback):
    def __init__(self):
        self.gammas = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        sw = next(c for c in trainer.callbacks if isinstance(c, OptimizerSwitchCallback))
        if sw.estimates and sw.phase == "adaptive":
            self.gammas.append(sw.estimates[0].gamma)


def test_swats_measures_the_optimizers_own_step_not_a_strategys_exchange(tmp_path, monkeypatch):
    # plain SGD at lr 0.05: the optimizer's own step gives gamma = 0.05 at every step, exchange steps included
    rec = GammaRecorder()
    from lightning_rec.build import build_callbacks as real_build

    def with_recorder(conf, what):
        return [*real_build(conf, what), rec]

    import lightning_rec.cli.fit as fit_module

    monkeypatch.setattr(fit_module, "build_callbacks", with_recorder)
    run(["fit", *tiny(tmp_path, "optimizer=sgd", "optimizer.momentum=0", "optimizer.lr=0.05", "callbacks=swats",
                      "callbacks.optimizer_switch.min_steps=1000",
                      f"+trainer.strategy._target_={__name__}.ExchangingStrategy", "test_after_fit=false", epochs=1)])
    assert len(rec.gammas) >= 6  # exchange steps among them
    assert rec.gammas == pytest.approx([0.05] * len(rec.gammas), rel=1e-4)


def test_scheduled_switch_builds_sgd_with_the_given_rate_and_a_stack_keeps_it(tmp_path):
    out = run(["fit", *tiny(tmp_path, "model=nextitnet", "model.num_blocks=2", "callbacks=swats",
                           "callbacks.optimizer_switch.mode=scheduled", "callbacks.optimizer_switch.at_epoch=1",
                           "callbacks.optimizer_switch.sgd_lr=0.2",
                           "+callbacks.stacking._target_=lightning_rec.methods.stackrec.StackingCallback",
                           "+callbacks.stacking.at_epochs=[2]", "test_after_fit=false", epochs=3)])
    ck = _ckpt(out)
    opt = ck["optimizer_states"][0]
    group = opt["param_groups"][0]
    assert (group["swats_phase"], group["swats_rate"], group["swats_momentum"]) == ("sgd", 0.2, 0.9)
    assert {k for st in opt["state"].values() for k in st} == {"momentum_buffer"}  # no Adam moments left
    assert ck["hyper_parameters"]["num_blocks"] == 4  # stacked after the switch, still SGD
    n_params = sum(v.numel() for k, v in ck["state_dict"].items() if not k.startswith(("val_", "test_")))
    assert len(group["params"]) == len([k for k in ck["state_dict"] if not k.startswith(("val_", "test_"))])
    assert n_params > 0 and _switch_state(ck)["switches"] == 1


@pytest.mark.parametrize("sgd_lr", [None, 0.2])
def test_scheduled_switch_at_a_step(tmp_path, sgd_lr):
    extra = [f"callbacks.optimizer_switch.sgd_lr={sgd_lr}"] if sgd_lr else []
    out = run(["fit", *tiny(tmp_path, "callbacks=swats", "callbacks.optimizer_switch.mode=scheduled",
                           "callbacks.optimizer_switch.at_step=3", *extra, "test_after_fit=false", epochs=1)])
    st = _switch_state(_ckpt(out))
    assert st["phase"] == "sgd" and st["switch_step"] == 3 and st["switches"] == 1
    if sgd_lr:
        assert st["lrs"] == [sgd_lr]


@pytest.mark.parametrize("mine,rank0", [(None, [0.1]), ([0.3], [None])])
def test_rank_zero_decides_the_switch_for_every_rank(mine, rank0):
    # Under top-k averaging each rank has its own SWATS estimate; rank 1 (here) must follow rank 0
    # both ways, and take part in the broadcast either way, or the ranks' collectives fall out of step.
    calls = []

    class Strategy:
        def broadcast(self, obj, src=0):
            calls.append(obj)
            return rank0

        def setup_optimizers(self, trainer):
            pass

    p = torch.nn.Parameter(torch.zeros(2))
    opt = PerGroupSwitch(torch.optim.Adam([p]))
    trainer = SimpleNamespace(optimizers=[opt], strategy=Strategy(), global_step=5, current_epoch=0, loggers=[])
    module = SimpleNamespace(hparams=SimpleNamespace(optimizer={"name": "adam", "lr": 1e-3}))
    cb = OptimizerSwitchCallback(min_steps=1)
    cb.estimates = [SwatsEstimate(0.999, 1e-6)]
    if mine:
        cb.estimates[0].update(mine[0])
    cb._switch(trainer, module, "test")
    assert calls == [mine or [None]]  # each group's rate, or None for "not yet"
    assert (cb.phase, cb.lrs, cb._pending) == (("sgd", rank0, set()) if rank0[0] else ("adaptive", [None], {0}))
    assert opt.phases() == [cb.phase]


@pytest.mark.parametrize("stop_after,adaptive", [
    (2, ["optimizer=adam"]),  # interrupted before the switch (step 17): the SWATS estimate must carry over
    (3, ["optimizer=adashift", "optimizer.n=3", "callbacks.optimizer_switch.sgd_lr=0.1"]),  # after it: SGD's momentum
])
def test_resume_on_either_side_of_the_switch_is_exact(tmp_path, stop_after, adaptive):
    common = [*adaptive, "trainer.deterministic=true", "callbacks=swats",
              "callbacks.optimizer_switch.min_steps=1000", "callbacks.optimizer_switch.deadline_step=17"]
    full = run(["fit", *tiny(tmp_path / "a", *common, epochs=4)])
    run(["fit", *tiny(tmp_path / "b", *common, "test_after_fit=false", epochs=stop_after)])
    resumed = run(["fit", *tiny(tmp_path / "b", *common, "ckpt_path=last", epochs=4)])
    a, b = _ckpt(full), _ckpt(resumed)
    assert _switch_state(a)["switch_step"] == _switch_state(b)["switch_step"] == 17
    assert _switch_state(a)["lrs"] == _switch_state(b)["lrs"]  # the estimate carried across the interruption
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=0, msg=k)
    assert resumed["test"] == full["test"]


@pytest.mark.ddp
def test_two_ddp_ranks_switch_once_at_the_same_step(tmp_path):
    probe = fit_in_processes(tmp_path, "callbacks=swats", "trainer.devices=2", "trainer.strategy=ddp",
                             "callbacks.optimizer_switch.min_steps=2", "callbacks.optimizer_switch.rtol=0.05",
                             "callbacks.optimizer_switch.deadline_step=6", "+callbacks.probe._target_=ddp_probe.SwitchProbe",
                             "test_after_fit=false", epochs=2)
    r0, r1 = (json.load(open(probe / f"switch{r}.json")) for r in (0, 1))
    assert r0["switches"] == r1["switches"] == 1
    assert r0["switch_step"] == r1["switch_step"] and r0["switch_step"] <= 6
    assert r0["lrs"] == r1["lrs"] and r0["group_phases"] == r1["group_phases"] == ["sgd"]
    for k in r0["state"]:
        assert abs(r0["state"][k] - r1["state"][k]) < 1e-5, k


# ---------------------------------------------------------------------- per parameter group
def test_per_group_switch_steps_each_group_as_adam_or_as_swats_sgd_and_round_trips():
    # group 0 stays Adam; group 1 (weight decay 0.1) switches to SWATS's SGD: torch SGD at lr (1 - mu) * rate
    torch.manual_seed(0)
    grads = [(torch.randn(3), torch.randn(2)) for _ in range(8)]

    def make():
        a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
        opt = PerGroupSwitch(torch.optim.Adam([{"params": [a]}, {"params": [b], "weight_decay": 0.1}], lr=0.01))
        return a, b, opt

    a, b, opt = make()
    ra, rb = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    adam, adam_b = torch.optim.Adam([ra], lr=0.01), torch.optim.Adam([rb], lr=0.01, weight_decay=0.1)
    ref_b = adam_b  # group 1 is Adam until the switch
    for k, (ga, gb) in enumerate(grads):
        if k == 2:
            opt.switch_group(1, 0.5, 0.9, nesterov=True)
            ref_b = torch.optim.SGD([rb], lr=(1 - 0.9) * 0.5, momentum=0.9, weight_decay=0.1, nesterov=True)
        if k == 4:
            saved = (copy.deepcopy(opt.state_dict()), a.detach().clone(), b.detach().clone())
        a.grad, b.grad, ra.grad, rb.grad = ga, gb, ga.clone(), gb.clone()
        opt.step()
        adam.step()
        ref_b.step()
        torch.testing.assert_close(a.detach(), ra.detach(), rtol=0, atol=0)
        torch.testing.assert_close(b.detach(), rb.detach(), rtol=1e-6, atol=1e-7)
    assert opt.phases() == ["adaptive", "sgd"] and set(opt.state[b]) == {"momentum_buffer"}
    state, a0, b0 = saved  # a checkpoint taken mid-way, loaded into a fresh optimizer, goes on identically
    a2, b2, opt2 = make()
    with torch.no_grad():
        a2.copy_(a0)
        b2.copy_(b0)
    opt2.load_state_dict(state)
    for ga, gb in grads[4:]:
        a2.grad, b2.grad = ga, gb
        opt2.step()
    assert opt2.phases() == ["adaptive", "sgd"]
    assert torch.equal(a2, a) and torch.equal(b2, b)


TWO_GROUPS = ["optimizer=sgd", "optimizer.momentum=0", "optimizer.lr=0.05", "optimizer.weight_decay=0.1",
              "+optimizer.no_weight_decay=[*ln*,*norm*,*bias]", "callbacks=swats",
              "callbacks.optimizer_switch.min_steps=3", "callbacks.optimizer_switch.rtol=1e-4",
              "callbacks.optimizer_switch.deadline_step=10", "trainer.deterministic=true"]


def test_each_parameter_group_switches_on_its_own_criterion_at_its_own_rate(tmp_path):
    # Plain SGD at lr 0.05 as the first phase. The no-weight-decay group steps along -0.05 g exactly: its estimate
    # settles at 0.05 and it switches at min_steps (3). The other group's steps include the decay 0.1 w, which its
    # gradient does not: its gamma wanders, it does not settle and switches at the deadline (10) at its own rate.
    out = run(["fit", *tiny(tmp_path, *TWO_GROUPS, "test_after_fit=false", epochs=2)])
    ck = _ckpt(out)
    st = _switch_state(ck)
    assert st["phases"] == ["sgd", "sgd"] and st["switch_steps"] == [10, 3] and st["switches"] == 2
    assert st["lrs"][1] == pytest.approx(0.05, rel=1e-4)
    assert abs(st["lrs"][0] - 0.05) > 1e-3  # its own rate, not the other group's
    groups = ck["optimizer_states"][0]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [g["swats_rate"] for g in groups] == st["lrs"]


def test_resume_between_two_groups_switches_is_exact(tmp_path):
    # interrupted after epoch 1 (7 steps): group 1 is in SGD (since step 3), group 0 still in the adaptive phase
    full = run(["fit", *tiny(tmp_path / "a", *TWO_GROUPS, epochs=3)])
    first = run(["fit", *tiny(tmp_path / "b", *TWO_GROUPS, "test_after_fit=false", epochs=1)])
    assert _switch_state(_ckpt(first))["phases"] == ["adaptive", "sgd"]
    resumed = run(["fit", *tiny(tmp_path / "b", *TWO_GROUPS, "ckpt_path=last", epochs=3)])
    a, b = _ckpt(full), _ckpt(resumed)
    assert _switch_state(a) == _switch_state(b)
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=0, msg=k)
    assert resumed["test"] == full["test"]


def test_no_weight_decay_patterns_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"optimizer.no_weight_decay=\['\*nothing\*'\]: matches no parameter"):
        run(["fit", *tiny(tmp_path, "+optimizer.no_weight_decay=[*nothing*]", epochs=1)])
