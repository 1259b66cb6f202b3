"""`predict`: recommendations in original ids, seen items excluded (lightning_rec/cli/predict.py)."""

import csv
import math

import pytest
from conftest import tiny

from lightning_rec.cli import run
from lightning_rec.errors import ConfigError


def fit(tmp_path, *extra, epochs=2):
    return run(["fit", *tiny(tmp_path, *extra, epochs=epochs)])


def test_predict_writes_original_ids_and_excludes_seen(tmp_path):
    rows = []
    for u in range(30):
        seq = [f"item-{(u + 3 * t) % 17}" for t in range(8)]
        rows += [f"user-{u}\t{it}\t{t}" for t, it in enumerate(seq)]
    data = tmp_path / "log.tsv"
    data.write_text("user\titem\tts\n" + "\n".join(rows) + "\n")
    d = [f"data.path={data}", "data=file", "data.user_col=user", "data.item_col=item", "data.time_col=ts"]
    out = fit(tmp_path, *d, epochs=1)
    dest = tmp_path / "recs.tsv"
    run(
        [
            "predict",
            f"ckpt_path={out['best_ckpt']}",
            f"predict.out={dest}",
            "predict.k=5",
            "trainer.enable_progress_bar=false",
        ]
    )
    lines = list(csv.DictReader(open(dest), delimiter="\t"))
    assert len(lines) == 30 * 5
    seen = {}
    for r in rows:
        u, it, _ = r.split("\t")
        seen.setdefault(u, set()).add(it)
    for line in lines:
        assert line["user"].startswith("user-") and line["item"].startswith("item-")
        assert line["item"] not in seen[line["user"]]
    with pytest.raises(ConfigError, match="file exists"):
        run(["predict", f"ckpt_path={out['best_ckpt']}", f"predict.out={dest}"])


def test_predict_gives_fewer_rows_rather_than_seen_items(tmp_path, capsys):
    data = tmp_path / "d.txt"
    data.write_text("".join(f"{u} {i}\n" for u in range(1, 21) for i in range(1, 7) if i != u % 6 + 1))
    out = fit(tmp_path, "data=file", f"data.path={data}", epochs=1)
    dest = tmp_path / "recs.tsv"
    run(
        [
            "predict",
            f"ckpt_path={out['best_ckpt']}",
            f"predict.out={dest}",
            "predict.k=3",
            "trainer.enable_progress_bar=false",
        ]
    )
    lines = list(csv.DictReader(open(dest), delimiter="\t"))
    seen = {}
    for line in data.read_text().split("\n"):
        if line:
            u, i = line.split()
            seen.setdefault(u, set()).add(i)
    assert len(lines) == 20  # each user saw 5 of the 6 items: one recommendation each
    assert all(r["item"] not in seen[r["user"]] and r["rank"] == "1" for r in lines)
    assert "20 of them have fewer than 3 unseen items" in capsys.readouterr().out
    # a model evaluated with seen items kept still recommends only unseen ones, unless asked
    out = fit(tmp_path / "keep", "data=file", f"data.path={data}", "eval.exclude_seen=false", epochs=1)
    run(
        [
            "predict",
            f"ckpt={out['best_ckpt']}",
            f"predict.out={tmp_path / 'r2.tsv'}",
            "predict.k=3",
            "trainer.enable_progress_bar=false",
        ]
    )
    rows = list(csv.DictReader(open(tmp_path / "r2.tsv"), delimiter="\t"))
    assert len(rows) == 20 and all(r["item"] not in seen[r["user"]] for r in rows)
    run(
        [
            "predict",
            f"ckpt={out['best_ckpt']}",
            f"predict.out={tmp_path / 'r3.tsv'}",
            "predict.k=3",
            "predict.exclude_seen=false",
            "trainer.enable_progress_bar=false",
        ]
    )
    rows = list(csv.DictReader(open(tmp_path / "r3.tsv"), delimiter="\t"))
    assert (
        len(rows) == 60 and sum(r["item"] in seen[r["user"]] for r in rows) >= 40
    )  # 3 ranks, at most 1 unseen


def _lists(path):
    by_user = {}
    for r in csv.DictReader(open(path), delimiter="\t"):
        by_user.setdefault(r["user"], []).append(r)
    return by_user


def test_predict_at_test_gives_the_rankings_test_scored(tmp_path):
    # 60 users over 25 items, with repeats: a held-out item the user had before stays rankable, as in test
    rows = []
    for u in range(60):
        seq = [(u * 7 + 3 * t + (t % 4 == 3) * 5) % 25 for t in range(6 + u % 5)]
        if u % 3 == 0:
            seq[-1] = seq[1]  # test item seen earlier in the history
        rows += [f"u{u} i{it}" for it in seq]
    data = tmp_path / "d.txt"
    data.write_text("\n".join(rows) + "\n")
    out = fit(tmp_path, "data=file", f"data.path={data}", "eval.ks=[5,10]", epochs=3)
    ckpt = out["best_ckpt"]
    got = run(["test", f"ckpt={ckpt}", "trainer.enable_progress_bar=false"])
    dest = tmp_path / "at_test.tsv"
    run(["predict", f"ckpt={ckpt}", f"predict.out={dest}", "predict.k=10", "predict.at=test",
         "trainer.enable_progress_bar=false"])
    lists = _lists(dest)
    seqs = {}
    for r in rows:
        u, it = r.split()
        seqs.setdefault(u, []).append(it)
    assert set(lists) == set(seqs)  # every user has >= 3 items: each is evaluated
    hr = {5: [], 10: []}
    ndcg = {5: [], 10: []}
    for u, ranked in lists.items():
        assert {r["held_out"] for r in ranked} == {seqs[u][-1]}
        items = [r["item"] for r in ranked]
        history = set(seqs[u][:-1]) - {seqs[u][-1]}
        assert not history & set(items)  # the earlier items are excluded, the held-out one is not
        for k in (5, 10):
            pos = items[:k].index(seqs[u][-1]) if seqs[u][-1] in items[:k] else None
            hr[k].append(pos is not None)
            ndcg[k].append(0.0 if pos is None else 1.0 / math.log2(pos + 2))
    assert any(seqs[u][-1] in seqs[u][:-1] and any(r["item"] == seqs[u][-1] for r in lists[u]) for u in seqs)
    for k in (5, 10):
        assert sum(hr[k]) / len(hr[k]) == pytest.approx(got[f"test/hr@{k}"], abs=1e-6)
        assert sum(ndcg[k]) / len(ndcg[k]) == pytest.approx(got[f"test/ndcg@{k}"], abs=1e-6)

    # valid: ranked before the validation item (second to last); next: after everything, no held_out column
    run(["predict", f"ckpt={ckpt}", f"predict.out={tmp_path / 'v.tsv'}", "predict.at=valid",
         "trainer.enable_progress_bar=false"])
    for u, ranked in _lists(tmp_path / "v.tsv").items():
        assert {r["held_out"] for r in ranked} == {seqs[u][-2]}
        assert not (set(seqs[u][:-2]) - {seqs[u][-2]}) & {r["item"] for r in ranked}
        assert seqs[u][-1] in {r["item"] for r in ranked} or len(ranked) == 10
    run(["predict", f"ckpt={ckpt}", f"predict.out={tmp_path / 'n.tsv'}", "trainer.enable_progress_bar=false"])
    nxt = _lists(tmp_path / "n.tsv")
    assert "held_out" not in next(iter(nxt.values()))[0]
    assert all(not set(seqs[u]) & {r["item"] for r in ranked} for u, ranked in nxt.items())
    with pytest.raises(ConfigError, match=r"predict.at=tomorrow: expected one of next, test, valid"):
        run(["predict", f"ckpt={ckpt}", "predict.at=tomorrow"])
