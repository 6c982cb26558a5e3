"""The tiny study the end-to-end tests run with the real snakemake: seconds per job on one CPU core."""

import copy


def tiny_study(lrs=(0.05,), epochs=2, **train_options) -> dict:
    """A workflow config with one study `tiny`: small_cnn (width 8) on mnist5k, both methods, one seed."""
    return copy.deepcopy({
        "run": ["tiny"],
        "device": "cpu",
        "studies": {
            "tiny": {
                "dataset": "mnist5k",
                "archs": ["small_cnn"],
                "methods": ["pgd_at", "deat"],
                "lrs": list(lrs),
                "batch_sizes": [256],
                "seeds": [0],
                "train": {"epochs": epochs, "eps": 0.1, "pgd_steps": 2, "val_size": 200, "eval_examples": 100,
                          "width": 8, **train_options},
                "eval": {"n_examples": 40, "pgd_steps": 5, "pgd_restarts": 1, "autoattack_attacks": ["apgd-ce"]},
            }
        },
    })
