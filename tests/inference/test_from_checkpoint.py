"""`DecodeEngine.from_checkpoint`: a saved model's stored parts read straight into the engine's
layouts (int8 format v3, fp16, bitmask / csr / n:m / dense), the same packed bytes and greedy
tokens as decoding and repacking, pruned weights exactly zero, and the fallback said out loud."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_decode import prompt, prune_half, tiny_llama  # noqa: E402

from sparsetorch.errors import CheckpointError, ModelError  # noqa: E402
from sparsetorch.export import load_hf, load_state_dict, save  # noqa: E402
from sparsetorch.inference._decode_ext import get_decode_extension  # noqa: E402
from sparsetorch.inference.decode import DecodeEngine  # noqa: E402
from sparsetorch.inference.lowbit import unpack_lowbit  # noqa: E402

pytestmark = pytest.mark.skipif(get_decode_extension() is None, reason="compiled decode extension unavailable")


def prune_24(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "layers" in name:
                g = p.view(p.shape[0], -1, 4)
                g.scatter_(-1, g.abs().argsort(-1)[..., :2], 0.0)


def same_packs(a: DecodeEngine, b: DecodeEngine) -> None:
    assert a.packed.keys() == b.packed.keys() and a.layouts == b.layouts
    for name, p in a.packed.items():
        q = b.packed[name]
        assert (p.layout, p.dtype, p.out_features, p.in_features) == (q.layout, q.dtype, q.out_features, q.in_features)
        for x, y in zip(p.tensors(), q.tensors(), strict=True):
            assert x.dtype == y.dtype and torch.equal(x.view(-1).view(torch.uint8) if x.numel() else x,
                                                      y.view(-1).view(torch.uint8) if y.numel() else y), name


def saved(tmp_path, model: torch.nn.Module, fmt: str = "auto", quantize: str | None = None):
    folder = tmp_path / "ck"
    folder.mkdir(exist_ok=True)
    return save(model, folder, format=fmt, quantize=quantize)


@pytest.mark.parametrize(("fmt", "quantize", "dtype"), [
    ("bitmask", "int8", "int8"), ("csr", "int8", "int8"), ("dense", "int8", "int8"), ("auto", None, "fp32"),
    ("csr", None, "fp32"),
])
def test_stored_parts_are_read_directly_with_the_same_bytes_and_tokens(tmp_path, fmt, quantize, dtype) -> None:
    model = tiny_llama(seed=11, hidden=64, inter=128)  # rows of 64 / 128 inputs: bit rows align
    prune_half(model)
    path = saved(tmp_path, model, fmt, quantize)
    lines: list[str] = []
    layout = {"dense": "dense", "csr": "csr"}.get(fmt, "auto")
    eng = DecodeEngine.from_checkpoint(path, dtype, layout=layout, notice=lines.append)
    rep = DecodeEngine.from_checkpoint(path, dtype, layout=layout, direct=False, notice=None)
    layer_mats = [k for k in eng.sources if k.startswith("layers.")]
    assert all(eng.sources[k] == "direct" for k in layer_mats), eng.sources
    assert all(v == "repacked" for v in rep.sources.values())
    n_direct = sum(v == "direct" for v in eng.sources.values())
    assert len(lines) == 1 and f"{n_direct} of {len(eng.sources)} weight matrices" in lines[0]
    assert "read directly" in repr(eng) and "0 read directly" in repr(rep)
    same_packs(eng, rep)
    ids = prompt(seed=12, n=7)
    out = eng.generate(ids, 24)
    assert torch.equal(out, rep.generate(ids, 24))
    # ... the tokens of the model loaded the ordinary way, packed by from_model
    lm, masks = load_hf(path)
    assert torch.equal(out, DecodeEngine.from_model(lm.float(), dtype, layout=layout).generate(ids, 24))
    # pruned weights stay exactly zero in what the engine reads; the masks still verify
    state, masks = load_state_dict(path)
    masks.verify(state)
    for i in range(2):
        w = unpack_lowbit(eng.packed[f"layers.{i}.qkv"])
        orig = torch.cat([getattr(model.model.layers[i].self_attn, n).weight for n in ("q_proj", "k_proj", "v_proj")])
        assert (w[orig == 0] == 0).all() and not torch.signbit(w[orig == 0]).any()


def test_fp16_and_24_checkpoints_read_directly(tmp_path) -> None:
    model = tiny_llama(seed=13, hidden=64, inter=128)
    prune_24(model)
    path = saved(tmp_path, model.half())  # auto stores a 2:4 tensor as n:m
    from sparsetorch.export import reader

    ck = reader.Checkpoint(path)
    assert ck.info("model.layers.0.mlp.down_proj.weight").format.value == "n:m"
    eng = DecodeEngine.from_checkpoint(path, "fp16", notice=None)
    rep = DecodeEngine.from_checkpoint(path, "fp16", direct=False, notice=None)
    assert set(eng.sources.values()) == {"direct"}  # embedding and head are fp16 too
    assert {eng.layouts[k] for k in eng.layouts if k.startswith("layers.")} == {"bitmask"}
    same_packs(eng, rep)
    ids = prompt(seed=14)
    lm, _ = load_hf(path)
    assert torch.equal(eng.generate(ids, 20), DecodeEngine.from_model(lm.float(), "fp16").generate(ids, 20))


def test_mismatches_fall_back_to_repacking_and_say_why(tmp_path) -> None:
    model = tiny_llama(seed=15)  # 72 inputs per row: the stored bit rows do not align to 16
    prune_half(model)
    path = saved(tmp_path, model, "bitmask", "int8")
    lines: list[str] = []
    eng = DecodeEngine.from_checkpoint(path, "int8", notice=lines.append)
    assert all(eng.sources[k] == "repacked" for k in eng.sources if k.startswith("layers."))
    assert "not a multiple of 16" in lines[0] and "repacked" in repr(eng)
    same_packs(eng, DecodeEngine.from_checkpoint(path, "int8", direct=False, notice=None))
    # another value type than stored: repacked, the same as packing the loaded model
    fp16 = DecodeEngine.from_checkpoint(path, "fp16", notice=lines.append)
    assert {fp16.sources[k] for k in fp16.sources} == {"repacked"} and "stored as int8" in lines[-1]
    ids = prompt(seed=16)
    lm, _ = load_hf(path)
    assert torch.equal(fp16.generate(ids, 16), DecodeEngine.from_model(lm.float(), "fp16").generate(ids, 16))


def test_bad_checkpoints_are_typed_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError):
        DecodeEngine.from_checkpoint(tmp_path / "missing.safetensors")
    sd = {"a.weight": torch.randn(4, 4)}
    path = save(sd, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="no Hugging Face config"):
        DecodeEngine.from_checkpoint(path)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    (tmp_path / "g").mkdir()
    path = save(gpt2, tmp_path / "g")
    with pytest.raises(ModelError, match="cannot run this model"):
        DecodeEngine.from_checkpoint(path)


def test_biases_and_an_untied_head(tmp_path) -> None:
    """Qwen2 (q/k/v biases) with its own LM head: biases fused like from_model, the head read too."""
    model = tiny_llama(seed=17, hidden=64, inter=128, model_type="qwen2", tied=False)
    prune_half(model)
    path = saved(tmp_path, model, "bitmask", "int8")
    eng = DecodeEngine.from_checkpoint(path, "int8", head_dtype="fp32", notice=None)
    assert "lm_head" in eng.packed and not eng.config["tied_embeddings"]
    assert eng.sources["lm_head"] == "direct" and eng.sources["layers.0.qkv"] == "direct"
    same_packs(eng, DecodeEngine.from_checkpoint(path, "int8", head_dtype="fp32", direct=False, notice=None))
    lm, _ = load_hf(path)
    ref = DecodeEngine.from_model(lm.float(), "int8", head_dtype="fp32")
    assert eng.weight_bytes_per_token == ref.weight_bytes_per_token
    ids = prompt(seed=18)
    assert torch.allclose(eng.logits(ids[0]), ref.logits(ids[0]), atol=1e-5, rtol=1e-5)
    assert torch.equal(eng.generate(ids, 16), ref.generate(ids, 16))


@pytest.mark.parametrize(("quantize", "dtype"), [(None, "fp32"), ("int8", "int8")])
@pytest.mark.parametrize("kernel", ["plain", "transposed"])
def test_activation_thresholds_from_a_checkpoint(tmp_path, quantize, dtype, kernel) -> None:
    """Thresholds calibrated on the float model (saved, loaded) apply to the engine read from the
    checkpoint as to the one built from the model: the same greedy tokens; the plain kernel keeps
    the stored parts read directly, the transposed one repacks them."""
    from test_decode_activation import _thresholds

    from sparsetorch.activation import ActivationThresholds

    model = tiny_llama(seed=41, hidden=64, inter=128)
    prune_half(model)
    path = saved(tmp_path, model, "bitmask", quantize)
    th = _thresholds(model)
    th.save(tmp_path / "th.safetensors")
    loaded = ActivationThresholds.load(tmp_path / "th.safetensors")
    eng = DecodeEngine.from_checkpoint(path, dtype, notice=None, activation=loaded, activation_kernel=kernel)
    ref_model = load_hf(path)[0].float() if quantize else model  # the int8 model as stored
    ref = DecodeEngine.from_model(ref_model, dtype, activation=th, activation_kernel=kernel)
    layers = {k: v for k, v in eng.layouts.items() if k.startswith("layers")}
    assert set(layers.values()) == {"bitmask" + ("-t" if kernel == "transposed" else "+thr")}
    assert layers == {k: v for k, v in ref.layouts.items() if k.startswith("layers")}
    want = "repacked" if kernel == "transposed" else "direct"
    assert {eng.sources[k] for k in layers} == {want}
    assert eng.config["activation"]["matrices"] == len(layers)
    ids = prompt(seed=42, n=10)
    assert torch.equal(eng.generate(ids, 16), ref.generate(ids, 16))
    assert not torch.equal(DecodeEngine.from_checkpoint(path, dtype, notice=None).generate(ids, 16),
                           eng.generate(ids, 16))  # the thresholds act
