"""``federate``: federated training over simulated devices with Flower."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from lightning_rec.config import override_key
from lightning_rec.errors import ConfigError

# options of the retired deployment with one Flower server process and one client process per device
REPLACED = {"federation.server_address": "federation.superlink=<host:port> (the SuperLink's address)",
            "federation.wait_for_server": "federation.connect_timeout (seconds the first round waits for SuperNodes)",
            "federation.device": "the SuperNode's --node-config \"partition-id=N num-partitions=M\""}


def rewrite(overrides: list[str]) -> list[str]:
    """Refuse the options of the old deployment (server and client processes) with what replaced them."""
    for o in overrides:
        key = override_key(o)
        if key in REPLACED:
            raise ConfigError(f"{key}: deployment now runs a Flower SuperLink and SuperNodes "
                              f"(federation.engine=deployment); use {REPLACED[key]} (docs/methods/federated.md, 'Deployment')")
    return overrides


def federate(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """Federated training over simulated devices with Flower (see :mod:`lightning_rec.methods.federated`).

    ``federation.engine=simulation`` runs the ServerApp here and the devices' ClientApps in Ray
    workers; ``deployment`` submits the federation to a running SuperLink (its SuperNodes are the
    devices) and relays the run's log. Returns ``{"run_dir", "history": [per-round dicts], "final":
    last round's metrics}``.
    """
    import os

    from lightning_rec.methods.federated.federation import check_options, make_plan, open_run, serve
    from lightning_rec.methods.federated.flower import _flwr, make_client_app, make_server_app, simulate

    check_options(cfg)
    _flwr()
    plan = make_plan(cfg)
    run_dir, resume_state = open_run(plan)
    fed = cfg.federation
    if fed.engine == "deployment":
        from omegaconf import OmegaConf

        from lightning_rec.methods.federated.deploy import submit

        # unresolved: ${run_dir} and the like resolve in the apps, with run_dir set
        return submit(OmegaConf.to_container(cfg, resolve=False), run_dir, str(fed.superlink),
                      fed.get("root_certificates"), float(fed.connect_timeout))

    state_dir = os.path.join(run_dir, "devices")
    result: dict[str, Any] = {}

    def main(grid, context) -> None:
        result.update(serve(plan, grid, run_dir, resume_state))

    devices: dict[int, Any] = {}

    def resolve(context):
        d = int(context.node_config["partition-id"])
        if d not in devices:  # one Device per Ray worker and device: its DataModule is built once
            devices[d] = plan.device(d, state_dir)
        return devices[d], plan.fail.get(d, ()), ()

    simulate(make_server_app(main), make_client_app(resolve), int(fed.num_devices))
    if not result:
        from lightning_rec.methods.federated.flower import FederationError

        raise FederationError(f"federation {run_dir}: the simulation ended before its last round; "
                              f"see the log above (a Flower error)")
    return result
