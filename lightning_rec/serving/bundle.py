"""Load a serving bundle and recommend from it, with numpy and onnxruntime (or torch for a ``pt2`` bundle).

A bundle folder holds:

- ``manifest.json``: format, architecture, catalogue size, history length, the source checkpoint, the
  export-time parity and index recall figures, and the sha256 of every other file;
- the query encoder, ``encoder.onnx`` (format onnx) or ``encoder.pt2`` (format pt2, ``torch.export``):
  item histories (B, T) of internal ids, left-padded with 0, T <= max_len -> user vectors (B, d);
- ``items.npy``: the scoring table (N + 1, d), float32; row i scores internal item i, row 0 is padding;
- ``id_maps.json``: ``{"items": [...]}``, the original id of each internal item (index 0: padding);
- optionally ``items.faiss``: a FAISS inner-product index over rows 1..N for approximate top-K.

Nothing here imports torch, pytorch_lightning or hydra unless the bundle is ``pt2``; faiss is imported only
for a bundle with an index.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from lightning_rec.digest import file_digest
from lightning_rec.errors import ConfigError

MANIFEST = "manifest.json"
ITEMS = "items.npy"
ID_MAPS = "id_maps.json"
INDEX = "items.faiss"
BUNDLE_VERSION = 1
FORMATS = {"onnx": "encoder.onnx", "pt2": "encoder.pt2"}  # format -> encoder file
SCORE_CHUNK = 65536  # items scored at once by the exact scorer: memory is batch x chunk floats


class BundleError(ConfigError, ValueError):
    """Bad input to a bundle (an empty history, a bad k) or a broken bundle folder; the message is one line."""


def read_manifest(path: str) -> dict[str, Any]:
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise BundleError(f"bundle={path}: no {MANIFEST}; expected a folder written by "
                          f"`python -m lightning_rec export ckpt=<file> format=onnx out=<folder>`")
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise BundleError(f"{mpath}: not a readable JSON manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("bundle_version") != BUNDLE_VERSION:
        got = manifest.get("bundle_version") if isinstance(manifest, dict) else None
        raise BundleError(f"{mpath}: bundle_version={got!r}; this loader reads bundle_version {BUNDLE_VERSION}")
    return manifest


class Bundle:
    """A loaded bundle: :meth:`recommend` for one history, :meth:`recommend_batch` for many.

    ``Bundle.load(path)`` checks every file against the manifest's sha256, then loads the encoder, the item
    table, the id map and (when the bundle has one and ``use_index``) the FAISS index.
    """

    def __init__(self, path: str, manifest: dict[str, Any], encode, items: np.ndarray, item_ids: list[Any],
                 index=None):
        self.path = path
        self.manifest = manifest
        self._encode = encode
        self.items = items
        self.item_ids = item_ids
        self.internal = {str(o): i for i, o in enumerate(item_ids) if i > 0}
        self.index = index
        self.max_len = int(manifest["max_len"])
        self.num_items = int(manifest["num_items"])
        self.exclude_seen = bool(manifest.get("exclude_seen", True))

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str, verify: bool = True, use_index: bool = True, threads: int | None = None,
             ef_search: int | None = None, nprobe: int | None = None) -> Bundle:
        """Load the bundle folder ``path``.

        Args:
            verify: check each file's sha256 against the manifest (a bundle copied half-way fails here).
            use_index: answer from the bundle's FAISS index when it has one; False: the exact scorer.
            threads: intra-op threads of the encoder and the index (default: the runtimes', all cores).
            ef_search, nprobe: the index's search breadth (HNSW, IVF); default: the manifest's.
        """
        manifest = read_manifest(path)
        fmt = manifest.get("format")
        if fmt not in FORMATS:
            raise BundleError(f"{os.path.join(path, MANIFEST)}: format={fmt!r}; expected one of {', '.join(FORMATS)}")
        for name, digest in manifest.get("files", {}).items():
            fp = os.path.join(path, name)
            if not os.path.isfile(fp):
                raise BundleError(f"bundle={path}: {name} is missing (listed in {MANIFEST})")
            if verify and file_digest(fp) != digest:
                raise BundleError(f"bundle={path}: {name} does not match its sha256 in {MANIFEST} (changed or corrupt)")
        items = np.load(os.path.join(path, ITEMS))
        with open(os.path.join(path, ID_MAPS), encoding="utf-8") as f:
            item_ids = json.load(f)["items"]
        if items.shape[0] != len(item_ids) or len(item_ids) != int(manifest["num_items"]) + 1:
            raise BundleError(f"bundle={path}: {ITEMS} has {items.shape[0]} rows and {ID_MAPS} {len(item_ids)} ids; "
                              f"expected num_items + 1 = {int(manifest['num_items']) + 1} each")
        encoder = os.path.join(path, FORMATS[fmt])
        encode = _onnx_encoder(encoder, threads) if fmt == "onnx" else _pt2_encoder(encoder, threads)
        index = None
        info = manifest.get("index")
        if use_index and info:
            try:
                import faiss
            except ImportError:
                raise BundleError(f"bundle={path}: has a FAISS index ({info['type']}) and faiss is not installed; "
                                  f"pip install faiss-cpu, or load it with use_index=False (exact scoring)") from None
            index = faiss.read_index(os.path.join(path, INDEX))
            if threads:
                faiss.omp_set_num_threads(int(threads))
            set_search(index, info, ef_search, nprobe)
        return cls(path, manifest, encode, items, item_ids, index)

    # ------------------------------------------------------------------ queries
    def to_internal(self, history: Sequence[Any]) -> tuple[list[int], int]:
        """(internal ids of the known items in order, how many ids were unknown and skipped)."""
        known = [self.internal.get(str(i)) for i in history]
        kept = [i for i in known if i is not None]
        return kept, len(known) - len(kept)

    def encode_internal(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """User vectors (B, d) for histories of internal ids: each keeps its last max_len, left-padded with 0."""
        width = max(1, min(self.max_len, max(len(r) for r in rows)))
        batch = np.zeros((len(rows), width), dtype=np.int64)
        for r, h in enumerate(rows):
            h = list(h)[-width:]
            if h:
                batch[r, width - len(h):] = h
        return np.asarray(self._encode(batch), dtype=np.float32)

    def recommend(self, history: Sequence[Any], k: int = 10, exclude_seen: bool | None = None) -> dict[str, Any]:
        """Top-``k`` items for one history of original item ids, oldest first.

        Returns ``{"items": [original ids, best first], "scores": [...], "skipped": n}``: ids the catalogue
        does not know are skipped and counted; a history with no known item is a :class:`BundleError`.
        ``exclude_seen`` (default: the checkpoint's ``eval.exclude_seen``) leaves the history's items out.
        """
        return self.recommend_batch([history], k, exclude_seen)[0]

    def recommend_batch(self, histories: Sequence[Sequence[Any]], k: int = 10,
                        exclude_seen: bool | None = None) -> list[dict[str, Any]]:
        """:meth:`recommend` for many histories at once (one encoder call, one scoring pass)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.num_items:
            raise BundleError(f"k={k!r}: expected an integer in 1..{self.num_items} (the catalogue size)")
        if isinstance(histories, (str, bytes)) or not hasattr(histories, "__len__") or not len(histories):
            raise BundleError("histories: expected a non-empty list of histories (lists of item ids)")
        exclude = self.exclude_seen if exclude_seen is None else exclude_seen
        if not isinstance(exclude, bool):
            raise BundleError(f"exclude_seen={exclude_seen!r}: expected true or false")
        rows, skipped = [], []
        for n, h in enumerate(histories):
            if isinstance(h, (str, bytes, dict)) or not hasattr(h, "__iter__"):
                raise BundleError(f"history {n}: expected a list of item ids, got {type(h).__name__}")
            ids, s = self.to_internal(list(h))
            if not ids:
                what = f"all {s} ids are unknown to the catalogue" if s else "it is empty"
                raise BundleError(f"history {n}: no known item to recommend from ({what})")
            rows.append(ids)
            skipped.append(s)
        users = self.encode_internal(rows)
        top, scores = self.top_k(users, int(k), [set(r) for r in rows] if exclude else None)
        return [{"items": [self.item_ids[i] for i in t], "scores": s, "skipped": sk}
                for t, s, sk in zip(top, scores, skipped)]

    def top_k(self, users: np.ndarray, k: int, seen: list[set[int]] | None = None,
              exact: bool = False) -> tuple[list[list[int]], list[list[float]]]:
        """Internal ids and scores of the ``k`` best items per user vector, best first, without ``seen``.

        From the FAISS index when the bundle loaded one (``exact=False``), else the exact inner product over
        the whole table, ``SCORE_CHUNK`` items at a time. Fewer than ``k`` come back only when fewer unseen
        items exist. Equal scores go to the lower internal id.
        """
        if self.index is not None and not exact:
            return self._top_k_index(users, k, seen)
        B, N = users.shape[0], self.num_items
        if seen:  # every (row, item) pair to exclude, as two flat arrays: one masking step per chunk
            rows = np.repeat(np.arange(B), [len(x) for x in seen])
            cols = np.fromiter((i for x in seen for i in x), dtype=np.int64, count=len(rows))
        cand_s, cand_i = [], []
        for c0 in range(1, N + 1, SCORE_CHUNK):
            c1 = min(c0 + SCORE_CHUNK, N + 1)
            s = users @ self.items[c0:c1].T  # (B, c1 - c0): column j scores item c0 + j
            if seen:
                m = (cols >= c0) & (cols < c1)
                s[rows[m], cols[m] - c0] = -np.inf
            top_s, top_i = _chunk_top_k(s, min(k, c1 - c0))
            cand_s.append(top_s)
            cand_i.append(top_i + c0)
        best_s, best_i = np.concatenate(cand_s, 1), np.concatenate(cand_i, 1)
        order = np.lexsort((best_i, -best_s), axis=-1)[:, :k]  # score descending, then the lower id
        best_s, best_i = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
        finite = np.isfinite(best_s)
        if finite.all():
            return best_i.tolist(), best_s.astype(float).tolist()
        return ([r[f].tolist() for r, f in zip(best_i, finite)],
                [r[f].astype(float).tolist() for r, f in zip(best_s, finite)])

    def _top_k_index(self, users: np.ndarray, k: int, seen: list[set[int]] | None):
        """Top-k from the FAISS index: each user's history may rank first, so a row asks for k + its history's
        length, rows grouped by that need rounded up to a power of two (one search per group, not one search
        of the batch's longest history for every row)."""
        B = users.shape[0]
        need = np.array([min(k + (len(seen[r]) if seen else 0), self.num_items) for r in range(B)])
        group = np.minimum(2 ** np.ceil(np.log2(need)).astype(np.int64), self.num_items)
        out_i: list[list[int]] = [[] for _ in range(B)]
        out_s: list[list[float]] = [[] for _ in range(B)]
        users = np.ascontiguousarray(users, dtype=np.float32)
        for want in np.unique(group):
            rows = np.flatnonzero(group == want)
            d, ids = self.index.search(users[rows], int(want))
            for r, dr, ir in zip(rows, d, ids):
                s = seen[r] if seen else ()
                got = [(int(i) + 1, float(x)) for i, x in zip(ir, dr) if i >= 0 and int(i) + 1 not in s][:k]
                out_i[r] = [g[0] for g in got]
                out_s[r] = [g[1] for g in got]
        return out_i, out_s

    def describe(self) -> dict[str, Any]:
        """What a health check reports: the manifest's summary, without the file digests."""
        m = self.manifest
        keys = ("format", "arch", "net", "num_items", "max_len", "d_model", "exclude_seen", "source", "created")
        out = {k: m[k] for k in keys if k in m}
        out["index"] = (m.get("index") or {}).get("type") if self.index is not None else None
        return out


def set_search(index, info: dict[str, Any], ef_search: int | None = None, nprobe: int | None = None) -> None:
    """The FAISS index's search breadth: the manifest's ``index`` settings, or the ones given."""
    if info["type"] == "hnsw":
        index.hnsw.efSearch = int(ef_search or info["ef_search"])
    elif info["type"] == "ivf":
        index.nprobe = int(nprobe or info["nprobe"])


def _chunk_top_k(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best scores of each row of ``s`` (B, W) and their columns, best first, equal scores by the lower
    column: exact, without a selection over every column of every row.

    The k-th best of a subsample of a row's columns is at most the k-th best of the row, so every column of the
    row's top-k scores at least that threshold: only the (few) columns at or above it are sorted.
    """
    B, W = s.shape
    stride = max(1, W // (1024 * k))  # a subsample of >= 1024 k columns per row: about k x stride candidates
    th = np.partition(s[:, ::stride], -k, axis=1)[:, -k]
    r, c = np.divmod(np.flatnonzero(s >= th[:, None]), W)  # flat: several times faster than 2-D nonzero
    v = s[r, c]
    order = np.lexsort((c, -v, r))  # by row, then score descending, then the lower column
    r, c, v = r[order], c[order], v[order]
    rank = np.arange(len(r)) - np.searchsorted(r, r)  # position within its row
    keep = rank < k  # every row has >= k columns at or above its threshold
    if keep.sum() != B * k:  # only NaN scores break the threshold's promise
        raise BundleError("the scores hold NaN: the bundle's encoder or item table is broken (export it again)")
    return v[keep].reshape(B, k), c[keep].reshape(B, k)


def _onnx_encoder(path: str, threads: int | None):
    try:
        import onnxruntime as ort
    except ImportError:
        raise BundleError(f"{path}: an ONNX bundle needs onnxruntime; pip install onnxruntime "
                          f"(or pip install 'lightning_rec[serve]')") from None
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.log_severity_level = 3  # warnings and below stay quiet
    # no busy-waiting of the encoder's threads after a call: the scorer's matrix product runs right after it,
    # on the same cores (with spinning, a 256-user batch over 3,416 items scored 10x slower)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda batch: sess.run(None, {name: batch})[0]


def _pt2_encoder(path: str, threads: int | None):
    try:
        import torch
    except ImportError:
        raise BundleError(f"{path}: a pt2 bundle needs torch; pip install torch, or export format=onnx") from None
    if threads:
        torch.set_num_threads(int(threads))
    module = torch.export.load(path).module()

    def encode(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(batch)).numpy()

    return encode
