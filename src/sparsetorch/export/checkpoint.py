"""Save and load compressed sparse checkpoints (torch side of :mod:`sparsetorch.export`).

One safetensors file holds every tensor in its own storage format (``dense``, ``bitmask``,
``csr``, ``n:m``) plus a JSON header in the safetensors metadata (key ``"sparsetorch"``)
describing, per tensor, the format, shape, dtype, parts and sparsity pattern, and for Hugging
Face models the model config, so the model can be rebuilt from the file alone. The layout
is specified in ``docs/format.md``; :mod:`sparsetorch.export.reader` reads it with numpy only.
No pickle is used anywhere; writes are atomic (temporary file + rename).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..atomic import atomic_path
from ..errors import (
    CheckpointError,
    DependencyError,
    LimitError,
    MaskError,
    ModelError,
    PatternError,
    SparseTorchError,
    TargetError,
    close_matches,
)
from ..masks import MaskSet
from ..patterns import NM, Pattern, parse_pattern
from . import reader as _reader
from .formats import (
    DTYPES,
    FORMATS,
    INT8_ROWS,
    QUANT_DTYPES,
    Format,
    FormatError,
    NMPacked,
    contiguous,
    index_dtype,
    nm_groups,
    nonzero,
    quantize_int8_rows,
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
def _estimate(fmt: Format, shape: tuple[int, ...], isz: int, nnz: int, n: int = 0, m: int = 0,
              masked: bool = False) -> int:
    numel = math.prod(shape)
    if fmt is Format.DENSE:
        return numel * isz + ((numel + 7) // 8 if masked else 0)
    if fmt is Format.BITMASK:
        return (numel + 7) // 8 + nnz * isz
    if fmt is Format.CSR:
        rows = 1 if len(shape) == 1 else shape[0]
        cols = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
        return (rows + 1) * index_dtype(nnz).itemsize + nnz * (index_dtype(max(cols - 1, 0)).itemsize + isz)
    groups = numel // m
    return groups * n * isz + (groups * NMPacked.index_bits(n, m) + 7) // 8


_PREFERENCE = (Format.DENSE, Format.NM, Format.BITMASK, Format.CSR)


def _nm_candidates(a: np.ndarray, sup: np.ndarray, pattern: Pattern | None,
                   exact: bool = False) -> list[tuple[int, int]]:
    """``(n, m)`` layouts that can store ``sup``. With ``exact`` (a mask that must round-trip),
    only layouts where every group holds exactly ``n`` positions: n:m pads a group with fewer
    positions, and the padding would become part of the loaded mask."""
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
        if exact and counts.size and int(counts.min()) != need:
            continue
        if need < m <= NMPacked.MAX_M:
            out.append((need, m))
    return out


def choose_format(
    tensor: Tensor | np.ndarray,
    mask: Tensor | np.ndarray | None = None,
    pattern: Pattern | str | None = None,
    dtype: str | None = None,
    *,
    masked: bool | None = None,
) -> tuple[Format, dict[str, int], dict[Format, int]]:
    """Pick the smallest valid format for one tensor.

    Returns ``(format, params, sizes)`` where ``sizes`` maps every valid format to the bytes its
    parts would take (exact, computed from the counts without encoding). Ties go to the simpler
    format (dense, then n:m, bitmask, csr). With a ``mask`` the stored positions must be exactly
    the mask, so n:m is valid only if every group keeps exactly ``n``; ``masked`` (default: a mask
    is given) counts the ``mask`` part a masked dense tensor carries.
    """
    a, dname = to_numpy(tensor, dtype)
    isz = DTYPES[dname][2]
    masked = mask is not None if masked is None else masked
    if a.ndim == 0 or dname == "bool" or a.size == 0:
        return Format.DENSE, {}, {Format.DENSE: _estimate(Format.DENSE, a.shape, isz, 0, masked=masked)}
    sup = nonzero(a, dname) if mask is None else to_numpy(mask)[0].astype(bool)
    nnz = int(sup.sum())
    pat = parse_pattern(pattern) if pattern is not None else None
    sizes: dict[Format, int] = {f: _estimate(f, a.shape, isz, nnz, masked=masked)
                                for f in (Format.DENSE, Format.BITMASK, Format.CSR)}
    best_nm: tuple[int, int] | None = None
    for n, m in _nm_candidates(a, sup, pat, exact=mask is not None):
        s = _estimate(Format.NM, a.shape, isz, nnz, n, m)
        if Format.NM not in sizes or s < sizes[Format.NM]:
            sizes[Format.NM], best_nm = s, (n, m)
    fmt = min(_PREFERENCE, key=lambda f: (sizes.get(f, math.inf), _PREFERENCE.index(f)))
    params = {"n": best_nm[0], "m": best_nm[1]} if fmt is Format.NM and best_nm else {}
    return fmt, params, sizes


def _explicit_nm_params(a: np.ndarray, sup: np.ndarray, pattern: Pattern | None, name: str,
                        exact: bool) -> dict[str, int]:
    cands = _nm_candidates(a, sup, pattern, exact=exact)
    if pattern is not None and not isinstance(pattern, NM):
        cands = []
    if not cands:
        want = f" {pattern}" if isinstance(pattern, NM) else ""
        pad = (" in which every group of M keeps exactly N positions (n:m would add padding positions "
               "to the mask)") if exact else ""
        raise PatternError(
            f"{name}: format 'n:m' needs an N:M-sparse tensor{want}{pad} with an input dimension divisible by M "
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
    a = contiguous(a)
    if dname == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


_INDEX_CODES = {np.dtype("u1"): "U8", np.dtype("<u2"): "U16", np.dtype("<u4"): "U32", np.dtype("<u8"): "U64"}


def _little(a: np.ndarray) -> np.ndarray:
    a = contiguous(a)
    return a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a


def _data_order(tensors: Mapping[str, tuple[np.ndarray, str]]) -> list[str]:
    """Keys in file order: larger items first (every tensor starts aligned to its item size),
    then by name, as safetensors itself lays out its files."""
    return sorted(tensors, key=lambda k: (-tensors[k][0].dtype.itemsize, k))


def _bytes(a: np.ndarray) -> memoryview:
    return memoryview(a.reshape(-1).view(np.uint8))


def _digest(header: str, tensors: Mapping[str, tuple[np.ndarray, str]]) -> str:
    """SHA-256 of the sparsetorch header (UTF-8) followed by the data buffer (docs/format.md)."""
    h = hashlib.sha256(header.encode("utf-8"))
    for k in _data_order(tensors):
        h.update(_bytes(tensors[k][0]))
    return h.hexdigest()


def _write(tensors: Mapping[str, tuple[np.ndarray, str]], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file: ``tensors`` maps key -> (little-endian C-contiguous array,
    safetensors dtype code). Same layout rules as the safetensors library (8-byte aligned header,
    data tiled in :func:`_data_order`); a separate function so tests can interrupt it."""
    order = _data_order(tensors)
    entries: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for k in order:
        a, code = tensors[k]
        entries[k] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    head = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    head += b" " * (-(8 + len(head)) % 8)
    with open(path, "wb") as fh:
        fh.write(len(head).to_bytes(8, "little"))
        fh.write(head)
        for k in order:
            fh.write(_bytes(tensors[k][0]))


def _check_output_parent(out: Path) -> None:
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError(f"cannot write {out}: {parent} is a file, not a folder; choose another output path.")
            return


def save(
    model: nn.Module | Mapping[str, Tensor],
    path: str | os.PathLike[str],
    format: FormatSpec = "auto",  # noqa: A002 - the natural name
    masks: MaskSet | None = None,
    metadata: Mapping[str, str] | None = None,
    *,
    targets: Sequence[str] | None = None,
    hf_config: Mapping[str, Any] | None = None,
    checksum: bool = True,
    overwrite: bool = True,
    quantize: str | None = None,
) -> Path:
    """Write ``model`` (an ``nn.Module`` or a state dict) as one compressed safetensors file.

    Args:
        model: the model (its ``state_dict()`` is saved) or a state dict.
        path: output file; a directory gets :data:`DEFAULT_FILENAME` inside it.
        format: ``"auto"`` (smallest valid format per tensor) or one of ``"dense"``,
            ``"bitmask"``, ``"csr"``, ``"n:m"`` for every sparse (targeted) tensor.
            Non-targeted tensors (embeddings, norms, biases) are always stored dense.
        masks: the model's :class:`MaskSet`; its tensors are the targeted ones, its kept positions
            are exactly the stored positions (weights must be zero where pruned; kept weights that
            are exactly zero stay kept) and its patterns are recorded. Without masks the default
            targets (``sparsetorch.targets``) are used and the non-zeros are stored.
        metadata: extra string key/values kept in the header (``user_metadata``).
        targets: parameter names to treat as sparse when ``masks`` is None.
        hf_config: a Hugging Face config dict to store; taken from ``model.config`` by default.
        checksum: write a SHA-256 of the header and data, verified by every load, so a damaged or
            altered file is refused instead of loading changed weights. Costs one SHA-256
            pass (~0.9 GB/s): 0.19 s for SmolLM2-135M fp16 2:4 (173 MB; save ~8 s, load ~2.6 s).
        overwrite: replace an existing file at ``path`` (default, like ``open(path, "w")``);
            ``False`` refuses it with :class:`~sparsetorch.errors.OutputExistsError`.
        quantize: ``"int8"`` stores every sparse (targeted) 2-D float tensor with int8 values and
            one float32 scale per row (symmetric, ``scale = max|row| / 127``), in the same layout
            the decode kernels read (:mod:`sparsetorch.inference.lowbit`); the stored positions
            (the mask) are those of the float tensor, so pruned weights stay exactly zero. Such a
            file is format version 3; loading it decodes ``q * scale`` in the logical dtype.
            Lossy: about 0.4% of each row's largest weight per weight at most.

    Returns the path written. Pruned positions load back as exact ``+0.0``. The write is atomic:
    a crash leaves the old file (or none), never a partial one.
    """
    if quantize not in (None, "int8"):
        raise CheckpointError(f"unknown quantize={quantize!r}; use None or 'int8'.")
    fmt_req = str(format.value if isinstance(format, Format) else format).lower()
    if fmt_req != "auto":
        try:
            Format(fmt_req)
        except ValueError:
            raise CheckpointError(
                f"unknown checkpoint format {format!r}; use 'auto', "
                + ", ".join(repr(f.value) for f in Format) + "."
            ) from None
    if not isinstance(model, (nn.Module, Mapping)):
        raise ModelError(f"save() needs an nn.Module or a state dict (names -> tensors), got {type(model).__name__}.")
    out = Path(path)
    if out.is_dir():
        out = out / DEFAULT_FILENAME
    _check_output_parent(out)
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    for name, t in state.items():
        if not isinstance(t, Tensor):
            raise CheckpointError(f"{name}: the state dict holds a {type(t).__name__}, not a tensor; only tensors can be saved.")
        if t.is_meta:
            raise ModelError(
                f"{name} is on the meta device (shape only, no data), so there is nothing to save. Build or load the "
                "model with real weights first (e.g. model.to_empty(device='cpu') and then load_state_dict)."
            )
    if masks is not None and not isinstance(masks, MaskSet):
        raise MaskError(f"masks must be a MaskSet, got {type(masks).__name__}; build one with MaskSet(dict_of_masks).")
    if hf_config is not None and not isinstance(hf_config, Mapping):
        raise CheckpointError(f"hf_config must be a dict (a Hugging Face config.json), got {type(hf_config).__name__}.")
    if masks is None and targets is not None:
        unknown = [n for n in targets if n not in state]
        if unknown:
            raise TargetError(f"target {unknown[0]!r} names no tensor of the model.{close_matches(unknown[0], state)}")
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

    # tied tensors (same storage, same view) are stored once, under a targeted name if any
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
    stored: dict[str, tuple[np.ndarray, str]] = {}
    for name, t in state.items():
        if name in tied:
            base = tied[name]
            entry = {"tied_to": base}
            if name in target_names:
                if masks is not None and not torch.equal(masks[name].cpu(), masks[base].cpu()):
                    raise CheckpointError(f"{name} and {base} are the same tensor (tied) but their masks differ; "
                                          "give them one mask.")
                entry["masked"] = True
            header_tensors[name] = entry
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
            mask_np = m.detach().cpu().numpy().astype(bool, copy=False)
        if not targeted or a.ndim == 0 or dname == "bool":
            fmt, params = Format.DENSE, {}
        elif fmt_req == "auto":
            fmt, params, _ = choose_format(a, mask_np, pattern, dname, masked=True)
        else:
            fmt, params = Format(fmt_req), {}
            if fmt is Format.NM:
                sup = nonzero(a, dname) if mask_np is None else mask_np
                params = _explicit_nm_params(a, sup, pattern, name, exact=mask_np is not None)
        if targeted and fmt is Format.DENSE and mask_np is None:
            mask_np = nonzero(a, dname)  # a masked dense tensor always carries its mask
        quantized = quantize is not None and targeted and a.ndim == 2 and dname in QUANT_DTYPES
        try:
            if quantized:  # int8 values at the float tensor's stored positions, plus per-row scales
                sup = mask_np if mask_np is not None else nonzero(a, dname)
                q, scales = quantize_int8_rows(a, dname)
                parts, extra = FORMATS[fmt].compress(q, sup, dtype="int8", **params)
                parts["scales"] = scales
            else:
                parts, extra = FORMATS[fmt].compress(a, mask_np, dtype=dname, **params)
        except FormatError as exc:
            raise CheckpointError(f"{name}: cannot store as {fmt.value}: {exc}.") from None
        keys = {p: (name if fmt is Format.DENSE and p == "values" else f"{name}{PART_SEP}{p}") for p in parts}
        for p, arr in parts.items():
            if p == "values":
                code = "I8" if quantized else DTYPES[dname][1]
            else:
                code = "F32" if p == "scales" else _INDEX_CODES[arr.dtype]
            stored[keys[p]] = (_little(arr), code)
        entry: dict[str, Any] = {"format": fmt.value, "shape": list(a.shape), "dtype": dname, "parts": keys}
        if quantized:
            entry["quantization"] = {"scheme": INT8_ROWS}
        if extra:
            entry["params"] = extra
        if targeted:
            entry["masked"] = True
            if pattern is not None:
                entry["pattern"] = str(pattern)
            else:  # inferred: the pattern the stored positions actually obey
                entry["pattern"] = f"{extra['n']}:{extra['m']}" if fmt is Format.NM else "unstructured"
        header_tensors[name] = entry

    cfg = dict(hf_config) if hf_config is not None else _hf_config(model)
    header: dict[str, Any] = {
        "format": _reader.FORMAT_NAME,
        # version 3 only where it is needed (quantized values): version-2 readers keep reading the rest
        "format_version": 3 if any("quantization" in e for e in header_tensors.values()) else 2,
        "library": "sparsetorch",
        "library_version": _library_version(),
        "tensors": header_tensors,
    }
    if cfg is not None:
        header["hf_config"] = cfg
        header["hf_class"] = type(model).__name__
    if user_meta:
        header["user_metadata"] = user_meta
    if checksum:
        header["checksum"] = "sha256"
    try:
        header_str = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"the header cannot be written as JSON ({exc}); hf_config and metadata must hold "
                              "plain JSON values (no NaN/Infinity, no objects).") from None
    st_meta = {_reader.HEADER_KEY: header_str}
    if checksum:
        st_meta[_reader.CHECKSUM_KEY] = _digest(header_str, stored)
    try:
        with atomic_path(out) if overwrite else atomic_path(out, overwrite=False) as tmp:
            _write(stored, tmp, st_meta)
    except SparseTorchError:
        raise
    except OSError as exc:
        raise CheckpointError(f"cannot write {out}: {exc.strerror or exc}; choose a writable output path.") from exc
    return out


# --------------------------------------------------------------------------- load
def _resolve_file(path: str | os.PathLike[str]) -> Path:
    from ..atomic import recover_dir

    p = Path(path)
    if not p.exists():  # a folder whose atomic swap was cut short is put back before reading
        recover_dir(p) or recover_dir(p.parent)
    if p.is_dir():
        cand = p / DEFAULT_FILENAME
        if cand.is_file():
            return cand
        found = sorted(p.glob("*.sparsetorch.safetensors"))
        if len(found) == 1:
            return found[0]
        raise CheckpointError(f"{p} has no {DEFAULT_FILENAME}; pass the compressed file itself.")
    return p


def _open(path: str | os.PathLike[str], max_bytes: int | None = None, *, verify: bool = True,
          header_only: bool = False) -> _reader.Checkpoint:
    try:
        return _reader.Checkpoint(_resolve_file(path), max_bytes=max_bytes, verify=verify, header_only=header_only)
    except _reader.ReadLimitError as exc:
        raise LimitError(str(exc)) from None
    except _reader.ReadError as exc:
        raise CheckpointError(str(exc) + ". The file is truncated, corrupt or not a sparsetorch checkpoint.") from None


def _patterns(ck: _reader.Checkpoint) -> dict[str, Pattern]:
    """Patterns of the masked tensors (tied masked names included), parsed before decoding."""
    out: dict[str, Pattern] = {}
    for name, info in ck.infos.items():
        if not info.masked:
            continue
        spec = ck.info(name).pattern
        try:
            out[name] = parse_pattern(spec)
        except PatternError as exc:
            raise CheckpointError(f"{name}: stored pattern {spec!r} is invalid: {exc}") from None
    return out


def _decoded(ck: _reader.Checkpoint) -> Iterator[tuple[str, Tensor, Tensor | None]]:
    """``(name, tensor, mask or None)`` for each stored (non-tied) tensor, one at a time."""
    for name, info in ck.infos.items():
        if info.tied_to is not None:
            continue
        try:
            arr, sup = ck.get(name)
        except _reader.ReadError as exc:
            raise CheckpointError(f"{exc}. The file is corrupt; re-export it.") from None
        yield name, _to_torch(arr, info.dtype), (torch.from_numpy(sup) if sup is not None else None)


def _ties(ck: _reader.Checkpoint) -> dict[str, list[str]]:
    ties: dict[str, list[str]] = {}
    for name, info in ck.infos.items():
        if info.tied_to is not None:
            ties.setdefault(info.tied_to, []).append(name)
    return ties


def load_state_dict(path: str | os.PathLike[str], *, max_bytes: int | None = None) -> tuple[dict[str, Tensor], MaskSet]:
    """Read a compressed checkpoint into ``(state_dict, MaskSet)``; tensors are dense, on CPU.

    The MaskSet holds, for every sparse (targeted) tensor, its stored positions and pattern.
    Raises :class:`CheckpointError` naming the tensor for truncated/corrupt files, and
    :class:`LimitError` (before decoding anything) when the decoded tensors would take more than
    ``max_bytes`` (default: 64 MiB + 64x the file size).
    """
    ck = _open(path, max_bytes)
    patterns = _patterns(ck)
    ties = _ties(ck)
    state: dict[str, Tensor] = {}
    masks: dict[str, Tensor] = {}
    for name, t, m in _decoded(ck):
        for n in (name, *ties.get(name, ())):
            state[n] = t
            if m is not None and ck.infos[n].masked:
                masks[n] = m
    ordered = {n: state[n] for n in ck.infos}
    return ordered, MaskSet(masks, {n: patterns[n] for n in masks})


def _check_matches(own: Mapping[str, Tensor], ck: _reader.Checkpoint, where: str) -> None:
    """Names and shapes of a model against the checkpoint header -- before anything is decoded."""
    for name in own:
        if name not in ck.infos:
            raise CheckpointError(f"{name}: the model has this tensor but {where} does not; the checkpoint was saved from a different model.")
    for name in ck.infos:
        if name not in own:
            raise CheckpointError(f"{name}: {where} has this tensor but the model does not; the checkpoint was saved from a different model.")
        shape = ck.info(name).shape
        if tuple(own[name].shape) != shape:
            raise CheckpointError(
                f"{name}: shape {shape} in {where} but {tuple(own[name].shape)} in the model; "
                "the checkpoint was saved from a different model."
            )


@torch.no_grad()
def _fill(model: nn.Module, ck: _reader.Checkpoint) -> MaskSet:
    """Check names and shapes, then decode tensor by tensor straight into the model's tensors."""
    where = str(ck.path)
    own = model.state_dict()
    _check_matches(own, ck, where)
    patterns = _patterns(ck)
    ties = _ties(ck)
    masks: dict[str, Tensor] = {}
    for name, t, m in _decoded(ck):
        for n in (name, *ties.get(name, ())):
            own[n].copy_(t)
            if m is not None and ck.infos[n].masked:
                masks[n] = m
        del t
    return MaskSet(masks, {n: patterns[n] for n in masks})


def load(path: str | os.PathLike[str], model: nn.Module | None = None, *,
         max_bytes: int | None = None) -> tuple[nn.Module, MaskSet]:
    """Load a compressed checkpoint: ``(model, MaskSet)``.

    With ``model``, its tensors are filled in place (names and shapes must match exactly, else
    :class:`CheckpointError` naming the tensor, raised before anything is decoded; values are
    cast to the model's dtypes). Without one, a Hugging Face model is rebuilt from the config
    stored in the file (see :func:`load_hf`). ``max_bytes`` bounds the memory decoding may take
    (:class:`LimitError` before allocating; default 64 MiB + 64x the file size).
    """
    if model is None:
        return load_hf(path, max_bytes=max_bytes)
    if not isinstance(model, nn.Module):
        raise ModelError(f"load() fills an nn.Module, got {type(model).__name__}; use load_state_dict(path) for a state dict.")
    ck = _open(path, max_bytes)
    return model, _fill(model, ck)


#: hf_config keys that are sizes or counts: non-negative integers (or null, or lists of them)
_DIM_KEY = re.compile(r"(_size|_dim|_dims|_layers|_heads|_positions|_experts|^max_position_embeddings)$|^(num|n)_")


def _check_config_dims(cfg: Mapping[str, Any], where: str, prefix: str = "") -> None:
    for key, v in cfg.items():
        if isinstance(v, Mapping):
            _check_config_dims(v, where, f"{prefix}{key}.")
            continue
        if not isinstance(key, str) or not _DIM_KEY.search(key):
            continue
        vals = v if isinstance(v, list) else [v]
        if not all(x is None or (type(x) is int and x >= 0) for x in vals):
            raise CheckpointError(
                f"{where}: hf_config {prefix}{key} = {v!r} is not a non-negative integer, so no model can be built "
                "from it; the stored config is corrupt. Pass the model instead: sparsetorch.load(path, model=...)."
            )


def _model_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def hf_config_of(ck: _reader.Checkpoint) -> dict[str, Any]:
    """The Hugging Face config of an opened checkpoint: the one stored in its header, else the
    ``config.json`` beside the file (:class:`CheckpointError` when neither is usable). Its sizes
    are checked to be non-negative integers. A fresh dict the caller may change."""
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
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{side} does not hold a JSON object.")
    cfg = dict(cfg)
    _check_config_dims(cfg, ck.path)
    return cfg


def load_hf(path_or_dir: str | os.PathLike[str], *, max_bytes: int | None = None) -> tuple[nn.Module, MaskSet]:
    """Rebuild a Hugging Face causal LM from a compressed file (or a folder holding one).

    The config is taken from the file's header (written by :func:`save` for HF models), else
    from ``config.json`` next to the file. The model is first built on the meta device (no
    memory) and every parameter's and buffer's name and shape is compared with the stored tensors;
    its size is checked against ``max_bytes`` (:class:`LimitError`; default 64 MiB + 64x the file
    size). Only then is it built for real and filled tensor by tensor. Returns ``(model, MaskSet)``
    in eval mode.
    """
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover
        raise DependencyError("rebuilding a Hugging Face model needs transformers: pip install 'sparsetorch[llm]'") from exc
    ck = _open(path_or_dir, max_bytes)
    cfg = hf_config_of(ck)
    model_type = cfg.pop("model_type", None)
    dtypes = [ck.info(n).dtype for n in ck.infos if ck.info(n).dtype in ("float32", "float16", "bfloat16", "float64")]
    dtype = getattr(torch, max(set(dtypes), key=dtypes.count)) if dtypes else torch.float32
    try:
        config = transformers.AutoConfig.for_model(model_type, **cfg)
    except Exception as exc:  # noqa: BLE001 - any failure here means the stored config is unusable
        raise CheckpointError(f"{ck.path}: cannot rebuild the model from its stored config: {type(exc).__name__}: {exc}") from None
    layers = getattr(config, "num_hidden_layers", None)
    if type(layers) is int and layers > len(ck.infos):
        raise CheckpointError(f"{ck.path}: hf_config asks for {layers} layers but the file holds only {len(ck.infos)} "
                              "tensors; the stored config does not belong to these weights.")
    try:
        with torch.device("meta"):
            skeleton = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - e.g. negative or inconsistent sizes in the config
        raise CheckpointError(f"{ck.path}: cannot rebuild the model from its stored config: {type(exc).__name__}: {exc}") from None
    _check_matches(skeleton.state_dict(), ck, str(ck.path))
    need = _model_bytes(skeleton)
    del skeleton
    if need > ck.limit:
        raise LimitError(f"{ck.path}: the model its hf_config describes needs {need} bytes, more than the limit "
                         f"{ck.limit}; if you trust this file, pass max_bytes={need} (or more).")
    try:
        # built in the stored dtype the way from_pretrained does it, so buffers computed at
        # init (e.g. rotary inv_freq, kept in float32) match a model loaded from a HF folder
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{ck.path}: cannot rebuild the model from its stored config: {type(exc).__name__}: {exc}") from None
    masks = _fill(model, ck)
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
    ck = _open(path, verify=False, header_only=True)
    out = []
    for name, info in ck.infos.items():
        if info.tied_to is not None:
            base = ck.infos[info.tied_to]
            out.append(TensorSummary(name, "tied", base.shape, base.dtype, None, 0, 0, info.tied_to))
        else:
            out.append(TensorSummary(name, info.format.value, info.shape, info.dtype, info.pattern,
                                     info.nbytes, ck.stored_bytes(name)))
    return out
