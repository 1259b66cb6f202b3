"""The fast reader (pandas' C parser + numpy grouping) gives the line-by-line reader's results and errors; array
k-core; data=ml-20m."""

import gzip
import hashlib
import os
import random
import zipfile

import numpy as np
import pytest

from lightning_rec.data import SeqDataModule, encode, kcore, read_sequences, readers
from lightning_rec.data import download as dl
from lightning_rec.data.encode import drop_short_users, kcore_encoded
from lightning_rec.data.readers import read_encoded
from lightning_rec.errors import DataError

pytest.importorskip("pandas")


def write(tmp_path, name, text):
    p = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(p, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        p.write_text(text, encoding="utf-8")
    return str(p)


def same(a, b):
    return (a.user_ids == b.user_ids and a.item_ids == b.item_ids and np.array_equal(a.indptr, b.indptr)
            and np.array_equal(a.items, b.items))


def lines(fmt, n, seed=0, string_users=False):
    """n interactions with many timestamp ties, in file order not sorted by time."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        u, i, r, t = rng.randrange(1, 60), rng.randrange(1, 200), rng.randrange(1, 6), rng.randrange(0, 40)
        u = f"user{u}" if string_users else u
        rows.append({"sasrec": f"{u} {i}", "movielens": f"{u}::{i}::{r}::{t}", "udata": f"{u}\t{i}\t{r}\t{t}",
                     "csv": f"{u},{i},{r},{t}"}[fmt])
    return ("user_id,item_id,rating,timestamp\n" if fmt == "csv" else "") + "\n".join(rows) + "\n"


NAMES = {"sasrec": "s.txt", "movielens": "ratings.dat", "udata": "u.data", "csv": "r.csv"}


@pytest.mark.parametrize("fmt", ["sasrec", "movielens", "udata", "csv"])
@pytest.mark.parametrize("gz", [False, True])
def test_fast_reader_matches_the_line_reader_on_every_format(tmp_path, fmt, gz):
    for string_users in (False, True):
        p = write(tmp_path, NAMES[fmt] + (".gz" if gz else ""), lines(fmt, 3000, string_users=string_users))
        kwargs = [{}] if fmt == "sasrec" else [{}, {"min_rating": 3}]
        if fmt == "csv":
            kwargs.append({"time_col": None})  # file order
        for kw in kwargs:
            fast = readers._read_fast(p, fmt, "user_id", "item_id", kw.get("time_col", "timestamp"), None,
                                      kw.get("min_rating"), "," if fmt == "csv" else None)
            assert fast is not None, (fmt, kw)  # the fast path took it
            assert same(fast, encode(read_sequences(p, fmt, **kw))), (fmt, kw)
            assert same(read_encoded(p, fmt, **kw), fast)


@pytest.mark.parametrize("name,text,kw", [
    ("zeros.txt", "007 1\n7 2\n7 3\n007 4\n", {}),                       # '007' and '7' are two users
    ("plus.txt", "+7 1\n7 2\n", {}),
    ("nbsp.txt", "1 2\xa03\n1 4\n", {}),                                 # str.split() splits at U+00A0: an error
    ("nbsp2.txt", "1\xa02 3\n", {}),
    ("colon.dat", "1::2:5::3::4\n1::7::3::2\n", {}),                     # an item id holding ':'
    ("empty.dat", "::2::3::4\n1::7::3::2\n", {}),                        # an empty user id is an id there
    ("space.data", " 1\t2\t3\t4\n1\t5\t3\t2\n", {}),                     # ' 1' and '1' are two users
    ("nan.data", "1\t2\t3\tnan\n1\t5\t3\t2\n", {}),
    ("empty_last.csv", "user_id,timestamp,item_id\n1,2,a\n1,3,\n", {}),  # an empty item id: an error
    ("short.csv", "user_id,item_id,timestamp\n1,a,1\n1,b\n", {}),
    ("long_first.csv", "user_id,item_id,timestamp\n1,a,1,9\n1,b,2\n", {}),
    ("strip.csv", "user_id,item_id,timestamp\n 1 ,a,2\n1, a,1\n1,b ,3\n", {}),
    ("quoted.csv", 'user_id,item_id,timestamp\n"1,2",a,2\n"007",b,1\n7,c,1\n', {}),
    ("blank.csv", "user_id,item_id,timestamp\n1,a,2\n , , \n\n1,b,1\n", {}),
    ("low_rating_bad_time.csv", "user_id,item_id,rating,timestamp\n1,a,1,x\n1,b,5,1\n", {"min_rating": 3}),
    ("big.txt", f"{2**70} 1\n1 2\n", {}),
    ("sep.dat", "1::7::3::2\n1:5:2::3::4\n", {}),                      # 7 fields at ':', not 4 at '::'
    ("late_zeros.txt", "7 1\n" * 1500 + "007 2\n", {}),               # past the rows that choose int64
    ("late_space.data", "7\t1\t3\t1\n" * 1500 + "7 \t2\t3\t1\n", {}),
])
def test_files_the_fast_path_declines_read_as_the_line_reader_reads_them(tmp_path, name, text, kw):
    p = write(tmp_path, name, text)
    try:
        want = encode(read_sequences(p, **kw))
    except DataError as e:
        with pytest.raises(DataError) as got:
            read_encoded(p, **kw)
        assert str(got.value) == str(e)
    else:
        assert same(read_encoded(p, **kw), want)


BAD = {  # a bad line for each format, and the start of the error the line-by-line reader gives
    "sasrec": ("5 6 7", "expected 2 whitespace-separated fields 'user item', got 3"),
    "movielens": ("5::6::7", "expected 4 fields 'user::item::rating::timestamp', got 3"),
    "udata": ("5\t6\t7\tlate", "timestamp 'late' is not a number"),
    "csv": ("5,6,7", "expected 4 fields, got 3"),
}


@pytest.mark.parametrize("fmt", ["sasrec", "movielens", "udata", "csv"])
def test_a_bad_line_deep_in_a_large_file_is_named(tmp_path, fmt):
    body = lines(fmt, 60_000, seed=1).splitlines()
    bad_at = 50_001  # the file's line number: the csv header is line 1
    body[bad_at - 1] = BAD[fmt][0]
    for gz in (False, True):
        p = write(tmp_path, NAMES[fmt] + (".gz" if gz else ""), "\n".join(body) + "\n")
        with pytest.raises(DataError) as e:
            read_encoded(p, fmt)
        assert str(e.value).startswith(f"{p} line {bad_at}: {BAD[fmt][1]}"), str(e.value)
        assert "\n" not in str(e.value)


def test_without_pandas_the_line_reader_gives_the_same_data(tmp_path, monkeypatch):
    p = write(tmp_path, "r.csv", lines("csv", 2000, string_users=True))
    with_pandas = SeqDataModule(name="file", path=p, min_item_interactions=3, short_users="drop").load()
    monkeypatch.setattr(readers, "_pandas", lambda: None)
    assert readers._read_fast(p, "csv", "user_id", "item_id", "timestamp", None, None, ",") is None
    assert same(SeqDataModule(name="file", path=p, min_item_interactions=3, short_users="drop").load(), with_pandas)


def test_array_kcore_and_short_user_drop_keep_what_the_dict_versions_keep():
    rng = random.Random(3)
    for trial in range(30):
        seqs = {f"u{u}": [f"i{rng.randrange(40)}" for _ in range(rng.randrange(1, 12))] for u in range(rng.randrange(1, 50))}
        mu, mi = rng.randrange(0, 6), rng.randrange(0, 6)
        want = kcore(seqs, mu, mi)
        got = kcore_encoded(encode(seqs), mu, mi)
        if not want:
            assert got.num_users == 0
            continue
        assert same(got, encode(want)), (trial, mu, mi)
        short = {u: s for u, s in want.items() if len(s) >= 3}
        if short:
            assert same(drop_short_users(got, 3), encode(short))


def test_data_ml_20m_downloads_ratings_csv_and_reads_its_columns(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    conf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
    with initialize_config_dir(config_dir=conf, version_base=None):
        cfg = compose(config_name="config", overrides=["data=ml-20m"])
    assert (cfg.data.name, cfg.data.format, cfg.data.user_col, cfg.data.item_col, cfg.data.time_col) == (
        "ml-20m", "csv", "userId", "movieId", "timestamp")
    # a small ml-20m.zip as GroupLens lays it out; no network
    archive = tmp_path / "src" / "ml-20m.zip"
    archive.parent.mkdir()
    rows = "".join(f"{u},{i},{r},{1100000000 + t}\n" for u, i, r, t in
                   [(1, 296, 5.0, 3), (1, 2, 3.5, 1), (1, 29, 3.5, 2), (2, 3, 4.0, 5), (2, 62, 2.5, 4), (2, 70, 5.0, 6)])
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("ml-20m/ratings.csv", "userId,movieId,rating,timestamp\n" + rows)
        z.writestr("ml-20m/movies.csv", "movieId,title,genres\n")
    url, md5, member, fmt = dl.DATASETS["ml-20m"]
    assert (url, member, fmt) == ("https://files.grouplens.org/datasets/movielens/ml-20m.zip", "ml-20m/ratings.csv", "csv")
    monkeypatch.setitem(dl.DATASETS, "ml-20m", (archive.as_uri(), hashlib.md5(archive.read_bytes()).hexdigest(),
                                                member, fmt))
    data = {k: v for k, v in cfg.data.items() if k not in ("_target_", "eval_protocol", "eval_negatives",
                                                               "eval_sampler", "seed")}
    dm = SeqDataModule(**{**data, "cache_dir": str(tmp_path / "cache")})
    dm.prepare_data()
    d = dm.load()
    assert os.path.exists(tmp_path / "cache" / "ml-20m" / "ratings.csv")
    assert d.user_ids == ["1", "2"] and d.item_ids == ["<pad>", "2", "3", "29", "62", "70", "296"]
    assert d.items.tolist() == [1, 3, 6, 4, 2, 5]  # time order within each user
    dm = SeqDataModule(**{**data, "cache_dir": str(tmp_path / "cache"), "min_rating": 4})
    assert dm.load().items.tolist() == [3, 1, 2]  # ratings >= 4 only: items 3, 70, 296 renumbered 1..3


def test_a_large_file_read_line_by_line_says_why(tmp_path, monkeypatch, capsys):
    declined = write(tmp_path, "colon.dat", "1::7::3::2\n1::a:b::3::4\n")  # an id holding ':': the fast reader declines it
    fine = write(tmp_path, "ok.txt", "7 1\n7 2\n8 1\n")
    monkeypatch.setattr(readers, "SLOW_NOTE_BYTES", 10)  # both files count as large
    read_encoded(fine)
    assert capsys.readouterr().err == ""  # read fast: nothing to say
    read_encoded(declined)
    err = capsys.readouterr().err
    assert err.startswith(f"note: {declined}: read line by line") and "exactly the expected shape" in err
    assert err.count("\n") == 1
    monkeypatch.setattr(readers, "_pandas", lambda: None)
    read_encoded(fine)
    assert "pandas is not installed (pip install 'lightning_rec[fast]')" in capsys.readouterr().err
    monkeypatch.setattr(readers, "SLOW_NOTE_BYTES", 1 << 30)  # small files: no note
    read_encoded(declined)
    assert capsys.readouterr().err == ""
