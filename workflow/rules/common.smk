# Validation, run identity and target functions. Everything here runs when Snakemake parses the workflow,
# so bad input stops the run before any job starts.
import hashlib
import itertools
import json
import shutil
import sys

import yaml

sys.path.insert(0, workflow.basedir)  # the deat package beside the Snakefile, installed or not
from deat.config import (LATER_OPTIONS_OFF, METHODS, NON_RESULT_KEYS, TrainConfig, config_schema_errors,
                         did_you_mean, outer_step_of, settings_hash, unused_options)
from deat.shards import merged_from, shard_of, shard_path, split, too_many_shards

# A study's own keys for what `python -m deat train` calls arch, method, ...: the grid sets them, train: cannot.
GRID_KEY_OF_STUDY = {"arch": "archs", "method": "methods", "lr": "lrs", "batch_size": "batch_sizes", "seed": "seeds",
                     "dataset": "dataset"}
# Set once for the whole config (top-level device:, data_root:) or by the workflow itself (out).
TOP_LEVEL_KEYS = {"device": "device", "data_root": "data_root"}
TRAIN_BLOCK_KEYS = [name for name in TrainConfig.__dataclass_fields__
                    if name not in GRID_KEY_OF_STUDY and name not in TOP_LEVEL_KEYS and name != "out"]
NOTES = []  # printed once the DAG is built (a run or a dry run), never for --unlock and other non-run commands
GRID_KEYS = ("arch", "method", "lr", "batch_size", "seed")
# `eval:` keys that say how an evaluation runs, never what it computes: out of the eval hash (so changing them never
# sends a finished evaluation back), out of the evaluate command's settings and out of the study's protocol.
EVAL_EXECUTION_KEYS = ("shards", "channels_last", "cudnn_benchmark")


class Untracked:
    """A rule param that Snakemake's `params` rerun trigger does not see.

    Snakemake compares only param values it can repr (persistence._serialize_param drops other objects); in a shell
    command this one reads as its text. The train and evaluate jobs need no such trigger: every setting that changes
    their result is already in their output's path (the run's identity hash, the evaluation's settings hash), and
    the rest (device, GPU leasing, or a new option's default spelled out) must never retrain a finished run.
    """

    def __init__(self, text):
        self.text = text

    def __str__(self):
        return self.text


def _fail(message):
    """Stop before any job with the message alone: one line per problem, no traceback."""
    for line in [message] if isinstance(message, str) else message:
        print(f"config error: {line}", file=sys.stderr)
    sys.exit(1)


def _shown(path):
    path = Path(path)
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else path.name


def resolve_run():
    """Which studies to build when --configfile files define studies.

    config.yaml's `run: [quick]` is the project's default, not the user's choice: a --configfile that defines
    studies, when neither it nor --config sets `run`, builds the studies it defines (`snakemake --cores all
    --configfile my_study.yaml` does what it says). An explicit `run` always wins; studies a --configfile defines
    outside it are named in a note, with the flag that builds them.
    """
    files = [Path(p) for p in workflow.config_settings.configfiles]
    defined, explicit = {}, "run" in workflow.config_settings.config
    for path in files:
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
        if isinstance(data, dict):
            explicit = explicit or "run" in data
            for name in data.get("studies") or {}:
                defined.setdefault(name, _shown(path))
    if not defined:
        return
    if not explicit:
        config["run"] = list(defined)
        NOTES.append(f"note: building the studies {', '.join(sorted(set(defined.values())))} defines: "
                     f"run=[{','.join(defined)}] (--config run=[...] picks others)")
        return
    left = [name for name in defined if name not in config.get("run", [])]
    if left:
        NOTES.append(f"note: {', '.join(sorted({defined[n] for n in left}))} defines {', '.join(left)}, which "
                     f"run=[{','.join(config.get('run', []))}] does not build; to build {'them' if len(left) > 1 else 'it'} too: "
                     f"--config run=[{','.join(list(config.get('run', [])) + left)}]")


resolve_run()
with open(Path(workflow.basedir) / "workflow/schemas/config.schema.yaml") as _schema_file:
    _errors = config_schema_errors(config, yaml.safe_load(_schema_file))
if _errors:
    _fail(_errors)
validate(config, "../schemas/config.schema.yaml")  # passes (checked above); fills in the schema's defaults


for _name in config["run"]:
    if _name not in config["studies"]:
        _fail(f"run: unknown study {_name!r}{did_you_mean(_name, config['studies'])}; defined studies: "
              f"{', '.join(config['studies'])}")


def short_hash(values):
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]


def dataset_tag(dataset):
    """A path-safe name: npz:data/my_set.npz -> npz-my_set; a named dataset stays as it is."""
    if dataset.startswith("npz:"):
        return "npz-" + Path(dataset[4:]).stem
    return dataset


def format_lr(lr):
    return format(lr, "g")


def uses_gpu():
    return config["device"] == "cuda" or (config["device"] == "auto" and shutil.which("nvidia-smi") is not None)


def study_lrs(name, study):
    """method -> its learning rates: `lrs` is one list for every method, or a mapping with one list per method
    (equal-step pairs whose partners would diverge under the other method)."""
    lrs = study["lrs"]
    if not isinstance(lrs, dict):
        return {method: lrs for method in study["methods"]}
    if set(lrs) != set(study["methods"]):
        _fail(f"studies.{name}.lrs: a mapping needs one list per method of `methods` {study['methods']}, "
              f"got {sorted(lrs)}")
    return lrs


def check_shards(name, settings):
    """One line before any job starts if `eval.shards` cannot split the study's evaluation into whole blocks."""
    count = settings.get("shards", 1)
    if count == 1:
        return
    if settings["n_examples"] is None:
        _fail(f"studies.{name}.eval.shards: {count} shards need eval.n_examples (the examples to split into blocks "
              f"of batch_size); set it, e.g. to the test set's size")
    reason = too_many_shards(count, settings["n_examples"], settings["batch_size"])
    if reason:
        _fail(f"studies.{name}.eval.shards: {reason}")


def _check_blocks(name, study):
    """The keys of a study's train: and sweep: blocks, every problem on its own line (TrainConfig checks values)."""
    problems = []
    for block, keys in (("train", study["train"]), ("sweep", study["sweep"])):
        where = f"studies.{name}.{block}"
        verb = "set" if block == "train" else "swept"
        for key in sorted(keys):
            if key in GRID_KEY_OF_STUDY:
                problems.append(f"{where}.{key}: cannot be {verb} here; the study's grid sets it "
                                f"({GRID_KEY_OF_STUDY[key]}: [...])")
            elif key in TOP_LEVEL_KEYS:
                problems.append(f"{where}.{key}: cannot be {verb} in a study; set `{key}:` at the top level of the "
                                f"config")
            elif key == "out":
                problems.append(f"{where}.out: cannot be {verb} here; the workflow names each run's directory")
            elif key not in TRAIN_BLOCK_KEYS:
                problems.append(f"{where}.{key}: unknown key{did_you_mean(key, TRAIN_BLOCK_KEYS)}; allowed here: "
                                f"{'any `python -m deat train` option but the grid axes: ' if block == 'train' else ''}"
                                f"{', '.join(k for k in TRAIN_BLOCK_KEYS if block == 'train' or k not in NON_RESULT_KEYS)}")
            elif block == "sweep" and key in NON_RESULT_KEYS:
                problems.append(f"{where}.{key}: cannot be swept; it does not change what a run computes")
            elif block == "sweep" and key in study["train"]:
                problems.append(f"{where}.{key}: also set in studies.{name}.train; set it in one place")
    if problems:
        _fail(problems)


def build_runs():
    """Every grid point of every configured study: run path -> (train config, owner study, eval settings).

    The run path holds the grid axes for readability and a hash of every other setting that changes the result,
    so two studies share a directory exactly when they would train the same model.
    """
    runs, studies = {}, {}
    for name, study in config["studies"].items():
        if name in config["run"] and study["dataset"].startswith("npz:") and not Path(study["dataset"][4:]).is_file():
            _fail(f"studies.{name}.dataset: npz file {study['dataset'][4:]} does not exist")
        where = f"studies.{name}.train"
        _check_blocks(name, study)
        sweep = study["sweep"]
        if name in config["run"]:
            check_shards(name, study["eval"])
        studies[name] = []
        lrs = study_lrs(name, study)
        for arch, method, lr, bs, seed, *swept in itertools.product(
                study["archs"], study["methods"], list(dict.fromkeys(sum(lrs.values(), []))), study["batch_sizes"],
                study["seeds"], *sweep.values()):
            if lr not in lrs[method]:
                continue
            variant = dict(zip(sweep, swept))
            values = {**study["train"], **variant, "dataset": study["dataset"], "arch": arch, "method": method,
                      "lr": lr, "batch_size": bs, "seed": seed, "data_root": config["data_root"],
                      "device": config["device"]}
            try:
                cfg = TrainConfig.from_dict(values, source=where).resolved()
            except ValueError as err:
                _fail(str(err))
            # Options the method does not read (k1 for PGD-AT) are left out, so studies that differ only in them
            # share the method's runs, and changing them never touches a finished run.
            options = cfg.to_dict()
            run = (f"{dataset_tag(study['dataset'])}/{arch}/{method}/{settings_hash(options)}/"
                   f"lr{format_lr(lr)}_bs{bs}_seed{seed}")
            eval_settings = {k: v for k, v in study["eval"].items() if k not in EVAL_EXECUTION_KEYS}
            flags = {k: v for k, v in options.items() if k != "out" and k not in unused_options(options)}
            entry = runs.setdefault(run, {"train": flags, "owner": None, "evals": {}})
            if entry["owner"] is None and name in config["run"]:
                entry["owner"] = name
            entry["evals"][short_hash(eval_settings)] = eval_settings
            if name in config["run"]:  # studies sharing an evaluation share its jobs: the most shards asked win
                execution = entry.setdefault("eval_execution", {}).setdefault(short_hash(eval_settings), {})
                execution["shards"] = max(execution.get("shards", 1), study["eval"].get("shards", 1))
                for key in ("channels_last", "cudnn_benchmark"):
                    execution[key] = execution.get(key, False) or study["eval"].get(key, False)
            studies[name].append({"arch": arch, "method": method, "lr": lr, "batch_size": bs, "seed": seed,
                                  **({"sweep": variant} if variant else {}), "dir": f"results/runs/{run}",
                                  "eval": f"results/runs/{run}/eval_{short_hash(eval_settings)}.json"})
    return runs, studies


RUNS, STUDY_RUNS = build_runs()


wildcard_constraints:
    run=r"[A-Za-z0-9_.-]+/(" + "|".join(TrainConfig.__dataclass_fields__["arch"].metadata["help"].split(" | "))
    + r")/(" + "|".join(METHODS) + r")/[0-9a-f]{8}/lr[0-9.e+-]+_bs\d+_seed\d+",
    evalhash=r"[0-9a-f]{8}",
    start=r"\d+",
    stop=r"\d+",
    study="|".join(config["studies"]),


def print_notes(*_):
    """The notes for a run or a dry run, printed once, when Snakemake builds the DAG (target and input functions
    run then): `snakemake --unlock`, which builds none, and other commands that build none print nothing."""
    while NOTES:
        print(NOTES.pop(0), file=sys.stderr)
    return []


def run_entry(wildcards):
    print_notes()
    try:
        return RUNS[wildcards.run]
    except KeyError:
        raise WorkflowError(f"results/runs/{wildcards.run} is not a grid point of any configured study")


def cli_flags(options):
    """{'pgd_steps': 10, 'random_start': False, 'milestones': [100, 105]} -> '--pgd-steps 10 --no-random-start ...'

    Untracked (see there): the flags spell out settings the job's output path already identifies.
    """
    flags = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            flags.append(f"{flag} " + " ".join(str(v) for v in value))
        else:
            flags.append(f"{flag} {value}")
    return Untracked(" ".join(flags))


def eval_shards(wildcards):
    """The shard files the evaluation file of (run, evalhash) is merged from: none for an unsharded evaluation.

    An evaluation file that exists answers for itself: the shards it was merged from (recorded in its environment),
    none if it was evaluated whole. Snakemake records a job's set of input files and reruns the job when that set
    changes, so a finished evaluation keeps its set whatever `eval.shards` says now: changing the shard count after
    an evaluation finished, or sharding one that finished unsharded, schedules no job. The shard files are temp():
    deleted once merged, and not needed again while the evaluation file is up to date.
    """
    out = f"results/runs/{wildcards.run}/eval_{wildcards.evalhash}.json"
    if Path(out).is_file():
        return [str(p) for p in merged_from(out)]
    count = run_entry(wildcards).get("eval_execution", {}).get(wildcards.evalhash, {}).get("shards", 1)
    if count == 1:
        return []
    settings = run_entry(wildcards)["evals"][wildcards.evalhash]
    return [str(shard_path(out, a, b)) for a, b in split(settings["n_examples"], settings["batch_size"], count)]


def evaluate_flags(wildcards, merge=()):
    """The evaluate command's settings flags, its CUDA speed flags and, for a merge job, --merge SHARD_FILES."""
    execution = run_entry(wildcards).get("eval_execution", {}).get(wildcards.evalhash, {})
    speed = [f"--{k.replace('_', '-')}" for k in ("channels_last", "cudnn_benchmark") if execution.get(k)]
    settings = dict(run_entry(wildcards)["evals"][wildcards.evalhash])
    if settings.get("checkpoints") == ["best", "last"]:  # the schema's default: let evaluate add the averaged
        del settings["checkpoints"]                      # model's checkpoints where the run kept them (ema_tau)
    words = [cli_flags(settings).text]
    words += ["--merge", *merge] if merge else speed
    return Untracked(" ".join(words))


def shard_flag(wildcards):
    """I/N of the shard file's examples: in the study's shard count where its split has them, else the fewest shards
    whose split has them (a shard an earlier count made)."""
    settings = run_entry(wildcards)["evals"][wildcards.evalhash]
    n, batch_size, start, stop = settings["n_examples"], settings["batch_size"], int(wildcards.start), int(wildcards.stop)
    count = run_entry(wildcards).get("eval_execution", {}).get(wildcards.evalhash, {}).get("shards", 1)
    ranges = split(n, batch_size, count) if not too_many_shards(count, n, batch_size) else []
    index, count = (ranges.index((start, stop)) + 1, count) if (start, stop) in ranges else shard_of(start, stop, n,
                                                                                                       batch_size)
    return Untracked(f"{index}/{count}")


def gpu_options():
    """GPU leasing flags: they never change a result, so untracked like cli_flags."""
    return Untracked(f"--gpu-lock-dir results/locks --runs-per-gpu {config['runs_per_gpu']}")


def tracking_file(wildcards):
    """The owner study's tracking file (the first study of `run:` that has the run), and how to create it.

    No input of the job, on purpose: a finished run must never look out of date because the MLflow rules' files are
    new or missing (a fresh clone, a new store, a study added or reordered). The job creates the store and parent
    run when they are missing, under a lock (deat.tracking.ensure_tracking), and leaves the file itself to the MLflow
    rule that owns it; the report still waits for that rule.
    """
    owner = run_entry(wildcards)["owner"]
    return Untracked(f"results/studies/{owner}/mlflow.json --mlflow-setup '{config['mlflow']['tracking_uri']}' "
                     f"'{config['mlflow']['experiment']}' {owner}")


def interrupted_elsewhere():
    """Run directories with an interrupted training (running/ left behind) that this invocation's studies lack."""
    root = Path("results/runs")
    if not root.is_dir():
        return []
    return sorted(str(d.parent) for d in root.glob("*/*/*/*/*/running") if str(d.parent.relative_to(root)) not in RUNS)


_orphans = interrupted_elsewhere()
if _orphans:
    NOTES.append(f"note: {len(_orphans)} interrupted run(s) belong to no study of run={config['run']}, so this "
                 f"command does not resume them: {', '.join(_orphans[:3])}{' ...' if len(_orphans) > 3 else ''}. "
                 "Repeat the --config/--configfile flags they were started with (see README, Resuming).")


def study_protocol(name):
    """What every table states: optimizer and momentum, schedule, eps/steps, checkpoint rule, seeds, examples."""
    study = config["studies"][name]
    example = TrainConfig.from_dict({**study["train"], "dataset": study["dataset"]}).resolved().to_dict()
    protocol = {k: example[k] for k in ("dataset", "epochs", "schedule", "milestones", "gamma", "weight_decay",
                                        "k1", "k2", "decoupled_weight_decay", "eps", "norm", "pgd_steps",
                                        "pgd_step_size", "random_start", "attack_bn_eval", "val_size",
                                        "precision", "channels_last", "cuda_graph", "compile", "fgsm_step_size",
                                        "beta", "awp_gamma")}
    protocol.update(study["sweep"])  # a swept option shows its values, not the default
    protocol["pgd_at_momentum"] = example["momentum"]
    # An option no method of the study reads (k1 in a PGD-AT-only study) is not part of its protocol.
    read = set(protocol) - set.intersection(*(set(unused_options({**example, "method": m})) for m in study["methods"]))
    if not any(outer_step_of(m) == "sgd" for m in study["methods"]):
        read.discard("pgd_at_momentum")
    read -= {k for k, off in LATER_OPTIONS_OFF.items() if protocol.get(k) == off}  # AWP off: as before AWP existed
    protocol = {k: v for k, v in protocol.items() if k in read}
    protocol["seeds"] = study["seeds"]
    measure = f"PGD-{example['eval_pgd_steps']}" if example["pgd_steps"] > 0 else "clean"
    protocol["checkpoint_rule"] = (f"best = highest {measure} accuracy on a held-out validation split of the "
                                   "training set; last = final epoch")
    protocol["eval"] = {k: v for k, v in study["eval"].items() if k not in EVAL_EXECUTION_KEYS}
    return protocol


def study_manifest(name):
    study = config["studies"][name]
    return {"study": name, "description": study["description"], "protocol": study_protocol(name),
            "paper_reference": study["paper_reference"], "runs": STUDY_RUNS[name]}


def cannot_be_evaluated(run):
    """A finished run (metrics.json) without the evaluation the study asks and without the checkpoints it needs: a
    clone of committed JSON (checkpoints are not committed) whose evaluation was never run or whose evaluation
    settings changed. Only retraining could evaluate it, so the workflow reports it without that evaluation."""
    run_dir, eval_path = Path(run["dir"]), Path(run["eval"])
    checkpoints = RUNS[str(run_dir.relative_to("results/runs"))]["evals"][eval_path.stem.removeprefix("eval_")]
    return ((run_dir / "metrics.json").is_file() and not eval_path.is_file()
            and not all((run_dir / f"{c}.pt").is_file() for c in checkpoints["checkpoints"]))


UNEVALUABLE = {name: [r for r in STUDY_RUNS[name] if cannot_be_evaluated(r)] for name in config["run"]}
for _name, _runs in UNEVALUABLE.items():
    if _runs:
        NOTES.append(f"note: {len(_runs)} finished run(s) of study {_name} have neither the evaluation it asks "
                     f"({Path(_runs[0]['eval']).name}) nor checkpoints to evaluate (results without checkpoints, as "
                     f"committed): their tables show no evaluation for them: "
                     f"{', '.join(r['dir'] for r in _runs[:3])}{f' and {len(_runs) - 3} more' if len(_runs) > 3 else ''}. "
                     "To evaluate them, delete their metrics.json: the next run retrains them.")


def study_outputs(name):
    print_notes()
    runs = STUDY_RUNS[name]
    missing = {r["eval"] for r in UNEVALUABLE.get(name, [])}
    return [r["dir"] + "/metrics.json" for r in runs] + [r["eval"] for r in runs if r["eval"] not in missing]
