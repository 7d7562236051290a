"""What the structure scores read from calibration data, in one forward pass per need.

* :func:`channel_stats`: per input feature of every ``o_proj`` (the concatenated head outputs)
  and every ``down_proj`` (the MLP's intermediate channels): token count, sum and sum of squares
  in float64. Mean, variance (FLAP's fluctuation) and the L2 norm over tokens (Wanda) follow.
* :func:`block_influence`: ShortGPT's Block Influence, ``1 - mean cos(x_in, x_out)`` over tokens,
  per block (a block that barely changes its input matters little).
* :func:`weight_grads`: the LM loss's gradient summed over the calibration batches, for the
  first-order Taylor score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..oneshot.blocks import block_output
from ..oneshot.calibration import forward_batches
from .arch import Decoder


@dataclass
class FeatureStats:
    """Running first and second moments of a layer's input features (float64)."""

    count: int
    total: Tensor
    squares: Tensor

    @classmethod
    def empty(cls, n: int) -> FeatureStats:
        return cls(0, torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64))

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double().cpu()
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.squares += (x * x).sum(0)

    @property
    def mean(self) -> Tensor:
        return self.total / max(self.count, 1)

    @property
    def variance(self) -> Tensor:
        """Population variance over tokens (clamped at 0 against round-off)."""
        return (self.squares / max(self.count, 1) - self.mean ** 2).clamp_min(0)

    @property
    def norm(self) -> Tensor:
        """L2 norm of each feature over all tokens (Wanda's ``||X_j||``)."""
        return self.squares.sqrt()


@torch.no_grad()
def channel_stats(dec: Decoder, batches: list[dict[str, Tensor]]) -> tuple[list[FeatureStats], list[FeatureStats]]:
    """``(attention, mlp)``: the :class:`FeatureStats` of every block's ``o_proj`` input and
    ``down_proj`` input over the calibration ``batches``."""
    attn = [FeatureStats.empty(dec.attn(i).o_proj.in_features) for i in range(len(dec.blocks))]
    mlp = [FeatureStats.empty(dec.mlp(i).down_proj.in_features) for i in range(len(dec.blocks))]
    hooks = []
    for i in range(len(dec.blocks)):
        hooks.append(dec.attn(i).o_proj.register_forward_pre_hook(lambda _m, a, s=attn[i]: s.add(a[0])))
        hooks.append(dec.mlp(i).down_proj.register_forward_pre_hook(lambda _m, a, s=mlp[i]: s.add(a[0])))
    forward_batches(dec.model, batches, hooks)
    return attn, mlp


@torch.no_grad()
def block_influence(dec: Decoder, batches: list[dict[str, Tensor]]) -> list[float]:
    """ShortGPT Block Influence of every block: ``1 - mean over tokens of cos(input, output)``."""
    sums = [0.0] * len(dec.blocks)
    counts = [0] * len(dec.blocks)
    hooks = []

    def make(i: int):  # noqa: ANN202
        def hook(_m: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = block_output(out)
            cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)
            sums[i] += float(cos.sum())
            counts[i] += cos.numel()
        return hook

    for i, block in enumerate(dec.blocks):
        hooks.append(block.register_forward_hook(make(i), with_kwargs=True))
    forward_batches(dec.model, batches, hooks)
    return [1.0 - s / max(c, 1) for s, c in zip(sums, counts)]


def weight_grads(dec: Decoder, batches: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The next-token loss's gradient w.r.t. every block weight, summed over ``batches``
    (parameter name -> float32 tensor). The model's own ``.grad`` fields are left as they were."""
    params = {n: p for n, p in dec.blocks.named_parameters() if p.ndim == 2}
    saved = {n: p.grad for n, p in dec.model.named_parameters()}
    flags = {n: p.requires_grad for n, p in dec.model.named_parameters()}
    wanted = {id(q) for q in params.values()}
    for p in dec.model.parameters():
        p.grad = None
        p.requires_grad_(id(p) in wanted)
    device = next(dec.model.parameters()).device
    was = dec.model.training
    dec.model.eval()  # no dropout: the score must not depend on a random draw
    grads = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    try:
        for b in batches:
            inputs = {k: v.to(device) for k, v in b.items()}
            loss = dec.model(**inputs, labels=inputs["input_ids"], use_cache=False).loss
            loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    grads[n] += p.grad.float()
                    p.grad = None
    finally:
        for n, p in dec.model.named_parameters():
            p.grad = saved[n]
            p.requires_grad_(flags[n])
        dec.model.train(was)
    return grads
