"""Federated training: the engine-independent pieces (device split, per-label logits, teachers)."""

from lightning_rec.methods.federated.core import (
           LabelLogitAccumulator,
           LabelLogits,
           label_logits,
           split_devices,
           split_holdout,
           teacher_for,
           teacher_from,
)

__all__ = ["LabelLogitAccumulator", "LabelLogits", "label_logits", "split_devices", "split_holdout", "teacher_for",
           "teacher_from"]
