"""An independent, slow, textbook SparseGPT / OBS loop for the one-shot tests.

Written from the paper (Frantar & Alistarh 2023, Alg. 1) and ``/work/shared/ALGORITHMS.md`` G.2,
not from ``sparsetorch.oneshot.sparsegpt``: float64 throughout, ``H⁻¹`` by ``torch.linalg.inv``
(not a Cholesky inverse), and after every column the OBS correction is applied *at once* to all
later columns, ``W[:, j:] -= e ⊗ U[j, j:]`` (the library batches the columns right of the
current block into one lazy update; the two are equal in exact arithmetic). The mask is chosen
at the start of every block of ``blocksize`` columns from ``w² / U_jj²`` on the current weights
(``floor(s · rows · cols_in_block)`` smallest), or per N:M group at every M-th column.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


@torch.no_grad()
def obs_prune(
    weight: Tensor,
    H: Tensor,
    sparsity: float,
    *,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """Return ``(pruned weight, keep mask)`` for ``weight`` [out, in] and ``H = 2XXᵀ/n`` [in, in]."""
    W = weight.double().clone()
    H = H.double().clone()
    rows, cols = W.shape
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += percdamp * torch.diagonal(H).mean() * torch.eye(cols, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)  # upper factor of H⁻¹: H⁻¹ = UᵀU
    d = torch.diagonal(U)
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    if nm is not None:
        n_keep, m = nm
        blocksize = m * max(1, blocksize // m)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        if nm is None:
            score = W[:, i1:i2] ** 2 / d[i1:i2] ** 2
            k = math.floor(sparsity * score.numel() + 1e-9)
            flat = torch.zeros(score.numel(), dtype=torch.bool)
            flat[torch.argsort(score.reshape(-1))[:k]] = True
            pruned[:, i1:i2] = flat.reshape(score.shape)
        for j in range(i1, i2):
            if nm is not None and j % m == 0:
                grp = W[:, j : j + m] ** 2 / d[j : j + m] ** 2
                drop = torch.argsort(grp, dim=1)[:, : m - n_keep]
                pruned[:, j : j + m].scatter_(1, drop, True)
            w = W[:, j].clone()
            q = torch.where(pruned[:, j], torch.zeros_like(w), w)
            e = (w - q) / U[j, j]
            W[:, j:] -= e.unsqueeze(1) * U[j, j:].unsqueeze(0)  # column j becomes q
    W[pruned] = 0.0
    return W.float(), ~pruned
