"""Named places in a causal LM whose activations a dictionary explains.

A *site* is ``KIND:LAYER`` with ``LAYER`` a decoder block index (negative counts from the end):

* ``resid:L`` -- the residual stream after block ``L`` (the block's output hidden states; equal to
  Hugging Face's ``hidden_states[L + 1]`` for every block but the last, where HF applies the final
  norm);
* ``mlp:L`` -- the output of block ``L``'s MLP (before it is added to the residual stream);
* ``attn:L`` -- the output of block ``L``'s attention (after ``o_proj``, before the residual add).

Blocks are found the way the one-shot pipeline finds them
(:func:`sparsetorch.oneshot.blocks.find_decoder_blocks`), so any Hugging Face causal LM whose
blocks sit in one ``nn.ModuleList`` works. :func:`read_site` runs the model only as far as the
site; :func:`splice_site` replaces the site's output (for the spliced-in reconstruction metrics).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DictionaryError
from ..oneshot.blocks import _Stop, block_output, find_decoder_blocks

KINDS = ("resid", "mlp", "attn")
_SUBMODULES = {"mlp": ("mlp", "feed_forward", "ffn"), "attn": ("self_attn", "attn", "attention")}


@dataclass(frozen=True)
class Site:
    """A parsed site: ``kind`` in :data:`KINDS` and a non-negative block index ``layer``."""

    kind: str
    layer: int

    def __str__(self) -> str:
        return f"{self.kind}:{self.layer}"


def _blocks(model: nn.Module) -> nn.ModuleList:
    try:
        return find_decoder_blocks(model)[1]
    except Exception as exc:  # ModelError: say it in this family's words
        raise DictionaryError(f"{type(model).__name__} has no decoder blocks to read activations from: {exc}") from None


def valid_sites(model: nn.Module) -> list[str]:
    """Every site name the model has, e.g. ``['resid:0', 'mlp:0', 'attn:0', 'resid:1', ...]``."""
    blocks = _blocks(model)
    out = []
    for i, block in enumerate(blocks):
        for kind in KINDS:
            if kind == "resid" or _submodule(block, kind) is not None:
                out.append(f"{kind}:{i}")
    return out


def _submodule(block: nn.Module, kind: str) -> nn.Module | None:
    for name in _SUBMODULES[kind]:
        mod = getattr(block, name, None)
        if isinstance(mod, nn.Module):
            return mod
    return None


def _summary(names: list[str]) -> str:
    layers = sorted({int(n.split(":")[1]) for n in names})
    kinds = sorted({n.split(":")[0] for n in names}, key=KINDS.index)
    return f"{'|'.join(kinds)}:L with L in 0..{layers[-1]} (or -1..-{layers[-1] + 1} from the end)"


def parse_site(spec: str | Site, model: nn.Module | None = None) -> Site:
    """Parse ``"resid:15"``; with ``model``, check that the site exists there (negative layers are
    resolved). DictionaryError naming the valid sites otherwise."""
    if isinstance(spec, Site):
        kind, layer = spec.kind, spec.layer
    else:
        text = str(spec).strip()
        kind, sep, num = text.partition(":")
        try:
            if not sep:
                raise ValueError
            layer = int(num)
        except ValueError:
            raise DictionaryError(
                f"site {spec!r} is not KIND:LAYER; write e.g. resid:15 (KIND one of {', '.join(KINDS)})."
            ) from None
        kind = kind.strip().lower()
    if kind not in KINDS:
        raise DictionaryError(f"site kind {kind!r} is unknown; use one of {', '.join(KINDS)} (e.g. resid:15).")
    if model is None:
        if layer < 0:
            raise DictionaryError(f"site {spec!r}: a negative layer needs the model to resolve it.")
        return Site(kind, layer)
    blocks = _blocks(model)
    n = len(blocks)
    if not -n <= layer < n:
        raise DictionaryError(
            f"site {spec!r} does not exist in {type(model).__name__} ({n} blocks); valid sites: "
            f"{_summary(valid_sites(model))}."
        )
    layer %= n
    if kind != "resid" and _submodule(blocks[layer], kind) is None:
        raise DictionaryError(
            f"block {layer} of {type(model).__name__} has no {kind} submodule; valid sites: "
            f"{_summary(valid_sites(model))}."
        )
    return Site(kind, layer)


def site_module(model: nn.Module, site: Site) -> nn.Module:
    """The module whose output is the site's activation."""
    block = _blocks(model)[site.layer]
    if site.kind == "resid":
        return block
    mod = _submodule(block, site.kind)
    assert mod is not None  # parse_site checked it
    return mod


def _replace_output(out: Any, new: Tensor) -> Any:
    if isinstance(out, Tensor):
        return new
    if isinstance(out, tuple):
        return (new, *out[1:])
    if isinstance(out, list):
        return [new, *out[1:]]
    raise DictionaryError(f"cannot replace a site output of type {type(out).__name__}.")


def _model_inputs(input_ids: Tensor) -> dict[str, Tensor]:
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


@torch.no_grad()
def read_site(model: nn.Module, site: Site, input_ids: Tensor) -> Tensor:
    """The site's activations ``[batch, seq, d]`` for ``input_ids``; the forward pass stops right
    after the site (later blocks and the LM head never run)."""
    got: list[Tensor] = []

    def hook(_m: nn.Module, _a: Any, out: Any) -> None:
        got.append(block_output(out).detach())
        raise _Stop

    device = next(model.parameters()).device
    h = site_module(model, site).register_forward_hook(hook)
    try:
        try:
            model(**_model_inputs(input_ids.to(device)), use_cache=False)
        except _Stop:
            pass
    finally:
        h.remove()
    if not got:
        raise DictionaryError(f"site {site} was never reached in the forward pass of {type(model).__name__}.")
    return got[0]


@contextlib.contextmanager
def splice_site(model: nn.Module, site: Site, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Within the block, the site's output ``x`` is replaced by ``fn(x)`` in every forward pass."""

    def hook(_m: nn.Module, _a: Any, out: Any) -> Any:
        return _replace_output(out, fn(block_output(out)))

    h = site_module(model, site).register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()
