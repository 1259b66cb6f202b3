"""Memory-bounded losses (model.loss_chunk_rows) and mixed in-batch + uniform negatives with logQ correction."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_rec import SeqRecModule
from lightning_rec.errors import ConfigError
from lightning_rec.losses import (
    LogitBuffer,
    chunked_ce,
    full_ce,
    mixed_candidates,
    mixed_softmax,
    popularity_log_q,
    sampled_softmax,
)
from lightning_rec.losses.distill import HintSpec, hint_kl, hint_mse, joint_losses

M, N, D = 37, 211, 8


def leaves(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(M, D, generator=g).requires_grad_()
    w = torch.randn(N + 1, D, generator=g).requires_grad_()
    t = torch.randint(1, N + 1, (M,), generator=g)
    t[:5] = t[5]  # repeated targets (in-batch duplicates)
    return h, w, t


def value_and_grads(fn, h, w):
    torch.manual_seed(3)  # the same negatives for both forms
    loss = fn()
    gh, gw = torch.autograd.grad(loss, [h, w])
    return loss.detach(), gh, gw


def counts():
    c = torch.zeros(N + 1)
    c[1:] = (500 / torch.arange(1, N + 1).float()).round()
    return c


KINDS = {
    "ce": lambda h, w, t, rows, buf: full_ce(h, w, t, rows, buf),
    "sampled_uniform": lambda h, w, t, rows, buf: sampled_softmax(h, w, t, 50, None, True, rows),
    "sampled_popularity": lambda h, w, t, rows, buf: sampled_softmax(h, w, t, 50, popularity_log_q(counts()), True, rows),
    "mixed": lambda h, w, t, rows, buf: mixed_softmax(h, w, t, 30, True, rows),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("rows", [1, 5, M, M + 9])
def test_chunked_losses_and_gradients_equal_the_unchunked_ones(kind, rows):
    h, w, t = leaves()
    fn = KINDS[kind]
    want = value_and_grads(lambda: fn(h, w, t, None, None), h, w)
    buf = LogitBuffer()
    for _ in range(2):  # the second step reuses the first one's buffer
        got = value_and_grads(lambda: fn(h, w, t, rows, buf), h, w)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_full_ce_reference_is_plain_cross_entropy_and_fused_form_ignores_padding_row():
    h, w, t = leaves()
    loss = full_ce(h, w, t, 4)
    torch.testing.assert_close(loss, F.cross_entropy(h @ w[1:].T, t - 1), rtol=1e-5, atol=1e-6)
    gw = torch.autograd.grad(loss, w)[0]
    assert gw[0].abs().sum() == 0  # padding is never a class
    # per-row values and a weighted backward (not only the mean)
    rows = chunked_ce(h, w[1:], t - 1, 6)
    torch.testing.assert_close(rows, F.cross_entropy(h @ w[1:].T, t - 1, reduction="none"), rtol=1e-5, atol=1e-6)
    g = torch.rand(M)
    a = torch.autograd.grad((rows * g).sum(), [h, w])
    b = torch.autograd.grad((F.cross_entropy(h @ w[1:].T, t - 1, reduction="none") * g).sum(), [h, w])
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["mse", "kl"])
@pytest.mark.parametrize("negatives", [None, torch.arange(1, 60, 3)])
def test_chunked_hint_and_kd_terms_equal_unchunked(kind, negatives):
    h, w, t = leaves()
    g = torch.Generator().manual_seed(1)
    ht, wt = torch.randn(M, D, generator=g).requires_grad_(), torch.randn(N + 1, D, generator=g).requires_grad_()
    fn = hint_mse if kind == "mse" else (lambda zs, zt, v: hint_kl(zs, zt, v, 4.0))
    spec = HintSpec(fn, 0.5, block=False)
    out = []
    for rows in (None, 7):
        parts = joint_losses(h, w, t, negatives, ht, wt, teacher_ce=True, hint=spec, chunk_rows=rows)
        total = parts["student_ce"] + parts["teacher_ce"] + parts["hint"]
        out.append([total.detach(), *torch.autograd.grad(total, [h, w, ht, wt])])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def saved_sizes(fn):
    """Sizes (numel) of every tensor the autograd graph of ``fn()`` keeps for its backward pass."""
    sizes = []

    def pack(x):
        sizes.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = fn()
    return loss, sizes


@pytest.mark.parametrize("kind", list(KINDS))
def test_chunked_graph_keeps_no_rows_x_candidates_tensor(kind):
    h, w, t = leaves()
    fn = KINDS[kind]
    big = M * 20  # every candidate set here has more than 20 items
    _, plain = saved_sizes(lambda: fn(h, w, t, None, None))
    assert max(plain) >= big  # the unchunked graph does keep an M x candidates tensor (the test can see one)
    loss, chunked = saved_sizes(lambda: fn(h, w, t, 4, LogitBuffer()))
    # only inputs-sized tensors (hidden M x d, the table (N + 1) x d, per-row vectors) are kept
    assert max(chunked) <= max(h.numel(), w.numel()), sorted(chunked)[-3:]
    loss.backward()


def test_the_buffer_is_reused_across_steps():
    h, w, t = leaves()
    buf = LogitBuffer()
    full_ce(h, w, t, 8, buf).backward()
    first = buf._t.data_ptr()
    full_ce(h, w, t, 8, buf).backward()
    assert buf._t.data_ptr() == first and buf._t.numel() == 8 * N


# ---------------------------------------------------------------------- mixed negatives
def test_mixed_candidates_are_batch_items_then_uniform_with_log_q_and_duplicates():
    torch.manual_seed(0)
    t = torch.tensor([4, 2, 4, 9])
    ids, lq, dup = mixed_candidates(t, 10, 200)
    assert ids[:3].tolist() == [2, 4, 9]
    torch.testing.assert_close(lq[:3], torch.tensor([1 / 4, 2 / 4, 1 / 4]).log())
    torch.testing.assert_close(lq[3:], torch.full((200,), -math.log(10)))
    uni = ids[3:].tolist()
    want = [u in (2, 4, 9) or u in uni[:i] for i, u in enumerate(uni)]
    assert dup[3:].tolist() == want and not dup[:3].any()


@pytest.mark.parametrize("correct", [True, False])
def test_mixed_softmax_against_a_hand_computation(correct):
    torch.manual_seed(1)
    h, w = torch.randn(4, 3), torch.randn(7, 3)  # 6 items
    t = torch.tensor([4, 2, 4, 5])
    torch.manual_seed(5)
    uni = torch.randint(1, 7, (3,)).tolist()
    torch.manual_seed(5)
    got = mixed_softmax(h, w, t, 3, correct)
    q_batch = {2: 1 / 4, 4: 2 / 4, 5: 1 / 4}  # in-batch sampling probability: count in the batch / 4
    want = []
    for i in range(4):
        ti = int(t[i])
        off = (lambda q: math.log(q)) if correct else (lambda q: 0.0)
        z = [float(h[i] @ w[ti]) - off(q_batch[ti])]
        kept = set()
        for j in sorted(q_batch):  # in-batch negatives: the other distinct targets
            kept.add(j)
            if j != ti:
                z.append(float(h[i] @ w[j]) - off(q_batch[j]))
        for j in uni:  # uniform negatives, log(1/N) corrected; the target and repeats masked
            if j != ti and j not in kept:
                z.append(float(h[i] @ w[j]) - off(1 / 6))
            kept.add(j)
        want.append(-F.log_softmax(torch.tensor(z), 0)[0])
    torch.testing.assert_close(got, torch.stack(want).mean(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- the module option
def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, N + 1, (6, 9), generator=g)
    x[:2, :3] = 0
    y = torch.roll(x, -1, 1)
    y[x == 0] = 0
    return {"inputs": x, "targets": y}


@pytest.mark.parametrize("loss,sampler", [("ce", "uniform"), ("sampled_softmax", "uniform"), ("sampled_softmax", "mixed")])
def test_module_loss_chunk_rows_gives_the_same_loss_and_gradients(loss, sampler):
    out = []
    for rows in (None, 5):
        torch.manual_seed(0)
        m = SeqRecModule(N, arch="sasrec", d_model=8, num_blocks=1, dropout=0.0, loss=loss, neg_sampler=sampler,
                         num_negatives=20, loss_chunk_rows=rows, max_len=9)
        torch.manual_seed(1)
        v = m.train_loss(batch())
        v.backward()
        out.append([v.detach()] + [p.grad.clone() for p in m.parameters() if p.grad is not None])
    assert len(out[0]) == len(out[1]) > 3
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "1024"])
def test_loss_chunk_rows_is_checked(bad):
    with pytest.raises(ConfigError, match="model.loss_chunk_rows=.*expected an integer >= 1 or null"):
        SeqRecModule(N, loss_chunk_rows=bad)


def test_mixed_sampler_is_accepted_and_distillation_refuses_it():
    from lightning_rec.methods.rocket import HintLossCallback

    m = SeqRecModule(N, loss="sampled_softmax", neg_sampler="mixed", d_model=8, num_blocks=1, max_len=9)
    assert m.negative_log_q() is None
    cb = HintLossCallback(teacher_ckpt="t.ckpt")
    with pytest.raises(ConfigError, match="model.neg_sampler=mixed: distillation"):
        cb.setup(None, m, "fit")


# ---------------------------------------------------------------------- 1M-item data, fast
def test_fast_synthetic_data_is_csr_zipf_and_planted_and_serves_batches():
    import numpy as np

    from lightning_rec.data import SeqDataModule
    from lightning_rec.data.synthetic import make_synthetic_encoded

    opts = {"num_users": 400, "num_items": 3000, "min_len": 5, "max_len": 30, "successors": 2, "p_follow": 0.8}
    d = make_synthetic_encoded(seed=3, **opts)
    again = make_synthetic_encoded(seed=3, **opts)
    assert np.array_equal(d.items, again.items) and np.array_equal(d.indptr, again.indptr)  # seeded
    assert d.num_users == 400 and d.num_items == 3000 and d.item_ids[:3] == ["<pad>", "1", "2"]
    assert d.lengths.min() >= 5 and d.lengths.max() <= 30 and d.items.min() >= 1 and d.items.max() <= 3000
    counts = np.sort(np.bincount(d.items, minlength=3001)[1:])[::-1]
    assert counts[:30].sum() > 5 * counts[-1500:].sum()  # Zipf: the head dwarfs the tail
    # planted transitions: a follow-up item is one of its predecessor's 2 successors most of the time
    pairs = {}
    for u in range(d.num_users):
        s = d.items[d.indptr[u]:d.indptr[u + 1]]
        for a, b in zip(s[:-1], s[1:]):
            pairs.setdefault(int(a), []).append(int(b))
    top2 = sum(sum(sorted(np.bincount(v), reverse=True)[:2]) for v in pairs.values() if len(v) >= 5)
    total = sum(len(v) for v in pairs.values() if len(v) >= 5)
    assert top2 / total > 0.7
    dm = SeqDataModule(name="synthetic", synthetic={"fast": True, "seed": 3, **opts}, max_len=10)
    dm.setup("fit")
    assert dm.num_items == 3000 and np.array_equal(dm.load().items, d.items)
    b = dm.test_set.__getitems__([0, 1, 2])
    assert b["seen"].shape[0] == 3 and b["inputs"].shape[1] <= 10
    with pytest.raises(ConfigError, match="data.synthetic.fast='yes': expected true or false"):
        SeqDataModule(name="synthetic", synthetic={"fast": "yes"}).load()


def test_the_module_releases_its_logit_buffer_after_training():
    m = SeqRecModule(N, d_model=8, num_blocks=1, max_len=9, loss_chunk_rows=4)
    m.train_loss(batch()).backward()
    assert m._logit_buffer._t is not None and m._logit_buffer._t.numel() == 4 * N
    m.on_train_end()
    assert m._logit_buffer._t is None
