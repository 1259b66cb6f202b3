"""LightningModules: :class:`SeqRecModule` (NextItNet or SASRec) and the weight transfer of ``init_from``."""

from lightning_rec.modules.seqrec import SeqRecModule, build_optimizer, check_training_options

__all__ = ["SeqRecModule", "build_optimizer", "check_training_options"]
