"""A 1M-item catalogue end to end on the CPU, and the allocation churn of full-softmax training.

    python bench/scale.py                       # everything below (a few minutes on 2 cores)
    python bench/scale.py --only churn          # one part: churn, train_ce, train_sampled, eval
    python bench/scale.py --ce-steps 3 --eval-users 500,2000

Parts, each in its own child process (so peak RSS and resource usage are that part's own):
  churn          Beauty-size synthetic data (54,542 items, 22,363 users of 5..13 items): SASRec training steps
                 with model.loss_chunk_rows=null (one logit tensor per step, allocated afresh) and with the
                 fused chunked CE (one reused buffer), side by side: system-time share of the CPU time, minor
                 page faults per step (resource.getrusage) and time per step.
  train_ce       1M items, >= 200k users, >= 10M interactions (Zipf popularity, data.synthetic.fast=true):
                 SASRec, full CE over the whole catalogue with model.loss_chunk_rows, batch 128 x length 50:
                 peak RSS and time per step (the unchunked logits alone would be 128 x 50 x 1M x 4 bytes).
  train_sampled  the same data and model with sampled softmax (neg_sampler=mixed: in-batch + uniform, logQ).
  eval           full ranking over the 1M items with seen items excluded, users in batches, at two user
                 counts: peak RSS (the same at both: memory does not grow with the users) and time per user.
Targets (issue 33): training peak RSS < 8 GB; evaluation peak RSS independent of the number of users.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append, record, run_main  # noqa: E402

PARTS = ("churn", "train_ce", "train_sampled", "eval")


def _usage() -> dict:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"user": r.ru_utime, "sys": r.ru_stime, "minflt": r.ru_minflt, "wall": time.perf_counter()}


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _data(opts: dict, batch: int, seq_len: int, eval_batch: int = 256):
    from lightning_rec.data import SeqDataModule

    dm = SeqDataModule(name="synthetic", synthetic={"fast": True, **opts}, max_len=seq_len, batch_size=batch,
                       eval_batch_size=eval_batch, seed=0)
    dm.setup("fit")
    return dm


def _model(num_items: int, seq_len: int, **kw):
    from lightning_rec import SeqRecModule

    return SeqRecModule(num_items, arch="sasrec", d_model=64, num_blocks=2, num_heads=1, dropout=0.2,
                        max_len=seq_len, **kw)


def _train(dm, model, steps: int, warmup: int, say) -> dict:
    import torch

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    it = iter(dm.train_dataloader())
    times, rows = [], 0
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            start = _usage()
        t0 = time.perf_counter()
        batch = next(it)
        loss = model.train_loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
            rows += int((batch["targets"] != 0).sum())
        say(f"step {step + 1}/{warmup + steps}: loss {loss.item():.3f}, {time.perf_counter() - t0:.2f} s")
    end = _usage()
    cpu = (end["user"] - start["user"]) + (end["sys"] - start["sys"])
    return {"s_per_step": sum(times) / len(times), "sys_share": (end["sys"] - start["sys"]) / max(cpu, 1e-9),
            "minflt_per_step": (end["minflt"] - start["minflt"]) / steps, "cpu_per_step": cpu / steps,
            "rows_per_step": rows / steps, "peak_rss_gb": _peak_gb()}


def _child(part: str, args_d: dict, variant, queue) -> None:
    import torch

    torch.set_num_threads(args_d["threads"])
    torch.manual_seed(0)

    def say(msg):
        print(f"  [{part}{'' if variant is None else ' ' + str(variant)}] {msg}", flush=True)

    big = {"num_users": args_d["users"], "num_items": args_d["items"], "min_len": args_d["min_len"],
           "max_len": args_d["max_len"], "seed": 0}
    if part == "churn":
        dm = _data({"num_users": 22_363, "num_items": args_d["churn_items"], "min_len": 5, "max_len": 13, "seed": 0},
                   args_d["batch"], args_d["seq_len"])
        out = _train(dm, _model(dm.num_items, args_d["seq_len"], loss="ce", loss_chunk_rows=variant),
                     args_d["churn_steps"], 2, say)
    elif part in ("train_ce", "train_sampled"):
        t0 = time.perf_counter()
        dm = _data(big, args_d["batch"], args_d["seq_len"])
        d = dm.load()
        say(f"data: {d.num_users:,} users, {d.num_items:,} items, {len(d.items):,} interactions "
            f"({time.perf_counter() - t0:.0f} s, peak RSS {_peak_gb():.2f} GB)")
        kw = ({"loss": "ce", "loss_chunk_rows": args_d["chunk_rows"]} if part == "train_ce" else
              {"loss": "sampled_softmax", "neg_sampler": "mixed", "num_negatives": args_d["negatives"],
               "loss_chunk_rows": args_d["chunk_rows"]})
        steps = args_d["ce_steps"] if part == "train_ce" else args_d["sampled_steps"]
        out = _train(dm, _model(dm.num_items, args_d["seq_len"], **kw), steps, 1, say)
        out.update(users=d.num_users, items=d.num_items, interactions=len(d.items))
    else:  # eval at `variant` users
        dm = _data(big, args_d["batch"], args_d["seq_len"], args_d["eval_batch"])
        model = _model(dm.num_items, args_d["seq_len"], exclude_seen=True).eval()
        before = _peak_gb()
        ds, n, bs = dm.test_set, int(variant), args_d["eval_batch"]
        t0 = time.perf_counter()
        hits = 0.0
        with torch.no_grad():
            for s in range(0, n, bs):
                ranks = model._ranks(ds.__getitems__(list(range(s, min(s + bs, n)))))
                hits += float((ranks < 10).sum())
        dt = time.perf_counter() - t0
        say(f"{n} users: {dt:.1f} s, HR@10 {hits / n:.4f} (untrained)")
        out = {"users_evaluated": n, "s_per_user": dt / n, "peak_rss_gb": _peak_gb(), "peak_before_eval_gb": before}
    queue.put(out)


def _run(part: str, args, variant=None) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(part, vars(args), variant, q))
    p.start()
    out = q.get()
    p.join()
    if p.exitcode:
        raise SystemExit(f"{part}: child exited with {p.exitcode}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=200_000)
    ap.add_argument("--min-len", type=int, default=25, help="items per user, uniform in [min, max]")
    ap.add_argument("--max-len", type=int, default=80)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=50)
    ap.add_argument("--chunk-rows", type=int, default=256, help="model.loss_chunk_rows at 1M items")
    ap.add_argument("--ce-steps", type=int, default=2, help="timed full-CE steps at 1M items (after one warm-up)")
    ap.add_argument("--sampled-steps", type=int, default=10)
    ap.add_argument("--negatives", type=int, default=1024, help="uniform negatives of the mixed sampler")
    ap.add_argument("--eval-users", default="1000,4000", help="two user counts")
    ap.add_argument("--eval-batch", type=int, default=256)
    ap.add_argument("--churn-items", type=int, default=54_542)
    ap.add_argument("--churn-steps", type=int, default=30)
    ap.add_argument("--churn-chunk", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=",".join(PARTS))
    ap.add_argument("--no-record", action="store_true", help="print the figures only (smoke runs)")
    args = ap.parse_args()
    only = [p for p in args.only.split(",") if p]
    bad = [p for p in only if p not in PARTS]
    if bad:
        ap.error(f"--only: unknown part {bad[0]}; expected some of {', '.join(PARTS)}")
    lines, recs = [], []

    if "churn" in only:
        print("churn: Beauty-size data, unchunked vs chunked full CE", flush=True)
        a = _run("churn", args, None)
        b = _run("churn", args, args.churn_chunk)
        lines += [f"Allocation churn, Beauty-size synthetic data ({args.churn_items:,} items, 22,363 users, SASRec d=64, batch "
                  f"{args.batch}, {args.churn_steps} steps after 2 warm-up steps, one child process each):", "",
                  "| loss | system time share | minor page faults / step | CPU s / step | s / step | peak RSS GB |",
                  "|---|---|---|---|---|---|"]
        for name, r in (("full CE, loss_chunk_rows=null", a), (f"fused chunked CE, loss_chunk_rows={args.churn_chunk}", b)):
            lines.append(f"| {name} | {r['sys_share']:.1%} | {r['minflt_per_step']:,.0f} | {r['cpu_per_step']:.3f} | "
                         f"{r['s_per_step']:.3f} | {r['peak_rss_gb']:.2f} |")
        lines += ["", f"(about {a['rows_per_step']:.0f} positions per step)", ""]
        recs += [dict(setting=f"Beauty-size synthetic, {args.churn_items:,} items, SASRec full CE", metric="system time share of CPU time",
                      value=round(b["sys_share"], 3), baseline=round(a["sys_share"], 3),
                      baseline_of="loss_chunk_rows=null", ratio=round(b["sys_share"] / max(a["sys_share"], 1e-9), 3),
                      goal="lower than unchunked", met=bool(b["sys_share"] < a["sys_share"])),
                 dict(setting=f"Beauty-size synthetic, {args.churn_items:,} items, SASRec full CE", metric="minor page faults per step",
                      value=round(b["minflt_per_step"]), baseline=round(a["minflt_per_step"]),
                      baseline_of="loss_chunk_rows=null",
                      ratio=round(b["minflt_per_step"] / max(a["minflt_per_step"], 1), 3),
                      goal="fewer than unchunked", met=bool(b["minflt_per_step"] < a["minflt_per_step"])),
                 dict(setting=f"Beauty-size synthetic, {args.churn_items:,} items, SASRec full CE", metric="s per training step",
                      value=round(b["s_per_step"], 3), baseline=round(a["s_per_step"], 3),
                      baseline_of="loss_chunk_rows=null", ratio=round(b["s_per_step"] / a["s_per_step"], 2),
                      goal="context", met=None)]

    for part in ("train_ce", "train_sampled"):
        if part not in only:
            continue
        print(f"{part}: {args.items:,} items", flush=True)
        r = _run(part, args)
        what = (f"full CE, loss_chunk_rows={args.chunk_rows}" if part == "train_ce" else
                f"sampled softmax, mixed in-batch + {args.negatives} uniform negatives, logQ")
        steps = args.ce_steps if part == "train_ce" else args.sampled_steps
        full_gb = args.batch * args.seq_len * args.items * 4 / 1e9
        lines += [f"Training at {r['items']:,} items ({r['users']:,} users, {r['interactions']:,} interactions, "
                  f"Zipf popularity), SASRec d=64 x2 blocks, batch {args.batch} x length {args.seq_len}, {what}: "
                  f"peak RSS **{r['peak_rss_gb']:.2f} GB**, {r['s_per_step']:.2f} s per step ({steps} steps after "
                  f"one warm-up, {r['rows_per_step']:.0f} positions per step)"
                  + (f"; the unchunked logits alone would take {full_gb:.1f} GB." if part == "train_ce" else "."), ""]
        recs.append(dict(setting=f"1M items, SASRec, {what}, batch {args.batch} x {args.seq_len}",
                         metric="peak RSS, GB (training)", value=round(r["peak_rss_gb"], 2), goal="< 8 GB",
                         met=bool(r["peak_rss_gb"] < 8)))
        recs.append(dict(setting=f"1M items, SASRec, {what}, batch {args.batch} x {args.seq_len}",
                         metric="s per training step", value=round(r["s_per_step"], 2), goal="context", met=None))

    if "eval" in only:
        counts = [int(x) for x in args.eval_users.split(",")]
        res = []
        for n in counts:
            print(f"eval: {n} users over {args.items:,} items", flush=True)
            res.append(_run("eval", args, n))
        lines += [f"Full-ranking evaluation over {args.items:,} items, seen items excluded, {args.eval_batch} users "
                  "per batch (item chunks of 65,536), one child process per user count:", "",
                  "| users evaluated | peak RSS GB | peak RSS before evaluating GB | ms / user |", "|---|---|---|---|"]
        for r in res:
            lines.append(f"| {r['users_evaluated']:,} | {r['peak_rss_gb']:.2f} | {r['peak_before_eval_gb']:.2f} | "
                         f"{1000 * r['s_per_user']:.2f} |")
        lines.append("")
        a, b = res[0], res[-1]
        grow = b["peak_rss_gb"] / a["peak_rss_gb"]
        recs.append(dict(setting=f"1M items, full ranking, exclude seen, {a['users_evaluated']} vs {b['users_evaluated']} users",
                         metric="peak RSS, GB (evaluation)", value=round(b["peak_rss_gb"], 2),
                         baseline=round(a["peak_rss_gb"], 2), baseline_of=f"{a['users_evaluated']} users",
                         ratio=round(grow, 3), goal="ratio <= 1.05 (independent of the users)", met=bool(grow <= 1.05)))
        recs.append(dict(setting="1M items, full ranking, exclude seen", metric="ms per evaluated user",
                         value=round(1000 * b["s_per_user"], 2), goal="context", met=None))

    if args.no_record:
        print("\n".join(lines))
        return
    log = append("scale", "1M-item catalogue and allocation churn", "\n".join(lines))
    for rec in recs:
        record("scale", target="Scale: memory-bounded losses, 1M items", log=log, **rec)


if __name__ == "__main__":
    run_main(main)
