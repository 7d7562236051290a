"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (gzip IDX files), read with numpy.

Files: ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``,
``t10k-labels-idx1-ubyte.gz`` (uncompressed copies without ``.gz`` also work). Searched in
``data_dir`` only when given, else ``$SPARSETORCH_FASHION_MNIST``, then ``/usr/share/datasets/fashion-mnist``.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError

DEFAULT_DIRS = ("/usr/share/datasets/fashion-mnist",)
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MEAN, STD = 0.2860, 0.3530
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _candidates(data_dir: str | os.PathLike[str] | None) -> list[Path]:
    if data_dir is not None:
        return [Path(data_dir)]  # an explicit folder is the only place looked at
    out = []
    env = os.environ.get("SPARSETORCH_FASHION_MNIST")
    if env:
        out.append(Path(env))
    out += [Path(d) for d in DEFAULT_DIRS]
    return out


def _find(stem: str, data_dir: str | os.PathLike[str] | None) -> Path:
    for d in _candidates(data_dir):
        for name in (stem + ".gz", stem):
            if (d / name).is_file():
                return d / name
    where = ", ".join(str(d) for d in _candidates(data_dir))
    raise DataError(
        f"Fashion-MNIST file {stem}(.gz) not found in: {where}. Install the Debian package with "
        "'apt-get install dataset-fashion-mnist' (or run 'make'), or pass --data-dir DIR "
        "(data_dir=...) pointing at a folder with the four IDX files."
    )


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {p}: {exc}. The file may be truncated; reinstall dataset-fashion-mnist.") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{p} is not an IDX file (bad magic number).")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise DataError(f"{p}: unsupported IDX element type 0x{dtype_code:02x} (expected unsigned byte).")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) if dims else 0
    if len(data) - offset != expected:
        raise DataError(f"{p}: expected {expected} bytes of data for shape {dims}, found {len(data) - offset}.")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def load_fashion_mnist(
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    subset: int | None = None,
    normalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """Images ``[N, 1, 28, 28]`` float32 (normalised with the train mean/std) and int64 labels.

    ``subset`` keeps the first N examples (the files are already shuffled).
    """
    if split not in _FILES:
        raise DataError(f"split must be 'train' or 'test', got {split!r}.")
    img_stem, lab_stem = _FILES[split]
    images = read_idx(_find(img_stem, data_dir))
    labels = read_idx(_find(lab_stem, data_dir))
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels.")
    if subset is not None:
        if subset < 1:
            raise DataError(f"subset must be a positive number of examples, got {subset}.")
        images, labels = images[:subset], labels[:subset]
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    if normalize:
        x = (x - MEAN) / STD
    return x, torch.from_numpy(labels.astype(np.int64))
