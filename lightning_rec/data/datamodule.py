"""The sequential-recommendation DataModule: load, encode, split leave-one-out, batch.

Batches are built by tensor indexing (``__getitems__``), never by per-item Python
loops: a training batch is a slice of two precomputed ``(U, L)`` matrices, with the
all-padding left columns trimmed off.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from lightning_rec.data.download import DATASETS, fetch
from lightning_rec.data.encode import EncodedSequences, drop_short_users, encode, kcore_encoded
from lightning_rec.data.readers import FORMATS, read_encoded
from lightning_rec.data.sampler import EpochSampler
from lightning_rec.data.synthetic import make_synthetic, make_synthetic_encoded
from lightning_rec.errors import ConfigError, DataError, check_int

SHORT_USER_POLICIES = ("error", "train", "drop")
TRAIN_WINDOWS = ("last", "all")


def _passthrough(batch):
    # Datasets below return whole batches from __getitems__; nothing left to collate.
    return batch


def _trim(x: torch.Tensor) -> int:
    """Index of the first column of ``x`` (B, L) holding a non-padding item."""
    nz = (x != 0).any(0)
    return int(nz.int().argmax()) if bool(nz.any()) else x.shape[1] - 1


def _windows(items: torch.Tensor, start: torch.Tensor, end: torch.Tensor, width: int) -> torch.Tensor:
    """The last ``width`` items of ``items[start:end]`` per row, left-padded with 0. (R, width)"""
    idx = end[:, None] - width + torch.arange(width)[None, :]  # (R, width)
    valid = idx >= start[:, None]
    return torch.where(valid, items[idx.clamp(min=0)], torch.zeros((), dtype=items.dtype))


class TrainSet(Dataset):
    """All-position causal training examples: ``targets[:, t]`` follows ``inputs[:, :t+1]``."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, trim: bool = True):
        self.inputs, self.targets, self.trim = inputs, targets, trim

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        x, y = self.inputs[idx_t], self.targets[idx_t]  # (B, L)
        s = _trim(x) if self.trim else 0
        return {"inputs": x[:, s:], "targets": y[:, s:]}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([i])


class EvalSet(Dataset):
    """One target per user, with the user's history (for excluding seen items)."""

    def __init__(
        self,
        users: torch.Tensor,
        inputs: torch.Tensor,
        target: torch.Tensor,
        hist_start: torch.Tensor,
        hist_len: torch.Tensor,
        items: torch.Tensor,
        negatives: torch.Tensor | None = None,
        trim: bool = True,
    ):
        self.users, self.inputs, self.target = users, inputs, target
        self.hist_start, self.hist_len, self.items = hist_start, hist_len, items
        self.negatives, self.trim = negatives, trim

    def __len__(self) -> int:
        return self.users.shape[0]

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        x = self.inputs[idx_t]
        s = _trim(x) if self.trim else 0
        start, n = self.hist_start[idx_t], self.hist_len[idx_t]
        width = max(int(n.max()), 1)
        pos = torch.arange(width)[None, :]
        seen = torch.where(pos < n[:, None], self.items[(start[:, None] + pos).clamp(max=len(self.items) - 1)], 0)
        batch = {"user": self.users[idx_t], "inputs": x[:, s:], "target": self.target[idx_t], "seen": seen}
        if self.negatives is not None:
            batch["negatives"] = self.negatives[idx_t]
        return batch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([i])


class SeqDataModule(pl.LightningDataModule):
    """Loads interactions, remaps ids, splits leave-one-out and serves batches.

    Args:
        name: ``synthetic`` (built-in), ``ml-1m`` / ``ml-100k`` / ``ml-20m`` (downloaded when
            ``path`` is not given) or ``file`` (``path`` required).
        path: interactions file (``.gz`` allowed); see :mod:`lightning_rec.data.readers`.
        format: ``auto``, ``sasrec``, ``movielens``, ``udata`` or ``csv``.
        user_col, item_col, time_col, sep: columns of a ``csv`` file.
        min_rating: drop interactions rated below this (formats with ratings).
        min_user_interactions, min_item_interactions: iterative k-core filter.
        short_users: users with fewer than 3 items: ``error``, ``train`` (training
            only, as SASRec does) or ``drop``.
        max_len: keep the most recent ``max_len`` items of each input sequence.
        train_windows: ``last`` (default, as SASRec): one training sequence per user, the
            most recent ``max_len + 1`` items of its training part, so older items of users
            longer than that are not trained on. ``all``: the whole training part, cut from
            the most recent end into windows of ``max_len + 1`` items that overlap by one
            item, so every training target is supervised exactly once per epoch (older
            windows give their first targets less context). Evaluation is the same for both.
        batch_size, eval_batch_size: users per batch.
        eval_protocol: ``full`` ranking or ``sampled`` (target vs ``eval_negatives``).
        eval_negatives, eval_sampler: the sampled protocol's size and ``uniform`` /
            ``popularity`` sampling (fixed per user, by seed).
        seed: shuffling and sampling seed.
        synthetic: options of :func:`~lightning_rec.data.synthetic.make_synthetic`.
        fraction: keep this part of the data (continual-learning scenarios): the first
            ``ceil(fraction * n)`` items of each user's history (``fraction_by=history``) or
            a seeded subset of the users (``fraction_by=users``). Subsets are nested (the 80%
            lies inside the 90%), and the item catalogue stays that of the full data, so
            models trained on a fraction and on all of it share their item ids.
        users: keep only these users (indices ``0..num_users-1`` in sorted user-id order, as in
            ``id_maps.json``, after ``fraction``); the catalogue stays that of all users. A federated
            device uses it so its loaders see its own users only.
    """

    def __init__(
        self,
        name: str = "synthetic",
        path: str | None = None,
        format: str = "auto",
        user_col: str = "user_id",
        item_col: str = "item_id",
        time_col: str | None = "timestamp",
        rating_col: str | None = None,
        sep: str | None = None,
        min_rating: float | None = None,
        min_user_interactions: int = 0,
        min_item_interactions: int = 0,
        short_users: str = "error",
        max_len: int = 50,
        train_windows: str = "last",
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        trim_padding: bool = True,
        eval_protocol: str = "full",
        eval_negatives: int = 100,
        eval_sampler: str = "uniform",
        seed: int = 0,
        cache_dir: str | None = None,
        download_verify: bool = True,
        synthetic: dict[str, Any] | None = None,
        fraction: float = 1.0,
        fraction_by: str = "history",
        users: list[int] | None = None,
    ):
        super().__init__()
        if name not in ("synthetic", "file", *DATASETS):
            raise ConfigError(f"data.name: unknown dataset '{name}'; expected synthetic, file, {', '.join(DATASETS)}")
        if format not in FORMATS:
            raise ConfigError(f"data.format: unknown format '{format}'; expected one of {', '.join(FORMATS)}")
        if name == "synthetic" and path:
            raise ConfigError(f"data.path={path}: data=synthetic (the default) reads no file; add data=file "
                              f"(or data=ml-1m / data=ml-100k) to train on it")
        if name == "file" and not path:
            raise ConfigError("data.path: required with data=file (an interactions file, e.g. data.path=ml-1m.txt)")
        if short_users not in SHORT_USER_POLICIES:
            raise ConfigError(f"data.short_users: '{short_users}' is not one of {', '.join(SHORT_USER_POLICIES)}")
        if train_windows not in TRAIN_WINDOWS:
            raise ConfigError(f"data.train_windows: '{train_windows}' is not one of {', '.join(TRAIN_WINDOWS)}")
        if eval_protocol not in ("full", "sampled"):
            raise ConfigError(f"eval.protocol: '{eval_protocol}' is not one of full, sampled")
        if eval_sampler not in ("uniform", "popularity"):
            raise ConfigError(f"eval.negative_sampler: '{eval_sampler}' is not one of uniform, popularity")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
            raise ConfigError(f"data.fraction: expected a number in (0, 1], got {fraction}")
        if min_rating is not None and (isinstance(min_rating, bool) or not isinstance(min_rating, (int, float))):
            raise ConfigError(f"data.min_rating={min_rating!r}: expected a number (e.g. 4) or null")
        if fraction_by not in ("history", "users"):
            raise ConfigError(f"data.fraction_by: '{fraction_by}' is not one of history, users")
        for option, value, least in (("data.max_len", max_len, 1), ("data.batch_size", batch_size, 1),
                                     ("data.eval_batch_size", eval_batch_size, 1), ("data.num_workers", num_workers, 0),
                                     ("data.min_user_interactions", min_user_interactions, 0),
                                     ("data.min_item_interactions", min_item_interactions, 0), ("data.seed", seed, 0),
                                     ("eval.num_negatives", eval_negatives, 1)):
            check_int(value, option, least)
        self.save_hyperparameters()
        self.data: EncodedSequences | None = None
        self._resolved_path: str | None = None

    # ------------------------------------------------------------------ loading
    def prepare_data(self) -> None:
        hp = self.hparams
        if hp.name in DATASETS and not hp.path:
            fetch(hp.name, hp.cache_dir, hp.download_verify)

    def _read(self) -> EncodedSequences:
        hp = self.hparams
        if hp.name == "synthetic":
            opts = dict(hp.synthetic or {})
            fast = opts.pop("fast", False)  # numpy over all users at once (millions of items), another stream
            if not isinstance(fast, bool):
                raise ConfigError(f"data.synthetic.fast={fast!r}: expected true or false")
            known = inspect.signature(make_synthetic).parameters
            for key in opts:
                if key not in known:
                    raise ConfigError(f"data.synthetic.{key}: no such option; expected one of fast, {', '.join(known)}")
            data_seed = opts.pop("seed", None)  # null: the run's seed, so a seed sweep also redraws the data
            if data_seed is not None:
                check_int(data_seed, "data.synthetic.seed", 0)
            seed = hp.seed if data_seed is None else data_seed
            return make_synthetic_encoded(seed=seed, **opts) if fast else encode(make_synthetic(seed=seed, **opts))
        path, fmt = hp.path, hp.format
        if not path:
            path, fmt = fetch(hp.name, hp.cache_dir, hp.download_verify)
        self._resolved_path = path
        return read_encoded(
            path, fmt, user_col=hp.user_col, item_col=hp.item_col, time_col=hp.time_col,
            rating_col=hp.rating_col, min_rating=hp.min_rating, sep=hp.sep,
        )

    def load(self) -> EncodedSequences:
        """Read, filter and encode the data once; later calls return the cached result."""
        if self.data is None:
            enc = kcore_encoded(self._read(), self.hparams.min_user_interactions, self.hparams.min_item_interactions)
            if enc.num_users == 0:
                raise DataError(
                    f"data: no user left after k-core filtering (min_user_interactions="
                    f"{self.hparams.min_user_interactions}, min_item_interactions={self.hparams.min_item_interactions})"
                )
            if self.hparams.short_users == "drop":
                # a dropped user leaves the user list, predictions and (with the items nobody else has, the rest
                # renumbered) the catalogue, as if the file had not held it
                kept = drop_short_users(enc, 3)
                if kept.num_users == 0:
                    raise DataError(f"{self.source}: every user has fewer than 3 interactions; "
                                    "data.short_users=drop leaves no one")
                if kept.num_users < enc.num_users:
                    rank_zero_info(f"data.short_users=drop: {enc.num_users - kept.num_users:,} users with fewer "
                                   f"than 3 interactions left out")
                enc = kept
            self.data = self._take_users(self._take_fraction(enc))
        return self.data

    def _take_users(self, enc: EncodedSequences) -> EncodedSequences:
        if self.hparams.users is None:
            return enc
        users = np.asarray(sorted(set(int(u) for u in self.hparams.users)), dtype=np.int64)
        if users.size == 0 or users[0] < 0 or users[-1] >= enc.num_users:
            raise ConfigError(f"data.users: expected user indices in 0..{enc.num_users - 1}, got "
                              f"{'none' if users.size == 0 else f'{users[0]}..{users[-1]}'}")
        lengths = enc.lengths[users]
        starts = enc.indptr[:-1][users]
        indptr = np.zeros(len(users) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        idx = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1])
        return EncodedSequences(indptr, enc.items[idx], [enc.user_ids[u] for u in users], enc.item_ids)

    def _take_fraction(self, enc: EncodedSequences) -> EncodedSequences:
        frac, by = self.hparams.fraction, self.hparams.fraction_by
        if frac >= 1.0:
            return enc
        lengths = enc.lengths
        if by == "history":
            keep_len = np.ceil(lengths * frac - 1e-9).astype(np.int64)  # 100 * 0.07 = 7.000000000000001 keeps 7
            users = np.arange(enc.num_users)
        else:
            order = np.random.default_rng(self.hparams.seed).permutation(enc.num_users)
            users = np.sort(order[: int(np.ceil(enc.num_users * frac - 1e-9))])
            keep_len = lengths
        starts = enc.indptr[:-1][users]
        kl = keep_len[users]
        indptr = np.zeros(len(users) + 1, dtype=np.int64)
        np.cumsum(kl, out=indptr[1:])
        idx = np.repeat(starts - indptr[:-1], kl) + np.arange(indptr[-1])
        return EncodedSequences(indptr, enc.items[idx], [enc.user_ids[u] for u in users], enc.item_ids)

    @property
    def source(self) -> str:
        return self._resolved_path or self.hparams.name

    @property
    def num_items(self) -> int:
        return self.load().num_items

    @property
    def num_users(self) -> int:
        return self.load().num_users

    # ------------------------------------------------------------------ splitting
    def setup(self, stage: str | None = None) -> None:
        if getattr(self, "_built", False):
            return
        d = self.load()
        hp = self.hparams
        L = hp.max_len
        indptr = torch.from_numpy(d.indptr)
        items = torch.from_numpy(d.items)
        lengths = indptr[1:] - indptr[:-1]
        start = indptr[:-1]
        short = lengths < 3
        if bool(short.any()):
            if hp.short_users == "error":
                u = int(short.nonzero()[0])
                raise DataError(
                    f"{self.source}: user '{d.user_ids[u]}' has {int(lengths[u])} interaction(s); leave-one-out needs "
                    f">= 3 ({int(short.sum())} such users). Set data.short_users=train (train only) or =drop, "
                    "or filter with data.min_user_interactions=3"
                )
        splittable = ~short
        self.users_eval = splittable.nonzero().squeeze(1)
        # Training part: items[:-2] of splittable users; all items of short users with policy 'train'.
        train_end = torch.where(splittable, indptr[1:] - 2, indptr[1:])
        train_users = splittable if hp.short_users != "train" else torch.ones_like(splittable)
        train_users = train_users & (train_end - start >= 2)
        tu = train_users.nonzero().squeeze(1)
        w_start, w_end = start[tu], train_end[tu]
        if hp.train_windows == "all":
            # window j of a user ends L items before window j - 1; its last item is the input of window
            # j - 1's first target, so consecutive windows share one item and no target repeats
            n_win = ((w_end - w_start - 1 + L - 1) // L).clamp(min=1)  # ceil((n - 1) / L) targets' windows
            owner = torch.repeat_interleave(torch.arange(len(tu)), n_win)
            j = torch.arange(len(owner)) - torch.repeat_interleave(torch.cumsum(n_win, 0) - n_win, n_win)
            w_start, w_end = w_start[owner], w_end[owner] - j * L
        w = _windows(items, w_start, w_end, L + 1)  # (windows, L + 1): one per user with 'last'
        inputs, targets = w[:, :-1].contiguous(), w[:, 1:].clone()
        targets[inputs == 0] = 0
        self.train_set = TrainSet(inputs, targets, hp.trim_padding)
        if len(self.train_set) == 0:
            raise DataError(f"{self.source}: no user has enough interactions to train on")

        # Popularity over the training part only (baseline scores, popularity negatives).
        train_range_len = (train_end - start).clamp(min=0)
        pos = torch.arange(len(items)) - torch.repeat_interleave(start, lengths)
        in_train = pos < torch.repeat_interleave(train_range_len, lengths)
        self.popularity = torch.bincount(items[in_train], minlength=d.num_items + 1).float()
        self.popularity[0] = 0

        ue = self.users_eval
        s, e = start[ue], indptr[1:][ue]
        self.val_set = self._eval_set(ue, items, s, e - 2, items[e - 2], "val")
        self.test_set = self._eval_set(ue, items, s, e - 1, items[e - 1], "test")
        all_users = torch.arange(d.num_users)
        self.predict_set = EvalSet(
            all_users, _windows(items, start, indptr[1:], L), torch.zeros(d.num_users, dtype=torch.long),
            start, lengths, items, None, hp.trim_padding,
        )
        self._built = True

    def _eval_set(self, users, items, start, end, target, split) -> EvalSet:
        hp = self.hparams
        inputs = _windows(items, start, end, hp.max_len)
        negatives = None
        if hp.eval_protocol == "sampled":
            negatives = self._sample_negatives(items, start, end, target, split)
        return EvalSet(users, inputs, target, start, end - start, items, negatives, hp.trim_padding)

    def _sample_negatives(self, items, start, end, target, split) -> torch.Tensor:
        """``eval_negatives`` items per user, never seen by the user nor the target; fixed by seed."""
        hp = self.hparams
        n_items = self.load().num_items
        k = hp.eval_negatives
        rng = np.random.default_rng([hp.seed, 1 if split == "val" else 2])
        base = self.popularity.numpy().astype(np.float64) if hp.eval_sampler == "popularity" else np.ones(n_items + 1)
        base[0] = 0.0
        items_np = items.numpy()
        out = np.zeros((len(start), k), dtype=np.int64)
        for r, (s, e, t) in enumerate(zip(start.tolist(), end.tolist(), target.tolist())):
            p = base.copy()
            p[items_np[s:e]] = 0.0
            p[t] = 0.0
            avail = int((p > 0).sum())
            if avail < k:
                raise DataError(f"eval.num_negatives={k}: a user has only {avail} unseen items to sample from")
            out[r] = rng.choice(n_items + 1, size=k, replace=False, p=p / p.sum())
        return torch.from_numpy(out)

    # ------------------------------------------------------------------ loaders
    def _loader(self, ds: Dataset, batch_size: int, train: bool) -> DataLoader:
        sampler = EpochSampler(len(ds), seed=self.hparams.seed, shuffle=train, pad=train)
        if not train and sampler.world > len(ds):
            # a rank with no users would skip evaluation and leave the others waiting in the metric sync
            raise ConfigError(f"trainer.devices: evaluation has {len(ds)} users, fewer than the {sampler.world} "
                              f"ranks; run it on at most {len(ds)} processes")
        return DataLoader(
            ds, batch_size=batch_size, sampler=sampler, collate_fn=_passthrough,
            num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0,
            # A private generator: creating loader iterators never draws from global RNG,
            # so dropout streams are identical in resumed and uninterrupted runs.
            generator=torch.Generator().manual_seed(self.hparams.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.hparams.batch_size, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.hparams.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.hparams.eval_batch_size, False)

    PREDICT_AT = ("next", "test", "valid")

    def predict_dataloader(self) -> DataLoader:
        """Users to rank for ``predict``: after the whole history (``predict_at='next'``, every user), or from the
        history before each evaluated user's test or validation item (``'test'``/``'valid'``: the rankings those
        metrics scored; the batch's ``target`` is that item)."""
        at = getattr(self, "predict_at", "next")
        sets = {"next": self.predict_set, "test": self.test_set, "valid": self.val_set}
        return self._loader(sets[at], self.hparams.eval_batch_size, False)

    # ------------------------------------------------------------------ id maps
    def id_maps(self) -> dict[str, list[str]]:
        d = self.load()
        return {"users": list(d.user_ids), "items": list(d.item_ids)}

    def save_id_maps(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.id_maps(), f)
        os.replace(tmp, path)

    def state_dict(self) -> dict[str, Any]:
        # Stored in every checkpoint: `predict` maps indices back to original ids from it.
        return {"id_maps": self.id_maps()} if self.data is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        maps = state.get("id_maps")
        if maps and self.data is not None and maps["items"] != self.id_maps()["items"]:
            raise DataError(
                f"{self.source}: the checkpoint's item catalogue ({len(maps['items']) - 1} items) differs from this "
                f"data's ({self.num_items} items); resume on the data the run was trained on"
            )
