"""Federation pieces that do not depend on the engine: device split, per-label logits, teachers.

Federated distillation: a device uploads, for every label it has seen (the label
of a next-item prediction is the target item), the mean of its model's logits over its training
positions with that label. To bound the upload for large catalogues only the ``top_m`` largest
entries of each mean are sent (item ids and values), with the number of positions behind them.
The server returns to each device the average over the *other* devices of their per-label logits
as the device's teacher. An entry a device did not send (below its top-M) counts as that device's
smallest sent value for the label, an upper bound of the true logit, so every device that saw a
label contributes to each teacher entry of it. The teacher keeps the ``top_m`` largest entries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from lightning_rec.errors import ConfigError

SKEWS = ("none", "length", "size")


def split_devices(num_users: int, num_devices: int, seed: int = 0, skew: str = "none", alpha: float = 1.0,
                  lengths: np.ndarray | None = None) -> list[np.ndarray]:
    """Users (indices ``0..num_users-1``) of each simulated device; every user on exactly one device.

    Args:
        skew: ``none`` random, near-equal devices; ``length`` users sorted by history length (ties
            random) and cut into near-equal contiguous groups, so device 0 holds the shortest
            histories and the last device the longest; ``size`` random users, device sizes drawn
            from Dirichlet(``alpha``) (smaller alpha, more unequal; at least one user each).
        lengths: history length per user (needed for ``skew=length``).
    """
    if skew not in SKEWS:
        raise ConfigError(f"federation.skew={skew}: expected one of {', '.join(SKEWS)}")
    if not 1 <= num_devices <= num_users:
        raise ConfigError(f"federation.num_devices={num_devices}: expected 1..{num_users} (the number of users)")
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_users)
    if skew == "length":
        if lengths is None or len(lengths) != num_users:
            raise ConfigError("federation.skew=length: needs each user's history length")
        order = order[np.argsort(np.asarray(lengths)[order], kind="stable")]
    if skew == "size":
        if alpha <= 0:
            raise ConfigError(f"federation.alpha={alpha}: expected a positive Dirichlet concentration")
        share = rng.dirichlet(np.full(num_devices, float(alpha)))
        sizes = 1 + np.floor(share * (num_users - num_devices)).astype(int)
        sizes[np.argmax(share)] += num_users - sizes.sum()
        cuts = np.cumsum(sizes)[:-1]
    else:
        cuts = [round(i * num_users / num_devices) for i in range(1, num_devices)]
    return [np.sort(part) for part in np.split(order, cuts)]


def split_holdout(num_users: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(kept, held_out)`` user indices: ``round(fraction x num_users)`` users, drawn by seed, go
    on no device; the federation is evaluated on their test items (users no model trained on)."""
    if not 0.0 <= float(fraction) < 1.0:
        raise ConfigError(f"federation.holdout_users={fraction}: expected a fraction in [0, 1)")
    n_out = int(round(float(fraction) * num_users))
    if fraction > 0 and not 1 <= n_out < num_users:
        raise ConfigError(f"federation.holdout_users={fraction}: {n_out} of {num_users} users; expected at least "
                          f"one held out and one kept")
    out = np.sort(np.random.default_rng([int(seed), 1]).permutation(num_users)[:n_out])
    kept = np.setdiff1d(np.arange(num_users), out)
    return kept, out


@dataclass
class LabelLogits:
    """One device's upload: for each seen label, the top-M entries of its mean logit vector."""

    labels: torch.Tensor   # (L,) item ids, ascending
    items: torch.Tensor    # (L, M) item ids of the kept entries
    values: torch.Tensor   # (L, M) mean logits, descending per row
    counts: torch.Tensor   # (L,) positions behind each mean

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.labels, self.items, self.values, self.counts))


def label_logits(logits: torch.Tensor, labels: torch.Tensor, top_m: int, item_offset: int = 1) -> LabelLogits:
    """Per-label mean of ``logits`` (n, C) over rows with each label (n,), top-M kept.

    Column ``j`` of ``logits`` scores item ``j + item_offset`` (items are 1..C, 0 is padding).
    """
    if logits.shape[0] != labels.shape[0]:
        raise ValueError("logits and labels disagree on the number of rows")
    acc = LabelLogitAccumulator(logits.shape[1], item_offset)
    acc.add(logits, labels)
    return acc.result(top_m)


class LabelLogitAccumulator:
    """Exact per-label logit sums over many batches; rows are allocated only for labels seen.

    Memory: (labels seen) x C float32, e.g. 3,416 x 3,416 x 4 B = 47 MB for all of ML-1M.
    """

    def __init__(self, num_columns: int, item_offset: int = 1):
        self.c, self.offset = num_columns, item_offset
        self.row: dict[int, int] = {}
        self.sums = torch.zeros(0, num_columns)
        self.counts = torch.zeros(0, dtype=torch.long)

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        seen, inverse, counts = torch.unique(labels.cpu(), return_inverse=True, return_counts=True)
        new = [int(x) for x in seen.tolist() if int(x) not in self.row]
        if new:
            for x in new:
                self.row[x] = len(self.row)
            self.sums = torch.cat([self.sums, torch.zeros(len(new), self.c)])
            self.counts = torch.cat([self.counts, torch.zeros(len(new), dtype=torch.long)])
        rows = torch.tensor([self.row[int(x)] for x in seen.tolist()], dtype=torch.long)
        part = torch.zeros(seen.numel(), self.c)
        part.index_add_(0, inverse, logits.detach().float().cpu())
        self.sums.index_add_(0, rows, part)
        self.counts.index_add_(0, rows, counts)

    def result(self, top_m: int) -> LabelLogits:
        order = sorted(self.row)
        rows = torch.tensor([self.row[x] for x in order], dtype=torch.long)
        means = self.sums[rows] / self.counts[rows, None].clamp(min=1).float()
        m = min(int(top_m), self.c)
        vals, idx = means.topk(m, dim=1)
        return LabelLogits(torch.tensor(order, dtype=torch.long), idx + self.offset, vals, self.counts[rows])


def teacher_from(uploads: list[LabelLogits], top_m: int, weighted: bool = False) -> LabelLogits:
    """Average per-label logits over ``uploads`` (devices, or a device's batches when ``weighted``).

    For a label, the devices that saw it contribute; an entry one of them did not send counts as
    that device's smallest sent value for the label. Plain mean over devices
    or, with ``weighted``, weighted by each upload's count. Returns the top-M entries per label.
    """
    uploads = [u for u in uploads if u.labels.numel()]
    if not uploads:
        empty = torch.zeros(0, dtype=torch.long)
        return LabelLogits(empty, empty.view(0, top_m), torch.zeros(0, top_m), empty)
    labels = torch.unique(torch.cat([u.labels for u in uploads]))
    out_items, out_vals, out_counts = [], [], []
    # index each upload's rows by label
    rows = [{int(label): r for r, label in enumerate(u.labels.tolist())} for u in uploads]
    for label in labels.tolist():
        present = [(u, rw[label]) for u, rw in zip(uploads, rows) if label in rw]
        cand = torch.unique(torch.cat([u.items[r] for u, r in present]))
        total = torch.zeros(cand.numel(), dtype=torch.float64)
        weight_sum = 0.0
        count = 0
        for u, r in present:
            floor = float(u.values[r].min())
            vec = torch.full((cand.numel(),), floor, dtype=torch.float64)
            pos = torch.searchsorted(cand, u.items[r])
            vec[pos] = u.values[r].double()
            w = float(u.counts[r]) if weighted else 1.0
            total += w * vec
            weight_sum += w
            count += int(u.counts[r])
        mean = (total / weight_sum).float()
        m = min(top_m, cand.numel())
        vals, idx = mean.topk(m)
        if m < top_m:  # pad (rare: fewer candidates than M) with the smallest value, repeated item
            vals = torch.cat([vals, vals[-1:].expand(top_m - m)])
            idx = torch.cat([idx, idx[-1:].expand(top_m - m)])
        out_items.append(cand[idx])
        out_vals.append(vals)
        out_counts.append(count)
    return LabelLogits(labels, torch.stack(out_items), torch.stack(out_vals), torch.tensor(out_counts))


def teacher_for(uploads: Mapping[int, LabelLogits], device: int, top_m: int) -> LabelLogits | None:
    """Device ``device``'s teacher: the average (:func:`teacher_from`) of every *other* device's last
    upload (``uploads``: device id -> its per-label logits), never its own; None when no other device
    has uploaded yet. The one exclusion rule: the server builds every teacher with it."""
    others = [u for d, u in sorted(uploads.items()) if int(d) != int(device)]
    return teacher_from(others, top_m) if others else None
