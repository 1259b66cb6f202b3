"""A deterministic synthetic dataset with planted sequential structure.

Items have Zipf-like popularity. Each item has a few successors (a sparse
item-to-item transition graph). A user's next item follows the graph with
probability ``p_follow`` and is otherwise drawn by popularity. A sequence model
that learns the graph beats a popularity ranking by a wide margin; a popularity
model cannot, because transitions are drawn independently of popularity.
"""

from __future__ import annotations

import numpy as np


def make_synthetic(
    num_users: int = 1000,
    num_items: int = 300,
    min_len: int = 15,
    max_len: int = 40,
    successors: int = 3,
    p_follow: float = 0.85,
    zipf: float = 1.1,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Return ``{user_id: [item_id, ...]}`` with string ids, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, num_items + 1) ** zipf
    pop = pop / pop.sum()
    pop = pop[rng.permutation(num_items)]  # popularity rank independent of item index
    succ = np.stack([rng.choice(num_items, size=successors, replace=False) for _ in range(num_items)])
    succ_p = rng.dirichlet(np.ones(successors) * 2.0, size=num_items)
    seqs: dict[str, list[str]] = {}
    for u in range(num_users):
        n = int(rng.integers(min_len, max_len + 1))
        cur = int(rng.choice(num_items, p=pop))
        seq = [cur]
        follow = rng.random(n) < p_follow
        for t in range(1, n):
            if follow[t]:
                cur = int(succ[cur, rng.choice(successors, p=succ_p[cur])])
            else:
                cur = int(rng.choice(num_items, p=pop))
            seq.append(cur)
        seqs[f"u{u}"] = [f"i{i}" for i in seq]
    return seqs


def make_synthetic_encoded(
    num_users: int = 1000,
    num_items: int = 300,
    min_len: int = 15,
    max_len: int = 40,
    successors: int = 3,
    p_follow: float = 0.85,
    zipf: float = 1.1,
    seed: int = 0,
):
    """The same kind of data as :func:`make_synthetic`, drawn with numpy over all users at once, as CSR arrays.

    For catalogues of millions of items and tens of millions of interactions (``data.synthetic.fast=true``):
    no Python list per user. Another random stream than :func:`make_synthetic` (same options, other data).
    Returns an :class:`~lightning_rec.data.encode.EncodedSequences`; ids are the numbers ``1..num_items`` and
    ``0..num_users-1`` as strings (numeric order, as the file readers number them).
    """
    from lightning_rec.data.encode import EncodedSequences

    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, num_items + 1) ** zipf
    pop = pop[rng.permutation(num_items)]  # popularity rank independent of item index
    cdf = np.cumsum(pop)
    cdf /= cdf[-1]

    def by_popularity(n: int) -> np.ndarray:
        return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), num_items - 1)

    succ = rng.integers(0, num_items, size=(num_items, successors), dtype=np.int64)
    succ_cdf = np.cumsum(rng.dirichlet(np.ones(successors) * 2.0, size=num_items), axis=1)
    lengths = rng.integers(min_len, max_len + 1, size=num_users)
    indptr = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    items = np.empty(int(indptr[-1]), dtype=np.int64)
    cur = by_popularity(num_users)
    items[indptr[:-1]] = cur
    for t in range(1, int(lengths.max())):  # position t of every user still that long, at once
        users = np.flatnonzero(lengths > t)
        prev = cur[users]
        follow = rng.random(users.size) < p_follow
        pick = (rng.random(users.size)[:, None] > succ_cdf[prev]).sum(1).clip(max=successors - 1)
        nxt = np.where(follow, succ[prev, pick], by_popularity(users.size))
        cur[users] = nxt
        items[indptr[users] + t] = nxt
    return EncodedSequences(indptr, items + 1, [str(u) for u in range(num_users)],
                            ["<pad>"] + [str(i) for i in range(1, num_items + 1)])
