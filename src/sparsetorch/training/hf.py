"""Hugging Face ``Trainer`` integration: a ``TrainerCallback`` that drives a Sparsifier.

    from sparsetorch.training import get_method
    from sparsetorch.training.hf import SparsifierCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[SparsifierCallback(get_method("rigl", sparsity=0.9))])

The Sparsifier is attached in ``on_train_begin`` (the Trainer's optimizer exists by then),
stepped in ``on_optimizer_step`` (right after ``optimizer.step()``, once per accumulated
step), and its state is written next to every checkpoint as ``sparsifier.pt``; on resume
(``trainer.train(resume_from_checkpoint=...)``) it is read back. If the Sparsifier was built
without ``total_steps`` it gets ``state.max_steps``. ``transformers`` is imported lazily.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import DependencyError
from .base import Sparsifier

STATE_FILE = "sparsifier.pt"


def _base_class() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DependencyError(
            "the Hugging Face callback needs transformers: pip install 'sparsetorch[llm]'"
        ) from exc
    return TrainerCallback


def SparsifierCallback(sparsifier: Sparsifier | Any, resume_from: str | None = None) -> Any:  # noqa: N802
    """Build a ``transformers.TrainerCallback`` driving ``sparsifier`` (a factory, so the import is lazy).

    ``sparsifier`` may also be a callable ``(total_steps) -> Sparsifier`` for methods whose
    schedule needs the run length at construction (RigL, GMP, ...).
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
            if sp.model is None:
                # accelerate wraps the optimizer; the hooks belong on the torch optimizer inside
                while optimizer is not None and not hasattr(optimizer, "_optimizer_step_post_hooks") and hasattr(optimizer, "optimizer"):
                    optimizer = optimizer.optimizer
                sp.attach(model, optimizer)
            ckpt = self.resume_from or getattr(args, "resume_from_checkpoint", None)
            if isinstance(ckpt, str) and os.path.isfile(os.path.join(ckpt, STATE_FILE)):
                sp.load_state_dict(torch.load(os.path.join(ckpt, STATE_FILE), weights_only=False))
            return control

        def on_optimizer_step(self, args, state, control, **kw):  # noqa: ANN001, ANN201
            if self.sparsifier is not None:
                self.sparsifier.step()
            return control

        def on_save(self, args, state, control, **kw):  # noqa: ANN001, ANN201
            if self.sparsifier is not None and self.sparsifier.model is not None:
                folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                os.makedirs(folder, exist_ok=True)
                torch.save(self.sparsifier.state_dict(), os.path.join(folder, STATE_FILE))
            return control

    return _Callback()
