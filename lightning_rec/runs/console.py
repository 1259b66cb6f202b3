"""What runs print: quieter Lightning output, metric tables."""

from __future__ import annotations

import logging
import warnings


def quiet() -> None:
    import pytorch_lightning  # noqa: F401  (its import installs warning filters; ours must come after)

    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*`isinstance\(treespec, LeafSpec\)`.*")
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    rank_zero.setLevel(logging.INFO)
    if not any(isinstance(f, _NoTips) for f in rank_zero.filters):
        rank_zero.addFilter(_NoTips())


class _NoTips(logging.Filter):
    """Lightning's adverts for its cloud services ("💡 Tip: ... try installing litlogger") on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def print_metrics(stage: str, metrics: dict[str, float], ckpt: str | None) -> None:
    keys = sorted(metrics, key=lambda k: (k.split("@")[0], int(k.split("@")[1]) if "@" in k else 0))
    lines = [f"{stage} metrics" + (f" ({ckpt})" if ckpt else "") + ":"]
    lines += [f"  {k:<22} {metrics[k]:.4f}" for k in keys]
    print("\n".join(lines), flush=True)
