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

import csv
import itertools
import json
import math
import os
import subprocess
import sys
import time
import traceback
from typing import Any

from lightning_rec.errors import ConfigError, LightningRecError

SWEEP_FILE, TRIALS_FILE, SUMMARY_FILE = "sweep.json", "trials.jsonl", "summary.csv"
FORBIDDEN = ("run_dir", "ckpt_path")  # every trial gets its own folder; resume a sweep with sweep.dir


def expand(overrides: list[str]) -> tuple[list[str], list[list[str]]]:
    """``(swept keys, trials)``: each trial is the full override list of one combination."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as e:
        raise ConfigError(f"could not parse the overrides {overrides}: {' '.join(str(e).split())}") from None
    axes, swept = [], []
    for o in parsed:
        key = o.get_key_element()
        if key.lstrip("+~") in FORBIDDEN:
            raise ConfigError(f"{o.input_line}: a sweep gives every trial its own folder; continue a sweep with "
                              f"sweep.dir=<sweep folder>, resume a single run with `fit ckpt_path=...` (no -m)")
        if not o.is_sweep_override():
            axes.append([o.input_line])
            continue
        try:
            values = list(o.sweep_string_iterator())
        except Exception:
            raise ConfigError(f"{o.input_line}: only lists (a,b,c), range() and choice() can be swept; "
                              f"interval() and glob() need a search plugin") from None
        if not values:
            raise ConfigError(f"{o.input_line}: the sweep has no values")
        swept.append(key)
        axes.append([f"{key}={v}" for v in values])
    return swept, [list(t) for t in itertools.product(*axes)]


def _multi_process(cfg) -> bool:
    t = cfg.trainer
    return str(t.get("devices", 1)) not in ("1", "[0]") or int(t.get("num_nodes", 1) or 1) > 1


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


class Sweep:
    """One sweep folder: its trials, their records, the summary."""

    def __init__(self, sweep_dir: str, swept: list[str], trials: list[list[str]]):
        self.dir, self.swept, self.trials = sweep_dir, swept, trials
        self.records: dict[int, dict[str, Any]] = {}
        path = os.path.join(sweep_dir, TRIALS_FILE)
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    if line.strip():
                        rec = json.loads(line)
                        self.records[int(rec["trial"])] = rec  # the last record of a trial wins

    def trial_dir(self, i: int) -> str:
        return os.path.join(self.dir, f"trial-{i:03d}")

    def record(self, rec: dict[str, Any]) -> None:
        self.records[rec["trial"]] = rec
        with open(os.path.join(self.dir, TRIALS_FILE), "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def values(self, i: int) -> dict[str, str]:
        """The swept keys' values in trial ``i``."""
        out = {}
        for o in self.trials[i]:
            k, v = o.split("=", 1)
            if k in self.swept:
                out[k] = v
        return out

    # ---------------------------------------------------------------- summary
    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for i in range(len(self.trials)):
            rec = self.records.get(i, {"status": "pending"})
            test = rec.get("test") or {}
            rows.append({"trial": i, **self.values(i), "status": rec.get("status"),
                         "monitor": rec.get("monitor"), "best": rec.get("best_score"),
                         "test/ndcg@10": test.get("test/ndcg@10"), "test/hr@10": test.get("test/hr@10"),
                         "epochs": rec.get("epochs"), "fit_min": _minutes(rec.get("fit_seconds")),
                         "run_dir": rec.get("run_dir"), "error": rec.get("error")})
        return rows

    def write_summary(self) -> str:
        rows = self.rows()
        path = os.path.join(self.dir, SUMMARY_FILE)
        tmp = f"{path}.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)
        return path

    @staticmethod
    def best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The finished row with the highest monitored score, from :meth:`rows`."""
        done = [r for r in rows if r["status"] == "ok" and r["best"] is not None]
        return max(done, key=lambda r: r["best"]) if done else None

    def table(self) -> str:
        rows = self.rows()
        best = self.best(rows)
        monitor = next((r["monitor"] for r in rows if r["monitor"]), "val/ndcg@10")
        head = ["trial", *self.swept, f"best {monitor}", "test/ndcg@10", "test/hr@10", "epochs", "fit min", "status"]
        body = [[f"{r['trial']}{'*' if best and r['trial'] == best['trial'] else ''}", *[r[k] for k in self.swept],
                 _fmt(r["best"]), _fmt(r["test/ndcg@10"]), _fmt(r["test/hr@10"]), _fmt(r["epochs"]),
                 _fmt(r["fit_min"], 1), r["status"]] for r in rows]
        out = [_render(head, body)]
        seeds = [k for k in self.swept if k.lstrip("+") == "seed"]
        if seeds and any(r["status"] == "ok" for r in rows):
            out.append("\nover seeds (mean ± sample std, n finished):")
            out.append(_render(*self._by_seed(rows, seeds[0], monitor)))
        if best:
            out.append(f"\nbest: trial {best['trial']} ({' '.join(f'{k}={best[k]}' for k in self.swept)}) "
                       f"{monitor} {best['best']:.4f}, test/ndcg@10 {_fmt(best['test/ndcg@10'])}; {best['run_dir']}")
        return "\n".join(out)

    def _by_seed(self, rows, seed_key: str, monitor: str):
        keys = [k for k in self.swept if k != seed_key]
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for r in rows:
            groups.setdefault(tuple(r[k] for k in keys), []).append(r)
        head = [*keys, "n", f"best {monitor}", "test/ndcg@10"]
        body = []
        for g, members in groups.items():
            ok = [r for r in members if r["status"] == "ok"]
            body.append([*g, f"{len(ok)}/{len(members)}", _mean_std([r["best"] for r in ok]),
                         _mean_std([r["test/ndcg@10"] for r in ok])])
        return head, body


def _minutes(seconds) -> float | None:
    return None if seconds is None else seconds / 60


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}f}"


def _mean_std(xs: list) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return ""
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return f"{m:.4f}"
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return f"{m:.4f} ± {sd:.4f}"


def _render(head: list[str], body: list[list]) -> str:
    cells = [head] + [[str(c) if c is not None else "" for c in row] for row in body]
    widths = [max(len(r[j]) for r in cells) for j in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


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
        _write_json_atomic(os.path.join(sweep_dir, SWEEP_FILE),
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
        if _multi_process(cfg):
            out = _fit_in_child(sweep.trials[i] + extra, trial_dir)
        else:
            from lightning_rec.cli.fit import fit

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
