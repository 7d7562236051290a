"""Patterns against their definitions, for the cases mutation testing found unchecked.

(benchmarks/mutation_scores.py: mutants of patterns.py that no test killed.) Every expected
value is worked out by hand.
"""

from __future__ import annotations

import pytest
import torch

from sparsetorch.errors import PatternError
from sparsetorch.patterns import NM, Block, Channel, Unstructured, parse_pattern


def test_patterns_compare_and_hash_by_name() -> None:
    assert NM(2, 4) == parse_pattern("2:4") and hash(NM(2, 4)) == hash(parse_pattern("2:4"))
    assert NM(2, 4) != NM(1, 4) and hash(NM(2, 4)) != hash(NM(1, 4))
    assert Block(2, 2) != Channel() and Block(2, 2) != "block2x2"
    assert len({NM(2, 4), parse_pattern("2:4"), Unstructured()}) == 2
    assert repr(Unstructured()) == "Unstructured('unstructured')" and repr(Channel()) == "Channel('channel')"


def test_nm_violation_reports_a_shape_that_does_not_fit() -> None:
    msg = NM(2, 4).violation(torch.ones(3, 6, dtype=torch.bool))
    assert msg is not None and "4" in msg and "6" in msg


@pytest.mark.parametrize(("h", "w"), [(1, 4), (4, 1), (1, 1)])
def test_blocks_of_height_or_width_one_are_valid(h: int, w: int) -> None:
    assert Block(h, w).name == f"block{h}x{w}"


@pytest.mark.parametrize(("h", "w"), [(0, 4), (4, 0), (-1, 2)])
def test_non_positive_blocks_are_refused_with_their_size(h: int, w: int) -> None:
    with pytest.raises(PatternError, match=rf"block size must be positive, got {h}x{w}\."):
        Block(h, w)


def test_block_shape_error_names_the_tensor_and_its_2d_view() -> None:
    with pytest.raises(PatternError, match=r"block2x2 needs the weight's 2-D view to be divisible by 2x2, but tensor is 3x4\."):
        Block(2, 2).check_shape((3, 4))
    with pytest.raises(PatternError, match=r"but conv is 4x27\."):
        Block(2, 2).check_shape((4, 3, 3, 3), "conv")
    with pytest.raises(PatternError, match=r"but tensor is 3x1\."):  # a 1-D tensor is one column
        Block(1, 2).check_shape((3,))
    Block(3, 1).check_shape((3,))  # fits: 3 rows of one column


def test_block_mask_keeps_the_best_whole_tiles() -> None:
    # 4x8 scores, tiles 2x4: tile (0,1) and (1,0) have the largest sums
    s = torch.zeros(4, 8)
    s[0:2, 4:8] = 5.0
    s[2:4, 0:4] = 3.0
    s[0:2, 0:4] = 1.0
    m = Block(2, 4).mask(s, 0.5)
    expect = torch.zeros(4, 8, dtype=torch.bool)
    expect[0:2, 4:8] = True
    expect[2:4, 0:4] = True
    assert torch.equal(m, expect)


def test_block_violation_names_the_tile_and_counts() -> None:
    mask = torch.ones(4, 8, dtype=torch.bool)
    mask[2, 5] = False  # tile (1, 1) of 2x4 tiles is partly pruned
    assert Block(2, 4).violation(mask) == "block (1, 1) is partly pruned (7 of 8 kept)"
    assert Block(2, 4).violation(torch.ones(4, 8, dtype=torch.bool)) is None
    assert "divisible" in Block(3, 4).violation(torch.ones(4, 8, dtype=torch.bool))
