"""TEAL activation sparsity inside the decode engine: the transposed kernels read only the weights
of live inputs and give what the PyTorch model with the same thresholds (as hooks) gives."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparsetorch.activation import ActivationThresholds, apply_thresholds, calibrate_thresholds  # noqa: E402
from sparsetorch.errors import DataError, ModelError  # noqa: E402
from sparsetorch.inference._decode_ext import get_decode_extension  # noqa: E402
from sparsetorch.inference.decode import DecodeEngine  # noqa: E402
from sparsetorch.inference.lowbit import pack_lowbit, unpack_lowbit  # noqa: E402

pytestmark = pytest.mark.skipif(get_decode_extension() is None, reason="compiled decode extension unavailable")

from test_decode import hf_greedy, prompt, prune_half, tiny_llama  # noqa: E402


def _thresholds(model: torch.nn.Module, sparsity: float = 0.4, criterion: str = "teal") -> ActivationThresholds:
    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(7))
    return calibrate_thresholds(model, sparsity, calibration=calib, num_samples=4, seq_len=32, batch_size=2,
                                criterion=criterion)


@pytest.mark.parametrize("kernel", ["transposed", "plain"])
@pytest.mark.parametrize("pruned", [False, True])
def test_engine_with_thresholds_equals_the_hooked_model(pruned: bool, kernel: str) -> None:
    model = tiny_llama(seed=21)
    if pruned:
        prune_half(model)
    th = _thresholds(model)
    eng = DecodeEngine.from_model(model, activation=th, activation_kernel=kernel)
    lays = {v for k, v in eng.layouts.items() if k.startswith("layers")}
    suffix = "-t" if kernel == "transposed" else "+thr"
    assert lays == {("bitmask" if pruned else "dense") + suffix}
    assert all(p.transposed == (kernel == "transposed") and p.threshold is not None
               for k, p in eng.packed.items() if k.startswith("layers"))
    assert eng.config["activation"]["matrices"] == 3 * 4
    ids = prompt(seed=22, n=12)
    handle = apply_thresholds(model, th)
    try:
        ref = hf_greedy(model, ids, 30)
        with torch.no_grad():
            hl = model(ids).logits[0]
        assert handle.measured_sparsity > 0.2  # the thresholds do zero inputs
    finally:
        handle.remove()
    assert torch.allclose(eng.logits(ids[0]), hl, atol=1e-4, rtol=1e-4)  # prefill: thresholds applied too
    assert torch.equal(eng.generate(ids, 30), ref)  # one token at a time: the skipping kernels
    # without thresholds the tokens differ: the test sees the thresholds
    assert not torch.equal(DecodeEngine.from_model(model).generate(ids, 30), ref)


def _hooked_greedy(model: torch.nn.Module, th: ActivationThresholds, ids: torch.Tensor, n: int) -> torch.Tensor:
    """HF greedy decoding of ``n`` tokens with the thresholds installed as hooks (removed after)."""
    handle = apply_thresholds(model, th)
    try:
        return hf_greedy(model, ids, n)
    finally:
        handle.remove()


def _hooks_from(model: torch.nn.Module, th: ActivationThresholds, start: int) -> list:
    """Pre-hooks that zero the inputs below each threshold at sequence positions >= start only."""
    def make(t: float):  # noqa: ANN202
        def hook(_m, args):  # noqa: ANN001, ANN202
            x = args[0]
            drop = x.abs() < t
            drop[:, :start] = False
            return (x.masked_fill(drop, 0), *args[1:])
        return hook
    return [model.get_submodule(n).register_forward_pre_hook(make(t)) for n, t in th.thresholds.items()]


@pytest.mark.parametrize("kernel", ["transposed", "plain"])
def test_dense_prompt_runs_only_the_new_tokens_thresholded(kernel: str) -> None:
    """``logits(dense_prefix=P)`` / ``generate(dense_prompt=True)`` equal the model whose thresholds
    apply at positions >= P (the prompt's length) only, by definition, and not the all-sparse one."""
    model = tiny_llama(seed=25)
    prune_half(model)
    th = _thresholds(model)
    eng = DecodeEngine.from_model(model, activation=th, activation_kernel=kernel)
    ids = prompt(seed=26, n=12)
    p = 5
    hs = _hooks_from(model, th, p)
    try:
        with torch.no_grad():
            want = model(ids).logits[0]
    finally:
        for h in hs:
            h.remove()
    got = eng.logits(ids[0], dense_prefix=p)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        dense = model(ids).logits[0]
    assert torch.allclose(got[:p], dense[:p], atol=1e-4, rtol=1e-4)  # the prompt saw no threshold
    assert not torch.allclose(eng.logits(ids[0]), got, atol=1e-3)  # every token thresholded differs
    assert torch.allclose(eng.logits(ids[0], dense_prefix=100), dense, atol=1e-4, rtol=1e-4)
    # generation: the prompt dense, each new token thresholded (full forwards, greedy, by definition)
    seq = ids.clone()
    for _ in range(12):
        hs = _hooks_from(model, th, ids.shape[1])
        try:
            with torch.no_grad():
                nxt = model(seq).logits[0, -1].argmax()
        finally:
            for h in hs:
                h.remove()
        seq = torch.cat([seq, nxt.reshape(1, 1)], dim=1)
    assert torch.equal(eng.generate(ids, 12, dense_prompt=True), seq)
    with pytest.raises(DataError, match="dense_prefix"):
        eng.logits(ids[0], dense_prefix=-1)
    # perplexity of the tokens after the dense prompt, through EngineLM, as the hooked model gives it
    from sparsetorch.evaluate import perplexity
    from sparsetorch.inference.decode import EngineLM

    windows = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(27))
    hs = _hooks_from(model, th, 6)
    try:
        want_ppl = perplexity(model, windows=windows, progress=False, score_from=6)
    finally:
        for h in hs:
            h.remove()
    got_ppl = perplexity(EngineLM(eng, dense_prefix=6), windows=windows, batch_size=1, progress=False, score_from=6)
    assert got_ppl == pytest.approx(want_ppl, rel=1e-4)


def test_auto_keeps_the_faster_kernel_per_kind_of_matrix() -> None:
    """``activation_kernel="auto"``: one measurement per kind of fused matrix, each kind gets the
    faster of its two kernels (a fake clock decides), and the engine still equals the hooked model."""
    model = tiny_llama(seed=31)
    prune_half(model)
    th = _thresholds(model)
    calls: list[set[str]] = []

    def timer(fns: dict) -> dict[str, float]:
        for fn in fns.values():
            fn()  # the candidates run
        calls.append(set(fns))
        fast_t = len(calls) % 2 == 1  # kinds 1 and 3 (qkv, gate_up) transposed, 2 and 4 (o, down) plain
        return {"transposed": 1.0 if fast_t else 2.0, "plain": 2.0 if fast_t else 1.0}

    eng = DecodeEngine.from_model(model, activation=th, timer=timer)
    assert calls == [{"transposed", "plain"}] * 4
    want = {"qkv": "bitmask-t", "o": "bitmask+thr", "gate_up": "bitmask-t", "down": "bitmask+thr"}
    assert {k: v for k, v in eng.layouts.items() if k.startswith("layers")} == {
        f"layers.{i}.{key}": lay for i in range(model.config.num_hidden_layers) for key, lay in want.items()}
    assert eng.config["activation"]["kernel"] == "auto"
    ids = prompt(seed=32, n=8)
    ref = _hooked_greedy(model, th, ids, 20)
    assert torch.equal(eng.generate(ids, 20), ref)
    # a tie keeps the plain kernel
    tie = DecodeEngine.from_model(model, activation=th, timer=lambda fns: dict.fromkeys(fns, 1.0))
    assert {v for k, v in tie.layouts.items() if k.startswith("layers")} == {"bitmask+thr"}
    with pytest.raises(ModelError, match="activation_kernel"):
        DecodeEngine.from_model(model, activation=th, activation_kernel="fast")


def test_timing_input_has_the_calibrated_density() -> None:
    from sparsetorch.inference.decode import _live_input

    x = _live_input(1000, 0.37, 0.5, torch.Generator().manual_seed(1))
    live = x[0] != 0
    assert int(live.sum()) == 370 and bool((x[0][live].abs() >= 0.5).all())


@pytest.mark.parametrize("kernel", ["transposed", "plain"])
@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_low_bit_transposed_engine_matches_the_untransposed_one(dtype: str, kernel: str) -> None:
    """Same rounded values in both storages: the logits of the two layouts agree to fp32 round-off."""
    model = tiny_llama(seed=23)
    th = _thresholds(model, 0.5)
    ids = prompt(seed=24, n=10)
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in rounded.named_parameters():
            if p.dim() == 2 and "layers" in n:
                p.copy_(unpack_lowbit(pack_lowbit(p, "dense", dtype)))
    handle = apply_thresholds(rounded, th)
    try:
        with torch.no_grad():
            hl = rounded(ids).logits[0]
    finally:
        handle.remove()
    eng = DecodeEngine.from_model(model, dtype, head_dtype="fp32", activation=th, activation_kernel=kernel)
    assert torch.allclose(eng.logits(ids[0]), hl, atol=1e-4, rtol=1e-4)


def test_bad_thresholds_are_typed_errors() -> None:
    model = tiny_llama(seed=25)
    th = _thresholds(model)
    with pytest.raises(ModelError, match="TEAL"):
        DecodeEngine.from_model(model, activation=_thresholds(model, criterion="wina"))
    q = next(n for n in th.thresholds if n.endswith("layers.0.self_attn.q_proj"))
    uneven = ActivationThresholds(th.sparsity, "teal", {**th.thresholds, q: th.thresholds[q] * 2})
    with pytest.raises(ModelError, match="share one input"):
        DecodeEngine.from_model(model, activation=uneven)
    partial = ActivationThresholds(th.sparsity, "teal", {k: v for k, v in th.thresholds.items() if k != q})
    with pytest.raises(ModelError, match="share one input"):
        DecodeEngine.from_model(model, activation=partial)
    with pytest.raises(ModelError, match="not on decoder projections"):
        DecodeEngine.from_model(model, activation=ActivationThresholds(0.4, "teal", {**th.thresholds, "lm_head": 0.1}))
    with pytest.raises(DataError, match="does not have"):
        DecodeEngine.from_model(model, activation=ActivationThresholds(0.4, "teal", {"model.nope": 0.1}))
    with pytest.raises(ModelError, match="ActivationThresholds"):
        DecodeEngine.from_model(model, activation={"a": 1.0})


def test_decode_runs_times_an_engine_from_its_first_token() -> None:
    from sparsetorch.inference.bench import decode_runs

    eng = DecodeEngine.from_model(tiny_llama(seed=26))
    runs = decode_runs(eng, prompt(seed=27), new_tokens=5, repeats=2)
    assert len(runs) == 2 and all(r > 0 for r in runs)


def test_generate_keeps_the_thresholds_on_either_path(monkeypatch) -> None:
    """``generate(model, ids, activation=th)``: the engine path and the transformers fallback
    (engine build refused) both give the tokens of the model with the thresholds as hooks, and
    the hooks are gone afterwards."""
    from sparsetorch.inference import decode as dec

    model = tiny_llama(seed=21)
    th = _thresholds(model)
    ids = prompt(seed=22, n=12)
    ref = _hooked_greedy(model, th, ids, 20)
    dense = hf_greedy(model, ids, 20)
    assert not torch.equal(dense, ref)  # the thresholds change the tokens: the test sees them
    assert torch.equal(dec.generate(model, ids, 20, activation=th, notice=lambda m: None), ref)

    def refuse(*a, **k):
        raise ModelError("not supported here")

    monkeypatch.setattr(dec.DecodeEngine, "from_model", refuse)
    said: list[str] = []
    assert torch.equal(dec.generate(model, ids, 20, activation=th, notice=said.append), ref)
    assert said and "not supported here" in said[0]
    assert torch.equal(dec.generate(model, ids, 20, notice=said.append), dense)  # hooks removed


def test_generate_refuses_thresholds_with_an_engine_built_without_them() -> None:
    from sparsetorch.inference.decode import generate

    model = tiny_llama(seed=21)
    with pytest.raises(DataError, match="built without activation thresholds"):
        generate(model, prompt(seed=22, n=4), 4, activation=_thresholds(model), engine=DecodeEngine.from_model(model))
