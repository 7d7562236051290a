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


def _run(argv):
    """Exit status of the CLI (``main`` always ends in SystemExit)."""
    from sparsetorch.cli import main

    try:
        main(argv)
    except SystemExit as exc:
        return exc.code or 0
    return 0


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_export_command(pruned_folder, tmp_path, capsys):
    folder, model, masks = pruned_folder
    out = tmp_path / "compressed"
    assert _run(["export", str(folder), "--format", "auto", "--out", str(out), "--hf-folder", str(tmp_path / "hf")]) == 0
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
    folder, _, _ = pruned_folder
    assert _run(["export", str(folder), "--format", "coo", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_export_never_overwrites_another_model_without_overwrite(pruned_folder, tmp_path, capsys):
    folder, _, _ = pruned_folder
    other = tmp_path / "other"
    make_tiny_llama(layers=1).save_pretrained(other)  # another model's folder: config.json etc.
    (other / "tokenizer.json").write_text("their tokenizer")
    before = _snapshot(other)
    capsys.readouterr()
    assert _run(["export", str(folder), "--out", str(other)]) == 2
    err = capsys.readouterr().err
    assert "OutputExistsError" in err and "--overwrite" in err and "Traceback" not in err
    assert _snapshot(other) == before
    assert _run(["export", str(folder), "--out", str(other), "--overwrite"]) == 0
    assert (other / "model.sparsetorch.safetensors").is_file()
    assert (other / "tokenizer.json").read_bytes() != before["tokenizer.json"]
    assert "model.safetensors" not in _snapshot(other)  # replaced as a whole, not merged into


def test_export_refuses_the_source_as_output_even_with_overwrite(pruned_folder, tmp_path, capsys):
    folder, _, _ = pruned_folder
    before = _snapshot(folder)
    for out in (folder, folder / "sub", tmp_path):
        assert _run(["export", str(folder), "--out", str(out), "--overwrite"]) == 2
        assert "OutputExistsError" in capsys.readouterr().err
        assert _run(["export", str(folder), "--out", str(tmp_path / "ok"), "--hf-folder", str(out),
                     "--overwrite"]) == 2
        assert "OutputExistsError" in capsys.readouterr().err
    assert _snapshot(folder) == before
    assert not (tmp_path / "ok").exists()  # refused before anything was written


def test_existing_safetensors_file_and_hf_folder_need_overwrite(pruned_folder, tmp_path, capsys):
    folder, _, _ = pruned_folder
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"someone's file")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert _run(["export", str(folder), "--out", str(target)]) == 2
    assert _run(["export", str(folder), "--out", str(tmp_path / "new.safetensors"), "--hf-folder", str(hf)]) == 2
    assert "OutputExistsError" in capsys.readouterr().err
    assert target.read_bytes() == b"someone's file" and _snapshot(hf) == {"config.json": b"{}"}
    assert not (tmp_path / "new.safetensors").exists()
    assert _run(["export", str(folder), "--out", str(target), "--hf-folder", str(hf), "--overwrite"]) == 0
    rebuilt, _ = load_hf(target)
    assert (hf / "model.safetensors").is_file()


def test_export_folder_is_written_in_one_atomic_step(pruned_folder, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    folder, _, _ = pruned_folder
    out = tmp_path / "compressed"

    def crash(self, *a, **k):
        raise RuntimeError("killed while writing the tokenizer")

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="killed"):
        _run(["export", str(folder), "--out", str(out)])
    assert not out.exists()  # no folder with a compressed file and config but no tokenizer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_truncated_weights_exit_2_without_traceback(pruned_folder, tmp_path, capsys, keep):
    folder, _, _ = pruned_folder
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    capsys.readouterr()
    assert _run(["export", str(folder), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "CheckpointError" in err and "truncated" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
