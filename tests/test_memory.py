"""sparsetorch.memory.peak_rss_mb: this process's own peak in MiB (VmHWM), which grows when memory
is touched, not a peak inherited from a parent; ru_maxrss when /proc cannot be read."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from sparsetorch import memory

MODULE = Path(memory.__file__)

#: run in a fresh interpreter (its peak starts small, so touching 200 MiB must raise it); the module
#: is loaded from its file, without importing sparsetorch (and torch)
CHILD = f"""
import importlib.util, json, resource
spec = importlib.util.spec_from_file_location("memory", {str(MODULE)!r})
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
before = m.peak_rss_mb()
inherited = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
buf = bytearray(200 * 2**20)
buf[::4096] = b"\\x01" * len(range(0, len(buf), 4096))  # touch every page: make it resident
print(json.dumps({{"before": before, "after": m.peak_rss_mb(), "ru_maxrss_at_start": inherited}}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="VmHWM needs Linux /proc")
def test_peak_grows_with_touched_memory_and_is_the_childs_own() -> None:
    parent_rss = memory.peak_rss_mb()
    out = json.loads(subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                                    check=True).stdout)
    assert out["before"] > 0
    assert out["after"] - out["before"] >= 100, out
    if parent_rss > 2 * out["before"] + 50:  # a large parent: ru_maxrss would report its peak
        assert out["before"] < out["ru_maxrss_at_start"]


def test_falls_back_to_ru_maxrss_when_proc_is_unreadable(monkeypatch, tmp_path) -> None:
    unit = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0  # ru_maxrss: bytes on macOS, KiB on Linux
    expected = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit
    monkeypatch.setattr(memory, "_STATUS", str(tmp_path / "missing"))
    got = memory.peak_rss_mb()
    assert got > 0 and got >= expected * 0.99
    garbled = tmp_path / "status"
    garbled.write_text("Name:\tpython\nVmHWM:\tnot-a-number kB\n")
    monkeypatch.setattr(memory, "_STATUS", str(garbled))
    assert memory.peak_rss_mb() >= expected * 0.99


def test_finetune_and_cli_report_the_same_helper() -> None:
    from sparsetorch.finetune import loop, sparse_update

    assert loop.peak_rss_mb is memory.peak_rss_mb and sparse_update.peak_rss_mb is memory.peak_rss_mb
