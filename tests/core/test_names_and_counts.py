"""Names are normalised once at the API boundary; zero counts never round past the request;
untyped inputs to ``prune`` are typed errors raised before any work."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from tiny_models import make_tiny_llama
from torch import nn

import sparsetorch
from sparsetorch.allocation import global_magnitude
from sparsetorch.errors import DataError, MethodError, ModelError, PatternError
from sparsetorch.patterns import Block, Channel, RowWise, Unstructured, n_pruned, parse_pattern


def _exact_floor(s: str, n: int) -> int:
    """floor(s * n) for the decimal the user wrote (exact rational arithmetic)."""
    return math.floor(Fraction(s) * n)


@pytest.mark.parametrize("s", ["0.9999999999", "0.999999", "0.5000000001", "0.3", "0.29", "0.57", "0.1", "0.7"])
@pytest.mark.parametrize("n", [1, 3, 10, 100, 1000, 4096, 123457, 10**9])
def test_n_pruned_is_the_floor_of_the_request(s: str, n: int) -> None:
    # the old absolute slack (1e-9 * n) rounded 0.9999999999 * 1000 up to all 1000 weights
    assert n_pruned(float(s), n) == min(_exact_floor(s, n), n - 1)


def test_n_pruned_edges() -> None:
    assert n_pruned(0.0, 10) == 0 and n_pruned(0.5, 0) == 0
    assert n_pruned(1.0, 10) == 10  # only an explicit 1.0 (never a valid request) counts all
    largest_below_one = math.nextafter(1.0, 0.0)
    assert n_pruned(largest_below_one, 10**6) == 10**6 - 1
    for n in range(1, 300):  # a computed per-layer sparsity k/n gives back exactly k zeros
        for k in range(n):
            assert n_pruned(k / n, n) == k


@pytest.mark.parametrize("pattern", [Unstructured(), RowWise(), Channel(), Block(2, 2)])
def test_a_sparsity_below_one_never_empties_a_tensor(pattern) -> None:
    torch.manual_seed(0)
    scores = torch.rand(8, 16)
    keep = pattern.mask(scores, 0.9999999999)
    assert int(keep.sum()) >= 1
    if isinstance(pattern, RowWise):
        assert bool((keep.sum(1) == 1).all())  # floor(0.9999999999 * 16) = 15 zeros per row


def test_prune_near_one_keeps_floor_count_in_every_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 100), nn.Linear(100, 10))
    rep = sparsetorch.prune(model, "magnitude", 0.9999999999)
    for name, m in rep.masks.items():
        assert int((~m).sum()) == _exact_floor("0.9999999999", m.numel()) == m.numel() - 1, name


def test_global_allocation_never_empties_a_layer() -> None:
    """A layer of tiny weights would fall entirely under the global threshold."""
    torch.manual_seed(0)
    params = {"big": torch.randn(100, 100), "tiny": torch.randn(4, 4) * 1e-6}
    sp = global_magnitude(params, 0.9)
    total = 100 * 100 + 16
    zeros = {n: n_pruned(sp[n], p.numel()) for n, p in params.items()}
    assert sum(zeros.values()) == math.floor(0.9 * total)
    assert sp["tiny"] < 1.0 and zeros["tiny"] == 15  # its largest weight survives
    model = nn.Sequential(nn.Linear(100, 100, bias=False), nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(params["big"])
        model[1].weight.copy_(params["tiny"])
    rep = sparsetorch.prune(model, "magnitude", 0.9, allocation="global", targets=["0.weight", "1.weight"])
    assert int(rep.masks["1.weight"].sum()) == 1
    assert rep.masks.sparsity().overall == pytest.approx(math.floor(0.9 * total) / total)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def test_allocation_and_method_names_are_case_insensitive() -> None:
    """'Global' used to skip the random scores (case-sensitive '== "global"') and fall back to |W|."""
    a, b = _mlp(), _mlp()
    ra = sparsetorch.prune(a, "random", 0.5, allocation="global")
    rb = sparsetorch.prune(b, " Random ", 0.5, allocation="Global")
    assert rb.allocation == "global" and rb.method == "random"
    for name in ra.masks:
        assert torch.equal(ra.masks[name], rb.masks[name]), name
    c = _mlp()
    rc = sparsetorch.prune(c, "MAGNITUDE", 0.5, allocation="ERK")
    assert rc.allocation == "erk" and rc.method == "magnitude"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"method": None}, MethodError, "pruning method must be a name"),
        ({"method": 3}, MethodError, "pruning method must be a name"),
        ({"allocation": None}, MethodError, "allocation must be a name"),
        ({"allocation": "glob"}, MethodError, "unknown allocation 'glob'"),
        ({"method": "wanda", "allocation": "erk"}, MethodError, "not available for one-shot pruning"),
        ({"method": "random", "allocation": "owl"}, MethodError, "has no calibrated solver"),
        ({"method": "sparsegpt", "blocksize": 0}, MethodError, "blocksize must be >= 1"),
        ({"method": "sparsegpt", "percdamp": 0.0}, MethodError, "percdamp must be > 0"),
        ({"method": "sparsegpt", "percdamp": -0.01}, MethodError, "percdamp must be > 0"),
        ({"method": "sparsegpt", "percdamp": float("nan")}, MethodError, "percdamp must be a finite number"),
        ({"method": "sparsegpt", "blocksize": "big"}, MethodError, "blocksize must be an integer"),
        ({"method": "dsnot", "initial": "dsnot"}, MethodError, "initial must be one of"),
        ({"method": "dsnot", "max_cycles": -1}, MethodError, "max_cycles must be >= 0"),
        ({"method": "wanda", "batch_size": 0}, MethodError, "batch_size must be >= 1"),
        ({"method": "wanda", "reconstruct": "yes please"}, MethodError, "reconstruct must be true or false"),
        ({"method": "wanda", "reconstruct_lr": 0}, MethodError, "reconstruct_lr must be > 0"),
        ({"method": "wanda", "num_samples": 0}, DataError, "num_samples must be an integer >= 1"),
    ],
)
def test_bad_arguments_are_typed_errors_before_any_work(kwargs, error, message) -> None:
    """Raised by the argument check before the model is looked at (here it is not even a model)."""
    with pytest.raises(error, match=message.replace("(", r"\(")):
        sparsetorch.prune("not a model", **{"sparsity": 0.5, **kwargs})


@pytest.mark.parametrize("spec", ["5:4", "4:4", "0:4", "2:0", "-1:4", "1:2000", "1:" + "9" * 5000, "block0x4"])
def test_absurd_patterns_are_pattern_errors(spec: str) -> None:
    with pytest.raises(PatternError):
        parse_pattern(spec)


def test_prune_needs_a_module_with_real_weights() -> None:
    with pytest.raises(ModelError, match="torch.nn.Module"):
        sparsetorch.prune(None)
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8))
    with pytest.raises(ModelError, match="meta device"):
        sparsetorch.prune(meta, "magnitude", 0.5)


@pytest.mark.parametrize("bad", [128, 500, -1])
def test_calibration_ids_outside_the_vocabulary_are_data_errors(bad: int) -> None:
    model = make_tiny_llama(vocab=128)
    calib = torch.randint(0, 128, (2, 16))
    calib[1, 5] = bad
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(DataError, match=r"calibration token ids must be in \[0, 128\)"):
        sparsetorch.prune(model, "wanda", 0.5, calibration=calib, progress=False)
    assert all(torch.equal(p, dense[n]) for n, p in model.named_parameters())  # nothing was pruned


def test_run_oneshot_checks_pipeline_options_itself(tiny_llama) -> None:
    """Direct callers of the pipeline (not only prune() and the CLI) get typed option errors."""
    from sparsetorch.errors import MethodError
    from sparsetorch.oneshot import run_oneshot
    from sparsetorch.patterns import parse_pattern

    params = {n: p for n, p in tiny_llama.named_parameters() if n.endswith("proj.weight")}
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    for bad in ({"batch_size": 0}, {"reconstruct_lr": -1.0}, {"reconstruct_train": "some"}):
        with pytest.raises(MethodError):
            run_oneshot(tiny_llama, method="wanda", sparsity=0.5, pattern=parse_pattern("unstructured"),
                        params=params, calibration=ids, num_samples=2, seq_len=8, progress=False, **bad)
