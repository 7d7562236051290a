"""Multi-stage recipes: one YAML file reproduces prune -> recover -> save.

A run recipe names a model, an output folder and an ordered list of stages::

    model: smollm2                 # or a local Hugging Face folder (one with masks.safetensors
                                   # may start with finetune/export: its masks are kept)
    out: runs/recover_2of4         # or `sparsetorch run RECIPE --out DIR`
    seq_len: 512                   # default window length of every stage and of evaluation
    eval_windows: 16               # held-out perplexity after each stage (0: none)
    stages:
      - prune:                     # the keys of the `prune:` recipe section
          method: sparsegpt
          pattern: "2:4"
          num_samples: 64
      - finetune:                  # the options of `sparsetorch finetune`
          teacher: dense           # the model as it was before the first prune stage
          loss: kd
          steps: 200
      - export:                    # a compressed checkpoint (`sparsetorch export`)
          dtype: float16
      - eval                       # a bare name runs a stage with its defaults

:func:`plan_recipe` checks everything -- section and key names (with close matches), stage
order, every value (through the same checkers the single commands use) and the outputs --
before any model is loaded. :func:`run_recipe` then runs the stages one after another on one
in-memory model; each stage is a small function in :data:`STAGES` that calls the public API
(:func:`sparsetorch.oneshot.recipe.apply_recipe`, :func:`sparsetorch.finetune.finetune`,
:func:`sparsetorch.export.save`, :func:`sparsetorch.evaluate.perplexity`) and returns the new
state and a summary. Outputs land in ``OUT/01-prune``, ``OUT/02-finetune``, ``OUT/03-export``
..., each written atomically with its ``sparsetorch.json``; ``OUT/recipe.yaml`` is the recipe
as given and ``OUT/run.json`` the summary of the whole run.

The YAML is read with two YAML 1.1 surprises removed: ``2:4`` stays the string ``"2:4"`` (not
the base-60 integer 124) and ``1e-4`` is the number 0.0001 (not a string).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import (
    CheckpointError,
    DataError,
    MethodError,
    ModelError,
    SparseTorchError,
    close_matches,
)
from .recipes import read_yaml

__all__ = [
    "STAGES",
    "TOP_KEYS",
    "PlanContext",
    "RunPlan",
    "RunResult",
    "RunState",
    "Stage",
    "StageEnv",
    "StageKind",
    "plan_recipe",
    "read_run_recipe",
    "register_stage",
    "run_recipe",
]

#: top-level keys of a run recipe
TOP_KEYS = ("model", "out", "stages", "seq_len", "eval_windows", "batch_size")
RUN_FILE = "run.json"
RECIPE_FILE = "recipe.yaml"
SUMMARY_FILE = "sparsetorch.json"


# --------------------------------------------------------------------------- YAML
def read_run_recipe(source: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """``(mapping, yaml_text)`` of a run recipe given as a YAML file path, a YAML string or a dict.

    Raises :class:`MethodError` for a missing file, invalid YAML or a document that is not a
    mapping. ``yaml_text`` is None for a dict. YAML is read by :func:`~sparsetorch.recipes.read_yaml`
    (``2:4`` stays a string, ``1e-4`` is a number).
    """
    return read_yaml(source, "a run recipe must be a YAML mapping with 'model:', 'out:' and 'stages:' "
                             "(see examples/recover_2of4.yaml).")


# --------------------------------------------------------------------------- small checkers
def _int(value: Any, name: str, low: int, error: type[SparseTorchError] = DataError) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise error(f"{name} must be an integer >= {low}, got {value!r}.")
    return value


def _float(value: Any, name: str) -> Any:
    """A number written as a string (``"1e-4"``) becomes a float; anything else is returned for
    the real checker to judge."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check_keys(where: str, data: Mapping[str, Any], keys: tuple[str, ...]) -> None:
    for k in data:
        if k not in keys:
            raise MethodError(f"unknown key {k!r} in {where}; accepted: {', '.join(keys)}."
                              + close_matches(str(k), keys))


def _model_source(model: Any, what: str = "model") -> Path | None:
    """The folder of a model spec (None for the built-in alias); ModelError if it names nothing."""
    from .data.llm import MODEL_ALIASES

    if not isinstance(model, str) or not model.strip():
        raise ModelError(f"{what} must be 'smollm2' or the path of a Hugging Face folder, got {model!r}.")
    if model.lower() in MODEL_ALIASES:
        return None
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if not (path / "config.json").is_file():
        raise ModelError(f"{what} {model!r} is neither a built-in name ({', '.join(MODEL_ALIASES)}) nor a "
                         "Hugging Face folder with config.json; fix the path in the recipe.")
    return path


def _check_positions(model: str, seq_len: int, where: str) -> None:
    from .data.llm import model_max_positions

    limit = model_max_positions(model)
    if limit is not None and seq_len > limit:
        raise ModelError(f"{where}: seq_len {seq_len} is longer than {model!r} accepts ({limit} positions, "
                         f"config.max_position_embeddings); use seq_len <= {limit}.")


# --------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class PlanContext:
    """What the checker of a stage knows: the recipe's model and what earlier stages produce."""

    model: str
    seq_len: int
    eval_windows: int
    #: masks exist before this stage (the model folder has masks.safetensors, or a prune ran)
    has_masks: bool
    #: a prune stage runs before this one (so the 'dense' teacher exists)
    pruned: bool
    where: str


@dataclass
class Stage:
    """One validated stage of a plan: its position, kind, settings and output folder."""

    index: int
    name: str
    settings: Any
    folder: Path

    def settings_dict(self) -> dict[str, Any]:
        s = self.settings
        d = dataclasses.asdict(s) if dataclasses.is_dataclass(s) else dict(s)
        d.pop("reads", None)
        return json.loads(json.dumps(d, default=str))


@dataclass
class RunPlan:
    """A checked run recipe; nothing has been loaded or written yet."""

    model: str
    out: Path
    overwrite: bool
    seq_len: int
    eval_windows: int
    batch_size: int
    stages: list[Stage]
    #: folders and files the run reads (never inside, equal to or containing ``out``)
    inputs: list[Path]
    #: the recipe as written (copied to OUT/recipe.yaml), None for a dict
    text: str | None = None
    #: index of the last stage that uses the 'dense' teacher (0: none)
    dense_until: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "out": str(self.out), "seq_len": self.seq_len,
                "eval_windows": self.eval_windows, "batch_size": self.batch_size,
                "stages": [{s.name: s.settings_dict()} for s in self.stages]}


@dataclass
class RunState:
    """What flows from stage to stage: the model, its tokenizer and masks, and the dense copy."""

    model: Any
    tokenizer: Any
    masks: Any = None
    #: a copy of the model made before the first prune stage (teacher 'dense'), else None
    dense: Any = None
    #: the held-out windows perplexity is measured on (None: no evaluation)
    eval_windows: Any = None
    #: perplexity of ``model`` as it is now, if measured
    ppl: float | None = None


@dataclass
class StageEnv:
    """What a stage function needs besides the state and its settings."""

    plan: RunPlan
    stage: Stage
    progress: bool = True

    def perplexity(self, model: Any, windows: Any) -> float | None:
        """Perplexity of ``model`` on ``windows`` (None when there are none: evaluation is off)."""
        from .evaluate import perplexity

        if windows is None:
            return None
        return perplexity(model, windows=windows, max_windows=None, batch_size=self.plan.batch_size,
                          progress=self.progress)

    def save_model_folder(self, state: RunState, summary: dict[str, Any]) -> Path:
        """Write the stage's HF folder with masks.safetensors and sparsetorch.json, atomically."""
        from .analysis.report import MASKS_FILE
        from .data.llm import save_hf_model

        def extra(tmp: Path) -> None:
            if state.masks is not None:
                state.masks.save(tmp / MASKS_FILE)
            (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")

        return save_hf_model(state.model, state.tokenizer, self.stage.folder, extra=extra, overwrite=False,
                             inputs=self.plan.inputs)


StageFn = Callable[[RunState, Any, StageEnv], tuple[RunState, dict[str, Any]]]


@dataclass(frozen=True)
class StageKind:
    """A registered stage: its keys, a model-free checker, the function that runs it, and a
    one-line description of its summary for the CLI."""

    name: str
    keys: tuple[str, ...]
    check: Callable[[dict[str, Any], PlanContext], Any]
    run: StageFn
    line: Callable[[dict[str, Any]], str]
    needs_masks: bool = False
    makes_masks: bool = False
    doc: str = ""


STAGES: dict[str, StageKind] = {}


def register_stage(kind: StageKind) -> StageKind:
    """Add a stage kind to :data:`STAGES` (a new stage is one function plus this call)."""
    STAGES[kind.name] = kind
    return kind


def _stage_items(stages: Any) -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(stages, list) or not stages:
        raise MethodError("'stages:' must be a non-empty list, e.g. [prune, finetune, export] or items like "
                          "'- prune: {method: sparsegpt}'.")
    items = []
    for i, item in enumerate(stages, 1):
        if isinstance(item, str):
            name, settings = item, {}
        elif isinstance(item, Mapping) and len(item) == 1:
            name, settings = next(iter(item.items()))
            settings = {} if settings is None else settings
        else:
            raise MethodError(f"stage {i} must be a stage name or a one-key mapping such as '- prune: "
                              f"{{method: sparsegpt}}', got {item!r}.")
        if not isinstance(name, str) or name not in STAGES:
            raise MethodError(f"unknown stage {name!r} (stage {i}); available: {', '.join(STAGES)}."
                              + close_matches(str(name), STAGES))
        if not isinstance(settings, Mapping):
            raise MethodError(f"stage {i} ({name}): settings must be a mapping of keys, got {settings!r}.")
        items.append((name, dict(settings)))
    return items


def _in_stage(exc: SparseTorchError, where: str) -> SparseTorchError:
    """The same error type with the stage named in front of its message."""
    msg = str(exc)
    if msg.startswith(where):
        return exc
    try:
        return type(exc)(f"{where}: {msg}")
    except TypeError:  # pragma: no cover - an error class with a different constructor
        return exc


def plan_recipe(
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> RunPlan:
    """Check a run recipe completely without loading a model; return the :class:`RunPlan`.

    ``out`` (``--out``) overrides the recipe's ``out:``. Raises the typed error of the first
    problem: :class:`MethodError` (unknown stage or key, with close matches; a stage order that
    cannot work), the checkers' own errors for bad values (``SparsityValueError``,
    ``PatternError``, ``FinetuneError``, ``LossError``, ``DataError`` ...), :class:`ModelError`
    (a model or teacher that names nothing) and :class:`OutputExistsError` (``out`` holds files
    and ``overwrite`` is False, or it would contain an input).
    """
    from .analysis.report import MASKS_FILE
    from .atomic import check_output_dir

    data, text = read_run_recipe(source)
    _check_keys("the run recipe", data, TOP_KEYS)
    model = data.get("model", "smollm2")
    model_dir = _model_source(model)
    seq_len = _int(data.get("seq_len", 512), "seq_len", 2)
    eval_windows = _int(data.get("eval_windows", 16), "eval_windows", 0)
    batch_size = _int(data.get("batch_size", 4), "batch_size", 1)
    _check_positions(model, seq_len, "the run recipe")
    target = out if out is not None else data.get("out")
    if target is None or (isinstance(target, str) and not target.strip()):
        raise MethodError("the run recipe names no output folder: add 'out: DIR' or pass --out DIR.")
    if not isinstance(target, (str, os.PathLike)):
        raise MethodError(f"'out:' must be a folder path, got {target!r}.")
    out_dir = Path(target).expanduser().absolute()

    has_masks = model_dir is not None and model_dir.is_dir() and (model_dir / MASKS_FILE).is_file()
    pruned = False
    inputs: list[Path] = [model_dir] if model_dir is not None else []
    stages: list[Stage] = []
    dense_until = 0
    for i, (name, settings) in enumerate(_stage_items(data.get("stages")), 1):
        kind = STAGES[name]
        where = f"stage {i} ({name})"
        if kind.needs_masks and not has_masks:
            raise MethodError(
                f"{where} needs masks, but none exist yet: put a prune stage before it, or set 'model:' to a "
                f"pruned folder (one with {MASKS_FILE}, e.g. from `sparsetorch prune --out`).")
        _check_keys(where, settings, kind.keys)
        ctx = PlanContext(model=model, seq_len=seq_len, eval_windows=eval_windows, has_masks=has_masks,
                          pruned=pruned, where=where)
        try:
            checked = kind.check(settings, ctx)
        except SparseTorchError as exc:
            raise _in_stage(exc, where) from None
        for p in getattr(checked, "reads", ()):
            inputs.append(Path(p).expanduser())
        if getattr(checked, "teacher", None) == "dense":
            dense_until = i
        stages.append(Stage(i, name, checked, out_dir / f"{i:02d}-{name}"))
        has_masks = has_masks or kind.makes_masks
        pruned = pruned or kind.makes_masks
    check_output_dir(out_dir, inputs=inputs, overwrite=overwrite)
    return RunPlan(model=model, out=out_dir, overwrite=overwrite, seq_len=seq_len, eval_windows=eval_windows,
                   batch_size=batch_size, stages=stages, inputs=inputs, text=text, dense_until=dense_until)


# --------------------------------------------------------------------------- prune
PRUNE_KEYS = ("method", "sparsity", "pattern", "allocation", "targets", "ignore", "num_samples", "seq_len",
              "seed", "options")


def _check_prune(settings: dict[str, Any], ctx: PlanContext) -> Any:
    """The ``prune:`` recipe section (:func:`~sparsetorch.oneshot.recipe.build_oneshot_section`);
    ``seq_len`` defaults to the recipe's, and an N:M pattern implies its sparsity."""
    from .oneshot.recipe import build_oneshot_section
    from .patterns import parse_pattern

    s = dict(settings)
    s.setdefault("seq_len", ctx.seq_len)
    if "sparsity" not in s and parse_pattern(s.get("pattern", "unstructured")).fixed_sparsity is not None:
        s["sparsity"] = None
    if "sparsity" in s:
        s["sparsity"] = _float(s["sparsity"], "sparsity")
    recipe = build_oneshot_section(s)
    _check_positions(ctx.model, recipe.seq_len, ctx.where)
    return recipe


def _run_prune(state: RunState, r: Any, env: StageEnv) -> tuple[RunState, dict[str, Any]]:
    """One-shot pruning through :func:`~sparsetorch.oneshot.recipe.apply_recipe` (the API of
    ``sparsetorch prune``); calibration windows come from the embedded calibration half."""
    from .data.text import calibration_windows
    from .oneshot.recipe import apply_recipe
    from .prune import check_request

    ppl_before = state.ppl if state.ppl is not None else env.perplexity(state.model, state.eval_windows)
    req = check_request(r.method, r.sparsity, r.pattern, allocation=r.allocation, options=dict(r.options),
                        num_samples=r.num_samples, seq_len=r.seq_len)
    calib = None if req.data_free else calibration_windows(state.tokenizer, r.num_samples, r.seq_len)
    report = apply_recipe(state.model, r, calibration=calib, tokenizer=state.tokenizer)
    ppl_after = env.perplexity(state.model, state.eval_windows)
    new = dataclasses.replace(state, masks=report.masks, ppl=ppl_after)
    summary = {
        "stage": "prune", "index": env.stage.index, "method": report.method, "pattern": report.pattern,
        "allocation": report.allocation, "sparsity_target": report.sparsity_target,
        "sparsity_actual": report.sparsity_actual, "ppl_before": ppl_before, "ppl_after": ppl_after,
        "seconds_prune": report.seconds_prune, "calib_samples": 0 if calib is None else int(calib.shape[0]),
        "seq_len": r.seq_len, "layers_pruned": len(report.masks), "settings": env.stage.settings_dict(),
        "report": report.to_dict(),
    }
    return new, summary


def _line_prune(s: dict[str, Any]) -> str:
    return (f"{s['method']} {s['pattern']} {s['allocation']}, sparsity {s['sparsity_actual']:.4f}, "
            f"ppl {_ppl(s['ppl_before'])} -> {_ppl(s['ppl_after'])}")


# --------------------------------------------------------------------------- finetune
@dataclass
class FinetuneSettings:
    """The options of ``sparsetorch finetune`` as a stage (``batch`` = windows per micro-batch)."""

    teacher: str | None = None
    loss: str = "kd"
    steps: int = 100
    #: default 1e-4, or 1e-3 with ``lora`` (:func:`sparsetorch.finetune.lm.default_lr`)
    lr: float | None = None
    batch: int = 4
    grad_accum: int = 1
    seq_len: int = 512
    data: str = "embedded"
    temperature: float = 1.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    resume: str | None = None
    bf16: bool | str = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0
    #: sparse LoRA instead of full fine-tuning: a rank, or {r, alpha, dropout, target_modules}
    #: (``finetune(lora=...)``; the merged model keeps the masks)
    lora: int | dict[str, Any] | None = None
    #: folders this stage reads (teacher, resume), kept out of the output
    reads: list[str] = field(default_factory=list)


FINETUNE_KEYS = tuple(f.name for f in dataclasses.fields(FinetuneSettings) if f.name != "reads")


def _check_finetune(settings: dict[str, Any], ctx: PlanContext) -> FinetuneSettings:
    """Checked with the code ``sparsetorch finetune`` uses: :func:`check_options` (loss, LoRA,
    optimisation), ``check_data``; the teacher must exist before it is needed."""
    from .finetune.cli import check_data
    from .finetune.lm import check_options
    from .finetune.loop import FinetuneError

    s = FinetuneSettings(**{"seq_len": ctx.seq_len, **settings})
    for name in ("lr", "temperature", "weight_decay", "max_grad_norm"):
        setattr(s, name, _float(getattr(s, name), name))
    s.max_grad_norm = s.max_grad_norm or None  # 0 turns clipping off, as --max-grad-norm 0 does
    spec, _, config = check_options(
        loss=s.loss, steps=s.steps, lr=s.lr, lora=s.lora, batch_size=s.batch, grad_accum=s.grad_accum,
        weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm, seed=s.seed, bf16=s.bf16,
        eval_every=s.eval_every, checkpoint_every=s.checkpoint_every, checkpoint_dir=s.checkpoint_dir,
        temperature=s.temperature)
    s.loss, s.lr = str(spec), config.lr
    _int(s.seq_len, "seq_len", 2)
    if not isinstance(s.data, str):
        raise DataError(f"data must be 'embedded', 'docs' or a text file path, got {s.data!r}.")
    data_file = check_data(s.data)
    if data_file is not None:
        s.reads.append(str(data_file))
    if not isinstance(s.gradient_checkpointing, bool):
        raise FinetuneError(f"gradient_checkpointing must be true or false, got {s.gradient_checkpointing!r}")
    _check_positions(ctx.model, s.seq_len, ctx.where)
    if spec.needs_teacher:
        if s.teacher is None:
            if not ctx.pruned:
                raise FinetuneError(f"loss {spec} needs a teacher: set 'teacher:' to 'smollm2' or the dense model's "
                                    "folder ('dense' only works after a prune stage), or use loss: ce")
            s.teacher = "dense"
        if s.teacher == "dense":
            if not ctx.pruned:
                raise FinetuneError("teacher 'dense' is the model as it was before pruning, but no prune stage "
                                    "runs before this one: name the dense model ('smollm2' or its folder)")
        else:
            folder = _model_source(s.teacher, "teacher")
            if folder is not None:
                s.reads.append(str(folder))
            _check_positions(s.teacher, s.seq_len, ctx.where)
    elif s.teacher is not None:
        raise FinetuneError(f"loss {spec} uses no teacher, but teacher {s.teacher!r} is set: drop 'teacher:' or "
                            "use a distillation loss (kd, squarehead)")
    for name in ("checkpoint_dir", "resume"):
        v = getattr(s, name)
        if v is not None and not isinstance(v, str):
            raise FinetuneError(f"{name} must be a folder path, got {v!r}")
    if s.resume is not None:
        if not Path(s.resume).expanduser().is_dir():
            raise FinetuneError(f"resume folder {s.resume} does not exist; pass the checkpoint_dir of an earlier run")
        s.reads.append(s.resume)
    return s


def _run_finetune(state: RunState, s: FinetuneSettings, env: StageEnv) -> tuple[RunState, dict[str, Any]]:
    """Mask-preserving fine-tuning through :func:`sparsetorch.finetune.finetune`; training windows
    from ``data`` as ``sparsetorch finetune --data`` reads them."""
    from .data.llm import load_causal_lm
    from .finetune import finetune
    from .finetune.cli import load_text_windows

    teacher = None
    if s.teacher == "dense":
        teacher = state.dense
    elif s.teacher is not None:
        teacher, _ = load_causal_lm(s.teacher, progress=env.progress)
    train = load_text_windows(state.tokenizer, s.data, s.seq_len)
    sparsity_before = state.masks.sparsity().overall
    t0 = time.perf_counter()
    res = finetune(state.model, state.masks, train, teacher=teacher, loss=s.loss, steps=s.steps, lr=s.lr,
                   batch_size=s.batch, grad_accum=s.grad_accum, temperature=s.temperature,
                   eval_windows=state.eval_windows, eval_every=s.eval_every, checkpoint_dir=s.checkpoint_dir,
                   checkpoint_every=s.checkpoint_every, resume=s.resume, weight_decay=s.weight_decay,
                   max_grad_norm=s.max_grad_norm, bf16=s.bf16, gradient_checkpointing=s.gradient_checkpointing,
                   seed=s.seed, progress=env.progress, lora=s.lora)
    seconds = time.perf_counter() - t0
    ppl_before = res.evals[0][1] if res.evals and res.evals[0][0] == 0 else state.ppl
    ppl_after = res.evals[-1][1] if res.evals else None
    summary = {
        "stage": "finetune", "index": env.stage.index, "teacher": s.teacher, "objective": s.loss,
        "steps": res.steps, "tokens": res.tokens, "train_windows": int(train.shape[0]),
        "ppl_before": ppl_before, "ppl_after": ppl_after, "sparsity_before": sparsity_before,
        "sparsity_after": state.masks.sparsity().overall, "loss_first": res.losses[0] if res.losses else None,
        "loss": res.final_loss, "seconds_train": seconds, "bf16": res.bf16, "evals": res.evals,
        "losses": res.losses, "settings": env.stage.settings_dict(), "trainable_params": res.trainable_params,
    }
    return dataclasses.replace(state, ppl=ppl_after), summary


def _line_finetune(s: dict[str, Any]) -> str:
    lora = s["settings"].get("lora")
    how = f" sparse LoRA {lora if isinstance(lora, dict) else {'r': lora}}," if lora is not None else ""
    return (f"{s['objective']},{how} {s['steps']} steps, ppl {_ppl(s['ppl_before'])} -> {_ppl(s['ppl_after'])}, "
            f"masks kept (sparsity {s['sparsity_after']:.4f})")


# --------------------------------------------------------------------------- export
EXPORT_DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class ExportSettings:
    """``sparsetorch export`` as a stage: ``format`` per sparse tensor, ``dtype`` of the stored
    values (auto: the model's), ``verify``: read the file back and compare every tensor and mask."""

    format: str = "auto"
    dtype: str = "auto"
    verify: bool = True


def _check_export(settings: dict[str, Any], ctx: PlanContext) -> ExportSettings:
    from .export.formats import Format

    s = ExportSettings(**settings)
    names = ("auto", *(f.value for f in Format))
    if s.format not in names:
        raise CheckpointError(f"format must be one of {', '.join(names)}, got {s.format!r}.")
    if s.dtype not in EXPORT_DTYPES:
        raise CheckpointError(f"dtype must be one of {', '.join(EXPORT_DTYPES)}, got {s.dtype!r}.")
    if not isinstance(s.verify, bool):
        raise CheckpointError(f"verify must be true or false, got {s.verify!r}.")
    return s


def _run_export(state: RunState, s: ExportSettings, env: StageEnv) -> tuple[RunState, dict[str, Any]]:
    """A compressed checkpoint through :func:`sparsetorch.export.save`, written with the config and
    tokenizer (the folder form of ``sparsetorch export --out``); optionally read back and compared."""
    import torch

    from .atomic import atomic_dir
    from .export.checkpoint import DEFAULT_FILENAME, checkpoint_summary, load_state_dict, save

    model = state.model
    if s.dtype != "auto" and next(model.parameters()).dtype != getattr(torch, s.dtype):
        model = copy.deepcopy(model).to(getattr(torch, s.dtype))  # the run's model keeps its dtype
    summary: dict[str, Any] = {"stage": "export", "index": env.stage.index, "format": s.format,
                               "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                               "file": DEFAULT_FILENAME, "settings": env.stage.settings_dict()}
    with atomic_dir(env.stage.folder, overwrite=False, inputs=env.plan.inputs) as tmp:
        t0 = time.perf_counter()
        save(model, tmp / DEFAULT_FILENAME, format=s.format, masks=state.masks)
        model.config.save_pretrained(str(tmp))
        if state.tokenizer is not None:
            state.tokenizer.save_pretrained(str(tmp))
        summary["seconds_save"] = time.perf_counter() - t0
        rows = checkpoint_summary(tmp / DEFAULT_FILENAME)
        summary["dense_bytes"] = sum(r.dense_bytes for r in rows)
        summary["stored_bytes"] = sum(r.stored_bytes for r in rows)
        summary["file_bytes"] = (tmp / DEFAULT_FILENAME).stat().st_size
        summary["formats"] = sorted({r.format for r in rows})
        summary["verified"] = False
        if s.verify:
            t0 = time.perf_counter()
            _verify_export(model, state.masks, tmp / DEFAULT_FILENAME, load_state_dict)
            summary["verified"] = True
            summary["seconds_verify"] = time.perf_counter() - t0
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    return state, summary


def _verify_export(model: Any, masks: Any, path: Path, load_state_dict: Callable[..., Any]) -> None:
    """CheckpointError unless the file holds every tensor of ``model`` bit for bit and ``masks``."""
    import torch

    tensors, loaded = load_state_dict(path)
    for name, t in model.state_dict().items():
        if name not in tensors or not torch.equal(tensors[name], t):
            raise CheckpointError(f"{path}: {name} does not read back as written; the export is not trustworthy.")
    for name, m in masks.masks.items():
        if name not in loaded.masks or not torch.equal(loaded.masks[name].cpu(), m.cpu()):
            raise CheckpointError(f"{path}: the mask of {name} does not read back as written.")
    loaded.verify(tensors)


def _line_export(s: dict[str, Any]) -> str:
    mib = 2**20
    check = ", read back and verified" if s["verified"] else ""
    return (f"{s['dtype']} {'/'.join(s['formats'])}: {s['dense_bytes'] / mib:.1f} MiB of tensors -> file "
            f"{s['file_bytes'] / mib:.1f} MiB ({s['file_bytes'] / max(s['dense_bytes'], 1):.3f}x){check}")


# --------------------------------------------------------------------------- eval
@dataclass
class EvalSettings:
    """Perplexity on the first ``windows`` windows of ``seq_len`` tokens of the evaluation half."""

    windows: int = 16
    seq_len: int = 512
    batch_size: int = 4


def _check_eval(settings: dict[str, Any], ctx: PlanContext) -> EvalSettings:
    s = EvalSettings(**{"windows": ctx.eval_windows or 16, "seq_len": ctx.seq_len, **settings})
    _int(s.windows, "windows", 1)
    _int(s.seq_len, "seq_len", 2)
    _int(s.batch_size, "batch_size", 1)
    _check_positions(ctx.model, s.seq_len, ctx.where)
    return s


def _run_eval(state: RunState, s: EvalSettings, env: StageEnv) -> tuple[RunState, dict[str, Any]]:
    from .atomic import atomic_dir
    from .data.text import eval_windows
    from .evaluate import perplexity

    w = eval_windows(state.tokenizer, s.windows, s.seq_len)
    t0 = time.perf_counter()
    ppl = perplexity(state.model, windows=w, max_windows=None, batch_size=s.batch_size, progress=env.progress)
    # what was measured: the run's model as it is in memory (an export stage writes a converted
    # copy and leaves the model as it was, so an eval after it measures the model, not the file)
    summary = {"stage": "eval", "index": env.stage.index, "ppl": ppl, "windows": int(w.shape[0]),
               "seq_len": s.seq_len, "seconds_eval": time.perf_counter() - t0,
               "model": "in memory", "dtype": str(next(state.model.parameters()).dtype).removeprefix("torch."),
               "sparsity": None if state.masks is None else state.masks.sparsity().overall,
               "settings": env.stage.settings_dict()}
    with atomic_dir(env.stage.folder, overwrite=False, inputs=env.plan.inputs) as tmp:
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    same = (s.seq_len == env.plan.seq_len and state.eval_windows is not None
            and int(w.shape[0]) == int(state.eval_windows.shape[0]))
    return (dataclasses.replace(state, ppl=ppl) if same else state), summary


def _line_eval(s: dict[str, Any]) -> str:
    sp = "" if s["sparsity"] is None else f", sparsity {s['sparsity']:.4f}"
    return f"ppl {_ppl(s['ppl'])} on {s['windows']}x{s['seq_len']} tokens{sp}"


def _ppl(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.3f}"


def _with_save(fn: StageFn) -> StageFn:
    """A model-producing stage: run ``fn``, then write the HF folder + masks + summary."""

    def run(state: RunState, settings: Any, env: StageEnv) -> tuple[RunState, dict[str, Any]]:
        new, summary = fn(state, settings, env)
        t0 = time.perf_counter()
        env.save_model_folder(new, summary)
        summary["seconds_save"] = time.perf_counter() - t0
        return new, summary

    run.__doc__ = fn.__doc__
    return run


register_stage(StageKind("prune", PRUNE_KEYS, _check_prune, _with_save(_run_prune), _line_prune,
                         makes_masks=True, doc="one-shot pruning (the prune: recipe section)"))
register_stage(StageKind("finetune", FINETUNE_KEYS, _check_finetune, _with_save(_run_finetune), _line_finetune,
                         needs_masks=True, doc="mask-preserving recovery fine-tuning"))
register_stage(StageKind("export", tuple(f.name for f in dataclasses.fields(ExportSettings)), _check_export,
                         _run_export, _line_export, needs_masks=True, doc="compressed sparse checkpoint"))
register_stage(StageKind("eval", tuple(f.name for f in dataclasses.fields(EvalSettings)), _check_eval, _run_eval,
                         _line_eval, doc="held-out perplexity"))


# --------------------------------------------------------------------------- run
@dataclass
class RunResult:
    """What :func:`run_recipe` did: the plan, the final state (model, masks ...) and the summary."""

    plan: RunPlan
    state: RunState
    summary: dict[str, Any]

    @property
    def stages(self) -> list[dict[str, Any]]:
        return self.summary["stages"]


def stage_line(plan: RunPlan, summary: dict[str, Any]) -> str:
    """One short line describing a finished stage (what the CLI prints)."""
    stage = plan.stages[summary["index"] - 1]
    return (f"[{stage.index}/{len(plan.stages)}] {stage.name}: {STAGES[stage.name].line(summary)} "
            f"({summary['seconds']:.1f} s) -> {stage.folder}")


def load_start(plan: RunPlan, progress: bool = True) -> RunState:
    """Load the plan's model and tokenizer, its folder's masks (verified) and the evaluation windows."""
    from .analysis.report import MASKS_FILE
    from .data.llm import load_causal_lm
    from .data.text import eval_windows
    from .masks import MaskSet

    model, tok = load_causal_lm(plan.model, progress=progress)
    masks = None
    src = Path(plan.model).expanduser()
    if src.is_dir() and (src / MASKS_FILE).is_file():
        masks = MaskSet.load(src / MASKS_FILE)
        masks.verify(model)  # the folder's weights must already obey its masks
    ew = eval_windows(tok, plan.eval_windows, plan.seq_len) if plan.eval_windows else None
    return RunState(model=model, tokenizer=tok, masks=masks, eval_windows=ew)


def run_recipe(
    source: str | os.PathLike[str] | Mapping[str, Any] | RunPlan,
    *,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_stage: Callable[[RunPlan, dict[str, Any]], None] | None = None,
) -> RunResult:
    """Run a multi-stage recipe end to end; return the :class:`RunResult`.

    The recipe is checked first (:func:`plan_recipe`; a :class:`RunPlan` is used as is). Then the
    model is loaded, the output folder is created (an existing one is replaced only with
    ``overwrite``) holding ``recipe.yaml``, and the stages run in order, each writing its folder
    atomically as soon as it finishes; ``run.json`` is written last. ``on_stage(plan, summary)``
    is called after each stage. The folder stays locked against other writers during the run.
    """
    from .atomic import atomic_dir, atomic_write_text, check_output_dir, output_lock

    plan = source if isinstance(source, RunPlan) else plan_recipe(source, out=out, overwrite=overwrite)
    check_output_dir(plan.out, inputs=plan.inputs, overwrite=plan.overwrite)
    t_start = time.perf_counter()
    state = load_start(plan, progress)
    seconds_load = time.perf_counter() - t_start
    with atomic_dir(plan.out, overwrite=plan.overwrite, inputs=plan.inputs) as tmp:
        import yaml

        text = plan.text if plan.text is not None else yaml.safe_dump(plan.to_dict(), sort_keys=False)
        (tmp / RECIPE_FILE).write_text(text, encoding="utf-8")
    summaries: list[dict[str, Any]] = []
    with output_lock(plan.out):
        for stage in plan.stages:
            kind = STAGES[stage.name]
            if kind.makes_masks and plan.dense_until > stage.index and state.dense is None:
                state = dataclasses.replace(state, dense=copy.deepcopy(state.model).eval())
            t0 = time.perf_counter()
            state, summary = kind.run(state, stage.settings, StageEnv(plan, stage, progress))
            summary["seconds"] = time.perf_counter() - t0
            summary["folder"] = str(stage.folder)
            if state.dense is not None and stage.index >= plan.dense_until:
                state = dataclasses.replace(state, dense=None)  # no later stage needs it
            summaries.append(summary)
            if on_stage is not None:
                on_stage(plan, summary)
        result = {"recipe": plan.to_dict(), "model": plan.model, "out": str(plan.out),
                  "seconds_load": seconds_load, "stages": summaries,
                  "seconds": time.perf_counter() - t_start}
        atomic_write_text(plan.out / RUN_FILE, json.dumps(result, indent=2, default=str) + "\n", overwrite=False)
    return RunResult(plan, state, result)
