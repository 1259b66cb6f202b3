"""Optimizer switching on ML-1M: Adam, AdaShift, and switches to SGD (SWATS or scheduled).

    python bench/optim_switch.py                          # CPU-sized defaults (below)
    python bench/optim_switch.py --max-len 200 --epochs 60 trainer=gpu
    python bench/optim_switch.py --only adam,adam_sgd_auto

Runs (SASRec, same data, epochs and seed; full ranking):
  adam               Adam (--lr, default 4e-3) throughout
  adashift           AdaShift (n = 10, max reduction), same lr
  adam_sgd_auto      Adam, then SGD at the SWATS estimate when its rule fires (deadline: half the epochs)
  adam_sgd_auto_2g   the same with two parameter groups (LayerNorms and biases in a no-weight-decay group),
                     each switching on its own SWATS criterion
  adam_sgd_sched     Adam, then SGD at the start of epoch --switch-epoch (default: three quarters of the
                     epochs), at the SWATS estimate or at --sgd-lr
  adashift_sgd_auto  AdaShift, then SGD (SWATS rule, same deadline)
  adashift_row, adashift_row_sgd_auto   the same two with reduction=row_max (one scale per item row)
For each: validation NDCG@10 against training wall-clock time (one PNG in docs/), the training time
to reach the Adam run's best validation NDCG@10 minus 1%, the switch step and SGD rate, and the test
NDCG@10 of the best checkpoint. Target (issue #5): a switching variant ends at least as good as Adam
on test NDCG@10 and reaches Adam's target sooner.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, SHARED_DATA, append, finish_ndcg_plot, run_main  # noqa: E402

RUNS = os.environ.get("LIGHTNING_REC_BENCH_RUNS", os.path.expanduser("~/.cache/lightning_rec/bench-runs"))
ORDER = ["adam", "adashift", "adam_sgd_auto", "adam_sgd_auto_2g", "adam_sgd_sched", "adashift_sgd_auto", "adashift_row",
         "adashift_row_sgd_auto"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(SHARED_DATA, "ml-1m.txt.gz"))
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--switch-epoch", type=int, default=None,
                    help="scheduled switch (default: three quarters of the epochs)")
    ap.add_argument("--sgd-lr", type=float, default=None, help="scheduled switch: this SGD rate, not the estimate")
    ap.add_argument("--lr", type=float, default=4e-3, help="rate of the adaptive phase")
    ap.add_argument("--max-len", type=int, default=50)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--min-steps", type=int, default=100, help="no automatic switch before this step")
    ap.add_argument("--tag", default="", help="suffix of the plot file: docs/optim_switch<tag>.png")
    ap.add_argument("--only", default=",".join(ORDER))
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_args()
    from lightning_rec.cli import run

    half = max(1, args.epochs // 2)
    late = args.switch_epoch if args.switch_epoch is not None else max(1, 3 * args.epochs // 4)
    given = [f"callbacks.optimizer_switch.sgd_lr={args.sgd_lr}"] if args.sgd_lr else []
    sw = ["callbacks=swats", f"callbacks.optimizer_switch.min_steps={args.min_steps}"]
    runs = {
        "adam": ["optimizer=adam"],
        "adashift": ["optimizer=adashift"],
        "adam_sgd_auto": ["optimizer=adam", *sw, f"callbacks.optimizer_switch.deadline_epoch={half}"],
        "adam_sgd_sched": ["optimizer=adam", *sw, "callbacks.optimizer_switch.mode=scheduled",
                           f"callbacks.optimizer_switch.at_epoch={late}", *given],
        "adam_sgd_auto_2g": ["optimizer=adam", "+optimizer.no_weight_decay=[*ln*,*norm*,*bias]", *sw,
                             f"callbacks.optimizer_switch.deadline_epoch={half}"],
        "adashift_sgd_auto": ["optimizer=adashift", *sw, f"callbacks.optimizer_switch.deadline_epoch={half}"],
        "adashift_row": ["optimizer=adashift", "optimizer.reduction=row_max"],
        "adashift_row_sgd_auto": ["optimizer=adashift", "optimizer.reduction=row_max", *sw,
                                  f"callbacks.optimizer_switch.deadline_epoch={half}"],
    }
    chosen = [r for r in args.only.split(",") if r]
    if any(r not in runs for r in chosen):
        raise SystemExit(f"--only: expected some of {','.join(ORDER)}")
    common = [
        "data=file", f"data.path={args.data}", "data.format=sasrec", f"data.max_len={args.max_len}",
        f"data.batch_size={args.batch_size}", "model=sasrec", f"model.d_model={args.d_model}", "model.num_blocks=2",
        "model.dropout=0.2", f"optimizer.lr={args.lr}", f"runs_dir={RUNS}", "logger=csv", "trainer.enable_progress_bar=false",
        f"trainer.max_epochs={args.epochs}", f"seed={args.seed}",
        "+callbacks.timeline._target_=lightning_rec.callbacks.Timeline",
    ]
    res = {}
    for name in chosen:
        out = run(["fit", *common, f"name=bench-optim-{name}", *runs[name], *args.overrides])
        with open(os.path.join(out["run_dir"], "timeline.jsonl")) as f:
            out["timeline"] = [json.loads(line) for line in f]
        import torch

        ck = torch.load(os.path.join(out["run_dir"], "checkpoints", "last.ckpt"), weights_only=True, map_location="cpu")
        state = next((v for k, v in ck.get("callbacks", {}).items() if k.startswith("OptimizerSwitchCallback")), None)
        out["switch"] = state
        res[name] = out

    ref = "adam" if "adam" in res else chosen[0]
    target = 0.99 * max(r["val/ndcg@10"] for r in res[ref]["timeline"])

    def time_to(tl):
        return next((r["train_seconds"] for r in tl if r.get("val/ndcg@10", -1) >= target), None)

    t_ref = time_to(res[ref]["timeline"])
    rows = [f"| run | test NDCG@10 | best val NDCG@10 | train time to target | ratio to {ref} | switch step | SGD lr | "
            "total train min |", "|---|---|---|---|---|---|---|---|"]
    better = []
    for name, r in res.items():
        t = time_to(r["timeline"])
        s = r["switch"] or {}
        ratio = f"{t / t_ref:.2f}" if t is not None and t_ref else "not reached"
        test = r["test"].get("test/ndcg@10", float("nan"))
        rows.append(
            f"| {name} | {test:.4f} | {max(x['val/ndcg@10'] for x in r['timeline']):.4f} | "
            f"{'never' if t is None else f'{t / 60:.1f} min'} | {ratio} | {', '.join('-' if x is None else str(x) for x in (s.get('switch_steps') or [s.get('switch_step')])) if s.get('switch_step') else ''} | "
            f"{', '.join('-' if x is None else f'{x:.3g}' for x in (s.get('lrs') or []))} | "
            f"{r['timeline'][-1]['train_seconds'] / 60:.1f} |")
        if "sgd" in name and ref == "adam" and t is not None and t_ref and t < t_ref and \
                test >= res["adam"]["test"].get("test/ndcg@10", 1):
            better.append(name)
    plot(os.path.join(ROOT, "docs", f"optim_switch{args.tag}.png"), res, target,
         f"SASRec d={args.d_model}, 2 blocks, max_len {args.max_len}, ML-1M, {args.epochs} epochs", ref)
    verdict = (f"Target (a switching run ends >= Adam on test NDCG@10 and reaches Adam's target sooner): "
               f"{'not evaluated (no Adam run)' if ref != 'adam' else 'met by ' + ', '.join(better) if better else 'NOT met by any run'}.")
    setting = (f"SASRec d={args.d_model}, 2 blocks, 1 head, dropout 0.2, max_len {args.max_len}, full-softmax CE, "
               f"lr {args.lr:g}, batch {args.batch_size}, {args.epochs} epochs, seed {args.seed}, `{os.path.basename(args.data)}`; "
               f"automatic switches: SWATS rule after {args.min_steps} steps, deadline epoch {half}; scheduled: epoch {late} "
               f"at {'SGD lr ' + format(args.sgd_lr, 'g') if args.sgd_lr else 'the SWATS estimate'}; "
               f"target = 0.99 x {ref}'s best validation NDCG@10 = {target:.4f}; time = training batches only (Timeline)")
    append("optim_switch", "Optimizer switching on ML-1M", f"Setting: {setting}.\n\n" + "\n".join(rows) + f"\n\n{verdict}\n\n"
           f"Plot: [docs/optim_switch{args.tag}.png](docs/optim_switch{args.tag}.png).")


def plot(path, res, target, title, ref="adam"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, r in res.items():
        tl = r["timeline"]
        line, = ax.plot([x["train_seconds"] / 60 for x in tl], [x["val/ndcg@10"] for x in tl], marker="o", ms=3,
                        label=name)
        s = r["switch"] or {}
        if s.get("switch_step"):
            at = next((x["train_seconds"] / 60 for x in tl if x["step"] >= s["switch_step"]), None)
            if at is not None:
                ax.axvline(at, color=line.get_color(), ls=":", lw=1)
    finish_ndcg_plot(fig, ax, path, title, target, f"target: {ref} best - 1%", legend_size=7)


if __name__ == "__main__":
    run_main(main)
