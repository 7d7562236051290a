"""Helpers shared by the training tests: tiny models, batches, the three-line loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyCNN(nn.Module):
    """Two convs (c_in of the second divisible by 8) and two linears; input [B, 1, 8, 8]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 2 * 2, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def batches(n: int = 8, shape: tuple[int, ...] = (16,), bs: int = 16, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, *shape, generator=g), torch.randint(0, 4, (bs,), generator=g)) for _ in range(n)]


def train(model: nn.Module, opt: torch.optim.Optimizer, sp, data, check=None) -> None:  # noqa: ANN001
    """The three-line loop: forward/backward, optimizer.step(), sparsifier.step()."""
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        changed = sp.step()
        if check is not None:
            check(changed)


def reference_erk_zeros(
    shapes: dict[str, tuple[int, ...]], sparsity: float, *, kernel: bool = True, dense: tuple[str, ...] = ()
) -> dict[str, int]:
    """Expected zeros per layer from the ERK / ER *definition* (Evci et al. 2020, RigL's
    ``get_sparsities_erdos_renyi``), written independently of ``sparsetorch.allocation``.

    Raw density ``p_l = sum(dims) / prod(dims)`` (ER: out and in channels only, kernel
    ignored). ``eps`` makes the number of ones equal to uniform sparsity's
    ``sum_l (N_l - floor(s N_l))``; every layer whose density ``eps p_l`` would exceed 1 is made
    dense (its non-zeros come out of the others' budget) and ``eps`` is solved again. Zeros per layer: ``floor((1 - eps p_l) N_l)``.
    """
    import math

    numel = {n: math.prod(sh) for n, sh in shapes.items()}
    if kernel:
        raw = {n: sum(sh) / math.prod(sh) for n, sh in shapes.items()}
    else:
        # ER: (c_out + c_in) / (c_out c_in); a PyTorch weight is [out, in, *kernel]
        raw = {n: (sh[0] + sh[1]) / (sh[0] * sh[1]) for n, sh in shapes.items()}
    uniform_ones = sum(numel[n] - math.floor(sparsity * numel[n] + 1e-9) for n in shapes)
    dense_set = set(dense)
    while True:
        ones_left = uniform_ones - sum(numel[n] for n in dense_set)
        eps = ones_left / sum(raw[n] * numel[n] for n in shapes if n not in dense_set)
        over = {n for n in shapes if n not in dense_set and eps * raw[n] > 1.0}
        if not over:
            break
        dense_set |= over
    return {
        n: 0 if n in dense_set else math.floor((1.0 - eps * raw[n]) * numel[n] + 1e-9) for n in shapes
    }


def assert_counts_close(zeros: dict[str, int], expected: dict[str, int], slack: int = 1) -> None:
    """Per-layer zero counts equal the expected ones up to ``slack`` (float round-off at a floor)."""
    assert set(zeros) == set(expected)
    for n in expected:
        assert abs(zeros[n] - expected[n]) <= slack, (n, zeros[n], expected[n])
