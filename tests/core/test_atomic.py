"""Output safety of sparsetorch.atomic: no lost files, recoverable swaps, locks, umask."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sparsetorch import atomic
from sparsetorch.atomic import (
    MARKER,
    atomic_dir,
    atomic_path,
    atomic_write_text,
    check_output_dir,
    check_output_file,
    output_lock,
    recover_dir,
)
from sparsetorch.errors import OutputExistsError, OutputLockedError, SparseTorchError

FORK = mp.get_context("fork")


def _write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).write_text(text)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --------------------------------------------------------------------------- refusing to lose files
def test_foreign_folder_is_never_replaced_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _write(out, {"config.json": "{}", "notes.txt": "mine"})  # looks like a model, but not ours
    with pytest.raises(OutputExistsError, match="did not write.*overwrite"):
        with atomic_dir(out) as tmp:
            _write(tmp, {"new.txt": "x"})
    assert _names(out) == ["config.json", "notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert _names(tmp_path) == ["out"]  # no temporary or lock left behind


def test_earlier_sparsetorch_output_needs_overwrite_too(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        _write(tmp, {"a.txt": "1"})
    assert json.loads((out / MARKER).read_text())["library"] == "sparsetorch"
    with pytest.raises(OutputExistsError, match="earlier sparsetorch output"):
        with atomic_dir(out) as tmp:
            _write(tmp, {"a.txt": "2"})
    assert (out / "a.txt").read_text() == "1"
    with atomic_dir(out, overwrite=True) as tmp:
        _write(tmp, {"b.txt": "2"})
    assert _names(out) == [MARKER, "b.txt"]
    assert _names(tmp_path) == ["out"]


def test_empty_folder_and_missing_path_are_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    for name in ("empty", "new/nested"):
        with atomic_dir(tmp_path / name) as tmp:
            _write(tmp, {"a.txt": "1"})
        assert (tmp_path / name / "a.txt").read_text() == "1"


def test_a_file_at_the_folder_path_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    out.write_text("keep")
    with pytest.raises(OutputExistsError, match="not a folder"):
        check_output_dir(out)
    with atomic_dir(out, overwrite=True) as tmp:
        _write(tmp, {"a.txt": "1"})
    assert (out / "a.txt").read_text() == "1"


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_equal_to_inside_or_containing_the_input_is_refused(tmp_path, overwrite):
    src = tmp_path / "model"
    src.mkdir()
    _write(src, {"config.json": "{}"})
    for out, why in ((src, "is the input"), (src / "sub", "inside the input"),
                     (tmp_path, "inside the output"), (tmp_path / "model" / ".." / "model", "is the input")):
        with pytest.raises(OutputExistsError, match=why):
            check_output_dir(out, inputs=[src], overwrite=overwrite)
        with pytest.raises(OutputExistsError):
            with atomic_dir(out, inputs=[src], overwrite=overwrite):
                pass
    link = tmp_path / "link"
    link.symlink_to(src)
    with pytest.raises(OutputExistsError, match="is the input"):
        check_output_dir(link / "", inputs=[src], overwrite=overwrite)
    assert _names(src) == ["config.json"]


def test_failure_inside_the_block_leaves_the_old_folder(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        _write(tmp, {"a.txt": "1"})
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out, overwrite=True) as tmp:
            _write(tmp, {"a.txt": "2"})
            raise KeyboardInterrupt
    assert (out / "a.txt").read_text() == "1"
    assert _names(tmp_path) == ["out"]


# --------------------------------------------------------------------------- single files
def test_atomic_path_overwrite_semantics(tmp_path):
    f = tmp_path / "r.json"
    atomic_write_text(f, "1")
    atomic_write_text(f, "2")  # the Python API default replaces a file written by name
    assert f.read_text() == "2"
    with pytest.raises(OutputExistsError, match="already exists.*overwrite"):
        atomic_write_text(f, "3", overwrite=False)  # what the CLI does without --overwrite
    assert f.read_text() == "2"
    atomic_write_text(tmp_path / "new.json", "4", overwrite=False)
    assert (tmp_path / "new.json").read_text() == "4"
    (tmp_path / "d").mkdir()
    for ow in (False, True):
        with pytest.raises(OutputExistsError, match="is a folder"):
            atomic_write_text(tmp_path / "d", "x", overwrite=ow)
    with pytest.raises(OutputExistsError, match="is the input"):
        check_output_file(f, inputs=[f], overwrite=True)
    assert _names(tmp_path) == ["d", "new.json", "r.json"]


def test_atomic_path_noreplace_when_the_file_appears_meanwhile(tmp_path):
    f = tmp_path / "r.json"
    with pytest.raises(OutputExistsError, match="appeared"):
        with atomic_path(f, overwrite=False) as tmp:
            tmp.write_text("ours")
            f.write_text("someone else's")
    assert f.read_text() == "someone else's"
    assert _names(tmp_path) == ["r.json"]


# --------------------------------------------------------------------------- recoverable swap
def _killed_between_renames(out: str) -> None:
    """Child: replace ``out`` with the two-rename fallback and die between the renames."""
    atomic._renameat2 = lambda *a, **k: False  # no RENAME_EXCHANGE: the fallback path
    real = os.rename
    calls = []

    def rename(src, dst):
        real(src, dst)
        calls.append(dst)
        if len(calls) == 1:  # DIR -> .DIR.old-*: killed before the temp folder is renamed in
            os._exit(9)

    os.rename = rename
    with atomic_dir(out, overwrite=True) as tmp:
        _write(tmp, {"a.txt": "new"})


def _kill_mid_swap(out: Path) -> None:
    p = FORK.Process(target=_killed_between_renames, args=(str(out),))
    p.start()
    p.join(60)
    assert p.exitcode == 9
    assert not out.exists()
    assert any(n.startswith(".out.old-") for n in os.listdir(out.parent))


def test_kill_between_the_two_renames_is_recovered_by_the_next_write(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        _write(tmp, {"a.txt": "old"})
    _kill_mid_swap(out)
    # the next write to the same place restores the old folder first, so it is not silently lost
    with pytest.raises(OutputExistsError, match="earlier sparsetorch output"):
        with atomic_dir(out):
            pass
    assert (out / "a.txt").read_text() == "old"
    with atomic_dir(out, overwrite=True) as tmp:
        _write(tmp, {"a.txt": "newer"})
    assert (out / "a.txt").read_text() == "newer"
    assert _names(tmp_path) == ["out"]  # the dead writer's temporary folder was cleaned up too


def test_kill_between_the_two_renames_is_recovered_by_readers(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        _write(tmp, {"a.txt": "old"})
    _kill_mid_swap(out)
    assert recover_dir(out) is True
    assert (out / "a.txt").read_text() == "old"
    assert recover_dir(out) is False


def test_fallback_swap_replaces_a_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_renameat2", lambda *a, **k: False)
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        _write(tmp, {"a.txt": "1"})
    with atomic_dir(out, overwrite=True) as tmp:
        _write(tmp, {"a.txt": "2"})
    assert (out / "a.txt").read_text() == "2"
    assert _names(tmp_path) == ["out"]


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    host = atomic._host_tag()
    dead = tmp_path / f".out.{_dead_pid()}-{host}.0123abcd.tmp"
    dead.mkdir()
    _write(dead, {"half.bin": "x"})
    dead_file = tmp_path / f".r.json.{_dead_pid()}-{host}.0123abcd.tmp"
    dead_file.write_text("half")
    live = tmp_path / f".out.{os.getppid()}-{host}.0123abcd.tmp"  # our parent is alive
    live.mkdir()
    with atomic_dir(out) as tmp:
        _write(tmp, {"a.txt": "1"})
    atomic_write_text(tmp_path / "r.json", "{}")
    assert not dead.exists() and not dead_file.exists()
    assert live.is_dir()


# --------------------------------------------------------------------------- one writer at a time
def test_second_writer_gets_a_typed_error_naming_the_first(tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        with pytest.raises(OutputLockedError, match=f"process {os.getpid()}"):
            with atomic_dir(out):
                pass
    assert _names(tmp_path) == []  # lock released and removed
    with atomic_dir(out) as tmp:
        _write(tmp, {"a.txt": "1"})


FILES = ("a.bin", "b.bin", "c.bin")


def _writer(out: str, wid: int, n: int, queue) -> None:
    errors = []
    for i in range(n):
        try:
            with atomic_dir(out, overwrite=True) as tmp:
                for name in FILES:
                    (tmp / name).write_text(f"{wid}:{i}:" + "x" * 4096)
        except OutputLockedError:
            errors.append("locked")
        except BaseException as exc:  # noqa: BLE001 - the test reports any untyped error
            errors.append(f"{type(exc).__name__}: {exc}")
    queue.put(errors)


def test_concurrent_writers_never_fail_untyped_and_leave_a_complete_folder(tmp_path):
    out = tmp_path / "out"
    queue = FORK.Queue()
    procs = [FORK.Process(target=_writer, args=(str(out), w, 40, queue)) for w in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    untyped = [e for errs in results for e in errs if e != "locked"]
    assert not untyped, untyped[:5]
    assert sum(40 - len(errs) for errs in results) >= 1  # at least one save went through
    assert _names(out) == [MARKER, *FILES]
    stamps = {(out / name).read_text().split(":")[:2] == (out / FILES[0]).read_text().split(":")[:2]
              for name in FILES}
    assert stamps == {True}  # all files from the same save: no mix of two writers
    assert _names(tmp_path) == ["out"]


def test_output_locked_error_is_typed():
    assert issubclass(OutputLockedError, SparseTorchError)


# --------------------------------------------------------------------------- permissions follow umask
def _save_under_umask(root: str, mask: int, queue) -> None:
    os.umask(mask)
    with atomic_dir(Path(root) / "d") as tmp:
        (tmp / "w.txt").write_text("x")
    atomic_write_text(Path(root) / "f.txt", "x")
    queue.put("ok")


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_outputs_respect_the_umask(tmp_path, mask):
    queue = FORK.Queue()
    p = FORK.Process(target=_save_under_umask, args=(str(tmp_path), mask, queue))
    p.start()
    assert queue.get(timeout=60) == "ok"
    p.join(60)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "d") == 0o777 & ~mask
    assert mode(tmp_path / "f.txt") == 0o666 & ~mask
    assert mode(tmp_path / "d" / MARKER) == 0o666 & ~mask


def test_replacing_a_file_keeps_its_mode(tmp_path):
    f = tmp_path / "f.txt"
    f.write_text("1")
    os.chmod(f, 0o640)
    atomic_write_text(f, "2")
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o640
    os.chmod(f, 0o444)  # read-only: replacing it by name still works, the mode stays
    atomic_write_text(f, "3")
    assert f.read_text() == "3" and stat.S_IMODE(os.stat(f).st_mode) == 0o444


# --------------------------------------------------------------------------- save_hf_model uses all of it
def test_save_hf_model_refuses_a_foreign_model_folder_and_its_input(tmp_path):
    pytest.importorskip("transformers")
    from tiny_models import make_tiny_llama

    from sparsetorch.data.llm import save_hf_model

    model = make_tiny_llama()
    other = tmp_path / "other"
    model.save_pretrained(other)  # someone else's model folder (has config.json)
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    (other / "README.md").write_text("not ours")
    with pytest.raises(OutputExistsError):
        save_hf_model(model, None, other)
    assert (other / "README.md").read_text() == "not ours"
    with pytest.raises(OutputExistsError, match="is the input"):
        save_hf_model(model, None, other, inputs=[other], overwrite=True)
    assert {p.name: p.read_bytes() for p in other.iterdir() if p.name != "README.md"} == before
    out = save_hf_model(model, None, tmp_path / "ours")
    assert (out / MARKER).is_file() and (out / "config.json").is_file()
    save_hf_model(model, None, out, overwrite=True)


# --------------------------------------------------------------------------- unwritable outputs
def test_output_under_a_file_is_a_typed_error_before_anything_is_written(tmp_path) -> None:
    from sparsetorch.atomic import (
        atomic_dir,
        atomic_write_text,
        check_output_dir,
        check_output_file,
    )
    from sparsetorch.errors import OutputError

    blocker = tmp_path / "afile"
    blocker.write_text("keep me")
    for call in (lambda: check_output_dir(blocker / "sub" / "out"),
                 lambda: check_output_file(blocker / "x.json"),
                 lambda: atomic_write_text(blocker / "deeper" / "x.json", "{}")):
        with pytest.raises(OutputError, match="is a file, not a folder"):
            call()
    with pytest.raises(OutputError, match="is a file, not a folder"), atomic_dir(blocker / "out"):
        pass  # pragma: no cover - never entered
    assert blocker.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_unwritable_parent_is_a_typed_error(tmp_path, monkeypatch) -> None:
    import os

    from sparsetorch.atomic import check_output_file
    from sparsetorch.errors import OutputError

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode))
    with pytest.raises(OutputError, match="no permission"):
        check_output_file(tmp_path / "x.json")


def test_mkdir_refusal_becomes_output_error(tmp_path, monkeypatch) -> None:
    from pathlib import Path

    from sparsetorch.atomic import atomic_write_text
    from sparsetorch.errors import OutputError

    def ro(self, *a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", ro)
    with pytest.raises(OutputError, match="Read-only file system"):
        atomic_write_text(tmp_path / "new" / "x.json", "{}")


def test_compressed_checkpoint_folder_is_recovered_by_load(tmp_path):
    import torch
    from torch import nn

    import sparsetorch
    from sparsetorch.export.checkpoint import DEFAULT_FILENAME

    model = nn.Linear(8, 4)
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        sparsetorch.save(model, tmp / DEFAULT_FILENAME)
    _kill_mid_swap(out)
    fresh = nn.Linear(8, 4)
    sparsetorch.load(out / DEFAULT_FILENAME, fresh)  # the file's folder is restored first
    assert torch.equal(fresh.weight, model.weight)
    _kill_mid_swap(out)
    sparsetorch.load(out, fresh)  # and so is the folder itself
