"""An HTTP endpoint for a bundle (FastAPI; served by uvicorn in ``python -m lightning_rec serve``).

- ``GET /health``: ``{"status": "ok", "format", "arch", "num_items", "max_len", "index", ...}``
- ``POST /recommend``: ``{"history": [original item ids, oldest first], "k": 10, "exclude_seen": null}``
  -> ``{"items": [...], "scores": [...], "skipped": n}``
- ``POST /recommend/batch``: ``{"histories": [[...], ...], "k": 10}`` -> ``{"results": [...]}``

A bad request (no known item, k out of range, too many histories) is answered 400 with a one-line
``detail``; a malformed body 422 (FastAPI's validation).
"""

from __future__ import annotations

from typing import Union

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from lightning_rec.serving.bundle import Bundle, BundleError

ItemId = Union[int, str]


class Query(BaseModel):
    history: list[ItemId] = Field(description="original item ids, oldest first")
    k: int = 10
    exclude_seen: bool | None = None


class BatchQuery(BaseModel):
    histories: list[list[ItemId]]
    k: int = 10
    exclude_seen: bool | None = None


class Recommendation(BaseModel):
    items: list[ItemId]
    scores: list[float]
    skipped: int


class BatchRecommendation(BaseModel):
    results: list[Recommendation]


def create_app(bundle: Bundle, max_k: int = 1000, max_batch: int = 1024) -> FastAPI:
    """The FastAPI application answering from ``bundle``; ``k`` above ``max_k`` and batches above
    ``max_batch`` histories are refused (400)."""
    app = FastAPI(title="lightning_rec bundle", description=f"recommendations from {bundle.path}")

    def check(k: int, n: int = 1) -> None:
        if k > max_k:
            raise HTTPException(400, f"k={k}: this server answers k up to {max_k} (serve max_k=)")
        if n > max_batch:
            raise HTTPException(400, f"histories: {n} in one request; this server takes up to {max_batch} (serve max_batch=)")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", **bundle.describe()}

    @app.post("/recommend", response_model=Recommendation)
    def recommend(q: Query) -> dict:
        check(q.k)
        try:
            return bundle.recommend(q.history, q.k, q.exclude_seen)
        except BundleError as e:
            raise HTTPException(400, str(e).replace("history 0: ", "history: ")) from None

    @app.post("/recommend/batch", response_model=BatchRecommendation)
    def recommend_batch(q: BatchQuery) -> dict:
        check(q.k, len(q.histories))
        try:
            return {"results": bundle.recommend_batch(q.histories, q.k, q.exclude_seen)}
        except BundleError as e:
            raise HTTPException(400, str(e)) from None

    return app
