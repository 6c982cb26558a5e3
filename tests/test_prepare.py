"""`python -m deat prepare`: the dataset record states the whole training set and labels the default split as
the default (each run records the split it used in its metrics.json)."""

import json

import numpy as np

from deat.__main__ import main


def test_prepare_records_the_whole_training_set_and_the_default_split_as_such(tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "tiny.npz"
    np.savez(npz, train_x=rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8), train_y=rng.integers(0, 10, 50),
             test_x=rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8), test_y=rng.integers(0, 10, 20))
    out = tmp_path / "data.json"
    assert main(["prepare", "--dataset", f"npz:{npz}", "--out", str(out)]) == 0
    info = json.loads(out.read_text())
    assert (info["n_train_images"], info["n_test"]) == (50, 20)
    assert (info["default_split"]["n_train"], info["default_split"]["n_val"]) == (45, 5)  # min(1000, 50 // 10)
    assert "val_size null" in info["default_split"]["what"] and "n_train" not in info


def test_prepare_refuses_labels_that_do_not_start_at_0_before_writing_anything(tmp_path, capsys):
    """Issue 20: an npz with labels 1..10 was prepared (and trained) as an 11-class problem."""
    rng = np.random.default_rng(0)
    npz = tmp_path / "one_based.npz"
    np.savez(npz, train_x=rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8), train_y=np.arange(50) % 10 + 1,
             test_x=rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8), test_y=np.arange(20) % 10 + 1)
    out = tmp_path / "data.json"
    assert main(["prepare", "--dataset", f"npz:{npz}", "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {npz}: train_y holds labels 1..10 (10 classes); expected every label 0..K-1, here 0..9: subtract 1 "
        "from train_y and test_y (labels - 1)"]
    assert not out.exists()
