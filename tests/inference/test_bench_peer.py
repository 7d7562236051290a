"""`sparsetorch bench inference --peer llamacpp` with a fake peer (no llama.cpp in tests): the JSON
gains the peer's and our decode engine's tokens/s, and a missing or broken peer venv is one line
naming the exact setup command, exit status 2 (through the installed console script)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from sparsetorch.errors import DependencyError, ModelError  # noqa: E402
from sparsetorch.inference import peer_llamacpp  # noqa: E402

#: the fake worker answers like llama-cpp-python's: tokens 1, 2, 3 ... arriving every 10 ms (100 tokens/s)
FAKE_WORKER = """
import json, sys
print(json.dumps({"ready": True, "version": "0.0-fake"}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "load":
        out = {"ok": True, "tensor_bytes": 1234, "embedding_bytes": 0, "tied": True, "version": "0.0-fake"}
    elif cmd["op"] == "run":
        n = cmd["tokens"]
        out = {"tokens": list(range(1, n + 1)), "stamps": [0.05 + 0.01 * i for i in range(n)],
               "t_eval_ms": 10.0 * n, "n_eval": n, "t_p_eval_ms": 1.0, "n_p_eval": len(cmd["ids"])}
    elif cmd["op"] == "quit":
        break
    else:
        out = {"error": "unknown op"}
    print(json.dumps(out), flush=True)
"""


def fake_venv(root: Path, worker: str = FAKE_WORKER) -> Path:
    """A venv whose ``bin/python`` ignores ``-c CODE THREADS`` and runs ``worker`` instead."""
    venv = root / "venv"
    (venv / "bin").mkdir(parents=True)
    (root / "worker.py").write_text(textwrap.dedent(worker))
    py = venv / "bin" / "python"
    py.write_text(f"#!/bin/sh\nexec {sys.executable} {root / 'worker.py'}\n")
    py.chmod(0o755)
    return venv


def script(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("sparsetorch", path=str(Path(sys.executable).parent))
    assert exe, "the sparsetorch console script is not installed"
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=600)


def test_missing_peer_venv_is_one_line_with_the_setup_command(hf_dir: Path, tmp_path: Path) -> None:
    venv = tmp_path / "no-venv"
    proc = script("bench", "inference", "--model", str(hf_dir), "--tokens", "2", "--peer", "llamacpp",
                  "--peer-venv", str(venv), "--peer-cache", str(tmp_path / "cache"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "DependencyError" in lines[0], proc.stderr
    cmd = peer_llamacpp.setup_command(venv, tmp_path / "cache")
    assert cmd.split(" ", 1)[1] in lines[0] and "-m sparsetorch.inference.peer_llamacpp setup --venv" in cmd
    assert str(venv.absolute()) in cmd


def test_a_venv_without_llama_cpp_and_unknown_peers_are_typed_errors(hf_dir: Path, tmp_path: Path) -> None:
    broken = fake_venv(tmp_path / "b", 'import json; print(json.dumps({"ready": False, '
                                         '"error": "ModuleNotFoundError: No module named llama_cpp"}))')
    with pytest.raises(DependencyError, match="llama_cpp.*install it with: .*peer_llamacpp setup"):
        peer_llamacpp.LlamaCppPeer(1, broken)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    proc = script("bench", "inference", "--model", str(hf_dir), "--tokens", "2", "--peer", "llamacpp",
                  "--peer-venv", str(broken), "--peer-gguf", str(gguf))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "peer_llamacpp setup" in proc.stderr
    proc = script("bench", "inference", "--model", str(hf_dir), "--peer", "llama")
    assert proc.returncode == 2 and "MethodError" in proc.stderr and "llamacpp" in proc.stderr
    proc = script("bench", "inference", "--model", str(hf_dir), "--peer", "llamacpp", "--peer-type", "q4")
    assert proc.returncode == 2 and "unknown --peer-type" in proc.stderr
    # converting needs llama.cpp's converter from the setup, too
    proc = script("bench", "inference", "--model", str(hf_dir), "--peer", "llamacpp",
                  "--peer-venv", str(fake_venv(tmp_path / "f")), "--peer-cache", str(tmp_path / "empty"))
    assert proc.returncode == 2 and "convert_hf_to_gguf.py" in proc.stderr and "peer_llamacpp setup" in proc.stderr


def test_peer_worker_protocol(tmp_path: Path) -> None:
    venv = fake_venv(tmp_path)
    with peer_llamacpp.LlamaCppPeer(2, venv) as peer:
        assert peer.version == "0.0-fake"
        assert peer.load("m", tmp_path / "x.gguf")["tensor_bytes"] == 1234
        r = peer.run("m", [1, 2, 3], 5)
        assert r["tokens"] == [1, 2, 3, 4, 5] and peer_llamacpp.decode_tps(r["stamps"]) == pytest.approx(100.0)
        with pytest.raises(ModelError, match="unknown op"):
            peer.ask(op="dance")
    res = peer_llamacpp.peer_decode(tmp_path / "x.gguf", [1, 2], 4, 3, threads=1, venv=venv)
    assert res["decode_tokens_per_s"] == pytest.approx(100.0) and len(res["runs"]) == 3
    assert res["internal_eval_tokens_per_s"] == pytest.approx(100.0) and res["bytes_per_token"] == 1234


@pytest.mark.skipif(__import__("sparsetorch.inference._decode_ext", fromlist=["x"]).get_decode_extension() is None,
                    reason="compiled decode extension unavailable")
def test_bench_json_gains_the_peers_and_our_engines_tokens_per_s(hf_dir: Path, tmp_path: Path) -> None:
    venv = fake_venv(tmp_path)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    js = tmp_path / "bench.json"
    proc = script("bench", "inference", "--model", str(hf_dir), "--prune", "0.5", "--tokens", "3", "--peer",
                  "llamacpp", "--peer-venv", str(venv), "--peer-gguf", str(gguf), "--json", str(js))
    assert proc.returncode == 0, proc.stderr
    res = json.loads(js.read_text())
    assert res["peer_tokens_per_s"] == pytest.approx(100.0)
    assert res["dense_tokens_per_s"] > 0 and res["sparse_tokens_per_s"] > 0 and res["engine_tokens_per_s"] > 0
    peer = res["peer"]
    assert peer["runtime"] == "llama.cpp" and peer["llama_cpp_python"] == "0.0-fake" and peer["gguf"] == str(gguf)
    assert peer["tokens"] == 3 and len(peer["runs"]) == 3 and peer["gguf_type"] is None
    assert "llama.cpp" in proc.stdout and "decode engine fp32" in proc.stdout
