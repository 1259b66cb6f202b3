"""Id remapping (original ids -> contiguous ints, 0 = padding) and k-core filtering.

Two forms of the same steps: on ``{user: [item, ...]}`` dicts (:func:`kcore`, :func:`encode`), and on the CSR
arrays of :class:`EncodedSequences` (:func:`encode_codes`, :func:`kcore_encoded`, :func:`drop_short_users`), which
the file readers produce directly so that millions of interactions never become Python lists. Both give the same
result: ids numbered in sorted-id order, each user's items in time order."""

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


def _ranks(uniques) -> np.ndarray:
    """For ids in any order: each one's index in :func:`_sort_ids` order."""
    uniques = list(uniques)
    pos = {v: i for i, v in enumerate(_sort_ids(uniques))}
    return np.fromiter((pos[v] for v in uniques), dtype=np.int64, count=len(uniques))


def _time_order(users: np.ndarray, times: np.ndarray | None, num_users: int) -> np.ndarray:
    """Indices sorting by (user, time), stably: equal timestamps keep their file order."""
    if times is None:
        return np.argsort(users, kind="stable")
    if times.size and times.dtype.kind == "f" and np.isfinite(times).all():
        lo, hi = float(times.min()), float(times.max())
        span = hi - lo + 1
        # whole seconds (as timestamps are): one int64 key, about 4x faster to sort than the pair
        if max(abs(lo), abs(hi)) < 2**53 and span * max(num_users, 1) < 2**62 and (times == np.floor(times)).all():
            key = users * np.int64(span) + (times - lo).astype(np.int64)
            return np.argsort(key, kind="stable")
    return np.lexsort((times, users))


def encode_codes(user_codes: np.ndarray, user_uniques, item_codes: np.ndarray, item_uniques,
                 times: np.ndarray | None = None) -> EncodedSequences:
    """:func:`encode` for interactions given as columns: ``user_codes[k]`` indexes ``user_uniques`` (the original
    ids, distinct), likewise items, in file order; ``times`` (optional) orders each user's items, stably, so equal
    timestamps keep their file order. Ids that no interaction uses are left out of the maps."""
    user_codes, item_codes = np.asarray(user_codes, dtype=np.int64), np.asarray(item_codes, dtype=np.int64)
    used_u = np.bincount(user_codes, minlength=len(user_uniques)) > 0
    used_i = np.bincount(item_codes, minlength=len(item_uniques)) > 0
    if not used_u.all():  # codes of a filtered column: renumber the ids still used
        user_codes = (np.cumsum(used_u) - 1)[user_codes]
        user_uniques = [v for v, k in zip(user_uniques, used_u) if k]
    if not used_i.all():
        item_codes = (np.cumsum(used_i) - 1)[item_codes]
        item_uniques = [v for v, k in zip(item_uniques, used_i) if k]
    u_rank, i_rank = _ranks(user_uniques), _ranks(item_uniques)
    users = u_rank[user_codes]
    del user_codes
    order = _time_order(users, None if times is None else np.asarray(times), len(u_rank))
    items = i_rank[item_codes[order]] + 1
    counts = np.bincount(users, minlength=len(u_rank))
    indptr = np.zeros(len(u_rank) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    user_ids, item_ids = [None] * len(u_rank), [None] * len(i_rank)
    for v, r in zip(user_uniques, u_rank.tolist()):
        user_ids[r] = v
    for v, r in zip(item_uniques, i_rank.tolist()):
        item_ids[r] = v
    return EncodedSequences(indptr, items, user_ids, ["<pad>"] + item_ids)


def _keep(enc: EncodedSequences, keep_entry: np.ndarray | None, keep_user: np.ndarray) -> EncodedSequences:
    """``enc`` with the entries ``keep_entry`` (all if None) of the users ``keep_user``; users and items left with
    nothing are dropped and the rest renumbered, in the same (sorted-id) order."""
    owner = np.repeat(np.arange(enc.num_users), enc.lengths)
    mask = keep_user[owner] if keep_entry is None else keep_entry & keep_user[owner]
    items, owner = enc.items[mask], owner[mask]
    counts = np.bincount(owner, minlength=enc.num_users)[keep_user]
    indptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    user_ids = [u for u, k in zip(enc.user_ids, keep_user.tolist()) if k]
    used = np.bincount(items, minlength=enc.num_items + 1) > 0
    used[0] = True  # padding
    if not used.all():
        items = (np.cumsum(used) - 1)[items]
        item_ids = [v for v, k in zip(enc.item_ids, used.tolist()) if k]
    else:
        item_ids = enc.item_ids
    return EncodedSequences(indptr, items, user_ids, item_ids)


def kcore_encoded(enc: EncodedSequences, min_user: int, min_item: int) -> EncodedSequences:
    """:func:`kcore` on CSR arrays: the same users and items are kept (then renumbered)."""
    if min_user <= 1 and min_item <= 1:
        return enc
    while True:
        counts = np.bincount(enc.items, minlength=enc.num_items + 1)
        bad = (counts < min_item) & (counts > 0)
        keep_entry = ~bad[enc.items] if bad.any() else None
        kept_len = enc.lengths
        if keep_entry is not None:
            owner = np.repeat(np.arange(enc.num_users), enc.lengths)
            kept_len = np.bincount(owner[keep_entry], minlength=enc.num_users)
        keep_user = kept_len >= max(min_user, 1)
        if keep_entry is None and keep_user.all():
            return enc
        enc = _keep(enc, keep_entry, keep_user)


def drop_short_users(enc: EncodedSequences, least: int) -> EncodedSequences:
    """Users with fewer than ``least`` items left out, and the items only they had."""
    keep = enc.lengths >= least
    return enc if keep.all() else _keep(enc, None, keep)
