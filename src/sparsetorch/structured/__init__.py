"""Structured pruning: physically remove attention heads (GQA-aware), MLP channels and whole
decoder blocks, so that the model is smaller and faster on any hardware and still loads with
plain ``transformers``. See :func:`prune_structured`."""

from .arch import Decoder, decoder_of
from .prune import (
           ALLOCATIONS,
           KINDS,
           StructuredResult,
           check_arguments,
           parse_what,
           prune_structured,
)
from .scores import SCORES, BlockTensors

__all__ = ["ALLOCATIONS", "KINDS", "SCORES", "BlockTensors", "Decoder", "StructuredResult", "check_arguments",
           "decoder_of", "parse_what", "prune_structured"]
