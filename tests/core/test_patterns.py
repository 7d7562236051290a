"""Patterns are checked against their definitions with brute-force references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsetorch.errors import PatternError, SparsityValueError
from sparsetorch.patterns import NM, Block, Channel, RowWise, Unstructured, n_pruned, parse_pattern


def test_parse_known_strings():
    assert isinstance(parse_pattern("unstructured"), Unstructured)
    assert isinstance(parse_pattern("channel"), Channel)
    assert isinstance(parse_pattern("rowwise"), RowWise)
    p = parse_pattern("2:4")
    assert isinstance(p, NM) and (p.n, p.m) == (2, 4)
    b = parse_pattern("block4x2")
    assert isinstance(b, Block) and (b.h, b.w) == (4, 2)
    assert str(parse_pattern(" 1:4 ")) == "1:4"


@pytest.mark.parametrize("bad", ["2-4", "4:2", "0:4", "4:4", "blockx4", "triangle", "", "2:4:8"])
def test_parse_rejects(bad):
    with pytest.raises(PatternError):
        parse_pattern(bad)


def test_nm_means_n_kept():
    """'1:4' keeps ONE weight per group of 4 (some reference code reads it as N pruned)."""
    w = torch.arange(1.0, 17.0).reshape(2, 8)
    mask = NM(1, 4).mask(w.abs())
    assert mask.sum() == 4
    assert mask.reshape(2, 2, 4).sum(-1).eq(1).all()
    # the kept one is the largest of its group: the last column of each group
    assert mask.reshape(2, 2, 4)[..., 3].all()


@given(
    n=st.integers(1, 7),
    extra=st.integers(1, 4),
    rows=st.integers(1, 6),
    groups=st.integers(1, 5),
    seed=st.integers(0, 10_000),
)
@settings(max_examples=60, deadline=None)
def test_nm_exactly_n_survivors_and_top_n(n, extra, rows, groups, seed):
    m = n + extra
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups * m, generator=g)
    mask = NM(n, m).mask(w.abs())
    grouped_w = w.abs().reshape(rows, groups, m)
    grouped_m = mask.reshape(rows, groups, m)
    assert grouped_m.sum(-1).eq(n).all()
    # every kept weight is >= every pruned weight of the same group
    kept_min = torch.where(grouped_m, grouped_w, torch.inf).amin(-1)
    pruned_max = torch.where(~grouped_m, grouped_w, -torch.inf).amax(-1)
    assert (kept_min >= pruned_max).all()


def test_nm_conv_groups_along_input_channels():
    w = torch.randn(3, 8, 2, 2)
    mask = NM(2, 4).mask(w.abs())
    # for each output channel and kernel position, consecutive input channels form the groups
    per_pos = mask.permute(0, 2, 3, 1).reshape(3, 2, 2, 2, 4).sum(-1)
    assert per_pos.eq(2).all()


def test_nm_rejects_indivisible_input_dim():
    with pytest.raises(PatternError, match="multiple of 4"):
        NM(2, 4).mask(torch.randn(4, 6))


def test_nm_rejects_conflicting_sparsity():
    with pytest.raises(PatternError, match="fixes sparsity"):
        NM(1, 4).mask(torch.randn(4, 8), 0.5)
    assert NM(1, 4).mask(torch.randn(4, 8), 0.75).sum() == 8


@given(
    numel=st.integers(1, 300),
    s=st.floats(0.0, 0.999, allow_nan=False),
    seed=st.integers(0, 1000),
)
@settings(max_examples=80, deadline=None)
def test_unstructured_exact_count_and_top_k(numel, s, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(numel, generator=g)
    mask = Unstructured().mask(scores, s)
    zeros = math.floor(s * numel + 1e-9 * numel)
    assert int((~mask).sum()) == zeros
    if 0 < zeros < numel:
        assert scores[mask].min() >= scores[~mask].max()


def test_n_pruned_is_floor_robust_to_roundoff():
    assert n_pruned(0.3, 10) == 3  # 0.3*10 = 2.9999999999999996 in floating point
    assert n_pruned(0.5, 5) == 2
    assert n_pruned(0.0, 7) == 0


def test_ties_are_deterministic_lower_index_kept():
    scores = torch.zeros(10)
    mask = Unstructured().mask(scores, 0.5)
    assert mask.tolist() == [True] * 5 + [False] * 5


def test_rowwise_equal_count_per_row():
    w = torch.randn(5, 20)
    mask = RowWise().mask(w.abs(), 0.3)
    assert (~mask).sum(1).eq(6).all()


def test_block_prunes_whole_tiles_with_exact_block_count():
    w = torch.randn(8, 12)
    mask = Block(4, 3).mask(w.abs(), 0.5)
    tiles = mask.reshape(2, 4, 4, 3).permute(0, 2, 1, 3).reshape(2, 4, 12).sum(-1)
    assert set(tiles.unique().tolist()) <= {0, 12}
    assert int((tiles == 0).sum()) == 4  # floor(0.5 * 8 blocks)
    # kept blocks have the largest summed score
    bs = w.abs().reshape(2, 4, 4, 3).permute(0, 2, 1, 3).sum((-1, -2))
    assert bs[tiles == 12].min() >= bs[tiles == 0].max()


def test_block_rejects_indivisible():
    with pytest.raises(PatternError):
        Block(4, 4).mask(torch.randn(6, 8), 0.5)


def test_channel_prunes_whole_rows():
    w = torch.randn(10, 7)
    mask = Channel().mask(w.abs(), 0.3)
    rows = mask.sum(1)
    assert set(rows.unique().tolist()) <= {0, 7}
    assert int((rows == 0).sum()) == 3


@pytest.mark.parametrize("s", [-0.1, 1.0, 1.5, float("nan"), "half"])
def test_bad_sparsity(s):
    with pytest.raises(SparsityValueError):
        Unstructured().mask(torch.randn(4), s)


def test_violation_reports_first_bad_group():
    mask = torch.ones(2, 8, dtype=torch.bool)
    msg = NM(2, 4).violation(mask)
    assert msg is not None and "group (0, 0)" in msg
    assert NM(2, 4).violation(NM(2, 4).mask(torch.randn(2, 8).abs())) is None
    assert Channel().violation(torch.tensor([[True, False]])) is not None
    assert Block(2, 2).violation(torch.tensor([[True, False], [True, True]])) is not None
