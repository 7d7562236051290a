"""Recovery fine-tuning of a pruned Hugging Face causal LM, with the dense model as teacher.

:func:`finetune` is :func:`~sparsetorch.finetune.loop.train_masked` plus what an LM needs:
token windows drawn in a seeded order, a teacher forward for the distillation losses
(:mod:`~sparsetorch.finetune.losses`), held-out perplexity, and checks that the teacher fits the
student (same vocabulary; for SquareHead the same depth and width) and that no training window
is an evaluation window.

Data rule (see README, "Data and evaluation protocol"): fine-tune on the calibration half of the
embedded corpus (:func:`embedded_windows`) and, for longer runs, on the Python documentation
sections of Debian's ``python3.11-doc`` (:func:`python_docs_text`); never on the evaluation half.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DataError
from ..masks import MaskSet
from .loop import FinetuneConfig, FinetuneError, FinetuneResult, train_masked
from .losses import LossSpec, causal_ce, kd_kl, parse_loss, squarehead

__all__ = ["DOCS_SECTIONS", "DOCS_ROOT", "WindowSampler", "embedded_windows", "finetune",
           "python_docs_text", "check_teacher", "check_options", "default_lr",
           "DEFAULT_LR", "DEFAULT_LORA_LR"]

#: where Debian's python3.11-doc puts the reStructuredText sources of the documentation
DOCS_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
#: sections used for fine-tuning text; ``reference/`` (the embedded evaluation corpus comes from
#: the language reference) and ``library/`` are left out on purpose
DOCS_SECTIONS = ("whatsnew", "howto", "c-api", "tutorial", "faq", "extending", "distributing",
                 "using", "install")


class WindowSampler:
    """Micro-batch ``i`` of an endless stream of seeded per-epoch permutations of ``n`` windows.

    Position ``k = i * batch + j`` of the stream is window ``perm_e[k % n]`` with epoch
    ``e = k // n`` and ``perm_e = randperm(n)`` from a generator seeded with ``(seed, e)``:
    every window is seen once per epoch, and batch ``i`` depends on ``i`` alone (a resumed run
    draws the same batches).
    """

    def __init__(self, n: int, batch: int, seed: int = 0) -> None:
        if n < 1:
            raise DataError("no training windows: pass at least one window of tokens")
        self.n, self.batch, self.seed = n, batch, seed
        self._perms: dict[int, Tensor] = {}

    def perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def __call__(self, i: int) -> Tensor:
        ks = range(i * self.batch, (i + 1) * self.batch)
        return torch.stack([self.perm(k // self.n)[k % self.n] for k in ks])


def embedded_windows(tokenizer: Any, seq_len: int = 512) -> Tensor:
    """Every ``seq_len`` window of the *calibration* half of the embedded corpus (never the
    evaluation half): 97 windows of 512 tokens for SmolLM2."""
    from ..data.text import pydoc_topics_split, token_windows

    return token_windows(tokenizer, pydoc_topics_split()[0], seq_len=seq_len)


def docs_files(root: str | os.PathLike[str] | None = None, sections: Sequence[str] = DOCS_SECTIONS) -> list[Path]:
    """The ``.txt`` sources of the given python3.11-doc sections, sorted by path; DataError when
    the package is missing, a section is not allowed by the data rule or not there, or no file is
    found. Cheap (no file is read): ``--data docs`` is checked with it before a model loads."""
    base = Path(root) if root is not None else DOCS_ROOT
    if not base.is_dir():
        raise DataError(f"Python documentation sources not found at {base}; install Debian's python3.11-doc "
                        "(`make data`, or apt-get install -y python3.11-doc) or pass root=")
    bad = [s for s in sections if s in ("reference", "library") or "/" in s or s.startswith(".")]
    if bad:
        raise DataError(f"section {bad[0]!r} may not be used for fine-tuning (reference/ holds the "
                        "evaluation text; library/ is left out by the data rule)")
    files: list[Path] = []
    for s in sections:
        d = base / s
        if not d.is_dir():
            raise DataError(f"documentation section {s!r} not found under {base}")
        files += sorted(p for p in d.rglob("*.txt") if p.is_file())
    if not files:
        raise DataError(f"no .txt sources under {base} for sections {list(sections)}")
    return sorted(files)


def python_docs_text(root: str | os.PathLike[str] | None = None,
                     sections: Sequence[str] = DOCS_SECTIONS) -> str:
    """The ``.txt`` sources of the given documentation sections (:func:`docs_files`), sorted by
    path, joined by a blank line. Install them with ``apt-get install python3.11-doc`` (``make
    data`` does)."""
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in docs_files(root, sections))


def _vocab(model: nn.Module) -> int | None:
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return int(emb.weight.shape[0]) if emb is not None else None


def check_teacher(student: nn.Module, teacher: nn.Module | None, spec: LossSpec) -> None:
    """Raise :class:`FinetuneError` when ``teacher`` cannot teach ``student`` under ``spec``."""
    if not spec.needs_teacher:
        return
    if teacher is None:
        raise FinetuneError(f"loss {spec} needs a teacher (the dense model); pass teacher= or use loss='ce'")
    if teacher is student:
        raise FinetuneError("the teacher is the student itself; pass the dense model (a separate copy)")
    mine = {id(p) for p in student.parameters()}
    if any(id(p) in mine for p in teacher.parameters()):
        raise FinetuneError("the teacher shares parameters with the student; pass a separate copy of the "
                            "dense model (copy.deepcopy it before pruning)")
    vs, vt = _vocab(student), _vocab(teacher)
    if vs is not None and vt is not None and vs != vt:
        raise FinetuneError(f"the teacher's vocabulary ({vt} tokens) differs from the student's ({vs}); "
                            "distillation needs the same tokenizer: use the model the student was pruned from")
    if spec.needs_hidden:
        cs, ct = getattr(student, "config", None), getattr(teacher, "config", None)
        for key in ("num_hidden_layers", "hidden_size"):
            a, b = getattr(cs, key, None), getattr(ct, key, None)
            if a is not None and b is not None and a != b:
                raise FinetuneError(f"squarehead compares hidden states layer by layer, but the teacher's "
                                    f"{key} is {b} and the student's {a}; use the model the student was pruned "
                                    "from, or loss='kd'")


def _check_windows(data: Any, what: str) -> Tensor:
    if not isinstance(data, Tensor) or data.dim() != 2 or data.dtype != torch.long:
        raise DataError(f"{what} must be a LongTensor of token windows [n, seq_len], got "
                        f"{type(data).__name__}{tuple(data.shape) if isinstance(data, Tensor) else ''}")
    if data.shape[0] < 1 or data.shape[1] < 2:
        raise DataError(f"{what} is empty: need at least one window of at least 2 tokens, got {tuple(data.shape)}")
    return data


def _no_eval_windows_in(train: Tensor, evalw: Tensor) -> None:
    if train.shape[1] != evalw.shape[1]:
        return
    seen = {bytes(r.numpy().tobytes()): i for i, r in enumerate(evalw)}
    for i, r in enumerate(train):
        j = seen.get(bytes(r.numpy().tobytes()))
        if j is not None:
            raise DataError(f"training window {i} is evaluation window {j}: never fine-tune on the evaluation "
                            "text (use embedded_windows() or python_docs_text())")


#: peak learning rates when none is given: full fine-tuning, and sparse LoRA (adapters start at
#: zero and need larger steps; benchmarks/sparse_lora.py: 1e-3 for 20 KD steps came within 1.3%
#: of full fine-tuning's E16)
DEFAULT_LR = 1e-4
DEFAULT_LORA_LR = 1e-3


def default_lr(lora: Any = None) -> float:
    """The default peak learning rate: :data:`DEFAULT_LORA_LR` with LoRA, else :data:`DEFAULT_LR`."""
    return DEFAULT_LORA_LR if lora else DEFAULT_LR


def check_options(
    *,
    loss: str | LossSpec | dict[str, float] = "kd",
    steps: int = 100,
    lr: float | None = None,
    lora: Any = None,
    batch_size: int = 4,
    grad_accum: int = 1,
    warmup_steps: int | None = None,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
    bf16: bool | str = "auto",
    eval_every: int | None = None,
    checkpoint_every: int | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    temperature: float = 1.0,
    update: Any = None,
    gradient_checkpointing: bool = False,
) -> tuple[LossSpec, Any, FinetuneConfig]:
    """Check every option of :func:`finetune` that needs no model or data, before anything loads.

    One function for the API, ``sparsetorch finetune`` and the ``finetune:`` stage of a run
    recipe, so the three refuse the same things with the same errors. Returns the parsed loss,
    the :class:`~sparsetorch.finetune.lora.LoraSettings` (or None) and the
    :class:`FinetuneConfig` (``lr`` resolved by :func:`default_lr`). ``update`` (a sparse-update
    spec) is parsed here too (:class:`~sparsetorch.finetune.sparse_update.UpdateError`); it
    becomes part of the config's trajectory, so a checkpoint resumes only with the same spec.
    ``update`` with ``gradient_checkpointing`` is refused here, not after the models load.
    """
    from .lora import LoraSettings
    from .sparse_update import SparseUpdate, UpdateError

    spec = parse_loss(loss)
    settings = LoraSettings.parse(lora)
    upd = SparseUpdate.parse(update) if update is not None else None
    if upd is not None and settings is not None:
        raise UpdateError("lora= and update= are two ways to choose what trains; pass one of them")
    if upd is not None and gradient_checkpointing:
        raise UpdateError("update= (--update) with gradient_checkpointing (--gradient-checkpointing) is not "
                          "supported: checkpointed frozen blocks would need inputs that require grad, which "
                          "builds the backward the update avoids; pass one of the two")
    config = FinetuneConfig(steps=steps, lr=default_lr(settings) if lr is None else lr, batch_size=batch_size,
                            grad_accum=grad_accum, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio,
                            weight_decay=weight_decay, max_grad_norm=max_grad_norm, seed=seed, bf16=bf16,
                            eval_every=eval_every, checkpoint_every=checkpoint_every,
                            adapter=settings.to_dict() if settings is not None
                            else upd.to_dict() if upd is not None else None)
    if checkpoint_every is not None and checkpoint_dir is None:
        raise FinetuneError("checkpoint_every needs checkpoint_dir= (where to write the checkpoints)")
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and temperature > 0):
        raise FinetuneError(f"temperature must be > 0, got {temperature!r}")
    return spec, settings, config


def finetune(
    model: nn.Module,
    masks: MaskSet | None,
    data: Tensor,
    teacher: nn.Module | None = None,
    loss: str | LossSpec | dict[str, float] = "kd",
    steps: int = 100,
    lr: float | None = None,
    *,
    batch_size: int = 4,
    grad_accum: int = 1,
    temperature: float = 1.0,
    squarehead_reduction: str = "mean",
    eval_windows: Tensor | None = None,
    eval_every: int | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    resume: str | os.PathLike[str] | None = None,
    warmup_steps: int | None = None,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    bf16: bool | str = "auto",
    gradient_checkpointing: bool = False,
    seed: int = 0,
    progress: bool = True,
    on_step: Any = None,
    lora: Any = None,
    update: Any = None,
) -> FinetuneResult:
    """Fine-tune a pruned causal LM in place without changing its masks; returns the run record.

    ``data`` is a LongTensor of training windows ``[n, seq_len]`` (e.g. :func:`embedded_windows`);
    ``loss`` is ``"ce"``, ``"kd"``, ``"squarehead"``, ``"kd+squarehead"`` or any weighted sum such as
    ``"0.5*ce+kd"`` (see :func:`~sparsetorch.finetune.losses.parse_loss`); distillation losses need
    ``teacher`` (the dense model, kept frozen). ``eval_windows`` (held-out text) gives the
    perplexity before training and every ``eval_every`` steps and at the end, in ``result.evals``.
    Checkpoints go to ``checkpoint_dir/last`` every ``checkpoint_every`` steps; ``resume=`` (that
    folder) continues bit-identically. The masks are verified (pattern included) at the end.
    ``on_step(steps_done, result, model)`` is called after every step; True stops the run.
    ``lr`` defaults to :func:`default_lr` (1e-4, or 1e-3 with ``lora``).
    ``bf16="auto"`` (default) trains under bf16 autocast where the hardware has bf16 arithmetic
    (measured on an avx512_bf16 CPU: 1.6x the tokens/s of fp32 and the same E16 after the same
    13 KD steps, 22.10 vs 22.11); ``False`` forces fp32.

    ``lora`` (a rank, a dict or a :class:`~sparsetorch.finetune.lora.LoraSettings`) trains sparse
    LoRA adapters instead of the weights (:func:`~sparsetorch.finetune.lora.add_sparse_lora`: the
    delta is masked in the forward, SQFT's SparsePEFT) and at the end merges them into ``model``
    in place (:func:`~sparsetorch.finetune.lora.merge_masked`): ``model`` is again a plain model
    with the same masks. Evaluations during the run see the adapted model; checkpoints hold the
    adapters too and resume bit-identically. If the run fails, the adapters are removed unmerged.

    ``update`` (a spec string such as ``"last:4"``, ``"bias,norm"`` or
    ``"channels:0.125@mlp.up_proj"``, or a :class:`~sparsetorch.finetune.sparse_update.SparseUpdate`)
    trains only that part of the model (sparse backpropagation, see
    :mod:`~sparsetorch.finetune.sparse_update`): everything else gets ``requires_grad=False``,
    channel subsets train as small slices that are written back at the end, so ``model`` is again
    a plain model with the same masks and every frozen parameter bit-identical. The spec is
    checked against the model before anything changes. ``masks=None`` is allowed with ``update``
    (nothing pruned). Not combinable with ``lora`` or ``gradient_checkpointing``.
    """
    spec, settings, config = check_options(
        loss=loss, steps=steps, lr=lr, lora=lora, batch_size=batch_size, grad_accum=grad_accum,
        warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, weight_decay=weight_decay,
        max_grad_norm=max_grad_norm, seed=seed, bf16=bf16, eval_every=eval_every,
        checkpoint_every=checkpoint_every, checkpoint_dir=checkpoint_dir, temperature=temperature,
        update=update, gradient_checkpointing=gradient_checkpointing)
    data = _check_windows(data, "data")
    if eval_windows is not None:
        eval_windows = _check_windows(eval_windows, "eval_windows")
        _no_eval_windows_in(data, eval_windows)
    check_teacher(model, teacher, spec)
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    w_ce, w_kd, w_sq = spec.weight("ce"), spec.weight("kd"), spec.weight("squarehead")
    hidden = spec.needs_hidden
    sampler = WindowSampler(data.shape[0], batch_size, seed)
    device = next(model.parameters()).device

    def batch_fn(i: int) -> Tensor:
        return data[sampler(i)].to(device)

    def loss_fn(m: nn.Module, ids: Tensor) -> tuple[Tensor, int]:
        out = m(input_ids=ids, output_hidden_states=hidden, use_cache=False)
        total = torch.zeros((), device=ids.device)
        if w_ce:
            total = total + w_ce * causal_ce(out.logits, ids)
        if teacher is not None and (w_kd or w_sq):
            with torch.no_grad():
                t = teacher(input_ids=ids, output_hidden_states=hidden, use_cache=False)
            if w_kd:
                total = total + w_kd * kd_kl(out.logits, t.logits, temperature)
            if w_sq:
                # outputs of every decoder block (HF: hidden_states[0] is the embedding output)
                total = total + w_sq * squarehead(out.hidden_states[1:], t.hidden_states[1:], squarehead_reduction)
        return total, ids.numel()

    eval_fn = None
    if eval_windows is not None:
        from ..evaluate import perplexity

        def eval_fn(m: nn.Module) -> float:
            return perplexity(m, windows=eval_windows, max_windows=None, progress=False)

    train_model, train_masks, peft_model, handle = model, masks, None, None
    if update is not None:
        from .sparse_update import SparseUpdate, apply_update, resolve

        # update= with gradient_checkpointing was refused by check_options, before anything loaded
        plan = resolve(model, SparseUpdate.parse(update))  # every check before the model changes
        handle = apply_update(model, plan, masks, seed=seed,
                              grad_fn=lambda m: loss_fn(m, batch_fn(0))[0])
        train_masks = None if (masks is None and resume is not None) else handle.masks(masks)
    if settings is not None:
        from .lora import add_sparse_lora, lora_masks_from_checkpoint, peft_masks

        if masks is None and resume is not None:
            masks = lora_masks_from_checkpoint(resume)
        if masks is None:
            raise FinetuneError("masks is None: LoRA needs the MaskSet of the pruned model (the delta is masked "
                                "by it), e.g. MaskSet.from_model(model) for a model whose zeros are its mask")
        if resume is not None:
            masks.apply(model)  # the checkpoint replaces every weight; only the wrapping must fit
        peft_model = add_sparse_lora(model, masks, r=settings.r, alpha=settings.alpha, dropout=settings.dropout,
                                     target_modules=settings.target_modules, seed=seed)
        train_model, train_masks = peft_model, peft_masks(peft_model, masks)

    cleanup = []
    ok = False
    try:
        if gradient_checkpointing:
            # transformers >= 5.x names it activation checkpointing; older releases gradient checkpointing
            on = next((getattr(model, n) for n in ("activation_checkpointing_enable",
                                                   "gradient_checkpointing_enable") if hasattr(model, n)), None)
            if on is None:
                raise FinetuneError("gradient_checkpointing needs a Hugging Face model (gradient_checkpointing_enable)")
            on()
            cleanup.append(next(getattr(model, n) for n in ("activation_checkpointing_disable",
                                                            "gradient_checkpointing_disable") if hasattr(model, n)))
            if peft_model is not None and hasattr(model, "enable_input_require_grads"):
                # frozen embeddings: checkpointed blocks need an input that requires grad, or the
                # adapters inside them receive no gradient
                model.enable_input_require_grads()
                cleanup.append(model.disable_input_require_grads)
        result = train_masked(train_model, train_masks, batch_fn, loss_fn, config, eval_fn=eval_fn,
                              checkpoint_dir=checkpoint_dir, resume=resume, progress=progress,
                              desc=f"finetune {spec}" + (f" lora r={settings.r}" if settings else ""),
                              on_step=on_step)
        ok = True
    finally:
        for off in reversed(cleanup):
            off()
        if peft_model is not None and not ok:
            from .lora import unload_unmerged

            unload_unmerged(peft_model)  # give the caller back the plain model, adapters dropped
        if handle is not None:
            handle.merge(restore=not ok)  # plain nn.Linear again; a failed run gets its columns back
    if handle is not None and masks is not None:
        masks.verify(model)
    if peft_model is not None:
        from .lora import merge_masked

        merge_masked(peft_model, masks)  # in place: ``model`` is plain again, masks verified
    return result
