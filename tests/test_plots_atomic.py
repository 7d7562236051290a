"""Training plots are written atomically and refuse an existing file when asked to."""

from __future__ import annotations

import pytest

from sparsetorch.errors import OutputExistsError
from sparsetorch.training.plots import plot_accuracy_vs_sparsity, plot_layer_sparsity


def test_plots_write_png_and_respect_overwrite(tmp_path) -> None:
    p = tmp_path / "s.png"
    plot_layer_sparsity([(0, {"a": 0.0}), (10, {"a": 0.5})], p)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = p.read_bytes()
    with pytest.raises(OutputExistsError):
        plot_layer_sparsity([(0, {"a": 0.1})], p, overwrite=False)
    assert p.read_bytes() == before
    q = tmp_path / "acc.png"
    plot_accuracy_vs_sparsity([{"method": "rigl", "sparsity_target": 0.9, "accuracy": 88.0}], q)
    assert q.read_bytes()[:4] == b"\x89PNG"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["acc.png", "s.png"]  # no temporaries left
