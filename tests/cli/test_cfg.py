"""``--cfg``: print the composed config and run nothing, in Hydra's forms (job, hydra, all) and ours (bare)."""

import pytest
import yaml

from lightning_rec.cli import run
from lightning_rec.errors import ConfigError


def _printed(capsys, *args):
    assert run(["fit", *args, "trainer.max_epochs=3", "runs_dir=/nonexistent/never-made"]) is None
    return capsys.readouterr().out


@pytest.mark.parametrize("flag", [["--cfg"], ["--cfg", "job"], ["--cfg=job"], ["-c", "job"]])
def test_cfg_job_prints_the_run_config_only(capsys, flag):
    cfg = yaml.safe_load(_printed(capsys, *flag))
    assert cfg["trainer"]["max_epochs"] == 3 and "hydra" not in cfg and "model" in cfg


def test_cfg_hydra_prints_hydras_node_with_the_overrides(capsys):
    cfg = yaml.safe_load(_printed(capsys, "--cfg", "hydra"))
    assert set(cfg) == {"hydra"}
    assert "trainer.max_epochs=3" in cfg["hydra"]["overrides"]["task"]


def test_cfg_all_prints_both_and_resolve_resolves(capsys):
    text = _printed(capsys, "--cfg", "all")
    assert "hydra:" in text and "max_epochs: 3" in text
    unresolved = _printed(capsys, "--cfg", "job")
    resolved = _printed(capsys, "--cfg", "job", "--resolve")
    assert "${" in unresolved and "${" not in resolved


@pytest.mark.parametrize("flag", [["--cfg", "bogus"], ["--cfg=everything"]])
def test_a_bad_cfg_part_is_a_one_line_error(flag):
    with pytest.raises(ConfigError, match="expected one of job, hydra, all"):
        run(["fit", *flag])


def _composed(capsys, *args):
    run(["fit", *args, "--cfg", "--resolve"])
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("preset,ml1m", [("sasrec_plus", "ml1m_sasrec_ref"), ("sasrec_plus_allwin", "ml1m_sasrec_allwin")])
def test_the_sasrec_plus_presets_take_any_data_and_are_named_after_it(capsys, tmp_path, preset, ml1m):
    path = tmp_path / "shop-clicks.csv.gz"
    mine = _composed(capsys, f"experiment={preset}", "data=file", f"data.path={path}")
    assert mine["name"] == f"{preset.replace('_', '-')}-shop-clicks" and mine["data"]["name"] == "file"
    assert mine["data"]["path"] == str(path) and mine["data"]["format"] == "auto"
    theirs = _composed(capsys, f"experiment={ml1m}", f"data.path={path}")
    # everything but the data and the run's name is the ML-1M preset's
    for key in ("model", "optimizer", "scheduler", "trainer", "callbacks", "eval"):
        assert mine[key] == theirs[key], key
    assert {k: mine["data"][k] for k in ("max_len", "batch_size", "train_windows")} == \
        {k: theirs["data"][k] for k in ("max_len", "batch_size", "train_windows")}


def test_a_file_dataset_names_its_runs_after_the_file(capsys, tmp_path):
    assert _composed(capsys, "data=file", f"data.path={tmp_path / 'ratings.dat'}")["name"] == "sasrec-ratings"
    assert _composed(capsys, "data=file")["name"] == "sasrec-file"  # no path yet: the dataset's name
    assert _composed(capsys, "data=ml-1m", f"data.path={tmp_path / 'x.txt'}")["name"] == "sasrec-ml-1m"
