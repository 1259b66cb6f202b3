"""A sweep's folder and bookkeeping: the trials of a set of swept overrides (``expand``), their records
(``trials.jsonl``), the summary (``summary.csv``) and its table. ``fit -m`` (lightning_rec/cli/sweep.py) runs them.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
from typing import Any

from lightning_rec.errors import ConfigError

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


def multi_process(cfg) -> bool:
    t = cfg.trainer
    return str(t.get("devices", 1)) not in ("1", "[0]") or int(t.get("num_nodes", 1) or 1) > 1


def write_json_atomic(path: str, obj: Any) -> None:
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
