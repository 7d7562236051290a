"""``SparseLinear``: an inference-only ``nn.Linear`` whose weight is stored in a sparse format."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ModelError
from .kernels import Packed, get_kernel
from .select import Selection, Timer, select_kernel

__all__ = ["SparseLinear"]

_PREFIX = "packed_"


class SparseLinear(nn.Module):
    """Drop-in, inference-only replacement of ``nn.Linear`` backed by a sparse kernel.

    The weight lives in the format of ``kernel`` (see :mod:`sparsetorch.inference.kernels`)
    as buffers named ``packed_<part>``; ``bias`` is a buffer. Inputs may have any leading
    shape ``[..., in_features]``. Gradients are not supported: call it under
    ``torch.no_grad()`` / ``torch.inference_mode()`` (an input that requires grad raises).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel: str,
        packed: Packed,
        bias: Tensor | None = None,
        selection: Selection | None = None,
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.kernel = get_kernel(kernel).name
        self._parts: list[str] = []
        for key, t in packed.items():
            if isinstance(t, Tensor):
                self.register_buffer(_PREFIX + key, t)
                self._parts.append(key)
        self.register_buffer("bias", None if bias is None else bias.detach().contiguous())
        #: the measurement that chose the kernel (None when the kernel was forced)
        self.selection = selection
        self._cache: dict[str, Any] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        kernel: str = "auto",
        batch_size: int = 1,
        *,
        candidates: list[str] | None = None,
        timer: Timer | None = None,
    ) -> SparseLinear:
        """Build from an ``nn.Linear``; ``kernel="auto"`` measures candidates at ``batch_size``.

        With ``"auto"`` the result may use the ``dense`` kernel when no sparse kernel is faster
        (``sparsify_for_inference`` then keeps the original layer instead).
        """
        if not isinstance(linear, nn.Linear):
            raise ModelError(f"SparseLinear.from_linear needs an nn.Linear, got {type(linear).__name__}.")
        w = linear.weight.detach()
        b = None if linear.bias is None else linear.bias.detach()
        if kernel == "auto":
            sel = select_kernel(w, b, batch_size, candidates, timer)
            return cls(linear.in_features, linear.out_features, sel.kernel, sel.packed, b, sel)
        k = get_kernel(kernel)
        if not k.available():
            raise ModelError(f"inference kernel {kernel!r} is not available here; use kernel='auto'.")
        reason = k.supports(w)
        if reason is not None:
            raise ModelError(f"inference kernel {kernel!r} cannot hold this weight: {reason}.")
        with torch.no_grad():
            packed = k.pack(w)
        return cls(linear.in_features, linear.out_features, k.name, packed, b)

    # ------------------------------------------------------------------ use
    def _packed(self) -> dict[str, Any]:
        if self._cache is None:
            self._cache = {k: getattr(self, _PREFIX + k) for k in self._parts}
        return self._cache

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> SparseLinear:  # .to(), .cuda() ...
        self._cache = None
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        """``x @ W.T + bias`` for ``x`` of shape ``[..., in_features]``."""
        k = get_kernel(self.kernel)
        if k.sparse and x.requires_grad and torch.is_grad_enabled():
            raise ModelError(
                "SparseLinear is inference-only (no gradients); run the model under "
                "torch.no_grad() or torch.inference_mode()."
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if k.sparse:
            x2 = x2.contiguous()
        y = k.matmul(x2, self._packed(), self.bias, self.out_features)
        # contiguous, like nn.Linear's output: some kernels compute W @ x.T and return its
        # transposed view, and downstream ops then take slow paths (measured on an H200: with
        # strided q/k/v, attention fell back from cuDNN fp16 to the fp32 math kernel, 2.5x slower)
        return y.contiguous().reshape(*lead, self.out_features)

    def to_dense_weight(self) -> Tensor:
        """The dense ``[out, in]`` weight (reconstructed by multiplying the identity)."""
        eye = torch.eye(self.in_features, dtype=self.bias.dtype if self.bias is not None else torch.float32)
        with torch.no_grad():
            # the weight alone: an activation threshold fused into the kernel must not mask the identity
            weight_only = {k: v for k, v in self._packed().items() if k not in ("threshold", "scale")}
            y = get_kernel(self.kernel).matmul(eye.contiguous(), weight_only, None, self.out_features)
        return y.t().contiguous()

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight (bias excluded)."""
        return get_kernel(self.kernel).nbytes(self._packed())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, kernel={self.kernel}"
