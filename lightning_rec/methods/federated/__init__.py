"""Federated training across simulated devices (issue #7): engine-independent pieces."""

from lightning_rec.methods.federated.core import (
           LabelLogitAccumulator,
           LabelLogits,
           label_logits,
           split_devices,
           split_holdout,
           teacher_from,
           teachers_for_devices,
)

__all__ = ["LabelLogitAccumulator", "LabelLogits", "label_logits", "split_devices", "split_holdout", "teacher_from",
           "teachers_for_devices"]
