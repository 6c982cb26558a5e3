"""Command line: `python -m deat {train,evaluate,export,report,plan,prepare,mlflow-init,mlflow-study,mlflow-import,
mlflow-reconcile} --help`."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import NoReturn

# How argparse names a flag's type in "invalid <type> value", and what the user should have typed instead.
_EXPECTED = {"int": "an integer", "float": "a number", "parse_number": "a number (or a fraction like 8/255)",
             "Path": "a path"}


class _Parser(argparse.ArgumentParser):
    """argparse whose errors say what to type: a bad value or a missing option in one line; an unknown option or
    command with the usage of the command it was given to (a subcommand's own, not the top level's) and, for a
    near miss, "did you mean"."""

    def error(self, message: str) -> NoReturn:
        from .config import did_you_mean

        bad_value = re.fullmatch(r"argument (\S+): invalid (\w+) value: (.*)", message)
        if bad_value:
            flag, kind, value = bad_value.groups()
            message = f"argument {flag}: expected {_EXPECTED.get(kind, kind)}, got {value}"
        choice = re.fullmatch(r"argument (\S+): invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            message += did_you_mean(choice.group(2), re.findall(r"[\w.:-]+", choice.group(3)))
        if message.startswith("unrecognized arguments") or (choice and choice.group(1) == "command"):
            self.print_usage(sys.stderr)
            self.exit(2, f"{self.prog}: error: {message}\n")
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201  (argparse's own signature)
        """Unknown options are reported by the subcommand that got them, with its usage and a did-you-mean."""
        from .config import did_you_mean

        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            commands = getattr(self, "commands", None)
            owner = commands.choices[parsed.command] if commands and getattr(parsed, "command", None) else self
            flags = [o for action in owner._actions for o in action.option_strings]
            hints = "".join(did_you_mean(word.split("=")[0], flags) for word in extras if word.startswith("--"))
            owner.error(f"unrecognized arguments: {' '.join(extras)}{hints}")
        return parsed


def _add_job_arguments(parser: argparse.ArgumentParser, train: bool = False) -> None:
    """Options of a job inside a workflow (tracking, GPU leasing); they never change what a run computes."""
    group = parser.add_argument_group("workflow")
    group.add_argument("--mlflow", metavar="FILE", help="tracking file (written by mlflow-study): log this run to "
                       "MLflow as a child of the study's parent run (default: no MLflow)")
    if train:
        group.add_argument("--mlflow-log-model", action="store_true", help="with --mlflow: also log best.pt as an "
                           "MLflow PyTorch model (mlflow.pytorch, pt2 format; 45.1 MB for PreAct-ResNet-18) (default: off)")
    group.add_argument("--mlflow-setup", nargs=3, metavar=("URI", "EXPERIMENT", "STUDY"),
                       help="when the tracking file does not exist yet, create it (store, experiment and the study's "
                       "parent run, under a lock) instead of failing (default: fail)")
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
    if args.mlflow_log_model and not args.mlflow:
        raise ValueError("--mlflow-log-model logs to the run's MLflow run: it needs --mlflow FILE")
    lease = _lease_gpu(args, cfg.device)  # noqa: F841  (held until the process exits)
    from .runtime import RunLogger
    from .train import train

    logger = RunLogger()
    if args.mlflow:
        from .tracking import mlflow_run_logger, run_name

        logger = mlflow_run_logger(args.mlflow, cfg.out, run_name(cfg.resolved().to_dict()), setup=args.mlflow_setup,
                                   log_model=args.mlflow_log_model)
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
    """Load (downloading once if needed) a dataset and record its sizes and checksums before the fan-out.

    The training images are recorded whole: each run holds out its own `val_size` of them and writes the split it
    used under `data` in its metrics.json; the default split (`val_size: null`) is recorded, labelled as such."""
    import hashlib

    from .checkpoint import write_json
    from .data import load_dataset

    def sha256(x, y) -> str:
        return hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()

    whole = load_dataset(args.dataset, args.data_root, val_size=0)
    default = load_dataset(args.dataset, args.data_root)
    info = {"dataset": args.dataset, "num_classes": whole.num_classes, "image_shape": list(whole.train_x.shape[1:]),
            "n_train_images": len(whole.train_y), "train_images_sha256": sha256(whole.train_x, whole.train_y),
            "n_test": len(whole.test_y), "test_sha256": sha256(whole.test_x, whole.test_y),
            "default_split": {
                "what": "val_size null: min(1000, n_train_images // 10) held out; a run with another val_size "
                        "records its own split under 'data' in its metrics.json",
                "n_train": len(default.train_y), "n_val": len(default.val_y),
                "train_sha256": sha256(default.train_x, default.train_y),
                "val_sha256": sha256(default.val_x, default.val_y),
                "mean": list(default.mean), "std": list(default.std)}}
    write_json(args.out, info)
    print(json.dumps(info, indent=1))
    return 0


def _mlflow_init(args: argparse.Namespace) -> int:
    from .checkpoint import write_json
    from .tracking import init_experiment, setup_lock

    with setup_lock(args.tracking_uri):  # a training job may be creating the same store
        experiment_id = init_experiment(args.tracking_uri, args.experiment, args.artifact_root)
    write_json(args.out, {"tracking_uri": args.tracking_uri, "experiment": args.experiment,
                          "experiment_id": experiment_id})
    print(f"MLflow store {args.tracking_uri}, experiment {args.experiment!r} ({experiment_id})")
    return 0


def _mlflow_study(args: argparse.Namespace) -> int:
    from .tracking import setup_lock, study_parent_run, write_tracking_file

    store = json.loads(Path(args.store).read_text())
    manifest = json.loads(Path(args.manifest).read_text())
    params = {"n_runs": len(manifest["runs"]), **manifest["protocol"]}
    with setup_lock(store["tracking_uri"]):  # a training job may be creating the same parent run
        parent = study_parent_run(store["tracking_uri"], store["experiment_id"], args.study, params,
                                  manifest["description"])
        write_tracking_file(args.out, store["tracking_uri"], store["experiment_id"], parent)
    print(f"study {args.study!r}: MLflow parent run {parent}")
    return 0


def _mlflow_import(args: argparse.Namespace) -> int:
    from .mlflow_import import import_results

    created = import_results(args.results_dir, args.tracking_uri, args.experiment)
    print(f"MLflow {args.tracking_uri}, experiment {args.experiment!r}: {created['studies']} study run(s) and "
          f"{created['runs']} run(s) added, {created['linked']} run(s) shared with another study linked to it "
          f"(already there: left as they are)")
    return 0


def _mlflow_reconcile(args: argparse.Namespace) -> int:
    from .tracking import describe_reconciled, reconcile_runs, store_exists

    if not store_exists(args.tracking_uri):
        raise FileNotFoundError(f"no MLflow store at {args.tracking_uri.removeprefix('sqlite:///')} "
                                f"(--tracking-uri names another)")
    for line in describe_reconciled(reconcile_runs(args.tracking_uri, args.experiment)):
        print(line)
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report.cli import main as report_main

    status = report_main(args)
    if args.mlflow:
        from .tracking import finish_study_run, link_study_runs, log_artifacts

        for manifest in args.manifest or []:  # a shared run directory is one MLflow run, listing its studies
            link_study_runs(args.mlflow, json.loads(Path(manifest).read_text()))

        for folder, kind in ((args.tables_dir, "tables"), (args.figures_dir, "figures")):
            if folder:
                log_artifacts(args.mlflow, sorted(p for p in Path(folder).rglob("*") if p.is_file()),
                              artifact_path=kind)
        finish_study_run(args.mlflow)
    return status


def _module_doc(module: str) -> str:
    """A deat module's docstring read from its source, so that help does not import torch to show it."""
    import ast
    import importlib.util

    return ast.get_docstring(ast.parse(Path(importlib.util.find_spec(module).origin).read_text())) or ""


def _train_parent() -> tuple[argparse.ArgumentParser, str]:
    from .config import add_config_arguments

    parent = argparse.ArgumentParser(add_help=False)
    add_config_arguments(parent)
    return parent, _module_doc("deat.train")


def _evaluate_parent() -> tuple[argparse.ArgumentParser, str]:
    from . import evaluate

    return evaluate.get_args_parser(add_help=False), evaluate.__doc__


def _export_parent() -> tuple[argparse.ArgumentParser, str]:
    from . import export

    return export.get_args_parser(add_help=False), export.__doc__


def _export(args: argparse.Namespace) -> int:
    from . import export

    return export.main(args)


def _report_parent() -> tuple[argparse.ArgumentParser, str]:
    from .report.cli import get_args_parser

    parent = get_args_parser(add_help=False)
    parent.add_argument("--mlflow", metavar="FILE", help="tracking file: attach every table and figure to the "
                        "study's parent run (default: no MLflow)")
    return parent, parent.description


def _plan_parent() -> tuple[argparse.ArgumentParser, str]:
    from . import plan

    return plan.get_args_parser(add_help=False), plan.__doc__


def _plan(args: argparse.Namespace) -> int:
    from . import plan

    return plan.main(args)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser. Only `command`'s own options are built (`None`: none), so that `python -m deat --help`
    imports neither torch nor pandas; each subcommand's module is imported when that subcommand is asked for."""
    parser = _Parser(prog="python -m deat", description="PGD-AT vs DEAT: train, evaluate, report.")
    commands = parser.commands = parser.add_subparsers(dest="command", required=True)
    # name: (one-line help, builder of its options and description, what it runs)
    heavy = {"train": ("train one run", _train_parent, _train),
             "evaluate": ("PGD / AutoAttack evaluation of a run's best.pt and last.pt, or of another checkpoint",
                          _evaluate_parent, _evaluate),
             "export": ("a run's checkpoint as RobustBench weights + model card + deat's protocol", _export_parent,
                        _export),
             "report": ("tables, statistics and figures from results/", _report_parent, _report),
             "plan": ("seeds a comparison needs from a pilot study, and a study's cost before it runs", _plan_parent,
                      _plan)}
    for name, (summary, options, run) in heavy.items():
        parent, description = options() if name == command else (None, None)
        p = commands.add_parser(name, help=summary, parents=[parent] if parent else [], description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        if parent and name in ("train", "evaluate"):
            _add_job_arguments(p, train=name == "train")
        p.set_defaults(func=run)
    p = commands.add_parser("prepare", help="load (download once) a dataset and write its sizes and checksums")
    p.add_argument("--dataset", required=True,
                   help="cifar10 | cifar100 | svhn | cifar10_small | mnist5k | npz:<path>")
    p.add_argument("--data-root", default="data", help="torchvision dataset folder (default: data)")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.set_defaults(func=_prepare)
    p = commands.add_parser("mlflow-init", help="create the MLflow store and experiment once, before any fan-out")
    p.add_argument("--tracking-uri", required=True, help="e.g. sqlite:///results/mlflow/mlflow.db or http://host:5000")
    p.add_argument("--experiment", required=True, help="MLflow experiment name")
    p.add_argument("--artifact-root", help="artifact location for a new experiment (default: artifacts/ beside an sqlite store, "
                   "else the server's)")
    p.add_argument("--out", required=True, help="JSON file recording the store and experiment")
    p.set_defaults(func=_mlflow_init)
    p = commands.add_parser("mlflow-import", help="load committed studies (manifests, metrics.json, eval_*.json) "
                            "into MLflow; a second call adds nothing")
    p.add_argument("--results-dir", default="results", help="folder holding studies/ and runs/ (default: results)")
    p.add_argument("--tracking-uri", default="sqlite:///results/mlflow/mlflow.db",
                   help="MLflow store (default: sqlite:///results/mlflow/mlflow.db, the one `mlflow ui` in the "
                   "README opens)")
    p.add_argument("--experiment", default="deat", help="MLflow experiment name (default: deat)")
    p.set_defaults(func=_mlflow_import)
    p = commands.add_parser("mlflow-reconcile", help="mark KILLED every RUNNING MLflow run whose training process "
                            "is gone (kill -9); runs alive or on other hosts are left as they are")
    p.add_argument("--tracking-uri", default="sqlite:///results/mlflow/mlflow.db",
                   help="MLflow store (default: sqlite:///results/mlflow/mlflow.db)")
    p.add_argument("--experiment", default="deat", help="MLflow experiment name (default: deat)")
    p.set_defaults(func=_mlflow_reconcile)
    p = commands.add_parser("mlflow-study", help="create (or find) a study's MLflow parent run")
    p.add_argument("--store", required=True, help="JSON file written by mlflow-init")
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--manifest", required=True, help="the study's manifest.json (its protocol becomes params)")
    p.add_argument("--out", required=True, help="tracking file for the study's jobs (--mlflow FILE)")
    p.set_defaults(func=_mlflow_study)
    return parser


def _evaluate(args: argparse.Namespace) -> int:
    from . import evaluate

    return evaluate.main(args, lease=_lease_gpu(args, args.device))


def _command(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word that is one), else None."""
    return next((word for word in argv if word in ("train", "evaluate", "export", "report", "plan")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_command(argv)).parse_args(argv)
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
