"""The dependency floors pyproject.toml declares are true: with each floor version installed, every module
imports and a one-epoch fit runs. Marked ``floor`` (a network install, about a minute): ``pytest -m floor``,
run by CI once after the suite."""

import os
import re
import subprocess
import venv

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOORED = ("pytorch-lightning", "torchmetrics", "hydra-core", "wandb")


def declared_floors(section: str = "dependencies") -> dict[str, str]:
    """``name -> floor`` of pyproject.toml's main dependencies, or of an extra (``section="fast"``)."""
    text = open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
    deps = re.search(rf"^{section} = \[(.*?)\]", text, re.S | re.M).group(1)
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9][^",<]*)', deps))


def floor_venv(tmp_path, pins: list[str]) -> str:
    """A venv over this interpreter's packages with ``pins`` installed in it; returns its python."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    p = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins], capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return py


def test_the_floors_are_declared():
    floors = declared_floors()
    assert set(FLOORED) <= set(floors), floors


@pytest.mark.floor
def test_every_module_imports_and_fits_on_the_floor_versions(tmp_path):
    floors = declared_floors()
    py = floor_venv(tmp_path, [f"{name}=={floors[name]}" for name in FLOORED])
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


@pytest.mark.floor
def test_the_fast_reader_works_on_the_pandas_floor(tmp_path):
    """The ``fast`` extra's pandas floor: pandas' C parser reads every format, with the line reader's result."""
    floor = declared_floors("fast")["pandas"]
    py = floor_venv(tmp_path, [f"pandas=={floor}"])
    check = ("import numpy as np, pandas\n"
             "from lightning_rec.data import encode, read_sequences\n"
             "from lightning_rec.data.readers import _read_fast\n"
             "files = {'s.txt': ('sasrec', '1 5\\n2 7\\n1 6\\n'), 'r.dat': ('movielens', '1::5::3::9\\n1::6::4::2\\n'),\n"
             "         'u.data': ('udata', '1\\t5\\t3\\t9\\n1\\t6\\t4\\t2\\n'),\n"
             "         'r.csv': ('csv', 'user_id,item_id,timestamp\\nalice,b,5\\nalice,a,1\\nbob,c,3\\n')}\n"
             "for name, (fmt, text) in files.items():\n"
             "    open(name, 'w').write(text)\n"
             "    fast = _read_fast(name, fmt, 'user_id', 'item_id', 'timestamp', None, None, ',' if fmt == 'csv' else None)\n"
             "    slow = encode(read_sequences(name, fmt))\n"
             "    assert fast is not None, name\n"
             "    assert fast.user_ids == slow.user_ids and fast.item_ids == slow.item_ids, name\n"
             "    assert np.array_equal(fast.items, slow.items) and np.array_equal(fast.indptr, slow.indptr), name\n"
             "print(pandas.__version__)\n")
    p = subprocess.run([py, "-c", check], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split()[-1] == floor
