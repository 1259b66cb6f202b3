"""Deployment: a Flower SuperLink, one SuperNode per device, and this federation submitted as a Flower App.

The processes (any machines that reach the SuperLink's port; ``--insecure`` is plain HTTP)::

    flower-superlink --insecure --host 0.0.0.0 --port 8000 --disable-runtime-dependency-installation
    flower-supernode --insecure --superlink HOST:8000 --port 9094 \
        --node-config 'partition-id=0 num-partitions=2 state-dir="/path/for/device0"'      # one per device

then ``python -m lightning_rec federate federation.engine=deployment federation.superlink=HOST:8000
federation.num_devices=2 ...``. That command checks the options and the split as for a simulation,
creates the run folder, writes a Flower App into ``<run>/flower/app`` (a ``pyproject.toml`` whose
run config holds the composed config, and a module that exposes the ServerApp and ClientApp of
:mod:`lightning_rec.methods.federated.flower`), submits it with ``flwr run --stream`` and relays
the run's log (the round lines) until it ends. The ServerApp runs next to the SuperLink and writes
the run folder there (same path); each ClientApp runs next to its SuperNode and keeps the
device's state in the node's ``state-dir`` (default: ``<run>/devices`` at the same path on that
machine). Every machine needs this package installed and the data at the same path
(``data.path`` is made absolute before it is sent).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from typing import Any

from lightning_rec.errors import ConfigError
from lightning_rec.methods.federated.superlink import commands, parse_address

APP_MODULE = "lightning_rec_app"
CONNECTION = "lightning-rec"


def _listening(host: str, port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection((host, port), timeout=2):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)


def _flwr_cli() -> list[str]:
    here = os.path.join(os.path.dirname(sys.executable), "flwr")
    found = here if os.path.exists(here) else shutil.which("flwr")
    if not found:
        raise ConfigError("federation.engine=deployment: the `flwr` command is not installed; "
                          "pip install 'lightning_rec[federated]'")
    return [found]


# ---------------------------------------------------------------------- the Flower App
def portable_config(plain: dict[str, Any]) -> dict[str, Any]:
    """The composed config with its local paths made absolute (the apps run in other working folders)."""
    out = json.loads(json.dumps(plain))
    for section, key in (("data", "path"), ("data", "cache_dir"), (None, "runs_dir"), (None, "run_dir")):
        holder = out.get(section, {}) if section else out
        value = holder.get(key)
        if isinstance(value, str) and value and "://" not in value and "${" not in value:
            holder[key] = os.path.abspath(os.path.expanduser(value))
    return out


def write_app(app_dir: str, plain: dict[str, Any]) -> str:
    """A Flower App (``flwr run`` builds a FAB from it) whose run config carries the federation's config."""
    import tomli_w

    os.makedirs(app_dir, exist_ok=True)
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "lightning-rec-federation", "version": "1.0.0",
                    "description": "A lightning_rec federation (written by `lightning_rec federate`)",
                    "license": "Apache-2.0",
                    # nothing to install at run time: lightning_rec and flwr are on every machine
                    "dependencies": []},
        "tool": {"flwr": {"app": {
            "publisher": "lightning-rec",
            "components": {"serverapp": f"{APP_MODULE}:server", "clientapp": f"{APP_MODULE}:client"},
            "config": {"lightning-rec-config": json.dumps(plain)},
        }}},
    }
    with open(os.path.join(app_dir, "pyproject.toml"), "wb") as f:
        tomli_w.dump(project, f)
    with open(os.path.join(app_dir, f"{APP_MODULE}.py"), "w") as f:
        f.write('"""The ServerApp and ClientApp of a lightning_rec federation (lightning_rec.methods.federated)."""\n\n'
                "from lightning_rec.methods.federated.deploy import client_app, server_app\n\n"
                "server = server_app()\nclient = client_app()\n")
    return app_dir


def _config_of(context):
    from omegaconf import OmegaConf

    return OmegaConf.create(json.loads(str(context.run_config["lightning-rec-config"])))


def server_app():
    """The deployed ServerApp: the plan from the run config, then :func:`~.federation.serve`."""
    from lightning_rec.methods.federated.federation import load_resume, make_plan, serve
    from lightning_rec.methods.federated.flower import make_server_app
    from lightning_rec.runs.console import quiet

    def main(grid, context) -> None:
        quiet()
        cfg = _config_of(context)
        plan = make_plan(cfg)
        run_dir = str(cfg.run_dir)
        os.makedirs(run_dir, exist_ok=True)  # on the SuperLink's machine, at the path the submitter chose
        resume = load_resume(run_dir, str(cfg.federation.strategy)) if cfg.federation.resume else None
        serve(plan, grid, run_dir, resume)

    return make_server_app(main)


_DEVICES: dict[tuple[int, int], Any] = {}


def client_app():
    """The deployed ClientApp: device ``partition-id`` of the plan; state in the node's ``state-dir``."""
    from lightning_rec.methods.federated.federation import make_plan
    from lightning_rec.methods.federated.flower import make_client_app

    def resolve(context):
        d = int(context.node_config["partition-id"])
        key = (int(context.run_id), d)
        if key not in _DEVICES:
            from lightning_rec.runs.console import quiet

            quiet()
            cfg = _config_of(context)
            plan = make_plan(cfg)
            state_dir = str(context.node_config.get("state-dir") or os.path.join(str(cfg.run_dir), "devices"))
            _DEVICES[key] = (plan.device(d, os.path.abspath(os.path.expanduser(state_dir))),
                             plan.fail.get(d, ()), plan.crash.get(d, ()))
        return _DEVICES[key]

    return make_client_app(resolve)


# ---------------------------------------------------------------------- submitting a run
def submit(plain: dict[str, Any], run_dir: str, superlink: str, root_certificates: str | None,
           connect_timeout: float) -> dict[str, Any]:
    """``flwr run`` the federation on the SuperLink at ``superlink``, relay its log, return its result."""
    from lightning_rec.methods.federated.flower import FederationError

    host, port = parse_address(superlink, "federation.superlink")
    num_devices = int(plain["federation"]["num_devices"])
    if not _listening(host, port, min(10.0, float(connect_timeout))):
        raise ConfigError(f"federation.superlink={superlink}: no SuperLink answers there; start it and one "
                          f"SuperNode per device first, e.g. on this machine: " + " ; ".join(commands(superlink, num_devices)))
    base = os.path.join(run_dir, "flower")
    app = write_app(os.path.join(base, "app"), portable_config(plain))
    home = os.path.join(base, "cli")  # the flwr CLI's own config (FLWR_HOME), not the user's ~/.flwr
    os.makedirs(home, exist_ok=True)
    conn = f'address = "{host}:{port}"\n'
    if root_certificates:
        conn += f"root-certificates = {json.dumps(os.path.abspath(str(root_certificates)))}\n"
    else:
        conn += "insecure = true\n"
    with open(os.path.join(home, "config.toml"), "w") as f:
        f.write(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n{conn}')
    env = {**os.environ, "FLWR_HOME": home}
    flwr = _flwr_cli()
    run_id = None
    proc = subprocess.Popen([*flwr, "run", app, CONNECTION, "--stream"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            m = run_id is None and re.search(r"Successfully started run (\d+)", line)
            if m:
                run_id = m.group(1)
        proc.wait()
    except KeyboardInterrupt:
        if run_id is not None:
            subprocess.run([*flwr, "stop", run_id, CONNECTION], env=env, capture_output=True, timeout=60)
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if run_id is None:
        raise FederationError(f"federation.superlink={superlink}: `flwr run` did not start a run (exit code "
                              f"{proc.returncode}); its output is above")
    status = _status(flwr, env, run_id)
    result = os.path.join(run_dir, "federation_result.json")
    if not status.endswith("completed") or not os.path.exists(result):
        where = ("" if os.path.exists(result) or not status.endswith("completed") else
                 f"; it finished, but {result} is not on this machine (the run folder is on the SuperLink's)")
        raise FederationError(f"Flower run {run_id} on {superlink}: {status or 'status unknown'}{where}; "
                              f"its log is above (again: FLWR_HOME={home} flwr log {run_id} {CONNECTION})")
    with open(result) as f:
        return json.load(f)


def _status(flwr: list[str], env: dict[str, str], run_id: str) -> str:
    """``finished:completed``, ``finished:failed``, ... as ``flwr ls`` reports it."""
    for _ in range(10):
        p = subprocess.run([*flwr, "ls", CONNECTION, "--run-id", run_id, "--format", "json"], env=env,
                           capture_output=True, text=True, timeout=60)
        try:
            runs = json.loads(p.stdout).get("runs", [])
            status = str(runs[0].get("status", "")) if runs else ""
        except (json.JSONDecodeError, AttributeError):
            status = ""
        if status.startswith("finished"):
            return status
        time.sleep(1)
    return status
