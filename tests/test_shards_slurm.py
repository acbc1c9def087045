"""Sharding on a SLURM array (slurm/shards.sbatch, `python -m pipeline.shards ... --slurm`, what
`make shards-slurm` runs) on the local two-node Slurm cluster: an array of 3 tasks and the merge job
after it write shards byte-identical to one `python -m pipeline.shards` process on the same folder;
a task that failed (its part gone) leaves no shard set, the merge says which task to resubmit, and
that task resubmitted alone completes the same set."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT, TEST_ENV

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

OPTIONS = ["--size", "24", "--max-samples-per-shard", "6", "--val-fraction", "0.2", "--workers", "1"]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """30 generated photo-sized JPEGs of 5 classes, a PNG and its BMP twin (a duplicate), a broken file."""
    root = tmp_path_factory.mktemp("slurm-shards")
    subprocess.run([sys.executable, "-m", "pipeline.demo_data", str(root / "images"), "--count", "30"],
                   check=True, cwd=ROOT, env=TEST_ENV, capture_output=True)
    classes = sorted(p for p in (root / "images").iterdir() if p.is_dir())
    img = Image.open(next(classes[0].glob("*.jpg"))).convert("RGB")
    img.save(classes[0] / "twin.png")
    img.save(classes[1] / "twin.bmp")  # the same pixels in another class folder: stored once
    (classes[2] / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root / "images"


def files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def job_env(cluster) -> dict:
    env = {k: v for k, v in TEST_ENV.items() if k != "OMP_NUM_THREADS"}
    env.update({**cluster.env, "VIRTUAL_ENV": sys.prefix,
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})
    return env


def submit(cluster, source: Path, out: Path, *extra: str) -> tuple[str, str]:
    """What `make shards-slurm` runs: python -m pipeline.shards ... --parts 3 --slurm -- <sbatch options>."""
    r = subprocess.run([sys.executable, "-m", "pipeline.shards", str(source), "--name", "set", "--out", str(out),
                        *OPTIONS, "--parts", "3", "--slurm", "--", "--cpus-per-task=1",
                        f"--output={out}/slurm-%j.out", *extra],
                       cwd=ROOT, env=job_env(cluster), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    array, merge = re.search(r"submitted array job (\d+) \(3 tasks\) and merge job (\d+)", r.stdout).groups()
    return array, merge


def logs(out: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(out.glob("slurm-*.out")))


def test_array_of_3_and_merge_equal_one_process_byte_for_byte(cluster, source, tmp_path):
    subprocess.run([sys.executable, "-m", "pipeline.shards", str(source), "--name", "set", "--out",
                    str(tmp_path / "one"), *OPTIONS, "--no-progress"], check=True, cwd=ROOT, env=TEST_ENV,
                   capture_output=True)
    reference = files(tmp_path / "one" / "set")
    assert len([f for f in reference if f.endswith(".tar")]) >= 4  # several shards in both splits

    out = tmp_path / "array"
    out.mkdir()  # for the jobs' output files
    array, merge = submit(cluster, source, out)
    cluster.wait_done(merge, timeout_s=240)
    text = logs(out)
    assert files(out / "set") == reference, text[-4000:]  # every shard and manifest.json, byte for byte
    assert "part 0 (array job" in text and "part 2 (array job" in text and "merge (job" in text
    assert "JobState=COMPLETED" in cluster.scontrol("show", "job", merge)
    assert not (out / ".set.parts").exists()


def test_a_failed_task_leaves_no_set_and_is_resubmitted_alone(cluster, source, tmp_path):
    out = tmp_path / "array"
    job_args = [str(source), "--name", "set", "--out", str(out), *OPTIONS, "--parts", "3"]
    sbatch = ["--cpus-per-task=1", f"--output={out}/slurm-%j.out"]
    out.mkdir()
    # The array alone; then task 1's part is lost, as if the task had died: the merge refuses.
    array = cluster.sbatch([*sbatch, "--array=0-2", "slurm/shards.sbatch", *job_args], cwd=ROOT, env=job_env(cluster))
    cluster.wait_done(array, timeout_s=240)
    parts = sorted((out / ".set.parts").glob("part-*.json"))
    assert len(parts) == 3, logs(out)[-3000:]
    parts[1].unlink()
    merge = cluster.sbatch([*sbatch, "slurm/shards.sbatch", *job_args], cwd=ROOT, env=job_env(cluster))
    cluster.wait_done(merge, timeout_s=120)
    assert "part 1 of 3 is missing or incomplete; resubmit those tasks with the same arguments " \
           "(sbatch --array=1 slurm/shards.sbatch ...)" in logs(out)
    assert not (out / "set").exists()  # nothing that looks like a shard set
    assert "JobState=FAILED" in cluster.scontrol("show", "job", merge)

    # Task 1 resubmitted alone, the merge after it: the same set as one process writes.
    again = cluster.sbatch([*sbatch, "--array=1", "slurm/shards.sbatch", *job_args], cwd=ROOT, env=job_env(cluster))
    merge = cluster.sbatch([*sbatch, f"--dependency=afterok:{again}", "slurm/shards.sbatch", *job_args], cwd=ROOT,
                           env=job_env(cluster))
    cluster.wait_done(merge, timeout_s=240)
    subprocess.run([sys.executable, "-m", "pipeline.shards", str(source), "--name", "set", "--out",
                    str(tmp_path / "one"), *OPTIONS, "--no-progress"], check=True, cwd=ROOT, env=TEST_ENV,
                   capture_output=True)
    assert files(out / "set") == files(tmp_path / "one" / "set"), logs(out)[-3000:]
