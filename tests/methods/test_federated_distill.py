"""Federated distillation: the device loss by hand, and the server's rounds end to end without a transport.

The end-to-end test drives the ServerApp's work (:func:`~lightning_rec.methods.federated.federation.serve`:
round 0, :func:`~lightning_rec.methods.federated.flower.run_rounds`, the strategy) through an in-process
Grid that hands each message to the ClientApp's body (``flower._train``: the device's local training and
upload), so every production step runs except Flower's transport (covered by tests/methods/test_federated.py).
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_rec.config import load_config, to_plain
from lightning_rec.methods.federated import LabelLogits, teacher_from
from lightning_rec.methods.federated.device import Device

pytest.importorskip("flwr")


def _device(tmp_path, distill):
    plain = to_plain(load_config(["data.synthetic.num_users=40", "data.synthetic.num_items=30", "data.max_len=10",
                                  "model.d_model=8", "data.batch_size=16"]))
    model = {k: v for k, v in plain["model"].items() if k not in ("new_head", "match_item_ids")}
    return Device(0, np.arange(40), plain["data"], model, 1, str(tmp_path), distill=distill)


def test_device_loss_is_own_ce_plus_weighted_kl_and_l2_to_the_label_teacher(tmp_path):
    """The loss a device trains on, as the device builds it (Device._callbacks), against a hand computation:
    CE over the catalogue + weight x (sum over positions whose target has a teacher row of
    T^2 KL(softmax(z_t/T) || softmax(z_s/T)) + l2_weight x mean_M (z_s - z_t)^2) / all positions."""
    weight, T, l2 = 0.7, 2.0, 0.05
    dev = _device(tmp_path, {"weight": weight, "temperature": T, "l2_weight": l2})
    model = dev.build_model().eval()  # no dropout: the same hidden states twice
    batch = next(iter(dev.datamodule().train_dataloader()))
    mask = batch["targets"] != 0
    targets = batch["targets"][mask]
    labels = torch.unique(targets)[::2]  # about half the positions are covered
    g = torch.Generator().manual_seed(0)
    M = 5
    items = torch.stack([torch.randperm(30, generator=g)[:M] + 1 for _ in labels])
    values = torch.randn(len(labels), M, generator=g).sort(1, descending=True).values * 3
    teacher = LabelLogits(labels, items, values, torch.ones(len(labels), dtype=torch.long))
    (hint,) = dev._callbacks(teacher)
    hint.setup(None, model, "fit")
    got = model.train_loss(batch)

    with torch.no_grad():
        hidden = model(batch["inputs"])[mask]
        W = model.output_weight()
        own = F.cross_entropy(hidden @ W[1:].T, targets - 1)
        row_of = {int(lb): r for r, lb in enumerate(labels)}
        term, covered = 0.0, 0
        for h, t in zip(hidden, targets.tolist()):
            if t not in row_of:
                continue
            r = row_of[t]
            zs, zt = W[items[r]] @ h, values[r]
            pt = torch.softmax(zt / T, 0)
            term += T**2 * (pt * (torch.log(pt) - torch.log_softmax(zs / T, 0))).sum() + l2 * ((zs - zt) ** 2).mean()
            covered += 1
        want = own + weight * term / len(targets)
    assert 0 < covered < len(targets)
    torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=1e-5)
    hint.teardown(None, model, "fit")
    torch.testing.assert_close(model.train_loss(batch).detach(), own, atol=1e-5, rtol=1e-5)  # term removed


# ---------------------------------------------------------------------- end to end, in-process Grid
class InProcessGrid:
    """Flower's Grid for :func:`run_rounds`, in this process: node ``100 + d`` is device ``d``; a ``query``
    is answered with the device's id (as the ClientApp's ``identify``), a ``train`` message by the
    ClientApp's body. Records what each device received and sent."""

    def __init__(self, devices):
        self.devices = devices
        self.replies, self.received, self.sent = {}, {}, {}
        self._next = 0

    def get_node_ids(self):
        return [100 + d for d in self.devices]

    def push_messages(self, messages):
        from flwr.app import MetricRecord, RecordDict

        from lightning_rec.methods.federated import flower

        ids = []
        for msg in messages:
            md = msg.metadata
            dev = self.devices[md.dst_node_id - 100]
            if md.message_type == "query":
                content = RecordDict({"metrics": MetricRecord({"device": dev.id, "num_partitions": len(self.devices)})})
            else:
                rnd = int(md.group_id)
                self.received[rnd, dev.id] = flower.arrays_to_logits(flower.from_record(msg.content["arrays"]))
                content = flower._train(dev, msg.content, rnd, ())
                self.sent[rnd, dev.id] = flower.arrays_to_logits(flower.from_record(content["arrays"]))
            self._next += 1
            mid = f"m{self._next}"
            self.replies[mid] = SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid), content=content,
                                                has_error=lambda: False)
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in ids if i in self.replies]


def _two_worlds(path):
    """20 users of items a1..a10 only (short histories: device 0 under skew=length) and 20 users whose
    longer histories are mostly items b1..b10, with an a-item every third position (device 1)."""
    rng = np.random.default_rng(0)
    lines = []
    for u in range(20):
        lines += [f"s{u} a{i}" for i in rng.integers(1, 11, 6)]
    for u in range(20):
        seq = [f"a{rng.integers(1, 11)}" if j % 3 == 2 else f"b{rng.integers(1, 11)}" for j in range(15)]
        lines += [f"l{u} {x}" for x in seq]
    path.write_text("\n".join(lines) + "\n")


def _federate(tmp_path, monkeypatch, *overrides):
    from flwr.supercore.task_identity import TaskIdentity

    from lightning_rec.methods.federated.federation import make_plan, open_run, serve

    # what a ServerApp process has set when its main runs (a Message needs the run's id)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)

    data = tmp_path / "two_worlds.txt"
    _two_worlds(data)
    cfg = load_config(["data=file", f"data.path={data}", "data.format=sasrec", "data.max_len=15", "data.batch_size=8",
                       "model=sasrec", "model.d_model=16", "model.dropout=0.0", "optimizer.lr=0.01", "logger=csv",
                       "trainer.accelerator=cpu", f"runs_dir={tmp_path / 'runs'}", "federation.strategy=distill",
                       "federation.num_devices=2", "federation.skew=length", "federation.rounds=2",
                       "federation.local_epochs=3", "federation.top_m=20", *overrides])
    plan = make_plan(cfg)
    run_dir, _ = open_run(plan)
    devices = {d: plan.device(d, str(tmp_path / "devices")) for d in range(2)}
    grid = InProcessGrid(devices)
    result = serve(plan, grid, run_dir, None)
    item_ids = devices[0].datamodule().load().item_ids
    b_items = torch.tensor([i for i, name in enumerate(item_ids) if str(name).startswith("b")])
    return grid, result, b_items


def _b_share(upload: LabelLogits, b_items: torch.Tensor) -> float:
    """Softmax mass that a device's model puts on the b-items, averaged over its labels (upload: all items)."""
    p = torch.zeros(len(upload.labels), int(upload.items.max()) + 1)
    p.scatter_(1, upload.items, torch.softmax(upload.values, 1))
    return float(p[:, b_items].sum(1).mean())


def test_distillation_end_to_end_teaches_a_device_what_only_the_other_device_saw(tmp_path, monkeypatch):
    """Device 0 never sees a b-item; its own training drives their scores down. From round 2 its teacher,
    device 1's per-label logits (and never its own), ranks b-items high at device 0's labels, and the
    distillation term pulls device 0's model towards them: its b-mass grows from round 1 to round 2.
    Fails with the term off (federation.distill.weight=0: the b-mass falls) or with a teacher that
    includes the device itself."""
    grid, result, b_items = _federate(tmp_path, monkeypatch)  # distill's defaults: weight 1, T 1
    assert [h["round"] for h in result["history"]] == [0, 1, 2]
    assert grid.received[1, 0] is None and grid.received[1, 1] is None  # round 1: nobody has uploaded yet
    for d, other in ((0, 1), (1, 0)):  # round 2: exactly the other device's round-1 upload, averaged
        got, want = grid.received[2, d], teacher_from([grid.sent[1, other]], 20)
        for field in ("labels", "items", "values", "counts"):
            torch.testing.assert_close(getattr(got, field), getattr(want, field))
        with_self = teacher_from([grid.sent[1, other], grid.sent[1, d]], 20)  # what a leaky exclusion would send
        assert got.values.shape != with_self.values.shape or not torch.allclose(got.values, with_self.values)
    assert not set(grid.sent[1, 0].labels.tolist()) & set(b_items.tolist())  # device 0 has no b-label ...
    assert _b_share(grid.received[2, 0], b_items) > 0.5  # ... and its teacher favours b-items
    before, after = _b_share(grid.sent[1, 0], b_items), _b_share(grid.sent[2, 0], b_items)
    assert after > 1.5 * before, (before, after)  # measured: 0.14 -> 0.24 (weight 0: 0.14 -> 0.03)
