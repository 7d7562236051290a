"""Optional block-wise reconstruction: tune a pruned block's remaining weights, mask fixed.

After a block is pruned, a few Adam steps minimise the MSE between the pruned block's outputs
and a target. The default target is the *dense model's* output of that block (the dense block
run on the dense model's own hidden states), while the pruned block is fed the pruned model's
hidden states: the tuning then also corrects the error carried in from earlier blocks, not only
the block's own pruning error (``target="local"`` uses the dense block on the pruned inputs).

The pruned weights' gradients are masked and pruned entries re-zeroed after every step, so the
mask is unchanged (verified at the end). With ``train="all"`` the block's other floating-point
parameters (norm scales, biases, untargeted layers) are tuned too. If the tuned block is worse
than before on the calibration batches, every parameter is restored.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..errors import MaskError, MethodError
from .blocks import BlockInputs, run_block

TARGETS = ("dense", "local")
TRAIN = ("masked", "all")


def _loss(block: nn.Module, inputs: BlockInputs, targets: list[Tensor], idx: list[int]) -> float:
    with torch.no_grad():
        return sum(
            float(torch.nn.functional.mse_loss(run_block(block, inputs, b), targets[b]))
            for b in idx
        ) / len(idx)


def reconstruct_block(
    block: nn.Module,
    inputs: BlockInputs,
    targets: list[Tensor],
    layers: Mapping[str, tuple[nn.Module, Tensor]],
    *,
    steps: int = 16,
    lr: float = 3e-4,
    train: str = "masked",
) -> dict:
    """Tune ``layers`` ({name: (module, keep_mask in weight layout)}); returns a small report.

    ``steps`` Adam steps, one calibration batch each (cycling); ``train``: ``"masked"`` tunes only
    the pruned layers' kept weights, ``"all"`` also the block's other floating-point parameters.
    """
    if train not in TRAIN:
        raise MethodError(f"reconstruct_train must be one of {TRAIN}, got {train!r}.")
    params = {n: m.weight for n, (m, _) in layers.items()}
    keeps = {n: k.to(params[n].device) for n, (_, k) in layers.items()}
    others = [
        p
        for p in block.parameters()
        if p.is_floating_point() and all(p is not q for q in params.values())
    ]
    tuned = list(params.values()) + (others if train == "all" else [])
    saved = [p.detach().clone() for p in tuned]
    req = {id(p): p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    for p in tuned:
        p.requires_grad_(True)
    check = list(range(min(2, len(inputs))))
    before = _loss(block, inputs, targets, check)
    opt = torch.optim.Adam(tuned, lr=lr)
    try:
        with torch.enable_grad():
            for step in range(steps):
                b = step % len(inputs)
                opt.zero_grad(set_to_none=True)
                out = run_block(block, inputs, b)
                loss = torch.nn.functional.mse_loss(out, targets[b])
                loss.backward()
                with torch.no_grad():
                    for n, p in params.items():
                        if p.grad is not None:
                            p.grad.masked_fill_(~keeps[n], 0)
                opt.step()
                with torch.no_grad():
                    for n, p in params.items():
                        p.masked_fill_(~keeps[n], 0)
        after = _loss(block, inputs, targets, check)
        kept = after < before
        if not kept:
            with torch.no_grad():
                for p, s in zip(tuned, saved):
                    p.copy_(s)
    finally:
        for p in block.parameters():
            p.requires_grad_(req.get(id(p), True))
            p.grad = None
    with torch.no_grad():
        for n, p in params.items():
            if bool(((p != 0) & ~keeps[n]).any()):
                raise MaskError(f"{n}: reconstruction changed the mask")
    return {"mse_before": before, "mse_after": after, "kept": kept}
