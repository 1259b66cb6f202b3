"""Id remapping (original ids -> contiguous ints, 0 = padding) and k-core filtering."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _sort_ids(ids) -> list[str]:
    ids = list(ids)
    # Numeric ids keep their numeric order (so SASRec's 1..N files map to themselves).
    if all(i.isdigit() for i in ids):
        return sorted(ids, key=int)
    return sorted(ids)


@dataclass
class EncodedSequences:
    """All users' item sequences as CSR arrays.

    Attributes:
        indptr: (U + 1,) offsets; user ``u`` owns ``items[indptr[u]:indptr[u + 1]]``.
        items: (nnz,) item indices in ``1..num_items`` (0 is padding), time-ordered per user.
        user_ids: original user id of each user index.
        item_ids: original item id of each item index; ``item_ids[0]`` is the padding token.
    """

    indptr: np.ndarray
    items: np.ndarray
    user_ids: list[str]
    item_ids: list[str]

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)


def kcore(seqs: dict[str, list[str]], min_user: int, min_item: int) -> dict[str, list[str]]:
    """Iteratively drop users with < ``min_user`` and items with < ``min_item`` interactions."""
    if min_user <= 1 and min_item <= 1:
        return seqs
    while True:
        counts: dict[str, int] = {}
        for items in seqs.values():
            for it in items:
                counts[it] = counts.get(it, 0) + 1
        bad_items = {it for it, c in counts.items() if c < min_item}
        new = {}
        for u, items in seqs.items():
            kept = [it for it in items if it not in bad_items] if bad_items else items
            if len(kept) >= max(min_user, 1):  # a user left with no items is gone, whatever min_user says
                new[u] = kept
        if len(new) == len(seqs) and not bad_items:
            return new
        seqs = new


def encode(seqs: dict[str, list[str]]) -> EncodedSequences:
    """Map original ids to contiguous indices: users 0..U-1, items 1..N (0 = padding)."""
    user_ids = _sort_ids(seqs.keys())
    item_ids = _sort_ids({it for items in seqs.values() for it in items})
    item_index = {it: i + 1 for i, it in enumerate(item_ids)}
    lengths = np.fromiter((len(seqs[u]) for u in user_ids), dtype=np.int64, count=len(user_ids))
    indptr = np.zeros(len(user_ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    items = np.fromiter(
        (item_index[it] for u in user_ids for it in seqs[u]), dtype=np.int64, count=int(indptr[-1])
    )
    return EncodedSequences(indptr, items, user_ids, ["<pad>"] + item_ids)
