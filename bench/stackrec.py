"""StackRec speed-up on ML-1M: stacked vs from-scratch training, wall-clock time to equal quality.

    python bench/stackrec.py --scenario ts     # NextItNet 4 -> 8 -> 16 blocks vs 16 from scratch
    python bench/stackrec.py --scenario cl     # 8 blocks on 80% of each history, stack, fine-tune on 100%
    python bench/stackrec.py --scenario both   # TS and CL; CL reuses the TS from-scratch run
    python bench/stackrec.py --scenario ts --reuse-scratch RUN_A --reuse-ts RUN_B   # section + plot from two runs,
                                               # e.g. ones cut off by a time limit (their timelines so far)

Time is training time only (forward, backward, optimizer; validation excluded), read from the
Timeline callback. The target is the from-scratch run's best validation NDCG@10 minus 1%
(relative); each run's time to first reach it is reported, and the ratio stacked / scratch.
For CL only the fine-tune stage (after the stack, on 100%) is counted, as in the paper.
Plots go to docs/stackrec_<scenario>.png; figures are appended to docs/log/stackrec.md and
bench/results/stackrec.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, SHARED_DATA, append, finish_ndcg_plot, record, run_main  # noqa: E402

RUNS = os.environ.get("LIGHTNING_REC_BENCH_RUNS", os.path.expanduser("~/.cache/lightning_rec/bench-runs"))


def fit(name: str, args, *extra: str) -> dict:
    from lightning_rec.cli import run

    over = [
        "data=file", f"data.path={args.data}", "data.format=sasrec", f"data.max_len={args.max_len}",
        f"data.batch_size={args.batch_size}", f"model={args.arch}", f"model.d_model={args.d_model}",
        f"model.dropout={args.dropout}", f"name={name}", f"runs_dir={RUNS}", "logger=csv",
        "trainer.enable_progress_bar=false", "+callbacks.timeline._target_=lightning_rec.callbacks.Timeline",
        f"seed={args.seed}", f"model.loss={args.loss}", *args.overrides, *extra,
    ]
    out = run(["fit", *over])
    with open(os.path.join(out["run_dir"], "timeline.jsonl")) as f:
        out["timeline"] = [json.loads(line) for line in f]
    return out


def reuse(run_dir: str, option: str = "--reuse-scratch") -> dict:
    """Timeline and test metrics (best checkpoint) of a finished run, or of one cut off mid-fit."""
    import glob

    from lightning_rec.cli import run

    path = os.path.join(run_dir, "timeline.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"{option} {run_dir}: no timeline.jsonl there; expected the folder of a run made by this script")
    with open(path) as f:
        timeline = [json.loads(line) for line in f if line.strip()]
    if not timeline:
        raise SystemExit(f"{option} {path}: empty; the run never finished a validation")
    best = [c for c in glob.glob(os.path.join(run_dir, "checkpoints", "epoch*.ckpt"))]
    if len(best) != 1:
        raise SystemExit(f"{option} {run_dir}: expected one best checkpoint (checkpoints/epoch*.ckpt), found {best}")
    test = run(["test", f"ckpt_path={best[0]}", "trainer.enable_progress_bar=false"])
    return {"timeline": timeline, "test": test, "run_dir": run_dir}


def time_to(timeline: list[dict], target: float, offset: float = 0.0) -> float | None:
    for row in timeline:
        if row.get("val/ndcg@10", -1) >= target:
            return row["train_seconds"] - offset
    return None


def plot(path: str, curves: list[tuple[str, list[dict], float]], target: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, tl, offset in curves:
        xs = [(r["train_seconds"] - offset) / 60 for r in tl]
        ys = [r["val/ndcg@10"] for r in tl]
        line, = ax.plot(xs, ys, marker="o", ms=3, label=label)
        prev = None
        for r, x in zip(tl, xs):
            if prev is not None and r["num_blocks"] != prev:
                ax.axvline(x, color=line.get_color(), ls=":", lw=1)
                ax.annotate(f"{r['num_blocks']} blocks", (x, min(ys)), rotation=90, fontsize=7,
                            color=line.get_color(), va="bottom", ha="right")
            prev = r["num_blocks"]
    finish_ndcg_plot(fig, ax, path, title, target, "target: scratch best - 1%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=["ts", "cl", "both"], default="both")
    ap.add_argument("--data", default=os.path.join(SHARED_DATA, "ml-1m.txt.gz"))
    ap.add_argument("--arch", default="nextitnet", choices=["nextitnet", "sasrec"])
    ap.add_argument("--start-blocks", type=int, default=4, help="TS: first depth (doubled twice)")
    ap.add_argument("--stack-epochs", default="2,5", help="TS: epochs at which to stack")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--cl-blocks", type=int, default=8, help="CL: depth before the stack")
    ap.add_argument("--cl-pre-epochs", type=int, default=8, help="CL: epochs on the first 80%% of each history (not timed)")
    ap.add_argument("--cl-epochs", type=int, default=12, help="CL: fine-tune epochs on 100%%")
    ap.add_argument("--cl-fraction", type=float, default=0.8)
    ap.add_argument("--max-len", type=int, default=50)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--keep-moments", action="store_true",
                    help="TS: keep Adam's moments for the copied weights at each stack "
                         "(callbacks.stacking.optimizer_state=keep_moments; default: a fresh optimizer)")
    ap.add_argument("--loss", default="ce", choices=["ce", "sampled_softmax"],
                    help="training loss of every run (evaluation is full ranking either way)")
    ap.add_argument("--side-by-side", action="store_true",
                    help="run the from-scratch run and the stacked runs at the same time, each in its own process "
                         "pinned to its own CPU core with 1 thread, so their times are measured side by side")
    ap.add_argument("--tag", default="", help="suffix for the plot files, e.g. _gpu -> docs/stackrec_ts_gpu.png")
    ap.add_argument("--reuse-scratch", default=None, metavar="RUN_DIR",
                    help="use a finished from-scratch run (same settings) instead of training it again")
    ap.add_argument("--reuse-ts", default=None, metavar="RUN_DIR",
                    help="use a TS run made by this script (finished, or cut off: its timeline so far and best "
                         "checkpoint) instead of training it again; with --reuse-scratch, rebuilds the section and plot")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_args()
    if args.reuse_ts and args.scenario == "cl":
        raise SystemExit("--reuse-ts needs --scenario ts or both")
    stacks = [int(e) for e in args.stack_epochs.split(",") if e]
    deep = args.start_blocks * 2 ** len(stacks)
    ov = dict(o.split("=", 1) for o in args.overrides if "=" in o)
    sampler = ov.get("model.neg_sampler", "uniform")
    loss = ("full-softmax CE" if args.loss == "ce" else
            f"sampled softmax ({ov.get('model.num_negatives', '256')} {sampler} negatives"
            f"{', log q corrected' if sampler == 'popularity' and ov.get('model.logq_correction', 'true') == 'true' else ''})")
    setting = (f"{args.arch}, d={args.d_model}, max_len={args.max_len}, batch {args.batch_size}, dropout {args.dropout}, "
               f"{loss}, Adam 1e-3, {args.epochs} epochs, `{os.path.basename(args.data)}`, seed {args.seed}")
    if args.side_by_side:
        if args.reuse_scratch or args.reuse_ts:
            raise SystemExit("--side-by-side trains the from-scratch run beside the stacked ones; drop --reuse-scratch "
                             "and --reuse-ts")
        setting += "; side by side: each run in its own process on its own core, 1 thread"
        scratch, stacked = _side_by_side(args, deep, stacks)
    else:
        scratch = (reuse(args.reuse_scratch) if args.reuse_scratch else _scratch_lane(args, deep))
        stacked = None
    best = max(r["val/ndcg@10"] for r in scratch["timeline"])
    target = 0.99 * best
    t_scratch = time_to(scratch["timeline"], target)
    lines = []

    stacked = stacked or _stacked_lane(args, deep, stacks)
    if args.scenario in ("ts", "both"):
        ts = stacked["ts"]
        t_ts = time_to(ts["timeline"], target)
        ratio = f"{t_ts / t_scratch:.2f}" if t_ts is not None and t_scratch else "not reached"
        plot(os.path.join(ROOT, "docs", f"stackrec_ts{args.tag}.png"),
             [(f"from scratch, {deep} blocks", scratch["timeline"], 0.0),
              (f"stacked {args.start_blocks}->{deep} at epochs {stacks}", ts["timeline"], 0.0)],
             target, f"StackRec TS on ML-1M ({setting})")
        lines.append(
            f"**TS** ({args.start_blocks} -> {deep} blocks, stacks at epochs {stacks}, adjacent, function-preserving{', Adam moments kept' if args.keep_moments else ''}): "
            f"target val NDCG@10 = 0.99 x {best:.4f} = {target:.4f}. Training time to target: stacked "
            f"{_fmt(t_ts)} vs from scratch {_fmt(t_scratch)}: **ratio {ratio}** (issue target <= 0.6, paper ~0.57). "
            f"Total training time: stacked {ts['timeline'][-1]['train_seconds'] / 60:.1f} min, scratch "
            f"{scratch['timeline'][-1]['train_seconds'] / 60:.1f} min. Test NDCG@10 (best checkpoint): stacked "
            f"{ts['test'].get('test/ndcg@10', float('nan')):.4f}, scratch {scratch['test'].get('test/ndcg@10', float('nan')):.4f}. "
            f"Plot: [docs/stackrec_ts{args.tag}.png](docs/stackrec_ts{args.tag}.png)."
            + _cut_note("stacked", ts["timeline"], args.epochs, deep) + _cut_note("scratch", scratch["timeline"], args.epochs, deep)
        )

    if args.scenario in ("cl", "both"):
        pre, cl = stacked["cl_pre"], stacked["cl"]
        t_cl = time_to(cl["timeline"], target)
        ratio = f"{t_cl / t_scratch:.2f}" if t_cl is not None and t_scratch else "not reached"
        plot(os.path.join(ROOT, "docs", f"stackrec_cl{args.tag}.png"),
             [(f"from scratch on 100%, {deep} blocks", scratch["timeline"], 0.0),
              (f"{args.cl_blocks} blocks on {int(args.cl_fraction * 100)}% -> stacked to {2 * args.cl_blocks}, fine-tune on 100%",
               cl["timeline"], 0.0)],
             target, f"StackRec CL on ML-1M ({setting})")
        note = "" if 2 * args.cl_blocks == deep else f" (scratch model has {deep} blocks)"
        lines.append(
            f"**CL** ({args.cl_blocks} blocks for {args.cl_pre_epochs} epochs on the first {int(args.cl_fraction * 100)}% of each "
            f"user's history, stacked to {2 * args.cl_blocks}, fine-tuned on 100%{note}): fine-tune training time to the "
            f"target {target:.4f}: {_fmt(t_cl)} vs from scratch {_fmt(t_scratch)}: **ratio {ratio}** (issue target <= 0.5). "
            f"Pre-training on 80% took {pre['timeline'][-1]['train_seconds'] / 60:.1f} min (not counted). Test NDCG@10: "
            f"stacked {cl['test'].get('test/ndcg@10', float('nan')):.4f}, scratch {scratch['test'].get('test/ndcg@10', float('nan')):.4f}. "
            f"Plot: [docs/stackrec_cl{args.tag}.png](docs/stackrec_cl{args.tag}.png)."
        )

    log = append("stackrec", "StackRec speed-up on ML-1M", f"Setting: {setting}.\n\n" + "\n\n".join(lines))
    for scenario, key, goal in (("TS", "ts", 0.6), ("CL", "cl", 0.5)):
        if args.scenario not in (key, "both") or key not in stacked or not t_scratch:
            continue
        t = time_to(stacked[key]["timeline"], target)
        blocks = f"{args.start_blocks} -> {deep}" if key == "ts" else f"{args.cl_blocks} -> {2 * args.cl_blocks}"
        record("stackrec", target=f"StackRec {scenario}", setting=f"{args.arch} {blocks} blocks; {setting}",
               metric="training minutes to 0.99 x the from-scratch best", value=None if t is None else round(t / 60, 2),
               baseline=round(t_scratch / 60, 2), baseline_of="from scratch",
               ratio=None if t is None else round(t / t_scratch, 2), goal=f"ratio <= {goal}",
               met=t is not None and t / t_scratch <= goal, log=log)


def _scratch_lane(args, deep: int) -> dict:
    return fit(f"bench-stackrec-scratch-{deep}", args, f"model.num_blocks={deep}", f"trainer.max_epochs={args.epochs}")


def _stacked_lane(args, deep: int, stacks: list[int]) -> dict:
    """The stacked runs of the chosen scenarios, one after another: ``{"ts", "cl_pre", "cl"}``."""
    out = {}
    if args.scenario in ("ts", "both"):
        out["ts"] = reuse(args.reuse_ts, "--reuse-ts") if args.reuse_ts else fit(
            f"bench-stackrec-ts-{args.start_blocks}-{deep}", args, f"model.num_blocks={args.start_blocks}",
            "callbacks=stacking", f"callbacks.stacking.at_epochs=[{','.join(map(str, stacks))}]",
            f"trainer.max_epochs={args.epochs}",
            *(["callbacks.stacking.optimizer_state=keep_moments"] if args.keep_moments else []))
    if args.scenario in ("cl", "both"):
        out["cl_pre"] = fit(f"bench-stackrec-cl-pre-{args.cl_blocks}", args, f"model.num_blocks={args.cl_blocks}",
                            f"data.fraction={args.cl_fraction}", f"trainer.max_epochs={args.cl_pre_epochs}",
                            "test_after_fit=false")
        from lightning_rec.cli import run

        deep_ckpt = os.path.join(out["cl_pre"]["run_dir"], "stacked.ckpt")
        run(["stack", f"ckpt={os.path.join(out['cl_pre']['run_dir'], 'checkpoints', 'last.ckpt')}", "mode=adjacent",
             f"out={deep_ckpt}"])
        out["cl"] = fit(f"bench-stackrec-cl-ft-{2 * args.cl_blocks}", args, f"init_from={deep_ckpt}",
                        f"trainer.max_epochs={args.cl_epochs}")
    return out


def _lane(which: str, core: int, args, deep: int, stacks: list[int], queue) -> None:
    import torch

    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    try:
        queue.put((which, _scratch_lane(args, deep) if which == "scratch" else _stacked_lane(args, deep, stacks)))
    except BaseException as e:
        queue.put((which, e))
        raise


def _side_by_side(args, deep: int, stacks: list[int]) -> tuple[dict, dict]:
    """Both lanes at once, each in a process of its own on its own core (1 thread each)."""
    import multiprocessing as mp

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("--side-by-side needs 2 CPU cores")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_lane, args=(w, cores[i], args, deep, stacks, queue))
             for i, w in enumerate(("scratch", "stacked"))]
    for p in procs:
        p.start()
    got = dict(queue.get() for _ in procs)
    for p in procs:
        p.join()
    for which, res in got.items():
        if isinstance(res, BaseException):
            raise SystemExit(f"the {which} lane failed: {res!r}")
    return got["scratch"], got["stacked"]


def _cut_note(label: str, timeline: list[dict], epochs: int, deep: int) -> str:
    """A sentence when a (reused) run's timeline stops before ``epochs`` or below ``deep`` blocks, else ''."""
    last = timeline[-1]
    parts = []
    if last.get("epoch", epochs - 1) < epochs - 1:
        parts.append(f"stops at epoch {last['epoch']} of {epochs} (cut off)")
    if last.get("num_blocks", deep) != deep:
        parts.append(f"{'stops ' if not parts else ''}at {last['num_blocks']} blocks, not {deep}")
    return f" The {label} run's timeline {', '.join(parts)}; figures are up to there." if parts else ""


def _fmt(t: float | None) -> str:
    return "never" if t is None else f"{t / 60:.1f} min"


if __name__ == "__main__":
    run_main(main)
