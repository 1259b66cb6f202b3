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
