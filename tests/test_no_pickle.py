"""No pickle anywhere in src/: loading a pickle runs whatever code the file names.

Scans the syntax tree of every module (so docstrings and comments that mention the calls do not
count) and fails naming file and line for:

* ``import pickle`` / ``from pickle import ...`` (also cPickle, dill, cloudpickle, joblib, shelve)
  and any ``pickle.<attr>`` use;
* ``torch.load(...)`` without ``weights_only=True``;
* ``torch.save(...)`` (it writes a pickle: use safetensors / :mod:`sparsetorch.statefile`);
* ``np.load`` / ``numpy.load`` without ``allow_pickle=False``;
* ``pandas.read_pickle`` / ``.to_pickle``, ``torch.jit.load`` of user files, ``marshal.load(s)``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _kw_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value
               for k in call.keywords)


def violations(source: str, filename: str = "<src>") -> list[str]:
    """Every pickle use in ``source`` as ``'file:line: what'``."""
    tree = ast.parse(source, filename=filename)
    found: list[str] = []

    def add(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PICKLE_MODULES:
                    add(node, f"import {a.name}")
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in PICKLE_MODULES:
                add(node, f"from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in PICKLE_MODULES:
            add(node, f"{node.value.id}.{node.attr}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            if name == "torch.load" and not _kw_is(node, "weights_only", True):
                add(node, "torch.load without weights_only=True")
            elif name == "torch.save":
                add(node, "torch.save (writes a pickle; use safetensors or sparsetorch.statefile)")
            elif name in ("np.load", "numpy.load") and not _kw_is(node, "allow_pickle", False):
                add(node, f"{name} without allow_pickle=False")
            elif last in ("read_pickle", "to_pickle"):
                add(node, name)
            elif name in ("torch.jit.load", "marshal.load", "marshal.loads"):
                add(node, name)
            for k in node.keywords:
                if k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is False:
                    add(node, f"{name}(weights_only=False)")
    return found


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle", "import cPickle as p", "from pickle import loads", "import dill",
        "x = pickle.loads(b)", "import torch\ntorch.load(f)", "torch.load(f, weights_only=False)",
        "torch.load(f, map_location='cpu')", "torch.save(obj, f)", "import numpy as np\nnp.load(f)",
        "numpy.load(f, allow_pickle=True)", "df.to_pickle(p)", "pd.read_pickle(p)", "torch.jit.load(p)",
        "f(weights_only=False)",
    ],
)
def test_the_scanner_catches(snippet):
    assert violations(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    ["torch.load(f, weights_only=True)", "np.load(f, allow_pickle=False)",
     '"""torch.load(f) and pickle.loads in a docstring"""', "# import pickle", "self.load(f)",
     "from safetensors.torch import load_file"],
)
def test_the_scanner_allows(snippet):
    assert not violations(snippet), snippet


def test_src_has_no_pickle():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20  # the scan really looks at the package
    found = [v for f in files for v in violations(f.read_text(encoding="utf-8"), str(f.relative_to(SRC.parent)))]
    assert not found, "pickle in src/ (a crafted file would run code):\n" + "\n".join(found)
