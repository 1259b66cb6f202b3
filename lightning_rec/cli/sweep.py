"""Hyperparameter sweeps: ``fit -m`` runs one training run per combination of swept values.

    python -m lightning_rec fit -m model.d_model=32,64 optimizer.lr=1e-3,2e-3 'seed=range(3)'

Swept values use Hydra's syntax: ``a,b,c``, ``range(start, stop[, step])``, ``choice(a, b)``;
the trials are the cartesian product, the last override varying fastest (as Hydra's basic
sweeper orders them). Every trial is composed and checked before the first one starts.

A sweep lives in ``runs_dir/sweep/<timestamp>/``: ``sweep.json`` (its overrides and trials),
``trials.jsonl`` (one record per finished or failed trial, appended as they
end), ``summary.csv`` and one run folder per trial (``trial-000/`` ...), each a normal run
that ``test``, ``predict`` and ``fit ckpt_path=`` accept. A failed trial is recorded and the
sweep goes on (``sweep.fail_fast=true`` stops it). ``fit -m sweep.dir=<sweep folder>``
continues a sweep: finished trials are kept, an interrupted trial resumes from its last
checkpoint, a trial that failed runs again in a new folder (the old one is kept).

Trials run one after another in this process; a trial whose trainer starts several processes
(``trainer=ddp``, ``trainer=topk``, ``trainer.devices>1``) runs as a child ``fit`` command,
because Lightning's launcher re-runs the command line in each worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from typing import Any

from lightning_rec.errors import ConfigError, LightningRecError
from lightning_rec.runs.sweep import SWEEP_FILE, Sweep, expand, multi_process, write_json_atomic

__all__ = ["expand", "run_sweep"]


# ---------------------------------------------------------------------- running
def run_sweep(overrides: list[str], show_only: bool = False) -> dict[str, Any]:
    """``fit -m``: run (or continue) a sweep; returns ``{"sweep_dir", "rows", "best"}``."""
    from lightning_rec import runs
    from lightning_rec.config import load_config

    if runs.external_launch():
        raise ConfigError("fit -m: a sweep cannot run under torchrun/SLURM (every rank would run the whole sweep); "
                          "start it with `python -m lightning_rec fit -m ...` and trainer.devices=N")
    own = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides if o.startswith("sweep.")}
    overrides = [o for o in overrides if not o.startswith("sweep.")]
    unknown = set(own) - {"sweep.dir", "sweep.fail_fast"}
    if unknown:
        raise ConfigError(f"override '{sorted(unknown)[0]}': no such option; a sweep takes sweep.dir and sweep.fail_fast")
    fail_fast = own.get("sweep.fail_fast", "false").lower() in ("1", "true", "yes")
    sweep_dir = own.get("sweep.dir")
    if sweep_dir:  # continue: the stored sweep, unless the command line asks for a different one
        path = os.path.join(sweep_dir, SWEEP_FILE)
        if not os.path.exists(path):
            raise ConfigError(f"sweep.dir={sweep_dir}: no {SWEEP_FILE} there (not a sweep folder)")
        with open(path) as f:
            stored = json.load(f)
        if overrides and overrides != stored["overrides"]:
            raise ConfigError(f"sweep.dir={sweep_dir}: that sweep ran {' '.join(stored['overrides'])}; continue it "
                              f"with no other overrides, or start a new sweep without sweep.dir")
        overrides = stored["overrides"]
    swept, trials = expand(overrides)
    if not swept:
        raise ConfigError("fit -m: no swept option; give at least one a list of values (e.g. optimizer.lr=1e-3,2e-3)")
    configs = []
    for i, t in enumerate(trials):  # every combination composes before anything runs
        try:
            configs.append(load_config(t))
        except ConfigError as e:
            raise ConfigError(f"trial {i} ({' '.join(o for o in t if o.split('=', 1)[0] in swept)}): {e}") from None
    if show_only:
        print(f"{len(trials)} trials (swept: {', '.join(swept)}):")
        for i, t in enumerate(trials):
            print(f"  {i:3d}  {' '.join(o for o in t if o.split('=', 1)[0] in swept)}")
        return {"sweep_dir": None, "rows": [], "best": None, "trials": trials}
    if not sweep_dir:
        sweep_dir = runs.new_run_dir(str(configs[0].runs_dir), "sweep")
        write_json_atomic(os.path.join(sweep_dir, SWEEP_FILE),
                           {"overrides": overrides, "swept": swept, "trials": trials, "created": runs.stamp()})
    sweep = Sweep(sweep_dir, swept, trials)
    group = f"sweep-{os.path.basename(os.path.normpath(sweep_dir))}"
    todo = [i for i in range(len(trials)) if sweep.records.get(i, {}).get("status") != "ok"]
    print(f"sweep {sweep_dir}: {len(trials)} trials over {', '.join(swept)}; "
          f"{len(trials) - len(todo)} already finished, {len(todo)} to run", flush=True)
    failed = []
    try:
        for n, i in enumerate(todo, 1):
            print(f"\n=== sweep trial {i} ({n}/{len(todo)} to run): "
                  f"{' '.join(f'{k}={v}' for k, v in sweep.values(i).items())}", flush=True)
            rec = _run_trial(sweep, i, configs[i], group)
            sweep.record(rec)
            sweep.write_summary()
            if rec["status"] != "ok":
                failed.append(rec)
                print(f"sweep trial {i} failed: {rec['error']}", file=sys.stderr, flush=True)
                if fail_fast:
                    break
    except BaseException:  # Ctrl-C or a kill: what finished is on disk; the trial in flight resumes later
        sweep.write_summary()
        print(f"\nsweep interrupted; continue it with: python -m lightning_rec fit -m sweep.dir={sweep_dir}",
              file=sys.stderr, flush=True)
        raise
    summary = sweep.write_summary()
    print(f"\nsweep {sweep_dir} ({summary}):\n{sweep.table()}", flush=True)
    if failed:
        more = f" (stopped by sweep.fail_fast; {len(todo) - len(failed)} not run)" if fail_fast else ""
        raise LightningRecError(f"sweep {sweep_dir}: {len(failed)} of {len(trials)} trials failed{more}; first: "
                                f"trial {failed[0]['trial']}: {failed[0]['error']}; rerun the failed ones with "
                                f"`fit -m sweep.dir={sweep_dir}`")
    rows = sweep.rows()
    return {"sweep_dir": sweep_dir, "rows": rows, "best": sweep.best(rows), "trials": trials}


def _resume_point(trial_dir: str) -> str | None:
    import glob

    lasts = glob.glob(os.path.join(trial_dir, "checkpoints", "last*.ckpt"))
    return max(lasts, key=os.path.getmtime) if lasts else None


def _run_trial(sweep: Sweep, i: int, cfg, group: str) -> dict[str, Any]:
    from lightning_rec.config import set_value

    trial_dir = sweep.trial_dir(i)
    extra, resume = [], _resume_point(trial_dir)
    if resume:
        extra.append(f"ckpt_path={resume}")
        print(f"resuming trial {i} from {resume}", flush=True)
    elif os.path.isdir(trial_dir) and os.listdir(trial_dir):  # an earlier attempt failed: keep its folder
        os.replace(trial_dir, f"{trial_dir}.failed-{time.strftime('%Y%m%d-%H%M%S')}")
    if not resume:
        extra.append(f"run_dir={trial_dir}")
    if cfg.get("logger") and cfg.logger.get("wandb") is not None and cfg.logger.wandb.get("group") is None:
        extra.append(f"logger.wandb.group={group}")
    rec: dict[str, Any] = {"trial": i, "overrides": sweep.trials[i], "run_dir": trial_dir}
    t0 = time.time()
    try:
        if multi_process(cfg):
            out = _fit_in_child(sweep.trials[i] + extra, trial_dir)
        else:
            from lightning_rec.cli.fit import fit
            from lightning_rec.runs.launch import set_threads

            set_threads(cfg.get("threads"))

            for o in extra:  # the trial's config, composed before the sweep started, is used by this trial only
                k, v = o.split("=", 1)
                set_value(cfg, k, v)
            out = fit(cfg, sweep.trials[i])
        rec.update(status="ok", monitor=out.get("monitor"), best_score=out.get("best_score"), test=out.get("test"),
                   epochs=out.get("epochs"), fit_seconds=out.get("fit_seconds"), run_dir=out.get("run_dir", trial_dir))
    except LightningRecError as e:
        rec.update(status="error", error=str(e))
    except Exception as e:  # a crash in one trial must not lose the others: keep the traceback with the trial
        os.makedirs(trial_dir, exist_ok=True)
        with open(os.path.join(trial_dir, "error.txt"), "w") as f:
            f.write(traceback.format_exc())
        rec.update(status="error", error=f"{type(e).__name__}: {' '.join(str(e).split())[:300]} "
                                         f"(traceback in {os.path.join(trial_dir, 'error.txt')})")
    rec["wall_seconds"] = time.time() - t0
    return rec


def _fit_in_child(overrides: list[str], trial_dir: str) -> dict[str, Any]:
    from lightning_rec import runs

    env = {k: v for k, v in os.environ.items() if k != runs.RUN_DIR_ENV}
    proc = subprocess.run([sys.executable, "-m", "lightning_rec", "fit", *overrides], env=env)
    if proc.returncode != 0:
        raise LightningRecError(f"the trial's fit command exited with status {proc.returncode} (its output is above)")
    path = os.path.join(trial_dir, "result.json")
    if not os.path.exists(path):
        raise LightningRecError(f"the trial finished without writing {path}")
    with open(path) as f:
        return json.load(f)
