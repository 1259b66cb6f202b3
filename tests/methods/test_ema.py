"""EMACallback: the average against a hand computation, what fit's test evaluates, exact resume, stacking."""

import os

import pytest
import torch
from conftest import tiny
from ddp_probe import StepWeights

from lightning_rec.cli import run
from lightning_rec.errors import ConfigError
from lightning_rec.methods.ema import EMACallback
from lightning_rec.methods.topk.strategy import TopKAveragingStrategy


def fit(tmp_path, *extra, epochs=2):
    return run(["fit", *tiny(tmp_path, "callbacks=ema", *extra, epochs=epochs)])


def last(out):
    return torch.load(os.path.join(out["run_dir"], "checkpoints", "last.ckpt"), weights_only=True)


def test_the_checkpointed_average_is_the_hand_computed_ema(tmp_path):
    StepWeights.steps = []
    out = fit(tmp_path, "callbacks.ema.decay=0.7", "+callbacks.steps._target_=ddp_probe.StepWeights",
              "test_after_fit=false")
    steps = StepWeights.steps
    assert len(steps) == 14  # 200 users / batch 32 = 7 steps, 2 epochs
    ema = {k: v.clone() for k, v in steps[0].items()}  # the first update copies the weights
    for w in steps[1:]:
        for k in ema:
            ema[k] = 0.7 * ema[k] + 0.3 * w[k]
    ck = last(out)
    assert ck["ema"] == {"decay": 0.7}
    for k in ema:
        torch.testing.assert_close(ck["state_dict"][k], ema[k], rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(ck["current_model_state"][k], steps[-1][k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(ema[k], steps[-1][k]) for k in ema)  # the average is not the raw model


def test_fit_tests_the_average_like_the_test_command(tmp_path):
    # Lightning's own callback puts the raw weights back when fit's test loads the best checkpoint.
    out = fit(tmp_path, "callbacks.ema.decay=0.9", epochs=3)
    again = run(["test", f"ckpt_path={out['best_ckpt']}", "trainer.enable_progress_bar=false",
                 f"runs_dir={tmp_path / 'runs'}", "data.synthetic.num_users=200", "data.synthetic.num_items=50"])
    assert again == pytest.approx(out["test"], abs=1e-6)
    raw = fit(tmp_path / "raw", "~callbacks.ema", epochs=3)
    assert raw["test"] != pytest.approx(out["test"], abs=1e-6)  # the average changes the tested model


def test_test_and_predict_evaluate_the_raw_weights_with_weights_raw(tmp_path):
    out = fit(tmp_path, "callbacks.ema.decay=0.9", "test_after_fit=false", epochs=2)
    common = ["trainer.enable_progress_bar=false", f"runs_dir={tmp_path / 'runs'}",
              "data.synthetic.num_users=200", "data.synthetic.num_items=50"]
    path = os.path.join(out["run_dir"], "checkpoints", "last.ckpt")
    ck = torch.load(path, weights_only=True)
    # the oracle: the same checkpoint with the raw weights moved into state_dict
    ck["state_dict"] = ck.pop("current_model_state")
    torch.save(ck, tmp_path / "raw_only.ckpt")
    oracle = run(["test", f"ckpt={tmp_path / 'raw_only.ckpt'}", *common])
    raw = run(["test", f"ckpt={path}", "weights=raw", *common])
    average = run(["test", f"ckpt={path}", *common])
    assert raw == oracle
    assert raw != average
    predicted = run(["predict", f"ckpt={path}", "weights=raw", f"predict.out={tmp_path / 'raw.tsv'}", *common])
    expected = run(["predict", f"ckpt={tmp_path / 'raw_only.ckpt'}", f"predict.out={tmp_path / 'oracle.tsv'}", *common])
    assert open(predicted).read() == open(expected).read()
    with pytest.raises(ConfigError, match="weights=raw: .*raw_only.ckpt holds one set of weights"):
        run(["test", f"ckpt={tmp_path / 'raw_only.ckpt'}", "weights=raw", *common])
    with pytest.raises(ConfigError, match="weights='ema': expected 'average'"):
        run(["test", f"ckpt={path}", "weights=ema", *common])
    with pytest.raises(ConfigError, match="weights=raw: chooses the weights `test` and `predict` evaluate; `fit`"):
        run(["fit", *tiny(tmp_path, "weights=raw")])


def test_resume_with_ema_is_exact(tmp_path):
    common = ["callbacks.ema.decay=0.8", "trainer.deterministic=true"]
    full = fit(tmp_path / "a", *common, epochs=3)
    fit(tmp_path / "b", *common, "test_after_fit=false", epochs=1)
    resumed = fit(tmp_path / "b", *common, "ckpt_path=last", epochs=3)
    assert resumed["test"] == full["test"]
    a, b = last(full), last(resumed)
    for part in ("state_dict", "current_model_state"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=0, msg=f"{part} {k}")


def test_topk_resume_before_the_averages_first_update_is_exact(tmp_path):
    # start_step=7: the epoch-1 checkpoint (7 steps) holds no average yet; the resume must make its first copy
    # at the same round as the uninterrupted run, not at the resume
    common = ["callbacks.ema.decay=0.8", "callbacks.ema.start_step=7", "trainer=topk", "trainer.devices=1",
              "trainer.strategy.h=3", "trainer.deterministic=true", "model.dropout=0", "test_after_fit=false"]
    full = fit(tmp_path / "a", *common, epochs=2)
    part = fit(tmp_path / "b", *common, epochs=1)
    assert int(last(part)["averaging_state"]["n_averaged"]) == 0
    resumed = fit(tmp_path / "b", *common, "ckpt_path=last", epochs=2)
    a, b = last(full), last(resumed)
    for part_name in ("state_dict", "current_model_state"):
        for k in a[part_name]:
            torch.testing.assert_close(a[part_name][k], b[part_name][k], rtol=0, atol=0, msg=f"{part_name} {k}")


def test_resuming_with_another_decay_says_so(tmp_path, caplog):
    fit(tmp_path, "callbacks.ema.decay=0.8", "test_after_fit=false", epochs=1)
    caplog.clear()
    # the logger rank_zero_info writes to, at INFO whatever an earlier test in this process left it at
    caplog.set_level("INFO", logger="pytorch_lightning.utilities.rank_zero")
    with caplog.at_level("INFO"):
        fit(tmp_path, "callbacks.ema.decay=0.9", "ckpt_path=last", "test_after_fit=false", epochs=2)
    assert "average was kept with decay 0.8; it continues with callbacks.ema.decay=0.9" in caplog.text
    assert last_ckpt_decay(tmp_path) == 0.9


def last_ckpt_decay(tmp_path):
    ckpts = sorted((tmp_path / "runs").rglob("last.ckpt"), key=os.path.getmtime)
    return torch.load(ckpts[-1], weights_only=True)["ema"]["decay"]


@pytest.mark.parametrize("stop_at", [1, 2])  # resume before the stack, and after it
def test_the_average_restarts_at_a_stack_and_resumes_across_it(tmp_path, stop_at):
    common = ["model=nextitnet", "model.num_blocks=2", "callbacks=stacking", "callbacks.stacking.at_epochs=[1]",
              "+callbacks.ema._target_=lightning_rec.methods.ema.EMACallback", "+callbacks.ema.decay=0.8",
              "trainer.deterministic=true"]
    full = run(["fit", *tiny(tmp_path / "a", *common, epochs=3)])
    ck = last(full)
    assert ck["hyper_parameters"]["num_blocks"] == 4
    assert set(ck["state_dict"]) == set(ck["current_model_state"])
    assert any(k.startswith("encoder.blocks.3.") for k in ck["state_dict"])
    run(["fit", *tiny(tmp_path / "b", *common, "test_after_fit=false", epochs=stop_at)])
    resumed = run(["fit", *tiny(tmp_path / "b", *common, "ckpt_path=last", epochs=3)])
    assert resumed["test"] == full["test"]
    b = last(resumed)
    for part in ("state_dict", "current_model_state"):
        for k in ck[part]:
            torch.testing.assert_close(ck[part][k], b[part][k], rtol=0, atol=0, msg=f"{part} {k}")


@pytest.mark.parametrize("kw, option", [({"decay": 1.0}, "decay"), ({"decay": 0}, "decay"),
                                        ({"start_step": -1}, "start_step"), ({"every_n_steps": 0}, "every_n_steps")])
def test_bad_options_are_one_line_errors(kw, option):
    with pytest.raises(ConfigError, match=f"callbacks.ema.{option}"):
        EMACallback(**kw)


def test_under_topk_the_average_follows_the_global_model_once_a_round(tmp_path, monkeypatch):
    # 200 users / batch 32 = 7 steps an epoch; h=3: rounds after steps 3 and 6, and one of 1 step before each
    # validation. Each round folds the global model in with decay ** (steps since the last update).
    rounds = []
    exchange = TopKAveragingStrategy._exchange

    def recording(self, *args, **kwargs):
        steps = self.steps_in_round
        exchange(self, *args, **kwargs)
        rounds.append((steps, {n: t.detach().clone() for n, t in self.lightning_module.state_dict().items()}))

    start = EMACallback.on_train_start

    def recording_start(self, trainer, pl_module):
        rounds.append((0, {n: t.detach().clone() for n, t in pl_module.state_dict().items()}))
        start(self, trainer, pl_module)

    monkeypatch.setattr(TopKAveragingStrategy, "_exchange", recording)
    monkeypatch.setattr(EMACallback, "on_train_start", recording_start)
    out = fit(tmp_path, "callbacks.ema.decay=0.7", "trainer=topk", "trainer.devices=1", "trainer.strategy.h=3",
              "test_after_fit=false")
    assert [n for n, _ in rounds] == [0, 3, 3, 1, 3, 3, 1]
    ema = {k: v.clone() for k, v in rounds[0][1].items()}  # the average starts from the model every rank starts from
    for n, w in rounds[1:]:
        for k in ema:
            ema[k] = 0.7 ** n * ema[k] + (1 - 0.7 ** n) * w[k]
    ck = last(out)
    for k in ema:
        torch.testing.assert_close(ck["state_dict"][k], ema[k], rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(ck["current_model_state"][k], rounds[-1][1][k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(ema[k], rounds[-1][1][k]) for k in ema)
    assert ck["callbacks"]["EMACallback"]["round_seen"] == 6


def test_ema_every_n_steps_under_topk_is_refused():
    class FakeTrainer:
        strategy = TopKAveragingStrategy(k=2, h=4)

    with pytest.raises(ConfigError, match="callbacks.ema.every_n_steps=2: under trainer=topk"):
        EMACallback(every_n_steps=2).setup(FakeTrainer(), torch.nn.Linear(2, 2), "fit")


@pytest.mark.ddp
def test_ema_under_two_process_topk_is_the_same_on_both_ranks_and_resumes_exactly(tmp_path):
    from test_topk import equal_length_file, launch, max_diff

    # 64 users: 4 steps of 8 per rank per epoch; h=3 and no validation: rounds cross epochs, and an epoch's
    # last.ckpt is written mid-round
    data = equal_length_file(tmp_path)
    common = ("callbacks=ema", "callbacks.ema.decay=0.8", "data=file", f"data.path={data}", "model.dropout=0",
              "data.max_len=12", "data.batch_size=8", "trainer=topk", "trainer.devices=2", "trainer.strategy.h=3",
              "trainer.strategy.k=2", "trainer.limit_val_batches=0")
    full, _ = launch(tmp_path, "full", *common, epochs=3)
    assert max_diff(full[0]["params"], full[1]["params"]) == 0.0  # every rank ends on the one average
    ck = torch.load(next((tmp_path / "full" / "runs").glob("*/*/checkpoints/last.ckpt")), weights_only=True)
    assert max_diff(full[0]["params"], ck["state_dict"]) == 0.0
    assert max_diff(full[0]["params"], ck["current_model_state"]) > 0  # the global model is not the average
    launch(tmp_path, "part", *common, epochs=1)
    part = next((tmp_path / "part" / "runs").glob("*/*/checkpoints/last.ckpt"))
    state = torch.load(part, weights_only=False)
    assert state["topk_averaging"]["steps_in_round"] == 1 and state["callbacks"]["EMACallback"]["round_seen"] == 1
    resumed, _ = launch(tmp_path, "resumed", *common, f"ckpt_path={part}", epochs=3)
    for r in (0, 1):
        assert max_diff(full[r]["params"], resumed[r]["params"]) < 1e-6


@pytest.mark.ddp
def test_ema_under_two_process_ddp_ends_both_ranks_on_the_checkpointed_average(tmp_path):
    from test_topk import launch, max_diff

    ranks, _ = launch(tmp_path, "ema", "callbacks=ema", "callbacks.ema.decay=0.8", "trainer=ddp", "trainer.devices=2")
    assert max_diff(ranks[0]["params"], ranks[1]["params"]) == 0.0
    ck = torch.load(next((tmp_path / "ema" / "runs").glob("*/*/checkpoints/last.ckpt")), weights_only=True)
    assert max_diff(ranks[0]["params"], ck["state_dict"]) == 0.0  # the model ends as the average
    assert max_diff(ranks[0]["params"], ck["current_model_state"]) > 0


def test_resuming_an_averaged_run_without_the_callback_is_refused(tmp_path):
    fit(tmp_path, "test_after_fit=false", epochs=1)
    with pytest.raises(ConfigError, match="the run averaged its weights .*callbacks=ema"):
        run(["fit", *tiny(tmp_path, "ckpt_path=last", epochs=2)])


def test_before_its_first_update_the_average_is_the_current_model(tmp_path):
    # start_step beyond the run: the average never updates, so every use of it must see the raw weights
    # (Lightning's callback would validate and ship the initial random weights)
    out = fit(tmp_path, "callbacks.ema.start_step=1000", epochs=2)
    raw = fit(tmp_path / "raw", "~callbacks.ema", epochs=2)
    assert out["test"] == pytest.approx(raw["test"], abs=1e-6)
    ck = last(out)
    for k, v in ck["current_model_state"].items():
        torch.testing.assert_close(ck["state_dict"][k], v, rtol=0, atol=0, msg=k)
