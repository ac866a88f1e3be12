"""Datasets for the experiment CLI: Fashion-MNIST (embedded reader), CIFAR-10, image folders, synthetic.

Small datasets are held in memory as uint8/float tensors and augmented on the fly with
batched tensor ops (random crop with padding, horizontal flip), which is much faster on a
few CPU cores than per-image PIL transforms.
"""

from __future__ import annotations

import gzip
import os
import pathlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

DEBIAN_FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


class DataError(RuntimeError):
    """A dataset could not be found or read (the CLI prints it as a one-line error)."""


@dataclass
class TensorData:
    """An in-memory image classification dataset (NCHW float in [0, 1] after :meth:`normalise`)."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    name: str

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_x.shape[-1]


def read_idx(path: pathlib.Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(dims)


def _find_fashion_dir(place: pathlib.Path) -> pathlib.Path | None:
    for sub in (place, place / "FashionMNIST" / "raw", place / "fashion-mnist"):
        if all((sub / f).exists() for f in FASHION_FILES.values()):
            return sub
    return None


def check_data_dir(data_dir: str | None) -> None:
    """A given ``data_dir`` must be an existing directory (:class:`DataError` otherwise)."""
    if data_dir is not None and not pathlib.Path(data_dir).is_dir():
        what = "is not a directory" if pathlib.Path(data_dir).exists() else "does not exist"
        raise DataError(f"data directory {data_dir} {what}")


def load_fashion_mnist(data_dir: str | None = None, download: bool = True) -> TensorData:
    """Fashion-MNIST from ``data_dir`` (which must exist; torchvision's downloader fills it
    when the files are missing). Without ``data_dir``: Debian's ``dataset-fashion-mnist``
    package (``/usr/share/datasets/fashion-mnist``), else torchvision's downloader into ``./data``.
    A given ``data_dir`` is never replaced by another copy of the data."""
    check_data_dir(data_dir)
    place = pathlib.Path(data_dir) if data_dir is not None else DEBIAN_FASHION_MNIST
    where = str(place) if data_dir is not None else f"{DEBIAN_FASHION_MNIST} (no --data-dir)"
    hint = (
        "put the four *-ubyte.gz files there"
        if data_dir is not None
        else "install Debian's dataset-fashion-mnist or pass --data-dir with the *-ubyte.gz files"
    )
    found = _find_fashion_dir(place)
    if found is None and download:
        target = pathlib.Path(data_dir or "data")
        try:
            from torchvision.datasets import FashionMNIST
        except ImportError:
            raise DataError(
                f"Fashion-MNIST not found in {where}, and downloading it needs torchvision "
                f"(pip install 'pwlu[app]'); {hint}"
            ) from None
        try:
            FashionMNIST(str(target), train=True, download=True)
            FashionMNIST(str(target), train=False, download=True)
        except Exception as e:  # noqa: BLE001 - any downloader failure becomes one clear message
            raise DataError(
                f"Fashion-MNIST not found in {where}, and the download into {target} failed "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); {hint}"
            ) from None
        found = _find_fashion_dir(target)
    if found is None:
        raise DataError(f"Fashion-MNIST *-ubyte.gz files not found in {where}")
    arrays = {k: read_idx(found / f) for k, f in FASHION_FILES.items()}
    to_x = lambda a: torch.from_numpy(a.copy()).unsqueeze(1)  # noqa: E731  uint8 N,1,28,28
    return TensorData(
        to_x(arrays["train_images"]),
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        to_x(arrays["test_images"]),
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        10,
        "fashion-mnist",
    )


def load_cifar10(data_dir: str | None, download: bool = True) -> TensorData:
    try:
        from torchvision.datasets import CIFAR10
    except ImportError:
        raise DataError("CIFAR-10 needs torchvision: pip install 'pwlu[app]'") from None
    root = data_dir or "data"
    try:
        train = CIFAR10(root, train=True, download=download)
        test = CIFAR10(root, train=False, download=download)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"CIFAR-10 not available in {root}: {e}") from None
    to_x = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    return TensorData(
        to_x(train.data), torch.tensor(train.targets), to_x(test.data), torch.tensor(test.targets), 10, "cifar10"
    )


def make_synthetic(
    num_train: int = 512, num_test: int = 256, image_size: int = 16, num_classes: int = 4, seed: int = 0
) -> TensorData:
    """A small learnable image task: each class is a noisy oriented pattern (for tests and smoke runs)."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.linspace(-1, 1, image_size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    patterns = torch.stack(
        [torch.sin(3 * ((k % 2) * xx + (1 - k % 2) * yy) * (1 + k // 2) + k) for k in range(num_classes)]
    )

    def split(n):
        labels = torch.randint(0, num_classes, (n,), generator=g)
        images = patterns[labels] + 0.8 * torch.randn(n, image_size, image_size, generator=g)
        images = ((images.clamp(-2, 2) + 2) / 4 * 255).round().to(torch.uint8).unsqueeze(1)
        return images, labels

    tx, ty = split(num_train)
    vx, vy = split(num_test)
    return TensorData(tx, ty, vx, vy, num_classes, "synthetic")


def load_dataset(name: str, data_dir: str | None = None, download: bool = True) -> TensorData:
    """``fashion-mnist``, ``cifar10``, ``synthetic`` (in memory). Image folders: :func:`load_imagefolder`.

    A given ``data_dir`` must be an existing directory, whatever the dataset.
    """
    check_data_dir(data_dir)
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir, download)
    if name == "cifar10":
        return load_cifar10(data_dir, download)
    if name == "synthetic":
        return make_synthetic()
    if name.startswith("imagefolder:"):
        return load_imagefolder(name.split(":", 1)[1])
    raise DataError(f"unknown dataset {name!r}; expected fashion-mnist, cifar10, synthetic or imagefolder:PATH")


def load_imagefolder(path: str, image_size: int = 64) -> TensorData:
    """An ImageNet-layout folder (``train/<class>/*.jpg`` and ``val/<class>/*.jpg``) resized to
    ``image_size`` and held in memory (intended for small subsets on CPU)."""
    root = pathlib.Path(path)
    if not (root / "train").is_dir() or not ((root / "val").is_dir() or (root / "test").is_dir()):
        raise DataError(f"image folder {path} must contain train/ and val/ (or test/) class folders")
    try:
        from torchvision import datasets, transforms
    except ImportError:
        raise DataError("image folders need torchvision: pip install 'pwlu[app]'") from None
    tf = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.PILToTensor()])

    def load(split):
        ds = datasets.ImageFolder(str(root / split), transform=tf)
        xs, ys = zip(*[ds[i] for i in range(len(ds))]) if len(ds) else ((), ())
        return torch.stack(xs), torch.tensor(ys), len(ds.classes)

    tx, ty, nc = load("train")
    vx, vy, _ = load("val" if (root / "val").is_dir() else "test")
    return TensorData(tx, ty, vx, vy, nc, f"imagefolder:{os.path.basename(path)}")


def normalise(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return (x.float() / 255 - mean) / std


def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    xf = x[:10000].float() / 255
    return xf.mean(dim=(0, 2, 3)).reshape(1, -1, 1, 1), xf.std(dim=(0, 2, 3)).reshape(1, -1, 1, 1)


def augment(x: Tensor, generator: torch.Generator, pad: int = 2, flip: bool = True) -> Tensor:
    """Random crop (zero padding ``pad``) and random horizontal flip, batched."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    batch = torch.arange(n).reshape(n, 1, 1, 1)
    chans = torch.arange(x.shape[1]).reshape(1, -1, 1, 1)
    rows = (dy.reshape(n, 1) + torch.arange(h)).reshape(n, 1, h, 1)
    cols = (dx.reshape(n, 1) + torch.arange(w)).reshape(n, 1, 1, w)
    cropped = padded[batch, chans, rows, cols]
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        cropped[mask] = cropped[mask].flip(-1)
    return cropped
