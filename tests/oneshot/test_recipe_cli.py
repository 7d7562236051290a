"""YAML recipes for one-shot pruning and the `sparsetorch eval` command's error path."""

from __future__ import annotations

import json
import math

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


def test_eval_cli_checks_arguments_and_json_before_loading(tmp_path, monkeypatch, capsys):
    from tiny_models import byte_tokenizer

    import sparsetorch.data.llm as llm
    from sparsetorch.cli import main

    src = tmp_path / "tiny"
    make_tiny_llama(vocab=256).save_pretrained(src)  # max_position_embeddings = 256
    byte_tokenizer().save_pretrained(src)
    (tmp_path / "old.json").write_text("{}")

    def load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(llm, "load_causal_lm", load)
    for extra, error in (
        (["--seq-len", "257"], "ModelError"),
        (["--batch-size", "0"], "DataError"),
        (["--json", str(tmp_path)], "OutputExistsError"),  # a folder
        (["--json", str(tmp_path / "old.json")], "OutputExistsError"),  # exists, no --overwrite
    ):
        with pytest.raises(SystemExit) as exc:
            main(["eval", str(src), "--windows", "1", "--seq-len", "32", *extra])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and f"error: {error}: " in err and "Traceback" not in err, (extra, err)
    assert (tmp_path / "old.json").read_text() == "{}"
    monkeypatch.undo()
    main(["eval", str(src), "--windows", "1", "--seq-len", "32", "--json", str(tmp_path / "old.json"), "--overwrite"])
    res = json.loads((tmp_path / "old.json").read_text())
    assert res["windows"] == 1 and res["seq_len"] == 32 and math.isfinite(res["ppl"])


def test_unquoted_pattern_and_exponent_read_as_written():
    """YAML 1.1 reads an unquoted ``2:4`` as the base-60 integer 124 and ``1e-4`` as a string; the
    recipe reader keeps ``2:4`` a pattern string and makes ``1e-4`` a float (one reader serves the
    one-shot, training and run recipes)."""
    import yaml

    text = "oneshot:\n  method: wanda\n  pattern: 2:4\n  sparsity: null\n"
    assert yaml.safe_load(text)["oneshot"]["pattern"] == 124  # the trap this guards against
    assert load_oneshot_recipe(text).pattern == "2:4"
    from sparsetorch import recipes

    data = recipes.read_recipe_source("a: 2:4\nb: 1e-4\nc: 10\nd: 0.5\ne: 1_000\nf: .inf\n")
    assert data == {"a": "2:4", "b": 1e-4, "c": 10, "d": 0.5, "e": 1000, "f": math.inf}
    assert recipes.load_recipe("method: gmp\nsparsity: 9e-1\ntotal_steps: 10\n").training.sparsity == 0.9
