"""``serve``: answer recommendation requests over HTTP from a bundle: ``serve bundle=<folder> port=8000``."""

from __future__ import annotations

import os

from omegaconf import DictConfig

from lightning_rec.cli._checks import positive_int
from lightning_rec.errors import ConfigError

SERVE_ALIASES = ("bundle", "host", "port", "use_index", "max_k", "max_batch")
LOCAL = ("127.0.0.1", "localhost", "::1")


def rewrite(overrides: list[str]) -> list[str]:
    """``serve bundle=... port=...`` is short for ``serve.bundle=... serve.port=...``; ``serve threads=N``
    sets the encoder's threads (not torch's)."""
    out = []
    for o in overrides:
        key = o.split("=", 1)[0]
        out.append(f"serve.{o}" if key in (*SERVE_ALIASES, "threads") else o)
    return out


def serve(cfg: DictConfig, overrides: list[str]) -> None:
    """Load the bundle, then serve it with uvicorn until interrupted (Ctrl-C)."""
    sc = cfg.serve
    if not sc.bundle:
        raise ConfigError("serve: needs bundle=<folder written by `export format=onnx out=<folder>`>")
    if not os.path.isdir(sc.bundle):
        raise ConfigError(f"bundle={sc.bundle}: not a folder; expected a bundle written by `export format=onnx out=...`")
    port = sc.port
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"port={port!r}: expected a TCP port 0..65535")
    if not isinstance(sc.use_index, bool):
        raise ConfigError(f"use_index={sc.use_index!r}: expected true or false")
    threads = None if sc.threads is None else positive_int(sc.threads, "threads")
    max_k, max_batch = positive_int(sc.max_k, "max_k"), positive_int(sc.max_batch, "max_batch")
    try:
        import uvicorn

        from lightning_rec.serving.http import create_app
    except ImportError as e:
        raise ConfigError(f"serve: needs FastAPI and uvicorn ({e.name} is not installed); "
                          f"pip install 'lightning_rec[serve]'") from None
    from lightning_rec.serving import Bundle

    bundle = Bundle.load(str(sc.bundle), use_index=sc.use_index, threads=threads)
    index = (bundle.manifest.get("index") or {}).get("type") if bundle.index is not None else None
    host = str(sc.host)
    if host not in LOCAL:
        print(f"note: host={host} listens beyond this machine (every interface for 0.0.0.0); the endpoint has no "
              f"authentication", flush=True)
    print(f"serving {sc.bundle} ({bundle.manifest['arch']}, {bundle.num_items:,} items, "
          f"{'index ' + index if index else 'exact scoring'}) on http://{host}:{port}  "
          f"(POST /recommend, POST /recommend/batch, GET /health; Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(bundle, max_k=max_k, max_batch=max_batch), host=host, port=port, log_level="warning")
