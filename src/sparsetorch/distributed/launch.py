"""Run a function on N local processes joined in a process group, with hard time limits.

``torchrun`` is the launcher for real runs (several machines, elastic restarts). This is the
one-machine launcher that ``sparsetorch train-lm --nproc N`` and the tests use: each process
joins a ``gloo`` group through a fresh ``file://`` rendezvous (never a port that another run
may hold), with a process-group timeout of seconds rather than torch's default 30 minutes, and
the whole run is killed when it outlives ``timeout_s``. It never hangs.

Each rank's return value comes back as safetensors bytes plus a JSON tree (the encoding of
:mod:`sparsetorch.statefile`; no pickle of tensors or objects): tensors, numbers, strings, None
and lists/tuples/dicts of them (tensors are copied, not shared: the process that made them may
be gone by then). Results leave
the process before the process group is torn down (torch 2.13 sometimes aborts at exit after a
finished gloo run; that must not lose a result).
"""

from __future__ import annotations

import gc
import os
import queue
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..errors import DistributedError

__all__ = ["run_local", "init_method_file"]


def init_method_file(folder: str) -> str:
    """A ``file://`` rendezvous inside ``folder`` (use a fresh folder per run: torch never deletes it)."""
    return "file://" + os.path.join(os.path.abspath(folder), "pg_init")


def _encode(result: Any) -> tuple[bytes, str] | str:
    """``(safetensors bytes, JSON tree)`` of a result; an error text if it holds another type."""
    import json

    from safetensors.torch import save

    from ..statefile import flatten_state

    try:
        tensors, tree = flatten_state(result)
    except TypeError as exc:
        return str(exc)
    return save(tensors), json.dumps(tree)


def _decode(value: tuple[bytes, str] | str) -> Any:
    import json

    from safetensors.torch import load

    from ..statefile import unflatten_state

    if isinstance(value, str):
        raise TypeError(value)
    data, tree = value
    return unflatten_state(load(data), json.loads(tree), source="a rank's result")


def _worker(fn: Callable[..., Any], rank: int, world: int, init: str, args: Sequence[Any], out: Any,
            backend: str, pg_timeout_s: float, threads: int) -> None:
    try:
        torch.set_num_threads(threads)
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                                timeout=timedelta(seconds=pg_timeout_s))
        result = fn(rank, world, *args)
        out.put(("ok", rank, _encode(result)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        out.put(("error", rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-4000:]}"))
    finally:
        out.close()
        out.join_thread()  # the result has left this process before any teardown
        gc.collect()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - the run's result is already delivered
                pass


def run_local(
    fn: Callable[..., Any],
    nprocs: int = 2,
    args: Sequence[Any] = (),
    *,
    timeout_s: float = 120.0,
    pg_timeout_s: float = 30.0,
    backend: str = "gloo",
    threads: int = 1,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``nprocs`` spawned processes; return the results by rank.

    Every process has joined a ``backend`` process group before ``fn`` runs (rank ``r`` of
    ``nprocs``). ``fn`` must be importable (a module-level function). Raises
    :class:`~sparsetorch.errors.DistributedError` naming the rank when a rank raises (the others
    stop at their next collective, after at most ``pg_timeout_s``), and when the run outlives
    ``timeout_s`` (every process is then killed). Results: see the module docstring. ``OMP_NUM_THREADS`` is set to ``threads`` in
    the children, so float results do not depend on thread scheduling.
    """
    if int(nprocs) < 1:
        raise DistributedError(f"nprocs must be at least 1, got {nprocs}.")
    if not (timeout_s > 0 and pg_timeout_s > 0):
        raise DistributedError(f"timeouts must be positive seconds, got timeout_s={timeout_s}, pg_timeout_s={pg_timeout_s}.")
    if not dist.is_available():
        raise DistributedError("torch.distributed is not available in this torch build.")
    ctx = mp.get_context("spawn")
    folder = tempfile.mkdtemp(prefix="sparsetorch-pg-")
    init = init_method_file(folder)
    out = ctx.Queue()
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    procs = []
    try:
        for r in range(int(nprocs)):
            p = ctx.Process(target=_worker, args=(fn, r, int(nprocs), init, tuple(args), out, backend,
                                                  float(pg_timeout_s), int(threads)), daemon=True)
            p.start()
            procs.append(p)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    deadline = time.monotonic() + float(timeout_s)
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    try:
        while len(results) + len(errors) < len(procs):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(len(procs))) - set(results) - set(errors))
                raise DistributedError(
                    f"rank(s) {missing} did not finish within {timeout_s:g} s; all processes were killed."
                    + (f" First error: rank {next(iter(errors))}: {errors[next(iter(errors))]}" if errors else ""))
            try:
                status, rank, value = out.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs)
                        if not p.is_alive() and i not in results and i not in errors and p.exitcode not in (0, None)]
                if dead and out.empty():
                    time.sleep(0.5)  # a result may still be in flight
                    if out.empty():
                        raise DistributedError(
                            f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} before returning a result."
                        ) from None
                continue
            if status == "ok":
                try:
                    results[rank] = _decode(value)
                except Exception as exc:  # noqa: BLE001 - a result type outside the safe set
                    errors[rank] = f"its result could not be read back ({type(exc).__name__}: {exc}); return tensors, numbers, strings and lists/dicts of them."
            else:
                errors[rank] = value
        if errors:
            r = next(iter(errors))  # the first to fail; the others usually lost their peer
            others = [o for o in errors if o != r]
            raise DistributedError(f"rank {r} of {len(procs)} failed: {errors[r]}"
                                   + (f"\n(then rank(s) {others} failed too)" if others else ""))
        return [results[r] for r in range(len(procs))]
    finally:
        for p in procs:
            p.join(timeout=max(0.0, min(10.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        shutil.rmtree(folder, ignore_errors=True)
