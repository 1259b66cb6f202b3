"""RecBole 1.2.1 side of ``bench/throughput.py``: SASRec training throughput and full-sort eval time.

Runs inside the RecBole virtualenv (``bench/throughput.py`` launches it); prints RecBole's
own logging to stderr and exactly one JSON line with its figures to stdout.

    .venv-recbole/bin/python bench/recbole_side.py --data ../shared/data/ml-1m.txt.gz --batches 30

Setting: SASRec hidden 64, 2 layers, 1 head, inner size 64, ReLU, dropout 0.2, max length 200,
full-softmax CE (no negative sampling), batch 128, Adam lr 1e-3, leave-one-out (LS
valid_and_test), time-ordered, full-sort evaluation with eval batch 256. Training is timed over
``--batches`` batches after ``--warmup``; the test-split evaluation ``--eval-repeats`` times.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import logging
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET = "ml-1m"


def write_inter(src: str, out_dir: str) -> str:
    """Convert SASRec's ``user item`` file into RecBole's atomic ``<out_dir>/ml-1m/ml-1m.inter``.

    The timestamp is the line's position within its user's sequence, so RecBole's time
    ordering (``order: TO``) reproduces the file order. Skipped when the file is up to date.
    """
    dst_dir = os.path.join(out_dir, DATASET)
    dst = os.path.join(dst_dir, f"{DATASET}.inter")
    if os.path.exists(dst) and os.path.getmtime(dst) >= os.path.getmtime(src):
        return dst
    os.makedirs(dst_dir, exist_ok=True)
    pos: dict[str, int] = {}
    opener = gzip.open if src.endswith(".gz") else open
    tmp = dst + ".tmp"
    with opener(src, "rt") as f, open(tmp, "w") as g:
        g.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for line in f:
            parts = line.split()
            if len(parts) < 2:
                continue
            u, i = parts[0], parts[1]
            t = pos.get(u, 0)
            pos[u] = t + 1
            g.write(f"{u}\t{i}\t{t}\n")
    os.replace(tmp, dst)  # a killed run never leaves a half-written file that looks up to date
    return dst


class _Limited:
    """The next ``n`` batches of a shared iterator, counting the samples they hold.

    Lets RecBole's own per-epoch training loop run for a bounded number of batches.
    """

    def __init__(self, it, n: int):
        self.it, self.n, self.samples, self.batches = it, n, 0, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            batch = next(self.it)
            self.samples += len(batch)
            self.batches += 1
            yield batch


def config_dict(args: argparse.Namespace) -> dict:
    """RecBole settings matching lightning_rec's SASRec benchmark setting."""
    return {
        "data_path": args.out,
        "checkpoint_dir": os.path.join(args.out, "saved"),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": 200,
        "n_layers": 2,
        "n_heads": 1,
        "hidden_size": 64,
        "inner_size": 64,
        "hidden_act": "relu",  # lightning_rec and the SASRec paper use ReLU (RecBole defaults to GELU)
        "hidden_dropout_prob": 0.2,
        "attn_dropout_prob": 0.2,
        "loss_type": "CE",
        "train_neg_sample_args": None,  # full softmax: no sampled negatives
        "train_batch_size": 128,
        "eval_batch_size": args.eval_batch_size,
        "learner": "adam",
        "learning_rate": 1e-3,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "metrics": ["Hit", "NDCG"],
        "topk": [10],
        "valid_metric": "NDCG@10",
        "epochs": 1,
        "worker": 0,
        "gpu_id": "",
        "use_gpu": False,
        "device": "cpu",
        "seed": 0,
        "reproducibility": True,
        "show_progress": False,
        "state": "INFO",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="SASRec-format ml-1m.txt(.gz)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "recbole"))
    ap.add_argument("--batches", type=int, default=30, help="timed training batches")
    ap.add_argument("--warmup", type=int, default=3, help="untimed training batches first")
    ap.add_argument("--eval-batch-size", type=int, default=256)
    ap.add_argument("--eval-repeats", type=int, default=2, help="timed test-split evaluations (mean reported)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    args.out = os.path.abspath(args.out)
    # RecBole's Config also parses sys.argv for --key=value overrides; ours are not for it.
    sys.argv = sys.argv[:1]
    os.makedirs(args.out, exist_ok=True)
    # RecBole writes log/ and log_tensorboard/ under the working directory: keep them in out/.
    os.chdir(args.out)
    stdout = sys.stdout
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(message)s")

    with contextlib.redirect_stdout(sys.stderr):  # only the JSON line goes to stdout
        import recbole
        import torch
        from recbole.config import Config
        from recbole.data import create_dataset, data_preparation
        from recbole.model.sequential_recommender import SASRec
        from recbole.trainer import Trainer
        from recbole.utils import init_seed

        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        write_inter(args.data, args.out)
        config = Config(model="SASRec", dataset=DATASET, config_dict=config_dict(args))
        init_seed(config["seed"], config["reproducibility"])
        dataset = create_dataset(config)
        train_data, valid_data, test_data = data_preparation(config, dataset)
        setup_s = time.perf_counter() - t0
        model = SASRec(config, train_data.dataset).to(config["device"])
        trainer = Trainer(config, model)
        n_train = len(train_data.dataset)
        logging.info("RecBole setup %.1f s; %d training samples (one target each), %d test users",
                     setup_s, n_train, len(test_data.dataset))

        # RecBole's own per-epoch loop (what Trainer.fit calls), cut to a bounded number of batches.
        it = iter(train_data)
        trainer._train_epoch(_Limited(it, args.warmup), epoch_idx=0)
        timed = _Limited(it, args.batches)
        t0, c0 = time.perf_counter(), time.process_time()
        trainer._train_epoch(timed, epoch_idx=0)
        train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
        eval_s, eval_cpu = [], []
        for _ in range(args.eval_repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            result = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
            eval_s.append(time.perf_counter() - t0)
            eval_cpu.append(time.process_time() - c0)

    out = {
        "recbole": recbole.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "setup_seconds": round(setup_s, 2),
        "train_samples_per_epoch": n_train,
        "train_batches": timed.batches,
        "train_targets": timed.samples,
        "train_seconds": round(train_s, 3),
        "train_cpu_seconds": round(train_cpu, 3),
        "targets_per_second": timed.samples / train_s,
        "eval_users": len(test_data.dataset),
        "num_items": dataset.item_num - 1,  # RecBole's item_num counts its padding id 0
        "eval_seconds": sum(eval_s) / len(eval_s),
        "eval_seconds_each": [round(x, 3) for x in eval_s],
        "eval_cpu_seconds": sum(eval_cpu) / len(eval_cpu),
        "eval_metrics": {k: float(v) for k, v in result.items()},
    }
    print(json.dumps(out), file=stdout, flush=True)


if __name__ == "__main__":
    main()
