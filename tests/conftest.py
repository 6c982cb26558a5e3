"""Shared test fixtures: one torch thread, RNG hygiene, MLflow kept inside tmp_path, the shared CIFAR subset, and
one finished tiny study for the whole session."""

from pathlib import Path

import pytest
import torch
from filelock import FileLock
from tiny_study import FINISHED_STUDY, snakemake, write_config

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


@pytest.fixture(scope="session")
def finished_tiny_study(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A folder where the real snakemake has run FINISHED_STUDY to the end (2 runs, their evaluations, the report,
    the MLflow store); its output is in snakemake_output.txt. Built once per session, whichever xdist worker asks
    first (the others wait on a file lock), and shared: read it, or copy it before running anything in it."""
    root = tmp_path_factory.getbasetemp()
    if hasattr(request.config, "workerinput"):  # an xdist worker: its basetemp is one of the session's
        root = root.parent
    workdir = root / "finished_tiny_study"
    with FileLock(str(root / "finished_tiny_study.lock")):
        if not (workdir / "snakemake_output.txt").is_file():
            write_config(workdir, FINISHED_STUDY)
            result = snakemake(workdir, "--cores", "2", timeout=900)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            (workdir / "snakemake_output.txt").write_text(result.stdout + result.stderr)
    return workdir
