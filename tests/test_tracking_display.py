"""What a researcher sees of the MLflow store: the experiment opens on MLflow 3's model-training (runs) view, and a
run's learning-curve artifact reads in percent over whole epochs."""

import matplotlib
import pytest

matplotlib.use("Agg")

pytest.importorskip("mlflow")

from deat import tracking  # noqa: E402


def test_the_experiment_is_tagged_as_classic_ml_when_created_and_when_found(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = tracking.init_experiment(uri, "deat", artifact_root=tmp_path / "artifacts")
    client = MlflowClient(uri)
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    # A store made before the tag existed gets it on the next init, same experiment.
    client.delete_experiment_tag(experiment_id, "mlflow.experimentKind")
    assert tracking.init_experiment(uri, "deat") == experiment_id
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_learning_curves_are_in_percent_over_whole_epochs(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    epochs = [{"epoch": e, "train_robust_acc": 0.1 * e, "val_pgd_acc": 0.1, "test_pgd_acc": 0.05 * e,
               "test_clean_acc": 0.5} for e in (1, 2, 3)]
    metrics = {"epochs": epochs, "config": {"method": "deat", "arch": "a", "lr": 0.1, "batch_size": 8, "seed": 0}}
    tracking.plot_learning_curves(metrics, tmp_path / "curves.png")
    (figure,) = kept
    axis = figure.axes[0]
    test_pgd = next(line for line in axis.lines if line.get_label() == "test PGD")
    assert list(test_pgd.get_ydata()) == pytest.approx([5.0, 10.0, 15.0])
    assert all(tick == int(tick) for tick in axis.get_xticks())
    assert axis.yaxis.get_major_formatter()(50.0, 0) == "50%"
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
