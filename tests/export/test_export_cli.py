"""`sparsetorch export DIR --format auto --out OUT` on a tiny pruned HF folder."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_llama

import sparsetorch
from sparsetorch.export import load_hf


@pytest.fixture
def pruned_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from sparsetorch.data.llm import save_hf_model

    model = make_tiny_llama()
    masks = sparsetorch.prune(model, "magnitude", 0.5, "2:4").masks
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]")),
        unk_token="[UNK]",
    )
    folder = save_hf_model(model, tok, tmp_path / "pruned", extra=lambda d: masks.save(d / "masks.safetensors"))
    return folder, model, masks


def test_export_command(pruned_folder, tmp_path, capsys):
    from sparsetorch.cli import main

    folder, model, masks = pruned_folder
    out = tmp_path / "compressed"
    main(["export", str(folder), "--format", "auto", "--out", str(out), "--hf-folder", str(tmp_path / "hf")])
    text = capsys.readouterr().out
    assert "model.layers.0.mlp.up_proj.weight" in text and "n:m" in text and "2:4" in text
    assert "dense" in text and "stored" in text
    assert (out / "model.sparsetorch.safetensors").is_file() and (out / "tokenizer.json").is_file()
    rebuilt, lmasks = load_hf(out)
    for k, v in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v), k
    assert set(lmasks.names()) == set(masks.names())
    lmasks.verify(rebuilt)
    assert (tmp_path / "hf" / "config.json").is_file()


def test_export_bad_format_exits_2(pruned_folder, tmp_path):
    from sparsetorch.cli import main

    folder, _, _ = pruned_folder
    with pytest.raises(SystemExit) as exc:
        main(["export", str(folder), "--format", "coo", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert not (tmp_path / "x").exists()
