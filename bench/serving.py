"""Serving latency and parity: a rocket's booster and light net (eager torch) against the light net's bundle.

    python bench/serving.py                          # train a rocket_ml1m for 2 epochs, then measure (~5 min)
    python bench/serving.py --ckpt runs/.../best.ckpt    # measure an existing rocket checkpoint
    python bench/serving.py --ann-items 100000,1000000   # also 1M items (HNSW build ~6 min on 2 cores)
    python bench/serving.py --ckpt r.ckpt --requests 50 --ann-items 5000 --no-record   # a smoke run

Paths, each answering "top-10 items for this history of original ids, the history's items left out":
  booster (eager)   RocketModule.export_net("booster") in torch, as predict runs it: the last max_len internal
                    ids left-padded, user_representation, metrics.topk_items over the whole catalogue
  light (eager)     the same for export_net("light"), the net a rocket ships
  bundle (exact)    export format=onnx of the light net: onnxruntime encoder + numpy exact scoring
  bundle (hnsw)     export format=onnx index=hnsw: onnxruntime encoder + FAISS HNSW top-K
Both eager paths include the id mapping (original -> internal -> original), as the bundle does.

Figures, all in one process with the same thread count, the paths taking turns request by request:
  batch 1     p50 / p99 ms per request over --requests real ML-1M histories (after --warmup);
  batch 256   throughput in users/s over every user (>= 10 batches);
  parity      for every user: the exact bundle's top-10 == the eager light net's (fraction of users);
              the HNSW bundle's recall@10 against the exact bundle;
  catalogue   --ann-items N: an untrained, seeded SeqRecModule of the light net's architecture with N items,
              written as a bundle exact and with HNSW: recall@10 of the index against exact on --ann-queries
              sampled histories (ML-1M's history lengths, uniform items), and the same latency figures.
Goals (issue 33): parity == 1.0; HNSW recall@10 >= 0.99 against exact on a 100k-item catalogue.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHARED_DATA, append, record, run_main  # noqa: E402

RUNS = os.environ.get("LIGHTNING_REC_BENCH_RUNS", os.path.expanduser("~/.cache/lightning_rec/bench-runs"))
TARGET = "Serving: bundle latency and parity"
K = 10


def say(msg: str) -> None:
    print(f"[serving {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def eager_path(model, item_ids: list, max_len: int):
    """``recommend(histories) -> top-K original ids`` for an eager SeqRecModule, as ``predict`` ranks."""
    import torch

    from lightning_rec.metrics import topk_items

    internal = {str(o): i for i, o in enumerate(item_ids) if i > 0}
    model = model.to("cpu").eval()
    chunk = int(model.hparams.get("eval_chunk_size", 65536))

    def recommend(histories: list[list]) -> list[list]:
        rows = [[internal[str(o)] for o in h if str(o) in internal] for h in histories]
        width = max(1, min(max_len, max(len(r) for r in rows)))
        inputs = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T), left-padded with 0
        seen = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)  # the whole history
        for b, r in enumerate(rows):
            last = r[-width:]
            inputs[b, width - len(last):] = torch.tensor(last)
            seen[b, :len(r)] = torch.tensor(r)
        with torch.inference_mode():
            h = model.user_representation(inputs)  # (B, d)
            top, _ = topk_items(model.score_fn(h), model.num_items, K, seen, chunk)
        return [[item_ids[i] for i in row] for row in top.tolist()]

    return recommend


def bundle_path(bundle):
    def recommend(histories: list[list]) -> list[list]:
        return [r["items"] for r in bundle.recommend_batch(histories, K)]

    return recommend


def measure(paths: dict, histories: list[list], requests: int, warmup: int, batch: int) -> dict:
    """Batch-1 latency (p50/p99 ms) and batch-``batch`` throughput (users/s) of each path, the paths taking
    turns; returns ``{name: {"p50", "p99", "ups", "out"}}`` with ``out`` every history's top-K."""
    import numpy as np

    names = list(paths)
    if len(histories) < warmup + requests:
        from lightning_rec.errors import ConfigError

        raise ConfigError(f"--requests {requests} + --warmup {warmup}: more than the {len(histories)} histories")
    for h in histories[:warmup]:
        for n in names:
            paths[n]([h])
    lat = {n: [] for n in names}
    step = max(1, requests // 10)
    for i, h in enumerate(histories[warmup:warmup + requests]):
        for n in names:
            t0 = time.perf_counter()
            paths[n]([h])
            lat[n].append(time.perf_counter() - t0)
        if (i + 1) % step == 0:
            say(f"  batch 1: {i + 1}/{requests} requests")
    batches = [histories[b:b + batch] for b in range(0, len(histories), batch)]
    for n in names:
        paths[n](batches[0])  # warm-up at this batch size
    spent = {n: 0.0 for n in names}
    out = {n: [] for n in names}
    step = max(1, len(batches) // 5)
    for i, rows in enumerate(batches):
        for n in names:
            t0 = time.perf_counter()
            got = paths[n](rows)
            spent[n] += time.perf_counter() - t0
            out[n] += got
        if (i + 1) % step == 0 or i + 1 == len(batches):
            say(f"  batch {batch}: {i + 1}/{len(batches)} batches")
    return {n: {"p50": float(np.percentile(lat[n], 50)) * 1e3, "p99": float(np.percentile(lat[n], 99)) * 1e3,
                "ups": len(histories) / spent[n], "out": out[n], "batches": len(batches)} for n in names}


def recall(approx: list[list], exact: list[list]) -> float:
    hits = sum(len(set(a) & set(e)) for a, e in zip(approx, exact))
    return hits / sum(len(e) for e in exact)


def table(res: dict, batch: int) -> list[str]:
    return [f"| path | p50 ms (batch 1) | p99 ms (batch 1) | users/s (batch {batch}) |", "|---|---|---|---|",
            *latency_rows(res)]


def latency_rows(res: dict) -> list[str]:
    return [f"| {n} | {r['p50']:.2f} | {r['p99']:.2f} | {r['ups']:,.0f} |" for n, r in res.items()]


def revision() -> str:
    """The commit measured, and whether the serving code differed from it (the scorer changes between runs)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lightning_rec"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "commit unknown (not a git checkout)"
    return f"commit {head}" + (" with uncommitted changes under lightning_rec/" if dirty else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=None, help="a rocket checkpoint (default: train rocket_ml1m for --epochs)")
    ap.add_argument("--data", default=None,
                    help="the interactions file of the requests (default: the checkpoint's data.path; when training, "
                         f"{os.path.join(SHARED_DATA, 'ml-1m.txt.gz')})")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the rocket_ml1m run trained without --ckpt")
    ap.add_argument("--threads", type=int, default=2, help="torch, onnxruntime and FAISS threads")
    ap.add_argument("--requests", type=int, default=300, help="batch-1 requests timed per path (after --warmup)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--ann-items", default="100000",
                    help="comma-separated catalogue sizes for the index figures (0: none); 1000000 takes minutes")
    ap.add_argument("--ann-queries", type=int, default=2560, help="sampled histories per catalogue (>= 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-dir", default=None, help="where the bundles are written (default: a temp folder, removed)")
    ap.add_argument("--no-record", action="store_true", help="print only: no log entry, no result records")
    args = ap.parse_args()
    from lightning_rec.errors import ConfigError

    try:
        ann_sizes = [int(x) for x in args.ann_items.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--ann-items {args.ann_items}: expected comma-separated item counts, e.g. 100000") from None
    ann_sizes = [n for n in ann_sizes if n > 0]
    for option, v, least in (("--threads", args.threads, 1), ("--requests", args.requests, 1),
                             ("--batch", args.batch, 1), ("--ann-queries", args.ann_queries, 1),
                             ("--epochs", args.epochs, 1), ("--warmup", args.warmup, 0)):
        if v < least:
            raise ConfigError(f"{option} {v}: expected an integer >= {least}")

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from lightning_rec import RocketModule, SeqRecModule
    from lightning_rec.cli import run
    from lightning_rec.data import SeqDataModule
    from lightning_rec.runs import load_checkpoint
    from lightning_rec.serving import Bundle
    from lightning_rec.serving.write import write_bundle

    # 1. the model
    ckpt = args.ckpt
    if ckpt is None:
        data = args.data or os.path.join(SHARED_DATA, "ml-1m.txt.gz")
        say(f"training rocket_ml1m for {args.epochs} epochs on {data} (about 1 min per epoch on 2 cores)")
        out = run(["fit", "experiment=rocket_ml1m", f"data.path={data}", f"trainer.max_epochs={args.epochs}",
                   f"runs_dir={RUNS}", "logger=csv", "trainer.enable_progress_bar=false", "name=bench-serving",
                   f"seed={args.seed}"])
        ckpt = out["best_ckpt"]
        say(f"trained: {ckpt}")
    if not os.path.isfile(ckpt):
        raise ConfigError(f"--ckpt {ckpt}: no such file")
    raw = load_checkpoint(ckpt, "--ckpt")
    hp = raw.get("hyper_parameters") or {}
    if hp.get("arch") != "rocket":
        raise ConfigError(f"--ckpt {ckpt}: not a rocket checkpoint (model=rocket); expected booster and light nets")
    item_ids = raw["SeqDataModule"]["id_maps"]["items"]
    dm_hp = dict(raw.get("datamodule_hyper_parameters") or {})
    max_len = int(dm_hp.get("max_len") or hp.get("max_len"))
    if args.data:
        dm_hp.update(name="file", path=args.data)
    rocket = RocketModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    nets = {name: rocket.export_net(name).eval() for name in ("booster", "light")}
    arch = {n: f"{m.hparams.arch} {m.hparams.num_blocks} block(s) d={m.hparams.d_model}" for n, m in nets.items()}
    say(f"nets: booster {arch['booster']}, light {arch['light']}; {len(item_ids) - 1:,} items, max_len {max_len}")

    # 3. the requests: every user's whole history, in original ids
    say(f"reading the users' histories ({dm_hp.get('path')})")
    enc = SeqDataModule(**dm_hp).load()
    if list(enc.item_ids) != list(item_ids):
        raise ConfigError(f"--data {dm_hp.get('path')}: its items are not the checkpoint's catalogue "
                          f"({enc.num_items} vs {len(item_ids) - 1}); pass the file the rocket was trained on")
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(enc.num_users)  # requests in a random user order
    histories = [[item_ids[i] for i in enc.items[enc.indptr[u]:enc.indptr[u + 1]]] for u in order]
    lengths = np.diff(enc.indptr)
    say(f"{len(histories):,} users, history length median {int(np.median(lengths))}, max {int(lengths.max())}")

    work = args.work_dir or tempfile.mkdtemp(prefix="bench-serving-")
    os.makedirs(work, exist_ok=True)
    try:
        # 2. the bundles, through the CLI
        dirs = {"exact": os.path.join(work, "light-exact"), "hnsw": os.path.join(work, "light-hnsw")}
        for kind, d in dirs.items():
            say(f"exporting the light net as an ONNX bundle ({kind}) -> {d}")
            run(["export", f"ckpt={ckpt}", "format=onnx", f"out={d}", "overwrite=true", f"seed={args.seed}",
                 *(["index=hnsw"] if kind == "hnsw" else [])])
        bundles = {kind: Bundle.load(d, threads=args.threads) for kind, d in dirs.items()}
        paths = {"booster (eager)": eager_path(nets["booster"], item_ids, max_len),
                 "light (eager)": eager_path(nets["light"], item_ids, max_len),
                 "bundle (onnx, exact)": bundle_path(bundles["exact"]),
                 "bundle (onnx + hnsw)": bundle_path(bundles["hnsw"])}
        load0 = os.getloadavg()[0]
        say(f"measuring {', '.join(paths)}: batch 1 x {args.requests} requests, batch {args.batch} x every user")
        res = measure(paths, histories, args.requests, args.warmup, args.batch)
        light_out, exact_out = res["light (eager)"]["out"], res["bundle (onnx, exact)"]["out"]
        parity = float(np.mean([a == b for a, b in zip(exact_out, light_out)]))
        rec_ml = recall(res["bundle (onnx + hnsw)"]["out"], exact_out)
        hnsw_info = bundles["hnsw"].manifest["index"]
        say(f"parity {parity:.4f}, HNSW recall@{K} {rec_ml:.4f}")

        # 5. large catalogues
        ann = {}
        for n_items in ann_sizes:
            say(f"catalogue of {n_items:,} items: an untrained {arch['light']} (seed {args.seed})")
            torch.manual_seed(args.seed)
            model = SeqRecModule(**{**dict(nets["light"].hparams), "num_items": n_items}).eval()
            ids = ["<pad>"] + [f"i{i}" for i in range(1, n_items + 1)]
            bdirs = {}
            build = {}
            for kind in ("exact", "hnsw"):
                bdirs[kind] = os.path.join(work, f"ann{n_items}-{kind}")
                shutil.rmtree(bdirs[kind], ignore_errors=True)
                t0 = time.perf_counter()
                write_bundle(model, ids, bdirs[kind], "onnx", max_len=max_len, index="hnsw" if kind == "hnsw" else None,
                             recall_queries=1000, seed=args.seed, log=lambda s: say(s.strip()))
                build[kind] = time.perf_counter() - t0
            bs = {kind: Bundle.load(d, threads=args.threads) for kind, d in bdirs.items()}
            qr = np.random.default_rng(args.seed + 1)
            sampled = [[ids[i] for i in qr.integers(1, n_items + 1, size=int(qr.choice(lengths)))]
                       for _ in range(args.ann_queries)]
            apaths = {"light (eager)": eager_path(model, ids, max_len), "bundle (onnx, exact)": bundle_path(bs["exact"]),
                      "bundle (onnx + hnsw)": bundle_path(bs["hnsw"])}
            say(f"  measuring {', '.join(apaths)} on {len(sampled):,} sampled histories")
            r = measure(apaths, sampled, min(args.requests, len(sampled) - args.warmup), args.warmup, args.batch)
            rc = recall(r["bundle (onnx + hnsw)"]["out"], r["bundle (onnx, exact)"]["out"])
            same = float(np.mean([a == b for a, b in zip(r["bundle (onnx, exact)"]["out"], r["light (eager)"]["out"])]))
            ann[n_items] = {"res": r, "recall": rc, "parity": same, "build_s": build["hnsw"],
                            "export_recall": bs["hnsw"].manifest["index"]["recall_at_k"],
                            "index_s": bs["hnsw"].manifest["index"]["build_s"], "index": bs["hnsw"].manifest["index"]}
            say(f"  {n_items:,} items: HNSW recall@{K} {rc:.4f} (export-time {ann[n_items]['export_recall']:.4f}), "
                f"index built in {ann[n_items]['index_s']:.1f} s")
            del bs, apaths, r, model
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    # 6. the table, the log, the records
    hnsw_opts = f"HNSW M={hnsw_info['hnsw_m']} efConstruction={hnsw_info['ef_construction']} efSearch={hnsw_info['ef_search']}"
    data_name = os.path.basename(str(dm_hp.get("path"))) if dm_hp.get("path") else f"data={dm_hp.get('name')}"
    setting = (f"{data_name}, {os.path.basename(ckpt)}: booster {arch['booster']}, "
               f"light {arch['light']}, max_len {max_len}, top-{K} without the history, {args.threads} threads, {hnsw_opts}")
    lines = [f"Code: {revision()}.", "", f"Setting: {setting}; requests are whole user histories in original ids (median length "
             f"{int(np.median(lengths))}); batch 1: {args.requests} requests per path after {args.warmup} warm-up, "
             f"the paths taking turns; batch {args.batch}: all {len(histories):,} users "
             f"({res['light (eager)']['batches']} batches); load average (1 min) {load0:.2f} before the "
             f"measurements, {os.getloadavg()[0]:.2f} after (the machine is shared: at 2 threads a busy core slows "
             f"torch's small parallel ops most).", "",
             *table(res, args.batch), "",
             f"- Exact bundle top-{K} identical to the eager light net's: **{parity:.4f}** of {len(histories):,} users "
             f"(goal == 1.0).",
             f"- HNSW bundle recall@{K} against the exact bundle: **{rec_ml:.4f}** (export-time recall on random "
             f"histories {hnsw_info['recall_at_k']:.4f}).",
             f"- p50 latency bundle (exact) / light (eager): "
             f"{res['bundle (onnx, exact)']['p50'] / res['light (eager)']['p50']:.2f}x; light / booster (eager): "
             f"{res['light (eager)']['p50'] / res['booster (eager)']['p50']:.2f}x."]
    for n_items, a in ann.items():
        lines += ["", f"Catalogue of {n_items:,} items: untrained {arch['light']} (seed {args.seed}), {hnsw_opts}, "
                  f"index built in {a['index_s']:.1f} s; {args.ann_queries:,} sampled histories (ML-1M's lengths, "
                  f"uniform items); batch 1: {min(args.requests, args.ann_queries - args.warmup)} requests per path.", "",
                  *table(a["res"], args.batch), "",
                  f"- HNSW recall@{K} against exact: **{a['recall']:.4f}** (goal >= 0.99; export-time "
                  f"{a['export_recall']:.4f}); exact bundle top-{K} identical to eager: {a['parity']:.4f}.",
                  f"- p50 latency hnsw / exact: {a['res']['bundle (onnx + hnsw)']['p50'] / a['res']['bundle (onnx, exact)']['p50']:.2f}x; "
                  f"throughput hnsw / exact: {a['res']['bundle (onnx + hnsw)']['ups'] / a['res']['bundle (onnx, exact)']['ups']:.2f}x."]
    body = "\n".join(lines)
    if args.no_record:
        print("\n" + body, flush=True)
        return
    log = append("serving", "Serving latency and parity", body)
    short = (f"{data_name}, rocket checkpoint of epoch {raw.get('epoch')}: light {arch['light']}, booster {arch['booster']}, "
             f"{args.threads} threads")

    def rec(setting_, metric, value, base=None, of=None, goal=None, ok=None, headline=False, nd=4):
        row = dict(target=TARGET, setting=setting_, metric=metric, value=round(value, nd), log=log)
        if base is not None:
            row.update(baseline=round(base, nd), baseline_of=of, ratio=round(value / base, 3))
        if goal:
            row.update(goal=goal, met=bool(ok))
        if headline:
            row["headline"] = True
        record("serving", **row)

    def rec_latency(setting_, r, bases):
        for name, of in bases.items():
            b = r[of] if of else None
            for metric, key, nd in (("p50 ms per request, batch 1", "p50", 3), ("p99 ms per request, batch 1", "p99", 3),
                                    (f"users/s, batch {args.batch}", "ups", 1)):
                rec(setting_, f"{metric}: {name}", r[name][key], b[key] if b else None, of, nd=nd)

    rec_latency(short, res, {"booster (eager)": None, "light (eager)": "booster (eager)",
                             "bundle (onnx, exact)": "light (eager)", "bundle (onnx + hnsw)": "light (eager)"})
    rec(short, f"top-{K} of the exact bundle identical to the eager light net's, fraction of users", parity,
        goal="== 1.0", ok=parity == 1.0)  # on the results page; README keeps the recall row (its size limit)
    rec(short, f"recall@{K} of the HNSW bundle against exact", rec_ml, goal=">= 0.99", ok=rec_ml >= 0.99)
    for n_items, a in ann.items():
        s = f"{n_items:,}-item catalogue, untrained {arch['light']}, {hnsw_opts}, {args.threads} threads"
        rec(s, f"recall@{K} of the HNSW bundle against exact", a["recall"], goal=">= 0.99", ok=a["recall"] >= 0.99,
            headline=n_items == 100_000)
        rec(s, "HNSW index build, s", a["index_s"], nd=2)
        rec_latency(s, a["res"], {"light (eager)": None, "bundle (onnx, exact)": "light (eager)",
                                  "bundle (onnx + hnsw)": "bundle (onnx, exact)"})
    say("recorded in bench/results/serving.jsonl; run python bench/report.py to rewrite the results tables")


if __name__ == "__main__":
    run_main(main)
