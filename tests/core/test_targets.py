from __future__ import annotations

import pytest
from torch import nn

from sparsetorch.errors import TargetError
from sparsetorch.targets import select


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.conv = nn.Conv1d(8, 8, 3)
        self.block = nn.ModuleDict({"q_proj": nn.Linear(8, 8), "v_proj": nn.Linear(8, 8)})
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 10, bias=False)


def test_default_targets_exclude_embeddings_head_and_biases():
    names = list(select(Net()))
    assert names == ["conv.weight", "block.q_proj.weight", "block.v_proj.weight"]


def test_default_targets_on_tied_llama(tiny_llama):
    names = list(select(tiny_llama))
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" not in names
    assert len(names) == 2 * 7  # q,k,v,o,gate,up,down per layer
    assert all(n.endswith(".weight") for n in names)


def test_regex_type_module_and_param_selectors():
    net = Net()
    assert list(select(net, "re:.*q_proj")) == ["block.q_proj.weight"]
    assert list(select(net, "Conv1d")) == ["conv.weight"]
    assert list(select(net, "block.v_proj")) == ["block.v_proj.weight"]
    assert list(select(net, ["lm_head.weight"])) == ["lm_head.weight"]
    assert list(select(net, "Linear", ignore=["re:block\\..*"])) == ["lm_head.weight"]


def test_unknown_names_suggest_close_matches():
    with pytest.raises(TargetError, match="q_proj"):
        select(Net(), "block.q_prj")
    with pytest.raises(TargetError, match="matches nothing"):
        select(Net(), "re:.*k_proj")
    with pytest.raises(TargetError):
        select(Net(), ignore=["block.w_proj"])


def test_no_prunable_layers():
    m = nn.Sequential(nn.Embedding(4, 4), nn.LayerNorm(4))
    with pytest.raises(TargetError, match="no prunable layers"):
        select(m)
    with pytest.raises(TargetError, match="no prunable layers"):
        select(Net(), ignore=["Linear", "Conv1d"])


def test_tied_head_resolves_to_the_shared_parameter(tiny_llama):
    # lm_head.weight is tied to the embedding, so named_parameters() lists it once, as the embedding
    assert list(select(tiny_llama, "lm_head")) == ["model.embed_tokens.weight"]
    both = select(tiny_llama, ["Linear", "Embedding"])
    assert "model.embed_tokens.weight" in both and len(both) == 2 * 7 + 1
    assert "model.embed_tokens.weight" not in select(tiny_llama, "Linear", ignore=["lm_head"])
