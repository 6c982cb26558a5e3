"""Shared test fixtures: one torch thread, RNG hygiene, MLflow kept inside tmp_path, the shared CIFAR subset, and
one finished tiny study for the whole session."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from tiny_study import STUDY_RETURNCODE, job_env

# ../shared/data beside the repository; a fresh clone has no ../shared, so tests needing it skip.
SHARED_CIFAR = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10_small.npz"


def pytest_configure(config: pytest.Config) -> None:
    # One thread per test process: the small tensors of these tests gain nothing from more, the machines running
    # them share their cores, and CPU results are reproducible bit for bit only at a fixed thread count.
    # Test modules that need another count set it themselves and restore the previous one.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def restore_torch_rng():
    """Tests that draw from the global generators do not change what later tests draw."""
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    yield
    torch.set_rng_state(cpu_state)
    if cuda_states is not None:
        torch.cuda.set_rng_state_all(cuda_states)


@pytest.fixture(autouse=True)
def isolated_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Anything that reaches MLflow writes to a store inside this test's tmp_path, never to ./mlruns."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return uri


@pytest.fixture
def shared_cifar() -> Path:
    """Path of the 5,000 + 1,000 image CIFAR-10 subset (see ../shared/data/README.md); skips where it is absent."""
    if not SHARED_CIFAR.is_file():
        pytest.skip(f"{SHARED_CIFAR} is absent (it lives beside the repository, not in a fresh clone)")
    return SHARED_CIFAR


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The end-to-end tests (marked slow) first, those that need no finished study before those that do: two xdist
    workers then run the unit tests beside and after them instead of ending the session on one long test while
    the other worker idles, and the session study builds in the background meanwhile (`start_finished_tiny_study`).
    The sort is stable: within a group, tests keep the order of their files."""
    def group(item: pytest.Item) -> int:
        if item.get_closest_marker("slow") is None:
            return 2
        return 1 if "finished_tiny_study" in item.fixturenames else 0

    items.sort(key=group)


def _session_root(request: pytest.FixtureRequest) -> Path:
    """The folder every xdist worker of this session shares (each worker's basetemp is one of its subfolders)."""
    root = request.getfixturevalue("tmp_path_factory").getbasetemp()
    return root.parent if hasattr(request.config, "workerinput") else root


def _start_study_build(root: Path) -> None:
    """Start `python tests/tiny_study.py DIR` in the background unless a worker of this session already did."""
    with FileLock(str(root / "finished_tiny_study.lock")):
        started = root / "finished_tiny_study.started"
        if not started.exists():
            started.touch()
            subprocess.Popen([sys.executable, str(Path(__file__).with_name("tiny_study.py")),
                              str(root / "finished_tiny_study")], env=job_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)


@pytest.fixture(scope="session", autouse=True)
def start_finished_tiny_study(request: pytest.FixtureRequest) -> None:
    """As the session starts, begin building the finished tiny study when a selected test needs it: its 2 minutes
    of snakemake jobs then overlap other tests instead of stalling the first test that asks for it."""
    if any("finished_tiny_study" in item.fixturenames for item in request.session.items):
        _start_study_build(_session_root(request))


@pytest.fixture(scope="session")
def finished_tiny_study(request: pytest.FixtureRequest) -> Path:
    """A folder where the real snakemake has run FINISHED_STUDY to the end (2 runs, their evaluations, the report,
    the MLflow store); its output is in snakemake_output.txt. Built once per session in the background (started
    by `start_finished_tiny_study`; every xdist worker waits for the same build) and shared: read it, or copy it
    with tiny_study.copy_finished_study before running anything in it."""
    root = _session_root(request)
    _start_study_build(root)
    workdir = root / "finished_tiny_study"
    returncode = workdir / STUDY_RETURNCODE
    deadline = time.monotonic() + 900
    while not returncode.is_file():
        assert time.monotonic() < deadline, f"the session's tiny study did not finish in 900 s: {workdir}"
        time.sleep(0.5)
    output = (workdir / "snakemake_output.txt").read_text()
    assert returncode.read_text() == "0", output[-6000:]
    return workdir
