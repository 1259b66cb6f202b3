"""A non-editable install finds its configs and callbacks without the source tree.

The wheel is installed into a folder of its own and run by this interpreter with that folder first on its path, so
the test depends on nothing but the dependencies this interpreter already has (no venv, no resolver, no network)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_install_runs_the_cli_from_elsewhere(tmp_path):
    py = sys.executable
    # Build and install a real wheel (no editable finder), using the already installed dependencies.
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path / "dist"), ROOT], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("lightning_rec-*.whl"))
    p = subprocess.run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                        str(tmp_path / "site"), str(wheel)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "PYTHONNOUSERSITE": "1"}
    code = ("import lightning_rec, lightning_rec.callbacks as c, lightning_rec.conf as f;"
            "print(lightning_rec.__file__); print(c.RNGStateCallback.__name__)")
    p = subprocess.run([py, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert str(tmp_path / "site") in p.stdout.splitlines()[0]  # the wheel's copy, not the source tree
    p = subprocess.run([py, "-m", "lightning_rec", "fit", "model=nextitnet", "data=ml-1m", "--cfg"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "arch: nextitnet" in p.stdout and "name: ml-1m" in p.stdout
