"""`fit`: run folders, resume, checkpoints, loggers, experiment configs (lightning_rec/cli/fit.py)."""

import csv
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import tiny

from lightning_rec import SeqRecModule
from lightning_rec.cli import run
from lightning_rec.errors import ConfigError


def fit(tmp_path, *extra, epochs=2):
    return run(["fit", *tiny(tmp_path, *extra, epochs=epochs)])


def test_fit_writes_a_complete_run_folder(tmp_path):
    out = fit(tmp_path)
    rd = out["run_dir"]
    assert sorted(os.listdir(rd)) == ["checkpoints", "config.yaml", "csv", "id_maps.json", "result.json"]
    with open(os.path.join(rd, "result.json")) as f:
        assert json.load(f) == json.loads(json.dumps(out))  # the run's outcome, as fit returned it
    ckpts = sorted(os.listdir(os.path.join(rd, "checkpoints")))
    assert "last.ckpt" in ckpts and any(c.startswith("epoch") for c in ckpts)
    assert out["best_ckpt"].endswith(".ckpt") and os.path.exists(out["best_ckpt"])
    maps = json.load(open(os.path.join(rd, "id_maps.json")))
    assert maps["items"][0] == "<pad>" and len(maps["users"]) == 200
    assert set(out["test"]) >= {f"test/{m}@{k}" for m in ("hr", "ndcg", "mrr") for k in (5, 10, 20)}
    rows = list(csv.DictReader(open(os.path.join(rd, "csv", "version_0", "metrics.csv"))))
    assert any(r.get("val/ndcg@10") for r in rows) and any(r.get("train/loss_step") for r in rows)


def test_a_new_run_never_overwrites_an_old_one(tmp_path):
    a = fit(tmp_path, "trainer.max_epochs=1")["run_dir"]
    b = fit(tmp_path, "trainer.max_epochs=1")["run_dir"]
    assert a != b and os.path.exists(os.path.join(a, "checkpoints", "last.ckpt"))
    with pytest.raises(ConfigError, match="already holds a run"):
        fit(tmp_path, f"run_dir={a}")


@pytest.mark.parametrize("model", ["sasrec", "nextitnet"])
def test_resume_ends_exactly_like_an_uninterrupted_run(tmp_path, model):
    common = [
        f"model={model}",
        "model.dropout=0.3",
        "trainer.deterministic=true",
        "model.loss=sampled_softmax",
        "model.num_negatives=20",
    ]
    full = fit(tmp_path / "a", *common, epochs=4)
    half = fit(tmp_path / "b", *common, "test_after_fit=false", epochs=2)
    resumed = fit(tmp_path / "b", *common, "ckpt_path=last", epochs=4)
    assert resumed["run_dir"] == half["run_dir"]  # continues in its own folder
    assert resumed["test"] == full["test"]
    a = torch.load(os.path.join(full["run_dir"], "checkpoints", "last.ckpt"), weights_only=True)
    b = torch.load(os.path.join(resumed["run_dir"], "checkpoints", "last.ckpt"), weights_only=True)
    assert a["epoch"] == b["epoch"] == 3 and a["global_step"] == b["global_step"]
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=0, msg=k)
    ea, eb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    torch.testing.assert_close(ea[0]["exp_avg"], eb[0]["exp_avg"], rtol=0, atol=0)


def test_last_checkpoint_is_the_latest_epoch_even_when_it_is_not_the_best(tmp_path):
    # mode=min: the best (lowest NDCG) is an early epoch; Lightning 2.6 alone would leave last.ckpt there.
    out = fit(tmp_path, "callbacks.model_checkpoint.mode=min", "test_after_fit=false", epochs=3)
    last = torch.load(os.path.join(out["run_dir"], "checkpoints", "last.ckpt"), weights_only=True)
    best = torch.load(out["best_ckpt"], weights_only=True)
    assert last["epoch"] == 2 and best["epoch"] < 2


def test_checkpoint_loads_weights_only_and_rebuilds_the_model(tmp_path):
    out = fit(tmp_path, "model=nextitnet", "model.num_blocks=3", "model.tied_embeddings=false")
    path = out["best_ckpt"]
    raw = torch.load(path, weights_only=True)
    assert raw["hyper_parameters"]["num_blocks"] == 3
    m = SeqRecModule.load_from_checkpoint(path, weights_only=True).eval()
    assert len(m.encoder.blocks) == 3 and m.output is not None
    res = run(
        [
            "test",
            f"ckpt_path={path}",
            "trainer.enable_progress_bar=false",
            f"runs_dir={tmp_path / 'runs'}",
            "data.synthetic.num_users=200",
            "data.synthetic.num_items=50",
        ]
    )
    assert res == pytest.approx(out["test"], abs=1e-6)
    again = run(
        [
            "test",
            f"ckpt={path}",
            "trainer.enable_progress_bar=false",
            f"runs_dir={tmp_path / 'runs'}",
            "data.synthetic.num_users=200",
            "data.synthetic.num_items=50",
        ]
    )  # ckpt= as in stack and export
    assert again == res


def test_loggers_none_csv_and_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = fit(tmp_path / "n", "logger=none", epochs=1)
    assert "csv" not in os.listdir(out["run_dir"])
    out = fit(tmp_path / "w", "logger=wandb", "test_after_fit=false", epochs=1)
    rd = out["run_dir"]
    wid = open(os.path.join(rd, "wandb_id.txt")).read().strip()
    assert os.path.isdir(os.path.join(rd, "wandb")) and any(
        wid in d for d in os.listdir(os.path.join(rd, "wandb"))
    )
    # The resumed run logs to the same W&B run id.
    fit(tmp_path / "w", "logger=wandb", "ckpt_path=last", "test_after_fit=false", epochs=2)
    assert open(os.path.join(rd, "wandb_id.txt")).read().strip() == wid


def test_sampled_protocol_is_labelled(tmp_path):
    out = fit(tmp_path, "eval.protocol=sampled", "eval.num_negatives=5", epochs=1)
    assert out["test"] and all(k.startswith("test/sampled_") for k in out["test"])


@pytest.mark.parametrize("loss", ["ce", "sampled_softmax", "sampled_softmax,popularity", "bce"])
def test_every_loss_learns(tmp_path, loss):
    loss, _, sampler = loss.partition(",")
    extra = [f"model.neg_sampler={sampler}"] if sampler else []
    out = fit(
        tmp_path, f"model.loss={loss}", "model.num_negatives=10", "optimizer.lr=0.005", *extra, epochs=4
    )
    rows = list(csv.DictReader(open(os.path.join(out["run_dir"], "csv", "version_0", "metrics.csv"))))
    losses = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    assert losses[-1] < losses[0]


def test_gpu_switches_are_harmless_on_cpu(tmp_path, caplog):
    import logging

    import yaml

    if torch.cuda.is_available():
        pytest.skip("checks the CPU fallback")
    caplog.set_level(logging.INFO)
    args = [
        a
        for a in tiny(tmp_path, "trainer=gpu", "model.compile=true", epochs=1)
        if a != "trainer.accelerator=cpu"
    ]
    out = run(["fit", *args])
    cfg = yaml.safe_load(open(os.path.join(out["run_dir"], "config.yaml")))
    assert cfg["trainer"]["accelerator"] == "cpu" and cfg["trainer"]["precision"] == "32-true"
    assert "model.compile=true ignored" in caplog.text and "no GPU on this machine" in caplog.text
    assert set(out["test"]) >= {"test/ndcg@10"}


@pytest.mark.parametrize("strategy", ["trainer.strategy=ddp", "trainer=ddp", "trainer=topk"])
def test_distributed_evaluation_equals_single_process(tmp_path, strategy):
    """Two gloo processes shard the users without duplicates; the reduced metrics equal one process's,
    under Lightning's DDP and under this project's two strategies (metered DDP, top-k averaging)."""
    # 201 users: a sampler that pads shards with duplicates would count one user twice.
    out = fit(tmp_path, "data.synthetic.num_users=201", epochs=1)
    ckpt = out["best_ckpt"]
    args = [
        sys.executable,
        "-m",
        "lightning_rec",
        "test",
        f"ckpt_path={ckpt}",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "data.eval_batch_size=16",
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    one = subprocess.run(
        args + [f"metrics_out={tmp_path / 'one.json'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    two = subprocess.run(
        args + [strategy, "trainer.devices=2", f"metrics_out={tmp_path / 'two.json'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in two.stdout + two.stderr  # really two processes
    assert (
        "test metrics" in one.stdout and "Tip:" not in one.stdout + one.stderr
    )  # Lightning's adverts are dropped
    m1, m2 = json.load(open(tmp_path / "one.json")), json.load(open(tmp_path / "two.json"))
    assert m1 and m1.keys() == m2.keys()
    for k in m1:
        assert abs(m1[k] - m2[k]) < 1e-6, (k, m1[k], m2[k])


def test_resume_guards(tmp_path):
    out = fit(tmp_path, "model=nextitnet", "model.num_blocks=2", epochs=1)
    other = tmp_path / "other.txt"
    other.write_text("".join(f"{u} {i}\n" for u in range(1, 20) for i in range(1, 8)))
    with pytest.raises(ConfigError, match="item catalogue .* differs"):
        fit(
            tmp_path,
            "model=nextitnet",
            f"ckpt_path={out['best_ckpt']}",
            "data=file",
            f"data.path={other}",
            epochs=2,
        )
    deep = tmp_path / "deep.ckpt"
    run(["stack", f"ckpt={out['best_ckpt']}", f"out={deep}"])
    with pytest.raises(ConfigError, match="holds weights only .* init_from="):
        fit(tmp_path, f"ckpt_path={deep}", epochs=2)
    with pytest.raises(ConfigError, match="predict.k=abc: expected a positive integer"):
        run(["predict", f"ckpt_path={out['best_ckpt']}", "predict.k=abc"])
    sas = fit(tmp_path / "s", "model=sasrec", "data.max_len=10", epochs=1)
    with pytest.raises(ConfigError, match="data.max_len=20 is longer than the SASRec position table"):
        run(["test", f"ckpt_path={sas['best_ckpt']}", "data.max_len=20"])


def test_a_failed_fit_does_not_leave_its_run_folder_to_the_next_command(tmp_path):
    from lightning_rec import runs

    with pytest.raises(ConfigError):
        fit(tmp_path, "model=nextitnet", "optimizer._target_=nope.Nope", epochs=1)
    assert runs.RUN_DIR_ENV not in os.environ


def test_every_experiment_config_runs(tmp_path, sasrec_file):
    """Each conf/experiment/*.yaml composes, builds and trains one epoch (shrunk by the overrides);
    the transfer experiment starts from the TS experiment's checkpoint, as its header says."""
    conf_dir = os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "conf", "experiment"
    )
    names = sorted(f[:-5] for f in os.listdir(conf_dir) if f.endswith(".yaml"))
    assert {
        "ml1m_sasrec",
        "ml1m_sasrec_ref",
        "ml1m_nextitnet",
        "stackrec_ts_ml1m",
        "stackrec_tf_ml1m",
        "rocket_ml1m",
        "topk_ml1m",
        "ddp_ml1m",
    } <= set(names)
    last = {}
    for name in [n for n in names if n != "stackrec_tf_ml1m"] + ["stackrec_tf_ml1m"]:
        extra = [f"init_from={last['stackrec_ts_ml1m']}"] if name == "stackrec_tf_ml1m" else []
        shrink = [o for o in tiny(tmp_path, epochs=1) if not o.startswith("data.synthetic.")]
        rocket = name.startswith("rocket")
        if rocket:  # two nets: shrink each
            shrink = [o for o in shrink if o != "model.d_model=16"] + [
                "model.booster.d_model=16",
                "model.light.d_model=8",
            ]
        if name in (
            "topk_ml1m",
            "ddp_ml1m",
        ):  # 4 processes in the preset; one here (multi-process: test_distributed)
            shrink.append("trainer.devices=1")
        if not name.startswith(("ml1m", "stackrec", "rocket", "topk", "ddp")):  # presets for any data
            extra = [*extra, "data=file"]
        out = run(["fit", f"experiment={name}", f"data.path={sasrec_file}", *shrink, *extra])
        assert out["test"]["test/light/ndcg@10" if rocket else "test/ndcg@10"] >= 0.0, name
        last[name] = os.path.join(out["run_dir"], "checkpoints", "last.ckpt")
        assert os.path.exists(last[name]), name
    import yaml

    def saved_config(name):  # the config.yaml of the preset's run
        return yaml.safe_load(open(os.path.join(os.path.dirname(os.path.dirname(last[name])), "config.yaml")))

    hp = torch.load(last["ml1m_sasrec_ref"], map_location="cpu", weights_only=True)["hyper_parameters"]
    assert (hp["layout"], hp["positions"], hp["attn_out_dropout"], hp["init_std"], hp["dropout"]) == (
        "pmixer",
        "left",
        False,
        0.02,
        0.1,
    )
    # ml1m_sasrec_allwin: the same model, every training target, EMA weights
    ck = torch.load(last["ml1m_sasrec_allwin"], map_location="cpu", weights_only=True)
    assert ck["hyper_parameters"] == hp
    assert any("EMACallback" in k for k in ck["callbacks"]), list(ck["callbacks"])
    cfg = saved_config("ml1m_sasrec_allwin")
    assert cfg["data"]["train_windows"] == "all" and cfg["callbacks"]["ema"]["decay"] == 0.995
    assert cfg["callbacks"]["early_stopping"]["patience"] == 10
    # rocket_ml1m: the benchmarked hint (1e-4 from epoch 4, gradient block) and sizes (4 blocks vs 1)
    rk = saved_config("rocket_ml1m")
    hint = rk["callbacks"]["hint"]
    assert (hint["kind"], hint["weight"], hint["schedule"], hint["start_epoch"], hint["block_gradient"]) == (
        "mse",
        1e-4,
        "start_epoch",
        4,
        True,
    )
    assert (
        rk["model"]["booster"]["num_blocks"],
        rk["model"]["light"]["num_blocks"],
        rk["trainer"]["max_epochs"],
    ) == (4, 1, 1)
    # topk_ml1m / ddp_ml1m: the benchmarked strategies, the same data, model and optimizer
    tk, dd = saved_config("topk_ml1m"), saved_config("ddp_ml1m")
    assert tk["trainer"]["strategy"]["_target_"].endswith("TopKAveragingStrategy")
    assert (tk["trainer"]["strategy"]["h"], tk["trainer"]["strategy"]["second_moment"]) == (
        32,
        "global_batch",
    )
    assert dd["trainer"]["strategy"]["_target_"].endswith("MeteredDDPStrategy")
    assert (tk["data"], tk["model"], tk["optimizer"]) == (dd["data"], dd["model"], dd["optimizer"])


def test_resume_keeps_the_runs_evaluation_settings(tmp_path):
    ev = [
        "eval.protocol=sampled",
        "eval.num_negatives=7",
        "eval.exclude_seen=false",
        "trainer.deterministic=true",
    ]
    full = fit(tmp_path / "a", *ev, epochs=2)
    fit(tmp_path / "b", *ev, "test_after_fit=false", epochs=1)
    # Resumed without repeating eval.*: the run goes on under its own protocol, negatives and seen-item rule.
    resumed = fit(tmp_path / "b", "ckpt_path=last", "trainer.deterministic=true", epochs=2)
    assert resumed["monitor"] == "val/sampled_ndcg@10"
    assert resumed["test"] == full["test"]
    # test (and predict) read the checkpoint the same way: its protocol, not the command line's default
    res = run(["test", f"ckpt_path={full['best_ckpt']}", "trainer.enable_progress_bar=false"])
    assert res == pytest.approx(full["test"]) and "test/sampled_ndcg@10" in res


def test_a_run_folder_is_a_checkpoint_argument(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    out = fit(tmp_path, epochs=2)
    run_dir = out["run_dir"]
    res = run(["test", f"ckpt_path={run_dir}", "trainer.enable_progress_bar=false"])
    assert res == pytest.approx(out["test"])  # the folder's best checkpoint, as fit tested it
    assert f"using {os.path.join(run_dir, 'checkpoints', os.path.basename(out['best_ckpt']))}" in caplog.text
    resumed = fit(tmp_path, f"ckpt_path={run_dir}", epochs=3)  # a resume takes the folder's last.ckpt
    assert resumed["run_dir"] == run_dir and resumed["epochs"] == 3
    with pytest.raises(ConfigError, match="a folder without checkpoints/last.ckpt"):
        run(["test", f"ckpt_path={tmp_path}"])


def test_lightnings_distributed_sampler_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="trainer.use_distributed_sampler=true: .*shard them twice"):
        fit(tmp_path, "trainer.use_distributed_sampler=true")


def _reader_overrides(tmp_path):
    """What `test`/`predict`/`stack` need to find and evaluate the tiny runs of these tests."""
    return [f"runs_dir={tmp_path / 'runs'}", "trainer.enable_progress_bar=false", "data.synthetic.num_users=200",
            "data.synthetic.num_items=50"]


def test_ckpt_path_last_never_resumes_a_run_of_another_name(tmp_path):
    fit(tmp_path, "test_after_fit=false", epochs=1)  # sasrec-synthetic
    with pytest.raises(
        ConfigError, match="no run named 'nextitnet-synthetic' .*runs with one: sasrec-synthetic"
    ):
        fit(tmp_path, "model=nextitnet", "ckpt_path=last")
    with pytest.raises(ConfigError, match="there are none"):
        fit(tmp_path / "empty", "ckpt_path=last")
    # the same rule for every command that reads a checkpoint
    last = next((tmp_path / "runs" / "sasrec-synthetic").glob("*/checkpoints/last.ckpt"))
    common = _reader_overrides(tmp_path)
    assert run(["test", "ckpt=last", *common]) == run(["test", f"ckpt={last}", *common])
    with pytest.raises(
        ConfigError, match="no run named 'nextitnet-synthetic' .*runs with one: sasrec-synthetic"
    ):
        run(["test", "ckpt=last", "model=nextitnet", *common])
    started = fit(tmp_path, "init_from=last", "test_after_fit=false", epochs=1)
    assert started["run_dir"] != str(last.parent.parent)
    run(["stack", "ckpt=last", f"out={tmp_path / 'deep.ckpt'}"] + common[:1])
    assert torch.load(tmp_path / "deep.ckpt", weights_only=True)["hyper_parameters"]["num_blocks"] == 4


def test_ckpt_best_is_the_newest_runs_recorded_best_checkpoint(tmp_path):
    out = fit(tmp_path, "test_after_fit=false", epochs=3)
    from lightning_rec import runs

    best = runs.resolve_checkpoint("best", str(tmp_path / "runs"), "sasrec-synthetic")
    assert best == out["best_ckpt"] and os.path.basename(best) != "last.ckpt"
    common = _reader_overrides(tmp_path)
    assert run(["test", "ckpt=best", *common]) == run(["test", f"ckpt={best}", *common])
    with pytest.raises(ConfigError, match="ckpt_path=best: a resume continues from where the run stopped"):
        fit(tmp_path, "ckpt_path=best")
    with pytest.raises(ConfigError, match="ckpt_path=best: no run named 'nextitnet-synthetic'"):
        run(["test", "ckpt=best", "model=nextitnet", *common])
    os.remove(os.path.join(out["run_dir"], "result.json"))  # as after a fit that was killed
    with pytest.raises(ConfigError, match="has no recorded best checkpoint"):
        run(["test", "ckpt=best", *common])
    # a newer run that kept no last.ckpt is still the newest run: its best, not the older run's
    newer = fit(tmp_path, "test_after_fit=false", "callbacks.model_checkpoint.save_last=false", epochs=2)
    assert not os.path.exists(os.path.join(newer["run_dir"], "checkpoints", "last.ckpt"))
    assert runs.resolve_checkpoint("best", str(tmp_path / "runs"), "sasrec-synthetic") == newer["best_ckpt"]


def test_a_failed_fit_ends_its_wandb_run_as_failed(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, "logger=wandb", "+callbacks.boom._target_=ddp_probe.Boom", epochs=1)
    assert wandb.run is None  # else the next fit in this process would log into the failed run


def test_fit_states_how_much_it_trains_on(tmp_path, caplog):
    import logging

    import yaml

    from lightning_rec.build import build_datamodule as _build_datamodule

    caplog.set_level(logging.INFO)
    counts = {}
    for mode in ("last", "all"):
        out = run(["fit", *tiny(tmp_path / mode, f"data.train_windows={mode}", "data.max_len=5", epochs=1)])
        m = re.search(
            rf"training: ([\d,]+) sequences \({mode} windows\), ([\d,]+) targets per epoch", caplog.text
        )
        assert m, caplog.text[-2000:]
        counts[mode] = tuple(int(g.replace(",", "")) for g in m.groups())
        caplog.clear()
    # every synthetic user has more than 7 items: 'last' trains on 5 targets each, 'all' on each training item
    # but the user's first
    assert counts["last"] == (200, 200 * 5)
    d = _build_datamodule(yaml.safe_load(open(os.path.join(out["run_dir"], "config.yaml")))["data"]).load()
    n = d.indptr[1:] - d.indptr[:-1]
    assert n.min() > 7 and counts["all"][1] == int((n - 3).sum()) and counts["all"][0] > 200


def test_resume_and_init_from_say_which_architecture_overrides_they_do_not_use(tmp_path, caplog):
    import yaml

    out = fit(tmp_path, "test_after_fit=false", epochs=1)  # sasrec, 2 blocks, d 16
    with caplog.at_level("INFO"):
        resumed = fit(tmp_path, "ckpt_path=last", "model.num_blocks=4", "test_after_fit=false", epochs=2)
    assert "so model.num_blocks=4 (it has 2) is not used (a resumed run keeps its architecture" in caplog.text
    saved = yaml.safe_load(open(next((tmp_path / "runs").rglob("config.resume-*.yaml"))))
    assert saved["model"]["num_blocks"] == 2 and resumed["epochs"] == 2
    caplog.clear()
    with caplog.at_level("INFO"):
        started = run(
            [
                "fit",
                *tiny(
                    tmp_path / "b",
                    f"init_from={out['run_dir']}/checkpoints/last.ckpt",
                    "model.num_blocks=3",
                    "test_after_fit=false",
                    epochs=1,
                ),
            ]
        )
    assert "so model.num_blocks=3 (it has 2) is not used (init_from keeps" in caplog.text
    assert yaml.safe_load(open(os.path.join(started["run_dir"], "config.yaml")))["model"]["num_blocks"] == 2


def test_threads_sets_torchs_cpu_threads_and_rejects_nonsense(tmp_path):
    before = torch.get_num_threads()
    try:
        fit(tmp_path, "threads=1", epochs=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    for bad in ("0", "two", "1.5"):
        with pytest.raises(ConfigError, match=f"threads={bad}: expected a whole number"):
            fit(tmp_path, f"threads={bad}", epochs=1)
    assert torch.get_num_threads() == before


def test_a_time_limit_says_where_it_stopped_the_run(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    out = fit(tmp_path, "trainer.max_time={seconds:3}", "trainer.max_epochs=100000", epochs=100000)
    text = " ".join(caplog.text.split())
    m = re.search(r"trainer.max_time=\{'seconds': 3\} stopped the run at step (\d+), (.*?) \((\d+) complete epochs\)", text)
    assert m, text[-2000:]
    result = json.load(open(os.path.join(out["run_dir"], "result.json")))
    assert result["stopped_by"] == "max_time" and result["stopped_at_step"] == int(m.group(1))
    assert result["epochs_complete"] == int(m.group(3)) and result["epochs"] - result["epochs_complete"] in (0, 1)
    partial = result["epochs"] != result["epochs_complete"]
    assert ("batches into epoch" in m.group(2)) == partial
    assert out["epochs"] < 100000


def test_callbacks_early_stopping_stops_on_the_monitor_and_says_so(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="pytorch_lightning.utilities.rank_zero")
    # lr 0: the monitor never improves after the first validation, so patience 2 ends the run after epoch 2
    out = fit(tmp_path, "callbacks=early_stopping", "callbacks.early_stopping.patience=2", "optimizer.lr=0.0",
              epochs=50)
    text = " ".join(caplog.text.split())
    assert re.search(r"early stopping: val/ndcg@10 did not improve by more than 0 for 2 validations "
                     r"\(best [0-9.]+\); stopped after epoch 2 at step \d+", text), text[-1500:]
    result = json.load(open(os.path.join(out["run_dir"], "result.json")))
    assert result["epochs"] == 3 and result["stopped_by"] == "early_stopping" and out["test"]
    # it combines with another callbacks preset
    from lightning_rec.config import load_config

    cfg = load_config(["callbacks=[ema,early_stopping]"])
    assert {"ema", "early_stopping", "model_checkpoint"} <= set(cfg.callbacks)
