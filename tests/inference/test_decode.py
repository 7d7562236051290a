"""The compiled decode path: the same greedy tokens as Hugging Face ``generate`` (fp32), sparse
(SparseLinear) models, low-bit weights, sampling, and the fallback to ``generate`` with a notice."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparsetorch.errors import DataError, MethodError, ModelError  # noqa: E402
from sparsetorch.inference import sparsify_for_inference  # noqa: E402
from sparsetorch.inference._decode_ext import get_decode_extension  # noqa: E402
from sparsetorch.inference.decode import DecodeEngine, EngineLM, decode_support, generate  # noqa: E402

pytestmark = pytest.mark.skipif(get_decode_extension() is None, reason="compiled decode extension unavailable")


def tiny_llama(seed: int = 0, *, hidden: int = 72, inter: int = 136, tied: bool = True, bias: bool = False,
               vocab: int = 300, model_type: str = "llama") -> torch.nn.Module:
    """A random Llama with odd sizes (hidden 72 and 136 are not multiples of 16: kernel tails run).
    initializer_range 0.15 makes the logits spread, so greedy decoding does not repeat one token."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              tie_word_embeddings=tied, initializer_range=0.15)
    if model_type == "qwen2":
        cfg = transformers.Qwen2Config(**kw)
    else:
        cfg = transformers.LlamaConfig(attention_bias=bias, mlp_bias=bias, **kw)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def hf_greedy(model: torch.nn.Module, ids: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              eos_token_id=None, pad_token_id=0)


def prune_half(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "layers" in name:
                k = p.numel() // 2
                th = p.abs().flatten().kthvalue(k).values
                p[p.abs() <= th] = 0.0


def prompt(vocab: int = 300, n: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("tied", "bias", "model_type"), [(True, False, "llama"), (False, True, "llama"),
                                                          (True, False, "qwen2")])
def test_greedy_tokens_equal_hf_generate(tied: bool, bias: bool, model_type: str) -> None:
    model = tiny_llama(tied=tied, bias=bias, model_type=model_type)
    ids = prompt()
    ref = hf_greedy(model, ids, 40)
    assert len(set(ref[0, 9:].tolist())) > 5  # a meaningful sequence, not one token repeated
    eng = DecodeEngine.from_model(model)
    assert torch.equal(eng.generate(ids, 40), ref)
    # the batched prompt path scores every position like the HF forward
    with torch.no_grad():
        hl = model(ids).logits[0]
    assert torch.allclose(eng.logits(ids[0]), hl, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["auto", "dense", "bitmask", "csr"])
def test_sparse_model_with_sparse_linear_layers_decodes_like_hf(layout: str) -> None:
    model = tiny_llama(seed=2)
    prune_half(model)
    ids = prompt(seed=4)
    ref = hf_greedy(model, ids, 30)
    # the model's own layers on our fp32 kernels (forced: no timing in tests)
    sparsify_for_inference(model, kernels=["bitmask"], timer=lambda name, fn: 0.0 if name != "dense" else 1.0,
                           check_model=False)
    assert any(type(m).__name__ == "SparseLinear" for m in model.modules())
    assert torch.equal(hf_greedy(model, ids, 30), ref)  # HF generate through SparseLinear
    eng = DecodeEngine.from_model(model, layout=layout)
    if layout == "auto":
        assert set(eng.layouts[k] for k in eng.layouts if k.startswith("layers")) == {"bitmask"}
    assert torch.equal(eng.generate(ids, 30), ref)


@pytest.mark.parametrize(("dtype", "tol"), [("fp16", 2e-3), ("bf16", 2e-2), ("int8", 8e-2)])
def test_low_bit_engines_compute_the_rounded_model_exactly(dtype: str, tol: float) -> None:
    """The low-bit engine equals (fp32 round-off) the HF model whose weights are replaced by their
    rounded values; it stays near the fp32 model (a random model with a large init amplifies
    rounding through the layers, so the closeness bound is loose; perplexity is measured on SmolLM2)."""
    import copy

    from sparsetorch.inference.lowbit import pack_lowbit, unpack_lowbit

    model = tiny_llama(seed=5)
    prune_half(model)
    ids = prompt(seed=6, n=20)
    ref = DecodeEngine.from_model(model).logits(ids[0])
    eng = DecodeEngine.from_model(model, dtype)
    lo = eng.logits(ids[0])
    assert (lo - ref).abs().max() <= tol * ref.abs().max()
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() == 2:  # every projection, the (tied) embedding and head
                p.copy_(unpack_lowbit(pack_lowbit(p, "dense", dtype)))
        hl = rounded(ids).logits[0]
    assert torch.allclose(lo, hl, atol=1e-4, rtol=1e-4)
    assert eng.weight_bytes_per_token < DecodeEngine.from_model(model).weight_bytes_per_token
    # a low-bit decoder with an fp32 head
    assert DecodeEngine.from_model(model, dtype, head_dtype="fp32").config["head_dtype"] == "fp32"


def test_sampling_is_seeded_and_top_k_1_is_greedy() -> None:
    model = tiny_llama(seed=7)
    eng = DecodeEngine.from_model(model)
    ids = prompt(seed=8)

    def sample(seed: int, **kw: object) -> torch.Tensor:
        return eng.generate(ids, 20, do_sample=True, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(0, temperature=0.8, top_p=0.9), sample(0, temperature=0.8, top_p=0.9))
    assert not torch.equal(sample(0, temperature=5.0), sample(1, temperature=5.0))
    assert torch.equal(sample(3, top_k=1), eng.generate(ids, 20))
    with pytest.raises(DataError, match="temperature"):
        sample(0, temperature=0.0)
    with pytest.raises(DataError, match="top_p"):
        sample(0, top_p=1.5)


def test_stops_after_eos_and_reports_profile() -> None:
    model = tiny_llama(seed=9)
    eng = DecodeEngine.from_model(model)
    ids = prompt(seed=10)
    full = eng.generate(ids, 20, profile=True)
    stats = eng.last_stats
    assert stats is not None and stats.calls == 20 and stats.linear_seconds > 0
    assert len(stats.token_seconds) == 19 and stats.overhead_seconds_per_call >= 0
    eos = int(full[0, 9 + 5])
    first = (full[0, 9:] == eos).nonzero()[0].item()
    out = eng.generate(ids, 20, eos_token_id=eos)
    assert out.shape[1] == 9 + first + 1 and int(out[0, -1]) == eos
    assert torch.equal(eng.generate(ids, 0), ids)


def test_engine_lm_scores_windows_like_the_model() -> None:
    from sparsetorch.evaluate import perplexity

    model = tiny_llama(seed=11)
    windows = torch.randint(0, 300, (3, 17), generator=torch.Generator().manual_seed(0))
    ref = perplexity(model, windows=windows, progress=False)
    ours = perplexity(EngineLM(DecodeEngine.from_model(model)), windows=windows, progress=False)
    assert ours == pytest.approx(ref, rel=1e-5)


def test_unsupported_models_fall_back_to_hf_generate_with_one_notice() -> None:
    model = tiny_llama(seed=12)
    ids = prompt(seed=13)
    ref = hf_greedy(model, ids, 10)
    handle = model.model.layers[0].mlp.register_forward_hook(lambda m, i, o: o)
    try:
        assert "forward hooks" in (decode_support(model) or "")
        notes: list[str] = []
        out = generate(model, ids, 10, eos_token_id=None, notice=notes.append)
        assert torch.equal(out, ref)
        assert len(notes) == 1 and "falling back to transformers generate" in notes[0] and "\n" not in notes[0]
        with pytest.raises(ModelError, match="needs the fast decode path"):
            generate(model, ids, 10, dtype="int8", notice=notes.append)
    finally:
        handle.remove()
    notes = []
    assert torch.equal(generate(model, ids, 10, eos_token_id=None, notice=notes.append), ref) and notes == []
    # batch > 1 is handed over too
    two = torch.cat([ids, ids])
    out = generate(model, two, 5, eos_token_id=None, notice=notes.append)
    assert out.shape == (2, 14) and "batch of 2" in notes[0]
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval()
    assert "model type 'gpt2'" in decode_support(gpt2)
    with pytest.raises(ModelError, match="cannot run this model"):
        DecodeEngine.from_model(gpt2)


def test_bad_arguments_are_typed_errors() -> None:
    model = tiny_llama(seed=14)
    with pytest.raises(MethodError, match="choose one of fp32, fp16, bf16, int8"):
        DecodeEngine.from_model(model, "fp8")
    with pytest.raises(MethodError, match="fp16"):
        generate(model, prompt(), 3, dtype="fp61")
    eng = DecodeEngine.from_model(model)
    with pytest.raises(DataError, match=r"\[1, T>=1\]"):
        eng.generate(torch.zeros(2, 3, dtype=torch.long), 3)
    with pytest.raises(DataError, match="max_new_tokens"):
        eng.generate(prompt(), -1)


@pytest.mark.slow
def test_smollm2_greedy_tokens_equal_hf_generate() -> None:
    from sparsetorch.data.llm import load_causal_lm

    model, tok = load_causal_lm("smollm2")
    ids = tok("The quick brown fox jumps over the lazy dog. Sparse networks", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
    out = generate(model, ids, 32, notice=pytest.fail)
    assert torch.equal(out, ref)
