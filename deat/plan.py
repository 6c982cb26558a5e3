"""`python -m deat plan`: how many seeds a comparison needs, and what a study costs, before anything runs.

From a committed pilot study (its manifest under results/studies/<study>/ and its runs' JSON files):

    python -m deat plan --pilot matched_sgd_momentum --half-width 1.2
    python -m deat plan --pilot matched_sgd_momentum --mde 1.2

prints the paired sd of DEAT − SGD-momentum over seeds (pooled within its pairings), the seeds per arm that give a
95 % t-interval of that half-width (the t quantile at each n's own df) or a minimum detectable effect of that size
at 80 % power (two-sided 5 %, statsmodels' TTestPower), and the time that takes from the pilot's measured cost
per run (metrics.json wall_time_s + eval.json wall_time_s). Targets are in percentage points.

    python -m deat plan --study paper_table2

prints a configured study's cost before it runs: its runs (those already committed under results/runs are not
counted again), epochs, and hours: measured per-epoch and per-evaluation costs of committed runs of the same
dataset, arch and width where there are some (a CPU study), else the GPU throughput and attack costs of the
machine-readable table in docs/benchmarks.md ("Cost figures python -m deat plan reads").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

# Training images of each dataset before the validation split (deat.data; cifar10_small: 500 per class).
DATASET_TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000, "svhn": 73_257, "cifar10_small": 5_000,
                        "mnist5k": 4_000}
COST_TABLE_MARKER = "<!-- plan cost figures -->"
CHECKPOINTS_EVALUATED = 2  # best.pt and last.pt


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pilot", metavar="STUDY", help="committed pilot study: a name under "
                        "<results-dir>/studies/ or a path to its manifest.json")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--half-width", type=float, metavar="POINTS", help="target half-width of the 95 %% "
                        "interval of the mean Δ, in percentage points")
    target.add_argument("--mde", type=float, metavar="POINTS", help="target minimum detectable effect at 80 %% "
                        "power (two-sided 5 %%), in percentage points")
    parser.add_argument("--metric", choices=("pgd10_acc", "clean_acc", "aa_acc"), default=None,
                        help="accuracy compared (default: PGD-10 robust, clean where the pilot trains without an "
                        "attack)")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best", help="default: best")
    parser.add_argument("--pairs", choices=("equal_step", "equal_alpha"), default=None,
                        help="which pairs give the paired sd (default: equal_step where the pilot has such pairs)")
    parser.add_argument("--all-pairings", action="store_true", help="equal_step: also pairings matched in step "
                        "only (default: those matched in step and decay where there are any)")
    parser.add_argument("--pairings", type=int, default=None, metavar="K", help="pairings (steps or α) the planned "
                        "study runs, for its cost (default: as many as the pilot's pairs used)")
    parser.add_argument("--study", metavar="NAME", help="a study of --config: print its cost before it runs")
    parser.add_argument("--config", type=Path, default=Path("config.yaml"), help="default: config.yaml")
    parser.add_argument("--results-dir", type=Path, default=Path("results"), help="default: results")
    parser.add_argument("--benchmarks", type=Path, default=Path("docs/benchmarks.md"),
                        help="where the cost figures table is (default: docs/benchmarks.md)")
    return parser


# ------------------------------------------------------------------------------------------------ pilot


def _pilot_manifest(pilot: str, results_dir: Path) -> Path:
    path = Path(pilot)
    if path.suffix == ".json":
        return path
    path = results_dir / "studies" / pilot / "manifest.json"
    if not path.is_file():
        raise ValueError(f"--pilot {pilot}: no {path} (a committed study's manifest)")
    return path


def pilot_differences(runs, metric: str, checkpoint: str, pairs: str | None, all_pairings: bool):
    """The pilot's paired differences (fractions) grouped by pairing: {pairing words: [Δ per seed]}, and which
    pairs they are. equal_step: equal_effective_step's like-for-like pairs (decay-matched ones unless
    ``all_pairings`` or there are none); equal_alpha: Table 4's pairs per (objective, variant, arch, α)."""
    from .report import comparisons, statistics

    tests = comparisons.all_tests(runs)
    kind = pairs or ("equal_step" if tests.step_pairs else "equal_alpha")
    groups: dict[str, list[float]] = {}
    column = f"eval_{checkpoint}_{metric}"
    if kind == "equal_step":
        chosen = tests.step_pairs
        matched = [p for p in chosen if p["decay_matched"]]
        words = "equal effective step, step + decay matched"
        if all_pairings or not matched:
            words = "equal effective step, every pairing"
        else:
            chosen = matched
        for pair in chosen:
            sgd, deat = pair["sgd"], pair["deat"]
            key = (f"{sgd.arch} {pair['baseline']} α={sgd.lr:g} vs {pair['treatment']} α={deat.lr:g} "
                   f"b={sgd.batch_size}" + (f" {deat.variant}" if deat.variant else ""))
            value = getattr(deat, column) - getattr(sgd, column)
            if not math.isnan(value):
                groups.setdefault(key, []).append(value)
    else:
        words = "equal α"
        from .report.table_helpers import comparison_groups, pairs_of

        for baseline, treatment, subset, head, _ in comparison_groups(runs, pairs_of(runs))[2]:
            for arch in dict.fromkeys(subset.arch):
                matched_frame, _ = statistics.matched_pairs(subset, column, arch, baseline, treatment)
                for lr, group in statistics.paired_differences(matched_frame).groupby(level="lr"):
                    groups[" ".join(head + [f"{arch} {treatment} vs {baseline} α={lr:g}"])] = list(group)
    return groups, words


def pilot_plan(manifest_path: Path, runs_root: Path, half_width: float | None, mde: float | None,
               metric: str | None = None, checkpoint: str = "best", pairs: str | None = None,
               all_pairings: bool = False, pairings: int | None = None) -> dict:
    """Seeds per arm for a target ``half_width`` or ``mde`` (fractions) from the pilot's pooled paired sd, and
    the time it takes from the pilot's cost per run. Raises ValueError where the pilot has no pairs with ≥ 2
    seeds."""
    from scipy import stats

    from .report import comparisons, power
    from .report.loading import load_manifest, load_runs

    manifest = load_manifest(manifest_path)
    runs, _ = load_runs(manifest, runs_root)
    metric = metric or comparisons.step_metric(runs)
    groups, words = pilot_differences(runs, metric, checkpoint, pairs, all_pairings)
    sd, df = power.pooled_sd(groups.values())
    if not df or not sd > 0:
        raise ValueError(f"pilot {manifest['study']}: no {words} pairing with 2 or more seeds and some spread in "
                         f"{metric} ({checkpoint}): nothing to estimate the paired sd from")
    if half_width is not None:
        n = power.seeds_for_half_width(sd, half_width)
    else:
        n = power.seeds_for_mde(sd, mde)
    t = stats.t.ppf(1 - (1 - power.CONFIDENCE) / 2, n - 1)
    # The sd itself is estimated from df degrees of freedom: its upper 95 % bound, √(df·s²/χ²(0.05, df)).
    sd_upper = sd * math.sqrt(df / stats.chi2.ppf(1 - power.CONFIDENCE, df))
    n_upper = (power.seeds_for_half_width(sd_upper, half_width) if half_width is not None
               else power.seeds_for_mde(sd_upper, mde))
    used = [k for k, v in groups.items() if len(v) >= 2]
    k = pairings or len(used)
    baseline_cost, treatment_cost = _pilot_costs(runs)
    per_seed = baseline_cost["mean_s"] + treatment_cost["mean_s"]
    return {"pilot": manifest["study"], "pairs": words, "metric": metric, "checkpoint": checkpoint,
            "pairings": used, "pilot_seeds": max(len(v) for v in groups.values()), "paired_sd": sd, "df": df,
            "target": {"half_width": half_width} if half_width is not None else {"mde": mde},
            "seeds_per_arm": n, "sd_upper_95": sd_upper, "seeds_per_arm_at_sd_upper": n_upper,
            "half_width_at_n": t * sd / math.sqrt(n),
            "mde_at_n": power.minimum_detectable_effect(n, sd), "planned_pairings": k,
            "runs": 2 * k * n, "cost_per_run_s": {"baseline": baseline_cost, "treatment": treatment_cost},
            "total_s": k * n * per_seed, "devices": sorted(set(baseline_cost["devices"]) | set(treatment_cost["devices"]))}


def _pilot_costs(runs) -> tuple[dict, dict]:
    """Mean measured seconds per run (metrics.json wall_time_s + eval.json wall_time_s) of the pilot's
    SGD-momentum and DEAT runs (each run directory once), with the devices they ran on."""
    out = []
    for outer_step in ("sgd", "deat"):
        subset = runs[runs.outer_step == outer_step].drop_duplicates("dir")
        total = subset.metrics_wall_time_s + subset.eval_wall_time_s.fillna(0.0)
        total = total.dropna()
        out.append({"runs": len(total), "mean_s": float(total.mean()) if len(total) else float("nan"),
                    "devices": sorted(set(subset.device_name.dropna()))})
    return out[0], out[1]


def format_pilot(plan: dict) -> str:
    points = 100
    target = (f"95 % half-width ≤ {points * plan['target']['half_width']:.2f} points"
              if "half_width" in plan["target"] else
              f"MDE ≤ {points * plan['target']['mde']:.2f} points at 80 % power (two-sided 5 %)")
    cost = plan["cost_per_run_s"]
    lines = [(f"pilot {plan['pilot']}: {plan['pairs']}, {plan['metric']} of the {plan['checkpoint']} checkpoint, "
             f"{len(plan['pairings'])} pairings with ≥ 2 seeds (up to {plan['pilot_seeds']} seeds):"),
             *(f"  {p}" for p in plan["pairings"]),
             f"paired sd (pooled within pairings): {points * plan['paired_sd']:.2f} points on {plan['df']} df",
             f"target: {target}",
             (f"seeds per arm: {plan['seeds_per_arm']} (half-width {points * plan['half_width_at_n']:.2f} points, "
             f"MDE {points * plan['mde_at_n']:.2f} points at that n); at the sd's one-sided 95 % upper bound "
             f"({points * plan['sd_upper_95']:.2f} points, χ² on {plan['df']} df): {plan['seeds_per_arm_at_sd_upper']}"),
             (f"cost per run (training + evaluation, measured in the pilot on {', '.join(plan['devices']) or '?'}): "
             f"SGD-momentum {cost['baseline']['mean_s'] / 60:.1f} min ({cost['baseline']['runs']} runs), "
             f"DEAT {cost['treatment']['mean_s'] / 60:.1f} min ({cost['treatment']['runs']} runs)"),
             (f"{plan['planned_pairings']} pairings × {plan['seeds_per_arm']} seeds × 2 arms = {plan['runs']} runs: "
             f"{plan['total_s'] / 3600:.1f} h of one job at a time at the pilot's cost (runs already committed are "
             "not subtracted; the evaluation as in the pilot)")]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ study cost


def read_cost_table(path: Path) -> list[dict]:
    """The rows of docs/benchmarks.md's machine-readable cost table (after COST_TABLE_MARKER): kind (train |
    eval), device, arch, batch, attack, value, unit, source. Raises ValueError where it is missing."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if COST_TABLE_MARKER not in lines:
        raise ValueError(f"{path}: no cost table (the line {COST_TABLE_MARKER!r} followed by a Markdown table)")
    rows, start = [], lines.index(COST_TABLE_MARKER) + 1
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        row = dict(zip(header, (cell.strip() for cell in line.strip("|").split("|"))))
        row["value"] = float(row["value"].replace(",", ""))
        row["batch"] = int(row["batch"]) if row["batch"] else None
        rows.append(row)
    return rows


def _grid(study: dict) -> list[dict]:
    """Every grid point of a configured study as `python -m deat train` values (the workflow's expansion:
    archs × methods × lrs (one list, or one per method) × batch_sizes × seeds × sweep)."""
    import itertools

    lrs = study["lrs"] if isinstance(study["lrs"], dict) else {m: study["lrs"] for m in study["methods"]}
    sweep = study.get("sweep") or {}
    points = []
    for arch, method, bs, seed, *swept in itertools.product(study["archs"], study["methods"], study["batch_sizes"],
                                                            study["seeds"], *sweep.values()):
        for lr in lrs[method]:
            points.append({**(study.get("train") or {}), **dict(zip(sweep, swept)), "dataset": study["dataset"],
                           "arch": arch, "method": method, "lr": lr, "batch_size": bs, "seed": seed})
    return points


def _committed_runs(results_dir: Path) -> list[dict]:
    """Every finished run under results_dir/runs: its resolved config, seconds per epoch (wall time over
    epochs, the per-epoch evaluation included), device, and its evaluations' seconds per test example."""
    found = []
    for path in sorted((results_dir / "runs").rglob("metrics.json")):
        metrics = json.loads(path.read_text())
        if metrics.get("status") != "complete" or not metrics.get("epochs") or not metrics.get("wall_time_s"):
            continue
        evals = []
        for eval_path in path.parent.glob("eval*.json"):
            if eval_path.name.endswith(".partial.json"):
                continue
            evaluation = json.loads(eval_path.read_text())
            n = evaluation.get("examples", {}).get("n")
            if evaluation.get("wall_time_s") and n:
                evals.append({"per_example_s": evaluation["wall_time_s"] / n, "settings": evaluation.get("settings", {})})
        found.append({"config": metrics["config"], "per_epoch_s": metrics["wall_time_s"] / len(metrics["epochs"]),
                      "device": metrics.get("environment", {}).get("device_name") or "?", "evals": evals})
    return found


def study_cost(config_path: Path, name: str, results_dir: Path, benchmarks: Path) -> dict:
    """A configured study's runs, epochs and hours before it runs (see the module docstring)."""
    import statistics

    import yaml

    from .config import TrainConfig, run_identity

    config = yaml.safe_load(config_path.read_text())
    studies = config.get("studies") or {}
    if name not in studies:
        raise ValueError(f"--study {name}: not a study of {config_path} (studies: {', '.join(studies)})")
    study = studies[name]
    committed = _committed_runs(results_dir)
    done = {json.dumps(run_identity(run["config"]), sort_keys=True) for run in committed}
    eval_settings = study.get("eval") or {}
    n_examples = eval_settings.get("n_examples")
    rows, todo, epochs, evaluated = [], 0, 0, 0
    costs = {"measured_s": 0.0, "benchmark_s": 0.0, "unknown_runs": 0, "stand_in_s": 0.0, "unknown_archs": []}
    evaluated_alike = {json.dumps(run_identity(run["config"]), sort_keys=True) for run in committed
                       if any(all(e["settings"].get(k) == v for k, v in eval_settings.items()) for e in run["evals"])}
    sources: set[str] = set()
    table = None
    for values in _grid(study):
        cfg = TrainConfig.from_dict(values, source=f"studies.{name}").resolved()
        identity = json.dumps(run_identity(cfg.to_dict()), sort_keys=True)
        if identity in rows:
            continue
        rows.append(identity)
        train = identity not in done
        evaluate = identity not in evaluated_alike
        todo += train
        evaluated += evaluate
        epochs += cfg.epochs * train
        if not (train or evaluate):
            continue
        same = [r for r in committed if all(r["config"].get(k) == getattr(cfg, k) for k in ("dataset", "arch", "width"))]
        if same:
            closest = [r for r in same if r["config"].get("method") == cfg.method
                       and r["config"].get("pgd_steps") == cfg.pgd_steps] or same
            per_epoch = statistics.median(r["per_epoch_s"] for r in closest)
            per_example = [e["per_example_s"] for r in closest for e in r["evals"]]
            n_eval = n_examples or 10_000
            costs["measured_s"] += cfg.epochs * per_epoch * train + (statistics.median(per_example) * n_eval
                                                                     if per_example and evaluate else 0.0)
            sources |= {r["device"] for r in closest}
            continue
        table = table if table is not None else read_cost_table(benchmarks)
        seconds, source = _benchmark_seconds(table, cfg, eval_settings, train, evaluate)
        if seconds is None:
            costs["unknown_runs"] += 1
            costs["unknown_archs"] = list(dict.fromkeys(costs["unknown_archs"] + [cfg.arch]))
            # What the run would cost at the first benchmarked arch's figures: an assumption, printed as one.
            stand_in = next((r["arch"] for r in table if r["kind"] == "train"), None)
            if stand_in:
                costs["stand_in_arch"] = stand_in
                costs["stand_in_s"] += _benchmark_seconds(table, dataclasses.replace(cfg, arch=stand_in),
                                                          eval_settings, train, evaluate)[0]
        else:
            costs["benchmark_s"] += seconds
            sources.add(source)
    return {"study": name, "runs": len(_grid(study)), "distinct_runs": len(rows), "committed": len(set(rows) & done),
            "to_train": todo, "to_evaluate": evaluated, "epochs_to_train": epochs, **costs,
            "sources": sorted(sources)}


def _benchmark_seconds(table: list[dict], cfg, eval_settings: dict, train: bool = True,
                       evaluate: bool = True) -> tuple[float | None, str]:
    """One run's GPU seconds from the benchmark table: training images over the measured images/s of the same
    arch at the nearest measured batch size (scaled by (K + 1)/(K₀ + 1) for PGD-K training against the table's
    PGD-K₀), plus the evaluation of both checkpoints (PGD-k×R scaled by steps × restarts from the measured
    PGD-50×10, the AutoAttack attacks run, per 1,000 examples). None where the arch has no figure."""
    rates = [r for r in table if r["kind"] == "train" and r["arch"] == cfg.arch]
    if not rates:
        return None, ""
    row = min(rates, key=lambda r: abs(math.log(r["batch"] / cfg.batch_size)))
    measured_steps = int(row["attack"].split("-")[1])
    n_train = DATASET_TRAIN_IMAGES.get(cfg.dataset, 0)
    n_train -= cfg.val_size if cfg.val_size is not None else min(1000, n_train // 10)
    seconds = cfg.epochs * n_train / row["value"] * (cfg.pgd_steps + 1) / (measured_steps + 1) * train
    attacks = {r["attack"]: r["value"] for r in table if r["kind"] == "eval" and r["arch"] == cfg.arch}
    per_1000 = 0.0
    if "PGD-50×10" in attacks:
        per_1000 += attacks["PGD-50×10"] * eval_settings.get("pgd_steps", 50) * eval_settings.get("pgd_restarts", 10) \
            / 500 + attacks["PGD-50×10"] * 10 / 500  # PGD-k×R and PGD-10
    if eval_settings.get("autoattack", "standard") == "standard":
        chosen = eval_settings.get("autoattack_attacks") or ["apgd-ce", "apgd-t", "fab-t", "square"]
        per_1000 += sum(attacks.get(attack, 0.0) for attack in chosen)
    n_examples = eval_settings.get("n_examples") or 10_000
    seconds += CHECKPOINTS_EVALUATED * n_examples / 1000 * per_1000 * evaluate
    return seconds, f"{row['device']} benchmark ({row['arch']}, batch {row['batch']}: {row['value']:,.0f} images/s)"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def format_study(cost: dict) -> str:
    lines = [(f"study {cost['study']}: {cost['runs']} grid points, {cost['distinct_runs']} distinct runs, "
             f"{cost['committed']} already trained under results/runs, {cost['to_train']} to train "
             f"({cost['epochs_to_train']:,} epochs), {cost['to_evaluate']} to evaluate with the study's settings")]
    if cost["measured_s"]:
        lines.append(f"  measured on committed runs of the same dataset, arch and width: {_hours(cost['measured_s'])} "
                     "of one job at a time (training with its per-epoch evaluation + final evaluation)")
    if cost["benchmark_s"]:
        lines.append(f"  from docs/benchmarks.md: {cost['benchmark_s'] / 3600:,.1f} GPU-hours (training steps + "
                     "final evaluation of best and last; per-epoch evaluation not counted)")
    if cost["unknown_runs"]:
        lines.append(f"  {cost['unknown_runs']} runs ({', '.join(cost['unknown_archs'])}) have no measured figure (no "
                     "committed run of the same dataset, arch and width, no benchmark of the arch): not counted above"
                     + (f"; at {cost['stand_in_arch']}'s figures they would add {cost['stand_in_s'] / 3600:,.1f} "
                        "GPU-hours (an assumption, not a measurement)" if cost.get("stand_in_arch") else ""))
    lines += [f"  from: {', '.join(cost['sources'])}"] if cost["sources"] else []
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if not args.pilot and not args.study:
        raise ValueError("plan needs --pilot STUDY with --half-width or --mde, or --study NAME (or both)")
    if args.pilot:
        if args.half_width is None and args.mde is None:
            raise ValueError("--pilot needs a target: --half-width POINTS or --mde POINTS")
        target = args.half_width if args.half_width is not None else args.mde
        if not target > 0:
            raise ValueError(f"--half-width / --mde {target!r}: expected a number of points > 0")
        plan = pilot_plan(_pilot_manifest(args.pilot, args.results_dir), args.results_dir.parent,
                          None if args.half_width is None else args.half_width / 100,
                          None if args.mde is None else args.mde / 100, args.metric, args.checkpoint, args.pairs,
                          args.all_pairings, args.pairings)
        print(format_pilot(plan))
    if args.study:
        print(format_study(study_cost(args.config, args.study, args.results_dir, args.benchmarks)))
    return 0
