"""YAML recipes for one-shot pruning and the `sparsetorch eval` command's error path."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_llama

from sparsetorch.errors import MethodError
from sparsetorch.oneshot.recipe import apply_recipe, load_oneshot_recipe

RECIPE = """
oneshot:
  method: wanda
  pattern: "2:4"
  sparsity: null
  ignore: ["re:.*self_attn.*"]
  options:
    batch_size: 2
    progress: false
"""


def test_recipe_prunes_as_written():
    torch.set_num_threads(1)
    r = load_oneshot_recipe(RECIPE)
    assert r.method == "wanda" and r.pattern == "2:4" and r.options["batch_size"] == 2
    m = make_tiny_llama()
    rep = apply_recipe(m, r, calibration=torch.randint(0, 128, (2, 16)))
    assert rep.pattern == "2:4" and all("mlp" in n for n in rep.masks)
    rep.masks.verify(m)


def test_recipe_errors():
    with pytest.raises(MethodError, match="unknown one-shot recipe key"):
        load_oneshot_recipe({"method": "wanda", "sparsty": 0.5})
    with pytest.raises(MethodError, match="unknown one-shot method"):
        load_oneshot_recipe({"method": "sparsegtp"})
    with pytest.raises(MethodError, match="unknown option"):
        apply_recipe(
            make_tiny_llama(),
            {"method": "sparsegpt", "options": {"dampen": 0.1}},
            calibration=torch.zeros(1, 8, dtype=torch.long),
        )


def test_recipe_section_registered_with_core_recipes():
    import sparsetorch.oneshot.recipe  # noqa: F401
    from sparsetorch import recipes

    r = recipes.load_recipe({"oneshot": {"method": "sparsegpt", "sparsity": 0.6}})
    assert r.oneshot.method == "sparsegpt" and r.oneshot.sparsity == 0.6


def test_eval_cli_missing_model_is_a_typed_error(tmp_path, capsys):
    from sparsetorch.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["eval", str(tmp_path / "nope")])
    assert exc.value.code == 2
