"""Rocket Launching and distillation: loss terms, the gradient block, export, resume, KD from a teacher."""

import csv
import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny

from lightning_rec import RocketModule, SeqRecModule
from lightning_rec.cli import run
from lightning_rec.errors import ConfigError
from lightning_rec.losses import candidate_logits, masked_ce
from lightning_rec.losses.distill import HintSpec, hint_kl, hint_mse, hint_mse_centered, joint_losses
from lightning_rec.methods.rocket import HintLossCallback
from lightning_rec.metrics import full_ranks

N = 30


def rocket(**kw):
    kw.setdefault("booster", {"arch": "sasrec", "d_model": 16, "num_blocks": 2, "num_heads": 2, "dropout": 0.0,
                              "residual_alpha": False})
    kw.setdefault("light", {"arch": "nextitnet", "d_model": 16, "num_blocks": 1, "dropout": 0.0, "residual_alpha": False})
    return RocketModule(num_items=N, max_len=12, **kw)


def batch(b=4, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, N + 1, (b, t + 1), generator=g)
    seq[0, :5] = 0  # some left padding
    return {"inputs": seq[:, :-1], "targets": torch.where(seq[:, :-1] == 0, 0, seq[:, 1:])}


# ---------------------------------------------------------------------- loss terms by hand
def test_hint_terms_against_hand_computation():
    zs = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
    zt = torch.tensor([[0.0, 2.0, 1.0], [0.5, 0.0, 1.0]])
    assert hint_mse(zs, zt, None).tolist() == [2.0, 5.0]  # (1 + 0 + 1), (0 + 1 + 4)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    assert hint_mse(zs, zt, valid).tolist() == [1.0, 5.0]
    # zero-mean logits: row 0 centres to [0, 1, -1] vs [-1, 1, 0]; row 1 is 5 - 3 * (1/3)^2
    assert hint_mse_centered(zs, zt, None).tolist() == pytest.approx([2.0, 14 / 3])
    # a shift of one net's row costs nothing, unlike the plain hint
    assert hint_mse_centered(zs + torch.tensor([[3.0], [-2.0]]), zt, None).tolist() == pytest.approx([2.0, 14 / 3])
    # masked candidates are left out of the mean too: row 0 is [1, 2] vs [0, 2] -> [-.5, .5] vs [-1, 1]
    assert hint_mse_centered(zs, zt, valid).tolist() == pytest.approx([0.5, 14 / 3])
    assert hint_mse_centered(zs.masked_fill(~valid, float("-inf")), zt, valid).tolist() == pytest.approx([0.5, 14 / 3])
    T = 4.0
    for r in range(2):
        pt = [math.exp(v / T) for v in zt[r].tolist()]
        ps = [math.exp(v / T) for v in zs[r].tolist()]
        pt = [p / sum(pt) for p in pt]
        ps = [p / sum(ps) for p in ps]
        kl = T * T * sum(a * math.log(a / b) for a, b in zip(pt, ps))
        assert hint_kl(zs, zt, None, T)[r].item() == pytest.approx(kl, rel=1e-5)
    # a masked candidate drops out of both softmaxes and contributes nothing (no NaN)
    k = hint_kl(zs, zt, valid, T)
    assert torch.isfinite(k).all()
    assert k[0].item() == pytest.approx(hint_kl(zs[:1, :2], zt[:1, :2], None, T).item(), rel=1e-5)


def test_combined_hint_kinds_and_the_row_mean_against_hand_computation():
    zs = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
    zt = torch.tensor([[0.0, 2.0, 1.0], [0.5, 0.0, 1.0]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    T = 4.0
    kl, kl_masked = hint_kl(zs, zt, None, T), hint_kl(zs, zt, valid, T)
    # kl_l2: KL + l2_weight * mean squared difference over the row's candidates (2 valid ones in row 0)
    cb = HintLossCallback(kind="kl_l2", l2_weight=0.5)
    torch.testing.assert_close(cb.term_fn()(zs, zt, None), kl + 0.5 * torch.tensor([2.0 / 3, 5.0 / 3]))
    torch.testing.assert_close(cb.term_fn()(zs, zt, valid), kl_masked + 0.5 * torch.tensor([1.0 / 2, 5.0 / 3]))
    # mse+kl: Rocket's summed hint + kd_weight * KD
    cb = HintLossCallback(kind="mse+kl", kd_weight=2.0)
    torch.testing.assert_close(cb.term_fn()(zs, zt, valid), torch.tensor([1.0, 5.0]) + 2.0 * kl_masked)
    # joint_losses: each term is a mean over the rows (positions with a target), by hand on 2 rows x 3 items
    hs, ht = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    w = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # row 0 is padding
    t = torch.tensor([1, 3])
    parts = joint_losses(hs, w, t, None, ht, w, teacher_ce=True, hint=HintSpec(hint_mse, 1.0))
    zs_, zt_ = hs @ w[1:].T, ht @ w[1:].T  # [[1, 0, 1], [0, 1, 1]] and [[0, 1, 1], [1, 1, 2]]
    ce = lambda z: float(torch.logsumexp(z, -1).sub(z[torch.arange(2), t - 1]).mean())  # noqa: E731
    assert parts["student_ce"].item() == pytest.approx(ce(zs_), rel=1e-6)
    assert parts["teacher_ce"].item() == pytest.approx(ce(zt_), rel=1e-6)
    assert parts["hint"].item() == pytest.approx((2 + 2) / 2)  # row 0: 1 + 1 + 0, row 1: 1 + 0 + 1


def test_rocket_training_loss_is_both_ces_plus_the_weighted_hint():
    torch.manual_seed(0)
    m = rocket().train()
    for p in m.parameters():  # dropout 0 in both nets: the pieces below see the same logits as the step
        p.data.add_(0.05 * torch.randn_like(p))
    cb = HintLossCallback(weight=0.25)
    m.set_hint(cb.spec)  # what the callback's setup does
    b = batch()
    loss = m.train_loss(b)
    mask = b["targets"] != 0
    t = b["targets"][mask]
    (enc_l, w_l), (enc_b, w_b) = m.net("light"), m.net("booster")
    hl, hb = enc_l(b["inputs"])[mask], enc_b(b["inputs"])[mask]
    zl, zb = hl @ w_l[1:].T, hb @ w_b[1:].T
    by_hand = (F.cross_entropy(zl, t - 1) + F.cross_entropy(zb, t - 1)
               + 0.25 * ((zl - zb) ** 2).sum(-1).mean())
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_rocket_holds_its_nets_by_composition_with_the_checkpoint_layout_unchanged():
    import pytorch_lightning as pl

    m = rocket(light={"arch": "sasrec", "d_model": 8, "num_blocks": 1, "num_heads": 1, "dropout": 0.0})
    assert isinstance(m, pl.LightningModule) and not isinstance(m, SeqRecModule)
    assert not hasattr(m, "stack") and not hasattr(m, "encoder")  # StackRec refuses it; stack a net after export
    # the per-net scorers share the rocket's modules and add no state: the keys are the ones checkpoints have
    prefixes = {k.split(".")[0] for k in m.state_dict()}
    assert prefixes == {"booster", "light", "booster_head", "light_head"}
    assert "light.item_embedding.proj.weight" in m.state_dict() and "light.item_embedding.shared.weight" in m.state_dict()
    assert m.scorers["light"].encoder is m.light and m.scorers["booster"].output is m.booster_head
    assert sum(p.numel() for p in m.parameters()) == sum(
        p.numel() for p in {id(p): p for mod in (m.booster, m.light, m.booster_head, m.light_head)
                            for p in mod.parameters()}.values())
    assert all(p.device.type == "cpu" for p in m.scorers["light"].parameters())  # the meta build left nothing behind
    # the hint is no state either, and a module cannot be installed as one
    m.set_hint(HintLossCallback().spec)
    assert set(m.state_dict()) == set(rocket(light={"arch": "sasrec", "d_model": 8, "num_blocks": 1,
                                                    "num_heads": 1, "dropout": 0.0}).state_dict())
    with pytest.raises(TypeError, match="not a module"):
        m.set_hint(torch.nn.Linear(2, 2))
    # the callback installs its spec at setup and removes it at teardown
    cb = HintLossCallback(weight=0.5)
    m.set_hint(None)
    cb.setup(None, m, "fit")
    assert m._hint == cb.spec
    cb.teardown(None, m, "fit")
    assert m._hint is None


def test_a_loss_term_computes_the_training_loss_of_a_plain_module():
    torch.manual_seed(0)
    m = SeqRecModule(num_items=N, d_model=8, num_blocks=1, max_len=12, dropout=0.0)
    b = batch()
    plain = m.train_loss(b)
    seen = {}

    def term(module, inputs, hidden, targets, mask):
        seen.update(module=module, inputs=inputs, hidden=hidden, targets=targets, mask=mask)
        return 2 * module.loss(hidden, targets), {"train/extra": 1.0}

    m.set_loss_term(term)
    assert m.train_loss(b).item() == pytest.approx(2 * plain.item(), rel=1e-6)
    mask = b["targets"] != 0
    assert seen["module"] is m and torch.equal(seen["mask"], mask) and torch.equal(seen["inputs"], b["inputs"])
    assert seen["hidden"].shape == (int(mask.sum()), 8) and torch.equal(seen["targets"], b["targets"][mask])
    assert seen["hidden"].requires_grad
    m.set_loss_term(None)
    assert m.train_loss(b).item() == pytest.approx(plain.item())
    with pytest.raises(TypeError, match="not a module"):
        m.set_loss_term(torch.nn.Linear(2, 2))


def test_federated_label_teacher_term_through_the_callback():
    from lightning_rec.methods.federated.core import label_logits

    torch.manual_seed(0)
    m = SeqRecModule(num_items=N, d_model=8, num_blocks=1, max_len=12, dropout=0.0)
    g = torch.Generator().manual_seed(1)
    b = batch()
    teacher = label_logits(torch.randn(40, N, generator=g), torch.randint(1, 12, (40,), generator=g), top_m=5)
    cb = HintLossCallback(kind="kl_l2", weight=0.7, temperature=2.0, l2_weight=0.01)
    cb.label_teacher = teacher
    cb.setup(None, m, "fit")  # installs the term; the module does not hold the callback
    assert "hint_callback" not in vars(m)
    loss = m.train_loss(b)
    # by hand: own CE + weight * (sum over positions with a teacher row of the term on its M candidates) / positions
    mask = b["targets"] != 0
    h, t = m(b["inputs"])[mask], b["targets"][mask]
    w = m.output_weight()
    row = {int(lbl): i for i, lbl in enumerate(teacher.labels)}
    terms = [cb.term_fn()((h[j] @ w[teacher.items[row[int(t[j])]]].T)[None], teacher.values[row[int(t[j])]][None], None)
             for j in range(len(t)) if int(t[j]) in row]
    assert terms
    by_hand = m.loss(h, t) + 0.7 * torch.cat(terms).sum() / len(t)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    cb.teardown(None, m, "fit")
    assert m.train_loss(b).item() == pytest.approx(m.loss(h, t).item(), rel=1e-6)


def test_candidate_logits_and_masked_ce():
    h = torch.randn(3, 4)
    w = torch.randn(N + 1, 4)
    t = torch.tensor([3, 7, 9])
    z, idx, valid = candidate_logits(h, w, t, None)
    assert z.shape == (3, N) and valid is None
    torch.testing.assert_close(masked_ce(z, idx, None), F.cross_entropy(h @ w[1:].T, t - 1, reduction="none"))
    negs = torch.tensor([7, 1, 2])
    z, idx, valid = candidate_logits(h, w, t, negs)
    assert valid.tolist() == [[True, True, True, True], [True, False, True, True], [True, True, True, True]]
    # row 1: its target 7 is also drawn as a negative; that column is excluded
    logits1 = torch.stack([h[1] @ w[7], h[1] @ w[1], h[1] @ w[2]])
    assert masked_ce(z, idx, valid)[1].item() == pytest.approx(F.cross_entropy(logits1[None], torch.tensor([0])).item(), rel=1e-5)


@pytest.mark.parametrize("negatives", [None, torch.tensor([1, 5, 9, 13])])
def test_chunked_losses_equal_unchunked_values_and_gradients(negatives):
    torch.manual_seed(0)
    hs, ht = torch.randn(10, 4, requires_grad=True), torch.randn(10, 4, requires_grad=True)
    ws, wt = torch.randn(N + 1, 4, requires_grad=True), torch.randn(N + 1, 4, requires_grad=True)
    t = torch.randint(1, N + 1, (10,))
    spec = HintSpec(hint_mse, 0.5, block=False)
    grads = []
    for rows in (None, 3):
        parts = joint_losses(hs, ws, t, negatives, ht, wt, teacher_ce=True, hint=spec, chunk_rows=rows)
        total = parts["student_ce"] + parts["teacher_ce"] + spec.weight * parts["hint"]
        grads.append([g.clone() for g in torch.autograd.grad(total, [hs, ht, ws, wt])] + [total.detach()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- the gradient block
@pytest.mark.parametrize("share_blocks", [0, 1])
def test_gradient_block_keeps_the_hint_away_from_booster_only_parameters(share_blocks):
    kw = {}
    if share_blocks:  # sharing blocks needs the same architecture and width in both nets
        kw["light"] = {"arch": "sasrec", "d_model": 16, "num_blocks": 1, "num_heads": 2, "dropout": 0.0,
                       "residual_alpha": False}
    for block, chunk in ((True, None), (False, None), (True, 5), (False, 5)):  # chunk: the checkpointed path
        torch.manual_seed(0)
        m = rocket(share_blocks=share_blocks, loss_chunk_rows=chunk, **kw)
        spec = HintLossCallback(weight=1.0, block_gradient=block).spec(None)  # the option, through the callback
        parts = m.loss_parts(batch(), spec, teacher_ce=False)
        parts["hint"].backward()  # the hint alone
        booster_only = dict(m.booster_only_parameters())
        assert booster_only and not any(n.startswith("booster.item_embedding") for n in booster_only)

        def nonzero(p):
            return p.grad is not None and p.grad.abs().sum() > 0

        if block:
            assert all(p.grad is None or p.grad.abs().sum() == 0 for p in booster_only.values()), \
                [n for n, p in booster_only.items() if nonzero(p)]
        else:
            # every booster-only tensor learns from the hint then
            assert all(nonzero(p) for p in booster_only.values()), [n for n, p in booster_only.items() if not nonzero(p)]
        # the shared embedding and the light net learn from the hint in both cases
        assert nonzero(m.booster.item_embedding.weight) and m.light.item_embedding is m.booster.item_embedding
        assert all(nonzero(p) for n, p in m.light.named_parameters() if not n.startswith("item_embedding"))
        assert nonzero(m.light_head.weight)
        if share_blocks:  # shared bottom block: part of the light net, so the hint reaches it
            assert m.light.blocks[0] is m.booster.blocks[0]
            assert any(nonzero(p) for p in m.booster.blocks[0].parameters())


def test_unshared_rocket_has_two_tables_and_a_narrow_light_net_a_projection():
    m = rocket(share_embedding=False)
    assert m.light.item_embedding is not m.booster.item_embedding
    narrow = rocket(light={"arch": "sasrec", "d_model": 8, "num_blocks": 1, "num_heads": 1, "dropout": 0.0})
    assert narrow.light.item_embedding.shared is narrow.booster.item_embedding
    assert narrow.light.item_embedding.weight.shape == (N + 1, 8)
    assert narrow.light.item_embedding.weight[0].abs().sum() == 0  # padding stays zero through the projection


def test_bad_rocket_settings_name_the_option():
    with pytest.raises(ConfigError, match="model.light: unknown option 'depth'"):
        rocket(light={"arch": "sasrec", "depth": 2})
    with pytest.raises(ConfigError, match="model.booster.arch"):
        rocket(booster={"arch": "gru"})
    with pytest.raises(ConfigError, match="share_blocks=1: needs the same arch"):
        rocket(share_blocks=1)
    with pytest.raises(ConfigError, match="model.loss=bce"):
        rocket(loss="bce")
    with pytest.raises(ConfigError, match="model.loss_chunk_rows=-1: expected an integer >= 1"):
        rocket(loss_chunk_rows=-1)
    # shared blocks must be built alike in both nets, or the light net (and its export) would run another block
    sas = {"arch": "sasrec", "d_model": 16, "num_blocks": 2, "num_heads": 2}
    nin = {"arch": "nextitnet", "d_model": 16, "num_blocks": 2, "dilations": [1, 2]}
    for light, why in (({**sas, "num_blocks": 1, "layout": "post"}, "layout: pre in the booster, post in the light"),
                       ({**sas, "num_blocks": 1, "num_heads": 1}, "num_heads: 2 in the booster, 1 in the light"),
                       ({**sas, "num_blocks": 1, "residual_alpha": False}, "alpha_att shape: (1,) in the booster, absent"),
                       ({**nin, "num_blocks": 1, "dilations": [2]}, "conv1.dilation: (1,) in the booster, (2,)")):
        booster = nin if light["arch"] == "nextitnet" else sas
        with pytest.raises(ConfigError, match=re.escape(f"model.share_blocks=1: block 0 of the booster and of the "
                                                        f"light net are built differently ({why}")):
            rocket(booster=booster, light=light, share_blocks=1)
    # what may differ: dropout (the shared block trains with the booster's), and heads for nextitnet (it has none)
    rocket(booster={**sas, "dropout": 0.3}, light={**sas, "num_blocks": 1, "dropout": 0.1}, share_blocks=1)
    rocket(booster=sas, light={**sas, "num_blocks": 1, "attn_out_dropout": False}, share_blocks=1)
    rocket(booster={**nin, "num_heads": 2}, light={**nin, "num_blocks": 1, "num_heads": 1}, share_blocks=1)
    with pytest.raises(ConfigError, match="kind=l1"):
        HintLossCallback(kind="l1")
    # the rocket chunks with its own option; the KD one would be silently unused
    with pytest.raises(ConfigError, match="callbacks.hint.chunk_rows=4: a rocket .*model.loss_chunk_rows=4 instead"):
        HintLossCallback(chunk_rows=4).setup(None, rocket(), "fit")


# ---------------------------------------------------------------------- export
@pytest.mark.parametrize("light", [
    {"arch": "nextitnet", "d_model": 16, "num_blocks": 1, "dropout": 0.0},
    {"arch": "sasrec", "d_model": 8, "num_blocks": 1, "num_heads": 1, "dropout": 0.0},  # projected table
    {"arch": "nextitnet", "d_model": 16, "num_blocks": 2, "dilations": [1, 4], "dropout": 0.0, "share": 1},
    {"arch": "sasrec", "d_model": 16, "num_blocks": 2, "num_heads": 2, "layout": "post", "dropout": 0.0, "share": 2},
])
@pytest.mark.parametrize("own_heads", [True, False])
def test_exported_light_net_scores_exactly_as_inside_the_rocket(light, own_heads):
    torch.manual_seed(0)
    shared = light.get("share")
    if shared:  # the light net's first block is the booster's
        light = {k: v for k, v in light.items() if k != "share"}
    m = rocket(light=light, own_heads=own_heads, share_blocks=shared or 0,
               **({"booster": {**light, "num_blocks": 3}} if shared else {})).eval()
    with torch.no_grad():  # move every weight off its initial value (alphas included)
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    b = batch()
    exported = m.export_net("light").eval()
    assert isinstance(exported, SeqRecModule) and not hasattr(exported, "booster")
    with torch.no_grad():
        h_in, h_out = m.user_representation(b["inputs"], "light"), exported.user_representation(b["inputs"])
        torch.testing.assert_close(h_in, h_out, rtol=1e-5, atol=1e-6)
        _, w = m.net("light")
        torch.testing.assert_close(h_in @ w.T, h_out @ exported.output_weight().T, rtol=1e-5, atol=1e-5)
        target = torch.randint(1, N + 1, (4,))
        r1 = full_ranks(lambda a, c: h_in @ w[a:c].T, N, target)
        r2 = full_ranks(exported.score_fn(h_out), N, target)
        assert torch.equal(r1, r2)
    booster = m.export_net("booster")
    assert sum(p.numel() for p in booster.parameters()) > sum(p.numel() for p in exported.parameters())


def rocket_args(tmp_path, *extra, epochs=2):
    args = [a for a in tiny(tmp_path, epochs=epochs) if a != "model.d_model=16"]
    return args + ["model=rocket", "model.booster.d_model=16", "model.light.d_model=16", "model.booster.num_blocks=2",
                   "callbacks=rocket", *extra]


def test_rocket_cli_fit_export_test_predict(tmp_path, capsys):
    out = run(["fit", *rocket_args(tmp_path)])
    assert {"test/light/ndcg@10", "test/booster/ndcg@10"} <= set(out["test"])
    ck = torch.load(out["best_ckpt"], weights_only=True)
    best_cb = [v for k, v in ck["callbacks"].items() if k.startswith("ModelCheckpoint")][0]
    assert best_cb["monitor"] == "val/light/ndcg@10"  # the shipped net picks the best epoch
    light = tmp_path / "light.ckpt"
    # the README's ship command: ckpt=best is the newest rocket run's best (light-net) checkpoint, not last.ckpt
    run(["export", "ckpt=best", "model=rocket", f"runs_dir={tmp_path / 'runs'}", "net=light", f"out={light}",
         "latency_users=8"])
    said = capsys.readouterr().out
    assert f"exported the light net of {out['best_ckpt']} ->" in said
    assert "parameters" in said and "ms per batch of 8 users" in said and "light / booster" in said
    res = run(["test", f"ckpt_path={light}", "trainer.enable_progress_bar=false"])
    assert res["test/ndcg@10"] == pytest.approx(out["test"]["test/light/ndcg@10"], abs=1e-6)
    pred = run(["predict", f"ckpt_path={light}", f"predict.out={tmp_path / 'p.tsv'}"])
    assert os.path.getsize(pred) > 0
    with pytest.raises(ConfigError, match="file exists"):
        run(["export", f"ckpt={out['best_ckpt']}", f"out={light}"])
    with pytest.raises(ConfigError, match="not a rocket checkpoint"):
        run(["export", f"ckpt={light}", f"out={tmp_path / 'x.ckpt'}"])


@pytest.mark.parametrize("monitor", [None, "val/light/ndcg@10", "val/booster/hr@10"])
def test_rocket_under_the_sampled_protocol_monitors_the_sampled_metric_of_the_net_asked_for(tmp_path, monitor):
    extra = ["eval.protocol=sampled", "eval.num_negatives=5"] + ([f"eval.monitor={monitor}"] if monitor else [])
    out = run(["fit", *rocket_args(tmp_path, *extra, epochs=1)])
    want = {None: "val/light/sampled_ndcg@10", "val/light/ndcg@10": "val/light/sampled_ndcg@10",
            "val/booster/hr@10": "val/booster/sampled_hr@10"}[monitor]
    assert out["monitor"] == want
    assert {"test/light/sampled_ndcg@10", "test/booster/sampled_ndcg@10"} <= set(out["test"])


def test_rocket_resume_with_a_scheduled_hint_is_exact(tmp_path):
    common = ["trainer.deterministic=true", "callbacks.hint.schedule=warmup", "callbacks.hint.warmup_steps=9",
              "model.loss=sampled_softmax", "model.num_negatives=20"]
    full = run(["fit", *rocket_args(tmp_path / "a", *common, epochs=3)])
    run(["fit", *rocket_args(tmp_path / "b", *common, "test_after_fit=false", epochs=1)])
    resumed = run(["fit", *rocket_args(tmp_path / "b", *common, "ckpt_path=last", epochs=3)])
    assert resumed["test"] == full["test"]
    a = torch.load(os.path.join(full["run_dir"], "checkpoints", "last.ckpt"), weights_only=True)["state_dict"]
    b = torch.load(os.path.join(resumed["run_dir"], "checkpoints", "last.ckpt"), weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_kd_from_a_frozen_teacher_checkpoint(tmp_path, monkeypatch):
    teacher = run(["fit", *tiny(tmp_path / "t", "model=sasrec", "model.num_blocks=2", epochs=2)])
    monkeypatch.setenv("PROBE_DIR", str(tmp_path))

    def student(name, weight):
        out = run(["fit", *tiny(tmp_path / name, "model=sasrec", "model.num_blocks=1", "callbacks=kd",
                                f"callbacks.hint.teacher_ckpt={teacher['best_ckpt']}", f"callbacks.hint.weight={weight}",
                                "trainer.deterministic=true", "+callbacks.probe._target_=ddp_probe.TeacherProbe",
                                epochs=2)])
        return torch.load(os.path.join(out["run_dir"], "checkpoints", "last.ckpt"), weights_only=True)["state_dict"], out

    kd, out = student("s", 0.9)
    # The in-memory teacher stayed frozen: no gradient, eval mode, the same weights after the student's fit.
    assert json.load(open(tmp_path / "teacher.json")) == {"frozen": True, "eval": True, "unchanged": True}
    rows = list(csv.DictReader(open(os.path.join(out["run_dir"], "csv", "version_0", "metrics.csv"))))
    hints = [float(r["train/hint_epoch"]) for r in rows if r.get("train/hint_epoch")]
    assert hints and all(h > 0 for h in hints)
    # The KD term trains the student: the same run with its weight at 0 (everything else equal,
    # the teacher loaded the same way) ends with other weights.
    plain, _ = student("z", 0.0)
    assert any(not torch.equal(kd[k], plain[k]) for k in kd if "metrics" not in k)
    # callbacks.hint.chunk_rows bounds the KD loss's memory: it reaches the loss, and the result is the same
    import lightning_rec.losses.distill as distill

    seen, joint = [], distill.joint_losses
    monkeypatch.setattr(distill, "joint_losses", lambda *a, **k: seen.append(k.get("chunk_rows")) or joint(*a, **k))
    chunked = run(["fit", *tiny(tmp_path / "c", "model=sasrec", "model.num_blocks=1", "callbacks=kd",
                                f"callbacks.hint.teacher_ckpt={teacher['best_ckpt']}", "callbacks.hint.weight=0.9",
                                "callbacks.hint.chunk_rows=7", "trainer.deterministic=true", epochs=2)])
    assert seen and set(seen) == {7}
    weights = torch.load(os.path.join(chunked["run_dir"], "checkpoints", "last.ckpt"), weights_only=True)["state_dict"]
    for k in kd:
        if "metrics" not in k:
            torch.testing.assert_close(weights[k], kd[k], rtol=1e-4, atol=1e-5, msg=k)
    with pytest.raises(ConfigError, match="callbacks.hint.chunk_rows=0: expected an integer >= 1"):
        HintLossCallback(chunk_rows=0)
    with pytest.raises(ConfigError, match="needs callbacks.hint.teacher_ckpt"):
        run(["fit", *tiny(tmp_path / "x", "callbacks=kd", epochs=1)])
    # a student whose histories are longer than the SASRec teacher's position table: one line, before training
    with pytest.raises(ConfigError, match=r"a SASRec teacher of max_len 20, shorter than the student's "
                                          r"data.max_len=30; train the student with data.max_len=20"):
        run(["fit", *tiny(tmp_path / "y", "callbacks=kd", f"callbacks.hint.teacher_ckpt={teacher['best_ckpt']}",
                          "data.max_len=30", epochs=1)])
    with pytest.raises(ConfigError, match="teacher_ckpt=last: give the teacher's checkpoint file or run folder"):
        run(["fit", *tiny(tmp_path / "z", "callbacks=kd", "callbacks.hint.teacher_ckpt=last", epochs=1)])
