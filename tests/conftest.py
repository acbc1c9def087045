"""Shared fixtures: a tiny real shard set built through the same CLI users run (`make demo-data` path)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Environment for every subprocess a test starts: offline W&B and hub, one gloo group on CPU.
TEST_ENV = {
    **os.environ,
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "HF_HUB_OFFLINE": "1",
    "ACCELERATE_USE_CPU": "1",
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """96 generated flower images of 5 classes, sharded at 32 px (about 10 val images)."""
    root = tmp_path_factory.mktemp("tiny")
    subprocess.run([sys.executable, "-m", "pipeline.demo_data", str(root / "images"), "--count", "96"],
                   check=True, cwd=ROOT, env=TEST_ENV, capture_output=True)
    subprocess.run([sys.executable, "-m", "pipeline.shards", str(root / "images"), "--name", "tiny", "--size", "32",
                    "--out", str(root / "shards"), "--workers", "1", "--max-samples-per-shard", "32"],
                   check=True, cwd=ROOT, env=TEST_ENV, capture_output=True)
    return root / "shards" / "tiny"


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """One local Slurm cluster (slurmctld + two slurmd on this host) shared by every test module that
    submits jobs: bringing it up costs seconds, so it is brought up once, when first asked for."""
    from slurm_cluster import SlurmCluster, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


@pytest.fixture
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state; tests that build accelerators of several precisions in
    this process (`pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")`) start and end clean."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _array_shards(root: Path, kind: str, name: str, size_flag: str, size: int, dims: int) -> Path:
    subprocess.run([sys.executable, "-m", "pipeline.demo_arrays", kind, str(root / "src"), "--count", "96",
                    size_flag, str(size)], check=True, cwd=ROOT, env=TEST_ENV, capture_output=True)
    subprocess.run([sys.executable, "-m", "pipeline.shards", str(root / "src"), "--name", name, "--spatial-dims",
                    str(dims), "--out", str(root / "shards"), "--workers", "1", "--max-samples-per-shard", "32"],
                   check=True, cwd=ROOT, env=TEST_ENV, capture_output=True)
    return root / "shards" / name


@pytest.fixture(scope="session")
def signal_shards(tmp_path_factory) -> Path:
    """96 generated chirp signals of 3 classes, 1 x 64 samples (.npy and a few .wav), sharded."""
    return _array_shards(tmp_path_factory.mktemp("signals"), "signals", "signals", "--length", 64, 1)


@pytest.fixture(scope="session")
def volume_shards(tmp_path_factory) -> Path:
    """96 generated ellipsoid volumes, 1 x 8 x 8 x 8 voxels, sharded (no classes)."""
    return _array_shards(tmp_path_factory.mktemp("volumes"), "volumes", "volumes", "--side", 8, 3)


def pytest_collection_modifyitems(config, items):
    """How `make test` spreads the suite over pytest-xdist workers (`--dist loadgroup`): every test that
    submits Slurm jobs runs on one worker (they share the session's one local cluster, and mostly wait on
    it while the other worker computes); the tests of a module with module-scoped fixtures (a trained
    run) stay together so each fixture is built once, or, where the module defines `xdist_group_of(item)`,
    the tests that share one of its fixtures' values (test_resume: one reference run per configuration);
    the rest go one by one to whichever worker is free. Without xdist the marks do nothing."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
        elif hasattr(item.module, "xdist_group_of"):  # the module says which of its tests share a fixture
            group = item.module.xdist_group_of(item)
            if group is not None:
                item.add_marker(pytest.mark.xdist_group(group))
        elif _has_module_fixtures(item.module):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


def _has_module_fixtures(module) -> bool:
    return any(getattr(getattr(obj, "_fixture_function_marker", None), "scope", None) == "module"
               for obj in vars(module).values())
