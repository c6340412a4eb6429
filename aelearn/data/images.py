"""Small real images and the user's own: tensors, .pt files, image folders, MNIST-format IDX files.

Every dataset here holds its images in memory and gives items ``(image [C, H, W] float32 in [0, 1],
label)``, ``label`` a 0-d int64 tensor: the class, or −1 where the data has none. Images loaded as
uint8 (PNG, IDX) stay uint8 in memory, four times smaller than float32, and are divided by 255
batch by batch; a DataLoader fetches a batch with one indexing through :meth:`TensorImages.__getitems__`.
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from aelearn.data.factors import check_integer_tensor, item_index

NO_LABEL = -1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _as_tensor(value, name: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(value).__name__}")
    return value


class TensorImages(Dataset):
    """Images from tensors or a ``.pt`` file.

    Args:
        images: ``[N, C, H, W]`` or ``[N, H, W]`` (one channel): uint8 (divided by 255), bool, or
            floating with values in [0, 1]; or the path of a ``.pt`` file (``torch.save``) holding
            such a tensor, an ``(images, labels)`` pair, or a dict with ``"images"`` and optionally
            ``"labels"`` (read with ``weights_only=True``).
        labels: ``[N]`` integer class of each image, or None (every label −1).

    Attributes: ``labels [N]`` int64, ``observation_shape (C, H, W)``, ``classes`` (names of the
    label values where known, else None).
    """

    classes: tuple[str, ...] | None = None

    def __init__(self, images, labels=None):
        if isinstance(images, (str, Path)):
            images, labels = self._load(Path(images), labels)
        images = _as_tensor(images, "images")
        if images.dim() == 3:
            images = images[:, None]
        if images.dim() != 4:
            raise ValueError(f"images must be [N, C, H, W] or [N, H, W], got shape {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            self._divisor = 255
        elif images.dtype == torch.bool or images.dtype.is_floating_point:
            images = images.float()
            in_range = bool(images.isfinite().all()) and 0 <= float(images.min()) and float(images.max()) <= 1
            if images.numel() and not in_range:
                raise ValueError("images: floating values must be finite and lie in [0, 1] (divide uint8-range data by 255)")
            self._divisor = 1
        else:
            raise TypeError(f"images must be uint8, bool or floating, got {images.dtype}")
        self.images = images.contiguous()
        self.labels = self._check_labels(labels, len(images))
        self.observation_shape = tuple(images.shape[1:])

    @staticmethod
    def _load(path: Path, labels):
        if not path.is_file():
            raise ValueError(f"images: no file {str(path)!r}")
        content = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(content, dict):
            if "images" not in content:
                keys = ", ".join(map(str, content))
                raise ValueError(f"images: the dict in {str(path)!r} has no key 'images' (keys: {keys})")
            content = (content["images"], content.get("labels"))
        if isinstance(content, (tuple, list)):
            if len(content) != 2:
                raise ValueError(
                    f"images: {str(path)!r} must hold a tensor, (images, labels) or a dict; got a sequence of {len(content)}"
                )
            if labels is not None and content[1] is not None:
                raise ValueError(f"labels: {str(path)!r} holds labels already")
            return content[0], content[1] if labels is None else labels
        return content, labels

    @staticmethod
    def _check_labels(labels, n: int) -> torch.Tensor:
        if labels is None:
            return torch.full((n,), NO_LABEL, dtype=torch.int64)
        labels = _as_tensor(labels, "labels")
        check_integer_tensor(labels, "labels", ndim=1)
        if len(labels) != n:
            raise ValueError(f"labels must have one entry per image ({n}), got {len(labels)}")
        return labels.long().contiguous()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self._fetch(item_index([index], len(self)))
        return images[0], labels[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The batch ``indices`` in one indexing, as the ``(image, label)`` pairs ``collate_fn`` expects."""
        images, labels = self._fetch(item_index(indices, len(self)))
        return list(zip(images.unbind(0), labels.unbind(0)))

    def _fetch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.images[index].float()
        if self._divisor != 1:
            images.div_(self._divisor)
        return images, self.labels[index]


class Digits(TensorImages):
    """scikit-learn's 8 × 8 handwritten digits (1,797 images, UCI optical digits), labels 0–9.

    Args:
        size: side of the images; None keeps 8 × 8, a larger side upsamples with ``mode``.
        mode: ``"nearest"`` (exact pixel blocks when ``size`` is a multiple of 8), ``"bilinear"`` or
            ``"bicubic"`` (clamped back to [0, 1]).

    Needs ``pip install scikit-learn`` (the data ships inside the package, no download).
    """

    classes = tuple("0123456789")
    MODES = ("nearest", "bilinear", "bicubic")

    def __init__(self, size: int | None = None, mode: str = "bilinear"):
        try:
            from sklearn.datasets import load_digits
        except ImportError as error:
            raise ImportError("Digits needs scikit-learn: pip install scikit-learn") from error
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 8):
            raise ValueError(f"size must be None or an int ≥ 8, got {size!r}")
        digits = load_digits()
        # Pixel values are counts 0–16 of the 32 × 32 bitmap's 4 × 4 blocks.
        images = torch.from_numpy(digits.images).float()[:, None] / 16
        if size is not None and size != 8:
            align = {} if mode == "nearest" else {"align_corners": False}
            images = F.interpolate(images, size=(size, size), mode=mode, **align).clamp_(0, 1)
        super().__init__(images, torch.from_numpy(digits.target))


class ImageFolder(TensorImages):
    """Every image file in a local folder, loaded once with Pillow into a uint8 tensor.

    Layout: images in subfolders ``root/<class>/…`` get the class's position among the sorted
    subfolder names as label (``classes`` holds the names); images directly in ``root`` get −1.
    Files are read in sorted order; suffixes: PNG, JPEG, BMP, GIF (first frame), TIFF, WebP.

    Args:
        root: the folder.
        size: ``H`` or ``(H, W)`` to resize every image to (bilinear); None requires one common size.
        channels: 1 (grey, Pillow's mode "L") or 3 (RGB); an alpha channel is dropped.

    Needs ``pip install Pillow``.
    """

    def __init__(self, root, size: int | tuple[int, int] | None = None, channels: int = 3):
        try:
            from PIL import Image
        except ImportError as error:
            raise ImportError("ImageFolder needs Pillow: pip install Pillow") from error
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"root: no folder {str(root)!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        if isinstance(size, int) and not isinstance(size, bool):
            size = (size, size)
        valid_size = isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)
        if size is not None and not valid_size:
            raise ValueError(f"size must be None, an int or (H, W) of positive ints, got {size!r}")

        def images_in(folder: Path) -> list[Path]:
            return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and images_in(p))
        files = [(path, NO_LABEL) for path in images_in(root)]
        files += [(path, label) for label, name in enumerate(classes) for path in images_in(root / name)]
        if not files:
            raise ValueError(f"root: no image files ({', '.join(IMAGE_SUFFIXES)}) in {str(root)!r} or its subfolders")
        arrays = []
        for path, _ in files:
            with Image.open(path) as image:
                image = image.convert("L" if channels == 1 else "RGB")
                if size is not None:
                    image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                arrays.append(np.asarray(image).reshape(image.height, image.width, channels))
            if arrays[-1].shape != arrays[0].shape:
                raise ValueError(
                    f"{str(path)!r} is {arrays[-1].shape[1]}×{arrays[-1].shape[0]}, {str(files[0][0])!r} is "
                    f"{arrays[0].shape[1]}×{arrays[0].shape[0]}: pass size= to resize them to one size"
                )
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        self.classes = tuple(classes)
        self.files = tuple(path for path, _ in files)
        super().__init__(images, torch.tensor([label for _, label in files], dtype=torch.int64))


# IDX type codes (third byte of the magic number) and their big-endian numpy types.
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> torch.Tensor:
    """The array in an IDX file (the MNIST format: LeCun et al.), gzip-compressed or not.

    Layout: two zero bytes, a type code, the number of dimensions d, then d big-endian int32 sizes,
    then the data in big-endian row-major order. Returns a CPU tensor of the sizes, in native
    byte order (uint8 for MNIST).
    """
    path = Path(path)
    with open(path, "rb") as file:
        raw = file.read()
    # Compressed or not is told by gzip's magic bytes, not by the file name.
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in IDX_TYPES:
        raise ValueError(f"{str(path)!r} is not an IDX file (magic number {raw[:4].hex() or 'missing'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{str(path)!r}: IDX header truncated")
    sizes = tuple(int(s) for s in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    dtype = np.dtype(IDX_TYPES[raw[2]])
    expected = header + math.prod(sizes) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{str(path)!r}: sizes {sizes} need {expected} bytes, the file has {len(raw)}")
    data = np.frombuffer(raw, dtype, count=math.prod(sizes), offset=header)
    return torch.from_numpy(data.astype(dtype.newbyteorder("="))).reshape(sizes)


class IDXImages(TensorImages):
    """MNIST-format IDX files from a local path (MNIST, Fashion-MNIST, KMNIST, EMNIST …).

    Args:
        path: an images file (``[N, H, W]`` or ``[N, H, W, C]``), or a folder holding the standard
            names ``<prefix>-images-idx3-ubyte`` (or ``.idx3-ubyte``), optionally ``.gz``, where the
            prefix is ``train`` or ``t10k`` according to ``split``; the matching labels file is then
            picked up when present.
        labels: the labels file (``[N]``), or None (the folder's labels file, else every label −1).
        split: ``"train"`` or ``"test"``, for a folder ``path``.
    """

    SPLITS = {"train": "train", "test": "t10k"}

    def __init__(self, path, labels=None, split: str = "train"):
        if split not in self.SPLITS:
            raise ValueError(f"split must be one of {', '.join(self.SPLITS)}, got {split!r}")
        path = Path(path)
        if path.is_dir():
            prefix = self.SPLITS[split]
            images_file = self._find(path, f"{prefix}-images", "idx3-ubyte")
            if images_file is None:
                raise ValueError(f"path: no {prefix}-images-idx3-ubyte[.gz] in the folder {str(path)!r}")
            if labels is None:
                labels = self._find(path, f"{prefix}-labels", "idx1-ubyte")
            path = images_file
        elif not path.is_file():
            raise ValueError(f"path: no file or folder {str(path)!r}")
        images = read_idx(path)
        if images.dim() == 4:
            images = images.permute(0, 3, 1, 2)
        elif images.dim() != 3:
            raise ValueError(
                f"path: {str(path)!r} holds an array of shape {tuple(images.shape)}, not images [N, H, W] or [N, H, W, C]"
            )
        if images.dtype not in (torch.uint8, torch.float32, torch.float64):
            raise ValueError(f"path: {str(path)!r} holds {images.dtype} values; images must be uint8 or floating")
        if labels is not None:
            labels = read_idx(labels)
        super().__init__(images, labels)

    @staticmethod
    def _find(folder: Path, stem: str, kind: str) -> Path | None:
        for separator in ("-", "."):
            for suffix in ("", ".gz"):
                candidate = folder / f"{stem}{separator}{kind}{suffix}"
                if candidate.is_file():
                    return candidate
        return None
