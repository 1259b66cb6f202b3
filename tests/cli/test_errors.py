"""Bad options and files end in one line that names them, and leave no run folder behind (lightning_rec/cli/)."""

import re
import subprocess
import sys

import pytest
import torch
from conftest import tiny

from lightning_rec.cli import run
from lightning_rec.errors import ConfigError, LightningRecError


def fit(tmp_path, *extra, epochs=2):
    return run(["fit", *tiny(tmp_path, *extra, epochs=epochs)])


def test_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2\n1 3\nnot-a-pair-line here extra\n")
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    cases = [
        (["fit", "foo=1"], "override 'foo': no such option"),
        (["fit", "model=gru4rec"], "model=gru4rec: unknown model; available: nextitnet, rocket, sasrec"),
        (["fit", "data=ml-2m"], "data=ml-2m: unknown data"),
        (["fit", "data=file", f"data.path={tmp_path / 'missing.txt'}"], "missing.txt' does not exist"),
        (["fit", "data=file", f"data.path={bad}"], "bad.txt line 3: expected 2 whitespace-separated fields"),
        (["fit", "model.loss=hinge"], "model.loss: unknown loss 'hinge'"),
        (["test"], "ckpt_path: required"),
        (["fit", "eval.ks=[5,20]"], "eval.monitor=val/ndcg@10: not a logged metric"),
        (["fit", "model.num_heads=3"], "model.d_model=64 is not divisible by model.num_heads=3"),
        (["stack", "ckpt=missing.ckpt", "out=x.ckpt"], "ckpt=missing.ckpt: no such checkpoint file"),
        (["export", "ckpt=missing.ckpt", "out=x.ckpt"], "ckpt=missing.ckpt: no such checkpoint file"),
        (
            ["fit", f"init_from={bad}"],
            f"init_from={bad}: not a checkpoint (expected a .ckpt written by lightning_rec",
        ),
        (
            ["test", f"ckpt={tensor}"],
            f"ckpt_path={tensor}: not a lightning_rec checkpoint (a torch file, but with no ",
        ),
        (
            ["fit", "model.num_blocks=1", "callbacks=kd", "callbacks.hint.teacher_ckpt=nope.ckpt"],
            "callbacks.hint.teacher_ckpt=nope.ckpt: no such checkpoint file",
        ),
        (["train"], "unknown command 'train'"),
        # an option of a group choice that is not selected, a misspelt option, a callback without its class
        (
            ["fit", "callbacks.ema.decay=0.9"],
            "it comes with callbacks=ema: add that (e.g. `callbacks=ema callbacks.ema",
        ),
        (["fit", "model.kernel_size=5"], "it comes with model=nextitnet"),
        (
            ["fit", "model.num_blokcs=2"],
            "override 'model.num_blokcs': no such option; did you mean model.num_blocks?",
        ),
        (
            ["fit", "+callbacks.ema.decay=0.9"],
            "callbacks.ema: has no _target_ (the class to build); select it with callbacks=ema",
        ),
    ]
    for argv, expect in cases:
        with pytest.raises(LightningRecError) as e:
            run(argv + [f"runs_dir={tmp_path / 'runs'}"])
        assert expect in str(e.value), (argv, str(e.value))
    with pytest.raises(
        ConfigError, match=f"runs_dir={bad}/x: cannot create the run folder .*expected a writable"
    ):
        run(["fit", f"runs_dir={bad}/x"])  # under a file
    with pytest.raises(ConfigError, match=f"predict.out={tmp_path}: a folder; expected a file path"):
        run(["predict", f"ckpt={tensor}", f"predict.out={tmp_path}", "predict.overwrite=true"])
        assert "\n" not in str(e.value)
    # optimizer errors are found before a run folder is made: nothing is left behind
    for argv, expect in [
        (["fit", "optimizer.lr=-1"], "optimizer (torch.optim.Adam): Invalid learning rate: -1.0"),
        (["fit", "optimizer=adashift", "optimizer.reduction=bogus"], "optimizer.reduction=bogus"),
        (
            ["fit", "optimizer._target_=torch.optim.Lion"],
            "optimizer._target_=torch.optim.Lion: cannot import it",
        ),
    ]:
        with pytest.raises(LightningRecError, match=re.escape(expect)):
            run(argv + [f"runs_dir={tmp_path / 'opt-runs'}"])
    assert not (tmp_path / "opt-runs").exists()


def test_cli_process_prints_one_line_and_exits_2(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "lightning_rec", "fit", "trainer.max_epoch=3"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert p.returncode == 2
    assert (
        p.stderr.strip().count("\n") == 0 and "trainer.max_epoch" in p.stderr and "Traceback" not in p.stderr
    )
    p = subprocess.run(["lightning-rec", "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "predict" in p.stdout


def test_bad_values_are_one_line_errors_and_leave_no_run_folder(tmp_path):
    bad = tmp_path / "bad.txt.gz"
    bad.write_text("1 2\n")  # not gzip
    for argv, expect in [
        (["trainer.max_epochs=abc"], "trainer.max_epochs='abc': expected an integer"),
        (["eval.chunk_size=0"], "eval.chunk_size=0: expected an integer >= 1"),
        (["eval.ks=[0,10]"], "eval.ks=[0, 10]: expected a list of positive integers"),
        (["data.batch_size=abc"], "data.batch_size='abc': expected an integer >= 1"),
        (["data=file", f"data.path={bad}"], f"data.path: cannot read '{bad}'"),
        (["data.min_rating=abc"], "data.min_rating='abc': expected a number"),
        (["model.d_model=0"], "model.d_model=0: expected an integer >= 1"),
        (["model.dropout=2"], "model.dropout=2: expected a number in [0, 1)"),
        (["model=nextitnet", "model.kernel_size=0"], "model.kernel_size=0: expected an integer >= 1"),
        (["model=nextitnet", "model.dilations=[0]"], "model.dilations=[0]: expected a non-empty list"),
    ]:
        with pytest.raises(LightningRecError, match=re.escape(expect)) as e:
            fit(tmp_path, *argv)
        assert "\n" not in str(e.value)
    runs_dir = tmp_path / "runs"
    assert not runs_dir.exists() or not any(p.is_dir() and not any(p.iterdir()) for p in runs_dir.rglob("*"))
    with pytest.raises(ConfigError, match=re.escape("model.light.num_blocks=0: expected an integer >= 1")):
        run(["fit", "model=rocket", "model.light.num_blocks=0", f"runs_dir={runs_dir}"])


def test_data_path_without_a_file_dataset_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="data=synthetic \\(the default\\) reads no file; add data=file"):
        fit(tmp_path, f"data.path={tmp_path / 'x.txt'}", epochs=1)


def test_a_bad_option_found_while_lightning_sets_up_leaves_no_run_folder(tmp_path):
    with pytest.raises(
        ConfigError, match="callbacks.stacking: applies to a single NextItNet or SASRec model"
    ):
        run(
            [
                "fit",
                "model=rocket",
                "callbacks=stacking",
                "callbacks.stacking.at_epochs=[1]",
                "logger=csv",
                f"runs_dir={tmp_path / 'runs'}",
                "trainer.max_epochs=1",
            ]
        )
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.yaml"))


def test_a_function_target_is_found_without_an_error_in_the_log(caplog):
    import logging

    from lightning_rec.modules.optim import _class, warmup_cosine

    with caplog.at_level(logging.DEBUG):
        assert _class("lightning_rec.modules.optim.warmup_cosine", "scheduler") is warmup_cosine
        with pytest.raises(ConfigError, match="scheduler._target_=torch.nope.X: cannot import it"):
            _class("torch.nope.X", "scheduler")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text  # hydra's 'Error getting class'
