"""Discrete image data: IDX files (MNIST / Fashion-MNIST), sklearn digits, dequantization."""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FASHION_MNIST_ROOT",
    "ImageData",
    "dequantize",
    "load_digits",
    "load_fashion_mnist",
    "load_idx_dir",
    "read_idx",
    "split_off",
]

PathLike = str | os.PathLike[str]

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
_GZIP_MAGIC = b"\x1f\x8b"
# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
DIGITS_SPLIT_SEED = 0
DIGITS_SPLIT_SIZES = (180, 180)  # (val, test); the remaining 1437 images are train


@dataclass
class ImageData:
    """Integer-valued images with labels.

    Attributes:
        images: Integer tensor of shape ``(N, C, H, W)`` with values in ``[0, levels - 1]``.
        labels: int64 tensor of shape ``(N,)``.
        levels: Number of intensity levels (256 for 8-bit images, 17 for sklearn digits).
    """

    images: Tensor
    labels: Tensor
    levels: int

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def dims(self) -> int:
        """Number of dimensions ``C * H * W`` of one image."""
        return int(np.prod(self.images.shape[1:]))

    def subset(self, index: Tensor) -> ImageData:
        """The images (and labels) selected by an index tensor."""
        return ImageData(self.images[index], self.labels[index], self.levels)


def split_off(data: ImageData, n: int, seed: int = 0) -> tuple[ImageData, ImageData]:
    """Carve ``n`` random images off ``data`` (e.g. a validation set off a training set).

    The permutation is ``torch.randperm(len(data))`` from a CPU generator seeded with
    ``seed``; the first ``n`` indices form the second returned set.

    Returns:
        ``(rest, carved)`` with ``len(carved) == n``; both keep the original order.
    """
    if not 0 <= n <= len(data):
        raise ValueError(f"cannot split off {n} of {len(data)} images")
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    carved, rest = perm[:n].sort().values, perm[n:].sort().values
    return data.subset(rest), data.subset(carved)


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or not.

    Compression is detected from the gzip magic bytes, not the file name. The header is
    two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a
    big-endian uint32; the big-endian data follows and must have exactly that size.

    Returns:
        An array in native byte order with the stored shape.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: On a bad magic number, unknown type code or a size mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path}: corrupt gzip data ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'})")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX data type code 0x{code:02x}")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path}: IDX data size mismatch: header says shape {shape} of {dtype.name} "
            f"({expected} bytes in all), file has {len(raw)} bytes"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _find_idx(directory: Path, prefixes: tuple[str, ...], kind: str, rank: int) -> Path:
    """Locate e.g. ``train-images-idx3-ubyte`` (also ``.idx3-ubyte`` and ``.gz`` variants)."""
    names = [
        f"{p}-{kind}{sep}idx{rank}-ubyte{gz}" for p in prefixes for sep in ("-", ".") for gz in (".gz", "")
    ]
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"no {kind} file in {directory} (looked for {', '.join(names[:2])}, ...)")


def load_idx_dir(directory: PathLike, split: str = "train", levels: int = 256) -> ImageData:
    """Load MNIST-style IDX images and labels from a directory.

    Looks for ``train-images-idx3-ubyte[.gz]`` / ``train-labels-idx1-ubyte[.gz]``
    (``split='train'``) or the ``t10k-`` (also ``test-``) files (``split='test'``);
    ``-images.idx3-ubyte`` spellings are accepted too.

    Returns:
        :class:`ImageData` with uint8 images of shape ``(N, 1, H, W)``.

    Raises:
        FileNotFoundError: If the directory or a file is missing.
        ValueError: On an unknown split or inconsistent files.
    """
    directory = Path(directory)
    prefixes = {"train": ("train",), "test": ("t10k", "test")}.get(split)
    if prefixes is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not directory.is_dir():
        raise FileNotFoundError(f"no such directory: {directory}")
    img_path = _find_idx(directory, prefixes, "images", 3)
    lab_path = _find_idx(directory, prefixes, "labels", 1)
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{img_path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{lab_path}: expected {images.shape[0]} labels, got shape {labels.shape}")
    return ImageData(
        torch.from_numpy(images[:, None].copy()), torch.from_numpy(labels.astype(np.int64)), levels
    )


def load_fashion_mnist(split: str = "train", root: PathLike | None = None) -> ImageData:
    """Fashion-MNIST (60000 train / 10000 test images, 1x28x28, 256 levels).

    Args:
        split: ``'train'`` or ``'test'`` (the official split; carve a validation set off
            the training set with :func:`split_off`).
        root: Directory of IDX files; defaults to :data:`FASHION_MNIST_ROOT`, where the
            Debian package ``dataset-fashion-mnist`` installs them.

    Raises:
        FileNotFoundError: If the files are missing, with installation instructions.
    """
    directory = Path(root) if root is not None else FASHION_MNIST_ROOT
    try:
        return load_idx_dir(directory, split)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"Fashion-MNIST not found ({exc}). Install it with "
            "`apt-get install -y dataset-fashion-mnist` or pass root= a directory of IDX files "
            "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-...)."
        ) from exc


def load_digits(split: str = "all") -> ImageData:
    """The 1797 8x8 handwritten digits shipped with scikit-learn (17 levels, 0..16).

    The digits have no official split; ``split`` selects a fixed one: a
    :func:`split_off` with seed :data:`DIGITS_SPLIT_SEED` carves 180 test images, a second
    one (same seed) carves 180 validation images off the rest, leaving 1437 for training.

    Args:
        split: ``'all'`` (1797), ``'train'`` (1437), ``'val'`` (180) or ``'test'`` (180).

    Raises:
        ImportError: If scikit-learn is not installed.
    """
    if split not in ("all", "train", "val", "test"):
        raise ValueError(f"split must be 'all', 'train', 'val' or 'test', got {split!r}")
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as exc:
        raise ImportError("load_digits needs scikit-learn: pip install scikit-learn") from exc
    bunch = _sk_load_digits()
    images = torch.from_numpy(np.asarray(bunch.images).round().astype(np.uint8)[:, None])
    data = ImageData(images, torch.from_numpy(np.asarray(bunch.target, dtype=np.int64)), levels=17)
    if split == "all":
        return data
    n_val, n_test = DIGITS_SPLIT_SIZES
    rest, test = split_off(data, n_test, DIGITS_SPLIT_SEED)
    train, val = split_off(rest, n_val, DIGITS_SPLIT_SEED)
    return {"train": train, "val": val, "test": test}[split]


def dequantize(x_int: Tensor, levels: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantization ``y = (x_int + u) / levels`` with ``u ~ U[0, 1)``.

    Args:
        x_int: Integer tensor with values in ``[0, levels - 1]``.
        levels: Number of discrete levels (e.g. 256).
        generator: Optional generator for ``u`` (on ``x_int``'s device).

    Returns:
        float32 tensor of ``x_int``'s shape with values in ``[0, 1)`` (float32 rounding
        could otherwise produce exactly 1.0, so values are clamped just below 1).

    Raises:
        TypeError: If ``x_int`` is not an integer tensor.
        ValueError: If ``levels < 1`` or a value lies outside ``[0, levels - 1]``.

    References:
        Theis, van den Oord & Bethge, "A note on the evaluation of generative models", 2016.
    """
    if x_int.dtype.is_floating_point or x_int.dtype.is_complex or x_int.dtype == torch.bool:
        raise TypeError(f"dequantize expects an integer tensor, got dtype {x_int.dtype}")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    if x_int.numel():
        lo, hi = int(x_int.min()), int(x_int.max())
        if lo < 0 or hi > levels - 1:
            raise ValueError(f"values must lie in [0, {levels - 1}] for levels={levels}, found [{lo}, {hi}]")
    u = torch.rand(x_int.shape, generator=generator, device=x_int.device, dtype=torch.float32)
    y = (x_int.to(torch.float32) + u) / levels
    return y.clamp_(max=float(np.nextafter(np.float32(1.0), np.float32(0.0))))
