"""SparseGPT (Frantar & Alistarh, ICML 2023): OBS-style pruning with weight reconstruction.

``H = 2/n · XXᵀ`` (fp32, averaged over sequences); dead inputs (``H_jj == 0``) get ``H_jj = 1`` and
their weights zeroed; ``percdamp · mean(diag H)`` is added to the diagonal; all OBS quantities
come from ``U``, the upper Cholesky factor of ``H⁻¹``. Columns are processed in blocks of
``blocksize`` (128) with lazy updates of the columns to the right. The unstructured mask is
chosen adaptively per block from ``w² / U_jj²`` on the already-updated weights, with exactly
``floor(s · rows · block_cols)`` zeros per block (the reference prunes up to one more per block
because it thresholds with ``<=``); the N:M variant picks, at every M-th column, the
``M - N`` smallest ``w² / U_jj²`` of each row's group. A Hessian that is not positive definite
is retried with ten times the dampening, with a warning.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ..errors import MethodError
from ..patterns import NM, Pattern, n_pruned
from .base import Solver
from .stats import InputStats


def inverse_hessian_factor(H: Tensor, percdamp: float = 0.01, *, max_tries: int = 6, name: str = "") -> tuple[Tensor, float]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = percdamp · mean(diag H)``.

    Retries with 10× the dampening while ``H`` is not positive definite (warning each time).
    Returns ``(U, percdamp_used)``. ``H`` must already have its dead inputs fixed.
    """
    d = H.shape[0]
    mean_diag = torch.diagonal(H).abs().mean().clamp_min(1e-12)
    damp = percdamp
    for _ in range(max_tries):
        Hd = H.clone()
        Hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info2) == 0 and bool(torch.isfinite(U).all()):
                return U, damp
        new = damp * 10 if damp > 0 else 1e-4
        warnings.warn(
            f"SparseGPT{' ' + name if name else ''}: Hessian ({d}x{d}) is not positive definite with "
            f"dampening {damp:g}; retrying with {new:g}. More calibration data usually avoids this.",
            RuntimeWarning,
            stacklevel=3,
        )
        damp = new
    raise MethodError(
        f"SparseGPT{' ' + name if name else ''}: Hessian stays singular even with dampening {damp:g}; "
        "check the calibration data (NaN/inf activations?)."
    )


@torch.no_grad()
def sparsegpt_prune(
    weight: Tensor,
    H: Tensor,
    sparsity: float,
    *,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    name: str = "",
) -> tuple[Tensor, Tensor, dict]:
    """Prune ``weight`` [out, in] given ``H`` [in, in]. Returns ``(new_weight, keep_mask, info)``.

    ``nm = (n_kept, m)`` selects the N:M variant. Inputs are not modified. ``info`` has the OBS
    loss ``Σ (w - q)² / U_jj² / 2`` and the dampening used.
    """
    W = weight.detach().float().clone(memory_format=torch.contiguous_format)
    H = H.detach().float().clone()
    rows, cols = W.shape
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U, damp = inverse_hessian_factor(H, percdamp, name=name)
    del H
    pruned = torch.zeros_like(W, dtype=torch.bool)
    losses = torch.zeros(rows, dtype=torch.float32, device=W.device)
    if nm is not None:
        n_keep, m = nm
        if blocksize % m:
            blocksize = m * max(1, blocksize // m)
        n_prune = m - n_keep
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diagonal(U1)
        if nm is None:
            score = W1.pow(2) / d1.pow(2).unsqueeze(0)
            k = n_pruned(sparsity, score.numel())
            mask1 = torch.zeros(W1.shape, dtype=torch.bool, device=W1.device)
            if k > 0:
                idx = torch.topk(score.reshape(-1), k, largest=False, sorted=False).indices
                mask1.view(-1)[idx] = True
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = d1[i]
            if nm is not None and i % m == 0:
                tmp = W1[:, i : i + m].pow(2) / d1[i : i + m].pow(2).unsqueeze(0)
                sel = torch.topk(tmp, n_prune, dim=1, largest=False).indices
                mask1[:, i : i + m].scatter_(1, sel, True)
            q = w.masked_fill(mask1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / d
            losses += (w - q).pow(2) / d.pow(2) / 2
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        if i2 < cols:
            W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)
    keep = ~pruned
    W.masked_fill_(pruned, 0.0)
    return W, keep, {"loss": float(losses.sum()), "percdamp": damp, "dead_inputs": int(dead.sum())}


class SparseGPT(Solver):
    name = "sparsegpt"
    needs = frozenset({"xtx"})
    options = ("blocksize", "percdamp", "dampening_frac")

    def solve(self, weight: Tensor, stats: InputStats | None, sparsity: float, pattern: Pattern, *, name: str = ""):
        assert stats is not None
        percdamp = float(self.opts.get("percdamp", self.opts.get("dampening_frac", 0.01)))
        blocksize = int(self.opts.get("blocksize", 128))
        nm = (pattern.n, pattern.m) if isinstance(pattern, NM) else None
        if nm is None and pattern.name not in ("unstructured", "rowwise"):
            raise MethodError(f"SparseGPT supports unstructured and N:M patterns, not {pattern}.")
        new_w, keep, info = sparsegpt_prune(
            weight, stats.hessian(), sparsity, nm=nm, blocksize=blocksize, percdamp=percdamp, name=name
        )
        self.last_info = info
        return new_w, keep
