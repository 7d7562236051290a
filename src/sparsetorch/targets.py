"""Targets: which parameters are sparse.

A selector is one of:

* a parameter name (``"model.layers.0.mlp.up_proj.weight"``) - that parameter;
* a module name (``"model.layers.0.mlp.up_proj"``) - that module's ``weight``;
* a module class name (``"Linear"``, ``"Conv2d"``) - the ``weight`` of every such module;
* ``"re:<regex>"`` - the ``weight`` of every module whose name the regex matches from the
  start (``re.match``, as in llm-compressor), e.g. ``"re:.*self_attn.*"``, plus any parameter
  whose full name the regex matches entirely.

The default targets are the weights of ``nn.Linear`` / ``nn.Conv1d/2d/3d`` (and transformers'
``Conv1D``), except embeddings and the language-model head (``lm_head``, the model's output
embeddings, or any weight tied to an embedding).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from .errors import TargetError, close_matches

DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _default_type(module: nn.Module) -> bool:
    if isinstance(module, DEFAULT_TYPES):
        return True
    # transformers' GPT-2 style Conv1D (weight stored [in, out]) without importing transformers
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def excluded_heads(model: nn.Module) -> set[str]:
    """Names of weights never pruned by default: embeddings, LM head, weights tied to embeddings."""
    out: set[str] = set()
    embed_ids = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, nn.Embedding | nn.EmbeddingBag):
            out.add(f"{mname}.weight" if mname else "weight")
            embed_ids.add(id(mod.weight))
    get_out = getattr(model, "get_output_embeddings", None)
    head = None
    if callable(get_out):
        try:
            head = get_out()
        except Exception:  # noqa: BLE001 - some models raise NotImplementedError
            head = None
    for mname, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if w is None:
            continue
        if mod is head or mname.split(".")[-1] == "lm_head" or id(w) in embed_ids:
            out.add(f"{mname}.weight" if mname else "weight")
    return out


def _split(spec: str | Iterable[str] | None) -> list[str]:
    if spec is None:
        return []
    if isinstance(spec, str):
        return [spec]
    return list(spec)


def _weight_name(module: nn.Module, by_id: dict[int, str]) -> set[str]:
    """The name under which ``module.weight`` is listed in ``named_parameters()`` (tied weights
    are listed once, under their first owner: ``lm_head.weight`` as ``model.embed_tokens.weight``)."""
    w = getattr(module, "weight", None)
    if not isinstance(w, nn.Parameter) or id(w) not in by_id:
        return set()
    return {by_id[id(w)]}


@dataclass(frozen=True)
class _Index:
    """A model's names, built once per :func:`select` call and shared by every selector."""

    model_name: str
    params: dict[str, nn.Parameter]
    modules: dict[str, nn.Module]
    by_id: dict[int, str]

    @classmethod
    def of(cls, model: nn.Module) -> _Index:
        params = dict(model.named_parameters())
        return cls(
            type(model).__name__,
            params,
            dict(model.named_modules()),
            {id(p): n for n, p in params.items()},
        )


def _resolve(index: _Index, selector: str, what: str) -> set[str]:
    params, modules, by_id = index.params, index.modules, index.by_id
    if selector.startswith("re:"):
        try:
            rx = re.compile(selector[3:])
        except re.error as exc:
            raise TargetError(f"{what} regex {selector!r} is invalid: {exc}.") from exc
        # a regex selects a module's weight (re.match on module names, as llm-compressor does),
        # or any parameter whose full name it matches entirely (e.g. "re:.*q_proj\\.bias")
        hit = {p for p in params if rx.fullmatch(p)}
        for mname, mod in modules.items():
            if mname and rx.match(mname):
                hit |= _weight_name(mod, by_id)
        return hit
    if selector in params:
        return {selector}
    if selector in modules and _weight_name(modules[selector], by_id):
        return _weight_name(modules[selector], by_id)
    by_type: set[str] = set()
    for mod in modules.values():
        if type(mod).__name__ == selector:
            by_type |= _weight_name(mod, by_id)
    if by_type:
        return by_type
    candidates = list(params) + [m for m in modules if m]
    raise TargetError(
        f"{what} {selector!r} matches no parameter, module or module type of {index.model_name}."
        + close_matches(selector, candidates)
        + " Use exact names from model.named_parameters(), a class name like 'Linear', or 're:<regex>'."
    )


def select(
    model: nn.Module,
    targets: str | Sequence[str] | None = None,
    ignore: str | Sequence[str] | None = None,
) -> dict[str, nn.Parameter]:
    """Return ``{name: parameter}`` of the weights to sparsify, in model order.

    Raises :class:`TargetError` for unknown names and when nothing is left to prune.
    """
    index = _Index.of(model)
    params = index.params
    if targets is None:
        heads = excluded_heads(model)
        chosen: set[str] = set()
        for mname, mod in model.named_modules():
            if _default_type(mod) and getattr(mod, "weight", None) is not None:
                pname = f"{mname}.weight" if mname else "weight"
                if pname not in heads and pname in params:
                    chosen.add(pname)
    else:
        chosen = set()
        for sel in _split(targets):
            hit = _resolve(index, sel, "target")
            if not hit:
                raise TargetError(
                    f"target {sel!r} matches nothing in {type(model).__name__}."
                    + close_matches(sel.removeprefix("re:"), params)
                )
            chosen |= hit
    for sel in _split(ignore):
        if sel.startswith("re:"):
            hit = _resolve(index, sel, "ignore")
            if not hit:
                warnings.warn(f"ignore pattern {sel!r} matches nothing", stacklevel=2)
        else:
            hit = _resolve(index, sel, "ignore")
        chosen -= hit
    if not chosen:
        raise TargetError(
            f"{type(model).__name__} has no prunable layers for these settings "
            f"(targets={targets!r}, ignore={ignore!r}). By default sparsetorch prunes the weights of "
            "nn.Linear/nn.Conv layers except embeddings and the LM head; pass targets=[...] to choose."
        )
    return {n: p for n, p in params.items() if n in chosen}
