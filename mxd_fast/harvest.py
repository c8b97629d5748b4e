"""Activation harvesting, text loading and the shuffling buffer: mxd_fast.train.data under its earlier name
(transformers is imported only when a model is loaded)."""
from .train.data import (DEFAULT_CORPUS_GLOBS, EMBEDDED_PACKAGE, TEXT_SUFFIXES, ActivationBuffer, Harvester,
                         ModelUnavailableError, TokenStream, check_input_ids, default_corpus, embedded_model_path,
                         find_mlp, held_out_contexts, load_model, map_activation, max_positions, model_dims,
                         model_source, num_layers, read_documents, split_documents)

__all__ = ["DEFAULT_CORPUS_GLOBS", "EMBEDDED_PACKAGE", "TEXT_SUFFIXES", "ActivationBuffer", "Harvester",
           "ModelUnavailableError", "TokenStream", "check_input_ids", "default_corpus", "embedded_model_path",
           "find_mlp", "held_out_contexts", "load_model", "map_activation", "max_positions", "model_dims",
           "model_source", "num_layers", "read_documents", "split_documents"]
