"""Write the results tables of README.md and docs/results.md from the records in bench/results/*.jsonl.

    python bench/report.py           # rewrite the tables between <!-- results:begin --> and <!-- results:end -->
    python bench/report.py --check   # exit 1 if either file differs from what this would write, or if a
                                     # record's log link names no heading of its log file

A record is one measured row (see ``common.record``). A later record with the same target, setting, seed,
metric and baseline replaces an earlier one, so re-running a benchmark updates its row. README.md gets the
rows marked ``headline``, one line per target and setting; docs/results.md gets every row, one table per
target, each row linked to its entry in the log (docs/log/<topic>.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import slug  # noqa: E402  (the anchors append() gives its headings)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "bench", "results")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
TOPICS = ("quality_ml1m", "throughput", "stackrec", "rocket", "optim_switch", "topk", "federated", "loading", "scale", "serving")
TOPIC_NAMES = {"quality_ml1m": "Accuracy on ML-1M", "throughput": "Speed", "stackrec": "StackRec",
               "rocket": "Rocket Launching", "optim_switch": "Optimizer switching", "topk": "Top-k averaging",
               "federated": "Federated training", "loading": "Loading large files",
               "scale": "Large catalogues", "serving": "Serving"}
KEY = ("target", "setting", "seed", "metric", "baseline_of")


def load(results_dir: str = RESULTS_DIR) -> list[tuple[str, dict]]:
    """``(topic, record)`` pairs, topics in the order above, the latest record of each key only."""
    names = sorted(f[:-6] for f in os.listdir(results_dir) if f.endswith(".jsonl"))
    topics = [t for t in TOPICS if t in names] + [t for t in names if t not in TOPICS]
    out: list[tuple[str, dict]] = []
    for topic in topics:
        latest: dict[tuple, dict] = {}
        with open(os.path.join(results_dir, f"{topic}.jsonl"), encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"error: bench/results/{topic}.jsonl line {n}: not JSON ({e.msg})") from None
                key = tuple(json.dumps(row.get(k)) for k in KEY)
                latest.pop(key, None)  # a re-measured row moves to where its latest record is
                latest[key] = row
        out += [(topic, row) for row in latest.values()]
    return out


def fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)


def cell(v) -> str:
    return fmt(v).replace("|", "\\|").replace("\n", " ")


def met(v) -> str:
    return "" if v is None else fmt(bool(v))


def readme_table(rows: list[tuple[str, dict]]) -> str:
    """One line per target and setting of the headline rows: each metric's values (or, where the goal is a
    ratio, its ratios to the baseline), the goals, and whether each was met."""
    groups: dict[tuple, list[dict]] = {}
    for _, r in rows:
        if r.get("headline"):
            groups.setdefault((r["target"], r.get("setting")), []).append(r)
    lines = ["| target | setting | result | goal | met | log |", "|---|---|---|---|---|---|"]
    for (target, setting), rs in groups.items():
        metrics: dict[tuple, list[dict]] = {}
        for r in rs:
            metrics.setdefault((r["metric"], r.get("baseline_of")), []).append(r)
        parts, goals, mets = [], [], []
        for (metric, base), ms in metrics.items():
            as_ratio = str(ms[0].get("goal", "")).startswith("ratio") and base
            values = ", ".join(fmt(m["ratio"] if as_ratio else m["value"]) for m in ms)
            parts.append(f"{metric}: {values}" + (f" x {base}" if as_ratio else ""))
            goals += [g for g in dict.fromkeys(m.get("goal") for m in ms) if g and g not in goals]
            mets.append(met(all(m.get("met") for m in ms)) if ms[0].get("met") is not None else "")
        seeds = sorted({r["seed"] for r in rs if r.get("seed") is not None})
        result = "; ".join(parts) + (f" (seeds {', '.join(map(str, seeds))})" if len(seeds) > 1 else "")
        shown = [m for m in mets if m]
        verdict = shown[0] if len(set(shown)) == 1 else " / ".join(shown)
        links = dict.fromkeys(r["log"] for r in rs if r.get("log"))
        log = ", ".join(f"[{n}]({link})" for n, link in enumerate(links, 1))
        lines.append(f"| {cell(target)} | {cell(setting or '')} | {cell(result)} | {cell('; '.join(goals))} | {verdict} | {log} |")
    return ("\n".join(lines) + "\n\nRatios are measured side by side in one run. Every row, with its command, machine "
            "and log entry, is on the [results page](docs/results.md).")


def results_tables(rows: list[tuple[str, dict]]) -> str:
    groups: dict[str, dict[str, list[dict]]] = {}
    for topic, r in rows:
        groups.setdefault(topic, {}).setdefault(r["target"], []).append(r)
    out = []
    for topic, targets in groups.items():
        out += [f"## {TOPIC_NAMES.get(topic, topic)}", ""]
        for target, rs in targets.items():
            out += [f"### {target}", "",
                    "| setting | seed | metric | value | baseline | ratio | goal | met | date (log entry) | machine | command |",
                    "|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in rs:
                base = "" if r.get("baseline") is None else f"{fmt(r['baseline'])} ({r.get('baseline_of', '')})"
                date = cell(r.get("date", ""))
                if r.get("log"):  # the records link from the repository root; this page lives in docs/
                    date = f"[{date}]({r['log'].removeprefix('docs/')})"
                machine = (r.get("machine") or "").split(";")[0]
                command = "`" + r["command"].replace("|", "\\|") + "`" if r.get("command") else ""
                out.append(f"| {cell(r.get('setting', ''))} | {'' if r.get('seed') is None else r['seed']} | "
                           f"{cell(r['metric'])} | {cell(r['value'])} | {cell(base)} | {cell(r.get('ratio'))} | "
                           f"{cell(r.get('goal', ''))} | {met(r.get('met'))} | {date} | {cell(machine)} | {command} |")
            out.append("")
    return "\n".join(out).rstrip("\n")


def splice(text: str, table: str, path: str) -> str:
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"error: {path}: expected one {BEGIN} and, after it, one {END}")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def broken_links(rows: list[tuple[str, dict]], root: str = ROOT) -> list[str]:
    """The records whose ``log`` link is not ``docs/log/<file>.md#<anchor>`` of an existing heading."""
    anchors: dict[str, set[str] | None] = {}
    bad = []
    for topic, r in rows:
        link = r.get("log")
        if not link:
            bad.append(f"bench/results/{topic}.jsonl: {r['target']!r} / {r['metric']!r}: no log link")
            continue
        path, _, anchor = link.partition("#")
        if path not in anchors:
            full = os.path.join(root, path)
            anchors[path] = ({slug(h) for h in re.findall(r"(?m)^#{1,6} (.+?)\s*$", open(full, encoding="utf-8").read())}
                             if os.path.isfile(full) else None)
        if anchors[path] is None:
            bad.append(f"bench/results/{topic}.jsonl: {link}: no such file")
        elif not anchor or anchor not in anchors[path]:
            bad.append(f"bench/results/{topic}.jsonl: {link}: no heading with that anchor")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is not what it would be")
    ap.add_argument("--root", default=ROOT, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    rows = load(os.path.join(args.root, "bench", "results"))
    stale = []
    for rel, table in (("README.md", readme_table(rows)), (os.path.join("docs", "results.md"), results_tables(rows))):
        path = os.path.join(args.root, rel)
        with open(path, encoding="utf-8") as f:
            old = f.read()
        new = splice(old, table, rel)
        if new != old:
            stale.append(rel)
            if not args.check:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(new)
    bad = broken_links(rows, args.root)
    for line in bad:
        print(f"error: {line}", file=sys.stderr)
    if args.check and stale:
        print(f"{', '.join(stale)}: the results tables differ from bench/results/*.jsonl; run python bench/report.py",
              file=sys.stderr)
    if bad or (args.check and stale):
        return 1
    if not args.check:
        print(f"wrote {', '.join(stale)}" if stale else "up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
