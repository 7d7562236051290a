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

By default the kept weights are then refit to the dense layer's output with the mask fixed
(``refit=10`` conjugate-gradient iterations, :mod:`.refit`); ``refit=0`` is the reference
algorithm exactly.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from torch import Tensor

from ..errors import MethodError
from ..patterns import NM, Pattern, n_pruned
from .base import Option, Solver
from .stats import InputStats


@contextmanager
def _single_thread():
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def inverse_hessian_factor(
    H: Tensor, percdamp: float = 0.01, *, max_tries: int = 6, name: str = ""
) -> tuple[Tensor, float]:
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
    with _single_thread():  # LAPACK potri with 2 threads is ~10x slower on a loaded machine
        U, damp = inverse_hessian_factor(H, percdamp, name=name)
    del H
    # work on Wᵀ [cols, rows]: a "column" of W is a contiguous row here
    WT = W.t().contiguous()
    del W
    prunedT = torch.zeros(cols, rows, dtype=torch.bool, device=WT.device)
    loss = 0.0
    if nm is not None:
        n_keep, m = nm
        if blocksize % m:
            blocksize = m * max(1, blocksize // m)
        n_prune = m - n_keep
    with _single_thread():  # many tiny ops: OpenMP fan-out only costs time here
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            count = i2 - i1
            W1 = WT[i1:i2]  # view, updated in place
            U1 = U[i1:i2, i1:i2]
            d1 = torch.diagonal(U1)
            P1 = prunedT[i1:i2]
            if nm is None:
                score = W1.pow(2) / d1.pow(2).unsqueeze(1)
                k = n_pruned(sparsity, score.numel())
                if k > 0:
                    idx = torch.topk(score.reshape(-1), k, largest=False, sorted=False).indices
                    P1.view(-1)[idx] = True
            scale = P1.float() / d1.unsqueeze(1)  # err = (w - q) / d with q = w masked
            ErrT = torch.empty(count, rows, dtype=WT.dtype, device=WT.device)
            for i in range(count):
                if nm is not None and i % m == 0:
                    tmp = W1[i : i + m].pow(2) / d1[i : i + m].pow(2).unsqueeze(1)
                    sel = torch.topk(tmp, n_prune, dim=0, largest=False).indices
                    P1[i : i + m].scatter_(0, sel, True)
                    scale[i : i + m] = P1[i : i + m].float() / d1[i : i + m].unsqueeze(1)
                torch.mul(W1[i], scale[i], out=ErrT[i])
                # W[:, i:i2] -= err ⊗ U[i, i:i2]; column i itself becomes q
                W1[i:].addr_(U1[i, i:], ErrT[i], alpha=-1.0)
            loss += 0.5 * float(ErrT.pow(2).sum())
            if i2 < cols:
                WT[i2:].addmm_(U[i1:i2, i2:].t(), ErrT, alpha=-1.0)
    pruned = prunedT.t().contiguous()
    W = WT.t().contiguous()
    keep = ~pruned
    W.masked_fill_(pruned, 0.0)
    return W, keep, {"loss": loss, "percdamp": damp, "dead_inputs": int(dead.sum())}


class SparseGPT(Solver):
    name = "sparsegpt"
    needs = frozenset({"xtx"})
    option_specs = {
        "blocksize": Option(int, low=1, high=1 << 20, hint="columns per lazy-update block, e.g. 128"),
        "percdamp": Option(float, low=0, low_open=True, hint="dampening as a fraction of mean(diag H), e.g. 0.01"),
        "dampening_frac": Option(float, low=0, low_open=True, hint="alias of percdamp, e.g. 0.01"),
    }
    # the OBS updates only let a weight compensate for pruned weights to its left; 10 CG
    # iterations of a mask-fixed refit (refit.py) cut SmolLM2's 2:4 perplexity 32.1 -> 26.1 for
    # ~1.5 s per block. refit=0 gives the reference algorithm.
    default_refit = 10

    def solve(
        self,
        weight: Tensor,
        stats: InputStats | None,
        sparsity: float,
        pattern: Pattern,
        *,
        name: str = "",
    ):
        assert stats is not None
        percdamp = float(self.opts.get("percdamp", self.opts.get("dampening_frac", 0.01)))
        blocksize = int(self.opts.get("blocksize", 128))
        nm = (pattern.n, pattern.m) if isinstance(pattern, NM) else None
        if nm is None and pattern.name not in ("unstructured", "rowwise"):
            raise MethodError(f"SparseGPT supports unstructured and N:M patterns, not {pattern}.")
        new_w, keep, info = sparsegpt_prune(
            weight,
            stats.hessian(),
            sparsity,
            nm=nm,
            blocksize=blocksize,
            percdamp=percdamp,
            name=name,
        )
        self.last_info = info
        return new_w, keep
