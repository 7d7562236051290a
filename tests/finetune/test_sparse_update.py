"""Sparse backpropagation (finetune(update=...)): frozen parts are bit-identical, have no grad and no
optimizer state and run no backward; channel slices change only the chosen channels and save only
their inputs; masks stay exact; bad specs get a typed error before the model changes."""

from __future__ import annotations

import copy

import pytest
import torch
from test_cli_main import run
from tiny_models import make_tiny_llama

import sparsetorch
from sparsetorch.errors import SparseTorchError
from sparsetorch.finetune import (
    FinetuneError,
    SavedTensorsMeter,
    SparseUpdate,
    UpdateError,
    apply_update,
    finetune,
    measure_step,
)
from sparsetorch.finetune import loop as loop_mod
from sparsetorch.finetune.sparse_update import ChannelSlice, resolve
from sparsetorch.models import get_model


def _windows(n=6, seq=16, seed=0, vocab=64):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _llama(layers=3):
    return make_tiny_llama(layers=layers, vocab=64)


def _spy_optimizer(monkeypatch):
    made = []
    real = loop_mod._optimizer

    def spy(model, cfg):
        opt = real(model, cfg)
        made.append(opt)
        return opt

    monkeypatch.setattr(loop_mod, "_optimizer", spy)
    return made


def _train(model, update, masks=None, steps=3, **kw):
    return finetune(model, masks, _windows(), loss="ce", steps=steps, lr=1e-2, batch_size=2, progress=False,
                    update=update, **kw)


# ------------------------------------------------------------------------------------- parsing
def test_parse_canonical_forms():
    s = SparseUpdate.parse("last:4+q_proj, k_proj,norm,channels:0.125:random@mlp.up_proj|o_proj")
    assert s.last == 4 and s.norm and not s.bias and s.names == ("q_proj", "k_proj")
    (c,) = s.channels
    assert (c.fraction, c.layers, c.criterion, c.axis) == (0.125, ("mlp.up_proj", "o_proj"), "random", "in")
    assert SparseUpdate.parse(str(s)) == s  # the string form round-trips
    assert SparseUpdate.parse("rows:0.5@up_proj").channels[0].axis == "out"
    assert SparseUpdate.parse("channels:1/8@up_proj").channels[0].fraction == 0.125


def test_parse_numeric_name_components():
    """nn.Sequential names its children "0", "1" ...: a name may be, or contain, a number; the other
    terms keep their meaning (each has a ':' or is a keyword)."""
    s = SparseUpdate.parse("0,features.0,2.bias,last:4,channels:0.5@1|features.3")
    assert s.names == ("0", "features.0", "2.bias") and s.last == 4
    assert s.channels[0].layers == ("1", "features.3") and s.channels[0].fraction == 0.5
    assert SparseUpdate.parse(str(s)) == s
    assert SparseUpdate.parse("4").names == ("4",) and SparseUpdate.parse("4").last is None


@pytest.mark.parametrize("spec, text", [
    ("", "empty term"),
    ("last:2,,bias", "empty term"),
    ("last:0", "positive integer"),
    ("last:2,last:3", "two last:K"),
    ("chanels:0.1@up_proj", "Did you mean: channels"),
    ("channels:0@up_proj", "in (0, 1]"),
    ("channels:1.5@up_proj", "in (0, 1]"),
    ("channels:abc@up_proj", "not a number"),
    ("channels:1/0@up_proj", "not a number"),
    ("channels:0.1:magn@up_proj", "Did you mean: magnitude"),
    ("channels:0.1", "after '@'"),
    ("channels:0.1@up_proj,channels:0.2@up_proj", "two channel terms"),
    ("q-proj", "not a module name"),
    ("0.", "not a module name"),
    ("channels:0.5@0.", "not a module name"),
])
def test_parse_errors_are_typed(spec, text):
    with pytest.raises(UpdateError, match=None) as exc:
        SparseUpdate.parse(spec)
    assert isinstance(exc.value, SparseTorchError) and isinstance(exc.value, ValueError)
    assert text in str(exc.value), str(exc.value)


@pytest.mark.parametrize("spec, text", [
    ("qproj", "Did you mean: q_proj"),
    ("channels:0.1@up_prj", "Did you mean:"),
    ("last:9", "more blocks than"),
    ("last:2,bias", "selects no parameter"),  # Llama has no biases
    ("4", "For the last 4 blocks write last:4"),  # a bare number is a name, not a scope
    ("channels:0.1@embed_tokens", "only nn.Linear"),
    ("up_proj,channels:0.5@up_proj", "both in full and by"),
    ("last:1,model.layers.0.mlp", "nothing inside last:1"),
])
def test_resolve_errors_name_the_problem_and_leave_the_model_alone(spec, text):
    model = _llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    kinds = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(UpdateError) as exc:
        _train(model, spec)
    assert text in str(exc.value), str(exc.value)
    assert all(p.requires_grad for p in model.parameters())
    assert {n: type(m) for n, m in model.named_modules()} == kinds
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_resolve_selects_by_definition():
    model = _llama(layers=3)
    full = set(resolve(model, "last:1").full)
    assert full == {n for n, _ in model.named_parameters() if n.startswith("model.layers.2.")}
    # head is never cut by last:K, and only there when named
    with_head = set(resolve(model, "last:1,head").full)
    out_w = model.get_output_embeddings().weight  # tied: named model.embed_tokens.weight
    head = {"model.norm.weight"} | {n for n, p in model.named_parameters() if p is out_w}
    assert "model.norm.weight" in with_head and with_head == full | head
    # 'head' alone is the head only, not the whole model
    assert set(resolve(model, "head").full) == head
    assert "model.norm.weight" not in full
    norms = set(resolve(model, "last:2+norm").full)
    assert norms == {f"model.layers.{i}.{k}.weight" for i in (1, 2) for k in ("input_layernorm",
                                                                              "post_attention_layernorm")}
    plan = resolve(model, "last:2,channels:0.25@up_proj")
    assert plan.full == [] and sorted(plan.channels) == [f"model.layers.{i}.mlp.up_proj" for i in (1, 2)]
    # CNN: blocks are the leaf layers
    cnn = get_model("cnn")
    assert resolve(cnn, "last:1").full == ["fc2.weight", "fc2.bias"]
    assert set(resolve(cnn, "bias").full) == {f"{m}.bias" for m in ("conv1", "conv2", "fc1", "fc2")}


def test_children_of_nn_sequential_can_be_named():
    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    nested = torch.nn.Sequential()
    nested.features = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16))
    nested.head = torch.nn.Linear(16, 4)
    assert resolve(seq, "0").full == ["0.weight", "0.bias"]
    assert resolve(seq, "2.bias").full == ["2.bias"]  # a parameter by its name
    assert resolve(seq, "last:1").full == resolve(seq, "2").full == ["2.weight", "2.bias"]
    assert resolve(nested, "features.0").full == ["features.0.weight", "features.0.bias"]
    assert sorted(resolve(nested, "channels:0.25@2").channels) == ["features.2"]  # suffix match, as for q_proj
    with pytest.raises(UpdateError, match="'5' matches no module"):
        resolve(seq, "5")
    # top-level numeric names also survive the wrapping and the merge
    x = torch.randn(3, 8)
    ref = seq(x).detach()
    h = apply_update(seq, "0,channels:0.25@2")
    assert isinstance(seq[2], ChannelSlice) and seq[2].slice.shape == (4, 4)
    assert {n for n, p in seq.named_parameters() if p.requires_grad} == {"0.weight", "0.bias", "2.slice"}
    assert torch.allclose(seq(x), ref, atol=1e-6)
    h.merge()
    assert type(seq[2]) is torch.nn.Linear and torch.allclose(seq(x), ref, atol=1e-6)


# ------------------------------------------------------------------------------ frozen = no cost
@pytest.mark.parametrize("spec", ["last:1", "bias,norm", "q_proj,v_proj", "last:2,channels:0.25@up_proj"])
def test_frozen_parameters_bit_identical_without_grad_or_optimizer_state(spec, monkeypatch):
    model = _llama()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = resolve(model, spec)
    made = _spy_optimizer(monkeypatch)
    res = _train(model, spec)
    (opt,) = made
    trained = set(plan.full) | {f"{m}.weight" for m in plan.channels}
    params = dict(model.named_parameters())
    frozen = [n for n in params if n not in trained]
    assert frozen and all(torch.equal(params[n], w0[n]) for n in frozen)
    assert all(params[n].grad is None for n in params)
    assert all(not torch.equal(params[n], w0[n]) for n in plan.full)  # what trains did move
    # optimizer state: exactly the trained tensors (the slices, not full weights, for channels)
    in_opt = [p for g in opt.param_groups for p in g["params"]]
    assert set(map(id, opt.state)) == set(map(id, in_opt))
    assert sum(p.numel() for p in in_opt) == res.trainable_params == plan.trainable_params(model)
    assert not any(p is params[n] for p in in_opt for n in frozen)
    # the model is plain again, with the flags it had
    assert not any(isinstance(m, ChannelSlice) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def _backward_calls(model, spec):
    calls = [0] * len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        layer.register_full_backward_hook(lambda *a, _i=i: calls.__setitem__(_i, calls[_i] + 1))
    _train(model, spec, steps=2)
    return calls


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_backward_of_frozen_blocks_never_runs():
    assert _backward_calls(_llama(), "last:1") == [0, 0, 2]
    assert _backward_calls(_llama(), "last:2,channels:0.25@up_proj") == [0, 2, 2]
    # control: the hooks do fire where anything below trains
    assert _backward_calls(_llama(), "all") == [2, 2, 2]
    assert _backward_calls(_llama(), "model.layers.0.input_layernorm") == [2, 2, 2]


def test_saved_activations_of_a_channel_slice_are_only_its_inputs():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(4, 64)
    with SavedTensorsMeter(lin) as full:
        lin(x).sum()
    assert full.activation_bytes == 4 * 64 * 4  # the whole input
    ref = lin(x).detach()
    s = ChannelSlice(lin, torch.arange(8), "in")
    with SavedTensorsMeter(s) as part:
        y = s(x)
    assert part.activation_bytes == 4 * 8 * 4  # x[:, idx]: k = 8 of 64 channels
    assert torch.allclose(y, ref, atol=1e-6)  # same function
    y.sum().backward()
    assert s.slice.grad.shape == (32, 8) and s.base.weight.grad is None


def test_measure_step_counts_grad_and_adam_state():
    model = _llama()
    ids = _windows()

    def loss(m):
        return sparsetorch.finetune.causal_ce(m(input_ids=ids[:2]).logits, ids[:2])

    full = measure_step(copy.deepcopy(model), loss)
    h = apply_update(model, "last:1")
    part = measure_step(model, loss)
    n = h.plan.trainable_params(model)
    assert part.trainable_params == n and part.grad_bytes == 4 * n
    n_tensors = len(h.trainable())
    assert part.optimizer_state_bytes - 8 * n == n_tensors * 4  # exp_avg + exp_avg_sq, + one fp32 step each
    assert part.grad_optimizer_bytes < full.grad_optimizer_bytes / 2
    assert part.saved_activation_bytes < full.saved_activation_bytes


# ------------------------------------------------------------------------------ channel subsets
@pytest.mark.parametrize("axis", ["channels", "rows"])
def test_channel_update_changes_only_the_chosen_channels(axis):
    model = _llama()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, f"{axis}:0.25@up_proj")
    params = dict(model.named_parameters())
    for i in range(3):
        name = f"model.layers.{i}.mlp.up_proj.weight"
        w = w0[name]
        dim = 0 if axis == "channels" else 1  # norm over rows -> per input channel
        k = round(0.25 * w.shape[1 - dim])
        chosen = set(torch.topk(w.norm(dim=dim), k).indices.tolist())  # magnitude+ by definition
        diff = (params[name] != w)
        moved = set(torch.nonzero(diff.any(dim=dim)).flatten().tolist())
        assert moved and moved <= chosen, (name, moved - chosen)
    others = [n for n in params if "up_proj" not in n]
    assert all(torch.equal(params[n], w0[n]) for n in others)


def test_gradient_and_random_criteria():
    model = _llama(layers=2)
    ids = _windows()[:2]

    def loss(m):
        return sparsetorch.finetune.causal_ce(m(input_ids=ids).logits, ids)

    ref = copy.deepcopy(model)
    loss(ref).backward()
    g = ref.model.layers[1].mlp.up_proj.weight.grad
    h = apply_update(model, "last:1,channels:0.125:gradient@up_proj", grad_fn=loss)
    want = torch.topk(g.norm(dim=0), 8).indices.sort().values
    assert torch.equal(h.slices["model.layers.1.mlp.up_proj"].index, want)
    assert all(p.grad is None for p in model.parameters())
    h.merge()
    with pytest.raises(UpdateError, match="needs grad_fn"):
        apply_update(model, "channels:0.125:gradient@up_proj")
    a = apply_update(copy.deepcopy(model), "channels:0.25:random@up_proj", seed=1).slices
    b = apply_update(copy.deepcopy(model), "channels:0.25:random@up_proj", seed=1).slices
    c = apply_update(copy.deepcopy(model), "channels:0.25:random@up_proj", seed=2).slices
    assert all(torch.equal(a[k].index, b[k].index) for k in a)
    assert any(not torch.equal(a[k].index, c[k].index) for k in a)


def test_wrapping_keeps_the_function_and_merge_restores_plain_linears():
    model = _llama()
    ids = _windows()[:2]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    h = apply_update(model, "channels:0.125@up_proj,rows:0.25@o_proj")
    assert sum(isinstance(m, ChannelSlice) for m in model.modules()) == 6
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, ref, atol=1e-5)
    h.merge()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, ref, atol=1e-5)
    assert not any(isinstance(m, ChannelSlice) for m in model.modules())


# ------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("spec", ["channels:0.25@up_proj,norm", "rows:0.25@up_proj|down_proj", "last:1"])
def test_pruned_model_stays_exactly_sparse(spec):
    model = _llama()
    masks = sparsetorch.prune(model, "magnitude", None, "2:4").masks
    before = {n: m.clone() for n, m in masks.masks.items()}
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, spec, masks=masks, steps=4)
    params = dict(model.named_parameters())
    moved = 0
    for name, m in before.items():
        assert torch.equal(masks.masks[name], m)
        w = params[name].detach()
        assert not w[~m].any(), name
        assert int((w != 0).reshape(w.shape[0], -1, 4).sum(-1).max()) <= 2, name
        moved += int((w != w0[name]).sum())
    assert moved > 0
    masks.verify(model)


def test_failed_run_gives_the_model_back_unchanged():
    model = _llama()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}

    def boom(done, res, m):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        _train(model, "channels:0.25@up_proj", on_step=boom)
    assert not any(isinstance(m, ChannelSlice) for m in model.modules())
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], w0[n]) for n in params if "up_proj" in n)
    assert all(p.requires_grad for p in model.parameters())


def test_update_and_lora_are_exclusive():
    with pytest.raises(UpdateError, match="pass one of them"):
        _train(_llama(), "last:1", lora=4)


def test_update_with_gradient_checkpointing_is_refused_with_the_options():
    from sparsetorch.finetune.lm import check_options

    with pytest.raises(UpdateError, match="pass one of the two"):
        check_options(update="last:1", gradient_checkpointing=True)
    check_options(update="last:1")  # each alone is fine
    check_options(gradient_checkpointing=True)
    # finetune() refuses it with the options, before it looks at the data or the model
    model = _llama()
    with pytest.raises(UpdateError, match="gradient_checkpointing"):
        finetune(model, None, "not windows", loss="ce", update="last:1", gradient_checkpointing=True)
    assert all(p.requires_grad for p in model.parameters())


# --------------------------------------------------------------------------------------- CLI
def test_cli_update(pruned_dir, hf_dir, tmp_path, capsys):
    import json

    import transformers

    from sparsetorch.analysis.report import verify_folder

    out, js = tmp_path / "ft", tmp_path / "ft.json"
    args = ["finetune", str(pruned_dir), "--loss", "ce", "--steps", "2", "--seq-len", "32", "--batch", "2",
            "--eval-windows", "0", "--lr", "1e-2", "--out", str(out), "--json", str(js)]
    assert run([*args, "--update", "model.layers.1,channels:0.25@model.layers.0.mlp.up_proj"]) == 0, capsys.readouterr().err
    verify_folder(out)
    res = json.loads(js.read_text())
    assert res["update"] == "model.layers.1,channels:0.25@model.layers.0.mlp.up_proj"
    a = transformers.AutoModelForCausalLM.from_pretrained(pruned_dir).state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert "model.layers.1.mlp.up_proj.weight" in changed and "model.layers.0.mlp.up_proj.weight" in changed
    assert not any(k.startswith("model.layers.0.") and "up_proj" not in k for k in changed)
    assert "model.embed_tokens.weight" not in changed


def test_cli_bad_update_exits_2_without_traceback(pruned_dir, tmp_path):
    from test_finetune_cli import _cli

    base = ["finetune", str(pruned_dir), "--loss", "ce", "--steps", "1", "--seq-len", "32", "--eval-windows", "0"]
    cases = [
        (["--update", "qproj", "--out", str(tmp_path / "o1")], "matches no module", "Did you mean: q_proj"),
        (["--update", "last:x", "--out", str(tmp_path / "o2")], "positive integer", ""),
        (["--update", "last:1", "--lora", "4", "--out", str(tmp_path / "o3")], "pass one of them", ""),
    ]
    for extra, text, hint in cases:
        p = _cli([*base, *extra], tmp_path)
        assert p.returncode == 2, p.stderr[-2000:]
        assert "error: UpdateError: " in p.stderr and text in p.stderr and hint in p.stderr, p.stderr[-2000:]
        assert "Traceback" not in p.stderr
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))


def test_cli_update_with_gradient_checkpointing_fails_before_a_model_loads(pruned_dir, tmp_path, monkeypatch,
                                                                           capsys):
    from test_finetune_cli import _cli

    # console script: the option error comes first, so the missing model folder is never looked at
    missing = tmp_path / "no-such-model"
    p = _cli(["finetune", str(missing), "--loss", "ce", "--update", "last:1", "--gradient-checkpointing",
              "--out", str(tmp_path / "o1")], tmp_path)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "error: UpdateError: " in p.stderr and "--gradient-checkpointing" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "ModelError" not in p.stderr
    # a real pruned folder: refused without loading it
    import sparsetorch.data.llm as llm

    def load(*a, **k):
        raise AssertionError("a model was loaded before --update/--gradient-checkpointing was checked")

    monkeypatch.setattr(llm, "load_causal_lm", load)
    assert run(["finetune", str(pruned_dir), "--loss", "ce", "--seq-len", "32", "--update", "last:1",
                "--gradient-checkpointing", "--out", str(tmp_path / "o2")]) == 2
    assert "UpdateError" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_cli_update_selecting_no_parameter_exits_2_with_one_line(pruned_dir, tmp_path):
    from test_finetune_cli import _cli

    out = tmp_path / "o"
    p = _cli(["finetune", str(pruned_dir), "--loss", "ce", "--steps", "1", "--seq-len", "32", "--eval-windows", "0",
              "--update", "last:2,bias", "--out", str(out)], tmp_path)  # the tiny Llama has no biases
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0] == p.stderr.rstrip().splitlines()[-1], p.stderr[-2000:]
    assert errors[0].startswith("error: UpdateError: update 'last:2,bias' selects no parameter of LlamaForCausalLM")
    assert "last:2" in errors[0].split(";", 1)[1]  # says what to do
    assert not out.exists()


def test_resume_with_channel_slices_is_bit_identical(tmp_path):
    a, b = _llama(), _llama()
    masks_a = sparsetorch.prune(a, "magnitude", 0.5).masks
    masks_b = sparsetorch.prune(b, "magnitude", 0.5).masks
    spec = "last:2,channels:0.25@up_proj,norm"
    _train(a, spec, masks=masks_a, steps=4)
    ck = tmp_path / "ck"
    with pytest.raises(RuntimeError, match="stop"):
        _train(b, spec, masks=masks_b, steps=4, checkpoint_dir=ck, checkpoint_every=2,
               on_step=lambda done, r, m: (_ for _ in ()).throw(RuntimeError("stop")) if done == 3 else None)
    c = _llama()
    sparsetorch.prune(c, "magnitude", 0.5)
    _train(c, spec, masks=copy.deepcopy(masks_b), steps=4, resume=ck)
    pa, pc = dict(a.named_parameters()), dict(c.named_parameters())
    assert all(torch.equal(pa[n], pc[n]) for n in pa)
    with pytest.raises(FinetuneError, match=r"cannot resume .*adapter \(\{'update': 'last:2,norm,channels:0.25@up_proj'\}"
                       r" there, \{'update': 'last:1'\} now\)") as exc:
        _train(_llama(), "last:1", masks=None, steps=4, resume=ck)  # another spec: refused
    assert type(exc.value) is FinetuneError  # the resume check, not an UpdateError of the spec itself
