"""Hugging Face ``Trainer`` integration: a ``TrainerCallback`` that drives a Sparsifier.

    from sparsetorch.training import get_method
    from sparsetorch.training.hf import SparsifierCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[SparsifierCallback(get_method("rigl", sparsity=0.9))])

The Sparsifier is attached in ``on_train_begin`` (the Trainer's optimizer exists by then),
stepped in ``on_optimizer_step`` (right after ``optimizer.step()``, once per accumulated
step), and its state is written next to every checkpoint as ``sparsifier.safetensors``
(tensors as safetensors, the rest as JSON, see :mod:`sparsetorch.statefile`; no pickle, so a
crafted checkpoint folder cannot run code on resume); on resume
(``trainer.train(resume_from_checkpoint=...)``) it is read back. Checkpoints of older versions
(``sparsifier.pt``) are still read, with ``torch.load(weights_only=True)`` (tensors and plain
containers only). If the Sparsifier was built without ``total_steps`` it gets
``state.max_steps``. ``transformers`` is imported lazily.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, DependencyError
from ..statefile import load_state, save_state
from .base import Sparsifier

STATE_FILE = "sparsifier.safetensors"
#: the pickle-based file of older versions, read with ``weights_only=True`` only
LEGACY_STATE_FILE = "sparsifier.pt"


def load_sparsifier_state(checkpoint_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The Sparsifier state saved in a Trainer checkpoint folder, or None if it holds none.

    Reads :data:`STATE_FILE`; falls back to the legacy :data:`LEGACY_STATE_FILE` through
    ``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
    Raises :class:`~sparsetorch.errors.CheckpointError` for a corrupt or unsafe file.
    """
    folder = Path(checkpoint_dir)
    if (folder / STATE_FILE).is_file():
        state = load_state(folder / STATE_FILE)
    elif (folder / LEGACY_STATE_FILE).is_file():
        try:
            state = torch.load(folder / LEGACY_STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - UnpicklingError, EOFError, RuntimeError ...
            raise CheckpointError(
                f"cannot read {folder / LEGACY_STATE_FILE}: {exc}. It is corrupt or holds objects "
                "other than tensors (refused: loading them would run code). Delete it to start the "
                "sparsifier afresh, or resume from a checkpoint written by this version."
            ) from exc
    else:
        return None
    if not isinstance(state, dict):
        raise CheckpointError(f"the sparsifier state in {folder} is not a dict; it is corrupt.")
    return state


def save_sparsifier_state(sparsifier: Sparsifier, checkpoint_dir: str | os.PathLike[str]) -> Path:
    """Write ``sparsifier.state_dict()`` into a checkpoint folder as :data:`STATE_FILE`."""
    folder = Path(checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return save_state(sparsifier.state_dict(), folder / STATE_FILE)


def _base_class() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DependencyError(
            "the Hugging Face callback needs transformers: pip install 'sparsetorch[llm]'"
        ) from exc
    return TrainerCallback


def SparsifierCallback(sparsifier: Sparsifier | Any, resume_from: str | None = None, data: Any = None) -> Any:  # noqa: N802
    """Build a ``transformers.TrainerCallback`` driving ``sparsifier`` (a factory, so the import is lazy).

    ``sparsifier`` may also be a callable ``(total_steps) -> Sparsifier`` for methods whose
    schedule needs the run length at construction (RigL, GMP, ...). ``data`` (an iterable of
    ``(inputs, labels)`` batches or ``{"x"/"input": ..., "labels"/"y": ...}`` dicts) is handed to
    ``attach`` for methods that read training data there (SNIP, GraSP, HyperSparse, allocation search).
    """
    base = _base_class()

    class _Callback(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            self.factory = None if isinstance(sparsifier, Sparsifier) else sparsifier
            self.sparsifier: Sparsifier | None = sparsifier if isinstance(sparsifier, Sparsifier) else None
            self.resume_from = resume_from

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):  # noqa: ANN001, ANN201
            if self.sparsifier is None:
                self.sparsifier = self.factory(int(state.max_steps))
            sp = self.sparsifier
            if sp.total_steps is None:
                sp.total_steps = int(state.max_steps)
            if self.resume_from is not None and not os.path.isdir(self.resume_from):
                raise CheckpointError(
                    f"resume_from={self.resume_from!r} is not a checkpoint folder; pass the "
                    "Trainer's checkpoint-N folder (it holds sparsifier.safetensors)."
                )
            ckpt = self.resume_from or getattr(args, "resume_from_checkpoint", None)
            step = int(getattr(state, "global_step", 0) or 0)
            if not isinstance(ckpt, (str, os.PathLike)) and step > 0:
                # trainer.train(resume_from_checkpoint=...) does not reach the callback; the
                # Trainer has restored state.global_step from that checkpoint by now
                ckpt = os.path.join(args.output_dir, f"checkpoint-{step}")
            resume = load_sparsifier_state(ckpt) if isinstance(ckpt, (str, os.PathLike)) and os.path.isdir(ckpt) else None
            if step > 0 and resume is None:
                warnings.warn(
                    f"resuming at step {step} without a saved sparsifier state ({STATE_FILE} in "
                    f"{ckpt}); the sparsifier starts from step 0. Pass "
                    "SparsifierCallback(..., resume_from=CHECKPOINT_DIR).",
                    stacklevel=2,
                )
            if sp.model is None:
                # accelerate wraps the optimizer; the hooks belong on the torch optimizer inside
                while optimizer is not None and not hasattr(optimizer, "_optimizer_step_post_hooks") and hasattr(optimizer, "optimizer"):
                    optimizer = optimizer.optimizer
                # attach() draws initial masks and zeros the weights outside them; on resume the
                # Trainer has already loaded the checkpoint's weights: keep them exactly
                # (by Parameter object: gate methods rename the weights they parametrize, and
                # their gates come back from the sparsifier state)
                kept = [(p, p.detach().clone()) for p in model.parameters()] if resume is not None else []
                sp.attach(model, optimizer, data=data)
                if resume is not None:
                    sp.load_state_dict(resume)
                    with torch.no_grad():
                        for p, value in kept:
                            p.copy_(value)
                    return control
            if resume is not None:
                sp.load_state_dict(resume)
            return control

        def on_optimizer_step(self, args, state, control, **kw):  # noqa: ANN001, ANN201
            if self.sparsifier is not None:
                self.sparsifier.step()
            return control

        def on_save(self, args, state, control, **kw):  # noqa: ANN001, ANN201
            if self.sparsifier is not None and self.sparsifier.model is not None:
                folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                save_sparsifier_state(self.sparsifier, folder)
            return control

    return _Callback()
