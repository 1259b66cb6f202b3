"""Engine-independent federation pieces: device split, per-label logits, teachers."""

import numpy as np
import pytest
import torch

from lightning_rec.errors import ConfigError
from lightning_rec.methods.federated import (
    LabelLogitAccumulator,
    label_logits,
    split_devices,
    split_holdout,
    teacher_for,
    teacher_from,
)


@pytest.mark.parametrize("skew", ["none", "length", "size"])
def test_every_user_on_exactly_one_device_deterministically(skew):
    lengths = np.random.default_rng(0).integers(3, 50, size=103)
    parts = split_devices(103, 5, seed=7, skew=skew, alpha=0.5, lengths=lengths)
    assert len(parts) == 5 and all(len(p) >= 1 for p in parts)
    assert sorted(np.concatenate(parts).tolist()) == list(range(103))
    again = split_devices(103, 5, seed=7, skew=skew, alpha=0.5, lengths=lengths)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = split_devices(103, 5, seed=8, skew=skew, alpha=0.5, lengths=lengths)
    assert skew == "length" or any(not np.array_equal(a, b) for a, b in zip(parts, other))
    if skew == "none":
        assert {len(p) for p in parts} <= {20, 21}
    if skew == "length":  # devices ordered by history length: no overlap of the ranges
        for a, b in zip(parts, parts[1:]):
            assert lengths[a].max() <= lengths[b].min()


def test_split_errors_name_the_option():
    with pytest.raises(ConfigError, match="federation.skew=odd"):
        split_devices(10, 2, skew="odd")
    with pytest.raises(ConfigError, match="federation.num_devices=11"):
        split_devices(10, 11)


def test_per_label_means_against_a_hand_example():
    # 4 rows over items 1..3 (columns 0..2); labels 2, 2, 3, 2
    logits = torch.tensor([[1.0, 4.0, 0.0], [3.0, 2.0, 0.0], [0.0, 0.0, 9.0], [2.0, 0.0, 3.0]])
    labels = torch.tensor([2, 2, 3, 2])
    up = label_logits(logits, labels, top_m=2)
    assert up.labels.tolist() == [2, 3] and up.counts.tolist() == [3, 1]
    # label 2: mean of rows 0, 1, 3 = [2, 2, 1] -> top-2: items 1 and 2 (value 2 each)
    assert sorted(up.items[0].tolist()) == [1, 2] and up.values[0].tolist() == [2.0, 2.0]
    # label 3: row 2 = [0, 0, 9] -> item 3 first
    assert up.items[1, 0] == 3 and up.values[1, 0] == 9.0
    acc = LabelLogitAccumulator(3)
    acc.add(logits[:2], labels[:2])
    acc.add(logits[2:], labels[2:])
    streamed = acc.result(top_m=2)
    assert streamed.labels.tolist() == [2, 3] and streamed.counts.tolist() == [3, 1]
    torch.testing.assert_close(streamed.values, up.values)


def test_teacher_of_a_device_is_the_mean_of_the_others_never_itself():
    a = label_logits(torch.tensor([[1.0, 5.0, 3.0]]), torch.tensor([2]), top_m=3)
    b = label_logits(torch.tensor([[3.0, 1.0, 1.0]]), torch.tensor([2]), top_m=3)
    c = label_logits(torch.tensor([[100.0, 0.0, 0.0]]), torch.tensor([1]), top_m=3)
    uploads = {0: a, 1: b, 2: c}
    teachers = [teacher_for(uploads, d, top_m=3) for d in range(3)]
    assert teacher_for({0: a}, 0, top_m=3) is None  # nobody else has uploaded yet
    # device a: only b saw label 2 -> b's logits; label 1 from c
    ta = dict(zip(teachers[0].labels.tolist(), range(2)))
    assert set(ta) == {1, 2}
    row = ta[2]
    got = dict(zip(teachers[0].items[row].tolist(), teachers[0].values[row].tolist()))
    assert got == {1: 3.0, 2: 1.0, 3: 1.0}
    # device c: label 2 is the mean of a and b = [2, 3, 2]; c's own label 1 is absent (nobody else saw it)
    tc = teachers[2]
    assert tc.labels.tolist() == [2]
    got = dict(zip(tc.items[0].tolist(), tc.values[0].tolist()))
    assert got == {1: 2.0, 2: 3.0, 3: 2.0}
    assert tc.counts.tolist() == [2]


def test_entries_below_a_devices_top_m_count_as_its_floor():
    a = label_logits(torch.tensor([[5.0, 4.0, 0.0, -1.0]]), torch.tensor([1]), top_m=2)  # sends items 1, 2
    b = label_logits(torch.tensor([[0.0, 1.0, 6.0, -2.0]]), torch.tensor([1]), top_m=2)  # sends items 3, 2
    t = teacher_from([a, b], top_m=3)
    got = dict(zip(t.items[0].tolist(), t.values[0].tolist()))
    # item 1: a 5, b floor 1 -> 3; item 2: (4 + 1) / 2; item 3: a floor 4, b 6 -> 5
    assert got == pytest.approx({1: 3.0, 2: 2.5, 3: 5.0})
    assert a.nbytes() == 8 + 2 * 8 + 2 * 4 + 8  # label, 2 item ids, 2 values, count


def test_held_out_users_are_on_no_device_and_drawn_by_seed():
    kept, out = split_holdout(200, 0.1, seed=3)
    assert len(out) == 20 and len(kept) == 180
    assert not set(kept) & set(out) and sorted([*kept, *out]) == list(range(200))
    assert np.array_equal(split_holdout(200, 0.1, seed=3)[1], out)
    assert not np.array_equal(split_holdout(200, 0.1, seed=4)[1], out)
    kept0, out0 = split_holdout(50, 0.0)
    assert len(out0) == 0 and len(kept0) == 50
    with pytest.raises(ConfigError, match="holdout_users=1.0: expected a fraction in"):
        split_holdout(10, 1.0)


def test_weight_averaging_in_federated_local_training_is_refused():
    from lightning_rec.methods.federated.device import check_local_callbacks

    with pytest.raises(ConfigError, match="federation.callbacks.ema: weight averaging"):
        check_local_callbacks({"ema": {"_target_": "lightning_rec.methods.ema.EMACallback"}})
    check_local_callbacks({"ema": None, "switch": {"_target_": "lightning_rec.methods.optim_switch.OptimizerSwitchCallback"}})
