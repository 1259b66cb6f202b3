"""StackRec: index maps, function preservation, optimizer and gradients, resume, DDP."""

import json
import os

import pytest
import pytorch_lightning as pl
import torch
from conftest import fit_in_processes, tiny

from lightning_rec import SeqRecModule
from lightning_rec.cli import run
from lightning_rec.errors import ConfigError
from lightning_rec.methods.stackrec.stacking import index_map, is_copy, options, stack_module

ARCHS = [("nextitnet", {}), ("sasrec", {"norm_first": True, "num_heads": 2})]


def model(arch, blocks=2, **kw):
    m = SeqRecModule(num_items=40, arch=arch, num_blocks=blocks, d_model=16, max_len=12, dropout=0.0, **kw)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "alpha" in n:
                p.uniform_(0.3, 0.9)
            if "ln" in n and n.endswith("weight"):
                p.uniform_(0.5, 1.5)  # so fresh vs copied LayerNorms are distinguishable
    return m.eval()


# written out from the method's definition (adjacent: B0 B0 B1 B1 ..., cross: B0 B1 ... B(L-1) B0 B1 ...),
# not from the implementation's formula; F marks a block's own position, T the added copy
INDEX_MAPS = {
    1: ([0, 0], [0, 0], "FT", "FT"),
    2: ([0, 0, 1, 1], [0, 1, 0, 1], "FTFT", "FFTT"),
    3: ([0, 0, 1, 1, 2, 2], [0, 1, 2, 0, 1, 2], "FTFTFT", "FFFTTT"),
    5: ([0, 0, 1, 1, 2, 2, 3, 3, 4, 4], [0, 1, 2, 3, 4, 0, 1, 2, 3, 4], "FTFTFTFTFT", "FFFFFTTTTT"),
}


@pytest.mark.parametrize("L", sorted(INDEX_MAPS))
def test_index_maps_follow_the_spec(L):
    adjacent, cross, adjacent_copies, cross_copies = INDEX_MAPS[L]
    assert index_map(L, "adjacent") == adjacent
    assert index_map(L, "cross") == cross
    assert "".join("FT"[is_copy(i, L, "adjacent")] for i in range(2 * L)) == adjacent_copies
    assert "".join("FT"[is_copy(i, L, "cross")] for i in range(2 * L)) == cross_copies
    with pytest.raises(ConfigError, match="not one of"):
        index_map(L, "interleaved")


@pytest.mark.parametrize("arch,kw", ARCHS)
@pytest.mark.parametrize("mode", ["adjacent", "cross"])
def test_function_preserving_stack_keeps_outputs_and_copies_weights(arch, kw, mode):
    m = model(arch, 3, **kw)
    x = torch.randint(1, 41, (4, 12))
    before = m(x)
    old = [dict((k, v.clone()) for k, v in b.state_dict().items()) for b in m.encoder.blocks]
    mapping = stack_module(m, options(mode, "function_preserving"))
    assert mapping == index_map(3, mode) and len(m.encoder.blocks) == 6 and m.hparams.num_blocks == 6
    torch.testing.assert_close(m(x), before, atol=1e-5, rtol=1e-5)
    for i, j in enumerate(mapping):
        for k, v in m.encoder.blocks[i].state_dict().items():
            if k.startswith("alpha"):
                expect = torch.zeros_like(v) if is_copy(i, 3, mode) else old[j][k]
                torch.testing.assert_close(v, expect)
            else:
                torch.testing.assert_close(v, old[j][k], msg=f"block {i} {k}")


def test_authors_preset_resets_layernorm_alpha_head_and_dilation():
    m = model("nextitnet", 2, tied_embeddings=False)
    emb = m.encoder.item_embedding.weight.clone()
    head = m.output.weight.clone()
    conv = [b.conv1.weight.clone() for b in m.encoder.blocks]
    stack_module(m, options("adjacent", "authors"))
    assert [b.dilation for b in m.encoder.blocks] == [1, 4, 1, 4]  # positional
    assert m.hparams.block_dilations is None
    for i, b in enumerate(m.encoder.blocks):
        assert b.alpha.item() == 0
        assert torch.equal(b.ln1.weight, torch.ones_like(b.ln1.weight))
        torch.testing.assert_close(b.conv1.weight, conv[i // 2])
    torch.testing.assert_close(m.encoder.item_embedding.weight, emb)
    assert not torch.allclose(m.output.weight, head)
    x = torch.randint(1, 41, (2, 12))
    torch.testing.assert_close(m(x), m.encoder.embed(x) * (x != 0).unsqueeze(-1))  # identity blocks


def test_checkpoint_after_stack_rebuilds_deep_model(tmp_path):
    m = model("nextitnet", 2)
    stack_module(m, options("adjacent"))
    path = tmp_path / "deep.ckpt"
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams),
                "pytorch-lightning_version": "2.6.6"}, path)
    m2 = SeqRecModule.load_from_checkpoint(path, weights_only=True).eval()
    assert [b.dilation for b in m2.encoder.blocks] == [1, 1, 4, 4]
    x = torch.randint(1, 41, (2, 12))
    torch.testing.assert_close(m2(x), m(x))
    # A config-built shallow module grows itself when restored from the deep checkpoint.
    shallow = SeqRecModule(**{**dict(m.hparams), "num_blocks": 2, "block_dilations": None})
    shallow.on_load_checkpoint(torch.load(path, weights_only=True))
    shallow.load_state_dict(m.state_dict())
    torch.testing.assert_close(shallow.eval()(x), m(x))


def fit(tmp_path, *extra, epochs=4):
    return run(["fit", *tiny(tmp_path, "callbacks=stacking", "callbacks.stacking.at_epochs=[2]", *extra,
                             epochs=epochs)])


@pytest.mark.parametrize("arch", ["nextitnet", "sasrec"])
def test_callback_doubles_depth_rebuilds_optimizer_and_new_blocks_learn(tmp_path, arch):
    out = fit(tmp_path, f"model={arch}", "model.num_blocks=2", "callbacks.stacking.mode=cross")
    ck = torch.load(os.path.join(out["run_dir"], "checkpoints", "last.ckpt"), weights_only=True)
    assert ck["hyper_parameters"]["num_blocks"] == 4
    sd = ck["state_dict"]
    assert any(k.startswith("encoder.blocks.3.") for k in sd)
    # Every parameter sits in exactly one optimizer group.
    groups = ck["optimizer_states"][0]["param_groups"]
    ids = [i for g in groups for i in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for k in sd if "metrics" not in k)
    # The copies started at alpha 0 and moved: they received gradients after the stack.
    alphas = [v.abs().sum().item() for k, v in sd.items() if k.startswith("encoder.blocks.") and "alpha" in k]
    assert all(a > 0 for a in alphas)
    st = ck["callbacks"]
    stack_state = next(v for k, v in st.items() if "StackingCallback" in k)
    assert stack_state["done"] == ["epoch:2"] and stack_state["history"][0]["to_blocks"] == 4


def test_keep_moments_copies_adam_state_to_the_copies(tmp_path):
    from lightning_rec.methods.stackrec import StackingCallback

    m = model("nextitnet", 2)
    m.train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x = torch.randint(1, 41, (4, 12))
    m.loss(m(x)[:, :-1].reshape(-1, 16), x[:, 1:].reshape(-1)).backward()
    opt.step()

    class T:  # the trainer surface the callback uses
        optimizers = [opt]
        lr_scheduler_configs = []

    cb = StackingCallback(at_epochs=[1], mode="adjacent", optimizer_state="keep_moments")
    state = cb._param_states(T, m)
    src = state["encoder.blocks.1.conv1.weight"]["exp_avg"]
    mapping = stack_module(m, cb.opts)
    new_opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    T.optimizers = [new_opt]
    cb._restore_moments(T, m, state, mapping, 2)
    for i in (2, 3):
        p = m.encoder.blocks[i].conv1.weight
        torch.testing.assert_close(new_opt.state[p]["exp_avg"], src)
    assert m.encoder.blocks[3].alpha not in new_opt.state  # the copy's alpha restarts at 0 with fresh moments
    torch.testing.assert_close(new_opt.state[m.encoder.blocks[2].alpha]["exp_avg"],  # its source keeps its value
                               state["encoder.blocks.1.alpha"]["exp_avg"])           # and its moments


@pytest.mark.parametrize("stop_at", [1, 3])
def test_resume_across_a_stack_point_is_exact(tmp_path, stop_at):
    common = ["model=nextitnet", "model.num_blocks=2", "trainer.deterministic=true", "model.dropout=0.2"]
    full = fit(tmp_path / "a", *common, epochs=4)
    fit(tmp_path / "b", *common, "test_after_fit=false", epochs=stop_at)
    resumed = fit(tmp_path / "b", *common, "ckpt_path=last", epochs=4)
    assert resumed["test"] == full["test"]
    a = torch.load(os.path.join(full["run_dir"], "checkpoints", "last.ckpt"), weights_only=True)
    b = torch.load(os.path.join(resumed["run_dir"], "checkpoints", "last.ckpt"), weights_only=True)
    assert a["hyper_parameters"]["num_blocks"] == b["hyper_parameters"]["num_blocks"] == 4
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=0, msg=k)


@pytest.mark.ddp
def test_stacking_under_two_process_ddp_keeps_ranks_in_sync(tmp_path):
    probe = fit_in_processes(tmp_path, "model=nextitnet", "model.num_blocks=2", "callbacks=stacking",
                             "callbacks.stacking.at_epochs=[1]", "trainer.devices=2", "trainer.strategy=ddp",
                             "+callbacks.probe._target_=ddp_probe.WeightProbe", "test_after_fit=false", epochs=3)
    r0, r1 = (json.load(open(probe / f"rank{r}.json")) for r in (0, 1))
    assert r0["num_blocks"] == r1["num_blocks"] == 4 and r0["ddp"] and r1["ddp"]
    for k in r0["state"]:  # identical weights on both ranks, new blocks included: they were all-reduced
        assert abs(r0["state"][k] - r1["state"][k]) < 1e-5, k


def test_stack_command_then_init_from_round_trip(tmp_path, capsys):
    out = run(["fit", *tiny(tmp_path, "model=nextitnet", "model.num_blocks=2", epochs=1)])
    src = out["best_ckpt"]
    deep = tmp_path / "deep.ckpt"
    run(["stack", f"ckpt={src}", "mode=cross", f"out={deep}", "times=2"])
    ck = torch.load(deep, weights_only=True)
    assert ck["hyper_parameters"]["num_blocks"] == 8 and ck["stacking"]["mode"] == "cross"
    shallow = SeqRecModule.load_from_checkpoint(src, weights_only=True).eval()
    deep_m = SeqRecModule.load_from_checkpoint(deep, weights_only=True).eval()
    x = torch.randint(1, shallow.num_items + 1, (3, 20))
    torch.testing.assert_close(deep_m(x), shallow(x), atol=1e-5, rtol=1e-5)  # function-preserving preset
    with pytest.raises(Exception, match="file exists"):
        run(["stack", f"ckpt={src}", f"out={deep}"])
    # every stack.* flag has a short name, and the printout says which were set
    run(["stack", f"ckpt={src}", f"out={tmp_path / 'flags.ckpt'}", "copy_head=false", "copy_layernorm=false"])
    assert torch.load(tmp_path / "flags.ckpt", weights_only=True)["stacking"]["copy_head"] is False
    assert "(adjacent, function_preserving with copy_layernorm=false, copy_head=false)" in capsys.readouterr().out
    # test on the stacked checkpoint gives the shallow model's metrics
    res = run(["test", f"ckpt_path={deep}", "trainer.enable_progress_bar=false"])
    assert res == pytest.approx(out["test"], abs=1e-5)
    # fit init_from: architecture from the checkpoint (8 blocks), weights loaded, fresh optimizer
    fitted = run(["fit", *tiny(tmp_path, f"init_from={deep}", "trainer.max_epochs=1", "test_after_fit=false")])
    ck2 = torch.load(os.path.join(fitted["run_dir"], "checkpoints", "last.ckpt"), weights_only=True)
    assert ck2["hyper_parameters"]["num_blocks"] == 8 and ck2["hyper_parameters"]["arch"] == "nextitnet"
    assert "nextitnet" in fitted["run_dir"]


def test_transfer_to_another_catalogue_keeps_matching_item_rows(tmp_path):
    def data(name, items, users=40):
        rows = [f"u{u} it{items[(u * 7 + t) % len(items)]}" for u in range(users) for t in range(10)]
        p = tmp_path / name
        p.write_text("\n".join(rows) + "\n")
        return str(p)

    src = data("src.txt", list(range(0, 30)))
    dst = data("dst.txt", list(range(20, 60)))  # items it20..it29 are in both
    common = ["data=file", "data.format=sasrec", "model=sasrec", "model.tied_embeddings=false"]
    out = run(["fit", *tiny(tmp_path, *common, f"data.path={src}", epochs=1)])
    src_ckpt = torch.load(out["best_ckpt"], weights_only=True)
    with pytest.raises(Exception, match="model.new_head=true"):
        run(["fit", *tiny(tmp_path, *common, f"data.path={dst}", f"init_from={out['best_ckpt']}", epochs=1)])
    tr = run(["fit", *tiny(tmp_path, *common, f"data.path={dst}", f"init_from={out['best_ckpt']}", "model.new_head=true",
                           "model.match_item_ids=true", "optimizer.lr=0.0", "test_after_fit=false", epochs=1)])
    # With lr=0 nothing moves: the saved weights are the transferred ones.
    m = SeqRecModule.load_from_checkpoint(os.path.join(tr["run_dir"], "checkpoints", "last.ckpt"), weights_only=True)
    old_ids = src_ckpt["SeqDataModule"]["id_maps"]["items"]
    new_ids = json.load(open(os.path.join(tr["run_dir"], "id_maps.json")))["items"]
    old_emb = src_ckpt["state_dict"]["encoder.item_embedding.weight"]
    for i, it in enumerate(new_ids[1:], start=1):
        if it in old_ids:
            torch.testing.assert_close(m.encoder.item_embedding.weight[i], old_emb[old_ids.index(it)])
        else:
            assert not any(torch.equal(m.encoder.item_embedding.weight[i], r) for r in old_emb)
    torch.testing.assert_close(m.encoder.blocks[0].qkv.weight, src_ckpt["state_dict"]["encoder.blocks.0.qkv.weight"])
    # Without match_item_ids no row is carried over (ids of unrelated datasets mean nothing).
    tr2 = run(["fit", *tiny(tmp_path, *common, f"data.path={dst}", f"init_from={out['best_ckpt']}",
                            "model.new_head=true", "optimizer.lr=0.0", "test_after_fit=false", epochs=1)])
    m2 = SeqRecModule.load_from_checkpoint(os.path.join(tr2["run_dir"], "checkpoints", "last.ckpt"), weights_only=True)
    for i in range(1, len(new_ids)):
        assert not any(torch.equal(m2.encoder.item_embedding.weight[i], r) for r in old_emb)


def test_data_fraction_callback_grows_the_training_data_and_resumes(tmp_path):
    extra = ["data.fraction=0.5", "data.fraction_by=users", "callbacks.stacking.at_epochs=[2]", "trainer.deterministic=true",
             "+callbacks.data_fraction._target_=lightning_rec.callbacks.DataFractionCallback",
             "+callbacks.data_fraction.at_epochs=[2]", "+callbacks.data_fraction.fractions=[1.0]", "model=nextitnet",
             "model.num_blocks=2"]
    out = run(["fit", *tiny(tmp_path, "callbacks=stacking", *extra, "test_after_fit=false", epochs=4)])
    ck = torch.load(os.path.join(out["run_dir"], "checkpoints", "last.ckpt"), weights_only=True)
    # 100 users -> 4 batches of 32 per epoch for 2 epochs, then 200 users -> 7 batches for 2 epochs
    assert ck["global_step"] == 2 * 4 + 2 * 7
    assert ck["datamodule_hyper_parameters"]["fraction"] == 1.0
    assert ck["hyper_parameters"]["num_blocks"] == 4
    # Stopped before the switch (its checkpoint is written at validation end, before the switch)
    # and after it; both resumed runs continue on the right data and end exactly like the full run.
    for stop, sub in ((2, "b"), (3, "c")):
        half = run(["fit", *tiny(tmp_path / sub, "callbacks=stacking", *extra, "test_after_fit=false", epochs=stop)])
        res = run(["fit", *tiny(tmp_path / sub, "callbacks=stacking", *extra, "test_after_fit=false", "ckpt_path=last",
                                epochs=4)])
        assert res["run_dir"] == half["run_dir"]
        ck2 = torch.load(os.path.join(res["run_dir"], "checkpoints", "last.ckpt"), weights_only=True)
        assert ck2["global_step"] == ck["global_step"] and ck2["hyper_parameters"]["num_blocks"] == 4
        assert ck2["datamodule_hyper_parameters"]["fraction"] == 1.0
        for k in ck["state_dict"]:
            torch.testing.assert_close(ck2["state_dict"][k], ck["state_dict"][k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("arch,blocks", [("nextitnet", 64), ("nextitnet", 128), ("sasrec", 16), ("sasrec", 24)])
def test_deep_models_train_stably_with_alpha_residuals(tmp_path, arch, blocks):
    out = run(["fit", *tiny(tmp_path, f"model={arch}", f"model.num_blocks={blocks}", "model.d_model=16",
                            "data.max_len=12", "data.synthetic.num_users=150", "trainer.limit_val_batches=1",
                            "test_after_fit=false", epochs=2)])
    import csv

    rows = list(csv.DictReader(open(os.path.join(out["run_dir"], "csv", "version_0", "metrics.csv"))))
    losses = [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_stacking_refuses_spawn_launchers(tmp_path):
    from lightning_rec.errors import ConfigError

    with pytest.raises(ConfigError, match="use trainer.strategy=ddp"):
        run(["fit", *tiny(tmp_path, "callbacks=stacking", "callbacks.stacking.at_epochs=[1]",
                          "trainer.strategy=ddp_spawn", "trainer.devices=2", epochs=1)])


# ---------------------------------------------------------------------- review fixes (2026-11-24)
class _Seqs(torch.utils.data.Dataset):
    def __init__(self, n=64, T=10, N=40):
        g = torch.Generator().manual_seed(0)
        self.s = torch.randint(1, N + 1, (n, T + 1), generator=g)

    def __len__(self):
        return len(self.s)

    def __getitem__(self, i):
        return {"inputs": self.s[i, :-1], "targets": self.s[i, 1:]}


class _LrProbe(pl.Callback):
    """The learning rate each optimizer step actually used."""

    def __init__(self):
        self.lrs = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def _fit_steps(module, callbacks, steps, **kw):
    t = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, callbacks=callbacks, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   limit_val_batches=0, num_sanity_val_steps=0, **kw)
    t.fit(module, torch.utils.data.DataLoader(_Seqs(), batch_size=8))
    return t


@pytest.mark.parametrize("optimizer_state", ["fresh", "keep_moments"])
@pytest.mark.parametrize("scheduler", [{"name": "step", "step_size": 3, "gamma": 0.5},
                                       {"name": "cosine", "warmup_steps": 2}])
def test_the_learning_rate_schedule_continues_across_a_stack(optimizer_state, scheduler):
    from lightning_rec.methods.stackrec import StackingCallback

    def lrs(stack):
        torch.manual_seed(0)
        m = SeqRecModule(num_items=40, arch="nextitnet", num_blocks=1, d_model=8, dropout=0.0,
                         optimizer={"name": "adam", "lr": 0.01}, scheduler=scheduler)
        probe = _LrProbe()
        cbs = [probe] + ([StackingCallback(at_steps=[5], optimizer_state=optimizer_state)] if stack else [])
        _fit_steps(m, cbs, 12)
        return probe.lrs

    plain, stacked = lrs(False), lrs(True)
    assert len(plain) == len(stacked) == 12 and len(set(plain)) > 2
    assert stacked == pytest.approx(plain, rel=1e-12)  # neither restarted nor stuck at the undecayed rate


def test_keep_moments_gives_each_copy_its_own_adashift_state():
    from lightning_rec.methods.optim_switch.optim import AdaShift
    from lightning_rec.methods.stackrec import StackingCallback

    m = model("nextitnet", 2).train()
    opt = AdaShift(m.parameters(), lr=1e-2, n=3)
    x = torch.randint(1, 41, (4, 12))
    for _ in range(4):
        opt.zero_grad()
        m.loss(m(x)[:, :-1].reshape(-1, 16), x[:, 1:].reshape(-1)).backward()
        opt.step()

    class T:
        optimizers = [opt]
        lr_scheduler_configs = []

    cb = StackingCallback(at_epochs=[1], mode="adjacent", optimizer_state="keep_moments")
    state = cb._param_states(T, m)
    mapping = stack_module(m, cb.opts)
    new_opt = AdaShift(m.parameters(), lr=1e-2, n=3)
    T.optimizers = [new_opt]
    cb._restore_moments(T, m, state, mapping, 2)
    a, b = (new_opt.state[m.encoder.blocks[i].conv1.weight] for i in (2, 3))
    lists = [k for k, v in a.items() if isinstance(v, list)]
    assert lists  # AdaShift's gradient window
    for k in lists:
        assert a[k] is not b[k] and all(u is not v for u, v in zip(a[k], b[k]))
        assert all(torch.equal(u, v) for u, v in zip(a[k], b[k]))  # equal copies of the source's window
    # One more step: each copy's window takes its own gradient, not its twin's.
    new_opt.zero_grad()
    m.loss(m(x)[:, :-1].reshape(-1, 16), x[:, 1:].reshape(-1)).backward()
    new_opt.step()
    k = lists[0]
    assert len(a[k]) == len(state["encoder.blocks.1.conv1.weight"][k])


@pytest.mark.parametrize("arch,kw", ARCHS)
def test_stacking_under_bf16_true_precision(arch, kw):
    from lightning_rec.methods.stackrec import StackingCallback

    torch.manual_seed(0)
    m = SeqRecModule(num_items=40, arch=arch, num_blocks=1, d_model=8, dropout=0.0, max_len=10, **kw)
    _fit_steps(m, [StackingCallback(at_steps=[2])], 4, precision="bf16-true")
    assert len(m.encoder.blocks) == 2
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}  # the new blocks too


def test_zero_new_alpha_needs_residual_alphas():
    import types

    from lightning_rec.methods.stackrec import StackingCallback

    m = model("nextitnet", 2, residual_alpha=False)
    with pytest.raises(ConfigError, match="zero_new_alpha=true: the model has no residual alpha"):
        stack_module(m, options("adjacent", "function_preserving"))
    trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(launcher=None))
    with pytest.raises(ConfigError, match="callbacks.stacking.zero_new_alpha=false"):  # at setup, before training
        StackingCallback(at_epochs=[1]).setup(trainer, m, "fit")
    stack_module(m, options("adjacent", "function_preserving", zero_new_alpha=False))  # full residual copies, on request
    assert len(m.encoder.blocks) == 4
    post = model("sasrec", 2, norm_first=False, num_heads=2)
    with pytest.warns(UserWarning, match="model.layout=post"):
        StackingCallback(at_epochs=[1]).setup(trainer, post, "fit")


def test_a_config_built_model_takes_a_stacked_checkpoints_dilations():
    m = model("nextitnet", 2)
    stack_module(m, options("adjacent", "function_preserving"))  # copies keep their source's dilation
    ckpt = {"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams)}
    assert ckpt["hyper_parameters"]["block_dilations"] == [1, 1, 4, 4]
    built = SeqRecModule(num_items=40, arch="nextitnet", num_blocks=4, d_model=16, max_len=12, dropout=0.0)
    assert [b.dilation for b in built.encoder.blocks] == [1, 4, 1, 4]  # positional, from the config
    built.on_load_checkpoint(ckpt)
    built.load_state_dict(ckpt["state_dict"])
    assert [b.dilation for b in built.encoder.blocks] == [1, 1, 4, 4]
    assert built.hparams.block_dilations == [1, 1, 4, 4]
    x = torch.randint(1, 41, (3, 12))
    torch.testing.assert_close(built.eval()(x), m.eval()(x), rtol=0, atol=0)


def test_stacking_a_rocket_module_is_refused_before_training(tmp_path):
    args = [a for a in tiny(tmp_path, epochs=2) if a != "model.d_model=16"]
    with pytest.raises(ConfigError, match="applies to a single NextItNet or SASRec model, not to RocketModule"):
        run(["fit", *args, "model=rocket", "model.booster.d_model=16", "model.light.d_model=16", "callbacks=rocket",
             "+callbacks.stacking._target_=lightning_rec.methods.stackrec.StackingCallback",
             "+callbacks.stacking.at_epochs=[1]"])
    assert not list((tmp_path / "runs").rglob("*.ckpt"))  # nothing trained


def test_a_stack_that_never_came_is_reported():
    from lightning_rec.methods.stackrec import StackingCallback

    m = SeqRecModule(num_items=40, arch="nextitnet", num_blocks=1, d_model=8, dropout=0.0)
    with pytest.warns(UserWarning, match=r"callbacks.stacking: step:500 not reached \(the run ended at step 4"):
        _fit_steps(m, [StackingCallback(at_steps=[2, 500])], 4)
    assert len(m.encoder.blocks) == 2  # the one that came did happen
