"""Measurements shared by ``benchmarks/sparse_inference.py`` and ``sparsetorch bench inference``."""

from __future__ import annotations

import inspect
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["machine_info", "decode_runs", "decode_tokens_per_s", "paired_decode_tokens_per_s", "interleaved_medians",
           "device_sync", "streaming_bandwidth_gbs"]


def device_sync() -> None:
    """Wait for queued GPU work, so that a host clock read next marks its end, not its launch.

    CUDA kernels run asynchronously: without this, ``time.perf_counter()`` around a GPU call
    measures how long it took to *queue* the work, and a kernel choice made from such times is
    arbitrary. A no-op where CUDA is absent or was never used by this process.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def streaming_bandwidth_gbs(mb: int = 512, repeats: int = 7) -> float:
    """Streaming-read bandwidth in GB/s at torch's current thread count: the median over
    ``repeats`` timed ``torch.sum`` calls over an ``mb`` MB float32 tensor (one untimed call
    first). Far larger than the caches, so it measures memory, the limit of batch-1 decoding."""
    x = torch.ones(max(1, mb) * 2**20 // 4)
    x.sum()
    ts = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(ts) / 1e9


def machine_info() -> dict[str, Any]:
    """Threads, CPU count and load average: the context every timing needs."""
    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover - not on Linux/macOS
        load = (float("nan"),) * 3
    cpus = os.cpu_count() or 1
    return {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": cpus,
        "loadavg_1_5_15": list(load),
        # load above our own threads means other processes were competing for the cores
        "machine_shared": bool(load[0] > torch.get_num_threads() + 0.5),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")(),
    }


def interleaved_medians(
    fns: dict[str, Callable[[], object]],
    repeats: int = 20,
    rounds: int = 5,
    setup: dict[str, Callable[[], object]] | None = None,
) -> dict[str, float]:
    """Seconds per call of each function: medians of ``repeats`` calls, interleaved over ``rounds``.

    Each round times every function in turn (in a rotating order), so a burst of load from other
    processes hits all of them; the result per function is the median of its round medians.
    ``setup[name]()``, when given, runs untimed before each of ``name``'s blocks (e.g. to swap
    the layers a configuration uses into the model).
    """
    names = list(fns)
    per: dict[str, list[float]] = {k: [] for k in names}
    for name in names:  # warm-up: first calls pay for allocation and set-up
        if setup and name in setup:
            setup[name]()
        fns[name]()
    for r in range(max(1, rounds)):
        shift = r % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            if setup and name in setup:
                setup[name]()
            fn = fns[name]
            ts = []
            for _ in range(max(1, repeats)):
                device_sync()
                t0 = time.perf_counter()
                fn()
                device_sync()
                ts.append(time.perf_counter() - t0)
            per[name].append(statistics.median(ts))
    return {k: statistics.median(v) for k, v in per.items()}


@torch.no_grad()
def decode_runs(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int = 32, repeats: int = 3) -> list[float]:
    """Greedy token-by-token decode speed of each of ``repeats`` runs (tokens/s, prefill excluded).

    ``prompt_ids`` is ``[1, T]``. Each step feeds one token with the KV cache, so every Linear
    sees a batch of one row: the regime sparse CPU kernels are built for. ``model`` may also be a
    :class:`~sparsetorch.inference.decode.DecodeEngine` (timed from its first generated token).
    """
    from .decode import DecodeEngine

    if isinstance(model, DecodeEngine):  # one call per token; the first token comes out of the prefill
        runs = []
        for _ in range(max(1, repeats)):
            stamps: list[float] = []
            model.generate(prompt_ids, new_tokens + 1, on_token=lambda _t, s=stamps: s.append(time.perf_counter()))
            runs.append(new_tokens / (stamps[-1] - stamps[0]))
        return runs
    # transformers >= 5.24 names the KV cache ``cache`` (``past_key_values`` is deprecated and
    # goes in 5.40); older releases only know ``past_key_values``
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    runs = []
    for _ in range(max(1, repeats)):
        out = model(input_ids=prompt_ids, use_cache=True)
        past = out[key] if key in out else out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        device_sync()
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=nxt, use_cache=True, **{key: past})
            past = out[key] if key in out else out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
        device_sync()
        runs.append(new_tokens / (time.perf_counter() - t0))
    return runs


def decode_tokens_per_s(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int = 32, repeats: int = 3) -> float:
    """Median greedy decode speed over ``repeats`` runs (tokens/s); see :func:`decode_runs`.

    The median, not the best run: a benchmark that reports best-of hides the stalls users get.
    """
    return statistics.median(decode_runs(model, prompt_ids, new_tokens, repeats))


def paired_decode_tokens_per_s(a: nn.Module, b: nn.Module, prompt_ids: torch.Tensor, rounds: int = 9,
                               new_tokens: int = 32) -> tuple[float, float]:
    """Median decode tokens/s of models ``a`` and ``b``, their runs alternating (the order flips
    every round) after one untimed warm-up run each, so a burst of load from elsewhere hits both
    and their ratio is taken under the same conditions."""
    decode_runs(a, prompt_ids, new_tokens, repeats=1)
    decode_runs(b, prompt_ids, new_tokens, repeats=1)
    ta: list[float] = []
    tb: list[float] = []
    for r in range(max(1, rounds)):
        for first in ((True, False) if r % 2 == 0 else (False, True)):
            (ta if first else tb).append(decode_runs(a if first else b, prompt_ids, new_tokens, repeats=1)[0])
    return statistics.median(ta), statistics.median(tb)
