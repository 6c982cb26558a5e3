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
from .formatting import ordered
from .loading import label_of, methods_of
from .table_helpers import varies_variant

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
    for method in methods_of(runs):
        grid = runs[runs.method == method]
        lr, batch_size, variant = _middle(grid.lr), _middle(grid.batch_size), grid.variant.iloc[0]
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


def _shared_scale(tables: list[pd.DataFrame]) -> dict:
    """One colour scale for every panel of a figure: the same colour is the same accuracy."""
    values = pd.concat([t.stack() for t in tables])
    return {"vmin": float(values.min()), "vmax": float(values.max())}


def figure_heatmap(runs: pd.DataFrame, head: Headline, figures_dir: Path, skipped: list[str]) -> list[Path]:
    """Seed-mean accuracy (best checkpoint) over the α × b grid, one heatmap per arch (rows) and method
    (columns), one colour scale for all."""
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
    archs, methods = ordered(runs.arch), methods_of(runs)
    means = statistics.seed_stats(runs, head.column())
    tables = {(arch, method): (100 * means[(means.arch == arch) & (means.method == method)]
                               .pivot(index="batch_size", columns="lr", values="mean")).sort_index(ascending=False)
              for arch in archs for method in methods}
    scale = _shared_scale(list(tables.values()))
    figure, axes = plt.subplots(len(archs), len(methods), figsize=(4.2 * len(methods), 3.2 * len(archs)),
                                squeeze=False)
    for i, arch in enumerate(archs):
        for j, method in enumerate(methods):
            sns.heatmap(tables[(arch, method)], annot=True, fmt=".1f", cmap="viridis", ax=axes[i][j], **scale,
                        cbar=j == len(methods) - 1, cbar_kws={"label": head.axis})
            axes[i][j].set(title=f"{arch} {label_of(runs, method)}", xlabel="α", ylabel="b")
    figure.suptitle(f"{head.axis.removesuffix(' (%)')}, best checkpoint, seed mean; one colour scale", fontsize=9)
    figure.tight_layout()
    return _save(figure, figures_dir, "heatmap_lr_batch")


def figure_sweep_heatmap(runs: pd.DataFrame, head: Headline, figures_dir: Path, skipped: list[str]) -> list[Path]:
    """Seed-mean accuracy (best checkpoint) over a two-axis sweep (e.g. k1 × k2), one heatmap per arch and
    method, one colour scale for all."""
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
    scale = _shared_scale(tables)
    figure, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.4), squeeze=False)
    for index, (axis, (arch, method), table) in enumerate(zip(axes[0], panels, tables)):
        sns.heatmap(table, annot=True, fmt=".1f", cmap="viridis", ax=axis, **scale,
                    cbar=index == len(panels) - 1, cbar_kws={"label": head.axis})
        axis.set(title=f"{arch} {label_of(runs, method)} α={data.lr.iloc[0]:g}", xlabel=axes_names[1],
                 ylabel=axes_names[0])
    figure.suptitle(f"{head.axis.removesuffix(' (%)')}, best checkpoint, seed mean", fontsize=9)
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
