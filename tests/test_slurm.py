"""slurm/multinode.sbatch, slurm/train.sbatch and their launcher slurm/launch.sh on a real Slurm cluster:
slurmctld and two slurmd on this machine, with fake GPUs (tests/slurm_cluster.py; it installs Slurm when
it is missing). The jobs run the real pipeline/train.py on CPU (gloo); the preemption test sends the USR1
that precedes a time limit and checks that the script requeues the job and the second start resumes where
the first stopped. The array test runs a stand-in program under the launcher, to see what happens to each
task of an array on USR1 and on scancel in seconds rather than minutes."""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TEST_ENV
from slurm_cluster import SlurmCluster
from pipeline.wandb_log import exit_codes, run_records

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def submit(cluster: SlurmCluster, script: str, shards: Path, runs: Path, *overrides: str,
           cpus_per_task: int = 1, env_extra: dict | None = None, sbatch_extra: list[str] = ()) -> str:
    """sbatch the real script as a user would, with a tiny CPU recipe; returns the job id."""
    # The job inherits this environment. Leave out what the script must set by itself on a node
    # without GPUs (ACCELERATE_USE_CPU, W&B offline, OMP threads); use this interpreter's env.
    env = {k: v for k, v in TEST_ENV.items() if k not in ("ACCELERATE_USE_CPU", "WANDB_MODE", "OMP_NUM_THREADS")}
    env["VIRTUAL_ENV"] = sys.prefix
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(env_extra or {})
    recipe = ["recipes/demo.yaml", f"data.shards={shards}", f"run.dir={runs}",
              "model.arch=conv", "model.channels=[8,16]", "model.latent_dim=8", "data.batch_size_per_device=8",
              "data.num_workers=1",
              "data.shuffle_buffer_samples=16", "data.val_batch_size_per_device=8", "tracking.log_every_steps=1",
              "tracking.media_every_steps=1000", "tracking.eval_every_steps=1000", "tracking.media_images=4",
              "optim.warmup_steps=2", "loss.kl.warmup_steps=5", *overrides]
    sbatch_flags = ["--gpus-per-node=0", f"--cpus-per-task={cpus_per_task}", f"--output={runs}/slurm-%j.out",
                    *sbatch_extra]
    return cluster.sbatch([*sbatch_flags, script, *recipe], cwd=ROOT, env=env)


def train_steps(run_dir: Path) -> list[int]:
    """The steps of the training rows of metrics.jsonl, in the order they were written."""
    complete = (run_dir / "metrics.jsonl").read_text().split("\n")[:-1]  # not a line still being written
    rows = [json.loads(line) for line in complete if line.strip()]
    return [row["step"] for row in rows if "loss/total" in row]


def job_log(run_dir: Path, job: str) -> str:
    """The copy of the job's output that the script keeps in the run folder."""
    log = run_dir / f"slurm-{job}.log"
    return log.read_text(errors="replace") if log.exists() else f"(no {log})"


def test_train_sbatch_runs_procs_per_node_processes_on_one_node_moves_off_a_taken_port_and_warns_of_a_slow_checkpoint(
        cluster, tiny_shards, tmp_path):
    """One train.sbatch job for three checks (job starts are the suite's cost): PROCS_PER_NODE=2 processes on
    one node; the job's default rendezvous port (10000 + jobid % 20000, below the ephemeral range) is held
    by another program, so the launcher takes the next one; and VAE_SIGNAL_MARGIN_SECONDS=0.001 (any real save
    takes longer than 0.5 ms) makes its checkpoints warn."""
    job = submit(cluster, "slurm/train.sbatch", tiny_shards, tmp_path, "train.max_steps=4", "run.name=one-node",
                 cpus_per_task=min(2, cluster.cpus_per_node), sbatch_extra=["--hold"],
                 env_extra={"PROCS_PER_NODE": "2", "VAE_SIGNAL_MARGIN_SECONDS": "0.001"})
    port = 10000 + int(job) % 20000
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", port))
        busy.listen(8)
        cluster.scontrol("release", job)
        cluster.wait_done(job, timeout_s=180)
    run_dir = tmp_path / "one-node"  # a run name on the command line wins over slurm-<jobid>
    log = job_log(run_dir, job)
    assert (run_dir / "summary.json").exists(), log[-4000:]  # the warning is a warning, not a failure
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 4
    assert "processes=2 (2 per node, 0 GPUs)" in log and "SLURM_RESTART_COUNT=0 nodes=" in log
    assert "signal_margin=0.001s term_margin=10s" in log  # the test cluster's KillWait
    assert re.search(rf"head=\S+:{port + 1} ", log), log[-3000:]
    assert re.search(r"warning: saving a checkpoint took [\d.]+ s, more than half of the 0.001 s between the "
                     r"scheduler's warning signal and the time limit", log), log[-3000:]


def test_multinode_sbatch_trains_on_two_nodes_and_on_usr1_checkpoints_requeues_and_resumes_the_same_run(
        cluster, tiny_shards, tmp_path):
    """One multinode.sbatch job (one job start less than a plain run and a preempted run): one process on each
    of the two nodes in one process group, and the USR1 that precedes a time limit checkpoints, requeues the
    job and the second start resumes where the first stopped, into one W&B run."""
    total = 100  # ~20 steps/s here: the signal (sent at step 7) lands long before the end, even under load
    job = submit(cluster, "slurm/multinode.sbatch", tiny_shards, tmp_path, f"train.max_steps={total}",
                 "train.checkpoint_every_steps=5")
    run_dir = tmp_path / f"slurm-{job}"

    # Past the first periodic checkpoint and a few steps on: what a time limit's warning would meet.
    deadline = time.monotonic() + 150
    while not ((run_dir / "metrics.jsonl").exists() and len(train_steps(run_dir)) >= 7):
        assert time.monotonic() < deadline and cluster.squeue(job), job_log(run_dir, job)[-4000:]
        time.sleep(0.2)
    cluster.scancel("--batch", "--signal=USR1", job)  # what --signal=B:USR1@300 sends before the limit
    cluster.wait_done(job, timeout_s=240)
    log = job_log(run_dir, job)
    assert (run_dir / "summary.json").exists(), log[-4000:]

    # Requeued once by the script, and the second start knew it was a restart.
    assert re.search(r"Restarts=1\b", cluster.scontrol("show", "job", job)), log[-3000:]
    assert "SLURM_RESTART_COUNT=0 nodes=" in log and "SLURM_RESTART_COUNT=1 nodes=" in log
    stopped = re.search(r"received SIGUSR1: saved step (\d+), exiting with 75", log)
    resumed = re.search(r"resumed from \S+step-(\d+) at step (\d+)", log)
    assert stopped and resumed, log[-4000:]
    stop_step = int(stopped.group(1))
    assert int(resumed.group(1)) == int(resumed.group(2)) == stop_step  # from the checkpoint the signal made
    assert 7 <= stop_step < total
    assert "processes=2 (1 per node, 0 GPUs)" in log  # one process on each node ...
    assert "signal_margin=300s" in log  # read from the script's own #SBATCH --signal line
    port = int(re.search(r"head=\S+:(\d+) ", log).group(1))  # below the kernel's ephemeral ports (32768-)
    assert 10000 + int(job) % 20000 <= port < 10000 + int(job) % 20000 + 100
    # gloo's interface, chosen on each node (the route to the head node; here, where that is loopback,
    # the default route's): the same one on both, and one that formed the group.
    interfaces = set(re.findall(r"node [01] \(\S+\): GLOO_SOCKET_IFNAME=(\S+)", log))
    assert len(interfaces) == 1 and interfaces.pop() not in ("unset", "lo"), log[-3000:]

    # Every step logged exactly once: the first start ran 1..stop, the second stop+1..total.
    assert train_steps(run_dir) == list(range(1, total + 1))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == total and summary["world_size"] == 2  # ... in one process group
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{total:06d}"
    assert (run_dir / "checkpoints" / f"step-{total:06d}" / "model.safetensors").exists()
    # One W&B run across both starts: two offline-run folders, one id, exit codes 75 then 0.
    records = run_records(run_dir)
    assert len(records) == 2 and {r.run_id for r in records} == {(run_dir / "wandb_run_id").read_text().strip()}
    assert exit_codes(run_dir) == [75, 0]


def test_a_failed_node_ends_the_whole_job_at_once(cluster, tiny_shards, tmp_path):
    """The head node's rendezvous port is taken: its task fails at once. Without srun --kill-on-bad-exit
    the other node's launcher would wait for the rendezvous timeout (measured: still running after
    120 s); with it srun ends the step within seconds and the job fails."""
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("0.0.0.0", 0))
        busy.listen(8)
        port = busy.getsockname()[1]
        job = submit(cluster, "slurm/multinode.sbatch", tiny_shards, tmp_path, "train.max_steps=4",
                     env_extra={"MAIN_PROCESS_PORT": str(port)})
        started = time.monotonic()
        cluster.wait_done(job, timeout_s=90)
    assert time.monotonic() - started < 60
    log = job_log(tmp_path / f"slurm-{job}", job)
    assert "another process is utilizing it" in log and "Terminating StepId" in log, log[-3000:]
    assert "JobState=FAILED" in cluster.scontrol("show", "job", job)


def test_a_sweep_runs_as_an_array_and_resubmitting_continues_it(cluster, tiny_shards, tmp_path):
    """`python -m pipeline.sweep SWEEP --slurm`: an array of 2 tasks (running at once), each asking the study
    (an Optuna journal file) for a trial and training it through multinode.sbatch; results.csv has the 2
    trials, best first. Submitting again finds the budget spent and trains nothing: the study continues.
    (2 tasks, not 3: both share the journal at the same time either way, and the two-node cluster runs only
    two of these two-node tasks at once, so a third ran after them and added its whole run to the suite.)"""
    import csv
    import subprocess

    import yaml

    sweep = {"name": "arr", "recipe": "recipes/demo.yaml", "sweep_dir": str(tmp_path / "sweeps"),
             "overrides": [f"data.shards={tiny_shards}", "model.arch=conv", "model.channels=[8,16]",
                           "model.latent_dim=8",
                           "data.batch_size_per_device=8", "data.num_workers=0", "data.val_batch_size_per_device=8",
                           "train.max_steps=4", "tracking.eval_every_steps=4", "tracking.media_every_steps=4",
                           "tracking.media_images=4", "tracking.mode=disabled"],
             "metric": "val/psnr", "goal": "maximize", "trials": 2, "sampler": "tpe",
             "parameters": {"optim.lr": {"log_range": [0.0005, 0.005]}, "loss.kl.weight": {"choices": [0.001, 0.01]}}}
    path = tmp_path / "arr.yaml"
    path.write_text(yaml.safe_dump(sweep))
    env = {k: v for k, v in TEST_ENV.items() if k not in ("ACCELERATE_USE_CPU", "WANDB_MODE", "OMP_NUM_THREADS")}
    env.update({**cluster.env, "VIRTUAL_ENV": sys.prefix,
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})

    def submit_sweep() -> str:
        r = subprocess.run([sys.executable, "-m", "pipeline.sweep", str(path), "--slurm", "--", "--gpus-per-node=0",
                            "--cpus-per-task=1", f"--output={tmp_path}/slurm-%A_%a.out"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        return re.search(r"submitted array job (\d+)", r.stdout).group(1)

    job = submit_sweep()
    cluster.wait_done(job, timeout_s=300)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob(f"slurm-{job}_*.out")))
    with open(tmp_path / "sweeps" / "arr" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["trial"] for row in rows) == ["0", "1"], logs[-4000:]
    assert [row["best"] for row in rows] == ["True", "False"]
    psnr = [float(row["val/psnr"]) for row in rows]
    assert psnr == sorted(psnr, reverse=True)
    for row in rows:  # trained through multinode.sbatch: its log copy is in the trial's run folder
        assert list(Path(row["run"]).glob("slurm-*.log")) and (Path(row["run"]) / "summary.json").exists()

    again = submit_sweep()
    cluster.wait_done(again, timeout_s=120)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob(f"slurm-{again}_*.out")))
    assert logs.count("the sweep's budget is spent: nothing to train") == 2, logs[-3000:]
    with open(tmp_path / "sweeps" / "arr" / "results.csv") as f:
        assert sorted(row["trial"] for row in csv.DictReader(f)) == ["0", "1"]


# A stand-in for the trainer under slurm/launch.sh, with the trainer's own StopFlag: it says when it is ready,
# waits for USR1 or TERM and exits 75. The task that keeps the array's job id (the one the test sends USR1)
# stands in for a torch.compile run: its first compile starts inductor's worker pool (the pool GPU kernels,
# Triton, are compiled in), and after the signal it compiles once more in that pool.
SLEEPER = """
import os, sys, time
from pipeline.preemption import EXIT_PREEMPTED, StopFlag

task = os.environ["SLURM_ARRAY_TASK_ID"]
compiles = os.environ["SLURM_JOB_ID"] == os.environ["SLURM_ARRAY_JOB_ID"]
stop = StopFlag(compile_workers=compiles)
if compiles:
    from torch._inductor.async_compile import AsyncCompile
    AsyncCompile.process_pool().submit(AsyncCompile._get_ready).result()
print(f"task {task} ready (restart {os.environ.get('SLURM_RESTART_COUNT', '0')})", flush=True)
deadline = time.monotonic() + float(sys.argv[1])
while not stop.should_stop() and time.monotonic() < deadline:
    time.sleep(0.1)
print(f"task {task} got {stop.received}", flush=True)
if compiles:
    time.sleep(0.5)  # the signal has reached every process of the step, the pool's workers too
    print(f"task {task} compile pool: {AsyncCompile.process_pool().submit(AsyncCompile._get_ready).result(60)}",
          flush=True)
sys.exit(EXIT_PREEMPTED)
"""

# A batch script as thin as slurm/encode.sbatch: the shared launcher runs the stand-in.
LAUNCH_SLEEPER = """#!/bin/bash
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
set -uo pipefail
cd "$SLURM_SUBMIT_DIR" || exit 2
source "$1/bin/activate"
source slurm/launch.sh
launch "$2" "$3"
"""


def array_tasks(cluster: SlurmCluster, array: str) -> dict[int, dict[str, str]]:
    """Each task of an array: index -> its `scontrol show job` fields (JobId, JobState, Restarts, ...)."""
    tasks = {}
    for record in cluster.scontrol("show", "job", array).split("\n\n"):
        fields = dict(re.findall(r"(\w+)=(\S*)", record))
        if fields.get("ArrayTaskId", "").isdigit():
            tasks[int(fields["ArrayTaskId"])] = fields
    return tasks


def test_array_tasks_under_export_none_usr1_requeues_its_task_alone_and_scancel_saves_without_requeue(
        cluster, tmp_path):
    """An array of 2 tasks under the shared launcher, submitted as sites with `--export=NONE` do (the step
    gets the batch shell's environment: srun --export=ALL). Both sleep. USR1 goes to the task that carries
    the array's own job id, the one whose `scontrol requeue $SLURM_JOB_ID` would requeue the whole array:
    only that task is requeued, the other keeps running. Then `scancel` of the other (TERM to all its
    processes): its batch shell outlives the TERM, the program stops (exit 75) and the task stays cancelled.
    The USR1 reaches every process of the step, torch.compile's worker pool too, which keeps working."""
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    (tmp_path / "launch.sbatch").write_text(LAUNCH_SLEEPER)
    array = cluster.sbatch(["--export=NONE", "--array=0-1", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1",
                            f"--output={tmp_path}/slurm-%A_%a.out", str(tmp_path / "launch.sbatch"), sys.prefix,
                            str(tmp_path / "sleeper.py"), "120"], cwd=ROOT)

    def logs() -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("slurm-*.out")))

    def wait_for(condition, what: str) -> dict[int, dict[str, str]]:
        deadline = time.monotonic() + 90
        while not condition(tasks := array_tasks(cluster, array)):
            assert time.monotonic() < deadline, f"no {what}: {tasks}\n{logs()[-3000:]}"
            time.sleep(0.3)
        return tasks

    tasks = wait_for(lambda _: logs().count("ready (restart 0)") == 2, "2 tasks ready")
    signalled = next(i for i, t in tasks.items() if t["JobId"] == array)  # the task that kept the array's id
    other = 1 - signalled
    cluster.scancel("--batch", "--signal=USR1", f"{array}_{signalled}")  # its batch shell, as --signal=B: does
    tasks = wait_for(lambda t: t[signalled]["Restarts"] == "1", "requeue")
    assert tasks[other]["Restarts"] == "0" and tasks[other]["JobState"] == "RUNNING", logs()[-3000:]
    assert f"requeueing {array}_{signalled}" in logs() and "execve" not in logs()
    assert f"task {signalled} got SIGUSR1\ntask {signalled} compile pool: ready" in logs(), logs()[-3000:]

    cluster.scancel(f"{array}_{other}")
    tasks = wait_for(lambda t: t[other]["JobState"] == "CANCELLED", "cancel")
    cluster.scancel(array)  # the requeued task's second start would only repeat its first
    cluster.wait_done(array, timeout_s=30)
    other_log = (tmp_path / f"slurm-{array}_{other}.out").read_text()
    assert "TERM: the program saves and stops before Slurm's KillWait runs out; no requeue" in other_log, other_log
    assert re.search(rf"task {other} got SIG(TERM|USR1)", other_log), other_log
    assert "stopped after TERM (exit" in other_log
    assert array_tasks(cluster, array)[other]["Restarts"] == "0"


def test_uneven_gpus_per_node_are_refused_in_one_sentence_before_anything_launches(cluster, tiny_shards, tmp_path):
    """`--gpus=3` on two nodes: Slurm gives them 2 and 1 of their (fake, gres.conf) GPUs. Processes per node
    counted on the batch node alone would start 2 on each, one without a GPU; the launcher refuses first."""
    job = submit(cluster, "slurm/multinode.sbatch", tiny_shards, tmp_path, "train.max_steps=4",
                 sbatch_extra=["--gpus=3"])
    cluster.wait_done(job, timeout_s=60)
    log = job_log(tmp_path / f"slurm-{job}", job)
    error = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and re.fullmatch(
        rf"error: Slurm gave the nodes of job {job} different numbers of GPUs \(\S+ [12] GPUs; \S+ [12] GPUs\) and "
        r"every node runs the same number of processes: submit with --gpus-per-node=N instead of --gpus",
        error[0]), log[-3000:]
    assert "accelerate" not in log and "node 0" not in log  # no step started
    assert "JobState=FAILED" in cluster.scontrol("show", "job", job) and "ExitCode=2:0" in cluster.scontrol(
        "show", "job", job)


def test_the_slurm_scripts_pass_shellcheck():
    """`shellcheck` (apt-get install shellcheck) finds nothing above style in slurm/: no unguarded `cd`, no
    masked exit status, no unquoted expansion that word-splitting would break."""
    import shutil
    import subprocess

    from slurm_cluster import unavailable_reason

    reason = unavailable_reason()  # installs Slurm and shellcheck with apt-get where they are missing
    if reason or not shutil.which("shellcheck"):
        pytest.skip(reason or "shellcheck is not installed (apt-get install shellcheck)")
    scripts = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "slurm").iterdir())
    r = subprocess.run(["shellcheck", "--severity=info", *scripts], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:]
