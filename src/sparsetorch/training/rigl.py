"""RigL (Evci et al., 2020): magnitude drop, dense-gradient growth (ALGORITHMS.md D.2).

The dense gradient ``dL/d(W*M)`` (non-zero at pruned positions) is kept only on update steps:
a gradient hook on every targeted weight copies the incoming gradient into a buffer when
:meth:`RigL.needs_dense_grad` is true, *before* ``MaskSet``'s hook masks ``.grad``. Other
steps pay one Python flag check per weight and nothing else. Gradient accumulation works:
every micro-batch of the update step adds to the buffer.

Difference from the TF reference: there the optimizer update is skipped on a mask-update step;
here the loop's ``optimizer.step()`` has already run, and the mask is updated right after it
with the gradient of the same batch (as in the common PyTorch ports).
"""

from __future__ import annotations

from torch import Tensor

from ..errors import MethodError
from ..masks import _is_sharded
from ._dst import DynamicSparsifier
from .base import register_method


@register_method("rigl")
class RigL(DynamicSparsifier):
    """Rigged Lottery: drop smallest |W|, grow largest |dense grad|, new weights zero, cosine-decayed fraction."""

    def __init__(self, sparsity: float = 0.9, **kw) -> None:  # noqa: ANN003 - see DynamicSparsifier
        super().__init__(sparsity, **kw)
        self._dense_grad: dict[str, Tensor] = {}
        self._capture = False

    def needs_dense_grad(self) -> bool:
        return self.is_update_step(self.step_count + 1)

    def _install_hooks(self) -> None:
        self._capture = self.needs_dense_grad()
        for name, p in self.params.items():
            if not p.requires_grad:
                continue

            def hook(grad: Tensor, _name: str = name) -> None:
                if self._capture:
                    buf = self._dense_grad.get(_name)
                    if buf is None:
                        self._dense_grad[_name] = grad.detach().clone()
                    else:
                        buf.add_(grad.detach())

            if _is_sharded(p):
                # FSDP2 assigns the reduce-scattered (already averaged) shard to .grad without
                # autograd accumulation, so a tensor hook never fires; this one runs before
                # MaskSet's (attach installs the method's hooks first) and sees it unmasked
                self._handles.append(p.register_post_accumulate_grad_hook(
                    lambda param, _name=name: hook(param.grad, _name) if param.grad is not None else None))
            else:
                self._handles.append(p.register_hook(hook))

    def grow_scores(self, name: str, param: Tensor) -> Tensor:
        g = self._dense_grad.get(name)
        if g is None:
            raise MethodError(
                f"rigl has no dense gradient for {name!r} at update step {self.step_count}: run "
                "loss.backward() and optimizer.step() before sparsifier.step() on every step."
            )
        return self.average(g).abs()  # under data parallel: the dense gradient of the global batch

    def step(self) -> bool:
        changed = super().step()
        self._dense_grad = {}
        self._capture = self.needs_dense_grad()
        return changed

    def _load_extra_state(self, extra) -> None:  # noqa: ANN001
        self._dense_grad = {}
        self._capture = self.needs_dense_grad()
