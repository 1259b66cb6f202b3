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
