"""`predict`: recommendations in original ids, seen items excluded (lightning_rec/cli/predict.py)."""

import csv

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
