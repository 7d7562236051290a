"""Sparse LoRA on a tiny pruned Llama: the masked merge is W + M ⊙ s·BA by definition, the merged
model computes what the adapted one did, masks and 2:4 survive training, merge and a save/load
round trip, the naive route (dense merge, re-prune) is what masking avoids, resume is
bit-identical, and bad inputs get typed errors."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import make_tiny_llama

import sparsetorch
from sparsetorch import MaskSet
from sparsetorch.errors import MaskError

peft = pytest.importorskip("peft")
from sparsetorch.finetune import FinetuneError, WindowSampler, finetune, load_checkpoint  # noqa: E402
from sparsetorch.finetune.lora import (  # noqa: E402
    LoraError,
    LoraSettings,
    add_sparse_lora,
    base_name,
    lora_layers,
    merge_masked,
    merge_naive,
    peft_masks,
)

VOCAB = 64
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def _pruned(pattern="2:4"):
    dense = make_tiny_llama(vocab=VOCAB)
    student = copy.deepcopy(dense)
    masks = sparsetorch.prune(student, "magnitude", 0.5 if pattern == "unstructured" else None, pattern).masks
    return dense, student, masks


def _windows(n=6, seq=16, seed=0):
    return torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def _random_b(pm, seed=1):
    """LoRA initialises B = 0 (delta 0); give every B random values so merges have something to do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(pm).values():
            w = layer.lora_B["default"].weight
            w.copy_(0.1 * torch.randn(w.shape, generator=g))


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _nm_ok(w, n=2, m=4):
    return int((w != 0).reshape(w.shape[0], -1, m).sum(-1).max()) <= n


# ------------------------------------------------------------------------------- definitions
def test_masked_merge_is_w_plus_mask_times_scaled_ba_by_hand():
    _, student, masks = _pruned()
    pm = add_sparse_lora(student, masks, r=4, alpha=6.0)
    _random_b(pm)
    s = 6.0 / 4  # alpha / r, by hand
    expected = {}
    for name, layer in lora_layers(pm).items():
        w = layer.get_base_layer().weight.detach().clone()
        a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        pname = base_name(f"{name}.base_layer.weight")
        m = masks.masks[pname]
        expected[pname] = (w + m * (s * (b @ a)), m)
    assert len(expected) == 14  # 7 linear layers x 2 blocks, all pruned, all adapted by default
    merged = merge_masked(pm)
    assert merged is student and not lora_layers(merged)
    params = dict(merged.named_parameters())
    for pname, (want, m) in expected.items():
        got = params[pname].detach()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert not got[~m].any(), pname  # exactly zero where pruned
        assert _nm_ok(got), pname
    masks.verify(merged)
    # the merged model has exactly the plain model's keys (the mask buffer left with the adapter)
    assert list(merged.state_dict()) == list(make_tiny_llama(vocab=VOCAB).state_dict())
    assert all(p.requires_grad for p in merged.parameters())  # peft's freezing undone


def test_merged_logits_equal_the_unmerged_adapter_forward():
    _, student, masks = _pruned("unstructured")
    pm = add_sparse_lora(student, masks, r=4)
    _random_b(pm)
    ids = _windows(3, 16, seed=4)
    before = _logits(pm, ids)
    merged = merge_masked(pm)
    after = _logits(merged, ids)
    assert (before - after).abs().max() <= 1e-5
    # and the adapters did change the function (B is not zero): the check is not vacuous
    _, ref, _ = _pruned("unstructured")
    assert (after - _logits(ref, ids)).abs().max() > 1e-3


def test_dropout_path_is_base_plus_masked_delta():
    """In training with dropout the layer computes base(x) + drop(x) Δᵀ (peft's semantics) with the
    masked Δ; with p = 0 that equals x (W + M ⊙ s·BA)ᵀ + b computed by hand."""
    _, student, masks = _pruned()
    pm = add_sparse_lora(student, masks, r=4, dropout=0.2)
    _random_b(pm)
    name, layer = next(iter(lora_layers(pm).items()))
    layer.lora_dropout["default"].p = 0.0
    layer.train()
    x = torch.randn(5, layer.in_features)
    w = layer.get_base_layer().weight.detach()
    m = masks.masks[base_name(f"{name}.base_layer.weight")]
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    want = x @ (w + m * (2.0 * (b @ a))).T  # alpha defaults to 2r: s = 2
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-5)
        layer.eval()
        torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------- training
def test_training_keeps_masks_through_steps_merge_and_save_load(tmp_path):
    dense, student, masks = _pruned()
    support = {n: p.detach() != 0 for n, p in student.named_parameters() if n in masks.masks}
    assert all(torch.equal(support[n], masks.masks[n]) for n in support)  # the parent's nnz = the mask
    w0 = {n: p.detach().clone() for n, p in student.named_parameters()}
    res = finetune(student, masks, _windows(), teacher=dense, loss="kd", steps=4, lr=1e-2, batch_size=2,
                   progress=False, bf16=False, lora=LoraSettings(r=4, target_modules=("q_proj", "up_proj")))
    assert res.steps == 4 and res.trainable_params == 2 * (4 * (64 + 64) + 4 * (64 + 128))
    assert not lora_layers(student)  # merged in place: a plain model again
    params = dict(student.named_parameters())
    for n, m in masks.masks.items():
        w = params[n].detach()
        assert torch.equal(w != 0, m), n  # nnz and position exactly preserved
        assert _nm_ok(w), n
        trained = n.endswith(("q_proj.weight", "up_proj.weight"))
        assert torch.equal(w, w0[n]) != trained, n  # adapted layers moved, the others did not
    assert all(torch.equal(p.detach(), w0[n]) for n, p in params.items() if n not in masks.masks)
    masks.verify(student)
    # save/load round trip of the merged model and its masks
    student.save_pretrained(tmp_path / "m")
    masks.save(tmp_path / "masks.safetensors")
    import transformers

    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    loaded = MaskSet.load(tmp_path / "masks.safetensors")
    loaded.verify(back)
    for n, p in back.named_parameters():
        assert torch.equal(p.detach(), params[n].detach()), n
        if n in masks.masks:
            assert torch.equal(p.detach() != 0, loaded.masks[n]), n


def test_gradient_checkpointing_gives_the_same_lora_run():
    _, s1, masks = _pruned()
    s2 = copy.deepcopy(s1)
    kw = dict(loss="ce", steps=2, lr=1e-2, batch_size=2, progress=False, bf16=False, lora=4)
    a = finetune(s1, masks, _windows(), **kw)
    b = finetune(s2, masks, _windows(), gradient_checkpointing=True, **kw)
    assert a.losses == b.losses and a.grad_norms[0] > 0  # the adapters got gradients
    for (n, p), (_, q) in zip(s1.named_parameters(), s2.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)


def test_a_failed_run_gives_back_the_plain_model():
    _, student, masks = _pruned()
    w0 = {n: p.detach().clone() for n, p in student.state_dict().items()}

    def boom(done, res, model):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        finetune(student, masks, _windows(), loss="ce", steps=3, progress=False, lora=4, on_step=boom)
    assert not lora_layers(student) and all(p.requires_grad for p in student.parameters())
    sd = student.state_dict()
    assert list(sd) == list(w0) and all(torch.equal(sd[k], w0[k]) for k in w0)  # unmerged: unchanged


def test_resume_of_a_lora_run_is_bit_identical(tmp_path, monkeypatch):
    dense, student, masks = _pruned()
    kw = dict(teacher=dense, loss="kd", steps=5, lr=5e-3, batch_size=2, checkpoint_every=2, progress=False,
              bf16=False, lora={"r": 4, "dropout": 0.1}, eval_windows=_windows(2, 16, seed=9))
    a = copy.deepcopy(student)
    full = finetune(a, masks, _windows(), checkpoint_dir=tmp_path / "a", **kw)
    b = copy.deepcopy(student)
    real = WindowSampler.__call__

    def stop_at_3(self, i):
        if i == 3:
            raise KeyboardInterrupt
        return real(self, i)

    monkeypatch.setattr(WindowSampler, "__call__", stop_at_3)
    with pytest.raises(KeyboardInterrupt):
        finetune(b, masks, _windows(), checkpoint_dir=tmp_path / "b", **kw)
    monkeypatch.setattr(WindowSampler, "__call__", real)
    state, saved = load_checkpoint(tmp_path / "b")
    assert state["step"] == 2 and state["config"]["adapter"]["r"] == 4
    assert any(".lora_A." in k for k in state["model"])  # the adapters are in the checkpoint
    assert all(".base_layer." in n for n in saved.masks if "proj" in n)  # peft names, mapped back on resume
    c = make_tiny_llama(vocab=VOCAB, seed=5)  # unrelated weights: everything comes from the checkpoint
    res = finetune(c, None, _windows(), checkpoint_dir=tmp_path / "b", resume=tmp_path / "b", **kw)
    for (n, p), (_, q) in zip(a.state_dict().items(), c.state_dict().items(), strict=True):
        assert torch.equal(p, q), n
    assert res.losses == full.losses and res.evals[-1] == full.evals[-1] and res.resumed_from == 2
    masks.verify(c)
    # another rank is refused with a message naming the setting
    d = copy.deepcopy(student)
    with pytest.raises(FinetuneError, match="adapter"):
        finetune(d, masks, _windows(), checkpoint_dir=tmp_path / "b", resume=tmp_path / "b",
                 **{**kw, "lora": {"r": 8, "dropout": 0.1}})
    assert not lora_layers(d)


# ------------------------------------------------------------------------------- the naive route
def test_naive_dense_merge_is_denser_and_its_reprune_differs_from_the_masked_merge():
    _, student, masks = _pruned()
    ids = _windows(3, 16, seed=4)
    sparse_pm = add_sparse_lora(copy.deepcopy(student), masks, r=4)
    _random_b(sparse_pm)
    # the same adapters as ordinary (unmasked) peft LoRA
    plain_pm = peft.get_peft_model(copy.deepcopy(student), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"]))
    lora_sd = {k: v for k, v in sparse_pm.state_dict().items() if ".lora_" in k}
    missing = plain_pm.load_state_dict(lora_sd, strict=False)
    assert not missing.unexpected_keys and all(".lora_" not in k for k in missing.missing_keys)
    plain_logits = _logits(plain_pm, ids)

    parent_nnz = sum(int(m.sum()) for m in masks.masks.values())
    dense = copy.deepcopy(plain_pm).merge_and_unload()
    dparams = dict(dense.named_parameters())
    assert sum(int((dparams[n] != 0).sum()) for n in masks.masks) > 1.9 * parent_nnz  # plain merge: dense
    with pytest.raises(MaskError):
        masks.verify(dense)

    naive, new_masks = merge_naive(plain_pm, masks)
    new_masks.verify(naive)
    for n, m in masks.masks.items():
        assert int(new_masks.masks[n].sum()) == int(m.sum()) and str(new_masks.patterns[n]) == "2:4", n
    assert any(not torch.equal(new_masks.masks[n], m) for n, m in masks.masks.items())  # another mask
    masked = merge_masked(sparse_pm)
    mparams, nparams = dict(masked.named_parameters()), dict(naive.named_parameters())
    assert any(not torch.equal(mparams[n], nparams[n]) for n in masks.masks)
    # re-pruning changed the function; the masked merge did not change its adapter's function
    gap_naive = float((_logits(naive, ids) - plain_logits).abs().max())
    assert gap_naive > 1e-3
    # merge_naive of a *sparse* LoRA model ignores the mask too (dense delta, then re-prune)
    sp2 = add_sparse_lora(copy.deepcopy(student), masks, r=4)
    _random_b(sp2)
    naive2, _ = merge_naive(sp2, masks)
    for n in masks.masks:
        assert torch.equal(dict(naive2.named_parameters())[n], nparams[n]), n


# ------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kw, match", [
    (dict(r=0), "rank r must be a positive integer"),
    (dict(r=-2), "rank r must be a positive integer"),
    (dict(r=True), "rank r must be a positive integer"),
    (dict(r=2.5), "rank r must be a positive integer"),
    (dict(alpha=0), "alpha must be a finite number > 0"),
    (dict(alpha=float("nan")), "alpha must be a finite number > 0"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(target_modules="("), "not a valid regular expression"),
    (dict(target_modules=[]), "non-empty list"),
    (dict(target_modules=["nope_proj"]), "'nope_proj' matches no module"),
    (dict(target_modules=r"model\.nothing"), "matches no module name"),
    (dict(target_modules=["embed_tokens"]), r"\(Embedding\) is not a plain nn.Linear"),
    (dict(target_modules=["mlp"]), r"\(LlamaMLP\) is not a plain nn.Linear"),
])
def test_bad_settings_raise_lora_error_and_leave_the_model_alone(kw, match):
    _, student, masks = _pruned()
    with pytest.raises(LoraError, match=match):
        add_sparse_lora(student, masks, **kw)
    assert not lora_layers(student) and all(p.requires_grad for p in student.parameters())


def test_bad_models_and_masks():
    _, student, masks = _pruned()
    with pytest.raises(LoraError, match="must be a sparsetorch.MaskSet"):
        add_sparse_lora(student, dict(masks.masks))
    other = MaskSet({"model.layers.9.mlp.up_proj.weight": torch.ones(128, 64, dtype=torch.bool)})
    with pytest.raises(MaskError, match="names no parameter"):
        add_sparse_lora(student, other)
    wrong_shape = MaskSet({"model.layers.0.mlp.up_proj.weight": torch.ones(64, 64, dtype=torch.bool)})
    with pytest.raises(MaskError, match="shape"):
        add_sparse_lora(student, wrong_shape)
    dense_model = make_tiny_llama(vocab=VOCAB)  # weights that do not obey the masks
    with pytest.raises(MaskError, match="mask says pruned"):
        add_sparse_lora(dense_model, masks)
    no_linear_masks = MaskSet({"model.embed_tokens.weight": torch.ones(VOCAB, 64, dtype=torch.bool)})
    with pytest.raises(LoraError, match="no nn.Linear of the model has a mask"):
        add_sparse_lora(student, no_linear_masks)
    assert not lora_layers(student)
    pm = add_sparse_lora(student, masks, r=2)
    with pytest.raises(LoraError, match="already has peft adapters"):
        add_sparse_lora(pm, masks)
    with pytest.raises(LoraError, match="already has peft adapters"):
        add_sparse_lora(student, masks)  # the wrapped model itself now holds LoRA layers
    with pytest.raises(LoraError, match="mixed-adapter"):
        next(iter(lora_layers(pm).values()))(torch.randn(1, 64), adapter_names=["default"])
    merge_masked(pm)
    plain = peft.get_peft_model(copy.deepcopy(student), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(LoraError, match="not made by add_sparse_lora"):
        merge_masked(plain)
    with pytest.raises(LoraError, match="no LoRA layers"):
        merge_naive(student, masks)
    with pytest.raises(LoraError, match="must be a sparsetorch.MaskSet"):
        merge_naive(plain, None)


@pytest.mark.parametrize("lora, match", [
    (0, "rank r must be a positive integer"),
    (True, "lora must be None, a rank"),
    ("16", "lora must be None, a rank"),
    ({"rank": 4}, r"unknown LoRA setting\(s\) \['rank'\]"),
])
def test_finetune_rejects_bad_lora_before_touching_the_model(lora, match):
    _, student, masks = _pruned()
    with pytest.raises(LoraError, match=match):
        finetune(student, masks, _windows(), loss="ce", steps=1, progress=False, lora=lora)
    with pytest.raises(FinetuneError, match="LoRA needs the MaskSet"):
        finetune(student, None, _windows(), loss="ce", steps=1, progress=False, lora=4)
    assert not lora_layers(student)


def test_settings_and_names():
    s = LoraSettings.parse({"r": 8, "target_modules": ["q_proj"]})
    assert s.lora_alpha == 16.0 and s.scaling == 2.0 and s.target_modules == ("q_proj",)
    assert s.to_dict() == {"kind": "sparse-lora", "r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": ["q_proj"]}
    assert LoraSettings.parse(4) == LoraSettings(r=4) and LoraSettings.parse(None) is None
    assert LoraSettings(r=4, alpha=4).scaling == 1.0
    assert base_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == \
        "model.layers.0.self_attn.q_proj.weight"
    assert base_name("base_model.model.model.norm.weight") == "model.norm.weight"
    _, student, masks = _pruned()
    pm = add_sparse_lora(student, masks, r=2, target_modules=r".*\.0\.self_attn\.q_proj")
    assert list(lora_layers(pm)) == ["base_model.model.model.layers.0.self_attn.q_proj"]
    renamed = peft_masks(pm)
    assert set(map(base_name, renamed.masks)) == set(masks.masks)
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" in renamed.masks
    assert "base_model.model.model.layers.1.mlp.up_proj.weight" in renamed.masks  # not adapted: no base_layer
    params = dict(pm.named_parameters())
    assert all(tuple(params[n].shape) == tuple(m.shape) for n, m in renamed.masks.items())
    renamed.verify(pm)
    # seeded init: the same seed gives the same A, and B starts at 0 (the wrapped model is the parent)
    _, s2, _ = _pruned()
    pm2 = add_sparse_lora(s2, masks, r=2, target_modules=r".*\.0\.self_attn\.q_proj")
    k = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert torch.equal(pm.state_dict()[k], pm2.state_dict()[k])
    assert not any(v.any() for kk, v in pm.state_dict().items() if ".lora_B." in kk)
