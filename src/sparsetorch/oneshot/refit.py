"""Mask-fixed weight refit: the kept weights that best reproduce a layer's dense output.

For a fixed keep-mask ``M`` and input second moment ``H = XXᵀ/n`` (dampened), each output row
``r`` solves ``min_w' (w' − w_r) H (w' − w_r)ᵀ`` with ``w'`` zero outside ``M_r``: the least-squares
reconstruction ``‖(W' − W) X‖²`` of the dense layer. SparseGPT's column-by-column OBS updates only
let a weight compensate for pruned weights to its left; this solve lets every kept weight
compensate for every pruned one (the weight-update step of Boža, "Fast and effective weight update
for pruned LLMs", TMLR 2024, solved here with conjugate gradients instead of ADMM).

All rows are solved at once by preconditioned conjugate gradients (Jacobi preconditioner), one
``[rows, in] @ [in, in]`` product per iteration, started from the given pruned weights. Rows whose
objective would end higher than at the start keep their starting weights, so the result is never
worse than the input on the calibration statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor


def row_objective(delta: Tensor, H: Tensor) -> Tensor:
    """Per-row ``δ H δᵀ`` for ``δ = W' − W`` (the layer's output error on the calibration set)."""
    return ((delta @ H) * delta).sum(dim=1)


@torch.no_grad()
def refit_masked(
    dense: Tensor,
    start: Tensor,
    keep: Tensor,
    H: Tensor,
    *,
    iters: int = 30,
    percdamp: float = 0.01,
) -> tuple[Tensor, dict]:
    """Kept weights minimizing ``‖(W' − dense)·X‖²`` under ``keep``, from ``start``.

    ``dense`` and ``start`` are ``[out, in]`` (``start`` already zero outside ``keep``); ``H`` is
    ``[in, in]`` (``XXᵀ`` up to scale, dead inputs allowed). ``percdamp · mean(diag H)`` is added to
    the diagonal, as in SparseGPT. Returns ``(new_weight, info)`` with the summed objective before
    and after (relative to ``H``'s scale) and the rows that kept their start.
    """
    W = dense.detach().float()
    Hd = H.detach().float().clone()
    diag = torch.diagonal(Hd)
    dead = diag == 0
    diag[dead] = 1.0
    diag.add_(percdamp * float(diag.mean()))
    M = keep.to(torch.float32)
    delta0 = start.detach().float() - W
    delta0 = torch.where(keep, delta0, -W)  # enforce the constraint exactly
    before = row_objective(delta0, Hd)
    if iters <= 0:
        return (W + delta0), {"objective_before": float(before.sum()), "objective_after": float(before.sum()), "rows_kept_start": 0}
    inv_diag = 1.0 / torch.diagonal(Hd)
    delta = delta0.clone()
    R = -(delta @ Hd) * M  # negative gradient, masked to the free (kept) coordinates
    Z = R * inv_diag
    P = Z.clone()
    rz = (R * Z).sum(dim=1)
    tiny = torch.finfo(torch.float32).tiny
    for _ in range(iters):
        Q = (P @ Hd) * M
        pq = (P * Q).sum(dim=1)
        alpha = torch.where(pq > tiny, rz / pq.clamp_min(tiny), torch.zeros_like(pq))
        delta.addcmul_(alpha.unsqueeze(1), P)
        R.addcmul_(alpha.unsqueeze(1), Q, value=-1.0)
        Z = R * inv_diag
        rz_new = (R * Z).sum(dim=1)
        beta = torch.where(rz > tiny, rz_new / rz.clamp_min(tiny), torch.zeros_like(rz))
        P = Z + beta.unsqueeze(1) * P
        rz = rz_new
    after = row_objective(delta, Hd)
    worse = ~(after <= before)  # NaN counts as worse
    if bool(worse.any()):
        delta[worse] = delta0[worse]
        after = torch.where(worse, before, after)
    out = W + delta
    out.masked_fill_(~keep, 0.0)
    return out, {
        "objective_before": float(before.sum()),
        "objective_after": float(after.sum()),
        "rows_kept_start": int(worse.sum()),
    }
