"""Hyperparameter sweeps: an Optuna study on the shared filesystem, trials trained like any run.

    python -m pipeline.sweep recipes/sweeps/demo_kl.yaml                 # trials one after another, here
    python -m pipeline.sweep recipes/sweeps/demo_kl.yaml --slurm         # a SLURM array, one trial per task
    python -m pipeline.sweep recipes/sweeps/demo_kl.yaml --slurm -- --nodes=2 --gpus-per-node=8   # multi-node trials

A sweep file names a recipe, fixed overrides, the metric (a val/* figure of the trials' summary.json)
and its goal, a budget of trials, a sampler and a search space over any recipe keys:

    name: demo-kl
    recipe: recipes/demo.yaml
    overrides: [train.max_steps=300]
    metric: val/psnr
    goal: maximize
    trials: 8
    sampler: tpe                     # tpe | random | grid (grid: choices only)
    parameters:
      optim.lr: {log_range: [0.0003, 0.003]}
      loss.kl.weight: {log_range: [0.0001, 0.01]}
      model.latent_dim: {choices: [32, 64, 128]}
      loss.tv_weight: {range: [0.0, 0.1]}
      data.batch_size_per_device: {int_range: [16, 64]}

Everything lives in runs/sweeps/<name>/: study.journal (Optuna's JournalStorage, a file with POSIX
locks: no database server, and trials on offline compute nodes coordinate through it), trial-NNN/
(each trial an ordinary run folder: resumable, locked, W&B run in the sweep's group), tasks/ (which
worker holds which trial) and results.csv (finished trials, best first, marked). At the end a W&B
run of the sweep logs the same table.

Who trains what: a worker (this process locally, an array task on SLURM) takes back its own trial
after a requeue, else adopts a trial whose worker is gone (killed, not requeued), else asks the study
for a new one while the budget allows. So a requeued or preempted trial resumes from its checkpoint,
and submitting the sweep again continues the study: finished trials stay, unfinished ones are taken
up, and only the rest of the budget is asked for.

Validated like recipes: an unknown key, a value of the wrong type or an empty range fails at once with
one sentence naming the key. Pruning of hopeless trials is not done: a trial's metric is its final
validation figure.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import hashlib
import json
import math
import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from pipeline import durable
from pipeline.config import ConfigError, from_dict, load_config
from pipeline.errors import UserError, exit_on_user_error
from pipeline.preemption import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parents[1]
SAMPLERS = ("tpe", "random", "grid")
GOALS = ("maximize", "minimize")


@dataclass
class ParamSpec:
    """One dimension of the search space: exactly one of these."""

    choices: list[Any] = field(default_factory=list)
    """Values to choose from (numbers, strings, booleans, lists)."""
    range: list[float] = field(default_factory=list)
    """[low, high]: a float drawn uniformly."""
    log_range: list[float] = field(default_factory=list)
    """[low, high] with 0 < low: a float drawn uniformly in log space (learning rates, loss weights)."""
    int_range: list[int] = field(default_factory=list)
    """[low, high]: an integer, both ends included."""


@dataclass
class SweepConfig:
    name: str = ""
    """The sweep's folder under sweep_dir and its W&B group; empty: the sweep file's name."""
    recipe: str = ""
    """The recipe every trial starts from."""
    overrides: list[str] = field(default_factory=list)
    """key=value overrides applied to every trial (before the trial's own parameters)."""
    metric: str = "val/neg_elbo_nats"
    """The val/* figure of a trial's summary.json that the study optimizes."""
    goal: str = "minimize"
    """maximize | minimize"""
    trials: int = 8
    """Budget: trials the study runs in all (finished, running and failed ones count)."""
    sampler: str = "tpe"
    """tpe (Optuna's TPE; random for its first 10 trials) | random | grid (every combination of choices)."""
    seed: int = 0
    """Seeds the sampler: trial n's draws come from a stream derived from (seed, n), whichever worker asks."""
    sweep_dir: str = "runs/sweeps"
    """Parent folder of sweep folders."""
    parameters: dict[str, ParamSpec] = field(default_factory=dict)
    """Recipe key (dotted) -> its search space."""


# --------------------------------------------------------------------------------------------
# Loading and validating a sweep file
# --------------------------------------------------------------------------------------------


def load_sweep(path: str | Path, trials: int | None = None) -> SweepConfig:
    path = Path(path)
    source = f"sweep {path}"
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist; pass a YAML file such as recipes/sweeps/demo_kl.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must be a mapping (name:, recipe:, metric:, parameters:, ...)")
    params = raw.pop("parameters", {}) or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: parameters must map recipe keys to search spaces")
    cfg = from_dict(SweepConfig, raw, "", source)
    for key, spec in params.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"{source}: parameters.{key} must be a mapping such as {{choices: [...]}} or "
                              f"{{log_range: [low, high]}}, got {spec!r}")
        cfg.parameters[str(key)] = from_dict(ParamSpec, spec, f"parameters.{key}", source)
    cfg.name = cfg.name or path.stem
    if trials is not None:
        cfg.trials = trials
    validate_sweep(cfg, source)
    return cfg


def validate_sweep(cfg: SweepConfig, source: str) -> None:
    if cfg.goal not in GOALS:
        raise ConfigError(f"{source}: goal is {cfg.goal!r} but must be one of {', '.join(GOALS)}")
    if cfg.sampler not in SAMPLERS:
        raise ConfigError(f"{source}: sampler is {cfg.sampler!r} but must be one of {', '.join(SAMPLERS)}")
    if cfg.trials < 1:
        raise ConfigError(f"{source}: trials must be at least 1, got {cfg.trials}")
    if not cfg.metric.startswith("val/"):
        raise ConfigError(f"{source}: metric must be a validation figure such as val/psnr, got {cfg.metric!r}")
    if not cfg.parameters:
        raise ConfigError(f"{source}: parameters is empty; name at least one recipe key to search over")
    if not cfg.recipe:
        raise ConfigError(f"{source}: recipe is missing; name the recipe every trial starts from")
    if cfg.sampler == "grid":
        points = math.prod(max(1, len(spec.choices)) for spec in cfg.parameters.values())
        if cfg.trials > points:
            raise ConfigError(f"{source}: trials is {cfg.trials} but the grid has {points} points; "
                              f"set trials to at most {points}")
    for key, spec in cfg.parameters.items():
        kinds = [k for k in ("choices", "range", "log_range", "int_range") if getattr(spec, k)]
        where = f"{source}: parameters.{key}"
        if len(kinds) != 1:
            raise ConfigError(f"{where} needs exactly one of choices, range, log_range, int_range")
        kind = kinds[0]
        if kind != "choices":
            low, high = (getattr(spec, kind) + [None, None])[:2]
            if len(getattr(spec, kind)) != 2 or not low < high:
                raise ConfigError(f"{where}: {kind} must be [low, high] with low < high, got {getattr(spec, kind)}")
            if kind == "log_range" and low <= 0:
                raise ConfigError(f"{where}: log_range needs a positive low end, got {low}")
        if cfg.sampler == "grid" and kind != "choices":
            raise ConfigError(f"{where}: the grid sampler needs choices, not a {kind}")
        # The key and every value it can take must be valid for the recipe: the recipe loader says why not.
        values = spec.choices if kind == "choices" else getattr(spec, kind)
        for value in values:
            try:
                load_config(cfg.recipe, [*cfg.overrides, f"{key}={json.dumps(value)}"], check_paths=False)
            except ConfigError as e:
                raise ConfigError(f"{where}: {str(e).split(': ', 1)[-1]}") from None


# --------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------


class Sweep:
    def __init__(self, cfg: SweepConfig):
        import optuna

        self.cfg = cfg
        self.dir = Path(cfg.sweep_dir) / cfg.name
        (self.dir / "tasks").mkdir(parents=True, exist_ok=True)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        self.storage = JournalStorage(JournalFileBackend(str(self.dir / "study.journal")))
        self.study = optuna.create_study(study_name=cfg.name, storage=self.storage, load_if_exists=True,
                                         direction=cfg.goal)

    @contextmanager
    def _assigning(self):
        """One worker at a time decides who trains what (a POSIX lock: it holds across NFS nodes)."""
        with open(self.dir / ".assign.lock", "a+") as f:
            fcntl.lockf(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(f, fcntl.LOCK_UN)

    def _distributions(self) -> dict:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        out = {}
        for key, spec in self.cfg.parameters.items():
            if spec.choices:
                out[key] = CategoricalDistribution([json.dumps(c) for c in spec.choices])
            elif spec.int_range:
                out[key] = IntDistribution(spec.int_range[0], spec.int_range[1])
            else:
                low, high = spec.range or spec.log_range
                out[key] = FloatDistribution(low, high, log=bool(spec.log_range))
        return out

    def _sampler(self, number: int):
        """The sampler that proposes trial `number`. Its random stream is the study's, at that trial: seeded
        from (seed, number), so every trial draws afresh whichever worker or process asks for it, the same
        sweep file proposes the same start-up trials again, and nothing but the journal has to be shared.
        TPE reads the finished trials from the journal at every ask; a sampler object kept per process
        would hold nothing more."""
        import optuna

        seed = int.from_bytes(hashlib.sha256(repr((self.cfg.seed, number)).encode()).digest()[:4], "little")
        if self.cfg.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if self.cfg.sampler == "grid":  # its seed shuffles the grid, whose n-th point trial n takes: one per study
            space = {k: [json.dumps(c) for c in s.choices] for k, s in self.cfg.parameters.items()}
            return _grid_sampler(space, seed=self.cfg.seed)
        return optuna.samplers.TPESampler(seed=seed)

    def assign(self, worker: str) -> int | None:
        """The trial `worker` trains: its own (after a requeue), an orphan, or a new one; None when the
        budget is spent."""
        from optuna.trial import TrialState

        mine = self.dir / "tasks" / f"{worker}.json"
        with self._assigning():
            trials = {t.number: t for t in self.study.get_trials(deepcopy=False)}
            if mine.is_file():
                number = json.loads(mine.read_text())["trial"]
                if trials[number].state == TrialState.RUNNING:
                    return number
            owners = {json.loads(p.read_text())["trial"]: p.stem for p in (self.dir / "tasks").glob("*.json")}
            for number, t in sorted(trials.items()):  # a running trial whose worker is gone: take it up
                if t.state == TrialState.RUNNING and not _alive(owners.get(number, "")):
                    durable.write_json(mine, {"trial": number, "adopted_from": owners.get(number)})
                    return number
            if len(trials) >= self.cfg.trials:
                return None
            self.study.sampler = self._sampler(len(trials))  # the number study.ask gives (under the lock)
            trial = self.study.ask(self._distributions())
            durable.write_json(mine, {"trial": trial.number})
            return trial.number

    def params(self, number: int) -> dict[str, Any]:
        t = self.study.get_trials(deepcopy=False)[number]
        return {k: (json.loads(v) if self.cfg.parameters[k].choices else v) for k, v in t.params.items()}

    def run_dir(self, number: int) -> Path:
        return self.dir / f"trial-{number:03d}"

    def train_args(self, number: int) -> list[str]:
        """The trial's training command line: recipe, fixed overrides, its parameters, its run folder."""
        params = [f"{k}={json.dumps(v)}" for k, v in self.params(number).items()]
        return [self.cfg.recipe, *self.cfg.overrides, *params, f"run.dir={self.dir}",
                f"run.name=trial-{number:03d}", f"tracking.group={self.cfg.name}"]

    def report(self, number: int, exit_code: int) -> tuple[str, bool]:
        """Tell the study how trial `number` ended; a preempted one (exit 75) is left running, to resume.
        Returns (what happened, whether it was preempted)."""
        from optuna.trial import TrialState

        run_dir = self.run_dir(number)
        ended = json.loads((run_dir / "exit.json").read_text()) if (run_dir / "exit.json").is_file() else {}
        starts = (run_dir / "starts.jsonl").read_text().split("\n")[:-1] if (run_dir / "starts.jsonl").is_file() else []
        # Launchers turn the trainer's 75 into their own 1: the run folder says whether its last start
        # stopped on a signal after saving a checkpoint.
        if exit_code == EXIT_PREEMPTED or (ended.get("exit_code") == EXIT_PREEMPTED
                                           and ended.get("segment") == len(starts)):
            return f"trial {number} was preempted; it resumes when its task is requeued or the sweep is run again", True
        summary = run_dir / "summary.json"
        value = json.loads(summary.read_text()).get(self.cfg.metric) if summary.is_file() else None
        if exit_code == 0 and isinstance(value, (int, float)) and math.isfinite(value):
            self.study.tell(number, value, skip_if_finished=True)
            said = f"trial {number}: {self.cfg.metric} = {value:.6g}"
        else:
            self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
            said = (f"trial {number} failed (exit code {exit_code}"
                    + (f", no {self.cfg.metric} in {summary}" if exit_code == 0 else "") + ")")
        self.write_results()
        return said, False

    def results(self) -> list[dict[str, Any]]:
        """Finished trials, best first."""
        from optuna.trial import TrialState

        done = [t for t in self.study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
        done.sort(key=lambda t: t.value, reverse=self.cfg.goal == "maximize")
        return [{"rank": i + 1, "best": i == 0, "trial": t.number, self.cfg.metric: t.value,
                 **self.params(t.number), "run": str(self.run_dir(t.number))} for i, t in enumerate(done)]

    def write_results(self) -> Path:
        rows = self.results()
        path = self.dir / "results.csv"
        columns = ["rank", "best", "trial", self.cfg.metric, *self.cfg.parameters, "run"]

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)

        return durable.write_with(path, write)

    def finished(self) -> bool:
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        return len(trials) >= self.cfg.trials and all(t.state != TrialState.RUNNING for t in trials)

    def log_table(self) -> None:
        """The results as a W&B table in a run of the sweep's own (same group; offline unless the
        recipe's tracking.mode says otherwise)."""
        tracking = load_config(self.cfg.recipe, self.cfg.overrides, check_paths=False).tracking
        mode = tracking.mode
        if mode == "disabled":
            return
        import wandb

        from pipeline.tracking import load_or_create_run_id

        rows = self.results()
        columns = ["rank", "best", "trial", self.cfg.metric, *self.cfg.parameters, "run"]
        table = wandb.Table(columns=columns, data=[[_plain(r.get(c)) for c in columns] for r in rows])
        run = wandb.init(project=tracking.project, entity=tracking.entity or None,
                         id=load_or_create_run_id(self.dir), resume="allow", dir=str(self.dir), mode=mode,
                         group=self.cfg.name, job_type="sweep", name=f"{self.cfg.name} (sweep)",
                         config={"sweep": {"metric": self.cfg.metric, "goal": self.cfg.goal, "trials": self.cfg.trials,
                                           "sampler": self.cfg.sampler}},
                         settings=wandb.Settings(console="off", save_code=False, reinit="finish_previous"))
        run.log({"sweep/trials": table})
        if rows:
            run.summary.update({"sweep/best_trial": rows[0]["trial"], f"sweep/best/{self.cfg.metric}": rows[0][self.cfg.metric]})
        run.finish()
        wandb.teardown()


def _grid_sampler(space: dict, seed: int):
    """Optuna's GridSampler without its study.stop() once every point has a result: stop() is for
    study.optimize, which a sweep does not run (it raised at the last grid point's result); the budget,
    at most the grid's size (validate_sweep), ends a grid sweep."""
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        def after_trial(self, study, trial, state, values) -> None:
            pass

    return GridSampler(space, seed=seed)


def _plain(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value



def _alive(worker: str) -> bool:
    """Whether the worker that holds a trial still exists: a local process (local-<host>-<pid>) or a
    SLURM array task (<array job id>_<task id>), asked of squeue."""
    if worker.startswith("local-"):
        _, host, pid = worker.rsplit("-", 2)
        if host != socket.gethostname():
            return True  # another machine's process: assume alive rather than steal its trial
        try:
            os.kill(int(pid), 0)
            return True
        except (ProcessLookupError, ValueError):
            return False
        except PermissionError:
            return True
    if worker:
        r = subprocess.run(["squeue", "-h", "-j", worker, "-o", "%T"], capture_output=True, text=True)
        return r.returncode == 0 and bool(r.stdout.strip())
    return False


# --------------------------------------------------------------------------------------------
# Running: here, or as a SLURM array
# --------------------------------------------------------------------------------------------


def run_local(sweep: Sweep, launch: list[str]) -> int:
    """Train trials one after another in this process's children until the budget is spent."""
    worker = f"local-{socket.gethostname()}-{os.getpid()}"
    while (number := sweep.assign(worker)) is not None:
        print(f"sweep {sweep.cfg.name}: trial {number} {sweep.params(number)}", flush=True)
        code = subprocess.run([*launch, str(ROOT / "pipeline" / "train.py"), *sweep.train_args(number)]).returncode
        said, preempted = sweep.report(number, code)
        print(said, flush=True)
        if preempted:
            return EXIT_PREEMPTED  # stopped by a signal: run the same command again to continue
        (sweep.dir / "tasks" / f"{worker}.json").unlink(missing_ok=True)
    print(f"sweep {sweep.cfg.name}: budget of {sweep.cfg.trials} trials spent; results in {sweep.write_results()}")
    if sweep.finished():
        sweep.log_table()
    return 0


def submit_slurm(sweep_file: str, sweep: Sweep, sbatch_args: list[str]) -> int:
    """One array task per trial of the budget; each asks the study for its trial (slurm/sweep.sbatch)."""
    array = f"--array=0-{sweep.cfg.trials - 1}"
    cmd = ["sbatch", "--parsable", array, *sbatch_args, str(ROOT / "slurm" / "sweep.sbatch"), sweep_file,
           f"--trials={sweep.cfg.trials}"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise UserError(f"sbatch failed ({r.stderr.strip() or r.returncode}); check the partition and account options")
    print(f"submitted array job {r.stdout.strip()} ({array.split('=')[1]}) for sweep {sweep.cfg.name}; "
          f"results: {sweep.dir / 'results.csv'}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.sweep", description=__doc__.splitlines()[0])
    p.add_argument("sweep", help="sweep YAML file")
    p.add_argument("--trials", type=int, help="the budget, instead of the file's `trials`")
    p.add_argument("--slurm", action="store_true", help="submit a SLURM array (slurm/sweep.sbatch), one trial per task")
    p.add_argument("--nproc", type=int, default=1, help="local: processes per trial (accelerate launch --multi_gpu)")
    p.add_argument("--assign", metavar="WORKER", help=argparse.SUPPRESS)  # slurm/sweep.sbatch: print the trial's args
    p.add_argument("--report", metavar="WORKER", help=argparse.SUPPRESS)  # slurm/sweep.sbatch: the trial ended
    p.add_argument("--exit-code", type=int, default=0, help=argparse.SUPPRESS)
    p.epilog = "With --slurm, everything after -- goes to sbatch (--nodes=2, -p gpu, --gpus-per-node=0, ...)."
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    sbatch_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = _parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    cfg = load_sweep(args.sweep, args.trials)
    sweep = Sweep(cfg)
    if args.assign:
        number = sweep.assign(args.assign)
        if number is not None:
            print("\n".join(sweep.train_args(number)))
        return 0
    if args.report:
        number = json.loads((sweep.dir / "tasks" / f"{args.report}.json").read_text())["trial"]
        print(sweep.report(number, args.exit_code)[0])
        if sweep.finished():
            sweep.log_table()
        return 0
    if args.slurm:
        return submit_slurm(args.sweep, sweep, sbatch_args)
    launch = [sys.executable] if args.nproc == 1 else [
        str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", str(args.nproc),
        "--mixed_precision", "no", "--dynamo_backend", "no"]
    return run_local(sweep, launch)


if __name__ == "__main__":
    sys.exit(main())
