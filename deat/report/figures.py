"""The study's figures (seaborn), each as .png and byte-stable .pdf. Every figure says in its title which
checkpoint it plots and, where it draws a band, that the band is ±1 sd over seeds; heatmaps share one colour scale
per figure. The plotted accuracy is the study's headline: PGD-10 robust test accuracy, or clean test accuracy in a
study trained without the attack (pgd_steps 0)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import statistics
from .formatting import MASKED, ordered
from .loading import label_of, methods_of
from .table_helpers import masked_points, masked_runs, pairs_of, varies_variant

log = logging.getLogger(__name__)
BAND = "band: ±1 sd over seeds"


@dataclass(frozen=True)
class Headline:
    """The accuracy a study's figures plot: its runs-frame column of the best checkpoint, and axis words."""

    metric: str
    axis: str

    def column(self, checkpoint: str = "best") -> str:
        return f"eval_{checkpoint}_{self.metric}"


def headline(protocol: dict) -> Headline:
    if protocol.get("pgd_steps") == 0:
        return Headline("clean_acc", "clean test acc. (%)")
    return Headline("pgd10_acc", "PGD-10 robust test acc. (%)")


def _pyplot():
    """matplotlib with the Agg backend (headless), imported only when figures are drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    return plt, sns


def _save(figure, figures_dir: Path, stem: str) -> list[Path]:
    paths = [figures_dir / f"{stem}.png", figures_dir / f"{stem}.pdf"]
    figure.savefig(paths[0], dpi=150, bbox_inches="tight", metadata={"Software": None})
    figure.savefig(paths[1], bbox_inches="tight", metadata={"CreationDate": None})  # byte-stable PDFs in git
    _pyplot()[0].close(figure)
    return paths


def _several_seeds(runs: pd.DataFrame) -> bool:
    return len(runs) > 0 and runs.groupby(["arch", "method", "variant", "lr", "batch_size"]).seed.nunique().max() >= 2


def _percent(runs: pd.DataFrame, head: Headline) -> pd.DataFrame:
    """Runs with a best-checkpoint headline accuracy, in percent, with display labels for the legends."""
    data = runs.dropna(subset=[head.column()])
    return data.assign(acc=100 * data[head.column()], Method=data.label,
                       batch=data.batch_size.map(lambda b: f"b={b}"), ratio=data.lr / data.batch_size)


def _labels(runs: pd.DataFrame) -> list[str]:
    return [label_of(runs, m) for m in methods_of(runs)]


def _title(grid, text: str) -> None:
    grid.figure.suptitle(text, y=1.04, fontsize=9)


def figure_accuracy_vs_lr(runs: pd.DataFrame, head: Headline, figures_dir: Path, skipped: list[str]) -> list[Path]:
    """Paper Fig. 4: accuracy (best checkpoint) against α, one panel per arch, one line per method (and batch
    size), mean over seeds with a ±1 sd band where there are several seeds."""
    stem = "robust_acc_vs_lr" if head.metric == "pgd10_acc" else "clean_acc_vs_lr"
    data = _percent(runs, head)
    if data.lr.nunique() < 2:
        skipped.append(f"{stem}: fewer than 2 learning rates with a {head.metric} result")
        return []
    plt, sns = _pyplot()
    style = "variant" if data.variant.nunique() > 1 else "batch" if data.batch_size.nunique() > 1 else None
    band = _several_seeds(data)
    grid = sns.relplot(data=data, kind="line", x="lr", y="acc", hue="Method", hue_order=_labels(data),
                       style=style, col="arch", marker="o", errorbar="sd" if band else None, height=3.2, aspect=1.1)
    grid.set(xscale="log")
    grid.set_axis_labels("α (learning rate)", head.axis)
    _title(grid, f"best checkpoint, mean over seeds; {BAND}" if band else "best checkpoint, one seed")
    return _save(grid.figure, figures_dir, stem)


def _middle(values) -> float:
    ordered_values = sorted(set(values))
    return ordered_values[len(ordered_values) // 2]


PER_EPOCH_RULE = ("each method at the middle α of its own grid (the upper middle for an even count), the middle b "
                  "and its first sweep variant: a fixed rule on the grid, not a choice by any accuracy")


def per_epoch_points(runs: pd.DataFrame) -> list[dict]:
    """The grid point the per-epoch figure shows for each method (PER_EPOCH_RULE), for the figure and for
    summary.json."""
    points = []
    for method in methods_of(runs):
        grid = runs[runs.method == method]
        points.append({"method": method, "lr": float(_middle(grid.lr)), "batch_size": int(_middle(grid.batch_size)),
                       "variant": grid.variant.iloc[0]})
    return points


def figure_accuracy_per_epoch(runs: pd.DataFrame, epochs: pd.DataFrame, head: Headline, figures_dir: Path,
                              skipped: list[str]) -> list[Path]:
    """Paper Fig. 5: training and test accuracy per epoch for each method, one panel per arch. Each method is
    shown at the middle α of its own grid (upper middle for an even count), the middle b and its first sweep
    variant; mean over seeds, ±1 sd band with several seeds. Test: training's own end-of-epoch evaluation; train:
    the running accuracy over the epoch under the training attack."""
    stem = "robust_acc_per_epoch" if head.metric == "pgd10_acc" else "clean_acc_per_epoch"
    if epochs.empty:
        skipped.append(f"{stem}: no metrics.json with epochs")
        return []
    selected = []
    for point in per_epoch_points(runs):
        method, lr, batch_size, variant = (point[k] for k in ("method", "lr", "batch_size", "variant"))
        rows = epochs[(epochs.method == method) & (epochs.lr == lr) & (epochs.batch_size == batch_size)
                      & (epochs.variant == variant)]
        label = f"{label_of(runs, method)} (α={lr:g}, b={batch_size}" + (f", {variant})" if variant else ")")
        selected.append(rows.assign(Method=label))
    data = pd.concat(selected)
    if data.empty:
        skipped.append(f"{stem}: no epochs at the middle grid point")
        return []
    if head.metric == "pgd10_acc":
        splits = {"train_robust_acc": "train (running, training attack)", "test_pgd_acc": "test (PGD, end of epoch)"}
        axis = "robust accuracy (%)"
    else:
        splits = {"train_robust_acc": "train (running)", "test_clean_acc": "test clean (end of epoch)"}
        axis = "accuracy (%)"
    long = data.melt(id_vars=["arch", "Method", "seed", "epoch"], value_vars=list(splits), var_name="split",
                     value_name="accuracy")
    long = long.assign(accuracy=100 * long.accuracy, split=long.split.map(splits))
    plt, sns = _pyplot()
    band = data.groupby("Method").seed.nunique().max() >= 2
    grid = sns.relplot(data=long, kind="line", x="epoch", y="accuracy", hue="Method", style="split", col="arch",
                       errorbar="sd" if band else None, height=3.2, aspect=1.1)
    grid.set_axis_labels("epoch", axis)
    for axis_ in grid.axes.flat:
        axis_.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # epochs are whole numbers
    _title(grid, "every epoch (training's own evaluation, no checkpoint choice)" + (f"; {BAND}" if band else ""))
    return _save(grid.figure, figures_dir, stem)


NOISE_SDS = 2  # a heatmap's colour range spans at least ± this many binomial sds of one cell's mean


def noise_sd(percent: float, n_examples: float, n_seeds: float) -> float:
    """Binomial sd (points) of a seed-mean accuracy of ``percent`` % over ``n_seeds`` runs evaluated on
    ``n_examples`` test images each, √(p(1 − p)/(n·k)): the size of a difference the test images alone make
    (runs on the same images share part of it). NaN where n is unknown."""
    if pd.isna(n_examples) or not n_examples > 0 or pd.isna(percent):
        return float("nan")
    p = min(max(percent / 100, 0.0), 1.0)
    return 100 * (p * (1 - p) / (n_examples * max(n_seeds, 1))) ** 0.5


def _noise(runs: pd.DataFrame, values: pd.Series) -> tuple[float, str]:
    """The binomial sd of one heatmap cell's mean (at the cells' mean accuracy, the median evaluation size and
    seeds per point) and its words for a title."""
    n_examples = runs.eval_n_examples.dropna().median() if "eval_n_examples" in runs else float("nan")
    seeds = float(runs.groupby(["arch", "method", "variant", "lr", "batch_size"]).seed.nunique().median())
    sd = noise_sd(float(values.mean()), n_examples, seeds)
    words = "" if pd.isna(sd) else (f"1 sd = {sd:.1f} points at {int(n_examples)} test images, {seeds:g} "
                                    f"seed{'' if seeds == 1 else 's'}")
    return sd, words


def _shared_scale(tables: list[pd.DataFrame], sd: float = float("nan")) -> dict:
    """One colour scale for every panel of a figure (the same colour is the same accuracy), spanning at least
    ± NOISE_SDS binomial sds of one cell around the cells' midpoint, so that differences within the noise do not
    fill the whole colour range."""
    values = pd.concat([t.stack() for t in tables])
    low, high = float(values.min()), float(values.max())
    if not pd.isna(sd) and high - low < 2 * NOISE_SDS * sd:
        middle = (low + high) / 2
        low, high = middle - NOISE_SDS * sd, middle + NOISE_SDS * sd
    return {"vmin": low, "vmax": high}


def _annotations(table: pd.DataFrame, flagged: set) -> pd.DataFrame:
    """Cell texts: the value to 1 decimal, with † where a run of the cell flagged gradient masking (as in the
    tables)."""
    return pd.DataFrame([[("" if pd.isna(v) else f"{v:.1f}") + (MASKED if (row, column) in flagged else "")
                          for column, v in table.loc[row].items()] for row in table.index],
                        index=table.index, columns=table.columns)


def figure_heatmap(runs: pd.DataFrame, head: Headline, figures_dir: Path, skipped: list[str]) -> list[Path]:
    """Seed-mean accuracy (best checkpoint) over the α × b grid, one heatmap per arch (rows) and method
    (columns), one colour scale for all that spans at least ±2 binomial sds of a cell (stated in the title), †
    where a cell's runs flagged gradient masking; and per objective with both outer steps a Δ panel
    (DEAT − SGD-momentum) on a diverging scale centred at 0, symmetric, at least ±2 binomial sds of a Δ."""
    if runs.lr.nunique() < 2 or runs.batch_size.nunique() < 2:
        skipped.append("heatmap_lr_batch: the study does not vary both α and b")
        return []
    if varies_variant(runs):
        skipped.append("heatmap_lr_batch: the study also sweeps other settings; see sweep_sensitivity")
        return []
    if runs[head.column()].isna().all():
        skipped.append(f"heatmap_lr_batch: no run has a {head.metric} result")
        return []
    plt, sns = _pyplot()
    archs, methods, pairs = ordered(runs.arch), methods_of(runs), pairs_of(runs)
    means = statistics.seed_stats(runs, head.column())
    tables = {(arch, method): (100 * means[(means.arch == arch) & (means.method == method)]
                               .pivot(index="batch_size", columns="lr", values="mean")).sort_index(ascending=False)
              for arch in archs for method in methods}
    masked = {(arch, method, b, lr) for arch, method, _, lr, b in
              (masked_points(runs, "best") if head.metric != "clean_acc" else set())}
    sd, noise_words = _noise(runs, pd.concat([t.stack() for t in tables.values()]))
    scale = _shared_scale(list(tables.values()), sd)
    panels = len(methods) + len(pairs)
    figure, axes = plt.subplots(len(archs), panels, figsize=(4.2 * panels, 3.2 * len(archs)), squeeze=False)
    for i, arch in enumerate(archs):
        for j, method in enumerate(methods):
            table = tables[(arch, method)]
            flagged = {(b, lr) for a, m, b, lr in masked if (a, m) == (arch, method)}
            sns.heatmap(table, annot=_annotations(table, flagged), fmt="", cmap="viridis", ax=axes[i][j], **scale,
                        cbar=j == len(methods) - 1, cbar_kws={"label": head.axis})
            axes[i][j].set(title=f"{arch} {label_of(runs, method)}", xlabel="α", ylabel="b")
        for k, (_, baseline, treatment) in enumerate(pairs):
            delta = tables[(arch, treatment)] - tables[(arch, baseline)]
            reach = max(float(delta.abs().max().max()), 0.0 if pd.isna(sd) else NOISE_SDS * sd * 2 ** 0.5)
            axis = axes[i][len(methods) + k]
            sns.heatmap(delta, annot=True, fmt="+.1f", cmap="vlag", center=0, vmin=-reach, vmax=reach, ax=axis,
                        cbar_kws={"label": "Δ (points)"})
            axis.set(title=f"{arch} Δ {label_of(runs, treatment)} − {label_of(runs, baseline)}", xlabel="α",
                     ylabel="b")
    title = f"{head.axis.removesuffix(' (%)')}, best checkpoint, seed mean; one colour scale " \
        f"{scale['vmin']:.1f}–{scale['vmax']:.1f} %" + (f", at least ±{NOISE_SDS} binomial sds of a cell mean "
                                                         f"({noise_words})" if noise_words else "")
    if pairs:
        title += "; Δ centred at 0, symmetric" + (f", at least ±{NOISE_SDS} binomial sds of a Δ (√2 × a cell's)"
                                                  if noise_words else "")
    if masked:
        title += f"; {MASKED} gradient-masking flag"
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return _save(figure, figures_dir, "heatmap_lr_batch")


def figure_sweep_heatmap(runs: pd.DataFrame, head: Headline, figures_dir: Path, skipped: list[str]) -> list[Path]:
    """Seed-mean accuracy (best checkpoint) over a two-axis sweep (e.g. k1 × k2), one heatmap per arch and
    method, one colour scale for all spanning at least ±2 binomial sds of a cell (stated in the title), † where a
    cell's runs flagged gradient masking."""
    axes_names = [c[len("sweep_"):] for c in runs.columns if c.startswith("sweep_")]
    if len(axes_names) != 2:
        skipped.append(f"heatmap_sweep: needs exactly two sweep axes, the study has {len(axes_names)}")
        return []
    if runs.lr.nunique() > 1 or runs.batch_size.nunique() > 1:
        skipped.append("heatmap_sweep: the study also varies α or b; see sweep_sensitivity")
        return []
    data = _percent(runs, head)
    if data.empty:
        skipped.append(f"heatmap_sweep: no run has a {head.metric} result")
        return []
    plt, sns = _pyplot()
    panels = ordered(zip(data.arch, data.method))
    row_key, column_key = (f"sweep_{name}" for name in axes_names)
    tables = [data[(data.arch == arch) & (data.method == method)].pivot_table(
        index=row_key, columns=column_key, values="acc", aggfunc="mean").sort_index(ascending=False)
        for arch, method in panels]
    flagged_runs = masked_runs(data, ["best"]) if head.metric != "clean_acc" else data.iloc[:0]
    sd, noise_words = _noise(data, pd.concat([t.stack() for t in tables]))
    scale = _shared_scale(tables, sd)
    figure, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.4), squeeze=False)
    for index, (axis, (arch, method), table) in enumerate(zip(axes[0], panels, tables)):
        mine = flagged_runs[(flagged_runs.arch == arch) & (flagged_runs.method == method)]
        flagged = set(zip(mine[row_key], mine[column_key]))
        sns.heatmap(table, annot=_annotations(table, flagged), fmt="", cmap="viridis", ax=axis, **scale,
                    cbar=index == len(panels) - 1, cbar_kws={"label": head.axis})
        axis.set(title=f"{arch} {label_of(runs, method)} α={data.lr.iloc[0]:g}", xlabel=axes_names[1],
                 ylabel=axes_names[0])
    title = f"{head.axis.removesuffix(' (%)')}, best checkpoint, seed mean; colour scale " \
        f"{scale['vmin']:.1f}–{scale['vmax']:.1f} %" + (f", at least ±{NOISE_SDS} binomial sds of a cell mean "
                                                         f"({noise_words})" if noise_words else "")
    figure.suptitle(title + (f"; {MASKED} gradient-masking flag" if len(flagged_runs) else ""), fontsize=9)
    figure.tight_layout()
    return _save(figure, figures_dir, "heatmap_sweep")


def figure_accuracy_vs_ratio(runs: pd.DataFrame, head: Headline, figures_dir: Path,
                             skipped: list[str]) -> list[Path]:
    """Accuracy (best checkpoint, seed mean) against α/b (the paper's claim, which it tested only at b = 128).
    Grid points that share an α/b ratio with a different (α, b) are ringed and joined: if α/b alone set the
    accuracy they would coincide."""
    stem = "robust_acc_vs_lr_over_b" if head.metric == "pgd10_acc" else "clean_acc_vs_lr_over_b"
    data = _percent(runs, head)
    if data.batch_size.nunique() < 2:
        skipped.append(f"{stem}: one batch size, α/b is α rescaled (see the figure against α)")
        return []
    point_keys = ["arch", "method", "label", "Method", "variant", "lr", "batch_size", "batch", "ratio"]
    means = data.groupby(point_keys, as_index=False).acc.mean()
    plt, sns = _pyplot()
    from matplotlib import ticker

    grid = sns.relplot(data=means, kind="scatter", x="ratio", y="acc", hue="Method", hue_order=_labels(means),
                       style="batch", col="arch", s=50, height=3.2, aspect=1.1)
    equal_ratio_points = 0
    for arch, axis in grid.axes_dict.items():
        for _, group in means[means.arch == arch].groupby(["method", "variant", means.ratio.round(12)]):
            if group.batch_size.nunique() < 2:
                continue
            equal_ratio_points += len(group)
            axis.plot(group.ratio, group.acc, color="0.3", linestyle=":", linewidth=1)
            axis.scatter(group.ratio, group.acc, s=160, facecolors="none", edgecolors="black", linewidths=1,
                         label="_equal α/b")
        axis.set_xscale("log")
        # Ticks at 1, 2 and 5 per decade: matplotlib's labelled minor ticks overlap on a range this short.
        axis.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.xaxis.set_major_formatter(ticker.LogFormatterSciNotation(labelOnlyBase=False))
        axis.xaxis.set_minor_formatter(ticker.NullFormatter())
    if equal_ratio_points:
        grid.figure.text(0.01, -0.02, "ringed and joined: same α/b from different (α, b)", fontsize=8)
    else:
        log.info("%s: no two grid points share α/b; nothing to ring", stem)
    grid.set_axis_labels("α / b", head.axis)
    _title(grid, "best checkpoint, seed mean per grid point")
    return _save(grid.figure, figures_dir, stem)


def figure_weight_averaging(runs: pd.DataFrame, epochs: pd.DataFrame, figures_dir: Path,
                            skipped: list[str]) -> list[Path]:
    """Per-epoch test PGD accuracy of every run with an EMA of its weights: the raw model and the average, per method
    (mean over seeds, ±1 sd band with several seeds); training's own end-of-epoch evaluation."""
    averaged = runs[runs.ema_tau > 0] if "ema_tau" in runs else runs.iloc[:0]
    keys = ["method", "lr", "batch_size", "variant"]
    data = epochs.merge(averaged[keys].drop_duplicates(), on=keys)
    if data.empty or data.ema_test_pgd_acc.isna().all():
        skipped.append("weight_averaging_per_epoch: no run with a weight average and its per-epoch evaluation")
        return []
    long = data.melt(id_vars=["label", "seed", "epoch"], value_vars=["test_pgd_acc", "ema_test_pgd_acc"],
                     var_name="model", value_name="accuracy")
    long = long.assign(accuracy=100 * long.accuracy,
                       model=long.model.map({"test_pgd_acc": "raw", "ema_test_pgd_acc": "EMA"}))
    plt, sns = _pyplot()
    band = data.seed.nunique() >= 2
    grid = sns.relplot(data=long, kind="line", x="epoch", y="accuracy", hue="label", style="model",
                       errorbar="sd" if band else None, height=3.2, aspect=1.4)
    grid.set_axis_labels("epoch", "test PGD accuracy (%)")
    grid.legend.set_title("")
    _title(grid, "raw model and weight average, every epoch (training's own evaluation)"
           + (f"; {BAND}" if band else ""))
    return _save(grid.figure, figures_dir, "weight_averaging_per_epoch")


def figure_mechanism(runs: pd.DataFrame, epochs: pd.DataFrame, figures_dir: Path, skipped: list[str]) -> list[Path]:
    """The probes per epoch (diffusion and update noise, log scale, per method and α/b) and, per run, the mean
    diffusion against the robust gap measured alike."""
    from .mechanism_tables import has_probes, run_probes

    if not has_probes(epochs):
        skipped.append("diffusion_per_epoch: no probed epochs (train.probe_every 0)")
        return []
    probed = epochs.dropna(subset=["probe_diffusion"]).assign(**{"α/b": lambda e: (e.lr / e.batch_size).map(
        lambda v: f"{v:.3g}")})
    long = probed.melt(id_vars=["label", "α/b", "seed", "epoch"],
                       value_vars=["probe_diffusion", "probe_update_trace_cov"], var_name="probe", value_name="value")
    long = long.assign(probe=long.probe.map({"probe_diffusion": "diffusion (α/b)·tr Σ",
                                             "probe_update_trace_cov": "update noise tr Cov(Δθ)"}))
    plt, sns = _pyplot()
    grid = sns.relplot(data=long, kind="line", x="epoch", y="value", hue="α/b", style="label", col="probe",
                       errorbar=None, height=3.2, aspect=1.1, facet_kws={"sharey": False})
    grid.set(yscale="log")
    _title(grid, "the probes every few epochs (mean over seeds)")
    written = _save(grid.figure, figures_dir, "diffusion_per_epoch")
    data = run_probes(runs, epochs).dropna(subset=["probe_diffusion", "robust_gap"])
    if data.empty:
        skipped.append("diffusion_vs_robust_gap: no run with both probes and the robust gap (eval train_examples)")
        return written
    data = data.assign(**{"robust gap (pp)": 100 * data.robust_gap, "α/b": data.alpha_over_b.map(lambda v: f"{v:.3g}")})
    figure, axis = plt.subplots(figsize=(4.8, 3.4))
    sns.scatterplot(data=data, x="probe_diffusion", y="robust gap (pp)", hue="α/b", style="label", ax=axis)
    axis.set_xscale("log")
    axis.set_xlabel("mean diffusion (α/b)·tr Σ over probe epochs")
    axis.set_title("diffusion against the robust gap, one point per run", fontsize=9)
    return written + _save(figure, figures_dir, "diffusion_vs_robust_gap")
