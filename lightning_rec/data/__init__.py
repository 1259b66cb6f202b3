"""Data loading, id remapping, leave-one-out splitting and batching."""

from lightning_rec.data.datamodule import EvalSet, SeqDataModule, TrainSet
from lightning_rec.data.encode import EncodedSequences, encode, kcore
from lightning_rec.data.readers import read_sequences
from lightning_rec.data.synthetic import make_synthetic

__all__ = ["SeqDataModule", "TrainSet", "EvalSet", "EncodedSequences", "encode", "kcore", "read_sequences", "make_synthetic"]
