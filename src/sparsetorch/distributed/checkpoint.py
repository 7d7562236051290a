"""Checkpoints of a distributed sparse run: one state file per rank plus a manifest, committed
only when every rank has written its file.

Layout of a checkpoint folder (the library creates and manages only these names)::

    DIR/step-00000040/rank-0.safetensors   # this rank's state (statefile: no pickle)
    DIR/step-00000040/rank-1.safetensors
    DIR/step-00000040/manifest.json        # world size, step, settings: written last
    DIR/latest                             # "step-00000040": moved only after the manifest

Per-rank files, not one replicated file: error-feedback residuals, top-k velocities and
DiLoCo's local replicas differ between ranks (ALGORITHMS-DISTRIBUTED §6). The protocol is
collective: every rank writes its file, a barrier, rank 0 writes the manifest and then moves
``latest`` (atomic rename), a barrier. A rank killed at any point leaves ``latest`` at the
previous complete checkpoint. Older step folders are removed once a newer one is committed
(the previous one is kept as well).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..atomic import atomic_write_text
from ..errors import CheckpointError, DistributedError
from ..statefile import load_state, save_state

__all__ = ["step_dir", "save_rank", "commit", "latest_step", "load_rank", "has_checkpoint", "check_resumable"]

_STEP = re.compile(r"^step-(\d{8})$")
LATEST = "latest"
MANIFEST = "manifest.json"


def step_dir(root: str | os.PathLike[str], step: int) -> Path:
    return Path(root) / f"step-{int(step):08d}"


def has_checkpoint(root: str | os.PathLike[str]) -> bool:
    """Whether ``root`` holds a committed checkpoint (its ``latest`` pointer)."""
    return (Path(root) / LATEST).is_file()


def save_rank(root: str | os.PathLike[str], step: int, rank: int, state: Any) -> Path:
    """Write this rank's ``state`` for ``step`` (atomic; not yet committed)."""
    d = step_dir(root, step)
    d.mkdir(parents=True, exist_ok=True)
    return save_state(state, d / f"rank-{rank}.safetensors")


def commit(root: str | os.PathLike[str], step: int, world: int, settings: dict[str, Any],
           group: Any = None) -> None:
    """Collective: after every rank's :func:`save_rank`, rank 0 writes the manifest and moves
    ``latest`` to ``step``; older step folders (but the previous one) are removed."""
    dist.barrier(group=group)
    if dist.get_rank(group) == 0:
        d = step_dir(root, step)
        missing = [r for r in range(world) if not (d / f"rank-{r}.safetensors").is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {d} lacks the files of rank(s) {missing}; not committed.")
        atomic_write_text(d / MANIFEST, json.dumps({"format": 1, "step": int(step), "world_size": int(world),
                                                    "settings": settings}, indent=2) + "\n")
        atomic_write_text(Path(root) / LATEST, d.name + "\n")
        steps = sorted(int(m.group(1)) for p in Path(root).iterdir() if (m := _STEP.match(p.name)))
        for old in steps[:-2]:
            if old < step:
                shutil.rmtree(step_dir(root, old), ignore_errors=True)
    dist.barrier(group=group)


def latest_step(root: str | os.PathLike[str]) -> int | None:
    """The step of the committed checkpoint in ``root`` (None when there is none)."""
    p = Path(root) / LATEST
    if not p.is_file():
        return None
    name = p.read_text(encoding="utf-8").strip()
    m = _STEP.match(name)
    if not m or not (Path(root) / name / MANIFEST).is_file():
        raise CheckpointError(f"{p} points at {name!r}, which is not a committed checkpoint of this folder.")
    return int(m.group(1))


def check_resumable(root: str | os.PathLike[str], world: int, settings: dict[str, Any]) -> int:
    """The committed step of ``root``, after checking that this run may resume it: the same
    world size and the same settings that decide the run's arithmetic. Raises otherwise."""
    step = latest_step(root)
    if step is None:
        raise CheckpointError(f"{root} holds no committed checkpoint (no {LATEST!r} file).")
    d = step_dir(root, step)
    try:
        man = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CheckpointError(f"{d / MANIFEST} is not valid JSON ({exc}); the checkpoint is corrupt.") from None
    if int(man.get("world_size", -1)) != int(world):
        raise DistributedError(f"checkpoint {d} was written by {man.get('world_size')} ranks; this run has {world}. "
                               "Resume with the same number of processes.")
    diff = {k: (man["settings"].get(k), v) for k, v in settings.items() if man["settings"].get(k) != v}
    if diff:
        raise DistributedError(f"checkpoint {d} was written with other settings: "
                               + ", ".join(f"{k} {a!r} there, {b!r} now" for k, (a, b) in diff.items())
                               + ". Resume with the settings it was written with.")
    return step


def load_rank(root: str | os.PathLike[str], rank: int, world: int, settings: dict[str, Any]) -> tuple[int, Any]:
    """``(step, state)`` of this rank from the committed checkpoint (see :func:`check_resumable`)."""
    step = check_resumable(root, world, settings)
    return step, load_state(step_dir(root, step) / f"rank-{rank}.safetensors")
