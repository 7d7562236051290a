"""Kernel selection with an injected fake timer: fastest wins, dense wins ties and losses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsetorch.inference import SparseLinear, select_kernel
from sparsetorch.inference.select import DEFAULT_MARGIN


def fake_timer(times: dict[str, float]):
    calls: list[str] = []

    def timer(name, fn):
        fn()  # the function must be callable; its duration is ignored
        calls.append(name)
        return times[name]

    timer.calls = calls  # type: ignore[attr-defined]
    return timer


def _sparse_weight(out: int = 32, inn: int = 48, sparsity: float = 0.9) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out, inn, generator=g)
    w[torch.rand(out, inn, generator=g) < sparsity] = 0
    return w


def test_picks_fastest() -> None:
    t = fake_timer({"dense": 1.0, "scipy": 0.5, "torch_csr": 0.2})
    sel = select_kernel(_sparse_weight(), None, 1, ["scipy", "torch_csr"], t)
    assert sel.kernel == "torch_csr"
    assert sel.times == {"dense": 1.0, "scipy": 0.5, "torch_csr": 0.2}
    assert sel.speedup == pytest.approx(5.0)
    assert set(t.calls) == {"dense", "scipy", "torch_csr"}  # dense always measured


def test_falls_back_to_dense_when_sparse_is_slower() -> None:
    sel = select_kernel(_sparse_weight(), None, 1, ["scipy", "torch_csr"], fake_timer({"dense": 1.0, "scipy": 1.5, "torch_csr": 3.0}))
    assert sel.kernel == "dense"
    assert "weight" in sel.packed


def test_needs_a_real_margin_over_dense() -> None:
    almost = 1.0 - DEFAULT_MARGIN / 2
    sel = select_kernel(_sparse_weight(), None, 1, ["scipy"], fake_timer({"dense": 1.0, "scipy": almost}))
    assert sel.kernel == "dense"


def test_median_of_rounds_is_used() -> None:
    """One lucky fast round does not win; a kernel must be fast in most rounds."""
    seq = iter([1.0, 5.0, 1.0, 0.4, 1.0, 5.0])  # dense, scipy alternating over 3 rounds

    def timer(name, fn):
        return next(seq)

    sel = select_kernel(_sparse_weight(), None, 1, ["scipy"], timer, rounds=3)
    assert sel.kernel == "dense" and sel.times["scipy"] == 5.0
    seq2 = iter([1.0, 0.5, 1.0, 9.0, 1.0, 0.5])
    sel = select_kernel(_sparse_weight(), None, 1, ["scipy"], lambda n, f: next(seq2), rounds=3)
    assert sel.kernel == "scipy" and sel.times["scipy"] == 0.5


def test_wrong_kernel_output_is_skipped(monkeypatch) -> None:
    from sparsetorch.inference.kernels import ScipyKernel

    monkeypatch.setattr(ScipyKernel, "matmul", lambda self, x, p, b, o: torch.zeros(x.shape[0], o))
    with pytest.warns(RuntimeWarning, match="disagrees"):
        sel = select_kernel(_sparse_weight(), None, 1, ["scipy"], fake_timer({"dense": 1.0, "scipy": 0.1}))
    assert sel.kernel == "dense" and "scipy" in sel.skipped


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_kernel_rounding_differently_is_accepted_but_wrong_one_is_not(monkeypatch, dtype) -> None:
    """A fp16/bf16 kernel that is right up to an ulp of rounding is kept (the 2:4 GPU kernel
    was rejected on every layer because a 16-bit output was held to the fp32 tolerance); a
    wrong one (a weight 10% off) is still skipped, and fp32 keeps its strict tolerance."""
    from sparsetorch.inference.kernels import KERNELS, DenseKernel

    class OffBy(DenseKernel):
        name = "off_by"

        def __init__(self, factor: float) -> None:
            self.factor = factor

        def matmul(self, x, packed, bias, out_features):
            y = torch.nn.functional.linear(x.float(), packed["weight"].float()) * self.factor
            return y.to(x.dtype)

    w = _sparse_weight(64, 256, 0.5)
    ulp = 2.0 ** (-10 if dtype == torch.float16 else -7)  # one unit in the last place, relative
    monkeypatch.setitem(KERNELS, "off_by", OffBy(1 + ulp))
    timer = fake_timer({"dense": 1.0, "off_by": 0.1})
    assert select_kernel(w.to(dtype), None, 8, ["off_by"], timer).kernel == "off_by"
    with pytest.warns(RuntimeWarning, match="disagrees"):
        assert select_kernel(w, None, 8, ["off_by"], timer).kernel == "dense"  # fp32: an ulp of fp16 is too much
    monkeypatch.setitem(KERNELS, "off_by", OffBy(1.1))
    with pytest.warns(RuntimeWarning, match="disagrees"):
        assert select_kernel(w.to(dtype), None, 8, ["off_by"], timer).kernel == "dense"


def test_failing_kernel_is_skipped(monkeypatch) -> None:
    from sparsetorch.inference.kernels import ScipyKernel

    def boom(self, w):
        raise RuntimeError("no")

    monkeypatch.setattr(ScipyKernel, "pack", boom)
    with pytest.warns(RuntimeWarning, match="failed"):
        sel = select_kernel(_sparse_weight(), None, 1, ["scipy"], fake_timer({"dense": 1.0, "scipy": 0.1}))
    assert sel.kernel == "dense"


def test_unsupported_kernel_is_skipped_with_reason() -> None:
    sel = select_kernel(_sparse_weight(), None, 1, ["semi_structured"], fake_timer({"dense": 1.0}))
    assert sel.kernel == "dense" and "semi_structured" in sel.skipped


def test_from_linear_auto_and_forced() -> None:
    lin = nn.Linear(48, 32)
    with torch.no_grad():
        lin.weight.copy_(_sparse_weight())
    x = torch.randn(2, 5, 48)
    ref = lin(x).detach()
    auto = SparseLinear.from_linear(lin, "auto", 1, candidates=["scipy"], timer=fake_timer({"dense": 1.0, "scipy": 0.1}))
    assert auto.kernel == "scipy"
    forced = SparseLinear.from_linear(lin, "torch_csr")
    with torch.no_grad():
        for m in (auto, forced):
            torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(forced.to_dense_weight(), lin.weight.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kernel", ["torch_csr", "scipy", "dense"])
def test_sparse_linear_output_is_contiguous_like_nn_linear(kernel) -> None:
    """Whatever layout a kernel returns, SparseLinear hands on a contiguous tensor, as
    nn.Linear does (a transposed view sent attention down its slow fp32 path on a GPU)."""
    lin = nn.Linear(48, 32)
    with torch.no_grad():
        lin.weight.copy_(_sparse_weight())
    sl = SparseLinear.from_linear(lin, kernel=kernel)
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        y = sl(x)
    assert y.shape == (2, 5, 32) and y.is_contiguous()
    torch.testing.assert_close(y, lin(x).detach(), atol=1e-4, rtol=1e-4)


def test_sparse_linear_refuses_gradients() -> None:
    from sparsetorch.errors import ModelError

    m = SparseLinear.from_linear(nn.Linear(8, 4), "torch_csr")
    with pytest.raises(ModelError, match="no_grad"):
        m(torch.randn(1, 8, requires_grad=True))


def test_parallel_kernel_needs_clear_win_over_its_single_thread_twin() -> None:
    from sparsetorch.inference import _ext

    if _ext.get_extension() is None:
        pytest.skip("compiled kernels unavailable")
    cands = ["csr", "csr_serial"]
    sel = select_kernel(_sparse_weight(), None, 1, cands, fake_timer({"dense": 1.0, "csr": 0.45, "csr_serial": 0.5}))
    assert sel.kernel == "csr_serial"
    sel = select_kernel(_sparse_weight(), None, 1, cands, fake_timer({"dense": 1.0, "csr": 0.2, "csr_serial": 0.5}))
    assert sel.kernel == "csr"


def test_paired_decode_alternates_the_two_models_and_takes_each_ones_median(monkeypatch) -> None:
    import sparsetorch.inference.bench as bench

    calls: list[str] = []
    speeds = {"a": iter([1.0, 10.0, 11.0, 12.0]), "b": iter([2.0, 20.0, 30.0, 25.0])}

    def fake_runs(model, prompt, new_tokens=32, repeats=3):
        calls.append(model)
        return [next(speeds[model])]

    monkeypatch.setattr(bench, "decode_runs", fake_runs)
    ta, tb = bench.paired_decode_tokens_per_s("a", "b", None, rounds=3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-ups, then the order flips each round
    assert (ta, tb) == (11.0, 25.0)  # medians of the timed runs only
