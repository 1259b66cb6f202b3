"""``python -m lightning_rec {fit,test,predict,stack,export,federate} [key=value ...]`` (also ``lightning-rec``).

fit      train a model, checkpoint the best and last epochs, then test the best one
test     evaluate a checkpoint on the test split:      test ckpt_path=<file>  (or ckpt=<file>)
predict  write top-K recommendations per user (original ids): predict ckpt_path=<file> predict.k=10
stack    write a model twice as deep from a trained one: stack ckpt=<file> mode=adjacent|cross out=<file>
         (start training from it with: fit init_from=<file>)
export   write one net of a rocket checkpoint as a standalone model: export ckpt=<file> net=light out=<file>
federate federated training over simulated devices (Flower): federate federation.num_devices=4

Overrides follow Hydra: ``model=nextitnet data=ml-1m data.path=... trainer.max_epochs=50 logger=wandb``.
Add ``--cfg`` to print the composed config and exit.
``fit -m optimizer.lr=1e-3,2e-3 'seed=range(3)'`` runs a sweep: one run per combination, then a
summary table (see :mod:`lightning_rec.cli.sweep`); ``fit -m ... --cfg`` lists the trials.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from omegaconf import OmegaConf

from lightning_rec.errors import ConfigError, LightningRecError

# command -> the module that implements it (one file per command, each with ``run(cfg, overrides)``)
COMMANDS = ("fit", "test", "predict", "stack", "export", "federate")


def _command(name: str):
    return importlib.import_module(f"lightning_rec.cli.{name}")


def run(argv: list[str]) -> Any:
    """Run one command; raises :class:`LightningRecError` on bad input."""
    from lightning_rec.config import load_config

    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.strip())
        return None
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise ConfigError(f"unknown command '{command}'; expected one of {', '.join(COMMANDS)} (see --help)")
    show_cfg = "--cfg" in rest
    multirun = any(a in ("-m", "--multirun") for a in rest)
    overrides = [a for a in rest if a not in ("--cfg", "-m", "--multirun")]
    if any(a.startswith("-") and not a.startswith("~") for a in overrides):
        flag = next(a for a in overrides if a.startswith("-"))
        raise ConfigError(f"unknown flag '{flag}'; commands take key=value overrides, --cfg and (fit) -m")
    if multirun:
        if command != "fit":
            raise ConfigError(f"-m (sweep) is for fit; `{command}` runs once")
        return _command("sweep").run_sweep(overrides, show_only=show_cfg)
    if any(a.startswith("sweep.") for a in overrides):
        raise ConfigError("sweep.* options belong to sweeps: add -m (e.g. `fit -m sweep.dir=<sweep folder>`)")
    module = _command(command)
    overrides = module.rewrite(overrides) if hasattr(module, "rewrite") else overrides
    cfg = load_config(overrides)
    if cfg.get("weights", "average") != "average" and command not in ("test", "predict"):
        raise ConfigError(f"weights={cfg.weights}: chooses the weights `test` and `predict` evaluate; "
                          f"`{command}` does not take it")
    if show_cfg:
        print(OmegaConf.to_yaml(cfg))
        return None
    return getattr(module, command)(cfg, overrides)


def main(argv: list[str] | None = None) -> None:
    from lightning_rec.runs.console import quiet

    quiet()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        run(argv)
    except LightningRecError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `... --help | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
