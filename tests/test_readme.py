"""Every command the README prints composes: its config groups and options exist (a renamed option or a typo
in the docs fails here). Commands are read from the README's ```bash blocks; `<...>` placeholders become a
file name. Running them is the job of the feature tests; this checks the documentation against the configs."""

import contextlib
import io
import os
import re
import shlex

import pytest

from lightning_rec.cli import run

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def readme_commands() -> list[str]:
    text = open(README, encoding="utf-8").read()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            for prefix in ("python -m lightning_rec ", "lightning-rec "):
                if line.startswith(prefix):
                    cmds.append(line[len(prefix):])
    return cmds


COMMANDS = readme_commands()


def test_the_readme_has_commands_for_every_command():
    assert len(COMMANDS) >= 50
    assert {c.split()[0] for c in COMMANDS} >= {"fit", "test", "predict", "stack", "export", "federate"}


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_composes(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [a for a in shlex.split(re.sub(r"<[^>]*>", "placeholder", command), comments=True) if a != "&"]
    if "sweep.dir=runs/sweep/placeholder" in args:  # continuing a sweep reads its folder: the option is known
        with pytest.raises(Exception, match="no sweep.json there"):
            run(args + ["--cfg"])
        return
    with contextlib.redirect_stdout(io.StringIO()) as out:
        run(args + ["--cfg"])
    assert out.getvalue().strip(), command
