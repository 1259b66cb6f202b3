"""A non-editable install finds its configs and callbacks without the source tree."""

import os
import subprocess
import sys
import venv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_install_runs_the_cli_from_elsewhere(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = str(env_dir / "bin" / "python")
    # Build and install a real wheel (no editable finder), using the already installed dependencies.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), ROOT], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("lightning_rec-*.whl"))
    subprocess.run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                    str(tmp_path / "site"), str(wheel)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    code = ("import lightning_rec, lightning_rec.callbacks as c, lightning_rec.conf as f;"
            "print(lightning_rec.__file__); print(c.RNGStateCallback.__name__)")
    p = subprocess.run([py, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert str(tmp_path / "site") in p.stdout.splitlines()[0]
    p = subprocess.run([py, "-m", "lightning_rec", "fit", "model=nextitnet", "data=ml-1m", "--cfg"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "arch: nextitnet" in p.stdout and "name: ml-1m" in p.stdout
