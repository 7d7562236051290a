"""Fast sparse inference: ``SparseLinear``, per-layer kernel selection and a speedup planner.

    >>> report = sparsetorch.sparsify_for_inference(model, batch_size=1)   # in place
    >>> print(sparsetorch.inference.plan(model, batch_size=1))             # what to expect
    >>> out = sparsetorch.inference.generate(model, ids, 32, dtype="fp16")  # compiled decode path
    >>> engine = sparsetorch.inference.DecodeEngine.from_checkpoint("export-dir", "int8")  # stored parts as they are

On CPU the kernels are compiled on first use (a C++ compiler is needed; without one,
dense and scipy kernels are used and a warning says so). On CUDA, 2:4-sparse fp16/bf16
weights can use ``torch.sparse.to_sparse_semi_structured``.
"""

from __future__ import annotations

from .decode import DecodeEngine, DecodeStats, EngineLM, decode_support, generate
from .kernels import KERNELS, Kernel, auto_candidates, get_kernel
from .linear import SparseLinear
from .lowbit import LowbitWeight, lowbit_matmul, pack_lowbit, unpack_lowbit
from .plan import (
    DecodeEstimate,
    PlanReport,
    decode_bytes_per_token,
    decode_estimates,
    plan,
    predict_decode_tokens_per_s,
)
from .select import Selection, Timer, mean_timer, median_timer, select_kernel
from .sparsify import LayerChoice, SparsifyReport, eligible_linears, sparsify_for_inference

__all__ = [
    "SparseLinear",
    "sparsify_for_inference",
    "SparsifyReport",
    "LayerChoice",
    "plan",
    "PlanReport",
    "DecodeEstimate",
    "decode_estimates",
    "decode_bytes_per_token",
    "predict_decode_tokens_per_s",
    "select_kernel",
    "Selection",
    "Timer",
    "mean_timer",
    "median_timer",
    "Kernel",
    "KERNELS",
    "get_kernel",
    "auto_candidates",
    "eligible_linears",
    "generate",
    "DecodeEngine",
    "DecodeStats",
    "EngineLM",
    "decode_support",
    "LowbitWeight",
    "pack_lowbit",
    "unpack_lowbit",
    "lowbit_matmul",
]
