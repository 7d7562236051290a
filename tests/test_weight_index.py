"""model.safetensors.index.json is untrusted input: entries may not leave the folder; a malformed
index is a CheckpointError, never a traceback."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from sparsetorch.analysis.report import load_folder_weights
from sparsetorch.errors import CheckpointError


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    save_file({"a.weight": torch.ones(2, 2)}, str(d / "model-1.safetensors"))
    # a valid safetensors file outside the folder: reading it would succeed, so only the check stops it
    save_file({"secret": torch.full((3,), 7.0)}, str(tmp_path / "outside.safetensors"))
    return d


def _index(d, weight_map):
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_a_valid_index_is_read(folder):
    _index(folder, {"a.weight": "model-1.safetensors"})
    assert set(load_folder_weights(folder)) == {"a.weight"}


@pytest.mark.parametrize("entry", ["../outside.safetensors", "sub/../../outside.safetensors", "ABS",
                                   "..\\outside.safetensors", "", "C:/outside.safetensors"])
def test_entries_leaving_the_folder_are_refused(folder, entry):
    if entry == "ABS":
        entry = str(folder.parent / "outside.safetensors")
    _index(folder, {"a.weight": "model-1.safetensors", "secret": entry})
    with pytest.raises(CheckpointError, match="outside|plain relative"):
        load_folder_weights(folder)


def test_symlink_out_of_the_folder_is_refused(folder):
    (folder / "model-2.safetensors").symlink_to(folder.parent / "outside.safetensors")
    _index(folder, {"a.weight": "model-1.safetensors", "secret": "model-2.safetensors"})
    with pytest.raises(CheckpointError, match="symlink"):
        load_folder_weights(folder)
    (folder / "model.safetensors.index.json").unlink()  # the glob path checks it too
    with pytest.raises(CheckpointError, match="symlink"):
        load_folder_weights(folder)


def test_hub_cache_snapshot_symlinks_are_allowed(tmp_path):
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "rev1"
    blobs.mkdir()
    snap.mkdir(parents=True)
    save_file({"a.weight": torch.ones(1)}, str(blobs / "0123abcd"))
    (snap / "model.safetensors").symlink_to("../../blobs/0123abcd")
    _index(snap, {"a.weight": "model.safetensors"})
    assert set(load_folder_weights(snap)) == {"a.weight"}


@pytest.mark.parametrize("text", ["[1, 2]", '{"weight_map": ["model-1.safetensors"]}', '{"weight_map": {}}',
                                  '{"weight_map": {"a.weight": 3}}', '{"weight_map": {"a.weight": null}}',
                                  '{"metadata": {}}', "not json", '"a string"', '{"weight_map": {"a": "."}}'])
def test_malformed_index_is_a_checkpoint_error(folder, text):
    (folder / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError):
        load_folder_weights(folder)


def test_cli_report_on_a_crafted_index_exits_2_without_traceback(folder, capsys):
    from sparsetorch.cli import main

    _index(folder, {"a.weight": "model-1.safetensors", "secret": "../outside.safetensors"})
    with pytest.raises(SystemExit) as exc:
        main(["report", str(folder)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "CheckpointError" in err and "Traceback" not in err


def test_load_causal_lm_refuses_a_crafted_index_transformers_would_follow(tmp_path):
    pytest.importorskip("transformers")
    from tiny_models import make_tiny_llama

    from sparsetorch.data.llm import load_causal_lm

    d = tmp_path / "m"
    make_tiny_llama().save_pretrained(d, max_shard_size="100KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (d / first).rename(tmp_path / first)  # transformers alone would read it from outside the folder
    index["weight_map"] = {k: ("../" + v if v == first else v) for k, v in index["weight_map"].items()}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside"):
        load_causal_lm(d, progress=False)
