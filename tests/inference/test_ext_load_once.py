"""One helper (``_ext._load_once``) builds both compiled extensions: at most once per process,
``SPARSETORCH_NO_COMPILE`` honoured, a failed build remembered with its reason."""

from __future__ import annotations

import threading
import types

import pytest

from sparsetorch.inference import _decode_ext, _ext


def test_builds_once_even_when_threads_race() -> None:
    state: dict[str, object] = {"loaded": False, "module": None, "error": None}
    lock = threading.Lock()
    calls = []
    mod = types.ModuleType("fake")

    def build() -> types.ModuleType:
        calls.append(1)
        return mod

    got = []
    threads = [threading.Thread(target=lambda: got.append(_ext._load_once(state, lock, build, str))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1] and got == [mod] * 8 and state["error"] is None


def test_failure_is_remembered_and_reported_once() -> None:
    state: dict[str, object] = {"loaded": False, "module": None, "error": None}
    seen: list[Exception] = []

    def build() -> types.ModuleType:
        raise OSError("g++: command not found\nmore lines")

    assert _ext._load_once(state, threading.Lock(), build, lambda e: f"{type(e).__name__}: {e}", seen.append) is None
    assert _ext._load_once(state, threading.Lock(), build, str, seen.append) is None  # not rebuilt
    assert len(seen) == 1 and str(state["error"]).startswith("OSError: g++")


def test_decode_extension_failure_and_no_compile(monkeypatch) -> None:
    def broken() -> types.ModuleType:
        raise OSError("g++: command not found\nsecond line")

    monkeypatch.setattr(_decode_ext, "_build", broken)
    _decode_ext.reset()
    try:
        assert _decode_ext.get_decode_extension() is None
        assert _decode_ext.decode_extension_error() == "OSError: g++: command not found"  # first line only
        _decode_ext.reset()
        monkeypatch.setenv("SPARSETORCH_NO_COMPILE", "1")
        assert _decode_ext.get_decode_extension() is None
        assert "SPARSETORCH_NO_COMPILE" in (_decode_ext.decode_extension_error() or "")
    finally:
        _decode_ext.reset()


@pytest.mark.parametrize("prefix", ["sparsetorch_kernels", "sparsetorch_decode"])
def test_compile_names_the_build_by_prefix_and_source(monkeypatch, tmp_path, prefix: str) -> None:
    import torch.utils.cpp_extension as cpp

    seen: dict[str, object] = {}
    monkeypatch.setenv("SPARSETORCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpp, "load_inline", lambda **kw: seen.update(kw) or "module")
    assert _ext._compile(prefix, "int f() { return 1; }", None) == "module"
    assert str(seen["name"]).startswith(prefix + "_") and seen["build_directory"] == str(tmp_path / "kernels" / seen["name"])
    assert seen["extra_cflags"] == ["-O3", "-fopenmp", "-march=native", "-std=c++17"]
