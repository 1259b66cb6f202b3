"""Ranking metrics against a brute-force oracle on random scores."""

import math

import torch

from lightning_rec.metrics import full_ranks, metrics_from_ranks, sampled_ranks, topk_items


def oracle(scores, target, seen, ks):
    """Per row: sort every non-excluded item (python loop), rank = higher + half of other ties."""
    out = {f"{m}@{k}": [] for k in ks for m in ("hr", "ndcg", "mrr")}
    for b in range(scores.shape[0]):
        t = int(target[b])
        excluded = {int(s) for s in seen[b] if int(s) != 0 and int(s) != t} if seen is not None else set()
        ts = float(scores[b, t])
        higher = ties = 0
        for i in range(1, scores.shape[1]):
            if i == t or i in excluded:
                continue
            v = float(scores[b, i])
            higher += v > ts
            ties += v == ts
        r = higher + 0.5 * ties
        for k in ks:
            out[f"hr@{k}"].append(1.0 if r < k else 0.0)
            out[f"ndcg@{k}"].append(1 / math.log2(r + 2) if r < k else 0.0)
            out[f"mrr@{k}"].append(1 / (r + 1) if r < k else 0.0)
    return {k: torch.tensor(v) for k, v in out.items()}


def check(scores, target, seen, chunk, ks=(1, 5, 10, 20)):
    ranks = full_ranks(lambda c0, c1: scores[:, c0:c1], scores.shape[1] - 1, target, seen, chunk)
    got = metrics_from_ranks(ranks, list(ks))
    want = oracle(scores, target, seen, ks)
    for k in want:
        torch.testing.assert_close(got[k], want[k].float(), msg=k)


def test_full_ranking_matches_oracle_random_scores_all_chunk_sizes():
    g = torch.Generator().manual_seed(0)
    B, N = 40, 97
    scores = torch.randn(B, N + 1, generator=g)
    target = torch.randint(1, N + 1, (B,), generator=g)
    seen = torch.randint(0, N + 1, (B, 15), generator=g)
    seen[:5, 0] = target[:5]  # a target that is also in the history is still ranked
    for chunk in (1, 7, 32, 97, 1000):
        check(scores, target, seen, chunk)
        check(scores, target, None, chunk)


def test_ties_count_half_and_constant_model_is_chance_level():
    B, N = 3, 10
    scores = torch.zeros(B, N + 1)  # every item tied
    target = torch.tensor([1, 5, 10])
    ranks = full_ranks(lambda c0, c1: scores[:, c0:c1], N, target, None, 4)
    assert ranks.tolist() == [4.5, 4.5, 4.5]  # 9 other items, half of them counted above
    scores = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.5]])  # target item 1 tied with items 2 and 3
    r = full_ranks(lambda c0, c1: scores[:, c0:c1], 4, torch.tensor([1]), None, 2)
    assert r.tolist() == [1.0]
    check(torch.randint(0, 3, (30, 51)).float(), torch.randint(1, 51, (30,)), torch.randint(0, 51, (30, 6)), 8)


def test_excluding_seen_items_raises_metrics():
    scores = torch.tensor([[0.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    target = torch.tensor([4])  # 3 items score higher
    seen = torch.tensor([[1, 2, 0]])
    assert full_ranks(lambda a, b: scores[:, a:b], 5, target, None).item() == 3
    assert full_ranks(lambda a, b: scores[:, a:b], 5, target, seen).item() == 1


def test_metric_formulas_on_hand_ranks():
    m = metrics_from_ranks(torch.tensor([0.0, 4.0, 9.0, 10.0]), [10])
    assert m["hr@10"].tolist() == [1, 1, 1, 0]
    torch.testing.assert_close(m["ndcg@10"], torch.tensor([1.0, 1 / math.log2(6), 1 / math.log2(11), 0.0]))
    torch.testing.assert_close(m["mrr@10"], torch.tensor([1.0, 0.2, 0.1, 0.0]))


def test_sampled_ranks():
    r = sampled_ranks(torch.tensor([1.0, 0.0]), torch.tensor([[2.0, 0.5, 1.0], [-1.0, -2.0, -3.0]]))
    assert r.tolist() == [1.5, 0.0]


def test_topk_chunked_equals_sort_and_excludes_seen():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(6, 51, generator=g)
    seen = torch.randint(0, 51, (6, 8), generator=g)
    for chunk in (5, 50, 100):
        items, vals = topk_items(lambda a, b: scores[:, a:b], 50, 7, seen, chunk)
        for b in range(6):
            masked = scores[b].clone()
            masked[0] = -float("inf")
            masked[seen[b][seen[b] > 0]] = -float("inf")
            want = masked.topk(7).indices
            assert items[b].tolist() == want.tolist()
            assert not set(items[b].tolist()) & set(seen[b][seen[b] > 0].tolist())


def test_nan_scores_never_look_good():
    scores = torch.full((2, 6), float("nan"))
    target = torch.tensor([1, 3])
    r = full_ranks(lambda a, b: scores[:, a:b], 5, target, None, 2)
    assert r.tolist() == [5.0, 5.0]
    assert metrics_from_ranks(r, [5])["ndcg@5"].tolist() == [0.0, 0.0]
    part = torch.tensor([[0.0, 1.0, float("nan"), 0.5, 0.2, 0.1]])  # one NaN candidate counts as higher
    assert full_ranks(lambda a, b: part[:, a:b], 5, torch.tensor([1]), None).item() == 1.0
    assert sampled_ranks(torch.tensor([float("nan")]), torch.zeros(1, 4)).tolist() == [4.0]


def test_excluded_items_are_never_ties_even_for_a_minus_inf_target():
    scores = torch.tensor([[0.0, float("-inf"), float("-inf"), float("-inf"), 1.0]])
    # Target 1 scores -inf; items 2 and 3 are excluded; item 4 is higher. Brute force: rank 1.
    r = full_ranks(lambda a, b: scores[:, a:b], 4, torch.tensor([1]), torch.tensor([[2, 3]]), 2)
    assert r.tolist() == [1.0]
    # Not excluded, items 2 and 3 are real ties: 1 higher + 0.5 * 2 tied.
    r = full_ranks(lambda a, b: scores[:, a:b], 4, torch.tensor([1]), None, 3)
    assert r.tolist() == [2.0]


def test_topk_never_fills_a_short_row_with_seen_items():
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    items, vals = topk_items(lambda a, b: scores[:, a:b], 4, 3, torch.tensor([[2, 3, 4]]), 2)
    assert items.tolist() == [[1, 0, 0]]  # one unseen item; 0 (padding) marks the empty slots
    assert vals[0, 0].item() == 1.0 and torch.isneginf(vals[0, 1:]).all()


def test_sampled_protocol_keeps_exact_ties():
    from lightning_rec import SeqRecModule

    m = SeqRecModule(num_items=30, arch="sasrec", num_blocks=1, d_model=8, max_len=6, dropout=0.0,
                     eval_protocol="sampled").eval()
    with torch.no_grad():
        w = m.output_weight()
        w.copy_(torch.randn(1, 8).expand_as(w))  # every item scores the same for any user
    g = torch.Generator().manual_seed(0)
    batch = {"inputs": torch.randint(1, 31, (64, 6), generator=g), "target": torch.randint(1, 31, (64,), generator=g),
             "negatives": torch.randint(1, 31, (64, 100), generator=g)}
    with torch.no_grad():
        ranks = m._ranks(batch)
    assert ranks.tolist() == [50.0] * 64  # all 100 negatives tied with the target: half of them above
