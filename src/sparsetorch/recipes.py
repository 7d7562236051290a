"""YAML recipes: a small, typed configuration layer over the Python API.

A recipe is a mapping with sections; each section is dispatched by name to a builder::

    training:            # or the flat form: method/sparsity/... at the top level
      method: rigl
      sparsity: 0.9
      allocation: erk
      update_every: 100

Built-in section: ``training`` (-> a :class:`~sparsetorch.training.Sparsifier`). Other families
add theirs with :func:`register_section` (e.g. a ``prune:`` section for one-shot pruning).
Unknown sections, unknown keys and unknown method names raise :class:`MethodError` with
close matches.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MethodError, close_matches

SectionBuilder = Callable[[Mapping[str, Any]], Any]
SECTIONS: dict[str, SectionBuilder] = {}
ALIASES = {"train": "training", "sparse_training": "training"}


def register_section(name: str) -> Callable[[SectionBuilder], SectionBuilder]:
    """Decorator registering a builder for a recipe section ``name``."""

    def deco(fn: SectionBuilder) -> SectionBuilder:
        SECTIONS[name] = fn
        return fn

    return deco


def _accepted(cls: type) -> set[str]:
    """Keyword names a method class accepts, following ``**kw`` up the MRO."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        sig = inspect.signature(init)
        names |= {p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            break
    names.discard("self")
    return names


@register_section("training")
def build_training(section: Mapping[str, Any]) -> Any:
    """Build a Sparsifier from ``{method: ..., <constructor arguments>}``."""
    from .training import METHODS, get_method

    if not isinstance(section, Mapping):
        raise MethodError(f"the training section must be a mapping, got {type(section).__name__}.")
    args = dict(section)
    method = args.pop("method", None)
    if method is None:
        raise MethodError("the training section needs 'method:' (e.g. method: rigl).")
    key = str(method).lower().replace("-", "_")
    if key not in METHODS:
        return get_method(key)  # raises the typed error with close matches
    ok = _accepted(METHODS[key])
    for k in args:
        if k not in ok:
            raise MethodError(
                f"unknown key {k!r} for method {key!r}; accepted: {', '.join(sorted(ok))}." + close_matches(k, ok)
            )
    return get_method(key, **args)


@dataclass
class Recipe:
    """The objects a recipe built, by section name (``recipe.training`` is the Sparsifier)."""

    sections: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["sections"][name]
        except KeyError:
            raise AttributeError(name) from None


def recipe_loader() -> type:
    """A SafeLoader without YAML 1.1's base-60 numbers and with exponent-only floats."""
    import yaml

    class RecipeLoader(yaml.SafeLoader):
        pass

    int_tag, float_tag = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
    RecipeLoader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in (int_tag, float_tag)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    RecipeLoader.add_implicit_resolver(
        int_tag,
        re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
        list("-+0123456789"),
    )
    RecipeLoader.add_implicit_resolver(
        float_tag,
        re.compile(r"^(?:[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?|[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?"
                   r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
        list("-+0123456789."),
    )
    return RecipeLoader


def read_yaml(source: str | os.PathLike[str] | Mapping[str, Any], not_mapping: str) -> tuple[dict[str, Any], str | None]:
    """``(mapping, yaml_text)`` from a dict, a YAML file path or a YAML string; ``yaml_text`` is
    None for a dict. Read with :func:`recipe_loader`, so ``pattern: 2:4`` is the string "2:4" and
    ``lr: 1e-4`` a number. :class:`MethodError` for a missing or unreadable file, invalid YAML, or
    a document that is not a mapping (``not_mapping`` is that message)."""
    if isinstance(source, Mapping):
        return dict(source), None
    import yaml

    text = os.fspath(source) if isinstance(source, os.PathLike) else str(source)
    path = Path(text)
    if isinstance(source, os.PathLike) or (len(text) < 4096 and "\n" not in text and path.suffix in (".yaml", ".yml")):
        if not path.is_file():
            raise MethodError(f"recipe file {path} does not exist; pass the path of a YAML recipe.")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise MethodError(f"cannot read the recipe file {path}: {exc}") from None
    try:
        data = yaml.load(text, Loader=recipe_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise MethodError(f"the recipe is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise MethodError(not_mapping)
    return data, text


def read_recipe_source(source: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Read a recipe mapping from a dict, a YAML file path or a YAML string (typed errors)."""
    return read_yaml(source, "a recipe must be a YAML mapping such as 'method: rigl' / 'sparsity: 0.9' on "
                             "separate lines.")[0]


def load_recipe(source: str | os.PathLike[str] | Mapping[str, Any]) -> Recipe:
    """Load a recipe from a YAML path, a YAML string or a dict and build every section."""
    data = read_recipe_source(source)
    if "method" in data:  # flat form: the whole mapping is the training section
        data = {"training": data}
    built: dict[str, Any] = {}
    for name, section in data.items():
        key = ALIASES.get(str(name), str(name))
        builder = SECTIONS.get(key)
        if builder is None:
            raise MethodError(
                f"unknown recipe section {name!r}; available: {', '.join(sorted(SECTIONS))}."
                + close_matches(str(name), SECTIONS)
            )
        built[key] = builder(section)
    return Recipe(built, data)


def sparsifier_from_recipe(source: str | os.PathLike[str] | Mapping[str, Any]) -> Any:
    """Shortcut: the Sparsifier of a recipe's training section."""
    r = load_recipe(source)
    if "training" not in r.sections:
        raise MethodError("the recipe has no training section (method: ...).")
    return r.sections["training"]
