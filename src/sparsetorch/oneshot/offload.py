"""Prune a model larger than RAM: stream decoder blocks from a safetensors folder, one at a time.

:func:`prune_pretrained` builds the model from its ``config.json`` on the *meta* device (no
memory), loads only the tensors outside the decoder blocks (embeddings, final norm, LM head),
then runs the ordinary block-sequential pipeline (:func:`.pipeline.run_oneshot`) with a
``block_io`` callback: before block ``i`` runs, its tensors are read from the safetensors files;
once its outputs are computed, the pruned block is written to its own shard in the output
folder and its tensors go back to the meta device. The output is a plain Hugging Face folder
(sharded safetensors + ``model.safetensors.index.json`` + config + tokenizer files), written
atomically.

Peak memory (fp32 compute, ``n`` sequences × ``t`` tokens, hidden ``h``)::

    peak ≈ weights outside the blocks (embeddings, LM head if untied, norms)
         + one block's weights (+ its solver workspace, e.g. XXᵀ for SparseGPT)
         + 2 · n·t·h·4 B of hidden states (+ 2 · n·t·h·4 B with reconstruct=True)
         + keep-masks of the blocks done so far (1 byte per targeted weight, for the report)

instead of the whole model. The model skeleton comes from ``accelerate.init_empty_weights``
(parameters on meta, buffers such as rotary frequencies built normally). Only ``allocation="uniform"`` is available (OWL and sensitivity
need a dense pass over every block first).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_dir, check_output_dir, recover_dir
from ..errors import CheckpointError, ModelError
from ..patterns import parse_pattern
from .blocks import find_decoder_blocks

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _tensor_index(model_dir: Path) -> dict[str, Path]:
    """``{tensor name: safetensors file}`` over every ``*.safetensors`` file of the folder."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{model_dir} has no *.safetensors files; streamed pruning reads safetensors only. "
            "Re-save the model with save_pretrained(..., safe_serialization=True)."
        )
    index: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(str(f), "pt") as fh:
                for k in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    index[k] = f
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(
                f"cannot read {f}: {e}. The file is corrupt or not safetensors."
            ) from e
    return index


class _Reader:
    """Reads tensors by name. Each call opens and closes the files it needs: a safetensors file
    stays memory-mapped while open, and its touched pages would count toward our RSS."""

    def __init__(self, index: dict[str, Path], dtype: torch.dtype) -> None:
        self.index, self.dtype = index, dtype

    def get_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.index[n], []).append(n)
        out = {}
        for f, ns in by_file.items():
            with safe_open(str(f), "pt") as fh:
                for n in ns:
                    t = fh.get_tensor(n)
                    out[n] = t.to(self.dtype) if t.is_floating_point() else t.clone()
        return out


def _swap_in(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Give the parameter/buffer ``name`` real storage, keeping the tensor object (and ties)."""
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters and mod._parameters[attr] is not None:
        p = mod._parameters[attr]
        torch.utils.swap_tensors(p, nn.Parameter(value, requires_grad=p.requires_grad))
    elif attr in mod._buffers and mod._buffers[attr] is not None:
        torch.utils.swap_tensors(mod._buffers[attr], value)
    else:
        raise ModelError(f"{name} is neither a parameter nor a buffer of the model.")


def _to_meta(module: nn.Module) -> None:
    for p in module.parameters(recurse=True):
        if not p.is_meta:
            torch.utils.swap_tensors(
                p, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            )


def prune_pretrained(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    method: str = "sparsegpt",
    sparsity: float | None = 0.5,
    pattern: str = "unstructured",
    *,
    calibration: Any = None,
    tokenizer: Any = None,
    targets: Any = None,
    ignore: Any = None,
    dtype: torch.dtype = torch.float32,
    num_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    overwrite: bool = False,
    **kwargs: Any,
):
    """Prune the HF causal LM in ``model_dir`` into ``out_dir`` holding one block in memory.

    Same methods, patterns and options as :func:`sparsetorch.prune` (uniform allocation only);
    text calibration is tokenised with the folder's tokenizer unless ``tokenizer`` is given.
    Returns the :class:`~sparsetorch.prune.PruneReport` (``extra["out_dir"]`` is the folder).

    ``out_dir`` is written atomically and must not exist, be an empty folder, or ``overwrite``
    must be True (:class:`~sparsetorch.errors.OutputExistsError` otherwise, raised before any
    work); it may never be, contain or lie inside ``model_dir``.
    """
    import transformers
    from safetensors.torch import save_file

    from ..prune import select_checked
    from .pipeline import run_oneshot

    src = Path(model_dir).expanduser().absolute()
    recover_dir(src)
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src} is not a Hugging Face model folder (no config.json).")
    out = check_output_dir(out_dir, inputs=[src], overwrite=overwrite)
    from ..data.llm import check_weight_indexes

    check_weight_indexes(src)  # its index files are copied to the output: refuse crafted ones
    pat = parse_pattern(pattern)
    s = pat.resolve_sparsity(sparsity)
    index = _tensor_index(src)
    reader = _Reader(index, dtype)
    config = transformers.AutoConfig.from_pretrained(str(src))
    if tokenizer is None and (calibration is None or _is_text(calibration)):
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(src))
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary) real
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # from_config leaves tied weights (lm_head = embeddings) untied
    model.eval()
    block_name, blocks = find_decoder_blocks(model)
    prefix = block_name + "."
    # names sharing a parameter object with another name (lm_head tied to the embeddings)
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    tied = {n for n, p in model.named_parameters(remove_duplicate=False) if uses[id(p)] > 1}
    # everything outside the blocks gets real storage now
    outside = [n for n in model.state_dict(keep_vars=True) if not n.startswith(prefix)]
    missing = [n for n in outside if n not in index and n not in tied]
    if missing:
        raise CheckpointError(f"{missing[:3]} are missing from the safetensors files in {src}.")
    for name, value in reader.get_many([n for n in outside if n in index]).items():
        _swap_in(model, name, value)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefix)]
    if still_meta:
        raise CheckpointError(f"{still_meta[:3]} are missing from the safetensors files in {src}.")

    params = select_checked(model, pat, targets, ignore)
    weight_map: dict[str, str] = {}
    total = 0
    t0 = time.perf_counter()
    with atomic_dir(out, overwrite=overwrite, inputs=[src]) as tmp:
        loaded: set[int] = set()

        def block_io(event: str, i: int, block: nn.Module) -> None:
            nonlocal total
            bp = f"{prefix}{i}."
            if event == "load":
                if i in loaded:
                    return
                names = [bp + rel for rel in block.state_dict(keep_vars=True)]
                missing = [n for n in names if n not in index]
                if missing:
                    raise CheckpointError(
                        f"{missing[:3]} are missing from the safetensors files in {src}."
                    )
                for full, value in reader.get_many(names).items():
                    _swap_in(model, full, value)
                loaded.add(i)
                return
            shard = f"model-block-{i:05d}.safetensors"
            tensors = {bp + k: v.detach().contiguous() for k, v in block.state_dict().items()}
            save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
            for k, v in tensors.items():
                weight_map[k] = shard
                total += v.numel() * v.element_size()
            _to_meta(block)

        report = run_oneshot(
            model,
            method=method.lower(),
            sparsity=s,
            pattern=pat,
            params=params,
            calibration=calibration,
            tokenizer=tokenizer,
            num_samples=num_samples,
            seq_len=seq_len,
            seed=seed,
            block_io=block_io,
            **kwargs,
        )
        rest = {}
        for name, t in model.state_dict().items():
            if name.startswith(prefix) or name in weight_map:
                continue
            if name in tied and name not in index:
                continue  # re-tied by transformers from the config
            rest[name] = t.detach().contiguous()
        save_file(rest, str(tmp / "model-rest.safetensors"), metadata={"format": "pt"})
        for k, v in rest.items():
            weight_map[k] = "model-rest.safetensors"
            total += v.numel() * v.element_size()
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
        )
        config.save_pretrained(str(tmp))
        for f in src.iterdir():  # tokenizer, generation config, ...
            if (
                f.is_file()
                and not f.name.endswith(WEIGHT_SUFFIXES)
                and f.name not in ("config.json", "model.safetensors.index.json")
            ):
                shutil.copy2(f, tmp / f.name)
    report.seconds_prune = time.perf_counter() - t0
    report.extra["out_dir"] = str(out)
    report.extra["streamed"] = True
    return report


def _is_text(calibration: Any) -> bool:
    return isinstance(calibration, str) or (
        isinstance(calibration, (list, tuple))
        and bool(calibration)
        and isinstance(calibration[0], str)
    )
