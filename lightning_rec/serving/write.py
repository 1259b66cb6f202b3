"""Write a serving bundle from a model (needs torch; onnx + onnxscript for format onnx, faiss for an index).

:func:`write_bundle` exports the query encoder (history -> user vector, ``user_representation``) with
``torch.onnx.export(dynamo=True)`` or ``torch.export``, checks the export against the eager model on random
histories, writes the item table, the id map and, when asked, a FAISS index whose recall@k against the
exact scorer it measures. The folder appears complete or not at all (written beside it, then renamed).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import shutil
import time
from typing import Any

import numpy as np

from lightning_rec.digest import file_digest
from lightning_rec.errors import ConfigError
from lightning_rec.serving.bundle import (
    BUNDLE_VERSION,
    FORMATS,
    ID_MAPS,
    INDEX,
    ITEMS,
    MANIFEST,
    Bundle,
    set_search,
)

INDEXES = ("flat", "hnsw", "ivf")
INDEX_DEFAULTS = {"hnsw_m": 32, "ef_construction": 200, "ef_search": 256, "nlist": None, "nprobe": 64}
PARITY_TOLERANCE = 1e-4  # max |bundle - eager| of a user vector accepted at export


def query_encoder(model):
    """A float32, CPU, eval-mode module ``items (B, T) -> user vectors (B, d)`` over a copy of ``model``."""
    import torch

    class QueryEncoder(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, items: torch.Tensor) -> torch.Tensor:
            return self.net.user_representation(items)

    net = copy.deepcopy(model).to("cpu", torch.float32).eval()
    net._compiled = None  # a compiled copy (GPU training) is not part of what ships
    return QueryEncoder(net).eval()


def _export(encoder, fmt: str, path: str, max_len: int) -> None:
    import torch

    example = torch.randint(1, 3, (2, max_len))
    shapes = {"items": {0: torch.export.Dim("batch", min=1, max=1 << 20),
                        1: torch.export.Dim("length", min=1, max=max_len)}}
    if max_len == 1:
        shapes["items"].pop(1)
    if fmt == "pt2":
        torch.export.save(torch.export.export(encoder, (example,), dynamic_shapes=shapes), path)
        return
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # registry notes about optional torchvision ops
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter's step-by-step lines
            torch.onnx.export(encoder, (example,), path, dynamo=True, input_names=["items"], output_names=["user"],
                              dynamic_shapes=shapes, verbose=False)
    finally:
        quiet.setLevel(level)


def _build_index(items: np.ndarray, kind: str, opts: dict[str, Any]):
    import faiss

    d = items.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(opts["hnsw_m"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(opts["ef_construction"])
    else:
        nlist = int(opts["nlist"] or max(1, min(len(items) // 39, int(4 * np.sqrt(len(items))))))
        opts["nlist"] = nlist
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(items)
    index.add(items)
    return index


def write_bundle(model, item_ids: list[Any], out: str, fmt: str = "onnx", *, max_len: int,
                 index: str | None = None, index_options: dict[str, Any] | None = None, exclude_seen: bool = True,
                 info: dict[str, Any] | None = None, overwrite: bool = False, recall_queries: int = 1000,
                 recall_k: int = 10, seed: int = 0, log=print) -> dict[str, Any]:
    """Write the bundle folder ``out`` for ``model`` (a SeqRecModule); returns its manifest.

    ``item_ids`` are the original ids by internal index (``[0]`` padding), ``max_len`` the longest history
    the encoder reads (the training ``data.max_len``). ``index`` is None, flat, hnsw or ivf; its search
    settings come from ``index_options`` (keys of ``INDEX_DEFAULTS``). ``info`` is added to the manifest
    (the source checkpoint, the net). An existing ``out`` is replaced only with ``overwrite``.
    """
    import torch

    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt}: expected one of {', '.join(FORMATS)}")
    if index not in (None, *INDEXES):
        raise ConfigError(f"index={index}: expected one of {', '.join(INDEXES)} (or null: exact scoring)")
    opts = {**INDEX_DEFAULTS, **{k: v for k, v in (index_options or {}).items() if v is not None}}
    unknown = set(opts) - set(INDEX_DEFAULTS)
    if unknown:
        raise ConfigError(f"index options {sorted(unknown)}: expected some of {', '.join(INDEX_DEFAULTS)}")
    if os.path.exists(out) and not overwrite:
        raise ConfigError(f"out={out}: exists; choose another path or pass overwrite=true")
    num_items = int(model.num_items)
    if len(item_ids) != num_items + 1:
        raise ConfigError(f"the id map has {len(item_ids) - 1} items, the model {num_items}")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        t0 = time.perf_counter()
        encoder = query_encoder(model)
        try:
            _export(encoder, fmt, os.path.join(tmp, FORMATS[fmt]), max_len)
        except Exception as e:  # an operator the exporter cannot translate, a shape it cannot keep dynamic
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            other = "pt2" if fmt == "onnx" else "onnx"
            raise ConfigError(f"format={fmt}: the {model.hparams.get('arch')} encoder did not export ({type(e).__name__}: "
                              f"{first}); try format={other}") from e
        table = encoder.net.output_weight().detach().numpy().astype(np.float32, copy=True)
        np.save(os.path.join(tmp, ITEMS), table)
        with open(os.path.join(tmp, ID_MAPS), "w", encoding="utf-8") as f:
            json.dump({"items": list(item_ids)}, f)
        log(f"  encoder ({fmt}) and item table ({num_items:,} x {table.shape[1]}) written in "
            f"{time.perf_counter() - t0:.1f} s")
        manifest: dict[str, Any] = {
            "bundle_version": BUNDLE_VERSION, "format": fmt, "encoder": FORMATS[fmt],
            "arch": model.hparams.get("arch"), "num_items": num_items, "max_len": int(max_len),
            "d_model": int(table.shape[1]), "exclude_seen": bool(exclude_seen),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__, **(info or {}),
        }
        _write_manifest(tmp, manifest)  # a first manifest, so the checks below load the bundle itself
        gen = torch.Generator().manual_seed(seed)
        checks = [torch.randint(1, num_items + 1, (b, t), generator=gen) for b, t in ((1, max_len), (7, max(1, max_len // 2)))]
        loaded = Bundle.load(tmp, verify=False, use_index=False)
        with torch.inference_mode():
            gap = max(float(np.abs(loaded._encode(x.numpy()) - encoder(x).numpy()).max()) for x in checks)
        if not gap <= PARITY_TOLERANCE:
            raise ConfigError(f"format={fmt}: the exported encoder differs from the model by {gap:.2e} "
                              f"(> {PARITY_TOLERANCE}); try the other format")
        manifest["parity_max_abs"] = gap
        if index:
            t0 = time.perf_counter()
            built = _build_index(table[1:], index, opts)
            import faiss

            faiss.write_index(built, os.path.join(tmp, INDEX))
            keep = {"hnsw": ("hnsw_m", "ef_construction", "ef_search"), "ivf": ("nlist", "nprobe"), "flat": ()}[index]
            manifest["index"] = {"type": index, "file": INDEX, **{k: opts[k] for k in keep}}
            build_s = time.perf_counter() - t0
            set_search(built, manifest["index"])  # as Bundle.load sets it up
            loaded.index = built  # the loaded encoder and table again, not a second load
            recall = index_recall(loaded, recall_queries, recall_k, seed)
            manifest["index"].update(recall_at_k=recall, recall_k=recall_k, recall_queries=recall_queries,
                                     build_s=round(build_s, 2))
            log(f"  {index} index built in {build_s:.1f} s; recall@{recall_k} against exact scoring "
                f"{recall:.4f} on {recall_queries} sampled histories")
        manifest["files"] = {name: file_digest(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))
                             if name != MANIFEST}
        _write_manifest(tmp, manifest)
        old = None
        if os.path.exists(out):  # overwrite: the old folder goes only once the new one is in place
            old = f"{tmp}.old"
            os.replace(out, old)
        os.replace(tmp, out)
        if old:
            shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def index_recall(bundle: Bundle, queries: int, k: int, seed: int = 0) -> float:
    """Mean recall@k of the bundle's index against its exact scorer, for histories sampled from the catalogue."""
    rng = np.random.default_rng(seed)
    k = min(k, bundle.num_items)
    rows = [rng.integers(1, bundle.num_items + 1, size=int(rng.integers(1, bundle.max_len + 1))).tolist()
            for _ in range(queries)]
    hits = 0
    for b in range(0, queries, 256):
        users = bundle.encode_internal(rows[b:b + 256])
        approx, _ = bundle.top_k(users, k)
        exact, _ = bundle.top_k(users, k, exact=True)
        hits += sum(len(set(a) & set(e)) for a, e in zip(approx, exact))
    return hits / (queries * k)


def _write_manifest(folder: str, manifest: dict[str, Any]) -> None:
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, default=str)
        f.write("\n")
