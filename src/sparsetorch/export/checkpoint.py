"""Save and load compressed sparse checkpoints (torch side of :mod:`sparsetorch.export`).

One safetensors file holds every tensor in its own storage format (``dense``, ``bitmask``,
``csr``, ``n:m``) plus a JSON header in the safetensors metadata (key ``"sparsetorch"``)
describing, per tensor, the format, shape, dtype, parts and sparsity pattern, and for Hugging
Face models the model config, so the model can be rebuilt from the file alone. The layout
is specified in ``docs/format.md``; :mod:`sparsetorch.export.reader` reads it with numpy only.
No pickle is used anywhere; writes are atomic (temporary file + rename).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..atomic import atomic_path
from ..errors import CheckpointError, DependencyError, PatternError
from ..masks import MaskSet
from ..patterns import NM, Pattern, parse_pattern
from . import reader as _reader
from .formats import (
    DTYPES,
    FORMATS,
    Format,
    FormatError,
    NMPacked,
    index_dtype,
    nm_groups,
    nonzero,
    to_numpy,
)

__all__ = [
    "save",
    "load",
    "load_state_dict",
    "load_hf",
    "save_hf_folder",
    "choose_format",
    "checkpoint_summary",
    "TensorSummary",
    "DEFAULT_FILENAME",
]

#: file name used when a directory is given instead of a file
DEFAULT_FILENAME = "model.sparsetorch.safetensors"
PART_SEP = "::"
#: N:M layouts ``auto`` tries when no N:M pattern is known for a tensor
AUTO_NM_M = (4, 8, 16)

FormatSpec = str | Format


def _library_version() -> str:
    from .. import __version__

    return __version__


# --------------------------------------------------------------------------- format choice
def _estimate(fmt: Format, shape: tuple[int, ...], isz: int, nnz: int, n: int = 0, m: int = 0) -> int:
    numel = math.prod(shape)
    if fmt is Format.DENSE:
        return numel * isz
    if fmt is Format.BITMASK:
        return (numel + 7) // 8 + nnz * isz
    if fmt is Format.CSR:
        rows = 1 if len(shape) == 1 else shape[0]
        cols = numel // rows if rows else 0
        return (rows + 1) * index_dtype(nnz).itemsize + nnz * (index_dtype(max(cols - 1, 0)).itemsize + isz)
    groups = numel // m
    return groups * n * isz + (groups * NMPacked.index_bits(n, m) + 7) // 8


_PREFERENCE = (Format.DENSE, Format.NM, Format.BITMASK, Format.CSR)


def _nm_candidates(a: np.ndarray, sup: np.ndarray, pattern: Pattern | None) -> list[tuple[int, int]]:
    if a.ndim < 1:
        return []
    in_dim = a.shape[1] if a.ndim >= 2 else a.shape[0]
    if isinstance(pattern, NM):
        ms = [(pattern.n, pattern.m)] if in_dim % pattern.m == 0 else []
    else:
        ms = [(0, m) for m in AUTO_NM_M if in_dim % m == 0]
    out = []
    for n, m in ms:
        counts = nm_groups(sup, m).sum(axis=1) if sup.size else np.zeros(0, dtype=np.int64)
        most = int(counts.max()) if counts.size else 0
        need = max(n, most, 1)
        if need < m <= NMPacked.MAX_M:
            out.append((need, m))
    return out


def choose_format(
    tensor: Tensor | np.ndarray,
    mask: Tensor | np.ndarray | None = None,
    pattern: Pattern | str | None = None,
    dtype: str | None = None,
) -> tuple[Format, dict[str, int], dict[Format, int]]:
    """Pick the smallest valid format for one tensor.

    Returns ``(format, params, sizes)`` where ``sizes`` maps every valid format to the bytes its
    parts would take (exact, computed from the counts without encoding). Ties go to the simpler
    format (dense, then n:m, bitmask, csr).
    """
    a, dname = to_numpy(tensor, dtype)
    isz = DTYPES[dname][2]
    if a.ndim == 0 or dname == "bool" or a.size == 0:
        return Format.DENSE, {}, {Format.DENSE: a.nbytes}
    sup = nonzero(a, dname) if mask is None else to_numpy(mask)[0].astype(bool)
    nnz = int(sup.sum())
    pat = parse_pattern(pattern) if pattern is not None else None
    sizes: dict[Format, int] = {f: _estimate(f, a.shape, isz, nnz) for f in (Format.DENSE, Format.BITMASK, Format.CSR)}
    best_nm: tuple[int, int] | None = None
    for n, m in _nm_candidates(a, sup, pat):
        s = _estimate(Format.NM, a.shape, isz, nnz, n, m)
        if Format.NM not in sizes or s < sizes[Format.NM]:
            sizes[Format.NM], best_nm = s, (n, m)
    fmt = min(_PREFERENCE, key=lambda f: (sizes.get(f, math.inf), _PREFERENCE.index(f)))
    params = {"n": best_nm[0], "m": best_nm[1]} if fmt is Format.NM and best_nm else {}
    return fmt, params, sizes


def _explicit_nm_params(a: np.ndarray, sup: np.ndarray, pattern: Pattern | None, name: str) -> dict[str, int]:
    cands = _nm_candidates(a, sup, pattern)
    if pattern is not None and not isinstance(pattern, NM):
        cands = []
    if not cands:
        want = f" {pattern}" if isinstance(pattern, NM) else ""
        raise PatternError(
            f"{name}: format 'n:m' needs an N:M-sparse tensor{want} with an input dimension divisible by M "
            f"(shape {tuple(a.shape)}); use format='auto' (picks per tensor) or 'bitmask'."
        )
    n, m = min(cands, key=lambda nm: nm[0] / nm[1])
    return {"n": n, "m": m}


# --------------------------------------------------------------------------- save
def _tie_key(t: Tensor) -> tuple[Any, ...] | None:
    if t.numel() == 0:
        return None
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


def _default_targets(model: nn.Module | Mapping[str, Tensor], state: Mapping[str, Tensor]) -> list[str]:
    if isinstance(model, nn.Module):
        from ..targets import select

        try:
            return list(select(model))
        except Exception:  # noqa: BLE001 - a model with no prunable layers: everything stays dense
            return []
    return [n for n, t in state.items() if t.dim() >= 2 and t.is_floating_point()]


def _hf_config(model: Any) -> dict[str, Any] | None:
    cfg = getattr(model, "config", None)
    to_json = getattr(cfg, "to_json_string", None)
    if not callable(to_json):
        return None
    try:
        return json.loads(to_json(use_diff=False))
    except (TypeError, ValueError):
        return None


def _to_torch(a: np.ndarray, dname: str) -> Tensor:
    if dname == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def _write(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file (separate function so tests can interrupt it)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


def save(
    model: nn.Module | Mapping[str, Tensor],
    path: str | os.PathLike[str],
    format: FormatSpec = "auto",  # noqa: A002 - the natural name
    masks: MaskSet | None = None,
    metadata: Mapping[str, str] | None = None,
    *,
    targets: Sequence[str] | None = None,
    hf_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (an ``nn.Module`` or a state dict) as one compressed safetensors file.

    Args:
        model: the model (its ``state_dict()`` is saved) or a state dict.
        path: output file; a directory gets :data:`DEFAULT_FILENAME` inside it.
        format: ``"auto"`` (smallest valid format per tensor) or one of ``"dense"``,
            ``"bitmask"``, ``"csr"``, ``"n:m"`` for every sparse (targeted) tensor.
            Non-targeted tensors (embeddings, norms, biases) are always stored dense.
        masks: the model's :class:`MaskSet`; its tensors are the targeted ones, its kept positions
            are exactly the stored positions (weights must be zero where pruned) and its patterns
            are recorded. Without masks the default targets (``sparsetorch.targets``) are used and
            the non-zeros are stored.
        metadata: extra string key/values kept in the header (``user_metadata``).
        targets: parameter names to treat as sparse when ``masks`` is None.
        hf_config: a Hugging Face config dict to store; taken from ``model.config`` by default.

    Returns the path written. Pruned positions load back as exact ``+0.0``.
    """
    fmt_req = str(format.value if isinstance(format, Format) else format).lower()
    if fmt_req != "auto":
        try:
            Format(fmt_req)
        except ValueError:
            raise CheckpointError(
                f"unknown checkpoint format {format!r}; use 'auto', "
                + ", ".join(repr(f.value) for f in Format) + "."
            ) from None
    out = Path(path)
    if out.is_dir():
        out = out / DEFAULT_FILENAME
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    if masks is not None:
        missing = [n for n in masks.names() if n not in state]
        if missing:
            raise CheckpointError(f"mask {missing[0]!r} names no tensor of the model; the masks belong to another model.")
        target_names = set(masks.names())
    else:
        target_names = set(targets if targets is not None else _default_targets(model, state))
    user_meta = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in user_meta.items()):
        raise CheckpointError("metadata must map strings to strings.")

    # tied tensors (same storage, same view) are stored once
    first_of: dict[tuple[Any, ...], str] = {}
    tied: dict[str, str] = {}
    position = {n: i for i, n in enumerate(state)}
    order = sorted(state, key=lambda n: (n not in target_names, position[n]))
    for name in order:
        key = _tie_key(state[name])
        if key is None:
            continue
        if key in first_of:
            tied[name] = first_of[key]
        else:
            first_of[key] = name

    header_tensors: dict[str, Any] = {}
    stored: dict[str, Tensor] = {}
    for name, t in state.items():
        if name in tied:
            header_tensors[name] = {"tied_to": tied[name]}
            continue
        try:
            a, dname = to_numpy(t)
        except FormatError as exc:
            raise CheckpointError(f"{name}: cannot store this tensor: {exc}.") from None
        targeted = name in target_names
        mask_np = None
        pattern: Pattern | None = None
        if targeted and masks is not None:
            pattern = masks.patterns[name]
            m = masks[name]
            if tuple(m.shape) != tuple(t.shape):
                raise CheckpointError(f"{name}: mask shape {tuple(m.shape)} differs from tensor shape {tuple(t.shape)}.")
            mask_np = m.detach().cpu().numpy()
        if not targeted or a.ndim == 0 or dname == "bool":
            fmt, params = Format.DENSE, {}
        elif fmt_req == "auto":
            fmt, params, _ = choose_format(a, mask_np, pattern, dname)
        else:
            fmt, params = Format(fmt_req), {}
            if fmt is Format.NM:
                sup = nonzero(a, dname) if mask_np is None else mask_np.astype(bool)
                params = _explicit_nm_params(a, sup, pattern, name)
        try:
            parts, extra = FORMATS[fmt].compress(a, mask_np, dtype=dname, **params)
        except FormatError as exc:
            raise CheckpointError(f"{name}: cannot store as {fmt.value}: {exc}.") from None
        keys = {p: (name if fmt is Format.DENSE else f"{name}{PART_SEP}{p}") for p in parts}
        for p, arr in parts.items():
            stored[keys[p]] = _to_torch(arr, dname if p == "values" else "")
        entry: dict[str, Any] = {"format": fmt.value, "shape": list(a.shape), "dtype": dname, "parts": keys}
        if extra:
            entry["params"] = extra
        if targeted:
            entry["masked"] = True
            entry["pattern"] = str(pattern) if pattern is not None else "unstructured"
        header_tensors[name] = entry

    cfg = dict(hf_config) if hf_config is not None else _hf_config(model)
    header: dict[str, Any] = {
        "format": _reader.FORMAT_NAME,
        "format_version": _reader.FORMAT_VERSION,
        "library": "sparsetorch",
        "library_version": _library_version(),
        "tensors": header_tensors,
    }
    if cfg is not None:
        header["hf_config"] = cfg
        header["hf_class"] = type(model).__name__
    if user_meta:
        header["user_metadata"] = user_meta
    st_meta = {_reader.HEADER_KEY: json.dumps(header, sort_keys=True, separators=(",", ":"))}
    with atomic_path(out) as tmp:
        _write(stored, tmp, st_meta)
    return out


# --------------------------------------------------------------------------- load
def _resolve_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.is_dir():
        cand = p / DEFAULT_FILENAME
        if cand.is_file():
            return cand
        found = sorted(p.glob("*.sparsetorch.safetensors"))
        if len(found) == 1:
            return found[0]
        raise CheckpointError(f"{p} has no {DEFAULT_FILENAME}; pass the compressed file itself.")
    return p


def _open(path: str | os.PathLike[str]) -> _reader.Checkpoint:
    try:
        return _reader.Checkpoint(_resolve_file(path))
    except _reader.ReadError as exc:
        raise CheckpointError(str(exc) + ". The file is truncated, corrupt or not a sparsetorch checkpoint.") from None


def _decode_all(ck: _reader.Checkpoint) -> tuple[dict[str, Tensor], MaskSet]:
    state: dict[str, Tensor] = {}
    masks: dict[str, Tensor] = {}
    patterns: dict[str, Pattern] = {}
    for name, info in ck.infos.items():
        if info.tied_to is not None:
            continue
        try:
            arr, sup = ck.get(name)
        except _reader.ReadError as exc:
            raise CheckpointError(f"{exc}. The file is corrupt; re-export it.") from None
        t = _to_torch(arr, info.dtype)
        state[name] = t
        if info.masked:
            m = torch.from_numpy(sup.copy()) if sup is not None else (t != 0)
            masks[name] = m
            try:
                patterns[name] = parse_pattern(info.pattern)
            except PatternError as exc:
                raise CheckpointError(f"{name}: stored pattern {info.pattern!r} is invalid: {exc}") from None
    for name, info in ck.infos.items():
        if info.tied_to is not None:
            state[name] = state[info.tied_to]
    ordered = {n: state[n] for n in ck.infos}
    return ordered, MaskSet(masks, patterns)


def load_state_dict(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], MaskSet]:
    """Read a compressed checkpoint into ``(state_dict, MaskSet)``; tensors are dense, on CPU.

    The MaskSet holds, for every sparse (targeted) tensor, its stored positions and pattern.
    Raises :class:`CheckpointError` naming the tensor for truncated/corrupt files.
    """
    return _decode_all(_open(path))


@torch.no_grad()
def _fill(model: nn.Module, state: Mapping[str, Tensor], where: str) -> None:
    own = model.state_dict()
    for name in own:
        if name not in state:
            raise CheckpointError(f"{name}: the model has this tensor but {where} does not; the checkpoint was saved from a different model.")
    for name, t in state.items():
        if name not in own:
            raise CheckpointError(f"{name}: {where} has this tensor but the model does not; the checkpoint was saved from a different model.")
        if tuple(own[name].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{name}: shape {tuple(t.shape)} in {where} but {tuple(own[name].shape)} in the model; "
                "the checkpoint was saved from a different model."
            )
    for name, t in state.items():
        own[name].copy_(t)


def load(path: str | os.PathLike[str], model: nn.Module | None = None) -> tuple[nn.Module, MaskSet]:
    """Load a compressed checkpoint: ``(model, MaskSet)``.

    With ``model``, its tensors are filled in place (names and shapes must match exactly, else
    :class:`CheckpointError` naming the tensor; values are cast to the model's dtypes). Without
    one, a Hugging Face model is rebuilt from the config stored in the file (see :func:`load_hf`).
    """
    if model is None:
        return load_hf(path)
    ck = _open(path)
    state, masks = _decode_all(ck)
    _fill(model, state, str(ck.path))
    return model, masks


def load_hf(path_or_dir: str | os.PathLike[str]) -> tuple[nn.Module, MaskSet]:
    """Rebuild a Hugging Face causal LM from a compressed file (or a folder holding one).

    The config is taken from the file's header (written by :func:`save` for HF models), else
    from ``config.json`` next to the file. Returns ``(model, MaskSet)`` in eval mode.
    """
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover
        raise DependencyError("rebuilding a Hugging Face model needs transformers: pip install 'sparsetorch[llm]'") from exc
    ck = _open(path_or_dir)
    cfg = ck.header.get("hf_config")
    if not isinstance(cfg, dict):
        side = Path(ck.path).parent / "config.json"
        if not side.is_file():
            raise CheckpointError(
                f"{ck.path} stores no Hugging Face config and there is no config.json beside it; "
                "pass the model: sparsetorch.load(path, model=...) or use load_state_dict(path)."
            )
        try:
            cfg = json.loads(side.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise CheckpointError(f"{side} is not valid JSON: {exc}") from None
    cfg = dict(cfg)
    model_type = cfg.pop("model_type", None)
    state, masks = _decode_all(ck)
    dtypes = [t.dtype for t in state.values() if t.is_floating_point()]
    dtype = max(set(dtypes), key=dtypes.count) if dtypes else torch.float32
    try:
        config = transformers.AutoConfig.for_model(model_type, **cfg)
        # built in the stored dtype the way from_pretrained does it, so buffers computed at
        # init (e.g. rotary inv_freq, kept in float32) match a model loaded from a HF folder
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{ck.path}: cannot rebuild the model from its stored config: {exc}") from None
    _fill(model, state, str(ck.path))
    return model.eval(), masks


def save_hf_folder(
    model: nn.Module | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a plain Hugging Face folder (config + dense safetensors with zeros) ``transformers``
    reloads with ``from_pretrained``. ``model`` may be a model or a compressed checkpoint path.

    The folder is written atomically by :func:`sparsetorch.data.llm.save_hf_model`; an existing
    non-empty ``out_dir`` is replaced only with ``overwrite=True``, and never when it is, contains
    or lies inside the checkpoint path ``model`` (:class:`~sparsetorch.errors.OutputExistsError`).
    """
    from ..atomic import check_output_dir
    from ..data.llm import save_hf_model

    inputs = [] if isinstance(model, nn.Module) else [model]
    check_output_dir(out_dir, inputs=inputs, overwrite=overwrite)  # before loading anything
    if not isinstance(model, nn.Module):
        model, _ = load_hf(model)
    return save_hf_model(model, tokenizer, out_dir, overwrite=overwrite, inputs=inputs)


# --------------------------------------------------------------------------- summary
@dataclass
class TensorSummary:
    """One tensor of a compressed checkpoint: how it is stored and what it costs."""

    name: str
    format: str
    shape: tuple[int, ...]
    dtype: str
    pattern: str | None
    dense_bytes: int
    stored_bytes: int
    tied_to: str | None = None

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.dense_bytes if self.dense_bytes else 1.0


def checkpoint_summary(path: str | os.PathLike[str]) -> list[TensorSummary]:
    """Per-tensor formats and sizes of a compressed checkpoint (reads only the header)."""
    ck = _open(path)
    out = []
    for name, info in ck.infos.items():
        if info.tied_to is not None:
            base = ck.infos[info.tied_to]
            out.append(TensorSummary(name, "tied", base.shape, base.dtype, None, 0, 0, info.tied_to))
        else:
            out.append(TensorSummary(name, info.format.value, info.shape, info.dtype, info.pattern,
                                     info.nbytes, ck.stored_bytes(name)))
    return out
