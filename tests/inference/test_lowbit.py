"""fp16 / bf16 / int8 values in the dense, bitmask and CSR layouts: the compiled kernels against a
float64 reference, and the quantisation error bounds.

Tolerances (stated once here):

* kernel vs float64 product of the *stored* weights (values times scales): fp32 accumulation
  round-off, at most ``1e-5 * sum_j |w_ij x_j| + 1e-6`` per output;
* stored vs original weight, per weight: fp16 ``|w| * 2**-11`` (round to nearest, 11-bit
  significand, weights in the normal range), bf16 ``|w| * 2**-8``, int8 ``scale_row / 2``;
* every pruned (zero) weight stays exactly zero in every layout and dtype.
"""

from __future__ import annotations

import pytest
import torch

from sparsetorch.errors import MethodError, ModelError
from sparsetorch.inference.lowbit import (
    LAYOUTS,
    VALUE_DTYPES,
    choose_layout,
    lowbit_matmul,
    pack_lowbit,
    packed_nbytes,
    quantize_int8,
    unpack_lowbit,
)

pytestmark = pytest.mark.skipif(
    __import__("sparsetorch.inference._decode_ext", fromlist=["x"]).get_decode_extension() is None,
    reason="compiled decode extension unavailable",
)


def _weight(out: int, inn: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g)
    w[torch.rand(out, inn, generator=g) < sparsity] = 0.0
    return w


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", list(VALUE_DTYPES))
@pytest.mark.parametrize(("out", "inn"), [(7, 16), (33, 37), (64, 100), (40, 576)])
@pytest.mark.parametrize("batch", [1, 2, 5])
def test_kernel_matches_float64_reference(layout: str, dtype: str, out: int, inn: int, batch: int) -> None:
    w = _weight(out, inn, 0.5, seed=out + inn)
    bias = torch.randn(out)
    x = torch.randn(batch, inn)
    p = pack_lowbit(w, layout, dtype)
    stored = unpack_lowbit(p).double()
    ref = x.double() @ stored.T + bias.double()
    bound = 1e-5 * (x.double().abs() @ stored.abs().T) + 1e-6
    y = lowbit_matmul(x, p, bias)
    assert y.dtype == torch.float32 and y.shape == (batch, out)
    assert ((y.double() - ref).abs() <= bound).all()
    # serial and unchecked calls give the same numbers
    assert torch.equal(lowbit_matmul(x, p, bias, serial=True, check=False), lowbit_matmul(x, p, bias, serial=True))


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", list(VALUE_DTYPES))
@pytest.mark.parametrize(("out", "inn"), [(40, 576), (960, 200), (33, 37)])
@pytest.mark.parametrize("serial", [True, False])
def test_transposed_kernel_with_a_threshold_matches_float64_reference(layout: str, dtype: str, out: int, inn: int,
                                                                      serial: bool) -> None:
    """The activation-sparse product (``W^T`` stored, only the rows of inputs at or above the
    threshold read) at one input row: every stored-row group size (eight at a time, four, one),
    the register-form expand where 16 values can be read past a group and the memory form at the
    end of the values, one thread and split across threads."""
    w = _weight(out, inn, 0.5, seed=out * inn)
    bias = torch.randn(out)
    x = torch.randn(1, inn, generator=torch.Generator().manual_seed(inn))
    x[0, -3:] = 5.0  # the last stored rows live: the end of the values is read
    t = 0.5
    p = pack_lowbit(w, layout, dtype, transposed=True, threshold=t)
    stored = unpack_lowbit(p).double()
    assert stored.shape == (out, inn)
    xt = x.double().masked_fill(x.abs() < t, 0)
    ref = xt @ stored.T + bias.double()
    bound = 1e-5 * (xt.abs() @ stored.abs().T) + 1e-6
    y = lowbit_matmul(x, p, bias, serial=serial)
    assert ((y.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", list(VALUE_DTYPES))
def test_pruned_weights_stay_exactly_zero_and_rounding_is_bounded(layout: str, dtype: str) -> None:
    w = _weight(48, 80, 0.6, seed=3)
    p = pack_lowbit(w, layout, dtype)
    stored = unpack_lowbit(p)
    assert (stored[w == 0] == 0).all()
    err = (stored - w).abs()
    if dtype == "fp32":
        assert torch.equal(stored, w)
    elif dtype == "fp16":
        assert (err <= w.abs() * 2**-11 + 1e-12).all()
    elif dtype == "bf16":
        assert (err <= w.abs() * 2**-8 + 1e-12).all()
    else:
        scale = w.abs().amax(1, keepdim=True) / 127
        assert (err <= scale / 2 + 1e-7).all()
    if layout != "dense":  # only the non-zeros are stored
        assert p.values.numel() == int((w != 0).sum())


def test_int8_quantisation_is_symmetric_per_row_and_handles_zero_rows() -> None:
    w = torch.tensor([[0.0, 0.0, 0.0], [1.0, -0.5, 0.25], [-2.0, 0.0, 1.0]])
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert s[0] == 1.0 and q[0].tolist() == [0, 0, 0]
    assert q[1].tolist() == [127, -64, 32] and q[2].tolist() == [-127, 0, 64]
    assert s[1].item() == pytest.approx(1 / 127) and s[2].item() == pytest.approx(2 / 127)


def test_packed_sizes_match_the_formula_and_the_layout_choice() -> None:
    w = _weight(64, 96, 0.5)
    nnz = int((w != 0).sum())
    for layout in LAYOUTS:
        for dtype in VALUE_DTYPES:
            assert pack_lowbit(w, layout, dtype).nbytes == packed_nbytes(64, 96, nnz, layout, dtype), (layout, dtype)
    assert choose_layout(w, "fp16") == "bitmask"  # 50%: 1.125 B/weight vs 2
    assert choose_layout(_weight(64, 96, 0.05), "fp32") == "dense"  # a near-tie stays dense
    assert choose_layout(_weight(64, 96, 0.97), "fp32") == "csr"  # very sparse: indices beat the bit mask


def test_bad_layout_dtype_and_shapes_are_typed_errors() -> None:
    w = _weight(4, 16, 0.5)
    with pytest.raises(MethodError, match="choose one of fp32, fp16, bf16, int8"):
        pack_lowbit(w, "bitmask", "fp8")
    with pytest.raises(MethodError, match="layout"):
        pack_lowbit(w, "blocked", "fp32")
    with pytest.raises(ModelError, match="2-D"):
        pack_lowbit(torch.zeros(3), "dense", "fp32")
    p = pack_lowbit(w, "bitmask", "fp16")
    p.row_ptr = p.row_ptr.clone()
    p.row_ptr[1] += 1  # inconsistent with the bit masks: refused, not read out of bounds
    with pytest.raises(RuntimeError, match="popcount"):
        lowbit_matmul(torch.randn(1, 16), p)


@pytest.mark.parametrize("name", ["bitmask_fp16", "bitmask_bf16", "bitmask_int8", "csr_int8", "dense_fp16"])
def test_sparse_linear_runs_low_bit_kernels_by_name_only(name: str) -> None:
    from torch import nn

    from sparsetorch.inference import SparseLinear, auto_candidates
    from sparsetorch.inference.kernels import LOWBIT_KERNELS

    assert not set(LOWBIT_KERNELS) & set(auto_candidates("cpu"))  # lossy: never picked by "auto"
    lin = nn.Linear(80, 24)
    with torch.no_grad():
        lin.weight[torch.rand(24, 80, generator=torch.Generator().manual_seed(0)) < 0.5] = 0.0
    sl = SparseLinear.from_linear(lin, kernel=name)
    x = torch.randn(3, 5, 80)
    stored = sl.to_dense_weight()
    assert (stored[lin.weight == 0] == 0).all()
    ref = x.double() @ stored.double().T + lin.bias.double()
    with torch.no_grad():
        y = sl(x)
    assert y.shape == (3, 5, 24) and torch.allclose(y.double(), ref, atol=1e-5)
    layout, dtype = name.split("_")
    assert sl.nbytes <= pack_lowbit(lin.weight, "dense", "fp32").nbytes


def test_results_do_not_depend_on_the_thread_count() -> None:
    """Rows are split into chunks taken by the caller and the spin pool's helpers; each row is
    computed by one thread start to end, so 1, 2 and 3 threads give bit-identical outputs."""
    w = _weight(300, 576, 0.5, seed=9)
    x = torch.randn(1, 576)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3, 2):
            torch.set_num_threads(threads)
            outs.append([lowbit_matmul(x, pack_lowbit(w, lay, dt)) for lay in ("dense", "bitmask", "csr")
                         for dt in ("fp32", "int8")])
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other, strict=True))


def test_a_forked_child_computes_with_its_own_pool() -> None:
    """After fork() the parent's helper threads are gone; the child builds a fresh pool."""
    import os

    w = _weight(256, 576, 0.5, seed=11)
    x = torch.randn(1, 576)
    p = pack_lowbit(w, "bitmask", "fp16")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ref = lowbit_matmul(x, p)  # the parent's pool exists now
        pid = os.fork()
        if pid == 0:  # child: exit status says whether the product matched
            ok = torch.equal(lowbit_matmul(x, p), ref)
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        torch.set_num_threads(before)
