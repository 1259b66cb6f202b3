"""Sweeps (`fit -m`): expansion, the sweep folder, failures, continuing, the child-process path."""

import csv
import json
import os

import pytest
from conftest import tiny

from lightning_rec.cli import sweep as sweep_mod
from lightning_rec.cli import run
from lightning_rec.errors import ConfigError, LightningRecError


def test_expand_is_the_cartesian_product_last_override_fastest():
    swept, trials = sweep_mod.expand(
        ["model=sasrec", "optimizer.lr=1e-3,2e-3", "seed=range(1,4)", "+x=choice(a,b)"]
    )
    assert swept == ["optimizer.lr", "seed", "+x"]
    assert len(trials) == 2 * 3 * 2
    assert trials[0] == ["model=sasrec", "optimizer.lr=0.001", "seed=1", "+x=a"]
    assert trials[1] == ["model=sasrec", "optimizer.lr=0.001", "seed=1", "+x=b"]
    assert trials[2] == ["model=sasrec", "optimizer.lr=0.001", "seed=2", "+x=a"]
    assert trials[-1] == ["model=sasrec", "optimizer.lr=0.002", "seed=3", "+x=b"]
    assert sweep_mod.expand(["model.dilations=[1,2]", "seed=1,2"])[1][0] == [
        "model.dilations=[1,2]",
        "seed=1",
    ]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["seed=1"], "no swept option"),
        (["optimizer.lr=interval(0,1)"], r"interval\(0,1\): only lists"),
        (["run_dir=/tmp/x", "seed=1,2"], "own folder"),
        (["ckpt_path=last", "seed=1,2"], "own folder"),
        (
            ["model.d_modl=16,32"],
            r"trial 0 \(model.d_modl=16\): override 'model.d_modl': no such option",
        ),  # all composed first
        (["sweep.bogus=1", "seed=1,2"], "sweep.bogus"),
    ],
)
def test_sweep_option_errors_are_one_line(tmp_path, overrides, expected):
    with pytest.raises(ConfigError, match=expected) as e:
        run(["fit", "-m", f"runs_dir={tmp_path}", *overrides])
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "sweep")  # nothing was started


def test_flag_errors():
    with pytest.raises(ConfigError, match="is for fit"):
        run(["test", "-m", "seed=1,2"])
    with pytest.raises(ConfigError, match="add -m"):
        run(["fit", "sweep.dir=/tmp/nowhere"])


def test_cfg_lists_the_trials_and_runs_nothing(tmp_path, capsys):
    out = run(["fit", "-m", "--cfg", f"runs_dir={tmp_path}", "model.d_model=16,32", "seed=range(2)"])
    text = capsys.readouterr().out
    assert "4 trials" in text and "model.d_model=32 seed=1" in text
    assert len(out["trials"]) == 4 and not os.path.exists(tmp_path / "sweep")


def _summary(sweep_dir):
    with open(os.path.join(sweep_dir, "summary.csv")) as f:
        return list(csv.DictReader(f))


def _records(sweep_dir):
    with open(os.path.join(sweep_dir, "trials.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_sweep_runs_every_trial_in_its_own_folder_and_summarises(tmp_path, capsys):
    out = run(["fit", "-m", *tiny(tmp_path, "model.d_model=16,24", "seed=1,2", epochs=1)])
    sd = out["sweep_dir"]
    assert sd.startswith(str(tmp_path / "runs" / "sweep"))
    rows = _summary(sd)
    assert [(r["model.d_model"], r["seed"], r["status"]) for r in rows] == [
        ("16", "1", "ok"),
        ("16", "2", "ok"),
        ("24", "1", "ok"),
        ("24", "2", "ok"),
    ]
    for i, r in enumerate(rows):
        # each trial is an ordinary run: its own config, checkpoints and result.json agree with the summary
        trial = os.path.join(sd, f"trial-{i:03d}")
        assert r["run_dir"] == trial
        with open(os.path.join(trial, "result.json")) as f:
            res = json.load(f)
        assert float(r["best"]) == pytest.approx(res["best_score"])
        assert float(r["test/ndcg@10"]) == pytest.approx(res["test"]["test/ndcg@10"])
        cfg = open(os.path.join(trial, "config.yaml")).read()
        assert f"d_model: {r['model.d_model']}" in cfg and f"seed: {r['seed']}" in cfg
    best = max(rows, key=lambda r: float(r["best"]))
    assert out["best"]["trial"] == int(best["trial"])
    text = capsys.readouterr().out
    assert "over seeds" in text and "2/2" in text
    assert f"best: trial {best['trial']}" in text
    # two seeds of one setting differ (the seed reaches the run), the same seed does not repeat a folder
    assert rows[0]["best"] != rows[1]["best"]


def test_a_failed_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    # d_model=15 with 2 heads cannot be built: trial 1 fails inside fit, trial 0 and 2 finish
    with pytest.raises(LightningRecError, match=r"1 of 3 trials failed.*trial 1: .*not divisible") as e:
        run(["fit", "-m", *tiny(tmp_path, "model.num_heads=2", "model.d_model=16,15,18", epochs=1)])
    assert "\n" not in str(e.value)
    sd = str(e.value).split("sweep ", 1)[1].split(":", 1)[0]
    assert [r["status"] for r in _summary(sd)] == ["ok", "error", "ok"]
    # fail_fast stops at the first failure
    with pytest.raises(LightningRecError, match="fail_fast"):
        run(
            [
                "fit",
                "-m",
                "sweep.fail_fast=true",
                *tiny(tmp_path, "model.num_heads=2", "model.d_model=15,16", epochs=1),
            ]
        )


def test_continuing_a_sweep_keeps_finished_trials_and_resumes_the_interrupted_one(tmp_path, capsys):
    out = run(["fit", "-m", *tiny(tmp_path, "seed=1,2", epochs=2)])
    sd = out["sweep_dir"]
    first = {r["trial"]: r for r in _records(sd)}
    # as if the process died while trial 1 was training: its checkpoints exist, its record does not
    with open(os.path.join(sd, "trials.jsonl"), "w") as f:
        f.write(json.dumps(first[0]) + "\n")
    os.remove(os.path.join(sd, "summary.csv"))
    t0_mtime = os.path.getmtime(os.path.join(sd, "trial-000", "result.json"))
    capsys.readouterr()
    again = run(["fit", "-m", f"sweep.dir={sd}"])  # the stored overrides are used
    text = capsys.readouterr().out
    assert "1 already finished, 1 to run" in text and "resuming trial 1 from" in text
    assert (
        os.path.getmtime(os.path.join(sd, "trial-000", "result.json")) == t0_mtime
    )  # trial 0 did not run again
    recs = _records(sd)
    assert [r["trial"] for r in recs] == [0, 1]
    assert recs[1]["test"] == pytest.approx(
        first[1]["test"]
    )  # resumed from its end: the same best checkpoint
    assert [r["status"] for r in again["rows"]] == ["ok", "ok"]
    with pytest.raises(ConfigError, match="continue it with no other overrides"):
        run(["fit", "-m", f"sweep.dir={sd}", "seed=3,4"])
    with pytest.raises(ConfigError, match="not a sweep folder"):
        run(["fit", "-m", f"sweep.dir={tmp_path}", "seed=3,4"])


def test_a_multi_process_trial_runs_as_a_child_fit(tmp_path, monkeypatch):
    # trainer=ddp trials run as child `fit` commands; the plumbing is the same for any trainer
    monkeypatch.setattr(sweep_mod, "multi_process", lambda cfg: True)
    out = run(["fit", "-m", *tiny(tmp_path, "seed=choice(3)", epochs=1)])
    (row,) = out["rows"]
    assert row["status"] == "ok" and row["best"] is not None
    assert os.path.exists(os.path.join(out["sweep_dir"], "trial-000", "checkpoints", "last.ckpt"))


def test_each_trial_gets_its_own_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = [a for a in tiny(tmp_path, "model.d_model=16,24", epochs=1) if a != "logger=csv"]
    out = run(["fit", "-m", *args, "logger=wandb"])
    ids = []
    for i in range(2):
        trial = os.path.join(out["sweep_dir"], f"trial-{i:03d}")
        assert os.path.isdir(os.path.join(trial, "wandb")), trial  # not logged into trial 0's run
        ids.append(open(os.path.join(trial, "wandb_id.txt")).read())
    assert ids[0] != ids[1]
