"""Rocket Launching on ML-1M: does training the light net beside a booster make it better?

    python bench/rocket.py                                  # CPU-sized defaults (below)
    python bench/rocket.py --max-len 200 --booster-d 128 --epochs 30 trainer=gpu    # on a GPU
    python bench/rocket.py --only light,rocket              # a subset of the runs
    python bench/rocket.py --tied --light-d 32              # tied heads: the light net scores with the shared table

Runs, all with the same data, epochs and seed, full ranking on the test split (best epoch on
validation; for rocket runs the light net's validation NDCG@10 picks it):
  light      the light net alone (SASRec, 1 block)
  rocket     booster + light, shared item embedding, hint (logit MSE, lambda), gradient block
  noblock    rocket without the gradient block (the hint also trains the booster)
  noshare    rocket without the shared embedding
  nohint     booster + light trained together (shared embedding) with no hint term at all
  rocket_kd  rocket + classic KD from the booster (0.9 x T^2 KL, T = 4) on top of the hint
  booster    the booster alone (SASRec, 4 blocks)
Parameters and inference latency (median seconds to score all items for a batch of users) of the
light and booster nets are measured on the exported models, side by side in this process.
Targets (issue #4): rocket light >= 1.05 x light alone, >= 0.95 x booster, latency <= 1/4 booster's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHARED_DATA, append, record, run_main  # noqa: E402

RUNS = os.environ.get("LIGHTNING_REC_BENCH_RUNS", os.path.expanduser("~/.cache/lightning_rec/bench-runs"))
ORDER = ["light", "rocket", "noblock", "noshare", "nohint", "rocket_kd", "booster"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(SHARED_DATA, "ml-1m.txt.gz"))
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=50)
    ap.add_argument("--booster-d", type=int, default=64)
    ap.add_argument("--booster-blocks", type=int, default=4)
    ap.add_argument("--light-blocks", type=int, default=1)
    ap.add_argument("--light-d", type=int, default=None,
                    help="light net width (default: the booster's); narrower sees a projection of the shared table")
    ap.add_argument("--hint-weight", type=float, default=1e-4,
                    help="lambda; the authors' 0.03 was for ~10 classes, x 10 / 3,416 items here is about 1e-4")
    ap.add_argument("--hint-kind", default="mse", choices=["mse", "mse_centered"],
                    help="Rocket's hint on the logits as they are, or with each row's mean taken off (callbacks.hint.kind)")
    ap.add_argument("--hint-start-epoch", type=int, default=0, help="no hint before this epoch (schedule=start_epoch)")
    ap.add_argument("--kd-weight", type=float, default=0.9, help="rocket_kd: weight of T^2 KL(booster || light), T = 4")
    ap.add_argument("--tied", action="store_true",
                    help="score items with the item table (SASRec's tied embeddings): rocket runs set "
                         "model.own_heads=false, so the booster's loss also trains the light net's scoring table")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--latency-users", type=int, default=256)
    ap.add_argument("--only", default=",".join(ORDER), help="comma-separated subset of " + ",".join(ORDER))
    ap.add_argument("--reuse", default="", metavar="NAME=RUN_DIR,...",
                    help="take these runs from finished run folders (same settings) instead of training them again")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_args()
    import torch

    from lightning_rec import RocketModule, SeqRecModule
    from lightning_rec.cli import run
    from lightning_rec.methods.rocket.module import net_parameters, scoring_latency

    d = args.booster_d
    dl = args.light_d or d
    # The nets alone have the same heads as in the rocket, so "light alone" is exactly the net the rocket ships.
    tied = f"model.tied_embeddings={str(args.tied).lower()}"
    booster = [f"model.d_model={d}", f"model.num_blocks={args.booster_blocks}", "model.num_heads=2", tied]
    light = [f"model.d_model={dl}", f"model.num_blocks={args.light_blocks}", "model.num_heads=1", tied]
    rocket = ["model=rocket", f"model.booster.d_model={d}", f"model.booster.num_blocks={args.booster_blocks}",
              "model.booster.num_heads=2", f"model.light.d_model={dl}", f"model.light.num_blocks={args.light_blocks}",
              "model.light.num_heads=1", "callbacks=rocket", f"callbacks.hint.weight={args.hint_weight}", f"callbacks.hint.kind={args.hint_kind}",
              f"model.own_heads={str(not args.tied).lower()}"]
    if args.hint_start_epoch:
        rocket += ["callbacks.hint.schedule=start_epoch", f"callbacks.hint.start_epoch={args.hint_start_epoch}"]
    runs = {
        "light": ["model=sasrec", *light],
        "rocket": rocket,
        "noblock": [*rocket, "callbacks.hint.block_gradient=false"],
        "noshare": [*rocket, "model.share_embedding=false"],
        "nohint": [e for e in rocket if not e.startswith("callbacks")],
        # hint = mse + kd_weight * KL, all times lambda: kd_weight / lambda gives the KD term its own weight
        "rocket_kd": [*[e for e in rocket if not e.startswith("callbacks.hint.kind=")], "callbacks.hint.kind=mse+kl", f"callbacks.hint.kd_weight={args.kd_weight / args.hint_weight:g}"],
        "booster": ["model=sasrec", *booster],
    }
    chosen = [r for r in args.only.split(",") if r]
    unknown = [r for r in chosen if r not in runs]
    if unknown:
        raise SystemExit(f"--only: unknown run '{unknown[0]}'; expected some of {','.join(ORDER)}")
    if "rocket_kd" in chosen and args.hint_kind != "mse":
        raise SystemExit(f"--hint-kind {args.hint_kind}: rocket_kd uses the plain MSE hint plus KD "
                         f"(callbacks.hint.kind=mse+kl); run it in an invocation without --hint-kind")
    common = [
        "data=file", f"data.path={args.data}", "data.format=sasrec", f"data.max_len={args.max_len}",
        f"data.batch_size={args.batch_size}", f"optimizer.lr={args.lr}", "model.dropout=0.2", f"runs_dir={RUNS}", "logger=csv",
        "trainer.enable_progress_bar=false", f"trainer.max_epochs={args.epochs}", f"seed={args.seed}",
    ]
    reuse = dict(x.split("=", 1) for x in args.reuse.split(",") if x)
    results = {}
    for name in chosen:
        if name in reuse:
            import glob

            best = glob.glob(os.path.join(reuse[name], "checkpoints", "epoch*.ckpt"))
            if len(best) != 1:
                raise SystemExit(f"--reuse {name}={reuse[name]}: expected one best checkpoint, found {best}")
            test = run(["test", f"ckpt_path={best[0]}", "trainer.enable_progress_bar=false"])
            key = "test/ndcg@10" if name in ("light", "booster") else "test/light/ndcg@10"
            fit_s = float("nan")  # the fit time the run recorded, if it finished
            if os.path.isfile(os.path.join(reuse[name], "result.json")):
                with open(os.path.join(reuse[name], "result.json")) as f:
                    fit_s = json.load(f).get("fit_seconds", fit_s)
            results[name] = {"ndcg": test[key], "hr": test[key.replace("ndcg", "hr")],
                             "booster_ndcg": test.get("test/booster/ndcg@10"), "ckpt": best[0], "minutes": fit_s / 60}
            continue
        extra = runs[name]
        if name not in ("light", "booster"):
            extra = [e for e in extra if e != "model.dropout=0.2"] + ["model.booster.dropout=0.2", "model.light.dropout=0.2"]
            cmd = [c for c in common if c != "model.dropout=0.2"]
        else:
            cmd = common
        out = run(["fit", *cmd, f"name=bench-rocket-{name}", *extra, *args.overrides])
        key = "test/ndcg@10" if name in ("light", "booster") else "test/light/ndcg@10"
        results[name] = {"ndcg": out["test"][key], "hr": out["test"][key.replace("ndcg", "hr")],
                         "booster_ndcg": out["test"].get("test/booster/ndcg@10"), "ckpt": out["best_ckpt"],
                         "minutes": out["fit_seconds"] / 60}

    # Latency and size of the shipped nets, side by side, from the checkpoints.
    gen = torch.Generator().manual_seed(0)
    items = None
    sizes, lats = {}, {}
    for name, r in results.items():
        if name in ("light", "booster"):
            m = SeqRecModule.load_from_checkpoint(r["ckpt"], map_location="cpu", weights_only=True)
            nets = {name: m}
        else:
            rm = RocketModule.load_from_checkpoint(r["ckpt"], map_location="cpu", weights_only=True)
            nets = {f"{name}/light": rm.export_net("light"), f"{name}/booster": rm.export_net("booster")}
        for k, m in nets.items():
            if items is None:
                items = torch.randint(1, m.num_items + 1, (args.latency_users, args.max_len), generator=gen)
            sizes[k], lats[k] = net_parameters(m), scoring_latency(m, items)

    order = [n for n in ORDER if n in results]
    results = {n: results[n] for n in order}
    rows = ["| run | test NDCG@10 (shipped net) | HR@10 | booster NDCG@10 (in the run) | params of the shipped net | "
            "latency ms / batch | fit min |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        k = name if name in ("light", "booster") else f"{name}/light"
        b = f"{r['booster_ndcg']:.4f}" if r["booster_ndcg"] is not None else ""
        rows.append(f"| {name} | {r['ndcg']:.4f} | {r['hr']:.4f} | {b} | {sizes[k]:,} | {lats[k] * 1e3:.1f} | "
                    f"{r['minutes']:.1f} |")
    verdict = []
    if {"rocket", "light", "booster"} <= set(results):
        g = results["rocket"]["ndcg"] / results["light"]["ndcg"] - 1
        f = results["rocket"]["ndcg"] / results["booster"]["ndcg"]
        lr = lats["rocket/light"] / lats["booster"]
        verdict = [
            f"- Rocket light vs light alone: **{g:+.1%}** (target >= +5%: {'met' if g >= 0.05 else 'NOT met'}).",
            f"- Rocket light / booster alone: **{f:.1%}** (target >= 95%: {'met' if f >= 0.95 else 'NOT met'}).",
            f"- Latency light / booster: **{lr:.2f}x** (target <= 0.25: {'met' if lr <= 0.25 else 'NOT met'}); "
            f"parameters {sizes['rocket/light'] / sizes['booster']:.2f}x.",
        ]
    setting = (f"ML-1M `{os.path.basename(args.data)}`, max_len {args.max_len}, booster SASRec {args.booster_blocks} "
               f"blocks d={d} 2 heads, light SASRec {args.light_blocks} block d={dl} 1 head, "
               f"{'each scoring with its item table (tied; in the rocket the shared one)' if args.tied else 'each with its own output layer'}, "
               f"dropout 0.2, full-softmax CE, "
               f"Adam {args.lr:g}, batch {args.batch_size}, {args.epochs} epochs, seed {args.seed}, hint {'on zero-mean logits, ' if args.hint_kind == 'mse_centered' else ''}lambda {args.hint_weight:g}"
               f"{f' from epoch {args.hint_start_epoch}' if args.hint_start_epoch else ''}, KD weight {args.kd_weight:g} (rocket_kd); "
               f"latency: median of 10 full-ranking passes for {args.latency_users} users of length {args.max_len}, "
               f"{torch.get_num_threads()} threads"
               f"{'; extra overrides for every run: ' + ' '.join(args.overrides) if args.overrides else ''}")
    log = append("rocket", "Rocket Launching on ML-1M", f"Setting: {setting}.\n\n" + "\n".join(rows) + "\n\n" + "\n".join(verdict))
    if verdict:
        short = (f"booster {args.booster_blocks} blocks d={d}, light {args.light_blocks} block d={dl}, {args.epochs} epochs, "
                 f"max_len {args.max_len}, seed {args.seed}{' ' + ' '.join(args.overrides) if args.overrides else ''}")
        light, rocket, booster = (results[n]["ndcg"] for n in ("light", "rocket", "booster"))
        for metric, value, base, of, goal, ok in (
                ("test NDCG@10 of the light net", rocket, light, "the light net alone", "ratio >= 1.05", g >= 0.05),
                ("test NDCG@10 of the light net", rocket, booster, "the booster alone", "ratio >= 0.95", f >= 0.95),
                ("latency, ms per batch", lats["rocket/light"] * 1e3, lats["booster"] * 1e3, "the booster",
                 "ratio <= 0.25", lr <= 0.25)):
            record("rocket", target="Rocket Launching", setting=short, metric=metric, value=round(value, 4),
                   baseline=round(base, 4), baseline_of=of, ratio=round(value / base, 3), goal=goal, met=bool(ok), log=log)


if __name__ == "__main__":
    run_main(main)
