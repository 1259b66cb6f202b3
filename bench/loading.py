"""Loading an ML-20M-sized file: lightning_rec's reader + encoding vs a plain pandas read + group, side by side.

    python bench/loading.py                          # 20M lines per format (generated once into /tmp, ~1 GB)
    python bench/loading.py --lines 2000000          # a quick run
    python bench/loading.py --formats csv --skip-line-reader

For each format (``sasrec`` ``user item``, ``movielens`` ``::``, ``udata`` tab-separated, ``csv`` with a header,
string user ids and a timestamp column, as ML-20M's ratings.csv) a file of ``--lines`` interactions is generated
(ML-20M-like: 138k users with at least 20 items each, 27k items of Zipf popularity, rows grouped by user with each
user's timestamps in random order, as ratings.csv is sorted by movie within a user), then loaded by, each in a
child process of its own so that its peak RSS (``ru_maxrss`` from ``os.wait4``) is its own:

  ours     ``lightning_rec.data.readers.read_encoded`` (what ``fit`` reads with): ids, time-ordered CSR arrays
  pandas   ``pandas.read_csv`` with its default type inference and the fastest separator it takes
           (``movielens``: ``:`` and every second column), then ``pd.factorize`` of users and items, a stable
           sort by (user, timestamp) and the group offsets: the same arrays, with no checks of the lines
  line     the line-by-line reader (``encode(read_sequences(...))``, the reader before this benchmark and the
           fallback without pandas or for a file the fast path does not take); ``--skip-line-reader`` skips it

The generation and the runs take the heavy lock (/tmp/lightning_rec_heavy.lock), so they never run beside another
heavy job; do not wrap the script in ``flock`` on that file as well. Results go to docs/log/loading.md and
bench/results/loading.jsonl. Goal: ours within 2x of pandas' time for every format.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append, record, run_main  # noqa: E402

FORMATS = ("sasrec", "movielens", "udata", "csv")
FILES = {"sasrec": "ml20m-like.txt", "movielens": "ratings.dat", "udata": "u.data", "csv": "ratings.csv"}
LOCK = "/tmp/lightning_rec_heavy.lock"
GOAL = 2.0


def generate(path: str, fmt: str, lines: int, users: int, items: int, seed: int) -> None:
    """An ML-20M-like interactions file, written atomically (tmp + os.replace)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    users = min(users, max(1, lines // 20))
    extra = rng.lognormal(0.0, 1.2, users)
    lengths = 20 + np.floor(extra / extra.sum() * (lines - 20 * users)).astype(np.int64)
    lengths[: lines - int(lengths.sum())] += 1  # exactly `lines` rows
    user = np.repeat(np.arange(1, users + 1), lengths)
    pop = 1.0 / (np.arange(items) + 10.0)
    item = rng.choice(np.arange(1, items + 1), size=lines, p=pop / pop.sum())
    ts = rng.integers(789_652_009, 1_427_784_002, size=lines)
    rating = rng.integers(1, 11, size=lines)  # half stars in the csv, whole ones in the MovieLens formats
    if fmt == "csv":  # string user ids whose sorted order is not the numeric one
        names = np.array([f"u{(u * 2654435761) % 2**32:08x}" for u in range(users + 1)], dtype=object)
    tmp = path + ".part"
    chunk = 1_000_000
    with open(tmp, "w", encoding="utf-8") as f:
        if fmt == "csv":
            f.write("userId,movieId,rating,timestamp\n")
        for s in range(0, lines, chunk):
            u, i, t, r = (a[s:s + chunk].tolist() for a in (user, item, ts, rating))
            if fmt == "sasrec":
                rows = map("{} {}".format, u, i)
            elif fmt == "movielens":
                rows = map("{}::{}::{}::{}".format, u, i, ((x + 1) // 2 for x in r), t)
            elif fmt == "udata":
                rows = map("{}\t{}\t{}\t{}".format, u, i, ((x + 1) // 2 for x in r), t)
            else:
                rows = map("{},{},{},{}".format, names[user[s:s + chunk]].tolist(), i, (x / 2 for x in r), t)
            f.write("\n".join(rows))
            f.write("\n")
            print(f"  {os.path.basename(path)}: {min(s + chunk, lines):,}/{lines:,} lines", flush=True)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- child processes
def child(kind: str, path: str, fmt: str) -> dict:
    """One loader, timed after its imports (``import_rss_mb``: the process's peak RSS once they are done)."""
    import resource

    import numpy as np
    import pandas as pd  # ours reads with it too (imported lazily there)

    if kind in ("ours", "line"):
        from lightning_rec.data.encode import encode
        from lightning_rec.data.readers import read_encoded, read_sequences
    out: dict = {"import_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    t0 = time.perf_counter()
    if kind == "ours":
        enc = read_encoded(path, fmt, user_col="userId", item_col="movieId")
        users, nnz = enc.num_users, int(enc.indptr[-1])
    elif kind == "line":
        seqs = read_sequences(path, fmt, user_col="userId", item_col="movieId")
        out["read_s"] = time.perf_counter() - t0
        enc = encode(seqs)
        users, nnz = enc.num_users, int(enc.indptr[-1])
    elif kind == "pandas":
        if fmt == "csv":
            df = pd.read_csv(path)
            u, i, t = df["userId"], df["movieId"], df["timestamp"]
        else:
            sep, cols = {"sasrec": (" ", [0, 1]), "movielens": (":", [0, 2, 4, 6]), "udata": ("\t", [0, 1, 2, 3])}[fmt]
            df = pd.read_csv(path, sep=sep, header=None, usecols=cols)
            u, i = df[cols[0]], df[cols[1]]
            t = df[cols[-1]] if fmt != "sasrec" else None
        ucodes, uniq = pd.factorize(u)
        icodes, _ = pd.factorize(i)
        order = np.argsort(ucodes, kind="stable") if t is None else np.lexsort((t.to_numpy(), ucodes))
        items = icodes[order]
        indptr = np.concatenate([[0], np.cumsum(np.bincount(ucodes))])
        users, nnz = len(uniq), int(indptr[-1])
        del items
    else:
        raise SystemExit(f"unknown kind {kind}")
    out.update(seconds=time.perf_counter() - t0, users=users, nnz=nnz)
    return out


# Started from a small process: Linux carries the peak RSS of the process that starts a child into the child's
# ru_maxrss, and this script's own process holds torch (bench.common).
LAUNCHER = ("import json, os, subprocess, sys\n"
            "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, text=True)\n"
            "out = p.stdout.read()\n"
            "_, status, usage = os.wait4(p.pid, 0)\n"
            "print(json.dumps({'out': out, 'code': os.waitstatus_to_exitcode(status), 'maxrss_kib': usage.ru_maxrss}))\n")


def run_child(kind: str, path: str, fmt: str) -> dict:
    """One loader in a child process: its time, and its own peak RSS (ru_maxrss from os.wait4)."""
    cmd = [sys.executable, "-c", LAUNCHER, sys.executable, os.path.abspath(__file__), "--child", kind, "--file", path,
           "--format", fmt]
    got = json.loads(subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout)
    if got["code"] != 0:
        raise SystemExit(f"{kind} on {path} failed (exit {got['code']})")
    res = json.loads(got["out"].strip().splitlines()[-1])
    res["peak_rss_mb"] = got["maxrss_kib"] / 1024  # KiB on Linux
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=20_000_000)
    ap.add_argument("--users", type=int, default=138_000)
    ap.add_argument("--items", type=int, default=27_000)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--dir", default="/tmp/lightning_rec_loading", help="where the generated files go (not the repo)")
    ap.add_argument("--regenerate", action="store_true", help="write the files again even if they exist")
    ap.add_argument("--skip-line-reader", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--format", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--generate", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.file, args.format)), flush=True)
        return
    if args.generate:
        generate(args.file, args.generate, args.lines, args.users, args.items, args.seed)
        return
    formats = [f for f in args.formats.split(",") if f]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise SystemExit(f"--formats: unknown {bad}; expected some of {','.join(FORMATS)}")
    kinds = ["ours", "pandas"] + ([] if args.skip_line_reader else ["line"])
    os.makedirs(args.dir, exist_ok=True)
    print(f"waiting for the heavy lock {LOCK} ...", flush=True)
    with open(LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = {}
        for fmt in formats:
            path = os.path.join(args.dir, f"{args.lines}-{args.seed}-{FILES[fmt]}")
            if args.regenerate or not os.path.exists(path):
                print(f"generating {path}", flush=True)
                # in a child: this process stays small, and a child's ru_maxrss counts the memory of the process
                # it was started from
                subprocess.run([sys.executable, os.path.abspath(__file__), "--generate", fmt, "--file", path,
                                "--lines", str(args.lines), "--users", str(args.users), "--items", str(args.items),
                                "--seed", str(args.seed)], check=True)
            size = os.path.getsize(path) / 2**20
            for kind in kinds:
                print(f"{fmt}: {kind} ...", flush=True)
                results[fmt, kind] = r = run_child(kind, path, fmt)
                print(f"  {r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB, {r['users']:,} users, "
                      f"{r['nnz']:,} interactions", flush=True)
            counts = {(results[fmt, k]["users"], results[fmt, k]["nnz"]) for k in kinds}
            if len(counts) != 1:
                raise SystemExit(f"{fmt}: the loaders disagree on users/interactions: {counts}")
            results[fmt, "size"] = size
    rows = ["| format | file | ours (s) | pandas (s) | ours / pandas | line-by-line (s) | peak RSS (MB): ours / "
            "pandas / line-by-line | of which imports: ours / pandas |", "|---|---|---|---|---|---|---|---|"]
    for fmt in formats:
        o, p = results[fmt, "ours"], results[fmt, "pandas"]
        ln = results.get((fmt, "line"))
        ln_s, ln_rss = (f"{ln['seconds']:.1f}", f"{ln['peak_rss_mb']:.0f}") if ln else ("-", "-")
        rows.append(f"| {fmt} | {results[fmt, 'size']:.0f} MB | {o['seconds']:.1f} | {p['seconds']:.1f} | "
                    f"{o['seconds'] / p['seconds']:.2f} | {ln_s} | {o['peak_rss_mb']:.0f} / {p['peak_rss_mb']:.0f} / "
                    f"{ln_rss} | {o['import_rss_mb']:.0f} / {p['import_rss_mb']:.0f} |")
    body = (f"{args.lines:,} lines per format, ML-20M-like ({args.users:,} users, {args.items:,} items); each loader "
            f"in its own process, one after the other; times in wall seconds (a shared machine: the ratios are the "
            f"figures). Goal: ours within {GOAL:g}x of pandas' read + group.\n\n" + "\n".join(rows))
    link = append("loading", f"Loading {args.lines:,} lines per format", body)
    for fmt in formats:
        o, p = results[fmt, "ours"], results[fmt, "pandas"]
        ln = results.get((fmt, "line"))
        ratio = o["seconds"] / p["seconds"]
        record("loading", target="load time within 2x of pandas read + group", setting=f"{fmt}, {args.lines:,} lines",
               metric="seconds", value=round(o["seconds"], 2), baseline=round(p["seconds"], 2),
               baseline_of="pandas read_csv + factorize + sort", ratio=round(ratio, 3), goal=f"<= {GOAL:g}",
               met=ratio <= GOAL, peak_rss_mb=round(o["peak_rss_mb"]), baseline_peak_rss_mb=round(p["peak_rss_mb"]),
               line_reader_seconds=round(ln["seconds"], 2) if ln else None,
               line_reader_peak_rss_mb=round(ln["peak_rss_mb"]) if ln else None, log=link, headline=False)


if __name__ == "__main__":
    if "--child" in sys.argv or "--generate" in sys.argv:
        main()  # not through run_main, whose imports (lightning_rec, torch) would count in the pandas side's memory
    else:
        run_main(main)
