"""How large a logged model gets: each architecture's state dict as torch.save writes it, and (with --mlflow) the
MLflow PyTorch model artifact that `train --mlflow-log-model` adds to a run, measured on disk. One JSON line per
architecture, then one with the total for a study's grid (default: paper_table2's, read from config.yaml).

    python benchmarks/model_size.py --mlflow
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deat.checkpoint import save_checkpoint
from deat.models import build_model


def state_dict_bytes(model: torch.nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def mlflow_model_bytes(arch: str, model: torch.nn.Module) -> int:
    """Log the model as `train --mlflow-log-model` does, into a temporary store, and sum the artifact's files."""
    from mlflow.tracking import MlflowClient

    from deat.tracking import log_best_model

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        client = MlflowClient(uri)
        experiment = client.create_experiment("size", artifact_location=Path(tmp, "artifacts").as_uri())
        run = client.create_run(experiment)
        checkpoint = Path(tmp) / "best.pt"
        spec = {"arch": arch, "num_classes": 10, "in_channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3,
                "width": None}
        save_checkpoint(checkpoint, {"model_spec": spec, "model": model.state_dict(), "epoch": 1, "config": {}})
        log_best_model(uri, run.info.run_id, checkpoint, image_shape=(3, 32, 32))
        return sum(p.stat().st_size for p in Path(tmp, "artifacts").rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["preact_resnet18", "senet18", "vgg19", "wrn34_10"])
    parser.add_argument("--mlflow", action="store_true", help="also log each model to a temporary MLflow store")
    parser.add_argument("--study", default="paper_table2", help="study whose grid the total is for")
    args = parser.parse_args()
    study = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())["studies"][args.study]
    runs_per_arch = len(study["methods"]) * len(study["lrs"]) * len(study["batch_sizes"]) * len(study["seeds"])
    sizes = {}
    for arch in args.archs:
        model = build_model(arch, 10, mean=[0.5] * 3, std=[0.25] * 3)
        row = {"arch": arch, "parameters": sum(p.numel() for p in model.parameters()),
               "state_dict_bytes": state_dict_bytes(model), "torch": torch.__version__}
        if args.mlflow:
            row["mlflow_model_bytes"] = mlflow_model_bytes(arch, model)
        sizes[arch] = row.get("mlflow_model_bytes", row["state_dict_bytes"])
        print(json.dumps(row), flush=True)
    grid = {a: runs_per_arch for a in study["archs"] if a in sizes}
    print(json.dumps({"study": args.study, "runs_per_arch": grid,
                      "total_bytes": sum(sizes[a] * n for a, n in grid.items()),
                      "measured": "mlflow_model_bytes" if args.mlflow else "state_dict_bytes"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
