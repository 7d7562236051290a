"""Patterns rule by rule: counts, grouping, tie and NaN handling, names, messages (by hand)."""

from __future__ import annotations

import pytest
import torch

from sparsetorch.errors import PatternError
from sparsetorch.patterns import (
    MAX_GROUP,
    NM,
    Block,
    Channel,
    RowWise,
    Unstructured,
    n_pruned,
    parse_pattern,
    topk_mask,
)


# --------------------------------------------------------------------------- topk_mask
def test_topk_mask_edges():
    s = torch.tensor([3.0, 1.0, 2.0])
    assert topk_mask(s, 3).tolist() == [True] * 3 and topk_mask(s, 7).dtype == torch.bool
    assert topk_mask(s, 0).tolist() == [False] * 3 and topk_mask(s, -2).tolist() == [False] * 3
    assert topk_mask(s, 1).tolist() == [True, False, False]
    assert topk_mask(s, 2).tolist() == [True, False, True]
    # NaN scores count as the lowest: pruned first
    assert topk_mask(torch.tensor([float("nan"), 0.0, -5.0]), 2).tolist() == [False, True, True]
    # NaN ranks below even -inf (-inf scores stay comparable to each other)
    assert topk_mask(torch.tensor([float("nan"), float("-inf")]), 1).tolist() == [False, True]
    assert topk_mask(torch.tensor([float("-inf"), float("nan"), -1e38]), 1).tolist() == [False, False, True]
    # ties: the lower index is kept
    assert topk_mask(torch.tensor([1.0, 1.0, 1.0, 1.0]), 2).tolist() == [True, True, False, False]
    m = torch.tensor([[1.0, 2.0], [4.0, 3.0]])
    assert topk_mask(m, 1, dim=0).tolist() == [[False, False], [True, True]]
    assert topk_mask(m, 1, dim=1).tolist() == [[False, True], [True, False]]
    assert topk_mask(m, 2, dim=0).all() and topk_mask(m, 1).shape == (2, 2)
    # half-precision scores are compared in float32 (no overflow of the sort, same order)
    h = torch.tensor([1.0, 3.0, 2.0], dtype=torch.bfloat16)
    assert topk_mask(h, 1).tolist() == [False, True, False]
    assert topk_mask(torch.tensor([1, 5, 3]), 2).tolist() == [False, True, True]


# --------------------------------------------------------------------------- n_pruned
@pytest.mark.parametrize(("s", "n", "want"), [
    (0.29, 100, 29), (0.5, 7, 3), (0.9999999999, 1000, 999), (0.9999, 10, 9), (0.99, 10, 9),
    (1.0, 10, 10), (0.0, 10, 0), (-0.1, 10, 0), (0.5, 0, 0), (0.5, -3, 0), (0.7, 3, 2),
    (0.9, 1, 0), (1.0, 1, 1), (0.3333333333333333, 3, 1), (0.1, 10, 1)])
def test_n_pruned_by_hand(s, n, want):
    assert n_pruned(s, n) == want


def test_n_pruned_never_exceeds_the_request():
    for n in (3, 7, 10, 97, 1000):
        for k in range(n + 1):
            s = k / n
            assert n_pruned(s, n) == k, (s, n)
            assert n_pruned(s - 1e-6, n) == max(k - 1, 0), (s, n)


# --------------------------------------------------------------------------- sparsity rules
def test_resolve_sparsity_messages():
    with pytest.raises(PatternError, match=r"pattern 'unstructured' needs a sparsity; pass sparsity=0\.5 etc\."):
        Unstructured().resolve_sparsity(None)
    with pytest.raises(PatternError, match=r"pattern '2:4' fixes sparsity at 0\.5 but sparsity=0\.6 was requested; "
                       r"pass sparsity=0\.5 \(or None\), or choose another N:M\."):
        NM(2, 4).resolve_sparsity(0.6)
    assert NM(2, 4).resolve_sparsity(None) == 0.5 and NM(2, 4).resolve_sparsity(0.5 + 5e-7) == pytest.approx(0.5)
    assert NM(1, 4).fixed_sparsity == 0.75 and Unstructured().fixed_sparsity is None
    with pytest.raises(PatternError, match=r"fixes sparsity at 0\.75"):
        NM(1, 4).resolve_sparsity(0.75 + 2e-6)
    assert Unstructured().resolve_sparsity(0.3) == 0.3


def test_mask_detaches_and_counts():
    s = torch.randn(4, 8, requires_grad=True)
    m = Unstructured().mask(s, 0.25)
    assert m.dtype == torch.bool and not m.requires_grad and int((~m).sum()) == 8


# --------------------------------------------------------------------------- names
def test_names_reprs_equality():
    assert str(NM(2, 4)) == "2:4" and repr(NM(2, 4)) == "NM(n=2, m=4)"
    assert str(Block(2, 3)) == "block2x3" and repr(Block(2, 3)) == "Block(h=2, w=3)"
    assert repr(Unstructured()) == "Unstructured('unstructured')" and str(RowWise()) == "rowwise"
    assert str(Channel()) == "channel"
    assert NM(2, 4) == parse_pattern("2:4") and NM(2, 4) != NM(1, 4) and NM(2, 4) != "2:4"
    assert hash(NM(2, 4)) == hash(parse_pattern(" 2 : 4 ")) == hash("2:4")
    assert len({Unstructured(), parse_pattern("layer"), parse_pattern(None)}) == 1
    assert Unstructured().violation(torch.ones(3, dtype=torch.bool)) is None


@pytest.mark.parametrize(("spec", "want"), [
    ("unstructured", "unstructured"), ("dense_unstructured", "unstructured"), ("LAYER", "unstructured"),
    ("rowwise", "rowwise"), ("row", "rowwise"), ("per-row", "rowwise"), (" Per_Row ", "rowwise"),
    ("channel", "channel"), ("channels", "channel"), ("row_structured", "channel"), ("structured", "channel"),
    (" 2 : 4 ", "2:4"), ("16:32", "16:32"), ("Block 4 X 2", "block4x2"), ("block1x1", "block1x1"),
    ("1:1024", "1:1024")])
def test_parse_aliases(spec, want):
    assert str(parse_pattern(spec)) == want


def test_parse_errors():
    p = NM(2, 4)
    assert parse_pattern(p) is p
    with pytest.raises(PatternError, match=r"pattern must be a string like '2:4' or 'unstructured', got 5\."):
        parse_pattern(5)
    for bad in ("1234567890:2", "2:4:8", "block4", "blockx4", "2/4", ""):
        with pytest.raises(PatternError, match=r"cannot parse sparsity pattern .*Use one of: 'unstructured', 'rowwise', "
                           r"'N:M' with N kept of M \(e\.g\. '2:4', '4:8', '1:4'\), 'blockHxW' \(e\.g\. 'block4x4'\), 'channel'\."):
            parse_pattern(bad)


# --------------------------------------------------------------------------- N:M
def test_nm_construction_rules():
    for n, m in ((0, 4), (4, 4), (5, 4), (-1, 2)):
        with pytest.raises(PatternError, match=rf"N:M needs integers 0 < N < M \(N = weights kept per group of M\), got {n}:{m}\."):
            NM(n, m)
    with pytest.raises(PatternError, match=r"N:M needs integers"):
        NM(2.0, 4)  # type: ignore[arg-type]
    with pytest.raises(PatternError, match=rf"groups of M=1025 inputs are larger than any supported group \(M <= {MAX_GROUP}\); "
                       r"use a small M such as 2:4, 4:8 or 8:16\."):
        NM(1, 1025)
    assert NM(1, MAX_GROUP).m == 1024


def test_nm_shape_rule_and_message():
    with pytest.raises(PatternError, match=r"2:4 sparsity groups 4 consecutive inputs, but w of shape \(3, 6\) has input "
                       r"dimension 6, not a multiple of 4\. Exclude this layer with ignore=\[\.\.\.\] or use an M that divides 6\."):
        NM(2, 4).check_shape((3, 6), "w")
    with pytest.raises(PatternError, match=r"tensor of shape \(6,\) has input dimension 6"):
        NM(2, 4).check_shape((6,))
    NM(2, 4).check_shape((3, 8, 3, 3))
    with pytest.raises(PatternError, match=r"input dimension 3"):
        NM(2, 4).check_shape((8, 3, 4, 4))  # conv: the input dim is shape[1], not the kernel


def test_nm_masks_by_hand():
    s = torch.tensor([[1.0, 4.0, 3.0, 2.0, 9.0, 8.0, 0.0, 7.0]])
    assert NM(2, 4).mask(s).tolist() == [[False, True, True, False, True, True, False, False]]
    assert NM(1, 2).mask(torch.tensor([2.0, 1.0, 0.0, 5.0])).tolist() == [True, False, False, True]
    # conv [out=1, in=4, 1, 2]: groups run along in for each kernel position
    c = torch.tensor([[[[1.0, 0.0]], [[2.0, 5.0]], [[3.0, 6.0]], [[4.0, 7.0]]]])
    m = NM(2, 4).mask(c)
    assert m[0, :, 0, 0].tolist() == [False, False, True, True] and m[0, :, 0, 1].tolist() == [False, False, True, True]
    c3 = torch.arange(8.0).reshape(1, 4, 2)
    m3 = NM(1, 4).mask(c3)
    assert m3[0, :, 0].tolist() == [False, False, False, True] and m3[0, :, 1].tolist() == [False, False, False, True]


def test_nm_violation_by_hand():
    ok = torch.tensor([[1, 1, 0, 0, 0, 1, 0, 1]], dtype=torch.bool)
    assert NM(2, 4).violation(ok) is None
    bad = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    assert NM(2, 4).violation(bad) == "group (0, 1) has 3 non-zeros, more than 2 of 4"
    assert NM(2, 4).violation(torch.tensor([1, 1, 1, 0], dtype=torch.bool)) == "group (0,) has 3 non-zeros, more than 2 of 4"
    assert "not a multiple of 4" in NM(2, 4).violation(torch.ones(2, 6, dtype=torch.bool))
    conv = torch.zeros(1, 4, 1, 2, dtype=torch.bool)
    conv[0, :3, 0, 1] = True  # three of the four in-channels at kernel position (0, 1)
    assert NM(2, 4).violation(conv) == "group (0, 0, 1, 0) has 3 non-zeros, more than 2 of 4"
    assert NM(2, 4).violation(conv.float()) == "group (0, 0, 1, 0) has 3 non-zeros, more than 2 of 4"


# --------------------------------------------------------------------------- rowwise / unstructured
def test_rowwise_by_hand():
    s = torch.tensor([[1.0, 2.0, 3.0, 4.0], [8.0, 7.0, 6.0, 5.0]])
    assert RowWise().mask(s, 0.5).tolist() == [[False, False, True, True], [True, True, False, False]]
    conv = torch.arange(16.0).reshape(2, 2, 2, 2)
    m = RowWise().mask(conv, 0.25)
    assert m.shape == conv.shape and m.reshape(2, -1).sum(1).tolist() == [6, 6]
    assert m.reshape(2, -1)[:, :2].sum() == 0  # the two lowest of each row go
    assert RowWise().mask(torch.tensor([3.0, 1.0, 2.0, 0.0]), 0.5).tolist() == [True, False, True, False]


def test_unstructured_by_hand():
    s = torch.tensor([[1.0, 8.0], [3.0, 2.0]])
    assert Unstructured().mask(s, 0.5).tolist() == [[False, True], [True, False]]
    assert Unstructured().mask(s, 0.0).all() and Unstructured().mask(s, 0.99).sum() == 1


# --------------------------------------------------------------------------- block / channel
def test_block_rules_and_messages():
    for h, w in ((0, 2), (2, 0), (-1, 1)):
        with pytest.raises(PatternError, match=rf"block size must be positive, got {h}x{w}\."):
            Block(h, w)
    with pytest.raises(PatternError, match=r"block2x2 needs the weight's 2-D view to be divisible by 2x2, but w is 4x3\. "
                       r"Pick a block size dividing both, or ignore this layer\."):
        Block(2, 2).check_shape((4, 3), "w")
    with pytest.raises(PatternError, match=r"but tensor is 3x1\."):
        Block(1, 2).check_shape((3,))
    Block(2, 1).check_shape((4,))
    Block(2, 4).check_shape((2, 2, 2))  # conv flattened: 2 x 4


def test_block_mask_by_hand():
    # tile sums: [[0+1+4+5, 2+3+6+7], [8+9+12+13, 10+11+14+15]] = [[10, 18], [42, 50]]
    s = torch.arange(16.0).reshape(4, 4)
    m = Block(2, 2).mask(s, 0.5)
    assert m.tolist() == [[False, False, False, False]] * 2 + [[True, True, True, True]] * 2
    # a tile is scored by its sum, not its max: one 9 loses to four 3s
    s = torch.tensor([[9.0, 0.0, 3.0, 3.0], [0.0, 0.0, 3.0, 3.0]])
    assert Block(2, 2).mask(s, 0.5).tolist() == [[False, False, True, True], [False, False, True, True]]
    # 2x1 blocks: tiles are vertical pairs
    s = torch.tensor([[1.0, 5.0], [1.0, 0.0]])
    assert Block(2, 1).mask(s, 0.5).tolist() == [[False, True], [False, True]]
    conv = torch.zeros(2, 1, 2, 2)
    conv[1] = 1.0
    mc = Block(1, 4).mask(conv, 0.5)
    assert mc.shape == conv.shape and not mc[0].any() and mc[1].all()


def test_block_violation_by_hand():
    m = torch.ones(2, 4, dtype=torch.bool)
    assert Block(2, 2).violation(m) is None
    m[1, 3] = False
    assert Block(2, 2).violation(m) == "block (0, 1) is partly pruned (3 of 4 kept)"
    m2 = torch.zeros(2, 4, dtype=torch.bool)
    m2[0, 0] = True
    assert Block(2, 2).violation(m2) == "block (0, 0) is partly pruned (1 of 4 kept)"
    assert Block(2, 2).violation(torch.zeros(2, 4, dtype=torch.bool)) is None
    assert "divisible by 2x2" in Block(2, 2).violation(torch.ones(3, 4, dtype=torch.bool))
    m3 = torch.ones(2, 6, dtype=torch.bool)
    m3[1, 5] = False
    assert Block(2, 3).violation(m3) == "block (0, 1) is partly pruned (5 of 6 kept)"


def test_channel_by_hand():
    s = torch.tensor([[1.0, 1.0], [5.0, -4.0], [0.5, 0.6]])  # row sums 2, 1, 1.1
    m = Channel().mask(s, 1 / 3)
    assert m.tolist() == [[True, True], [False, False], [True, True]]
    conv = torch.arange(8.0).reshape(2, 1, 2, 2)
    mc = Channel().mask(conv, 0.5)
    assert mc.shape == conv.shape and not mc[0].any() and mc[1].all()
    mc[1, 0, 0, 0] = False  # the mask is its own tensor, not a view of one row mask
    assert mc[1].sum() == 3
    assert Channel().violation(torch.tensor([[1, 1], [0, 0]], dtype=torch.bool)) is None
    assert Channel().violation(torch.tensor([[1, 1], [0, 1], [1, 0]], dtype=torch.bool)) == \
        "output row 1 is partly pruned (1 of 2 kept)"
    v = torch.ones(2, 1, 2, 2, dtype=torch.bool)
    v[1, 0, 1, 1] = False
    assert Channel().violation(v) == "output row 1 is partly pruned (3 of 4 kept)"
