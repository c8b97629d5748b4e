"""Splice a trained layer into a language model in place of an MLP, and measure next-token cross-entropy:
mxd_fast.train.evaluate under its earlier name (transformers is not imported)."""
from .train.evaluate import SplicedMLP, ZeroMLP, cross_entropy, evaluate, splice_layer, spliced

__all__ = ["SplicedMLP", "ZeroMLP", "cross_entropy", "evaluate", "splice_layer", "spliced"]
