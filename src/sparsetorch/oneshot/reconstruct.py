"""Optional block-wise reconstruction: tune a pruned block's remaining weights, mask fixed.

After a block is pruned, a few Adam steps minimise the MSE between the pruned block's outputs
and the dense block's outputs on the same calibration inputs. Only the targeted weights are
trained; their gradients are masked and pruned entries re-zeroed after every step, so the mask
is unchanged (verified at the end). If the tuned block is worse than before on the calibration
batches, the weights are restored.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..errors import MaskError
from .blocks import BlockInputs, run_block


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
    steps: int = 30,
    lr: float = 1e-5,
) -> dict:
    """Tune ``layers`` ({name: (module, keep_mask in weight layout)}); returns a small report."""
    params = {n: m.weight for n, (m, _) in layers.items()}
    keeps = {n: k.to(params[n].device) for n, (_, k) in layers.items()}
    saved = {n: p.detach().clone() for n, p in params.items()}
    req = {n: p.requires_grad for n, p in params.items()}
    frozen = [
        p
        for p in block.parameters()
        if p.requires_grad and all(p is not q for q in params.values())
    ]
    for p in frozen:
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    check = list(range(min(2, len(inputs))))
    before = _loss(block, inputs, targets, check)
    opt = torch.optim.Adam(list(params.values()), lr=lr)
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
                for n, p in params.items():
                    p.copy_(saved[n])
    finally:
        for n, p in params.items():
            p.requires_grad_(req[n])
            p.grad = None
        for p in frozen:
            p.requires_grad_(True)
    with torch.no_grad():
        for n, p in params.items():
            if bool(((p != 0) & ~keeps[n]).any()):
                raise MaskError(f"{n}: reconstruction changed the mask")
    return {"mse_before": before, "mse_after": after, "kept": kept}
