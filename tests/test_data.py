"""Readers, id maps, k-core, leave-one-out split, batching, samplers, download."""

import gzip
import hashlib
import os
import re

import pytest
import torch

from lightning_rec.data import SeqDataModule, encode, kcore, make_synthetic, read_sequences
from lightning_rec.data import download as dl
from lightning_rec.data.sampler import EpochSampler
from lightning_rec.errors import ConfigError, DataError


def write(tmp_path, name, text, gz=False):
    p = tmp_path / name
    if gz:
        with gzip.open(p, "wt") as f:
            f.write(text)
    else:
        p.write_text(text)
    return str(p)


def test_sasrec_format_and_gz(tmp_path):
    text = "1 10\n2 7\n1 11\n1 12\n2 8\n"
    for gz in (False, True):
        p = write(tmp_path, "a.txt.gz" if gz else "a.txt", text, gz)
        assert read_sequences(p) == {"1": ["10", "11", "12"], "2": ["7", "8"]}


def test_movielens_dat_sorts_by_time_keeping_ties_in_file_order(tmp_path):
    p = write(tmp_path, "ratings.dat", "1::5::3::300\n1::6::4::100\n1::7::1::100\n2::5::5::50\n1::8::2::200\n")
    assert read_sequences(p) == {"1": ["6", "7", "8", "5"], "2": ["5"]}
    assert read_sequences(p, min_rating=3)["1"] == ["6", "5"]


def test_udata_tab_separated(tmp_path):
    p = write(tmp_path, "u.data", "3\t1\t5\t9\n3\t2\t5\t9\n3\t4\t5\t1\n", gz=False)
    assert read_sequences(p) == {"3": ["4", "1", "2"]}
    gz = write(tmp_path, "u.data.gz", "3\t1\t5\t9\n", gz=True)
    assert read_sequences(gz) == {"3": ["1"]}


def test_csv_with_named_columns_and_string_ids(tmp_path):
    p = write(tmp_path, "log.csv", "when,who,what\n5,alice,b\n1,alice,a\n3,bob,c\n")
    seqs = read_sequences(p, user_col="who", item_col="what", time_col="when")
    assert seqs == {"alice": ["a", "b"], "bob": ["c"]}
    t = write(tmp_path, "log.tsv", "u\ti\nx\tq\nx\tp\n")
    assert read_sequences(t, user_col="u", item_col="i", time_col=None) == {"x": ["q", "p"]}
    # Excel writes a byte-order mark before the header; it is not part of the first column's name
    bom = tmp_path / "excel.csv"
    bom.write_bytes("\ufeffwho,what,when\nalice,a,1\n".encode("utf-8"))
    assert read_sequences(str(bom), user_col="who", item_col="what", time_col="when") == {"alice": ["a"]}


@pytest.mark.parametrize(
    "name,text,kwargs,expect",
    [
        ("bad.txt", "1 2\n1 2 3\n", {}, "bad.txt line 2: expected 2 whitespace-separated fields"),
        ("ratings.dat", "1::2::3::4\n1::2::3\n", {}, "ratings.dat line 2: expected 4 fields"),
        ("ratings.dat", "1::2::3::x\n", {}, "ratings.dat line 1: timestamp 'x' is not a number"),
        ("c.csv", "a,b\n1,2\n", {"user_col": "user"}, "c.csv line 1: header has no column 'user' (data.user_col)"),
        ("e.txt", "", {}, "is empty"),
        ("s.txt", "1 2\n", {"min_rating": 4}, "data.min_rating=4: "),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, name, text, kwargs, expect):
    p = write(tmp_path, name, text)
    with pytest.raises(DataError) as e:
        read_sequences(p, **kwargs)
    assert expect in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_sequences(str(tmp_path / "nope.txt"))


def test_encode_numeric_ids_keep_order_and_zero_is_padding():
    enc = encode({"2": ["10", "3"], "1": ["3", "2"]})
    assert enc.user_ids == ["1", "2"] and enc.item_ids == ["<pad>", "2", "3", "10"]
    assert enc.indptr.tolist() == [0, 2, 4] and enc.items.tolist() == [2, 1, 3, 2]
    enc = encode({"b": ["y", "x"], "a": ["x"]})
    assert enc.item_ids == ["<pad>", "x", "y"] and enc.items.tolist() == [1, 2, 1]


def test_kcore_is_iterative():
    seqs = {"u1": ["a", "b", "c"], "u2": ["a", "b"], "u3": ["a", "d"]}
    # d has 1 interaction -> dropped -> u3 has 1 item -> dropped -> a now has 2 ... stable
    assert kcore(seqs, 2, 2) == {"u1": ["a", "b"], "u2": ["a", "b"]}
    assert kcore(seqs, 0, 0) is seqs
    # Only a second pass finds this: dropping d removes u3, which leaves e with one interaction.
    seqs = {"u1": ["a", "e", "b"], "u2": ["a", "b"], "u3": ["e", "d"]}
    assert kcore(seqs, 2, 2) == {"u1": ["a", "b"], "u2": ["a", "b"]}
    # A user whose every item is filtered out is gone even when min_user allows any length.
    assert kcore({"u1": ["a", "a"], "u2": ["z"]}, 0, 2) == {"u1": ["a", "a"]}


def test_unreadable_files_and_bad_separators_give_one_line_errors(tmp_path):
    not_gz = tmp_path / "a.txt.gz"
    not_gz.write_text("1 2\n")
    truncated = tmp_path / "b.txt.gz"
    whole = gzip.compress("".join(f"{u} {u * 7919 % 1000}\n" for u in range(2000)).encode())
    truncated.write_bytes(whole[: len(whole) // 2])
    latin = tmp_path / "c.txt"
    latin.write_bytes("1 caf\xe9\n".encode("latin-1"))
    for path in (not_gz, truncated, latin):
        with pytest.raises(DataError, match=f"data.path: cannot read '{re.escape(str(path))}'") as e:
            read_sequences(str(path), "sasrec")
        assert "\n" not in str(e.value)
    tsv = tmp_path / "d.csv"
    tsv.write_text("user_id\titem_id\ttimestamp\n1\ta\t1\n1\tb\t2\n")
    for sep in ("\\t", "tab", "\t"):  # as typed on a command line, or a real tab
        assert read_sequences(str(tsv), "csv", sep=sep) == {"1": ["a", "b"]}
    with pytest.raises(DataError, match="data.sep=';;': expected one character"):
        read_sequences(str(tsv), "csv", sep=";;")


def test_csv_rows_must_have_the_headers_number_of_fields(tmp_path):
    for row in ("1,b", "1,b,3,EXTRA"):
        f = tmp_path / "x.csv"
        f.write_text(f"user_id,item_id,timestamp\n1,a,1\n{row}\n")
        with pytest.raises(DataError, match="x.csv line 3: expected 3 fields"):
            read_sequences(str(f), "csv")


def test_leave_one_out_split_by_hand(tmp_path):
    # user 1: 1 2 3 4 5 6 ; user 2: 7 8 9
    p = write(tmp_path, "s.txt", "".join(f"1 {i}\n" for i in range(1, 7)) + "2 7\n2 8\n2 9\n")
    dm = SeqDataModule(name="file", path=p, max_len=3, trim_padding=False)
    dm.setup()
    # user 1 trains on 1 2 3 4 (the last max_len=3 positions): inputs 1 2 3 -> targets 2 3 4;
    # user 2's training part is one item (7), which has no target, so it is not a training row.
    assert len(dm.train_set) == 1
    tr = dm.train_set.__getitems__([0])
    assert tr["inputs"].tolist() == [[1, 2, 3]] and tr["targets"].tolist() == [[2, 3, 4]]
    val = dm.val_set.__getitems__([0, 1])
    test = dm.test_set.__getitems__([0, 1])
    assert val["target"].tolist() == [5, 8] and test["target"].tolist() == [6, 9]
    assert val["inputs"].tolist() == [[2, 3, 4], [0, 0, 7]]  # most recent max_len items
    assert test["inputs"].tolist() == [[3, 4, 5], [0, 7, 8]]
    assert test["seen"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 0, 0, 0]]  # full history, not just the window
    assert val["seen"].tolist() == [[1, 2, 3, 4], [7, 0, 0, 0]]
    pred = dm.predict_set.__getitems__([0])
    assert pred["inputs"].tolist() == [[4, 5, 6]] and pred["seen"].tolist() == [[1, 2, 3, 4, 5, 6]]
    assert dm.popularity[1:7].tolist() == [1, 1, 1, 1, 0, 0]  # training part only


def test_train_windows_all_supervises_every_training_target_once_with_its_preceding_items(tmp_path):
    # every item id is unique, so a target identifies its position in its user's history
    lengths = [3, 4, 5, 6, 7, 9, 10, 11, 14, 30]
    lines, hist, nxt = [], {}, 1
    for u, n in enumerate(lengths):
        hist[u] = list(range(nxt, nxt + n))
        lines += [f"{u} {i}\n" for i in hist[u]]
        nxt += n
    p = write(tmp_path, "s.txt", "".join(lines))
    L = 4
    last = SeqDataModule(name="file", path=p, max_len=L, trim_padding=False)
    full = SeqDataModule(name="file", path=p, max_len=L, trim_padding=False, train_windows="all")
    last.setup(), full.setup()
    pred_of = {}  # target -> the inputs up to and including its position (padding dropped)
    for x, y in zip(full.train_set.inputs.tolist(), full.train_set.targets.tolist()):
        for t, target in enumerate(y):
            if target:
                assert target not in pred_of, f"target {target} supervised twice"
                pred_of[target] = [i for i in x[: t + 1] if i]
    want = {}
    for h in hist.values():
        train = h[:-2]  # leave-one-out: the last two are validation and test
        for t in range(1, len(train)):
            want[train[t]] = train[max(0, t - L):t]  # a window holds L inputs; the first of a window starts it
    assert set(pred_of) == set(want)
    for target, ctx in pred_of.items():
        assert ctx == want[target][-len(ctx):] and 1 <= len(ctx) <= L, target
    assert len(pred_of) == sum(n - 3 for n in lengths)
    # the most recent window of each user is the 'last' row; evaluation is unchanged
    rows_all = {tuple(r) for r in full.train_set.inputs.tolist()}
    assert all(tuple(r) in rows_all for r in last.train_set.inputs.tolist())
    assert len(last.train_set) == sum(n - 2 >= 2 for n in lengths) < len(full.train_set)
    for split in ("val_set", "test_set"):
        a, b = getattr(last, split), getattr(full, split)
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.target, b.target)
    with pytest.raises(ConfigError, match="data.train_windows: 'every' is not one of last, all"):
        SeqDataModule(name="file", path=p, train_windows="every")


def test_user_whose_training_part_is_one_item_is_evaluated_but_not_trained(tmp_path):
    p = write(tmp_path, "s.txt", "1 1\n1 2\n1 3\n2 4\n2 5\n2 6\n2 7\n")
    dm = SeqDataModule(name="file", path=p, max_len=5)
    dm.setup()
    assert len(dm.train_set) == 1 and len(dm.val_set) == 2  # user 1 has one training item: no target


def test_short_users_policies(tmp_path):
    p = write(tmp_path, "s.txt", "1 1\n1 2\n1 3\n1 4\n2 5\n2 6\n")
    with pytest.raises(DataError, match=r"user '2' has 2 interaction\(s\).*data.short_users=train"):
        SeqDataModule(name="file", path=p).setup()
    dm = SeqDataModule(name="file", path=p, short_users="train")
    dm.setup()
    assert len(dm.val_set) == 1 and len(dm.train_set) == 2
    dm = SeqDataModule(name="file", path=p, short_users="drop")
    dm.setup()
    assert len(dm.val_set) == 1 and len(dm.train_set) == 1
    # dropped means gone: not a user, not predicted for, and item 5 and 6 (only user 2's) not in the catalogue
    assert dm.num_users == 1 and len(dm.predict_set) == 1 and dm.num_items == 4
    with pytest.raises(DataError, match="data.short_users=drop leaves no one"):
        SeqDataModule(name="file", path=write(tmp_path, "t.txt", "1 1\n2 2\n"), short_users="drop").load()


def test_training_batches_trim_padding_columns(sasrec_file):
    dm = SeqDataModule(name="file", path=sasrec_file, max_len=50, batch_size=8)
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    assert b["inputs"].shape[1] < 50 and (b["inputs"][:, 0] != 0).any()
    assert ((b["targets"] != 0) <= (b["inputs"] != 0)).all()


def test_synthetic_is_deterministic_and_structured():
    a, b = make_synthetic(num_users=50, seed=3), make_synthetic(num_users=50, seed=3)
    assert a == b and a != make_synthetic(num_users=50, seed=4)
    dm = SeqDataModule(synthetic={"num_users": 50, "num_items": 40})
    dm.setup()
    assert dm.num_users == 50 and dm.num_items <= 40


def test_sampler_order_is_a_function_of_seed_and_epoch_and_shards_cover_users():
    s = EpochSampler(10, seed=1)
    s.set_epoch(3)
    first = list(s)
    s2 = EpochSampler(10, seed=1)
    s2.set_epoch(3)
    assert list(s2) == first and sorted(first) == list(range(10))
    s2.set_epoch(4)
    assert list(s2) != first
    shards = []
    for rank in range(3):
        e = EpochSampler(10, shuffle=False, pad=False)
        e.rank, e.world = rank, 3
        shards.append(list(e))
        assert len(e) == len(shards[-1])
    assert sorted(sum(shards, [])) == list(range(10))  # evaluation: every user exactly once
    t = EpochSampler(10, seed=0)
    t.rank, t.world = 2, 3
    assert len(list(t)) == len(t) == 4  # training: padded to equal length per rank


def test_sampled_protocol_negatives_exclude_history_and_are_fixed(sasrec_file):
    kw = dict(name="file", path=sasrec_file, eval_protocol="sampled", eval_negatives=20)
    dm, dm2 = SeqDataModule(**kw), SeqDataModule(**kw)
    dm.setup(), dm2.setup()
    b = dm.test_set.__getitems__(list(range(len(dm.test_set))))
    assert torch.equal(b["negatives"], dm2.test_set.__getitems__(list(range(len(dm.test_set))))["negatives"])
    for neg, seen, t in zip(b["negatives"], b["seen"], b["target"]):
        assert len(set(neg.tolist())) == 20
        assert not set(neg.tolist()) & (set(seen.tolist()) | {int(t), 0})


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="data.path: required"):
        SeqDataModule(name="file")
    with pytest.raises(ConfigError, match="unknown dataset 'ml-2m'"):
        SeqDataModule(name="ml-2m")


def test_download_verifies_checksum_and_extracts(tmp_path, monkeypatch):
    import zipfile

    archive = tmp_path / "src" / "ml-100k.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("ml-100k/u.data", "".join(f"1\t{i}\t4\t{10 + i}\n" for i in (2, 3, 4, 5)))
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(dl.DATASETS, "ml-100k", (archive.as_uri(), md5, "ml-100k/u.data", "udata"))
    cache = tmp_path / "cache"
    dm = SeqDataModule(name="ml-100k", cache_dir=str(cache))
    dm.prepare_data()
    dm.setup()
    assert dm.num_items == 4 and os.path.exists(cache / "ml-100k" / "u.data")
    # A corrupted download is rejected and nothing is left in the cache.
    monkeypatch.setitem(dl.DATASETS, "ml-100k", (archive.as_uri(), "0" * 32, "ml-100k/u.data", "udata"))
    with pytest.raises(DataError, match="MD5 .* does not match"):
        dl.fetch("ml-100k", str(tmp_path / "cache2"))
    assert not [f for f in os.listdir(tmp_path / "cache2")]
    # An archive already in the cache is checked too: a junk file, and a zip without the member
    monkeypatch.setitem(dl.DATASETS, "ml-100k", (archive.as_uri(), md5, "ml-100k/u.data", "udata"))
    (tmp_path / "cache3").mkdir()
    (tmp_path / "cache3" / "ml-100k.zip").write_text("not a zip")
    with pytest.raises(DataError, match="ml-100k.zip: MD5 .* does not match .*delete it to download it again"):
        dl.fetch("ml-100k", str(tmp_path / "cache3"))
    with pytest.raises(DataError, match="ml-100k.zip: not the expected archive .*expected a zip holding ml-100k/u.data"):
        dl.fetch("ml-100k", str(tmp_path / "cache3"), verify=False)
    with zipfile.ZipFile(tmp_path / "cache3" / "ml-100k.zip", "w") as z:
        z.writestr("other.txt", "x")
    with pytest.raises(DataError, match="not the expected archive \\(KeyError"):
        dl.fetch("ml-100k", str(tmp_path / "cache3"), verify=False)
    assert not (tmp_path / "cache3" / "ml-100k" / "u.data.part").exists()


def test_no_network_and_no_path_says_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setitem(dl.DATASETS, "ml-1m", ("http://127.0.0.1:9/ml-1m.zip", "0" * 32, "ml-1m/ratings.dat", "movielens"))
    with pytest.raises(DataError, match=r"could not download .*pass data.path="):
        SeqDataModule(name="ml-1m", cache_dir=str(tmp_path)).prepare_data()


def test_fraction_keeps_ceil_of_fraction_times_each_length():
    enc = encode({"u1": [f"i{j}" for j in range(100)], "u2": [f"i{j}" for j in range(50)]})
    for frac, want in ((0.07, [7, 4]), (0.14, [14, 7]), (0.28, [28, 14]), (0.5, [50, 25])):
        dm = SeqDataModule(name="synthetic", fraction=frac)
        assert dm._take_fraction(enc).lengths.tolist() == want, frac  # 100 * 0.07 is 7.000000000000001


@pytest.mark.parametrize("option,value", [("max_len", "abc"), ("batch_size", 0), ("min_user_interactions", "x"),
                                          ("fraction", "half"), ("num_workers", -1)])
def test_bad_data_option_values_name_the_option(option, value):
    with pytest.raises(ConfigError, match=f"data.{option}[=:]"):
        SeqDataModule(name="synthetic", **{option: value})


def test_evaluation_with_fewer_users_than_ranks_is_a_one_line_error(sasrec_file, monkeypatch):
    import lightning_rec.data.sampler as sampler

    dm = SeqDataModule(name="file", path=sasrec_file)
    dm.setup()
    monkeypatch.setattr(sampler, "_dist_info", lambda: (0, 64))  # 60 users, 64 ranks
    dm.train_dataloader()  # training pads the shard instead
    with pytest.raises(ConfigError, match="trainer.devices: evaluation has 60 users, fewer than the 64 ranks"):
        dm.val_dataloader()
    monkeypatch.setattr(sampler, "_dist_info", lambda: (0, 60))
    assert len(dm.val_dataloader().sampler) == 1


def test_synthetic_data_seed_can_be_fixed_apart_from_the_run_seed():
    def users(**kw):
        dm = SeqDataModule(name="synthetic", synthetic={"num_users": 50, "num_items": 30, **kw.pop("syn", {})}, **kw)
        dm.setup()
        return dm.id_maps(), [dm.train_set[i]["inputs"].tolist() for i in range(len(dm.train_set))]

    assert users(seed=1) != users(seed=2)  # null: the data follows the run's seed
    assert users(seed=1, syn={"seed": 7}) == users(seed=2, syn={"seed": 7}) == users(seed=7)
    with pytest.raises(ConfigError, match="data.synthetic.foo: no such option"):
        users(syn={"foo": 1})
