"""CIFAR-10/100 as in-memory tensors, batch-level augmentation, synthetic data, and
character-level text (Tiny Shakespeare or any plain-text file) as windows of token ids.

Looked up, in order: the ``data_dir`` argument (``--data-dir``), ``$MUPP_DATA_DIR``, the user
cache (``$XDG_CACHE_HOME/mupp`` or ``~/.cache/mupp``).  In each directory mupp accepts the
standard python layout (``cifar-10-batches-py/``, ``cifar-100-python/``, as torchvision
downloads it) and, for CIFAR-10, ``cifar10.npz`` (arrays ``x_train, y_train, x_test, y_test``,
uint8 HWC images).  ``download=True`` fetches the official archive into the first directory searched, checks its
MD5 and unpacks it.  Tiny Shakespeare is ``tinyshakespeare/input.txt`` in the same directories
(checked against its SHA-256); ``text_file`` names any other corpus.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATASETS = ("cifar10", "cifar100", "synthetic", "tinyshakespeare")
# character-level corpora: (download URL, SHA-256 of the file, its path in a data directory)
TEXT_CORPORA = {
    "tinyshakespeare": (
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        "tinyshakespeare/input.txt",
    ),
}
TRAIN_FRACTION = 0.9  # text: the first 90% trains, the last 10% validates (nanoGPT's split)
_ARCHIVES = {
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py",
    ),
    "cifar100": (
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python",
    ),
}
# standard per-channel statistics of the CIFAR training sets
MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "synthetic": 10}


def is_text(name: str) -> bool:
    """Whether the dataset is a character-level corpus (token windows, not images)."""
    return name in TEXT_CORPORA


@dataclass
class Split:
    """One split: images ``x`` uint8 (N, 3, 32, 32) with labels ``y`` int64 (N,), or text
    windows ``x`` int64 (N, T) with their next characters ``y`` int64 (N, T)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Dataset:
    """A dataset's train and test splits, its name and class count; ``test_exact`` marks the
    test images known to be exact CIFAR-10 images (the first 1000, see the dataset README)."""

    name: str
    train: Split
    test: Split
    num_classes: int
    source: str
    test_exact: torch.Tensor | None = None  # bool (N_test,): images known to be bit-exact
    vocab: str | None = None  # text: the characters, in token-id order


def search_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched, in order."""
    dirs = []
    if data_dir is not None:
        dirs.append(Path(data_dir))
    if os.environ.get("MUPP_DATA_DIR"):
        dirs.append(Path(os.environ["MUPP_DATA_DIR"]))
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mupp"
    dirs.append(cache)
    return dirs


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _from_batches(files: list[Path], label_key: bytes) -> Split:
    xs, ys = [], []
    for f in files:
        d = _unpickle(f)
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    return Split(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))


def _load_python_layout(name: str, root: Path) -> Dataset | None:
    folder = root / _ARCHIVES[name][2]
    if name == "cifar10":
        train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
        test_files = [folder / "test_batch"]
        key = b"labels"
    else:
        train_files, test_files, key = [folder / "train"], [folder / "test"], b"fine_labels"
    if not all(f.exists() for f in train_files + test_files):
        return None
    return Dataset(
        name,
        _from_batches(train_files, key),
        _from_batches(test_files, key),
        NUM_CLASSES[name],
        str(folder),
    )


def _load_npz(root: Path) -> Dataset | None:
    path = root / "cifar10.npz"
    if not path.exists():
        return None
    try:
        z = np.load(path, allow_pickle=False)
        arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"{path} is not a readable npz archive ({type(e).__name__}: {e}); it may be "
            "truncated: download it again (mupp data download cifar10 --data-dir DIR)"
        ) from None
    missing = {"x_train", "y_train", "x_test", "y_test"} - set(arrays)
    if missing:
        raise ValueError(f"{path}: missing arrays {sorted(missing)}")

    def split(xk: str, yk: str) -> Split:
        x, y = arrays[xk], arrays[yk]
        if x.dtype != np.uint8:
            raise ValueError(f"{path}: {xk} must be uint8 images (0-255); got dtype {x.dtype}")
        if x.ndim != 4 or (x.shape[1:] != (32, 32, 3) and x.shape[1:] != (3, 32, 32)):
            raise ValueError(
                f"{path}: {xk} must have shape (N, 32, 32, 3) or (N, 3, 32, 32); got {x.shape}"
            )
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(
                f"{path}: {yk} must hold one label per image ({len(x)}); got shape {y.shape}"
            )
        if not np.issubdtype(y.dtype, np.integer) or (len(y) and (y.min() < 0 or y.max() > 9)):
            raise ValueError(f"{path}: {yk} must be integer labels in 0..9")
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if x.shape[-1] == 3 else x
        return Split(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))

    exact = arrays.get("test_is_lossless")
    return Dataset(
        "cifar10",
        split("x_train", "y_train"),
        split("x_test", "y_test"),
        10,
        str(path),
        None if exact is None else torch.from_numpy(exact),
    )


def download_archive(name: str, root: str | os.PathLike) -> Path:
    """Fetch the official archive of ``name`` into ``root``, verify its MD5, unpack it."""
    if name not in _ARCHIVES:
        raise ValueError(f"name must be one of {tuple(_ARCHIVES)}; got {name!r}")
    url, md5, _ = _ARCHIVES[name]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / url.rsplit("/", 1)[1]
    if not archive.exists():
        tmp = archive.with_suffix(".part")
        urllib.request.urlretrieve(url, tmp)  # noqa: S310 - fixed https URL
        tmp.rename(archive)
    digest = hashlib.md5(archive.read_bytes()).hexdigest()
    if digest != md5:
        archive.unlink()
        raise OSError(
            f"{archive}: MD5 {digest} does not match the official {md5}; removed, try again"
        )
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    return root


def load(
    name: str = "cifar10",
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    synthetic_size: tuple[int, int] = (2048, 512),
    seed: int = 0,
    *,
    block_size: int = 64,
    text_file: str | os.PathLike | None = None,
) -> Dataset:
    """Load a dataset into memory (uint8 images; see :func:`normalize`).  ``download=True``
    fetches the official archive when it is found nowhere (needs a network).  A text corpus
    comes as windows of ``block_size`` characters (:func:`load_text`; ``text_file``: any
    plain-text file instead of the named corpus)."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}; got {name!r}")
    if is_text(name):
        return load_text(
            name, data_dir, block_size=block_size, text_file=text_file, download=download
        )
    if name == "synthetic":
        return synthetic(*synthetic_size, seed=seed)
    dirs = search_dirs(data_dir)
    for root in dirs:
        ds = _load_python_layout(name, root)
        if ds is None and name == "cifar10":
            ds = _load_npz(root)
        if ds is not None:
            return ds
    if download:
        return load(name, download_archive(name, dirs[0]))
    places = "\n  ".join(str(d) for d in dirs)
    raise FileNotFoundError(
        f"{name} not found. Searched (python layout '{_ARCHIVES[name][2]}/'"
        + (" or cifar10.npz" if name == "cifar10" else "")
        + f") in:\n  {places}\nDownload it with: mupp data download {name} --data-dir DIR"
    )


def find_text(name: str, data_dir: str | os.PathLike | None = None, download: bool = False) -> Path:
    """The corpus file of ``name`` in the searched directories (downloaded into the first
    one with ``download=True``); ``FileNotFoundError`` lists every place searched."""
    url, _, rel = TEXT_CORPORA[name]
    dirs = search_dirs(data_dir)
    for root in dirs:
        if (root / rel).is_file():
            return root / rel
    if download:
        return download_text(name, dirs[0])
    places = "\n  ".join(str(d) for d in dirs)
    raise FileNotFoundError(
        f"{name} not found. Searched ({rel}) in:\n  {places}\nDownload it with: mupp data "
        f"download {name} --data-dir DIR, or name any plain-text file with text_file=PATH"
    )


def download_text(name: str, root: str | os.PathLike) -> Path:
    """Fetch a text corpus into ``root`` and check its SHA-256 (needs a network)."""
    url, sha256, rel = TEXT_CORPORA[name]
    path = Path(root) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    urllib.request.urlretrieve(url, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    if digest != sha256:
        tmp.unlink()
        raise ValueError(f"{name}: downloaded file has SHA-256 {digest}, expected {sha256}")
    tmp.replace(path)
    return path


def load_text(
    name: str = "tinyshakespeare",
    data_dir: str | os.PathLike | None = None,
    *,
    block_size: int = 64,
    text_file: str | os.PathLike | None = None,
    download: bool = False,
) -> Dataset:
    """A character-level corpus as a :class:`Dataset`: the first 90% of the characters train,
    the last 10% validate; each split is cut into non-overlapping windows of ``block_size``
    characters, ``y`` the next character of every position.  The vocabulary is the sorted
    set of the corpus's characters.  The named corpus is checked against its SHA-256; a file
    given as ``text_file`` is taken as it is.  An empty, undecodable or corrupt file raises
    ``ValueError`` naming it."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive whole number; got {block_size!r}")
    path = Path(text_file) if text_file is not None else find_text(name, data_dir, download)
    if not path.is_file():
        raise FileNotFoundError(f"text_file {str(path)!r} is not a file")
    raw = path.read_bytes()
    if text_file is None:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != TEXT_CORPORA[name][1]:
            raise ValueError(
                f"{path}: SHA-256 {digest} is not {name}'s ({TEXT_CORPORA[name][1]}): the file is "
                f"corrupt or another text; delete it and run mupp data download {name}, or use "
                "it as it is with text_file=PATH"
            )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    n_train = int(len(text) * TRAIN_FRACTION)
    if len(text) - n_train < block_size + 1:
        raise ValueError(
            f"{path}: {len(text)} characters are too few for windows of {block_size} (the "
            f"validation tenth needs at least {block_size + 1}); use a longer text"
        )
    vocab = "".join(sorted(set(text)))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    return Dataset(
        name,
        text_windows(ids[:n_train], block_size),
        text_windows(ids[n_train:], block_size),
        len(vocab),
        str(path),
        vocab=vocab,
    )


def text_windows(ids: torch.Tensor, block_size: int) -> Split:
    """Non-overlapping windows ``x = ids[k T : (k+1) T]`` and ``y = ids[k T + 1 : (k+1) T + 1]``."""
    n = (len(ids) - 1) // block_size
    x = ids[: n * block_size].view(n, block_size)
    y = ids[1 : n * block_size + 1].view(n, block_size)
    return Split(x, y)


def synthetic(
    n_train: int = 2048, n_test: int = 512, num_classes: int = 10, seed: int = 0
) -> Dataset:
    """CIFAR-shaped synthetic data: class-dependent mean images plus noise (learnable)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(num_classes, 3, 32, 32, generator=g) * 255

    def make(n: int) -> Split:
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = protos[y] * 0.5 + torch.rand(n, 3, 32, 32, generator=g) * 127
        return Split(x.clamp(0, 255).to(torch.uint8), y)

    return Dataset("synthetic", make(n_train), make(n_test), num_classes, "synthetic")


def with_label_noise(split: Split, fraction: float, num_classes: int, seed: int = 0) -> Split:
    """A copy of ``split`` in which ``round(fraction * N)`` labels, chosen with ``seed``, are
    replaced by a different class drawn uniformly (symmetric label noise; the setting in which
    SAM helps most, Chen et al., "Critical influence of overparameterization on
    sharpness-aware minimization").  The same ``(split, fraction, seed)`` gives the same labels.
    """
    if not (isinstance(fraction, (int, float)) and 0.0 <= fraction < 1.0):
        raise ValueError(f"label_noise must be a fraction in [0, 1); got {fraction!r}")
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes; got {num_classes}")
    n_flip = round(fraction * len(split))
    if n_flip == 0:
        return split
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(split), generator=g)[:n_flip]
    shift = torch.randint(1, num_classes, (n_flip,), generator=g)  # never the true class
    y = split.y.clone()
    y[idx] = (y[idx] + shift) % num_classes
    return Split(split.x, y)


def normalize(x: torch.Tensor, name: str = "cifar10") -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 standardized with the per-channel statistics."""
    stats = name if name in MEAN else "cifar10"
    mean = torch.tensor(MEAN[stats], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD[stats], device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip of a whole batch of tensors,
    deterministic for a given generator state."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).to(x.device)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).to(x.device)
    cols = torch.where(flip.view(n, 1).to(x.device), cols.flip(1), cols)
    out = padded.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w + 2 * pad))
    out = out.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))
    return out


def batches(
    split: Split,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    name: str = "cifar10",
    augment_data: bool = False,
    flatten: bool = False,
    drop_last: bool = False,
    device: torch.device | str = "cpu",
):
    """Yield normalized ``(x, y)`` batches; ``flatten`` gives (N, 3072) views for MLPs."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        idx = order[i : i + batch_size]
        x = split.x[idx]
        if is_text(name):  # token windows: nothing to normalize
            yield x.to(device), split.y[idx].to(device)
            continue
        if augment_data:
            x = augment(x, generator)
        x = normalize(x.to(device), name)
        if flatten:
            x = x.reshape(len(idx), -1)
        yield x, split.y[idx].to(device)


def info(ds: Dataset) -> dict:
    """Split sizes, images per class and per-channel mean/std of the training images (for a
    text corpus: windows, characters and the vocabulary)."""
    if ds.vocab is not None:
        t = ds.train.x.shape[1]
        return {
            "dataset": ds.name,
            "source": ds.source,
            "train_windows": len(ds.train),
            "validation_windows": len(ds.test),
            "block_size": t,
            "train_characters": len(ds.train) * t,
            "validation_characters": len(ds.test) * t,
            "vocab_size": ds.num_classes,
            "vocab": ds.vocab,
        }
    x = ds.train.x.float() / 255.0
    return {
        "dataset": ds.name,
        "source": ds.source,
        "train_size": len(ds.train),
        "test_size": len(ds.test),
        "num_classes": ds.num_classes,
        "train_per_class": torch.bincount(ds.train.y, minlength=ds.num_classes).tolist(),
        "test_per_class": torch.bincount(ds.test.y, minlength=ds.num_classes).tolist(),
        "train_mean": [round(v, 4) for v in x.mean(dim=(0, 2, 3)).tolist()],
        "train_std": [round(v, 4) for v in x.std(dim=(0, 2, 3)).tolist()],
        "test_exact": None if ds.test_exact is None else int(ds.test_exact.sum()),
    }
