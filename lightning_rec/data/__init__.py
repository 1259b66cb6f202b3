"""Data loading, id remapping, leave-one-out splitting and batching."""

from .datamodule import EvalSet, SeqDataModule, TrainSet
from .encode import EncodedSequences, encode, kcore
from .readers import read_sequences
from .synthetic import make_synthetic

__all__ = ["SeqDataModule", "TrainSet", "EvalSet", "EncodedSequences", "encode", "kcore", "read_sequences", "make_synthetic"]
