"""pipeline.sweep: sweep files validated like recipes, trials trained as ordinary runs, the study on
disk continued by a second invocation, results.csv best first, the W&B table of trials.
(The SLURM array is tested in tests/test_slurm.py.)"""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT, TEST_ENV
from pipeline.config import ConfigError
from pipeline.sweep import load_sweep

TINY = ["model.arch=conv", "model.channels=[8,16]", "model.latent_dim=8", "data.batch_size_per_device=8",
        "data.num_workers=0",
        "data.val_batch_size_per_device=8", "train.max_steps=4", "train.checkpoint_every_steps=4",
        "tracking.log_every_steps=2", "tracking.media_every_steps=4", "tracking.eval_every_steps=4",
        "tracking.media_images=4"]


def write_sweep(tmp_path: Path, shards: Path | None = None, **fields) -> Path:
    spec = {"name": "tiny", "recipe": "recipes/demo.yaml", "sweep_dir": str(tmp_path / "sweeps"),
            "overrides": [f"data.shards={shards or 'shards/demo'}", *TINY], "metric": "val/psnr",
            "goal": "maximize", "trials": 2, "sampler": "random",
            "parameters": {"optim.lr": {"log_range": [0.0005, 0.005]}, "loss.kl.weight": {"choices": [0.001, 0.01]}}}
    spec.update(fields)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("fields, message", [
    ({"parameters": {"optim.lrr": {"range": [0.1, 0.2]}}},
     "parameters.optim.lrr: unknown key optim.lrr (did you mean optim.lr?)"),
    ({"parameters": {"optim.lr": {"range": [0.1, 0.1]}}},
     "parameters.optim.lr: range must be [low, high] with low < high, got [0.1, 0.1]"),
    ({"parameters": {"optim.lr": {"log_range": [0.0, 0.1]}}}, "log_range needs a positive low end"),
    ({"parameters": {"model.latent_dim": {"choices": ["big"]}}}, "model.latent_dim must be int, got 'big'"),
    ({"parameters": {"optim.lr": {"range": [0.1, 0.2], "choices": [1]}}}, "needs exactly one of choices, range"),
    ({"parameters": {"optim.lr": 0.1}}, "parameters.optim.lr must be a mapping such as {choices: [...]}"),
    ({"sampler": "grid"}, "parameters.optim.lr: the grid sampler needs choices, not a log_range"),
    ({"sampler": "grid", "trials": 3, "parameters": {"loss.kl.weight": {"choices": [0.1, 0.2]}}},
     "trials is 3 but the grid has 2 points"),
    ({"metric": "loss/total"}, "metric must be a validation figure such as val/psnr"),
    ({"goal": "up"}, "goal is 'up' but must be one of maximize, minimize"),
    ({"trails": 3}, "unknown key trails (did you mean trials?)"),
])
def test_a_bad_sweep_file_is_one_sentence_naming_the_key(tmp_path, fields, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_sweep(write_sweep(tmp_path, **fields))
    assert message in str(e.value), str(e.value)
    assert str(e.value).startswith(f"sweep {tmp_path / 'sweep.yaml'}")


@pytest.mark.slow  # seconds: in make test, not in make test-fast
def test_the_cli_says_it_in_one_line_and_exits_2(tmp_path):
    path = write_sweep(tmp_path, parameters={"optim.lrr": {"range": [0.1, 0.2]}})
    r = subprocess.run([sys.executable, "-m", "pipeline.sweep", str(path)], cwd=ROOT, env=TEST_ENV,
                       capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def results(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_local_sweep_trains_its_trials_and_a_second_run_continues_the_study(tmp_path, tiny_shards):
    from pipeline import wandb_log

    path = write_sweep(tmp_path, tiny_shards, overrides=[f"data.shards={tiny_shards}", *TINY, "tracking.mode=offline"])
    r = subprocess.run([sys.executable, "-m", "pipeline.sweep", str(path)], cwd=ROOT, env=TEST_ENV,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sweep_dir = tmp_path / "sweeps" / "tiny"
    rows = results(sweep_dir)
    assert [row["trial"] for row in sorted(rows, key=lambda row: row["trial"])] == ["0", "1"]
    psnr = [float(row["val/psnr"]) for row in rows]
    assert psnr == sorted(psnr, reverse=True) and [row["best"] for row in rows] == ["True", "False"]
    assert rows[0]["optim.lr"] != rows[1]["optim.lr"]  # one worker, two trials, two points of the space
    for row in rows:  # each trial an ordinary run, trained with its own parameters, in the sweep's group
        run = Path(row["run"])
        summary = json.loads((run / "summary.json").read_text())
        assert summary["val/psnr"] == pytest.approx(float(row["val/psnr"]))
        config = wandb_log.config(run)
        assert config["optim"]["lr"] == pytest.approx(float(row["optim.lr"]))
        assert config["tracking"]["group"] == "tiny"
    table = [h for h in wandb_log.history(sweep_dir) if "sweep/trials" in h]
    assert table and table[-1]["sweep/trials"]["_type"] == "table-file"

    # The same sweep with a larger budget continues the study: one more trial, the first two kept.
    r = subprocess.run([sys.executable, "-m", "pipeline.sweep", str(path), "--trials", "3"], cwd=ROOT,
                       env=TEST_ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(row["trial"] for row in results(sweep_dir)) == ["0", "1", "2"]
    assert len({row["optim.lr"] for row in results(sweep_dir)}) == 3
    assert "trial 2 " in r.stdout and "trial 0 " not in r.stdout


def test_report_tells_preempted_finished_and_failed_trials_apart(tmp_path):
    """A launcher turns the trainer's exit code 75 into 1: the run folder's exit.json (written by the
    trainer) says the last start stopped on a signal, so the trial stays running, to be resumed."""
    from optuna.trial import TrialState

    from pipeline.sweep import Sweep

    sweep = Sweep(load_sweep(write_sweep(tmp_path, trials=3)))
    alive = [subprocess.Popen(["sleep", "300"]) for _ in range(4)]  # stand-ins for live local workers
    workers = [f"local-{socket.gethostname()}-{p.pid}" for p in alive]
    numbers = [sweep.assign(w) for w in workers[:3]]
    assert numbers == [0, 1, 2] and sweep.assign(workers[3]) is None  # the budget
    assert sweep.assign(workers[0]) == 0  # a worker takes back its own running trial
    for n in numbers:
        sweep.run_dir(n).mkdir(parents=True)
        (sweep.run_dir(n) / "starts.jsonl").write_text('{"segment": 1}\n')
    (sweep.run_dir(0) / "exit.json").write_text(json.dumps({"segment": 1, "exit_code": 75, "step": 40}))
    (sweep.run_dir(1) / "summary.json").write_text(json.dumps({"val/psnr": 21.5}))
    assert sweep.report(0, 1)[1] is True
    assert sweep.report(1, 0) == ("trial 1: val/psnr = 21.5", False)
    assert sweep.report(2, 1)[1] is False
    states = [t.state for t in sweep.study.get_trials()]
    assert states == [TrialState.RUNNING, TrialState.COMPLETE, TrialState.FAIL]
    assert [row["trial"] for row in results(sweep.dir)] == ["1"]
    # Trial 0's worker dies: another worker takes the trial up instead of asking for a new one.
    assert sweep.assign(workers[3]) is None
    alive[0].kill()
    alive[0].wait()
    assert sweep.assign(workers[3]) == 0
    for p in alive:
        p.kill()


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweep_files_are_valid(path):
    cfg = load_sweep(path)
    assert cfg.parameters and cfg.trials >= 1


# A stand-in for pipeline/train.py in the sampler tests below: run_local starts it as it starts the trainer
# (`<launch> pipeline/train.py RECIPE key=value ...`), and it writes the trial's summary.json with a
# known metric, best at optim.lr = 0.003, so what the sweep does with the results can be checked in
# seconds. (The trainer itself runs in the end-to-end sweep test above.)
STAND_IN_TRAINER = """
import json, math, sys
from pathlib import Path
args = dict(a.split("=", 1) for a in sys.argv[2:] if "=" in a)
run = Path(args["run.dir"]) / args["run.name"]
run.mkdir(parents=True, exist_ok=True)
(run / "summary.json").write_text(json.dumps({"val/psnr": -abs(math.log10(float(args["optim.lr"]) / 0.003))}))
"""


def sampler_sweep(tmp_path: Path, **fields) -> Path:
    return write_sweep(tmp_path, **{"overrides": [*TINY, "tracking.mode=disabled"],
                                    "parameters": {"optim.lr": {"log_range": [0.0001, 0.1]}}, **fields})


@pytest.mark.parametrize("sampler", ["tpe", "random", "grid"])
def test_a_local_sweep_gives_every_trial_its_own_parameters(tmp_path, sampler):
    """(grid: four trials are the whole grid; the last one's result must not stop the sweep with a traceback.)"""
    from pipeline.sweep import Sweep, run_local

    trainer = tmp_path / "trainer.py"
    trainer.write_text(STAND_IN_TRAINER)
    grid = {"parameters": {"optim.lr": {"choices": [0.0005, 0.001, 0.002, 0.004]}}} if sampler == "grid" else {}
    sweep = Sweep(load_sweep(sampler_sweep(tmp_path, sampler=sampler, trials=4, **grid)))
    assert run_local(sweep, [sys.executable, str(trainer)]) == 0
    lrs = [sweep.params(n)["optim.lr"] for n in range(4)]
    assert len(set(lrs)) == 4, lrs
    assert [t.state.name for t in sweep.study.get_trials()] == ["COMPLETE"] * 4


def test_array_tasks_each_get_their_own_parameters(tmp_path):
    """Three array tasks, each in its own process with its own Sweep (slurm/sweep.sbatch's --assign), asking
    for a trial while the others are still training."""
    from pipeline.sweep import Sweep

    path = sampler_sweep(tmp_path, sampler="tpe", trials=3)
    alive = [subprocess.Popen(["sleep", "300"]) for _ in range(3)]  # stand-ins for live array tasks
    try:
        tasks = [(Sweep(load_sweep(path)), f"local-{socket.gethostname()}-{p.pid}") for p in alive]
        numbers = [sweep.assign(worker) for sweep, worker in tasks]
        lrs = [sweep.params(n)["optim.lr"] for (sweep, _), n in zip(tasks, numbers)]
    finally:
        for p in alive:
            p.kill()
    assert numbers == [0, 1, 2] and len(set(lrs)) == 3, lrs


@pytest.mark.slow  # seconds: in make test, not in make test-fast
def test_tpe_proposals_follow_the_finished_trials(tmp_path):
    """The same seed, the same random start-up trials, opposite results: TPE's next proposals go where the
    finished trials were best (a high learning rate in one study, a low one in the other)."""
    from pipeline.sweep import Sweep

    proposals = {}
    for goal in ("maximize", "minimize"):
        (tmp_path / goal).mkdir()
        sweep = Sweep(load_sweep(sampler_sweep(tmp_path / goal, sampler="tpe", trials=16, goal=goal)))
        worker = f"local-{socket.gethostname()}-{os.getpid()}"
        for _ in range(16):
            number = sweep.assign(worker)
            sweep.run_dir(number).mkdir(parents=True)
            lr = sweep.params(number)["optim.lr"]
            (sweep.run_dir(number) / "summary.json").write_text(json.dumps({"val/psnr": math.log10(lr)}))
            assert sweep.report(number, 0)[1] is False
            (sweep.dir / "tasks" / f"{worker}.json").unlink()
        proposals[goal] = [sweep.params(n)["optim.lr"] for n in range(16)]
    startup, tpe = slice(0, 10), slice(10, 16)  # Optuna's TPE draws its first 10 trials at random
    assert proposals["maximize"][startup] == proposals["minimize"][startup]
    assert len(set(proposals["maximize"][startup])) == 10
    high, low = (np.log10(proposals[g][tpe]) for g in ("maximize", "minimize"))
    assert high.mean() > np.log10(0.01) > np.log10(0.001) > low.mean(), (high, low)
