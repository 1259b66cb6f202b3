"""Serving bundles: a folder that a service loads with numpy and onnxruntime only (or torch for ``pt2``).

``from lightning_rec.serving import Bundle; Bundle.load(path).recommend(history, k=10)``. A bundle is written
by ``python -m lightning_rec export ckpt=... format=onnx out=<folder>``
(:func:`lightning_rec.serving.write.write_bundle`, which needs torch); importing this package and loading
an ONNX bundle imports neither torch, pytorch_lightning nor hydra. ``python -m lightning_rec serve
bundle=<folder>`` answers HTTP requests from it (:mod:`lightning_rec.serving.http`, FastAPI + uvicorn).
"""

from lightning_rec.serving.bundle import FORMATS, Bundle, BundleError

__all__ = ["FORMATS", "Bundle", "BundleError"]
