"""Sampled-softmax negatives: the popularity sampler and its log q correction, against hand computations."""

import pytest
import torch
import torch.nn.functional as F

from lightning_rec import SeqRecModule
from lightning_rec.errors import ConfigError
from lightning_rec.losses import draw_negatives, full_ce, popularity_log_q, sampled_softmax


def skewed_counts(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(n + 1)
    counts[1:] = (1000 / torch.arange(1, n + 1).float() ** 1.2).round() * torch.rand(n, generator=g).add(0.5)
    return counts.round()


def test_popularity_log_q_is_count_plus_one_to_the_power():
    counts = torch.tensor([7.0, 3.0, 0.0, 1.0])  # row 0 (padding) is ignored whatever it holds
    for power in (1.0, 0.5):
        q = popularity_log_q(counts, power).exp()
        w = torch.tensor([0.0, 4.0**power, 1.0, 2.0**power])
        torch.testing.assert_close(q, w / w.sum())
        assert q[0] == 0 and abs(float(q.sum()) - 1) < 1e-6


def test_popularity_negatives_follow_q():
    counts = skewed_counts()
    log_q = popularity_log_q(counts)
    torch.manual_seed(0)
    negs = draw_negatives(40, 200_000, "cpu", log_q)
    assert int(negs.min()) >= 1 and int(negs.max()) <= 40  # never the padding id
    freq = torch.bincount(negs, minlength=41).float() / negs.numel()
    q = log_q.exp()
    # each frequency within 5 standard errors of its probability
    se = (q * (1 - q) / negs.numel()).sqrt()
    assert bool(((freq - q).abs() <= 5 * se + 1e-6).all())


@pytest.mark.parametrize("correct", [True, False])
def test_sampled_softmax_with_log_q_against_a_hand_computation(correct):
    torch.manual_seed(1)
    h, w = torch.randn(5, 8), torch.randn(41, 8)
    targets = torch.tensor([1, 2, 3, 1, 17])
    log_q = popularity_log_q(skewed_counts())
    torch.manual_seed(7)
    negs = draw_negatives(40, 12, "cpu", log_q)
    torch.manual_seed(7)
    got = sampled_softmax(h, w, targets, 12, log_q, correct)
    off = log_q if correct else torch.zeros_like(log_q)
    want = []
    for i in range(5):
        z = [float(h[i] @ w[targets[i]] - off[targets[i]])]
        z += [float(h[i] @ w[j] - off[j]) if j != targets[i] else float("-inf") for j in negs.tolist()]
        want.append(-F.log_softmax(torch.tensor(z), 0)[0])
    torch.testing.assert_close(got, torch.stack(want).mean(), rtol=1e-5, atol=1e-5)


def test_log_q_correction_makes_the_gradient_that_of_the_full_softmax():
    """Averaged over draws, the corrected loss's gradient points where the full CE's does; the
    uncorrected one (popularity negatives as hard negatives) is biased against popular items."""
    torch.manual_seed(2)
    n = 40
    h = torch.randn(16, 8)
    w = (torch.randn(n + 1, 8) * 0.5).requires_grad_(True)
    targets = torch.randint(1, n + 1, (16,))
    log_q = popularity_log_q(skewed_counts(n))

    def grad(loss_fn, draws):
        w.grad = None
        total = 0
        for _ in range(draws):
            total = total + loss_fn()
        (total / draws).backward()
        return w.grad[1:].flatten().clone()

    full = grad(lambda: full_ce(h, w, targets), 1)
    corrected = grad(lambda: sampled_softmax(h, w, targets, 200, log_q, True), 300)
    biased = grad(lambda: sampled_softmax(h, w, targets, 200, log_q, False), 300)
    cos_c = float(F.cosine_similarity(full, corrected, 0))
    cos_b = float(F.cosine_similarity(full, biased, 0))
    assert cos_c > 0.97 and cos_c > cos_b + 0.05, (cos_c, cos_b)


def test_popularity_sampler_options_are_checked():
    with pytest.raises(ConfigError, match="model.neg_sampler: unknown sampler 'zipf'"):
        SeqRecModule(num_items=10, loss="sampled_softmax", neg_sampler="zipf")
    with pytest.raises(ConfigError, match="model.num_negatives: expected a positive integer"):
        SeqRecModule(num_items=10, loss="sampled_softmax", num_negatives=0)
    m = SeqRecModule(num_items=10, loss="sampled_softmax", neg_sampler="popularity", num_negatives=4)
    with pytest.raises(ConfigError, match="needs item counts from a DataModule"):
        m.loss(torch.randn(3, 64), torch.tensor([1, 2, 3]))
    assert SeqRecModule(num_items=10, loss="sampled_softmax").negative_log_q() is None


def test_distillation_pieces_apply_the_same_log_q_correction():
    """joint_losses (Rocket, teacher distillation) and sampled_softmax share candidate_logits: with the
    same popularity negatives and log q, the student CE is the sampled-softmax loss."""
    from lightning_rec.losses.distill import joint_losses

    torch.manual_seed(3)
    h, w = torch.randn(6, 8), torch.randn(41, 8)
    targets = torch.tensor([1, 2, 5, 9, 1, 30])
    log_q = popularity_log_q(skewed_counts())
    torch.manual_seed(11)
    negs = draw_negatives(40, 16, "cpu", log_q)
    torch.manual_seed(11)
    want = sampled_softmax(h, w, targets, 16, log_q, True)
    got = joint_losses(h, w, targets, negs, log_q=log_q)["student_ce"]
    torch.testing.assert_close(got, want)
    uncorrected = joint_losses(h, w, targets, negs)["student_ce"]
    assert abs(float(uncorrected - want)) > 1e-3  # the correction changes the loss
