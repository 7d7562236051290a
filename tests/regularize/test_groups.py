"""Groupings: round trips, agreement with the patterns' groups, and clear errors."""

from __future__ import annotations

import pytest
import torch

from sparsetorch.errors import PatternError
from sparsetorch.patterns import NM, Block
from sparsetorch.regularize.groups import parse_grouping


@pytest.mark.parametrize("spec", ["element", "row", "in_channel", "2:4", "block2x4"])
@pytest.mark.parametrize("shape", [(8, 16), (8, 4, 3, 3)])
def test_round_trip(spec: str, shape: tuple[int, ...]) -> None:
    t = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    gr = parse_grouping(spec)
    g = gr.to_groups(t)
    assert g.shape[0] == gr.n_groups(shape)
    torch.testing.assert_close(gr.from_groups(g, shape), t)


def test_row_and_in_channel_groups_are_what_they_say() -> None:
    t = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    rows = parse_grouping("out_channel").to_groups(t)
    torch.testing.assert_close(rows[1], t[1].reshape(-1))
    cols = parse_grouping("in_channel").to_groups(t)
    torch.testing.assert_close(cols[2].sort().values, t[:, 2].reshape(-1).sort().values)


@pytest.mark.parametrize("shape", [(4, 8), (4, 8, 3, 3)])
def test_nm_groups_are_the_pattern_groups(shape: tuple[int, ...]) -> None:
    """A 1:4 mask keeps one entry in every group of the grouping '1:4'."""
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(shape, generator=g)
    mask = NM(1, 4).mask(scores)
    counts = parse_grouping("1:4").to_groups(mask.float()).sum(1)
    assert torch.all(counts == 1)


def test_block_groups_are_the_pattern_tiles() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(8, 8, generator=g)
    mask = Block(2, 4).mask(scores, 0.5)
    tiles = parse_grouping("block2x4").to_groups(mask.float()).sum(1)
    assert set(tiles.tolist()) <= {0.0, 8.0}


def test_groups_that_do_not_tile_raise() -> None:
    with pytest.raises(PatternError, match="do not tile"):
        parse_grouping("2:4").check((8, 6))
    with pytest.raises(PatternError, match="divisible"):
        parse_grouping("block3x3").check((8, 8))
    with pytest.raises(PatternError, match="at least 2 dimensions"):
        parse_grouping("row").check((8,))
    with pytest.raises(PatternError, match="cannot parse groups"):
        parse_grouping("diagonal")
