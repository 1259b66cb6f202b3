"""Non-learned baselines evaluated with the same ranking code as the models."""

from __future__ import annotations

from lightning_rec.metrics import full_ranks, metrics_from_ranks


def popularity_metrics(dm, split: str = "test", ks: list[int] | None = None, exclude_seen: bool = True) -> dict[str, float]:
    """Rank every item by its training-set count for every user (MostPop), full ranking.

    Args:
        dm: a set-up :class:`~lightning_rec.data.SeqDataModule`.
        split: ``val`` or ``test``.
    """
    ks = ks or [5, 10, 20]
    dm.setup()
    pop = dm.popularity
    loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
    sums: dict[str, float] = {}
    n = 0
    for batch in loader:
        B = batch["target"].shape[0]
        scores = pop[None, :].expand(B, -1)
        seen = batch["seen"] if exclude_seen else None
        ranks = full_ranks(lambda a, b, s=scores: s[:, a:b], dm.num_items, batch["target"], seen)
        for k, v in metrics_from_ranks(ranks, ks).items():
            sums[k] = sums.get(k, 0.0) + float(v.sum())
        n += B
    return {f"{split}/{k}": v / n for k, v in sums.items()}


__all__ = ["popularity_metrics"]
