"""``python -m lightning_rec {fit,test,predict,stack,export,serve,federate} [key=value ...]`` (also ``lightning-rec``).

fit      train a model, checkpoint the best and last epochs, then test the best one
test     evaluate a checkpoint on the test split:      test ckpt_path=<file>  (or ckpt=<file>)
predict  write top-K recommendations per user (original ids): predict ckpt_path=<file> predict.k=10
stack    write a model twice as deep from a trained one: stack ckpt=<file> mode=adjacent|cross out=<file>
         (start training from it with: fit init_from=<file>)
export   write one net of a rocket checkpoint as a standalone model: export ckpt=<file> net=light out=<file>
         or a serving bundle (query encoder, item table, id map): export ckpt=<file> format=onnx out=<folder>
serve    answer HTTP requests from a bundle (FastAPI + uvicorn): serve bundle=<folder> port=8000
federate federated training over simulated devices (Flower): federate federation.num_devices=4

Overrides follow Hydra: ``model=nextitnet data=ml-1m data.path=... trainer.max_epochs=50 logger=wandb``.
Add ``--cfg`` (or Hydra's ``--cfg job|hydra|all``, ``-c``) to print the composed config and exit, with
``--resolve`` to resolve its interpolations.
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
COMMANDS = ("fit", "test", "predict", "stack", "export", "serve", "federate")
CFG_PARTS = ("job", "hydra", "all")  # what Hydra's --cfg prints


def _cfg_flag(args: list[str]) -> tuple[str | None, list[str]]:
    """``(part, rest)``: Hydra's ``--cfg job|hydra|all`` (also ``-c``, ``--cfg=job``; a bare ``--cfg`` is job)."""
    part, rest, i = None, [], 0
    while i < len(args):
        a = args[i]
        if a in ("--cfg", "-c") or a.startswith("--cfg="):
            value = a.split("=", 1)[1] if "=" in a else None
            nxt = args[i + 1] if i + 1 < len(args) else None
            if value is None and nxt is not None and "=" not in nxt and not nxt.startswith(("-", "~")):
                value, i = nxt, i + 1  # --cfg job
            if value is not None and value not in CFG_PARTS:
                raise ConfigError(f"--cfg={value}: expected one of {', '.join(CFG_PARTS)} (or --cfg alone: job)")
            part = value or "job"
        else:
            rest.append(a)
        i += 1
    return part, rest


def _print_cfg(cfg, part: str, resolve: bool) -> None:
    if part in ("job", "all"):
        job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
        print(OmegaConf.to_yaml(job, resolve=resolve))
    if part in ("hydra", "all"):
        print(OmegaConf.to_yaml(OmegaConf.create({"hydra": cfg.hydra}), resolve=False))


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
    show_cfg, rest = _cfg_flag(rest)
    resolve = "--resolve" in rest
    multirun = any(a in ("-m", "--multirun") for a in rest)
    overrides = [a for a in rest if a not in ("-m", "--multirun", "--resolve")]
    if any(a.startswith("-") and not a.startswith("~") for a in overrides):
        flag = next(a for a in overrides if a.startswith("-"))
        raise ConfigError(f"unknown flag '{flag}'; commands take key=value overrides, --cfg [job|hydra|all], "
                          f"--resolve and (fit) -m")
    if multirun:
        if command != "fit":
            raise ConfigError(f"-m (sweep) is for fit; `{command}` runs once")
        return _command("sweep").run_sweep(overrides, show_only=show_cfg is not None)
    if any(a.startswith("sweep.") for a in overrides):
        raise ConfigError("sweep.* options belong to sweeps: add -m (e.g. `fit -m sweep.dir=<sweep folder>`)")
    module = _command(command)
    overrides = module.rewrite(overrides) if hasattr(module, "rewrite") else overrides
    cfg = load_config(overrides, with_hydra=show_cfg in ("hydra", "all"))
    if cfg.get("weights", "average") != "average" and command not in ("test", "predict"):
        raise ConfigError(f"weights={cfg.weights}: chooses the weights `test` and `predict` evaluate; "
                          f"`{command}` does not take it")
    if show_cfg:
        _print_cfg(cfg, show_cfg, resolve)
        return None
    from lightning_rec.runs.launch import set_threads

    set_threads(cfg.get("threads"))
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
