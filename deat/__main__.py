"""Command line: `python -m deat {train,evaluate,report,prepare,mlflow-init,mlflow-study} --help`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of a job inside a workflow (tracking, GPU leasing); they never change what a run computes."""
    group = parser.add_argument_group("workflow")
    group.add_argument("--mlflow", metavar="FILE", help="tracking file (written by mlflow-init): log this run to "
                       "MLflow as a child of the study's parent run (default: no MLflow)")
    group.add_argument("--gpu-lock-dir", metavar="DIR", help="lease one free GPU with an OS lock in DIR and set "
                       "CUDA_VISIBLE_DEVICES before CUDA starts (default: no leasing)")
    group.add_argument("--runs-per-gpu", type=int, default=1, help="jobs that may share one card (default: 1)")


def _lease_gpu(args: argparse.Namespace, device: str) -> object | None:
    """Take a card before torch initialises CUDA; None when the job runs on the CPU."""
    if not args.gpu_lock_dir or device == "cpu":
        return None
    from .gpu import lease_gpu, visible_gpus

    if not visible_gpus():
        if device == "auto":
            return None
        raise RuntimeError(f"device={device!r} but no GPU is visible")
    lock_dir = Path(args.gpu_lock_dir)
    if "SLURM_JOB_ID" in os.environ:
        # Card ids are per allocation under SLURM (each job may see its card as 0): jobs of one allocation share
        # cards and lease among themselves; jobs of different allocations never share a card, nor a lock.
        lock_dir = lock_dir / f"slurm-{os.environ['SLURM_JOB_ID']}"
    lease = lease_gpu(lock_dir, runs_per_gpu=args.runs_per_gpu)
    print(f"leased GPU {lease.gpu_id} (slot {lease.slot}) via {lease.lock_path}", flush=True)
    return lease


class Terminated(BaseException):
    """SIGTERM (what SLURM sends on preemption or time-out, and `kill`), raised so that cleanup code runs."""


def _raise_on_sigterm() -> None:
    import signal

    def handler(signum: int, frame: object) -> None:
        raise Terminated(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def _train(args: argparse.Namespace) -> int:
    from .config import config_from_args

    cfg = config_from_args(args)  # validate before leasing a GPU or touching MLflow
    lease = _lease_gpu(args, cfg.device)  # noqa: F841  (held until the process exits)
    from .train import RunLogger, train

    logger = RunLogger()
    if args.mlflow:
        from .tracking import mlflow_run_logger

        name = f"{cfg.method} {cfg.arch} lr{cfg.lr} bs{cfg.batch_size} seed{cfg.seed}"
        logger = mlflow_run_logger(args.mlflow, cfg.out, name)
    try:
        train(cfg, logger, log=lambda line: print(line, flush=True))
    except (Terminated, KeyboardInterrupt):
        logger.stop("KILLED")  # MLflow shows the truth; a rerun of the same command resumes and finishes it
        raise
    except BaseException:
        logger.stop("FAILED")
        raise
    return 0


def _prepare(args: argparse.Namespace) -> int:
    """Load (downloading once if needed) a dataset and record its sizes and checksums before the fan-out."""
    import hashlib

    from .checkpoint import write_json
    from .data import load_dataset

    data = load_dataset(args.dataset, args.data_root)
    info = {"dataset": args.dataset, "num_classes": data.num_classes, "image_shape": list(data.train_x.shape[1:]),
            "mean": list(data.mean), "std": list(data.std)}
    for split in ("train", "val", "test"):
        x, y = getattr(data, f"{split}_x"), getattr(data, f"{split}_y")
        info[f"n_{split}"] = len(y)
        info[f"{split}_sha256"] = hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()
    write_json(args.out, info)
    print(json.dumps(info, indent=1))
    return 0


def _mlflow_init(args: argparse.Namespace) -> int:
    from .checkpoint import write_json
    from .tracking import init_experiment

    experiment_id = init_experiment(args.tracking_uri, args.experiment, args.artifact_root)
    write_json(args.out, {"tracking_uri": args.tracking_uri, "experiment": args.experiment,
                          "experiment_id": experiment_id})
    print(f"MLflow store {args.tracking_uri}, experiment {args.experiment!r} ({experiment_id})")
    return 0


def _mlflow_study(args: argparse.Namespace) -> int:
    from .tracking import study_parent_run, write_tracking_file

    store = json.loads(Path(args.store).read_text())
    manifest = json.loads(Path(args.manifest).read_text())
    params = {"n_runs": len(manifest["runs"]), **manifest["protocol"]}
    parent = study_parent_run(store["tracking_uri"], store["experiment_id"], args.study, params,
                              manifest["description"])
    write_tracking_file(args.out, store["tracking_uri"], store["experiment_id"], parent)
    print(f"study {args.study!r}: MLflow parent run {parent}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from . import report

    status = report.main(args)
    if args.mlflow:
        from .tracking import finish_study_run, log_artifacts

        for folder, kind in ((args.tables_dir, "tables"), (args.figures_dir, "figures")):
            if folder:
                log_artifacts(args.mlflow, sorted(p for p in Path(folder).rglob("*") if p.is_file()),
                              artifact_path=kind)
        finish_study_run(args.mlflow)
    return status


def build_parser() -> argparse.ArgumentParser:
    from . import evaluate, report, train

    parser = argparse.ArgumentParser(prog="python -m deat", description="PGD-AT vs DEAT: train, evaluate, report.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("train", parents=[train.get_args_parser(add_help=False)], help="train one run",
                            description=train.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_job_arguments(p)
    p.set_defaults(func=_train)
    p = commands.add_parser("evaluate", parents=[evaluate.get_args_parser(add_help=False)],
                            help="PGD / AutoAttack evaluation of a run's best.pt and last.pt",
                            description=evaluate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_job_arguments(p)
    p.set_defaults(func=lambda a: evaluate.main(a, lease=_lease_gpu(a, a.device)))
    p = commands.add_parser("report", parents=[report.get_args_parser(add_help=False)],
                            help="tables, statistics and figures from results/", description=report.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mlflow", metavar="FILE", help="tracking file: attach every table and figure to the study's "
                   "parent run (default: no MLflow)")
    p.set_defaults(func=_report)
    p = commands.add_parser("prepare", help="load (download once) a dataset and write its sizes and checksums")
    p.add_argument("--dataset", required=True,
                   help="cifar10 | cifar100 | svhn | cifar10_small | mnist5k | npz:<path>")
    p.add_argument("--data-root", default="data", help="torchvision dataset folder (default: data)")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.set_defaults(func=_prepare)
    p = commands.add_parser("mlflow-init", help="create the MLflow store and experiment once, before any fan-out")
    p.add_argument("--tracking-uri", required=True, help="e.g. sqlite:///results/mlflow/mlflow.db or http://host:5000")
    p.add_argument("--experiment", required=True, help="MLflow experiment name")
    p.add_argument("--artifact-root", help="artifact location for a new experiment (default: MLflow's)")
    p.add_argument("--out", required=True, help="JSON file recording the store and experiment")
    p.set_defaults(func=_mlflow_init)
    p = commands.add_parser("mlflow-study", help="create (or find) a study's MLflow parent run")
    p.add_argument("--store", required=True, help="JSON file written by mlflow-init")
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--manifest", required=True, help="the study's manifest.json (its protocol becomes params)")
    p.add_argument("--out", required=True, help="tracking file for the study's jobs (--mlflow FILE)")
    p.set_defaults(func=_mlflow_study)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _raise_on_sigterm()
    try:
        return args.func(args)
    # OSError too: a full disk or a read-only results folder is the user's to fix, like a bad value.
    except (ValueError, OSError, RuntimeError, FloatingPointError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Terminated as err:
        print(f"stopped: {err}; rerun the same command to continue", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
