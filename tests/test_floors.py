"""The dependency floors pyproject.toml declares are true: with each floor version installed, every module
imports and a one-epoch fit runs. Marked ``floor`` (a network install, about a minute): ``pytest -m floor``,
run by CI once after the suite."""

import os
import re
import subprocess
import sys
import venv

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOORED = ("pytorch-lightning", "torchmetrics", "hydra-core", "wandb")


def declared_floors() -> dict[str, str]:
    text = open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
    deps = re.search(r"^dependencies = \[(.*?)\]", text, re.S | re.M).group(1)
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9][^",<]*)', deps))


def test_the_floors_are_declared():
    floors = declared_floors()
    assert set(FLOORED) <= set(floors), floors


@pytest.mark.floor
def test_every_module_imports_and_fits_on_the_floor_versions(tmp_path):
    floors = declared_floors()
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    pins = [f"{name}=={floors[name]}" for name in FLOORED]
    p = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins], capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    check = ("import importlib, pkgutil, lightning_rec, pytorch_lightning, torchmetrics, hydra, wandb\n"
             "print(pytorch_lightning.__version__, torchmetrics.__version__, hydra.__version__, wandb.__version__)\n"
             "for m in pkgutil.walk_packages(lightning_rec.__path__, 'lightning_rec.'):\n"
             "    if not m.name.startswith('lightning_rec.methods.federated'):  # Flower: an extra, floored there\n"
             "        importlib.import_module(m.name)\n"
             "import lightning_rec.callbacks, lightning_rec.conf\n")
    p = subprocess.run([py, "-c", check], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    from packaging.version import Version

    assert [Version(v) for v in p.stdout.split()] == [Version(floors[n]) for n in FLOORED], p.stdout
    p = subprocess.run([py, "-m", "lightning_rec", "fit", "data=synthetic", "data.synthetic.num_users=64", "data.synthetic.num_items=50",
                        "trainer.max_epochs=1", "logger=csv", "model.d_model=16", f"runs_dir={tmp_path / 'runs'}"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env={**os.environ, "WANDB_MODE": "offline"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "test metrics" in p.stdout
