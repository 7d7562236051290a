"""Harvest a site's activations to disk in shards, resumably, and read them back.

Layout of a harvest folder (written only by :func:`harvest`; it carries the library's marker)::

    manifest.json          settings, one entry per finished shard (rows, windows, sums), done flag
    windows.safetensors    the token windows, int32 [n_windows, seq_len] (for contexts in reports)
    shard_00000.safetensors  acts [rows, d] (or [rows, 2, d] for a paired harvest, model A first),
                             window int32 [rows], pos int32 [rows]

Each shard is written atomically and only then listed in the manifest (written atomically too),
so a killed run leaves at most one unlisted temporary; ``resume=True`` continues after the last
listed shard. A listed shard that is truncated or corrupt is refused with a message naming it;
``resume=True`` drops it and everything after it and harvests from there. ``resume=True`` with a
larger token budget (same settings otherwise, the old windows a prefix of the new ones) extends a
finished harvest: the old shards are kept, except a last shard the old budget cut short.

The first ``skip_first`` positions of every window are dropped (position 0 is the attention sink
of every causal LM: its norm is tens of times the others' and an SAE wastes latents on it).
The **scaling statistic** stored beside the activations is the mean squared norm ``E||x||^2`` (and
the mean vector), per model: training divides activations by ``sqrt(E||x||^2 / d)`` so that
``E||x||^2 = d`` whatever the site's scale, and the SAE stores that factor to undo it.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..atomic import MARKER, _write_marker, atomic_path, atomic_write_text, check_output_dir
from ..errors import DataError, DictionaryError
from .sites import Site, parse_site, read_site

MANIFEST = "manifest.json"
WINDOWS = "windows.safetensors"
FORMAT = "sparsetorch-activations"
VERSION = 1
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def corpus_windows(tokenizer: Any, seq_len: int = 512, sources: Sequence[str] = ("embedded", "docs"),
                   seed: int = 0, max_windows: int | None = None) -> Tensor:
    """Training text for dictionaries, never the evaluation half: the calibration half of the
    embedded corpus (``embedded``) and the python3.11-doc fine-tuning sections (``docs``, the
    recovery issue's text), cut into ``seq_len`` windows and shuffled with ``seed``.

    With ``max_windows`` the sources are read in order only until that many windows exist (the
    docs file by file), so a small harvest does not tokenize the whole documentation."""
    from ..data.text import pydoc_topics_split, token_windows
    from ..finetune.lm import docs_files, python_docs_text

    parts: list[Tensor] = []
    have = 0
    for s in sources:
        if max_windows is not None and have >= max_windows:
            break
        if s == "embedded":
            parts.append(token_windows(tokenizer, pydoc_topics_split()[0], seq_len=seq_len))
        elif s == "docs" and max_windows is None:
            parts.append(token_windows(tokenizer, python_docs_text(), seq_len=seq_len))
        elif s == "docs":
            files = docs_files()
            for i in range(0, len(files), 50):  # 50 files at a time until enough windows
                text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files[i:i + 50])
                try:
                    parts.append(token_windows(tokenizer, text, seq_len=seq_len))
                except DataError:  # too short for one window
                    continue
                if sum(len(p) for p in parts) >= max_windows:
                    break
        else:
            raise DictionaryError(f"unknown text source {s!r}; use 'embedded' and/or 'docs'.")
        have = sum(len(p) for p in parts)
    w = torch.cat(parts)
    g = torch.Generator().manual_seed(seed)
    return w[torch.randperm(len(w), generator=g)]


@dataclass
class Manifest:
    """What a harvest folder holds (see the module docstring)."""

    site: str
    d: int
    models: list[str]
    seq_len: int
    skip_first: int
    dtype: str
    windows_per_shard: int
    n_windows: int
    shards: list[dict[str, Any]]
    done: bool = False

    @property
    def paired(self) -> bool:
        return len(self.models) == 2

    @property
    def rows(self) -> int:
        return sum(s["rows"] for s in self.shards)

    def to_json(self) -> str:
        d = {"format": FORMAT, "version": VERSION, **self.__dict__}
        return json.dumps(d, indent=1) + "\n"

    def settings(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("site", "d", "models", "seq_len", "skip_first", "dtype",
                                              "windows_per_shard", "n_windows")}

    def mean_sq_norm(self) -> list[float]:
        """``E||x||^2`` per model over the listed shards."""
        n = max(self.rows, 1)
        m = len(self.models)
        return [sum(s["sum_sq"][j] for s in self.shards) / n for j in range(m)]

    def mean(self) -> Tensor:
        """The mean activation ``[d]`` (``[2, d]`` when paired) over the listed shards."""
        tot = torch.zeros(len(self.models), self.d, dtype=torch.float64)
        for s in self.shards:
            tot += torch.tensor(s["sum"], dtype=torch.float64)
        tot /= max(self.rows, 1)
        return tot[0] if not self.paired else tot

    def scale(self) -> list[float]:
        """Factor per model dividing activations so that ``E||x||^2 = d`` (1.0 before any shard)."""
        return [math.sqrt(v / self.d) if v > 0 else 1.0 for v in self.mean_sq_norm()]


def read_manifest(folder: str | os.PathLike[str]) -> Manifest:
    """The manifest of a harvest folder; DictionaryError when it is missing or not ours."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DictionaryError(
            f"{folder} is not an activation folder (no {MANIFEST}); harvest one with "
            "`sparsetorch sae harvest` or sparsetorch.dictionaries.harvest()."
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.pop("format") != FORMAT:
            raise ValueError("format")
        version = raw.pop("version")
        if version > VERSION:
            raise DictionaryError(f"{path} has format version {version}; this sparsetorch reads up to "
                                  f"{VERSION}. Upgrade sparsetorch.")
        return Manifest(**raw)
    except DictionaryError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise DictionaryError(f"{path} is not a valid activation manifest ({exc}); harvest again.") from None


def _check_shard(folder: Path, i: int, entry: dict[str, Any], d: int, paired: bool) -> None:
    """Raise DictionaryError if shard ``i`` is missing, truncated or not what the manifest says."""
    from safetensors import safe_open

    path = folder / shard_name(i)
    bad = f"{path.name} in {folder} is missing, truncated or corrupt"
    hint = " Run the harvest again with resume=True (`--resume`): it restarts from the last good shard."
    if not path.is_file():
        raise DictionaryError(f"{bad} (no file).{hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            shape = f.get_slice("acts").get_shape()
            nbytes = 8 + int.from_bytes(path.open("rb").read(8), "little")
            for key in f.keys():
                sl = f.get_slice(key)
                nbytes += math.prod(sl.get_shape()) * _itemsize(sl.get_dtype())
    except Exception as exc:  # safetensors raises its own error types for broken headers
        raise DictionaryError(f"{bad} ({exc}).{hint}") from None
    want = [entry["rows"], 2, d] if paired else [entry["rows"], d]
    if list(shape) != want or path.stat().st_size < nbytes:
        raise DictionaryError(f"{bad} (shape {list(shape)}, {path.stat().st_size} bytes; expected {want}, "
                              f"{nbytes} bytes).{hint}")


def _itemsize(dtype: str) -> int:
    return {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I32": 4, "I64": 8, "U8": 1, "BOOL": 1}.get(dtype, 4)


def _new_manifest(settings: dict[str, Any]) -> Manifest:
    return Manifest(**settings, shards=[])


@torch.no_grad()
def harvest(
    model: nn.Module | Sequence[nn.Module],
    windows: Tensor,
    site: str | Site,
    out: str | os.PathLike[str],
    *,
    tokens: int | None = None,
    skip_first: int = 1,
    dtype: str = "float16",
    batch_size: int = 8,
    windows_per_shard: int = 64,
    model_names: Sequence[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> Manifest:
    """Run ``model`` (or a pair ``[model_a, model_b]`` on identical tokens) over ``windows`` up to
    ``site`` and stream the activations to ``out`` in shards.

    ``tokens`` caps the harvested rows (whole windows are taken: ``ceil(tokens / (seq_len -
    skip_first))`` of them; DictionaryError when ``windows`` holds fewer). ``resume=True`` continues
    an interrupted harvest with the same settings, or extends a finished one when ``tokens`` grew;
    without it an existing non-empty ``out`` is
    refused unless ``overwrite``. Returns the final manifest.
    """
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if len(models) not in (1, 2):
        raise DictionaryError(f"harvest takes one model or a pair, got {len(models)}.")
    if dtype not in _DTYPES:
        raise DictionaryError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}.")
    if windows.dim() != 2 or windows.dtype not in (torch.int32, torch.int64):
        raise DictionaryError(f"windows must be an integer tensor [n, seq_len], got {tuple(windows.shape)} "
                              f"{windows.dtype}.")
    seq_len = windows.shape[1]
    if not 0 <= skip_first < seq_len:
        raise DictionaryError(f"skip_first must be in 0..{seq_len - 1} for windows of {seq_len} tokens, "
                              f"got {skip_first}.")
    if batch_size < 1 or windows_per_shard < 1:
        raise DictionaryError("batch_size and windows_per_shard must be at least 1.")
    st = parse_site(site, models[0])
    for m in models[1:]:
        if parse_site(st, m) != st:  # pragma: no cover - parse_site raises first
            raise DictionaryError("the two models differ at the site")
    per_window = seq_len - skip_first
    n_windows = len(windows)
    if tokens is not None:
        if tokens < 1:
            raise DictionaryError(f"tokens must be at least 1, got {tokens}.")
        need = math.ceil(tokens / per_window)
        if need > len(windows):
            raise DictionaryError(
                f"{tokens} tokens need {need} windows of {seq_len} (minus {skip_first} skipped), but only "
                f"{len(windows)} windows ({len(windows) * per_window} tokens) are available; ask for fewer "
                "tokens or give more text."
            )
        n_windows = need
    d = _site_width(models[0], st, windows[:1])
    names = list(model_names) if model_names else [f"model{i}" for i in range(len(models))]
    settings = {"site": str(st), "d": d, "models": names, "seq_len": seq_len, "skip_first": skip_first,
                "dtype": dtype, "windows_per_shard": windows_per_shard, "n_windows": n_windows}
    folder = Path(out).expanduser().absolute()
    man = _open_folder(folder, settings, windows[:n_windows], resume=resume, overwrite=overwrite)
    start = len(man.shards) * windows_per_shard
    t0 = time.time()
    for i in range(len(man.shards), math.ceil(n_windows / windows_per_shard)):
        lo, hi = i * windows_per_shard, min((i + 1) * windows_per_shard, n_windows)
        acts, win, pos = [], [], []
        for b in range(lo, hi, batch_size):
            ids = windows[b:min(b + batch_size, hi)]
            per_model = [read_site(m, st, ids)[:, skip_first:].float().cpu() for m in models]
            x = per_model[0] if len(models) == 1 else torch.stack(per_model, dim=2)
            acts.append(x.reshape(-1, *x.shape[2:]))
            win.append(torch.arange(b, b + len(ids), dtype=torch.int32).repeat_interleave(per_window))
            pos.append(torch.arange(skip_first, seq_len, dtype=torch.int32).repeat(len(ids)))
        a = torch.cat(acts)
        if len(models) == 1:
            sum_sq = [float(a.double().pow(2).sum())]
            sums = [a.double().sum(0).tolist()]
        else:
            sum_sq = [float(a[:, j].double().pow(2).sum()) for j in range(2)]
            sums = [a[:, j].double().sum(0).tolist() for j in range(2)]
        tensors = {"acts": a.to(_DTYPES[dtype]).contiguous(), "window": torch.cat(win), "pos": torch.cat(pos)}
        _save(folder / shard_name(i), tensors)
        man.shards.append({"rows": len(a), "windows": [lo, hi], "sum_sq": sum_sq, "sum": sums})
        man.done = hi >= n_windows
        atomic_write_text(folder / MANIFEST, man.to_json())
        if progress:
            done = hi - start
            rate = done * per_window / max(time.time() - t0, 1e-9)
            print(f"harvest {hi}/{n_windows} windows, {man.rows} rows ({rate:.0f} tok/s)", flush=True)
    if not man.done:  # zero windows left to do (resumed a finished run)
        man.done = True
        atomic_write_text(folder / MANIFEST, man.to_json())
    return man


def _stored_windows(folder: Path) -> Tensor | None:
    """The int32 windows a harvest folder was made from (None when the file is unreadable)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(folder / WINDOWS))["windows"]
    except Exception:  # missing or broken file: the caller refuses to resume
        return None


def _site_width(model: nn.Module, site: Site, ids: Tensor) -> int:
    return int(read_site(model, site, ids[:, :2]).shape[-1])


def _save(path: Path, tensors: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def _open_folder(folder: Path, settings: dict[str, Any], windows: Tensor, *, resume: bool,
                 overwrite: bool) -> Manifest:
    """Create the harvest folder, or reopen it for ``resume`` after checking its shards."""
    if resume and (folder / MANIFEST).is_file():
        man = read_manifest(folder)
        diff = {k: (v, settings[k]) for k, v in man.settings().items() if v != settings[k]}
        grow = set(diff) == {"n_windows"} and settings["n_windows"] > man.n_windows
        if diff and not grow:
            raise DictionaryError(f"cannot resume {folder}: it was harvested with other settings "
                                  f"(folder vs now: {diff}). Use the same settings (a larger token "
                                  "budget is allowed: it extends the harvest) or a new folder.")
        stored = _stored_windows(folder)
        if stored is None or not torch.equal(stored, windows[:len(stored)].to(torch.int32)):
            raise DictionaryError(f"cannot resume {folder}: its token windows are not the ones given now "
                                  "(other text, tokenizer or seed). Harvest into a new folder.")
        if grow:  # a larger budget: the old windows are a prefix of the new ones
            if man.shards and man.shards[-1]["windows"][1] - man.shards[-1]["windows"][0] < man.windows_per_shard:
                man.shards = man.shards[:-1]  # the old last shard was cut short by the old budget
            man.n_windows = settings["n_windows"]
            _save(folder / WINDOWS, {"windows": windows.to(torch.int32).contiguous()})
        good = 0
        for i, entry in enumerate(man.shards):
            try:
                _check_shard(folder, i, entry, man.d, man.paired)
            except DictionaryError:
                break
            good += 1
        for i in range(good, len(man.shards) + 1):  # drop what follows the last good shard
            p = folder / shard_name(i)
            if p.exists():
                p.unlink()
        man.shards = man.shards[:good]
        man.done = False
        atomic_write_text(folder / MANIFEST, man.to_json())
        return man
    check_output_dir(folder, overwrite=overwrite)
    if folder.exists() and overwrite and any(folder.iterdir()):
        import shutil

        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_marker(folder)
    _save(folder / WINDOWS, {"windows": windows.to(torch.int32).contiguous()})
    man = _new_manifest(settings)
    atomic_write_text(folder / MANIFEST, man.to_json())
    return man


def within(x: Tensor, max_norm: float | Sequence[float]) -> Tensor:
    """Rows of ``x`` ([N, d], or [N, 2, d] with one bound per model) whose norms are within the bound."""
    lim = torch.as_tensor(max_norm, dtype=torch.float32).reshape(-1)
    norms = x.float().norm(dim=-1)
    ok = norms <= (lim if norms.dim() > 1 else lim[0])
    return ok.reshape(len(x), -1).all(1)


class ActivationStore:
    """Read a harvest folder: shards by index, shuffled float32 batches, the scaling statistic."""

    def __init__(self, folder: str | os.PathLike[str], *, require_done: bool = True) -> None:
        self.folder = Path(folder).expanduser()
        self.manifest = read_manifest(self.folder)
        if require_done and not self.manifest.done:
            raise DictionaryError(
                f"the harvest in {self.folder} is unfinished ({len(self.manifest.shards)} shards); finish it with "
                "resume=True (`--resume`) before training on it."
            )
        if not (self.folder / MARKER).exists():
            raise DictionaryError(f"{self.folder} lacks the sparsetorch marker; it was not written by harvest().")

    @property
    def d(self) -> int:
        return self.manifest.d

    @property
    def rows(self) -> int:
        return self.manifest.rows

    def __len__(self) -> int:
        return len(self.manifest.shards)

    def shard(self, i: int) -> dict[str, Tensor]:
        """Shard ``i`` as tensors (``acts`` in float32); DictionaryError when it is truncated."""
        from safetensors.torch import load_file

        _check_shard(self.folder, i, self.manifest.shards[i], self.d, self.manifest.paired)
        t = load_file(str(self.folder / shard_name(i)))
        t["acts"] = t["acts"].float()
        return t

    def windows(self) -> Tensor:
        from safetensors.torch import load_file

        return load_file(str(self.folder / WINDOWS))["windows"].long()

    def sink_norm(self, factor: float | None) -> list[float] | None:
        """``factor`` times the RMS norm ``sqrt(E||x||^2)`` per model: rows above it are sink tokens
        (None when ``factor`` is None)."""
        if factor is None:
            return None
        if not factor > 1:
            raise DictionaryError(f"the sink-token factor must be > 1 (or None to keep every token), got {factor}.")
        return [factor * math.sqrt(v) for v in self.manifest.mean_sq_norm()]

    def batches(self, batch_size: int, *, seed: int = 0, epochs: float = 1.0,
                shards: Sequence[int] | None = None, max_norm: float | Sequence[float] | None = None
                ) -> Iterator[Tensor]:
        """Shuffled float32 batches ``[batch_size, d]`` (``[batch, 2, d]`` paired): shards in a seeded
        order, rows shuffled within a buffer of two shards; a last partial batch is dropped. Rows
        whose norm exceeds ``max_norm`` (per model when paired) are left out; the stream wraps
        around into the next epoch to fill the batches."""
        idx = list(range(len(self)) if shards is None else shards)
        g = torch.Generator().manual_seed(seed)
        total = int(epochs * sum(self.manifest.shards[i]["rows"] for i in idx))
        sent = 0
        buf: Tensor | None = None
        ep = 0
        while sent + batch_size <= total:
            order = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
            for k in range(0, len(order), 2):
                parts = [self.shard(i)["acts"] for i in order[k:k + 2]]
                new = torch.cat(parts)
                if max_norm is not None:
                    new = new[within(new, max_norm)]
                buf = new if buf is None else torch.cat([buf, new])
                buf = buf[torch.randperm(len(buf), generator=g)]
                while len(buf) >= batch_size and sent + batch_size <= total:
                    yield buf[:batch_size]
                    buf = buf[batch_size:]
                    sent += batch_size
                if sent + batch_size > total:
                    return
            ep += 1
