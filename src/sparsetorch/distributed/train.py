"""A small causal LM trained sparse on several processes: the ``train-lm`` command and
``torchrun -m sparsetorch.distributed.train``.

The model is a tiny Llama (``transformers.LlamaConfig``, random init) over bytes (vocabulary
256: no tokenizer to download), trained on the calibration half of the embedded text corpus
(``pydoc_data.topics``) and evaluated on the other half. Each rank draws its own windows from a
generator seeded by ``(seed, rank, step)``, so a run is reproducible. Communication:

* ``ddp`` — DDP's all-reduce (with byte accounting);
* ``topk:D`` — top-k + error feedback at density D (:func:`~.hooks.register_topk`);
* ``topk-adam:D`` — the same hook on each rank's own Adam direction (``precondition="adam"``,
  AdamW's betas), applied by plain SGD at the same lr: top-k of the update, not of the gradient;
* ``powersgd:R`` — torch's PowerSGD hook at rank R (from step ``powersgd_start``; bytes from
  the shapes by torch's own compression rule);
* ``diloco:H`` / ``sparseloco:H`` — :class:`~.outer.OuterLoop` every H inner steps (no DDP).

The training method (``rigl``, ``set``, ``snfs``, ``gmp``, ``static`` ... or ``none``) is attached
with :func:`~.sparsifier.attach` and its masks are verified across ranks after every update.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import DistributedError, MethodError

__all__ = ["TrainLMConfig", "parse_comm", "train_lm", "train_rank", "main"]

COMM_FORMS = "ddp, topk:DENSITY, topk-adam:DENSITY, powersgd:RANK, diloco:H or sparseloco:H"
#: AdamW's moment decay rates in every train-lm run (the topk-adam hook uses the same)
BETAS = (0.9, 0.95)


@dataclass
class TrainLMConfig:
    """Settings of one ``train-lm`` run (every rank gets the same)."""

    nproc: int = 2
    comm: str = "ddp"
    method: str = "none"
    sparsity: float = 0.9
    steps: int = 200
    seq_len: int = 64
    batch: int = 8
    lr: float = 1e-3
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int = 256
    update_every: int = 25
    powersgd_start: int = 10
    eval_windows: int = 32
    seed: int = 0
    timeout_s: float = 1800.0
    #: diloco/sparseloco: the outer step's learning rate (None: DiLoCo 0.7, SparseLoCo 1.0)
    outer_lr: float | None = None
    #: sparseloco: the fraction of each chunk sent per outer step (None: 64/4096, as Templar)
    outer_density: float | None = None
    #: write a checkpoint (one file per rank + manifest) every this many steps (0: never)
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    #: continue from the latest checkpoint in checkpoint_dir when there is one
    resume: bool = False


#: settings that may differ between a checkpoint and the run that resumes it
_FREE_ON_RESUME = ("nproc", "timeout_s", "checkpoint_every", "checkpoint_dir", "resume", "eval_windows")
#: env var "RANK:STEP": that rank exits at that step on its first attempt (fault-injection tests)
FAULT_ENV = "SPARSETORCH_FAULT"


def _settings(cfg: TrainLMConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(cfg).items() if k not in _FREE_ON_RESUME}


def parse_comm(spec: str) -> tuple[str, float]:
    """``"topk:0.01"`` -> ``("topk", 0.01)``; ``"ddp"`` -> ``("ddp", 0)``. Raises DistributedError."""
    kind, _, value = str(spec).strip().lower().partition(":")
    if kind == "ddp" and not value:
        return "ddp", 0.0
    if kind not in ("topk", "topk-adam", "powersgd", "diloco", "sparseloco") or not value:
        raise DistributedError(f"--comm {spec!r}: use one of {COMM_FORMS}.")
    try:
        x = float(value)
    except ValueError:
        raise DistributedError(f"--comm {spec!r}: {value!r} is not a number; use one of {COMM_FORMS}.") from None
    if kind.startswith("topk") and not (0.0 < x <= 1.0):
        raise DistributedError(f"--comm {spec!r}: the top-k density must be in (0, 1], e.g. {kind}:0.01.")
    if not kind.startswith("topk") and (x < 1 or x != int(x)):
        raise DistributedError(f"--comm {spec!r}: {kind} needs a whole number >= 1 (rank or H).")
    return kind, x


def check_config(cfg: TrainLMConfig) -> TrainLMConfig:
    """Every setting checked before any process starts (typed errors that say what to do)."""
    kind, h = parse_comm(cfg.comm)
    if int(cfg.nproc) < 1:
        raise DistributedError(f"--nproc must be at least 1, got {cfg.nproc}.")
    if kind != "ddp" and int(cfg.nproc) < 2:
        raise DistributedError(f"--comm {cfg.comm} exchanges between ranks: use --nproc 2 or more.")
    for name in ("steps", "seq_len", "batch", "hidden", "layers", "heads", "intermediate", "update_every"):
        if int(getattr(cfg, name)) < 1:
            raise DistributedError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}.")
    if cfg.hidden % cfg.heads:
        raise DistributedError(f"--hidden ({cfg.hidden}) must be a multiple of --heads ({cfg.heads}).")
    if not cfg.lr > 0:
        raise DistributedError(f"--lr must be positive, got {cfg.lr}.")
    if cfg.method != "none":
        from ..training import METHODS, _load_all

        _load_all()
        if cfg.method not in METHODS:
            raise MethodError(f"unknown training method {cfg.method!r}; available: none, {', '.join(sorted(METHODS))}.")
        if not (0.0 <= cfg.sparsity < 1.0):
            raise DistributedError(f"--sparsity must be in [0, 1), got {cfg.sparsity}.")
    if int(cfg.checkpoint_every) < 0:
        raise DistributedError(f"--checkpoint-every must be >= 0, got {cfg.checkpoint_every}.")
    if (cfg.checkpoint_every or cfg.resume) and not cfg.checkpoint_dir:
        raise DistributedError("--checkpoint-every and --resume need --checkpoint-dir.")
    if cfg.checkpoint_every and kind == "powersgd":
        raise DistributedError("checkpoints of --comm powersgd are not supported (torch's PowerSGD state has no "
                               "pickle-free form); use ddp, topk, diloco or sparseloco, or run without checkpoints.")
    if cfg.checkpoint_every and kind in ("diloco", "sparseloco") and cfg.checkpoint_every % int(h):
        raise DistributedError(f"--checkpoint-every ({cfg.checkpoint_every}) must be a multiple of H ({int(h)}): "
                               "checkpoints are taken right after an outer step, when the replicas agree.")
    if cfg.checkpoint_dir:
        from .checkpoint import check_resumable, has_checkpoint

        if cfg.resume and has_checkpoint(cfg.checkpoint_dir):
            check_resumable(cfg.checkpoint_dir, int(cfg.nproc), _settings(cfg))
        if not cfg.resume and has_checkpoint(cfg.checkpoint_dir):
            raise DistributedError(f"{cfg.checkpoint_dir} already holds a checkpoint: pass --resume to continue "
                                   "from it, or choose another --checkpoint-dir.")
    if cfg.outer_lr is not None and (kind not in ("diloco", "sparseloco") or not float(cfg.outer_lr) > 0):
        raise DistributedError(f"--outer-lr {cfg.outer_lr}: a positive number, and only with --comm diloco:H or "
                               "sparseloco:H (the other schemes have no outer step).")
    if cfg.outer_density is not None and (kind != "sparseloco" or not 0.0 < float(cfg.outer_density) <= 1.0):
        raise DistributedError(f"--outer-density {cfg.outer_density}: a fraction in (0, 1], and only with --comm "
                               "sparseloco:H (the fraction of each chunk of the pseudo-gradient sent).")
    if kind in ("diloco", "sparseloco"):
        if cfg.steps % int(h):
            raise DistributedError(f"--steps ({cfg.steps}) must be a multiple of H ({int(h)}) so the run ends on an outer step.")
        if cfg.method not in ("none", "static", "rigl", "set", "snfs"):
            raise DistributedError(f"--method {cfg.method} with --comm {cfg.comm}: between outer steps the replicas "
                                   "differ, so masks may change only at outer steps; use none, static, rigl, set or snfs.")
        if cfg.method in ("rigl", "set", "snfs") and cfg.update_every % int(h):
            raise DistributedError(f"--update-every ({cfg.update_every}) must be a multiple of H ({int(h)}) with "
                                   f"--comm {cfg.comm}: masks may change only right after an outer step.")
    return cfg


def _corpus() -> tuple[torch.Tensor, torch.Tensor]:
    from ..data.text import pydoc_topics_split

    train, evaluation = pydoc_topics_split()
    as_ids = lambda s: torch.frombuffer(bytearray(s.encode("utf-8")), dtype=torch.uint8).long()  # noqa: E731
    return as_ids(train), as_ids(evaluation)


def _windows(ids: torch.Tensor, n: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, ids.numel() - seq_len - 1, (n,), generator=gen)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def build_model(cfg: TrainLMConfig) -> nn.Module:
    """The tiny byte-level Llama (the same initial weights on every rank: seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    conf = LlamaConfig(vocab_size=256, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                       num_key_value_heads=cfg.heads, max_position_embeddings=cfg.seq_len,
                       tie_word_embeddings=False)
    return LlamaForCausalLM(conf)


def _no_buffer_sync() -> dict[str, bool]:
    """DDP's option that turns off the per-forward buffer broadcast (renamed in torch 2.13)."""
    import inspect

    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


class _Counter:
    bytes_sent: int = 0
    state: Any = None


def _powersgd(ddp: nn.parallel.DistributedDataParallel, rank_r: int, start: int) -> Any:
    """torch's PowerSGD hook, wrapped to count bytes by torch's own compression rule."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

    from .hooks import ring_bytes

    state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=rank_r,
                               start_powerSGD_iter=max(2, start))
    counter = _Counter()  # PowerSGDState has __slots__: the byte count lives beside it
    world = dist.get_world_size()

    def hook(st, bucket):  # noqa: ANN001, ANN202 - DDP checks annotations as objects
        grads = bucket.gradients()
        elt = grads[0].element_size() if grads else 4
        if st.iter < st.start_powerSGD_iter:
            sent = ring_bytes("all_reduce", sum(g.numel() for g in grads) * elt, world)
        else:
            dense, p_sz, q_sz = 0, 0, 0
            for g in grads:
                if g.dim() < 2:
                    dense += g.numel()
                    continue
                n, m = g.shape[0], g.numel() // g.shape[0]
                r = min(n, m, st.matrix_approximation_rank)
                if (n + m) * r * st.min_compression_rate < n * m:
                    p_sz, q_sz = p_sz + n * r, q_sz + m * r
                else:
                    dense += g.numel()
            sent = sum(ring_bytes("all_reduce", x * elt, world) for x in (dense, p_sz, q_sz) if x)
        counter.bytes_sent += sent
        # torch's hook issues its second all-reduce (Q) from a callback; with several buckets
        # the ranks can then issue collectives in different orders, and gloo aborts ("Received
        # data size doesn't match expected size", seen here with torch 2.13). Waiting for each
        # bucket keeps one order on every rank, at the cost of overlapping buckets.
        fut = psgd.powerSGD_hook(st, bucket)
        fut.wait()
        return fut

    ddp.register_comm_hook(state, hook)
    counter.state = state
    return counter


@torch.no_grad()
def eval_loss(model: nn.Module, windows: torch.Tensor) -> float:
    """Mean next-byte cross-entropy over ``windows`` (nats)."""
    model.eval()
    total = 0.0
    for i in range(0, windows.shape[0], 8):
        w = windows[i:i + 8]
        total += float(model(input_ids=w, labels=w).loss) * w.shape[0]
    model.train()
    return total / windows.shape[0]


def train_rank(rank: int, world: int, cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """One rank's run (the process group is initialised by the caller)."""
    from ..training import get_method
    from .hooks import register_allreduce_counter, register_topk
    from .masks import verify_consistent
    from .outer import OuterLoop
    from .sparsifier import attach

    cfg = TrainLMConfig(**cfg_dict)
    kind, val = parse_comm(cfg.comm)
    train_ids, eval_ids = _corpus()
    model = build_model(cfg)
    if kind == "topk-adam":  # the hook hands back the ranks' mean Adam direction: SGD applies it
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=BETAS, weight_decay=0.0)
    sp = None
    if cfg.method != "none":
        kw: dict[str, Any] = {"sparsity": cfg.sparsity, "seed": cfg.seed, "total_steps": cfg.steps}
        if cfg.method in ("rigl", "set", "snfs"):
            kw["update_every"] = cfg.update_every
        sp = get_method(cfg.method, **kw)
        attach(sp, model, opt)
    start, tokens, checks, saved = 0, 0, 0, None
    if cfg.checkpoint_dir and cfg.resume:
        from .checkpoint import has_checkpoint, load_rank

        if has_checkpoint(cfg.checkpoint_dir):
            start, saved = load_rank(cfg.checkpoint_dir, rank, world, _settings(cfg))
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            if sp is not None:
                sp.load_state_dict(saved["sparsifier"])
            tokens, checks = int(saved["tokens"]), int(saved["mask_checks"])
    net: nn.Module = model
    state: Any = None
    outer = None
    if kind in ("ddp", "topk", "topk-adam", "powersgd"):
        # no buffer broadcast: the model's only buffers (rotary frequencies) are the same on
        # every rank by construction, and every byte exchanged is then one that is counted
        net = nn.parallel.DistributedDataParallel(model, **_no_buffer_sync())
        if kind == "ddp":
            state = register_allreduce_counter(net)
        elif kind == "topk":
            state = register_topk(net, val, sparsifier=sp)
        elif kind == "topk-adam":
            state = register_topk(net, val, sparsifier=sp, precondition="adam", betas=BETAS)
        else:
            state = _powersgd(net, int(val), cfg.powersgd_start)
    else:
        # None keeps OuterLoop's own defaults (its outer_lr takes None; its density does not)
        density = {} if cfg.outer_density is None else {"density": float(cfg.outer_density)}
        outer = OuterLoop(model, kind, int(val), masks=sp.masks if sp is not None else None,
                          outer_lr=cfg.outer_lr, **density)
    if saved is not None:
        if outer is not None:
            outer.load_state_dict(saved["comm"]["outer"])
        else:
            state.load_state_dict(saved["comm"], model)
    t0 = time.perf_counter()
    fault = os.environ.get(FAULT_ENV, "")
    for step in range(start, cfg.steps):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank * 10_007 + step)
        batch = _windows(train_ids, cfg.batch, cfg.seq_len, gen)
        loss = net(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += batch.numel()
        # with an outer loop the replicas differ between outer steps: the outer step runs first,
        # and masks change only right after it (update_every is a multiple of H), when every
        # rank holds the same weights; then the pseudo-gradient restarts from them
        synced = outer.step() if outer is not None else False
        if sp is not None and sp.step():
            verify_consistent(sp.masks)  # raises on every rank if any rank differs
            checks += 1
            if synced:
                outer.resync()
        done = step + 1
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            from .checkpoint import commit, save_rank

            save_rank(cfg.checkpoint_dir, done, rank, {
                "step": done, "tokens": tokens, "mask_checks": checks, "model": model.state_dict(),
                "opt": opt.state_dict(), "sparsifier": sp.state_dict() if sp is not None else None,
                "comm": {"outer": outer.state_dict()} if outer is not None else state.state_dict(model)})
            commit(cfg.checkpoint_dir, done, world, _settings(cfg))
        if fault == f"{rank}:{done}" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            os._exit(3)  # a planted crash (tests): the first attempt of this rank dies here
    seconds = time.perf_counter() - t0
    eval_w = _windows(eval_ids, cfg.eval_windows, cfg.seq_len, torch.Generator().manual_seed(12345))
    bytes_sent = int(outer.bytes_sent if outer is not None else getattr(state, "bytes_sent", 0))
    out = {"rank": rank, "final_eval_loss": eval_loss(model, eval_w), "bytes_sent": bytes_sent,
           "tokens": tokens, "seconds": seconds, "mask_checks": checks,
           "final_train_loss": float(loss.detach())}
    out["param_digest"] = param_digest(model)
    if sp is not None:
        verify_consistent(sp.masks)
        out["sparsity"] = sp.sparsity_actual()
        sp.masks.verify(model)
    return out


def param_digest(model: nn.Module) -> str:
    """BLAKE2b of every parameter's name and bytes: equal digests = bit-identical weights."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for n, p in model.named_parameters():
        h.update(n.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def summarize(cfg: TrainLMConfig, per_rank: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The run's JSON: the issue's fields plus the config and every rank's numbers."""
    r0 = per_rank[0]
    return {
        "final_eval_loss": r0["final_eval_loss"],
        "bytes_sent_per_rank": [r["bytes_sent"] for r in per_rank],
        "steps": cfg.steps,
        "tokens": sum(r["tokens"] for r in per_rank),
        "seconds": seconds,
        "train_seconds_per_rank": [r["seconds"] for r in per_rank],
        "masks_consistent": True if cfg.method != "none" else None,
        "mask_checks": r0["mask_checks"],
        "sparsity": r0.get("sparsity"),
        "eval_loss_per_rank": [r["final_eval_loss"] for r in per_rank],
        "param_digest_per_rank": [r["param_digest"] for r in per_rank],
        "config": asdict(cfg),
    }


def train_lm(cfg: TrainLMConfig) -> dict[str, Any]:
    """Run ``cfg`` on ``cfg.nproc`` local processes (gloo); returns :func:`summarize`'s dict.

    A rank whose masks differ raises on every rank (``masks_consistent`` is then never False in
    a returned result: the run fails with :class:`~sparsetorch.errors.DistributedError`).
    """
    from .launch import run_local

    check_config(cfg)
    t0 = time.perf_counter()
    per_rank = run_local(train_rank, int(cfg.nproc), (asdict(cfg),), timeout_s=float(cfg.timeout_s),
                         pg_timeout_s=60.0)
    return summarize(cfg, per_rank, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    """``torchrun --nproc-per-node N -m sparsetorch.distributed.train --comm ... --json PATH``."""
    ap = argparse.ArgumentParser(prog="python -m sparsetorch.distributed.train", description=__doc__.splitlines()[0])
    for f, default in asdict(TrainLMConfig()).items():
        if f in ("nproc", "timeout_s", "checkpoint_dir", "resume"):
            continue
        # the optional outer settings default to None (the method's own default): given, they are floats
        ap.add_argument("--" + f.replace("_", "-"), type=float if default is None else type(default), default=default)
    ap.add_argument("--checkpoint-dir", default=None)
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint, if any")
    ap.add_argument("--pg-init-dir", default=None,
                    help="rendezvous through file://DIR/pginit_<restart count> (a folder every rank sees): "
                         "restarts after a killed rank then never reuse a dead process's port")
    ap.add_argument("--json", default=None, help="rank 0 writes the run's JSON here")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    a = vars(ap.parse_args(argv))
    json_path, overwrite, pg_dir = a.pop("json"), a.pop("overwrite"), a.pop("pg_init_dir")
    if json_path:
        from ..atomic import check_output_file

        check_output_file(json_path, overwrite=overwrite)  # every rank fails before training
    if "RANK" not in os.environ:
        raise SystemExit("run under torchrun (it sets RANK and WORLD_SIZE), or use `sparsetorch train-lm --nproc N`.")
    from datetime import timedelta

    if pg_dir:
        os.makedirs(pg_dir, exist_ok=True)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        init = "file://" + os.path.join(os.path.abspath(pg_dir), f"pginit_{attempt}")
        dist.init_process_group("gloo", init_method=init, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=timedelta(seconds=120))
    else:
        dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = check_config(TrainLMConfig(nproc=world, **a))
    t0 = time.perf_counter()
    result = train_rank(rank, world, asdict(cfg))
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        summary = summarize(cfg, gathered, time.perf_counter() - t0)
        summary["restarts"] = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))  # torchrun's restarts
        text = json.dumps(summary, indent=2)
        if json_path:
            from ..atomic import atomic_write_text

            atomic_write_text(json_path, text + "\n", overwrite=overwrite)
        print(text)
    # free the DDP reducer and the hooks' futures (reference cycles) while the interpreter is
    # alive: gloo work destroyed during interpreter finalization aborts the process (SIGABRT)
    del result, gathered
    gc.collect()
    dist.barrier()  # no rank tears down its connections while another is still in a collective
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # pragma: no cover - run by torchrun
    raise SystemExit(main())
