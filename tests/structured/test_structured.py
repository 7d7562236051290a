"""Structured pruning, checked against definitions.

* a model with structures removed computes exactly what the dense model computes with those
  structures zeroed (their output columns set to 0; a removed block becomes the identity);
* FLAP's compensation keeps each pruned layer's mean output over the calibration tokens;
* GQA stays consistent (query heads per KV head an integer, every group the same size) and the
  saved model reloads with plain transformers to the same logits, KV-cache decoding included;
* the scores are their formulas; bad input raises typed errors.
"""

from __future__ import annotations

import copy
from functools import partial as partial_

import pytest
import torch
from tiny_models import make_tiny_llama

from sparsetorch.errors import AllocationError, MethodError, ModelError
from sparsetorch.structured import SCORES, BlockTensors, decoder_of, prune_structured
from sparsetorch.structured.prune import _split, head_options
from sparsetorch.structured.stats import FeatureStats, block_influence, weight_grads

transformers = pytest.importorskip("transformers")


def _model(layers: int = 4, heads: int = 6, kv: int = 2, hidden: int = 48, inter: int = 96, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                   max_position_embeddings=128, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


CALIB = torch.randint(0, 64, (6, 24), generator=torch.Generator().manual_seed(1))
X = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(2))


def _zeroed(dense, res):
    """The dense model with every removed structure's output columns set to zero."""
    z = copy.deepcopy(dense)
    dec = decoder_of(z)
    hd = dec.head_dim
    with torch.no_grad():
        for b in res.blocks_removed:
            blk = dec.blocks[b["index"]]
            blk.self_attn.o_proj.weight.zero_()
            blk.mlp.down_proj.weight.zero_()
        for entry in res.layers:
            blk = dec.blocks[entry["original_layer"]]
            for h in entry.get("heads_removed", []):
                blk.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
            for c in entry.get("channels_removed", []):
                blk.mlp.down_proj.weight[:, c] = 0
    return z


@pytest.mark.parametrize("what,remove", [("channels", 0.3), ("heads", 0.2), ("heads,channels", 0.4),
                                         ("blocks", 0.25), ("heads,channels,blocks", 0.5)])
@pytest.mark.parametrize("score", sorted(SCORES))
def test_removing_structures_equals_zeroing_them(what: str, remove: float, score: str) -> None:
    dense = _model()
    pruned = copy.deepcopy(dense)
    res = prune_structured(pruned, remove, score=score, what=what, calibration=CALIB, seq_len=24, compensate=False)
    assert res.params_after < res.params_before
    assert abs(res.removed_fraction - remove) < 0.12  # whole heads / blocks are coarse on a tiny model
    with torch.no_grad():
        want = _zeroed(dense, res)(X).logits
        got = pruned(X).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_heads_leave_every_kv_group_the_same_size_and_a_removed_group_takes_its_query_heads() -> None:
    for remove in (0.05, 0.1, 0.15, 0.2):
        m = _model(heads=6, kv=2)
        res = prune_structured(m, remove, score="magnitude", what="heads")
        cfg = m.config
        assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
        G = 3
        for entry in res.layers:
            gone = set(entry.get("heads_removed", []))
            for k in range(2):
                members = set(range(k * G, (k + 1) * G))
                if k in entry.get("kv_heads_removed", []):
                    assert members <= gone  # a KV head goes with all of its query heads
            kept_groups = [k for k in range(2) if k not in entry.get("kv_heads_removed", [])]
            per_group = {len(set(range(k * G, (k + 1) * G)) - gone) for k in kept_groups}
            assert per_group == {cfg.num_attention_heads // cfg.num_key_value_heads}
        for blk in decoder_of(m).blocks:
            assert blk.self_attn.q_proj.out_features == cfg.num_attention_heads * cfg.head_dim
            assert blk.self_attn.k_proj.out_features == cfg.num_key_value_heads * cfg.head_dim


def test_head_options_cover_every_gqa_consistent_shape() -> None:
    dec = decoder_of(_model(heads=6, kv=2))
    opts = head_options(dec)
    # g whole groups (0 or 1 of 2) x r heads of each remaining group (0..2 of 3)
    assert sorted((g, r) for _, g, r in opts) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    for params, g, r in opts:
        q_removed = g * 3 + (2 - g) * r
        assert params == q_removed * 2 * 48 * 8 + g * 2 * 48 * 8


def _capture_inputs(model, layer_attr: str, calib: torch.Tensor) -> list[torch.Tensor]:
    dec = decoder_of(model)
    got = []
    hooks = [dec.model.get_submodule(f"{dec.blocks_name}.{i}.{layer_attr}").register_forward_pre_hook(
        lambda _m, a, i=i: got.append((i, a[0].detach().reshape(-1, a[0].shape[-1])))) for i in range(len(dec.blocks))]
    with torch.no_grad():
        model(calib)
    for h in hooks:
        h.remove()
    return [torch.cat([x for j, x in got if j == i]) for i in range(len(dec.blocks))]


@pytest.mark.parametrize("what,layer_attr,key", [("channels", "mlp.down_proj", "channels_removed"),
                                                  ("heads", "self_attn.o_proj", "heads_removed")])
def test_flap_compensation_keeps_each_layers_mean_output(what: str, layer_attr: str, key: str) -> None:
    dense = _model()
    inputs = _capture_inputs(dense, layer_attr, CALIB)
    pruned = copy.deepcopy(dense)
    res = prune_structured(pruned, 0.15, score="flap", what=what, calibration=CALIB, seq_len=24)
    assert res.compensated
    hd = decoder_of(dense).head_dim
    for entry in res.layers:
        i = entry["layer"]
        gone = entry[key]
        if key == "heads_removed":
            gone = [h * hd + j for h in gone for j in range(hd)]
        kept = sorted(set(range(inputs[i].shape[1])) - set(gone))
        x = inputs[i]
        dense_lin = dense.get_submodule(f"model.layers.{i}.{layer_attr}")
        new_lin = pruned.get_submodule(f"model.layers.{i}.{layer_attr}")
        with torch.no_grad():
            want = dense_lin(x).double().mean(0)
            got = new_lin(x[:, kept]).double().mean(0)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("what,allocation,remove", [("heads,channels", "global", 0.3),
                                                    ("heads,channels,blocks", "uniform", 0.5), ("blocks", "global", 0.3)])
def test_the_saved_model_reloads_with_plain_transformers(tmp_path, what: str, allocation: str, remove: float) -> None:
    m = _model(layers=4)
    res = prune_structured(m, remove, score="flap", what=what, allocation=allocation, calibration=CALIB, seq_len=24,
                           block_share=0.5)
    m.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.num_hidden_layers == res.config["num_hidden_layers"] == len(decoder_of(m).blocks)
    assert back.config.intermediate_size == res.config["intermediate_size"]
    assert back.config.num_attention_heads == res.config["num_attention_heads"]
    assert back.config.num_key_value_heads == res.config["num_key_value_heads"]
    if "heads" in what:  # heads really went, the same in every layer, and GQA stays consistent
        heads, kv = back.config.num_attention_heads, back.config.num_key_value_heads
        assert heads < 6 and kv <= 2 and heads % kv == 0
        for entry in res.layers:
            assert heads == 6 - len(entry["heads_removed"]) and kv == 2 - len(entry["kv_heads_removed"])
        for blk in back.model.layers:
            assert blk.self_attn.num_key_value_groups == heads // kv
            assert blk.self_attn.q_proj.out_features == heads * back.config.head_dim
            assert blk.self_attn.k_proj.out_features == kv * back.config.head_dim
    assert back.num_parameters() == m.num_parameters()
    with torch.no_grad():
        torch.testing.assert_close(back(X).logits, m(X).logits, atol=1e-5, rtol=1e-5)
    # KV-cache decoding (layer indices renumbered after block removal) equals decoding without it
    a = back.generate(X[:1], max_new_tokens=6, do_sample=False, use_cache=True)
    b = back.generate(X[:1], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


def _other(family: str, layers: int = 4):
    """A tiny Qwen2 / Qwen3 / Mistral (6 query heads, 2 KV heads) built from its config."""
    torch.manual_seed(0)
    config_cls, model_cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                             "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
                             "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[family]
    cfg = config_cls(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                     num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    return model_cls(cfg).eval()


def test_biased_projections_are_what_the_model_class_builds() -> None:
    from sparsetorch.structured.arch import biased_projections

    attn = {f"self_attn.{n}_proj" for n in "qkvo"}
    mlp = {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert biased_projections(decoder_of(_model()), attention=True, mlp=True) == attn | mlp
    assert biased_projections(decoder_of(_model()), attention=False, mlp=False) == set()
    # Qwen2: q/k/v always carry a bias, o_proj and the MLP never (whatever the config says)
    assert biased_projections(decoder_of(_other("qwen2")), attention=True, mlp=True) == attn - {"self_attn.o_proj"}
    assert biased_projections(decoder_of(_other("mistral")), attention=True, mlp=True) == set()
    assert biased_projections(decoder_of(_other("qwen3")), attention=True, mlp=True) == attn


@pytest.mark.parametrize("family,what,projection", [
    ("qwen2", "heads", "self_attn.o_proj"), ("qwen2", "channels", "mlp.down_proj"),
    ("mistral", "heads", "self_attn.o_proj"), ("mistral", "heads,channels", "self_attn.o_proj"),
    ("mistral", "channels", "mlp.down_proj"), ("qwen3", "heads,channels", "mlp.down_proj")])
def test_compensation_is_refused_where_the_model_class_drops_the_bias(family: str, what: str, projection: str) -> None:
    m = _other(family)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    name = type(m).__name__
    with pytest.raises(ModelError, match=rf"{name} \(model_type '{family}'\) builds {projection} without a bias"
                                         r".*--no-compensate"):
        prune_structured(m, 0.15, score="flap", what=what, calibration=CALIB, seq_len=24)
    with pytest.raises(ModelError, match="--no-compensate"):  # asked for explicitly with another score too
        prune_structured(m, 0.15, score="magnitude", what=what, compensate=True, calibration=CALIB, seq_len=24)
    # refused before anything changed
    assert m.config.num_attention_heads == 6 and m.config.intermediate_size == 96
    assert m.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())


@pytest.mark.parametrize("family,what,remove,compensate", [
    ("qwen2", "heads,channels", 0.3, False), ("mistral", "heads,channels", 0.3, False),
    ("qwen2", "heads,channels,blocks", 0.5, False),
    ("qwen3", "heads", 0.15, None)])  # Qwen3 builds o_proj from attention_bias: FLAP compensates the heads
def test_qwen_and_mistral_reload_to_the_same_logits(tmp_path, family: str, what: str, remove: float,
                                                    compensate: bool | None) -> None:
    m = _other(family)
    res = prune_structured(m, remove, score="flap", what=what, compensate=compensate, calibration=CALIB, seq_len=24,
                           allocation="uniform")
    assert res.compensated == (compensate is None)
    assert m.config.num_attention_heads < 6
    m.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back) is type(m)
    assert back.state_dict().keys() == m.state_dict().keys()  # no bias dropped, none made up
    assert back.config.num_attention_heads == m.config.num_attention_heads
    if res.compensated:
        assert back.model.layers[0].self_attn.o_proj.bias.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(back(X).logits, m(X).logits, atol=1e-5, rtol=1e-5)


def _smallest_remove(message: str) -> float:
    import re

    found = re.search(r"smallest --remove that removes one is ([0-9.]+)", message)
    assert found, message
    return float(found.group(1))


@pytest.mark.parametrize("what,unit", [("channels", "8 MLP channels"), ("heads", "one query head of each"),
                                       ("heads,channels", "8 MLP channels")])
@pytest.mark.parametrize("score", ["flap", "magnitude"])
def test_a_budget_below_one_structure_names_the_smallest_remove(what: str, unit: str, score: str) -> None:
    m = _model()
    with pytest.raises(AllocationError, match=unit) as info:
        prune_structured(m, 0.001, score=score, what=what, calibration=CALIB, seq_len=24)
    assert m.config.intermediate_size == 96 and m.config.num_attention_heads == 6  # nothing changed
    smallest = _smallest_remove(str(info.value))
    # just below (4 decimals) the named value is still too small; the named value removes something
    with pytest.raises(AllocationError, match="rounds to no"):
        prune_structured(_model(), round(smallest - 1e-4, 4), score=score, what=what, calibration=CALIB, seq_len=24)
    res = prune_structured(m, smallest, score=score, what=what, calibration=CALIB, seq_len=24)
    assert res.removed_fraction > 0 and res.layers
    assert res.compensated == (score == "flap")
    # "one structure": 8 channels, or (heads alone) one query head of each of the 2 KV groups, in every layer
    want = (6, 2, 88) if "channels" in what else (4, 2, 96)
    assert (m.config.num_attention_heads, m.config.num_key_value_heads, m.config.intermediate_size) == want


def test_a_budget_that_the_scores_leave_empty_is_refused_before_any_change() -> None:
    # 32-channel steps cost more than one head per KV group: this budget could take heads, but uniform
    # allocation gives attention too little for one, and the MLP's share rounds to no channel step
    m = _model()
    with pytest.raises(AllocationError, match="32 MLP channels") as info:
        prune_structured(m, 0.1, score="magnitude", what="heads,channels", allocation="uniform", channel_multiple=32)
    assert m.config.intermediate_size == 96 and m.config.num_attention_heads == 6
    assert all(blk.mlp.down_proj.weight.shape == (48, 96) for blk in m.model.layers)
    smallest = _smallest_remove(str(info.value))
    assert smallest > 0.1
    res = prune_structured(m, smallest, score="magnitude", what="heads,channels", allocation="uniform",
                           channel_multiple=32)
    assert res.removed_fraction > 0 and m.config.intermediate_size == 64


def test_compensated_is_true_only_when_something_was_compensated() -> None:
    # block_share 1: one whole block takes the budget; what is left is below one channel group per layer
    m = _model()
    res = prune_structured(m, 0.26, score="flap", what="channels,blocks", block_share=1.0, calibration=CALIB,
                           seq_len=24)
    assert len(res.blocks_removed) == 1 and res.layers == []
    assert not res.compensated and not getattr(m.config, "mlp_bias", False)
    assert all(blk.mlp.down_proj.bias is None for blk in m.model.layers)
    res = prune_structured(_model(), 0.3, score="magnitude", what="channels", compensate=False)
    assert not res.compensated


@torch.no_grad()
def _mag_head(blk, h: int, hd: int = 8) -> float:
    """The magnitude score of query head ``h`` by its definition: its q_proj rows and o_proj columns."""
    rows = slice(h * hd, (h + 1) * hd)
    a = blk.self_attn
    return float(a.q_proj.weight[rows].double().pow(2).sum() + a.o_proj.weight[:, rows].double().pow(2).sum())


@torch.no_grad()
def _mag_group(blk, k: int, hd: int = 8, G: int = 3) -> float:
    """A KV group's magnitude score: its query heads' plus its k_proj / v_proj rows."""
    rows = slice(k * hd, (k + 1) * hd)
    a = blk.self_attn
    return sum(_mag_head(blk, h) for h in range(k * G, (k + 1) * G)) + float(
        a.k_proj.weight[rows].double().pow(2).sum() + a.v_proj.weight[rows].double().pow(2).sum())


@torch.no_grad()
def _mag_channel(blk, j: int) -> float:
    """An MLP channel's magnitude score: gate/up row ``j`` and down_proj column ``j``."""
    m = blk.mlp
    return float(m.gate_proj.weight[j].double().pow(2).sum() + m.up_proj.weight[j].double().pow(2).sum()
                 + m.down_proj.weight[:, j].double().pow(2).sum())


@pytest.mark.parametrize("what,remove", [("heads", 0.2), ("heads", 0.1), ("channels", 0.3)])
def test_the_plan_gives_each_removed_structures_score_and_the_cutoff(what: str, remove: float) -> None:
    import json

    dense = _model()
    m = copy.deepcopy(dense)
    res = prune_structured(m, remove, score="magnitude", what=what)
    plan = json.loads(json.dumps(res.to_dict()))  # JSON-clean, as structured_plan.json holds it
    G = 3  # query heads per KV head
    for entry in plan["layers"]:
        blk = dense.model.layers[entry["original_layer"]]
        head, group, channel = (partial_(f, blk) for f in (_mag_head, _mag_group, _mag_channel))
        if what == "heads":
            assert entry["head_scores"] == pytest.approx([head(h) for h in entry["heads_removed"]])
            assert entry["kv_head_scores"] == pytest.approx([group(k) for k in entry["kv_heads_removed"]])
            kept_kv = [k for k in range(2) if k not in entry["kv_heads_removed"]]
            if entry["kv_heads_removed"]:
                assert entry["kv_head_cutoff"] == pytest.approx(min(group(k) for k in kept_kv))
                assert max(entry["kv_head_scores"]) <= entry["kv_head_cutoff"]
            else:
                assert "kv_head_cutoff" not in entry
            cut = entry.get("head_cutoffs")
            part = [h for h in entry["heads_removed"] if h // G in kept_kv]
            assert (cut is not None) == bool(part)
            for k in range(2):
                if k not in kept_kv:
                    assert cut is None or cut[k] is None
                    continue
                kept = [h for h in range(k * G, (k + 1) * G) if h not in entry["heads_removed"]]
                if cut is not None:
                    assert cut[k] == pytest.approx(min(head(h) for h in kept))
                    assert all(head(h) <= cut[k] for h in part if h // G == k)
        else:
            gone = entry["channels_removed"]
            assert entry["channel_scores"] == pytest.approx([channel(j) for j in gone])
            kept = [j for j in range(96) if j not in set(gone)]
            assert entry["channel_cutoff"] == pytest.approx(min(channel(j) for j in kept))
            assert max(entry["channel_scores"]) <= entry["channel_cutoff"]
    if what == "heads":  # both ways of taking heads are exercised across the parameters
        assert any("kv_head_cutoff" in e or "head_cutoffs" in e for e in plan["layers"])


def test_block_influence_is_one_minus_the_mean_cosine_and_an_identity_block_goes_first() -> None:
    m = _model(layers=4)
    with torch.no_grad():  # block 2 becomes the identity: its influence is 0
        m.model.layers[2].self_attn.o_proj.weight.zero_()
        m.model.layers[2].mlp.down_proj.weight.zero_()
    dec = decoder_of(m)
    bi = block_influence(dec, [{"input_ids": CALIB}])
    assert bi[2] == pytest.approx(0.0, abs=1e-9)
    assert min(range(4), key=lambda i: bi[i]) == 2
    # the definition, for block 0: 1 - mean cos(input, output) over tokens
    ins, outs = [], []
    def grab(_m, a, kw, o) -> None:
        ins.append(a[0] if a else kw["hidden_states"])
        outs.append(o[0] if isinstance(o, tuple) else o)

    h = m.model.layers[0].register_forward_hook(grab, with_kwargs=True)
    with torch.no_grad():
        m(CALIB)
    h.remove()
    cos = torch.nn.functional.cosine_similarity(ins[0].double(), outs[0].double(), dim=-1)
    assert bi[0] == pytest.approx(1 - float(cos.mean()), abs=1e-9)
    res = prune_structured(m, 0.25, score="magnitude", what="blocks", calibration=CALIB, seq_len=24)
    assert [b["index"] for b in res.blocks_removed] == [2]


def _block_tensors(seed: int = 0) -> tuple[BlockTensors, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, H, KV, hd, inter = 8, 4, 2, 2, 6

    def r(*s):
        return torch.randn(*s, generator=g)

    xa, xm = r(50, H * hd) * 2 + 1, r(50, inter) * 3 - 0.5
    sa, sm = FeatureStats.empty(H * hd), FeatureStats.empty(inter)
    sa.add(xa[:20])
    sa.add(xa[20:])
    sm.add(xm)
    t = BlockTensors(q=r(H * hd, d), k=r(KV * hd, d), v=r(KV * hd, d), o=r(d, H * hd), gate=r(inter, d),
                     up=r(inter, d), down=r(d, inter), head_dim=hd, attn_stats=sa, mlp_stats=sm,
                     grads={k: r(*s) for k, s in (("q", (H * hd, d)), ("k", (KV * hd, d)), ("v", (KV * hd, d)),
                                                  ("o", (d, H * hd)), ("gate", (inter, d)), ("up", (inter, d)),
                                                  ("down", (d, inter)))})
    return t, xa.double(), xm.double()


def test_scores_are_their_formulas() -> None:
    t, xa, xm = _block_tensors()
    hd = t.head_dim
    ch, heads, kv = SCORES["flap"](t)
    for j in range(6):
        assert float(ch[j]) == pytest.approx(float(xm[:, j].var(unbiased=False) * t.down[:, j].double().pow(2).sum()))
    h1 = sum(float(xa[:, c].var(unbiased=False) * t.o[:, c].double().pow(2).sum()) for c in range(hd, 2 * hd))
    assert float(heads[1]) == pytest.approx(h1)
    assert float(kv.abs().sum()) == 0
    ch, heads, _ = SCORES["wanda"](t)
    assert float(ch[3]) == pytest.approx(float(xm[:, 3].norm() * t.down[:, 3].double().abs().sum()))
    h2 = sum(float(xa[:, c].norm() * t.o[:, c].double().abs().sum()) for c in range(2 * hd, 3 * hd))
    assert float(heads[2]) == pytest.approx(h2)
    ch, heads, kv = SCORES["magnitude"](t)
    want = float(t.gate[4].double().pow(2).sum() + t.up[4].double().pow(2).sum() + t.down[:, 4].double().pow(2).sum())
    assert float(ch[4]) == pytest.approx(want)
    want_kv = float(t.k[hd:2 * hd].double().pow(2).sum() + t.v[hd:2 * hd].double().pow(2).sum())
    assert float(kv[1]) == pytest.approx(want_kv)
    ch, heads, kv = SCORES["taylor"](t)
    gr = t.grads
    want = float((t.gate[0] * gr["gate"][0]).abs().sum() + (t.up[0] * gr["up"][0]).abs().sum()
                 + (t.down[:, 0] * gr["down"][:, 0]).abs().sum())
    assert float(ch[0]) == pytest.approx(want, rel=1e-5)
    want = float((t.q[0:hd] * gr["q"][0:hd]).abs().sum() + (t.o[:, 0:hd] * gr["o"][:, 0:hd]).abs().sum())
    assert float(heads[0]) == pytest.approx(want, rel=1e-5)


def test_weight_grads_sum_the_loss_gradient_over_batches_and_leave_grads_alone() -> None:
    m = _model(layers=2)
    dec = decoder_of(m)
    batches = [{"input_ids": CALIB[:3]}, {"input_ids": CALIB[3:]}]
    got = weight_grads(dec, batches)
    assert all(p.grad is None for p in m.parameters())
    m.zero_grad()
    for b in batches:
        m(input_ids=b["input_ids"], labels=b["input_ids"]).loss.backward()
    torch.testing.assert_close(got["1.mlp.down_proj.weight"], m.model.layers[1].mlp.down_proj.weight.grad)
    torch.testing.assert_close(got["0.self_attn.k_proj.weight"], m.model.layers[0].self_attn.k_proj.weight.grad)


def test_the_global_split_is_flaps_ranking_of_standardised_scores() -> None:
    dec = decoder_of(_model(layers=2))
    hc, cc = dec.head_cost(), dec.channel_cost()
    # one outlier head per layer (z = -2.04) ranks below every channel (linspace: z >= -1.7)
    heads = torch.tensor([0.0] + [100.0] * 5)
    chans = torch.linspace(0, 1, 96, dtype=torch.float64)
    scores = [(chans, heads, torch.zeros(2))] * 2
    assert _split(dec, ("heads", "channels"), "global", 2 * hc, scores) == hc  # both outlier heads fit
    # the ranking is taken as a prefix: the second head does not fit, and nothing after it is taken
    assert _split(dec, ("heads", "channels"), "global", 2 * hc - 1, scores) == hc / 2
    # outlier channels rank first: the budget they fill leaves attention alone
    chans = torch.cat([torch.zeros(4, dtype=torch.float64), torch.full((92,), 100.0, dtype=torch.float64)])
    heads = torch.linspace(0, 1, 6, dtype=torch.float64)
    scores = [(chans, heads, torch.zeros(2))] * 2
    assert _split(dec, ("heads", "channels"), "global", 8 * cc, scores) == 0
    # uniform: attention's share of the budget is its share of the parameters
    attn = 6 * hc + 2 * dec.kv_cost()
    mlp = 96 * cc
    assert _split(dec, ("heads", "channels"), "uniform", 1000.0, scores) == pytest.approx(500.0 * attn / (attn + mlp))
    assert _split(dec, ("channels",), "global", 1000.0, scores) == 0
    assert _split(dec, ("heads",), "global", 1000.0, scores) == 500.0


def test_bad_input_raises_typed_errors() -> None:
    m = _model()
    for bad in (0, 1, 1.5, -0.1, True):
        with pytest.raises(AllocationError, match=r"in \(0, 1\)"):
            prune_structured(m, bad, score="magnitude")
    with pytest.raises(MethodError, match="Did you mean: flap"):
        prune_structured(m, 0.2, score="flapp")
    with pytest.raises(MethodError, match="unknown structure 'layers'"):
        prune_structured(m, 0.2, score="magnitude", what="heads,layers")
    with pytest.raises(AllocationError, match="more heads than exist"):
        prune_structured(m, 0.6, score="magnitude", what="heads")
    with pytest.raises(AllocationError, match="at most 3 can go"):
        prune_structured(m, 0.99, score="magnitude", what="blocks", calibration=CALIB, seq_len=24)
    with pytest.raises(AllocationError, match="less than half a block"):
        prune_structured(m, 0.05, score="magnitude", what="blocks", calibration=CALIB, seq_len=24)
    with pytest.raises(AllocationError, match="uniform"):
        prune_structured(m, 0.2, allocation="owl")
    with pytest.raises(AllocationError, match="at most"):  # found before any block is dropped
        prune_structured(m, 0.8, score="magnitude", what="heads,blocks", calibration=CALIB, seq_len=24)
    assert m.config.num_attention_heads == 6 and len(m.model.layers) == 4  # nothing changed on the way
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ModelError, match="config has no intermediate_size"):
        prune_structured(gpt2, 0.2, score="magnitude")
    gpt2.config.intermediate_size = 128
    with pytest.raises(ModelError, match="block 0 .GPT2Block. has no self_attn"):
        prune_structured(gpt2, 0.2, score="magnitude")
    fused = _model()
    fused.model.layers[1].self_attn.q_proj = torch.nn.Identity()
    with pytest.raises(ModelError, match="no nn.Linear 'q_proj'"):
        prune_structured(fused, 0.2, score="magnitude")
    with pytest.raises(ModelError, match="no .config"):
        prune_structured(torch.nn.Sequential(torch.nn.Linear(4, 4)), 0.2, score="magnitude")


def test_works_on_the_shared_tiny_llama_with_calibration_from_a_tokenizer_free_tensor() -> None:
    m = make_tiny_llama(layers=2, vocab=128)
    res = prune_structured(m, 0.2, calibration=torch.randint(0, 128, (4, 16)), seq_len=16)
    assert res.score == "flap" and res.compensated and m.config.mlp_bias
    assert res.to_dict()["removed_fraction"] == res.removed_fraction


def test_per_layer_config_lists_follow_a_block_removal_and_unknown_ones_are_refused() -> None:
    m = _model(layers=4)
    m.config.layer_types = ["full_attention", "full_attention", "sliding_attention", "full_attention"]
    with torch.no_grad():  # block 2 is the identity: it goes first
        m.model.layers[2].self_attn.o_proj.weight.zero_()
        m.model.layers[2].mlp.down_proj.weight.zero_()
    prune_structured(m, 0.25, score="magnitude", what="blocks", calibration=CALIB, seq_len=24)
    assert m.config.layer_types == ["full_attention"] * 3
    assert [blk.self_attn.layer_idx for blk in m.model.layers] == [0, 1, 2]
    m = _model(layers=4)
    m.config.mlp_only_layers = [1]
    with pytest.raises(ModelError, match="mlp_only_layers"):
        prune_structured(m, 0.25, score="magnitude", what="blocks", calibration=CALIB, seq_len=24)
    assert len(m.model.layers) == 4
