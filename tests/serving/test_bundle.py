"""Serving bundles: the bundle's top-K is the eager model's (predict's) for every user, in both formats and for
a rocket's light net; the exact scorer against a brute-force oracle; the FAISS index's recall on a 100k-item
catalogue; loading without torch; bad input and broken bundles give one-line errors; export is atomic."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lightning_rec.cli import run
from lightning_rec.errors import ConfigError
from lightning_rec.serving import Bundle, BundleError
from lightning_rec.serving import bundle as bundle_mod
from conftest import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _data(tmp_path, users=80, items=40):
    """A sasrec-format file of string ids ('u3 i7'), with repeats; returns (path, {user: history})."""
    rng = np.random.default_rng(3)
    seqs = {}
    for u in range(users):
        seqs[f"u{u}"] = [f"i{(u * 5 + int(x)) % items}" for x in rng.integers(0, 12, size=int(rng.integers(4, 30)))]
    p = tmp_path / "d.txt"
    p.write_text("".join(f"{u} {i}\n" for u, s in seqs.items() for i in s))
    return str(p), seqs


def _predicted(path):
    lists = {}
    for r in csv.DictReader(open(path), delimiter="\t"):
        lists.setdefault(r["user"], []).append((r["item"], float(r["score"])))
    return lists


def _check_parity(bundle_dir, ckpt, seqs, tmp_path, k=10):
    dest = tmp_path / f"pred_{os.path.basename(bundle_dir)}.tsv"
    run(["predict", f"ckpt={ckpt}", f"predict.out={dest}", f"predict.k={k}", "trainer.enable_progress_bar=false"])
    want = _predicted(dest)
    b = Bundle.load(str(bundle_dir))
    users = sorted(seqs)
    got = b.recommend_batch([seqs[u] for u in users], k=k)
    assert set(want) == set(users)
    for u, g in zip(users, got):
        assert g["items"] == [w[0] for w in want[u]], u  # exact top-K, in order
        assert g["scores"] == pytest.approx([w[1] for w in want[u]], rel=1e-5, abs=1e-5)
        assert g["skipped"] == 0 and not set(g["items"]) & set(seqs[u])
    one = b.recommend(seqs[users[0]], k=k)  # batch of one: the same answer
    assert one["items"] == got[0]["items"]
    return b


@pytest.mark.parametrize("arch,fmt", [("sasrec", "onnx"), ("nextitnet", "onnx"), ("sasrec", "pt2")])
def test_the_bundles_top_k_is_the_eager_models_for_every_user(tmp_path, arch, fmt):
    path, seqs = _data(tmp_path)
    extra = ["model.num_heads=2"] if arch == "sasrec" else ["model.dilations=[1,2]"]
    out = run(["fit", *tiny(tmp_path, "data=file", f"data.path={path}", f"model={arch}", *extra)])
    dest = tmp_path / f"bundle_{fmt}"
    run(["export", f"ckpt={out['best_ckpt']}", f"format={fmt}", f"out={dest}"])
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["format"] == fmt and manifest["arch"] == arch and manifest["num_items"] == 40
    assert manifest["max_len"] == 20 and manifest["parity_max_abs"] < 1e-4 and "index" not in manifest
    assert set(manifest["files"]) >= {"items.npy", "id_maps.json", f"encoder.{fmt}"}
    b = _check_parity(dest, out["best_ckpt"], seqs, tmp_path)
    # a history longer than max_len: only its last max_len items are read, as the eager model does
    long = seqs["u1"] * 3
    assert b.recommend(long, 5, exclude_seen=False)["items"] == b.recommend(long[-20:], 5, exclude_seen=False)["items"]
    with pytest.raises(ConfigError, match="exists; choose another path or pass overwrite=true"):
        run(["export", f"ckpt={out['best_ckpt']}", f"format={fmt}", f"out={dest}"])
    with pytest.raises(ConfigError, match="a single model"):
        run(["export", f"ckpt={out['best_ckpt']}", f"format={fmt}", f"out={tmp_path / 'x'}", "net=booster"])


def test_a_rockets_bundle_serves_its_light_net(tmp_path):
    path, seqs = _data(tmp_path)
    args = [a for a in tiny(tmp_path, "data=file", f"data.path={path}") if a != "model.d_model=16"]
    out = run(["fit", *args, "model=rocket", "model.booster.d_model=16", "model.light.d_model=16",
               "model.booster.num_blocks=2", "callbacks=rocket"])
    dest = tmp_path / "light"
    run(["export", f"ckpt={out['best_ckpt']}", "format=onnx", f"out={dest}"])  # net=light is the default
    assert json.loads((dest / "manifest.json").read_text())["net"] == "light"
    _check_parity(dest, out["best_ckpt"], seqs, tmp_path)  # predict on a rocket checkpoint ranks with its light net
    booster = tmp_path / "booster"
    run(["export", f"ckpt={out['best_ckpt']}", "format=onnx", "net=booster", f"out={booster}"])
    b, lb = Bundle.load(str(booster)), Bundle.load(str(dest))
    assert b.manifest["net"] == "booster" and b.items.shape[1] == lb.items.shape[1]
    assert not np.allclose(b.encode_internal([[1, 2, 3]]), lb.encode_internal([[1, 2, 3]]))


def _toy_bundle(tmp_path, num_items=30, d=8, fmt="onnx", **kw):
    from lightning_rec.modules import SeqRecModule
    from lightning_rec.serving.write import write_bundle

    torch.manual_seed(0)
    model = SeqRecModule(num_items=num_items, d_model=d, num_blocks=1, max_len=10)
    ids = ["<pad>"] + [f"item{i}" for i in range(1, num_items + 1)]
    dest = tmp_path / kw.pop("name", "toy")
    write_bundle(model, ids, str(dest), fmt, max_len=10, log=lambda s: None, **kw)
    return dest, model


def test_the_exact_scorer_equals_a_brute_force_ranking_across_chunks(tmp_path, monkeypatch):
    dest, _ = _toy_bundle(tmp_path, num_items=30)
    b = Bundle.load(str(dest))
    b.items[5] = b.items[9]  # items 5 and 9 tie everywhere: the lower id ranks first
    monkeypatch.setattr(bundle_mod, "SCORE_CHUNK", 7)  # 30 items in 5 chunks: the running top-k merges chunks
    rng = np.random.default_rng(0)
    users = rng.standard_normal((6, 8)).astype(np.float32)
    seen = [set(rng.integers(1, 31, size=n).tolist()) for n in (0, 1, 5, 12, 25)] + [set(range(1, 31))]
    for k in (1, 4, 30):
        top, scores = b.top_k(users, k, seen)
        for r in range(6):
            s = users[r] @ b.items.T
            oracle = sorted((i for i in range(1, 31) if i not in seen[r]), key=lambda i: (-s[i], i))[:k]
            assert top[r] == oracle
            assert scores[r] == pytest.approx([float(s[i]) for i in oracle], rel=1e-5, abs=1e-6)
    assert top[5] == []  # every item seen: nothing left to recommend


def test_the_chunk_selection_is_exact_with_many_ties():
    rng = np.random.default_rng(1)
    for width, k in ((5000, 10), (70_000, 3), (50, 50), (12, 1)):
        s = rng.integers(-20, 20, size=(9, width)).astype(np.float32)  # few distinct values: ties everywhere
        s[0, ::2] = -np.inf  # half of a row excluded
        s[1, :] = -np.inf
        s[1, [7, 3]] = 0.0  # fewer finite scores than k: the rest is -inf, still by the lower column
        top_s, top_i = bundle_mod._chunk_top_k(s, k)
        for r in range(9):
            oracle = sorted(range(width), key=lambda c: (-s[r, c], c))[:k]
            assert top_i[r].tolist() == oracle, (width, k, r)
            assert top_s[r].tolist() == [float(s[r, c]) for c in oracle]


def test_the_faiss_index_recalls_the_exact_top_k_on_a_100k_item_catalogue(tmp_path):
    dest, _ = _toy_bundle(tmp_path, num_items=100_000, d=32, index="hnsw", recall_queries=300)
    info = json.loads((dest / "manifest.json").read_text())["index"]
    assert info["type"] == "hnsw" and info["recall_at_k"] >= 0.99
    b = Bundle.load(str(dest))
    assert b.index is not None and b.index.ntotal == 100_000
    rng = np.random.default_rng(7)  # fresh histories, not those measured at export
    rows = [rng.integers(1, 100_001, size=int(rng.integers(1, 11))).tolist() for _ in range(300)]
    users = b.encode_internal(rows)
    approx, _ = b.top_k(users, 10, [set(r) for r in rows])
    exact, _ = b.top_k(users, 10, [set(r) for r in rows], exact=True)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.99, recall
    assert all(not set(a) & set(r) for a, r in zip(approx, rows))  # seen items stay out of the index's answer


def test_an_onnx_bundle_loads_and_recommends_without_torch(tmp_path):
    dest, model = _toy_bundle(tmp_path, index="flat", recall_queries=20)
    with torch.no_grad():
        want = (model.eval().user_representation(torch.tensor([[0, 0, 3, 1, 4]])) @ model.output_weight().T)[0]
    want[[0, 1, 3, 4]] = -float("inf")
    code = ("import sys, json\n"
            "from lightning_rec.serving import Bundle\n"
            f"b = Bundle.load({str(dest)!r})\n"
            "r = b.recommend(['item3', 'item1', 'unknown', 'item4'], k=5)\n"
            "print(json.dumps(r))\n"
            "print(sorted(m for m in ('torch', 'pytorch_lightning', 'hydra', 'omegaconf', 'lightning') if m in sys.modules))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    out, mods = p.stdout.strip().splitlines()[-2:]
    assert mods == "[]"
    r = json.loads(out)
    assert r["skipped"] == 1
    assert r["items"] == [f"item{i}" for i in want.topk(5).indices.tolist()]


def test_bad_input_and_broken_bundles_give_one_line_errors(tmp_path):
    dest, _ = _toy_bundle(tmp_path)
    b = Bundle.load(str(dest))
    for call, msg in [
        (lambda: b.recommend([], 5), "history 0: no known item to recommend from \\(it is empty\\)"),
        (lambda: b.recommend(["x", "y"], 5), "all 2 ids are unknown to the catalogue"),
        (lambda: b.recommend(["item1"], 0), "k=0: expected an integer in 1..30"),
        (lambda: b.recommend(["item1"], 31), "k=31: expected an integer in 1..30"),
        (lambda: b.recommend("item1", 3), "history 0: expected a list of item ids, got str"),
        (lambda: b.recommend_batch([], 3), "expected a non-empty list of histories"),
        (lambda: b.recommend(["item1"], 3, exclude_seen="no"), "exclude_seen='no': expected true or false"),
    ]:
        with pytest.raises(BundleError, match=msg) as e:
            call()
        assert "\n" not in str(e.value)
    with pytest.raises(BundleError, match="no manifest.json"):
        Bundle.load(str(tmp_path))
    items = dest / "items.npy"
    arr = np.load(items)
    arr[3, 0] += 1
    np.save(items, arr)
    with pytest.raises(BundleError, match="items.npy does not match its sha256 in manifest.json"):
        Bundle.load(str(dest))
    os.remove(items)
    with pytest.raises(BundleError, match="items.npy is missing"):
        Bundle.load(str(dest))
    with pytest.raises(ConfigError, match="format=torchscript: torch.jit is deprecated"):
        run(["export", "ckpt=x.ckpt", "format=torchscript", f"out={tmp_path / 'b'}"])
    with pytest.raises(ConfigError, match="format=tflite: expected one of onnx, pt2"):
        run(["export", "ckpt=x.ckpt", "format=tflite", f"out={tmp_path / 'b'}"])


def test_a_failed_export_leaves_no_folder_and_keeps_the_old_bundle(tmp_path, monkeypatch):
    from lightning_rec.serving import write

    dest, _ = _toy_bundle(tmp_path)
    before = json.loads((dest / "manifest.json").read_text())["files"]

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(write, "_build_index", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        _toy_bundle(tmp_path, index="hnsw", overwrite=True)
    assert json.loads((dest / "manifest.json").read_text())["files"] == before  # the old bundle, untouched
    assert sorted(os.listdir(tmp_path)) == ["toy"]  # no half-written folder beside it
    with pytest.raises(RuntimeError, match="disk full"):
        _toy_bundle(tmp_path, index="hnsw", name="fresh")
    assert sorted(os.listdir(tmp_path)) == ["toy"]
    monkeypatch.undo()
    _toy_bundle(tmp_path, index="flat", overwrite=True, recall_queries=10)  # overwrite=true replaces it whole
    assert json.loads((dest / "manifest.json").read_text())["index"]["type"] == "flat"
    assert sorted(os.listdir(tmp_path)) == ["toy"]


def test_an_encoder_the_exporter_cannot_translate_is_one_line_naming_the_other_format(tmp_path, monkeypatch):
    from lightning_rec.serving import write

    def unsupported(*a, **k):
        raise RuntimeError("Unsupported operator aten::frobnicate\nlong traceback text")

    monkeypatch.setattr(write, "_export", unsupported)
    with pytest.raises(ConfigError, match=r"format=onnx: the sasrec encoder did not export \(RuntimeError: Unsupported "
                                          r"operator aten::frobnicate\); try format=pt2$"):
        _toy_bundle(tmp_path)
    assert os.listdir(tmp_path) == []
