"""The MLflow UI as a user sees it: a finished tiny study served by `mlflow ui` on 127.0.0.1 and opened in
headless Chromium. Checks that the URL the README gives opens the runs table (not MLflow 3's GenAI overview),
that the study's parent run, its child runs and a metric chart are on screen, and keeps screenshots.

    python tests/ui/check_mlflow_ui.py [--workdir DIR] [--screenshot docs/img/mlflow_ui.png]
        [--readme-screenshot docs/img/mlflow_ui_runs.png]

DIR holds a finished study (results/mlflow/mlflow.db) run with `mlflow: {log_model: true}`; without --workdir a
tiny one (two runs, two epochs, tests/tiny_study.py's FINISHED_STUDY) is run first with snakemake in a temporary
folder. Needs Debian's `chromium` (apt-get install chromium). Exit code 0
means every check passed.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "tests"))

from deat import server  # noqa: E402
from tiny_study import FINISHED_STUDY, snakemake, write_config  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1400,900",
                  # MLflow draws a chart once it scrolls into view; under virtual time that needs real frames.
                  "--run-all-compositor-stages-before-draw"]
# Virtual time Chromium gives the page's JavaScript (fetches from the server, React rendering) before it dumps
# the DOM or takes the screenshot.
RENDER_BUDGET_MS = "30000"


def find_chromium() -> str | None:
    return next((path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None)


def run_tiny_study(workdir: Path) -> None:
    write_config(workdir, FINISHED_STUDY)  # logs each run's best model, as the check needs
    result = snakemake(workdir, "--cores", "2", timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"the tiny study failed:\n{result.stderr[-3000:]}")


def study_runs(store: str) -> tuple[str, dict, list]:
    """(experiment id, the parent run, its child runs) as MLflow holds them."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("deat")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("deat.role") == "study")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return experiment.experiment_id, parent, children


def opens_best_model(store: str, run_id: str) -> bool:
    """Whether the run's `best_model` artifact loads with mlflow.pytorch.load_model and gives (B, classes) logits."""
    import mlflow
    import mlflow.pytorch
    import torch

    mlflow.set_tracking_uri(store)
    model = mlflow.pytorch.load_model(f"runs:/{run_id}/best_model")
    with torch.no_grad():
        logits = model(torch.full((2, 1, 28, 28), 0.5))  # the tiny study's mnist5k digits
    return tuple(logits.shape) == (2, 10)


def readme_url() -> tuple[str, str]:
    """(experiment id, the part after host:port) of the runs-table URL the README tells a user to open."""
    match = re.search(r"http://127\.0\.0\.1:5000(/#/experiments/(\d+)\?workflowType=machine_learning)",
                      (REPO / "README.md").read_text(encoding="utf-8"))
    if match is None:
        raise RuntimeError("README.md gives no http://127.0.0.1:5000/#/experiments/<id>?workflowType=... URL")
    return match.group(2), match.group(1)


def visible_text(dom: str) -> str:
    """The words of a dumped page, tags, scripts and styles removed."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


def chromium(browser: str, profile: Path, url: str, *action: str, height: int = 900) -> str:
    """Chromium's output for `url` (with --dump-dom: the rendered page); `height`: the window's, in pixels."""
    flags = [f"--window-size=1400,{height}" if flag.startswith("--window-size=") else flag for flag in CHROMIUM_FLAGS]
    result = subprocess.run([browser, *flags, f"--user-data-dir={profile}",
                             f"--virtual-time-budget={RENDER_BUDGET_MS}", *action, url],
                            capture_output=True, text=True, timeout=180)
    if result.returncode != 0:
        raise RuntimeError(f"chromium failed on {url}: {result.stderr[-2000:]}")
    return result.stdout


def check(condition: bool, what: str, failures: list[str]) -> None:
    print(("ok   " if condition else "FAIL ") + what)
    if not condition:
        failures.append(what)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="folder of a finished study (default: run a tiny one)")
    parser.add_argument("--screenshot", type=Path, default=REPO / "docs/img/mlflow_ui.png",
                        help="where to keep the screenshot of a run's charts (default: docs/img/mlflow_ui.png)")
    parser.add_argument("--readme-screenshot", type=Path, default=REPO / "docs/img/mlflow_ui_runs.png",
                        help="where to keep the screenshot of the page the README's URL opens "
                             "(default: docs/img/mlflow_ui_runs.png)")
    args = parser.parse_args(argv)
    browser = find_chromium()
    if browser is None:
        print("chromium is not installed (apt-get install chromium)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="deat-ui-") as scratch:
        scratch = Path(scratch)
        workdir = args.workdir or scratch / "study"
        if args.workdir is None:
            run_tiny_study(workdir)
        store = f"sqlite:///{(workdir / 'results/mlflow/mlflow.db').resolve()}"
        experiment_id, parent, children = study_runs(store)
        port = server.free_port()
        uri = f"http://{server.HOST}:{port}"
        log = scratch / "mlflow_ui.log"
        ui = server.launch("ui", store, port, log)
        failures: list[str] = []
        try:
            server.wait_until_healthy(uri, ui, log)
            experiment_page = f"{uri}/#/experiments/{experiment_id}"
            readme_id, readme_path = readme_url()
            check(readme_id == experiment_id, f"the README's experiment id {readme_id} is the study's "
                  f"({experiment_id})", failures)
            text = visible_text(chromium(browser, scratch / "readme-profile", uri + readme_path, "--dump-dom"))
            check(parent.info.run_name in text and f"{1 + len(children)} matching runs" in text
                  and "Run Name" in text and "Observability" not in text,  # GenAI's side bar has Observability
                  f"the README's URL opens the runs table: {parent.info.run_name!r} over {1 + len(children)} runs",
                  failures)
            args.readme_screenshot.parent.mkdir(parents=True, exist_ok=True)
            chromium(browser, scratch / "readme-profile", uri + readme_path,
                     f"--screenshot={args.readme_screenshot.resolve()}")
            check(args.readme_screenshot.is_file() and args.readme_screenshot.stat().st_size > 10_000,
                  f"screenshot {args.readme_screenshot} written", failures)
            text = visible_text(chromium(browser, scratch / "profile", f"{experiment_page}/runs", "--dump-dom"))
            check(parent.info.run_name in text and f"{1 + len(children)} matching runs" in text,
                  f"runs table shows the parent run {parent.info.run_name!r} over {1 + len(children)} runs", failures)
            # The table folds child runs under their parent; the parent's own page names them.
            text = visible_text(chromium(browser, scratch / "profile", f"{experiment_page}/runs/{parent.info.run_id}",
                                         "--dump-dom"))
            check("Status Finished" in text, f"parent run {parent.info.run_name!r} shows status Finished", failures)
            for child in children:
                check("Child runs" in text and child.info.run_name in text,
                      f"parent run page lists child run {child.info.run_name!r}", failures)
            chart_page = (f"{experiment_page}/runs/{children[0].info.run_id}/model-metrics"
                          "?workflowType=machine_learning")
            # MLflow orders chart sections by metric prefix, alphabetically: the per-epoch curves (epoch/...) come
            # before the evaluation (eval/...) and the single values (summary/...). A tall window renders them all;
            # a per-epoch chart has a Step axis.
            text = visible_text(dom := chromium(browser, scratch / "profile", chart_page, "--dump-dom", height=8000))
            check("js-plotly-plot" in dom and re.search(r"epoch/test_pgd_acc.*Step", text) is not None,
                  f"child run {children[0].info.run_name!r} shows per-epoch curves (plotly) incl. test_pgd_acc",
                  failures)
            first = {name: text.find(name) for name in ("epoch/test_pgd_acc", "eval/best", "summary/best")}
            check(-1 < first["epoch/test_pgd_acc"] < min(v for v in first.values() if v > -1) + 1,
                  f"the per-epoch curves come first on the run's chart page ({first})", failures)
            # The best checkpoint logged as an MLflow model: MLflow 3 lists a run's logged models on its overview
            # page (not under Artifacts), and it opens.
            overview = f"{experiment_page}/runs/{children[0].info.run_id}?workflowType=machine_learning"
            text = visible_text(chromium(browser, scratch / "profile", overview, "--dump-dom"))
            check("best_model" in text, f"child run {children[0].info.run_name!r} lists its logged model best_model",
                  failures)
            check(opens_best_model(store, children[0].info.run_id), "mlflow.pytorch.load_model opens best_model "
                  "and it classifies a batch", failures)
            args.screenshot.parent.mkdir(parents=True, exist_ok=True)
            chromium(browser, scratch / "profile", chart_page, f"--screenshot={args.screenshot.resolve()}")
            check(args.screenshot.is_file() and args.screenshot.stat().st_size > 10_000,
                  f"screenshot {args.screenshot} written", failures)
        finally:
            server.stop_process_group(ui.pid)
        if failures:
            print(f"{len(failures)} check(s) failed; mlflow log: {log}", file=sys.stderr)
            print(json.dumps(failures, indent=1), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
