"""llama.cpp as a decode peer: the same dense model, run by llama.cpp in its own virtual environment.

Used by ``sparsetorch bench inference --peer llamacpp`` and ``benchmarks/decode_vs_llamacpp.py``.
llama.cpp is driven through a pinned ``llama-cpp-python`` (:data:`LLAMA_CPP_VERSION`, built
from source) installed in a separate venv, so that neither its build nor its dependencies touch
ours. A small worker script runs in that venv's Python and answers JSON lines on stdin/stdout
(:class:`LlamaCppPeer`): ``load`` a GGUF, ``run`` greedy generation of N tokens after given
prompt ids (returning each token's arrival time), ``quit``.

GGUFs of a Hugging Face folder are made by llama.cpp's own ``convert_hf_to_gguf.py``, shipped
in the llama-cpp-python sdist under ``vendor/llama.cpp/`` (:func:`convert_to_gguf`). It runs
with *this* interpreter (it needs torch, which the peer venv lacks), the sdist's ``gguf-py``
and ``sentencepiece`` from the peer venv.

One-time setup (compiles llama.cpp: slow on a small machine)::

    python -m sparsetorch.inference.peer_llamacpp setup [--venv DIR] [--cache DIR]

Paths: the venv is ``$SPARSETORCH_LLAMACPP_VENV`` or ``<cache dir>/llamacpp/venv``; the sdist
and converted GGUFs live in ``$SPARSETORCH_LLAMACPP_CACHE`` or ``<cache dir>/llamacpp``
(``<cache dir>`` is ``$SPARSETORCH_CACHE_DIR`` or ``~/.cache/sparsetorch``). A missing venv,
converter or ``llama_cpp`` module is a :class:`~sparsetorch.errors.DependencyError` whose
message is the exact setup command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import DataError, DependencyError, MethodError, ModelError, close_matches

__all__ = [
    "LLAMA_CPP_VERSION",
    "GGUF_TYPES",
    "PEERS",
    "LlamaCppPeer",
    "check_peer",
    "convert_to_gguf",
    "decode_tps",
    "default_cache",
    "default_venv",
    "gguf_for_model",
    "peer_decode",
    "sdist_dir",
    "setup",
    "setup_command",
]

#: the pinned llama-cpp-python release (llama.cpp is vendored in it)
LLAMA_CPP_VERSION = "0.3.36"
#: GGUF value types convert_hf_to_gguf.py writes that a comparison uses
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
#: peers ``sparsetorch bench inference --peer`` knows
PEERS = ("llamacpp",)

#: the worker run by the peer venv's Python: JSON lines in, JSON lines out; first line = handshake
PEER_WORKER = r"""
import json, sys, time
def reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n"); sys.stdout.flush()
try:
    import llama_cpp
    from llama_cpp import Llama
except Exception as exc:  # not installed, or a broken build
    reply({"ready": False, "error": f"{type(exc).__name__}: {exc}"}); sys.exit(0)
reply({"ready": True, "version": llama_cpp.__version__})
threads = int(sys.argv[1])
models = {}
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        if cmd["op"] == "load":
            nbytes, emb, tied = None, 0, None
            try:
                from gguf import GGUFReader
                r = GGUFReader(cmd["path"])
                nbytes = sum(int(t.n_bytes) for t in r.tensors)
                emb = sum(int(t.n_bytes) for t in r.tensors if t.name == "token_embd.weight")
                tied = not any(t.name == "output.weight" for t in r.tensors)
                del r
            except ImportError:
                pass
            extra = cmd.get("extra_bufts")  # False: llama.cpp's extra CPU buffer types (AMX, repack) off
            import llama_cpp.llama_cpp as lowlevel
            defaults = lowlevel.llama_model_default_params
            if extra is False:
                def no_extra(defaults=defaults):
                    p = defaults(); p.use_extra_bufts = False; return p
                lowlevel.llama_model_default_params = no_extra
            try:
                models[cmd["name"]] = Llama(model_path=cmd["path"], n_threads=threads, n_threads_batch=threads,
                                            n_ctx=int(cmd.get("n_ctx", 256)), verbose=False)
            finally:
                lowlevel.llama_model_default_params = defaults
            reply({"ok": True, "tensor_bytes": nbytes, "embedding_bytes": emb, "tied": tied,
                   "version": llama_cpp.__version__, "extra_bufts": extra is not False})
        elif cmd["op"] == "run":
            llm = models[cmd["name"]]
            llm.reset()
            llama_cpp.llama_perf_context_reset(llm.ctx)
            stamps, toks = [], []
            t0 = time.perf_counter()
            for tok in llm.generate(cmd["ids"], top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                    reset=True):
                stamps.append(time.perf_counter()); toks.append(int(tok))
                if len(toks) == cmd["tokens"]:
                    break
            p = llama_cpp.llama_perf_context(llm.ctx)
            reply({"tokens": toks, "stamps": [s - t0 for s in stamps], "t_eval_ms": p.t_eval_ms, "n_eval": p.n_eval,
                   "t_p_eval_ms": p.t_p_eval_ms, "n_p_eval": p.n_p_eval})
        elif cmd["op"] == "quit":
            break
        else:
            reply({"error": f"unknown op {cmd['op']!r}"})
    except Exception as exc:
        reply({"error": f"{type(exc).__name__}: {exc}"})
"""


# ---------------------------------------------------------------------------------------------- paths
def _cache_root() -> Path:
    from ._ext import cache_dir

    return cache_dir() / "llamacpp"


def default_venv() -> Path:
    """The peer venv: ``$SPARSETORCH_LLAMACPP_VENV`` or ``<sparsetorch cache>/llamacpp/venv``."""
    env = os.environ.get("SPARSETORCH_LLAMACPP_VENV")
    return Path(env) if env else _cache_root() / "venv"


def default_cache() -> Path:
    """Folder of the llama-cpp-python sdist and converted GGUFs: ``$SPARSETORCH_LLAMACPP_CACHE``
    or ``<sparsetorch cache>/llamacpp``."""
    env = os.environ.get("SPARSETORCH_LLAMACPP_CACHE")
    return Path(env) if env else _cache_root()


def sdist_dir(cache: Path | None = None) -> Path:
    """The unpacked llama-cpp-python sdist (holds ``vendor/llama.cpp/convert_hf_to_gguf.py``)."""
    return Path(cache or default_cache()) / f"llama_cpp_python-{LLAMA_CPP_VERSION}"


def _python(venv: Path) -> Path:
    return Path(venv) / "bin" / "python"


def setup_command(venv: Path | None = None, cache: Path | None = None) -> str:
    """The exact shell command that creates the peer venv and fetches the converter."""
    return " ".join(shlex.quote(str(a)) for a in (
        sys.executable, "-m", "sparsetorch.inference.peer_llamacpp", "setup",
        "--venv", Path(venv or default_venv()).absolute(), "--cache", Path(cache or default_cache()).absolute()))


def check_peer(venv: Path | None = None, cache: Path | None = None, *, converter: bool = True) -> Path:
    """The peer venv's Python, after checking that it (and, with ``converter``, llama.cpp's
    converter) exists; :class:`~sparsetorch.errors.DependencyError` naming the setup command
    otherwise. Cheap: runs nothing (a venv without ``llama_cpp`` is found by :class:`LlamaCppPeer`)."""
    venv = Path(venv or default_venv())
    py = _python(venv)
    if not py.exists():
        raise DependencyError(f"the llama.cpp peer venv {venv} does not exist (no {py}); create it with: "
                              f"{setup_command(venv, cache)}")
    conv = sdist_dir(cache) / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if converter and not conv.is_file():
        raise DependencyError(f"llama.cpp's converter {conv} is missing; fetch it with: {setup_command(venv, cache)}")
    return py


# ---------------------------------------------------------------------------------------------- setup
def setup(venv: Path | None = None, cache: Path | None = None, *, build_jobs: int = 1) -> None:
    """Create the peer venv with the pinned llama-cpp-python (compiled from source, ``nice``-d,
    ``build_jobs`` parallel compile jobs), ``gguf`` and ``sentencepiece``, and unpack its sdist
    into ``cache`` for ``vendor/llama.cpp/convert_hf_to_gguf.py``. Idempotent."""
    venv, cache = Path(venv or default_venv()), Path(cache or default_cache())
    py = _python(venv)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(max(1, build_jobs))}
    if not py.exists():
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(["nice", "-n", "19", str(py), "-m", "pip", "install", f"llama-cpp-python=={LLAMA_CPP_VERSION}",
                    "gguf", "sentencepiece"], check=True, env=env)
    if not sdist_dir(cache).exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(py), "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-d", str(cache)], check=True)
        with tarfile.open(cache / f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz") as tf:
            tf.extractall(cache, filter="data")


def converter_env(venv: Path | None = None, cache: Path | None = None) -> dict[str, str]:
    """Environment for running llama.cpp's converter with *this* interpreter: ``PYTHONPATH`` holds
    the sdist's own ``gguf-py`` first, then ``sentencepiece`` linked from the peer venv."""
    venv, cache = Path(venv or default_venv()), Path(cache or default_cache())
    link = cache / "convpath"
    link.mkdir(parents=True, exist_ok=True)
    site = next((venv / "lib").glob("python3*/site-packages"), None)
    if site is not None:
        for name in ("sentencepiece", "sentencepiece.libs"):
            dst = link / name
            if (site / name).exists() and not dst.exists():
                dst.symlink_to(site / name)
    gguf_py = sdist_dir(cache) / "vendor" / "llama.cpp" / "gguf-py"
    return {**os.environ, "PYTHONPATH": f"{gguf_py}{os.pathsep}{link}"}


def convert_to_gguf(hf_dir: Path, out: Path, outtype: str = "f32", *, venv: Path | None = None,
                    cache: Path | None = None) -> Path:
    """Convert the Hugging Face folder ``hf_dir`` to the GGUF ``out`` (``outtype`` one of
    :data:`GGUF_TYPES`) with llama.cpp's ``convert_hf_to_gguf.py``; its output goes to
    ``out.log``. Written to a temporary name and renamed, so ``out`` is never partial."""
    if outtype not in GGUF_TYPES:
        raise MethodError(f"unknown GGUF type {outtype!r}; choose one of {', '.join(GGUF_TYPES)}."
                          + close_matches(outtype, GGUF_TYPES))
    check_peer(venv, cache)
    conv = sdist_dir(cache) / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    log_path = out.with_suffix(".log")
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, str(conv), str(hf_dir), "--outtype", outtype, "--outfile", str(tmp)],
                              env=converter_env(venv, cache), stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not tmp.is_file():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise ModelError(f"llama.cpp's converter could not convert {hf_dir} to GGUF ({tail[0]}); see {log_path}.")
    tmp.replace(out)
    return out


def _folder_key(hf_dir: Path) -> str:
    """A short key of a model folder's identity: its path and its files' sizes and times."""
    h = hashlib.sha256(str(Path(hf_dir).resolve()).encode())
    for f in sorted(Path(hf_dir).iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def gguf_for_model(hf_dir: Path, outtype: str = "f32", *, venv: Path | None = None, cache: Path | None = None,
                   name: str | None = None) -> Path:
    """The GGUF of ``hf_dir`` in ``outtype``, converted once and kept in ``cache/gguf/`` (keyed by
    the folder's path and files, so an edited folder is converted again)."""
    cache = Path(cache or default_cache())
    out = cache / "gguf" / f"{name or Path(hf_dir).name}-{_folder_key(hf_dir)}-{outtype}.gguf"
    if out.is_file():
        return out
    return convert_to_gguf(hf_dir, out, outtype, venv=venv, cache=cache)


# ---------------------------------------------------------------------------------------------- worker
def decode_tps(stamps: list[float]) -> float:
    """Decode tokens/s from the arrival times of the new tokens: the tokens after the first over
    the time from the first to the last (the prompt and the first token are excluded)."""
    if len(stamps) < 2 or stamps[-1] <= stamps[0]:
        raise DataError(f"decode speed needs at least 2 new tokens with increasing times, got {len(stamps)}.")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


class LlamaCppPeer:
    """The llama.cpp worker in the peer venv (JSON lines over stdin/stdout).

    Starting it checks the venv and that ``llama_cpp`` imports there (a handshake line); both
    failures are a :class:`~sparsetorch.errors.DependencyError` naming the setup command. Use as
    a context manager, or call :meth:`close`.
    """

    def __init__(self, threads: int, venv: Path | None = None, cache: Path | None = None) -> None:
        self.venv = Path(venv or default_venv())
        py = check_peer(self.venv, cache, converter=False)
        # stderr to a file: llama.cpp may write a lot there, and a full pipe would block the worker
        self._err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([str(py), "-c", PEER_WORKER, str(int(threads))], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, text=True)
        hello = self._read()
        if not hello.get("ready"):
            self.close()
            raise DependencyError(f"llama-cpp-python does not load in {self.venv} ({hello.get('error', 'no reply')}); "
                                  f"install it with: {setup_command(self.venv, cache)}")
        #: llama-cpp-python version of the worker
        self.version: str = str(hello.get("version"))

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self._err.seek(0)
            lines = self._err.read().strip().splitlines()
            err = lines[-1] if lines else ""
            raise DependencyError(f"the llama.cpp worker in {self.venv} exited unexpectedly{': ' + err if err else ''}.")
        try:
            return json.loads(line)
        except ValueError:
            raise DependencyError(f"the llama.cpp worker in {self.venv} wrote {line[:200]!r}, not a JSON line.") from None

    def ask(self, **cmd: Any) -> dict[str, Any]:
        """Send one command, return the worker's reply; a reply with ``error`` raises ModelError."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise DependencyError(f"the llama.cpp worker in {self.venv} is not running.") from None
        reply = self._read()
        if "error" in reply:
            raise ModelError(f"llama.cpp: {cmd.get('op')} failed: {reply['error']}")
        return reply

    def load(self, name: str, path: Path, n_ctx: int = 256, *, extra_bufts: bool = True) -> dict[str, Any]:
        """Load the GGUF ``path`` under ``name``: ``{"tensor_bytes", "embedding_bytes", "tied", "version",
        "extra_bufts"}``. ``extra_bufts=False`` turns off llama.cpp's extra CPU buffer types (AMX
        and repacked layouts; llama-cli's ``--no-extra-bufts``): where AMX tiles are not usable,
        e.g. in some VMs, llama.cpp's AMX Q8_0 path crashes the worker."""
        return self.ask(op="load", name=name, path=str(path), n_ctx=int(n_ctx), **({} if extra_bufts else
                                                                                   {"extra_bufts": False}))

    def run(self, name: str, ids: list[int], tokens: int) -> dict[str, Any]:
        """Greedy generation of ``tokens`` tokens after prompt ``ids``: ``{"tokens", "stamps" (s since
        the call), "t_eval_ms", "n_eval", ...}`` (llama.cpp's own counters)."""
        return self.ask(op="run", name=name, ids=[int(i) for i in ids], tokens=int(tokens))

    def close(self) -> None:
        """Stop the worker (politely, then by force)."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
            except (BrokenPipeError, OSError, ValueError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._err.close()

    def __enter__(self) -> LlamaCppPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def peer_decode(gguf: Path, prompt_ids: list[int], tokens: int = 32, repeats: int = 3, *, threads: int,
                venv: Path | None = None, cache: Path | None = None) -> dict[str, Any]:
    """Greedy decode speed of llama.cpp on ``gguf``: one untimed warm-up, then ``repeats`` runs of
    ``tokens`` new tokens after ``prompt_ids``. Returns a JSON-ready dict: ``decode_tokens_per_s``
    (median of :func:`decode_tps` per run, seen from Python), ``runs``, llama.cpp's own eval rate,
    the tokens of the first run, the GGUF's tensor bytes, the llama-cpp-python version."""
    if tokens < 2:
        raise DataError(f"the peer's decode speed needs at least 2 new tokens, got {tokens}.")
    with LlamaCppPeer(threads, venv, cache) as peer:
        info = peer.load("model", gguf, n_ctx=max(256, len(prompt_ids) + tokens + 8))
        peer.run("model", prompt_ids, min(4, tokens))
        runs = [peer.run("model", prompt_ids, tokens) for _ in range(max(1, repeats))]
    rates = [decode_tps(r["stamps"]) for r in runs]
    internal = [1000.0 * r["n_eval"] / r["t_eval_ms"] for r in runs if r.get("t_eval_ms")]
    return {"runtime": "llama.cpp", "llama_cpp_python": info.get("version"), "gguf": str(Path(gguf).absolute()),
            "threads": threads, "tokens": tokens, "decode_tokens_per_s": statistics.median(rates), "runs": rates,
            "internal_eval_tokens_per_s": statistics.median(internal) if internal else None,
            "bytes_per_token": info.get("tensor_bytes"), "new_tokens": runs[0]["tokens"]}


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    """``python -m sparsetorch.inference.peer_llamacpp setup [--venv DIR] [--cache DIR] [--jobs N]``."""
    ap = argparse.ArgumentParser(prog="python -m sparsetorch.inference.peer_llamacpp",
                                 description="Set up the llama.cpp peer (its own venv, pinned llama-cpp-python).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="create the venv, build llama-cpp-python, fetch the converter")
    s.add_argument("--venv", type=Path, default=None, help=f"default: {default_venv()}")
    s.add_argument("--cache", type=Path, default=None, help=f"default: {default_cache()}")
    s.add_argument("--jobs", type=int, default=1, help="parallel compile jobs (default 1)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    setup(args.venv, args.cache, build_jobs=args.jobs)
    print(f"llama.cpp peer ready: venv {args.venv or default_venv()}, converter in {sdist_dir(args.cache)} "
          f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":  # pragma: no cover
    main()
