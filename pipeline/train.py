"""Train a VAE on WebDataset shards with Accelerate, tracked on W&B.

    make demo-data                                    # or: make shards SRC=data/flowers NAME=flowers SIZE=128
    python pipeline/train.py recipes/demo.yaml train.max_steps=50              # one process
    accelerate launch --multi_gpu --num_processes 8 pipeline/train.py recipes/flowers.yaml
    sbatch --nodes 4 slurm/multinode.sbatch recipes/flowers.yaml               # README: Running on SLURM

Everything lands in runs/<run.name>/: config.yaml, metrics.jsonl, checkpoints/, media/, wandb/,
starts.jsonl, summary.json. Running the same command again resumes from the latest complete checkpoint
(train.resume=auto): weights, optimizer, scaler, EMA, RNG states and the global data position. On the
same number of processes the resumed run repeats the uninterrupted one bit for bit (tests/test_resume.py
kills runs at every kind of moment); on another number it continues the same data order from the same
position, with fresh random streams. Settings changed on its command line apply from the checkpoint's step
(optimizer, schedule, max_steps, loss weights, ...) or are refused (architecture, data order; the table: README,
Resume, "Changed settings"). One live trainer per run folder (a lock); under a launcher the
workers die with it. SIGUSR1/SIGTERM: every rank finishes its step, one checkpoint is saved, and the
process exits with code 75 (EXIT_PREEMPTED).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`python pipeline/train.py`, `accelerate launch ...`)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from pipeline import durable, faults, fid_stats
from pipeline.checkpoint import BestWeights, Checkpointer, preserved_rng, restore_rng, seed_rng, trainer_state
from pipeline.config import Config, cli_config, save_config, to_dict
from pipeline.errors import UserError, exit_on_user_error
from pipeline.data import TrainStream, check_fits, data_range, read_manifest, val_batches
from pipeline.evaluate import validate
from pipeline.flops import peak_flops, step_flops_per_image
from pipeline.meters import IntervalMeter
from pipeline.models.quantize import window_health
from pipeline.optim import lr_at, set_lr
from pipeline.preemption import EXIT_PREEMPTED, StopFlag
from pipeline.prior import fit_during_training
from pipeline.resume_policy import check_changes, describe
from pipeline.runs import die_with_parent, launched_by_torchrun, own_run_folder
from pipeline.step import Training, build_training, discriminator_step, train_step
from pipeline.tracking import Tracker


def main(cfg: Config) -> int:
    """Train (or continue) the run `cfg` names; the exit code: 0 done, 75 stopped by a signal (run again)."""
    trainer = Trainer(cfg)
    trainer.resume()
    return trainer.run()


class Trainer:
    """One run on this process: built from the recipe, continued from a checkpoint, advanced step by step.

    Construction does everything before the first step that does not depend on a checkpoint (the run
    folder's lock, the data stream, the model, loss and optimizer); `resume` loads the checkpoint into
    them; `run` trains to `train.max_steps` or to a stop signal and writes the summary. What a checkpoint
    holds besides the parts' weights is `state_dict()` (the stream, the interval meter, the counters),
    read back by `resume`. The order of every step that draws random numbers or touches the device is the
    order exact resume was proven with (tests/test_resume.py): change it only with those tests."""

    def __init__(self, cfg: Config):
        if launched_by_torchrun():  # the elastic agent starts workers in their own session: die with it
            die_with_parent()
        self.cfg = cfg
        self.accelerator = accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision,
                                                     gradient_accumulation_steps=cfg.train.grad_accum_steps)
        self.main_process, self.device = accelerator.is_main_process, accelerator.device
        self.run_dir = run_dir = Path(cfg.run.dir) / (cfg.run.name or cfg.name)
        self.lock = own_run_folder(run_dir, accelerator)  # before anything is written there
        # What this start continues, and whether its settings may continue it: a setting that cannot change
        # on resume (the architecture, the data order) is refused here, before config.yaml is replaced.
        self.checkpointer = Checkpointer(run_dir, accelerator, cfg.train.checkpoint_every_steps,
                                         cfg.train.keep_checkpoints)
        self.resume_from = self.checkpointer.resolve(cfg.train.resume)
        self.changes = (check_changes(trainer_state(self.resume_from), cfg, self.resume_from)
                        if self.resume_from is not None else {})
        if self.main_process:
            save_config(cfg, run_dir / "config.yaml")
        set_seed(cfg.train.seed)  # identical initial weights on every rank

        # Data: an infinite, exactly resumable train stream per rank; augmentation runs on the device.
        self.manifest = manifest = read_manifest(cfg.data.shards)
        check_fits(cfg, manifest, cfg.data.shards)  # model.spatial_dims and in_channels against the shards
        self.stream = TrainStream(cfg, accelerator.process_index, accelerator.num_processes)

        # Model, loss, optimizer (+ EMA of the weights for media and evaluation), prepared by Accelerate.
        self.t = t = build_training(cfg, accelerator, manifest["size"], data_range(manifest),
                                    fresh=self.resume_from is None)
        # For MFU: the VAE's, the perceptual backbone's and the discriminator's FLOPs (pipeline/flops.py)
        self.flops = step_flops_per_image(t.vae, t.loss, t.adversary.disc if t.adversary else None, manifest["size"],
                                          r1=cfg.loss.adversarial.weight > 0 and cfg.loss.adversarial.r1_weight > 0)
        if cfg.train.freeze:
            trained = sum(p.numel() for p in t.vae.parameters() if p.requires_grad)
            accelerator.print(f"frozen: {', '.join(cfg.train.freeze)}; training {trained:,} of "
                              f"{t.vae.num_parameters():,} parameters")
        if self.main_process:  # lets evaluate/sample load the run even after its shards are gone
            durable.write_json(run_dir / "model_info.json", (
                {"image_size": manifest["size"], "classes": manifest["classes"],
                 "image_format": manifest["image_format"],
                 **{k: manifest[k] for k in ("spatial_dims", "sample_shape", "normalization") if k in manifest}}))

        # What a checkpoint continues besides the parts' weights (state_dict / resume).
        self.meter = IntervalMeter()  # loss terms summed on the device; read (one sync) on logging steps
        self.step, self.nonfinite_total = 0, 0  # optimizer steps taken; skipped (non-finite) steps in all
        self.nonfinite_run = torch.tensor(0, device=self.device)  # consecutive skipped steps, on the device
        self.resumed = None

    # -- resume ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The trainer's part of a checkpoint (trainer_rank<r>.json): where the run is, beside the weights."""
        return {"step": self.step, "images_seen": self.stream.position, "world_size": self.accelerator.num_processes,
                "stream": self.stream.state_dict(), "meter": self.meter.state_dict(), "config": to_dict(self.cfg),
                "nonfinite": {"run": int(self.nonfinite_run.item()), "total": self.nonfinite_total}}

    def resume(self) -> None:
        """Load the checkpoint this start continues (weights, optimizer with this run's hyperparameters, scaler,
        EMA, step, data position), start tracking, and set the random streams: restored or seeded per rank."""
        cfg, accelerator, resume_from = self.cfg, self.accelerator, self.resume_from
        self.resumed = resumed = self.checkpointer.load(resume_from, self.t.parts) if resume_from is not None else None
        if resumed is not None:
            self._load_state(resumed)
        changed = {"changed": self.changes} if self.changes else {}  # recorded: starts.jsonl here, W&B below
        self.segment = (self.lock.record_start({"step": self.step, "world_size": accelerator.num_processes, **changed})
                        if self.main_process else 0)
        self._start_tracking()
        # The very last thing before the first step: the random streams (noise, augmentation). Restored
        # here, after all the setup above, so nothing in it can shift them; seeded per rank otherwise.
        if resumed is not None and resumed.rng is not None:
            restore_rng(resumed.rng, self.device, resumed.path)
        else:
            seed_rng(self.device, "train", cfg.train.seed, accelerator.process_index, self.step)

    def _load_state(self, resumed) -> None:
        accelerator, state = self.accelerator, resumed.trainer
        self.step = resumed.step
        self.nonfinite_total = state["nonfinite"]["total"]
        self.nonfinite_run = torch.tensor(state["nonfinite"]["run"], device=self.device)
        try:
            note = self.stream.load_state_dict(state["stream"])
        except ValueError as e:
            raise UserError(f"checkpoint {self.resume_from}: {e}") from None
        if resumed.same_world_size:
            self.meter.load_state_dict(state["meter"], self.device)
        else:
            note = (f"the checkpoint was written by {state['world_size']} processes and this run has "
                    f"{accelerator.num_processes}: weights, optimizer, EMA, step, schedule and data position "
                    f"continue, the random streams are reseeded, so losses are not bitwise those of an "
                    f"uninterrupted run") + (f"; {note}" if note else "")
        accelerator.print(f"resumed from {self.resume_from} at step {self.step}" + (f" ({note})" if note else ""))
        if self.changes is None:
            accelerator.print(f"checkpoint {self.resume_from} holds no config (an older version wrote it): settings "
                              f"changed since are not checked")
        elif self.changes:
            accelerator.print(f"changed since the checkpoint, applied from step {self.step + 1}: "
                              f"{describe(self.changes)}")

    def _start_tracking(self) -> None:
        """W&B and the things the cadences need: best weights, validation metrics, media images, the stop flag."""
        cfg, accelerator, t, device = self.cfg, self.accelerator, self.t, self.device
        self.tracker = tracker = Tracker(cfg, self.run_dir, accelerator, segment=self.segment, resumed_step=self.step)
        tracker.log_resume_changes()
        loss_terms = t.loss.active_terms(t.vae)  # which of KL / quantizer loss, and every weighted extra
        accelerator.print("loss = " + " + ".join(loss_terms))
        tracker.log_model_info(t.vae, self.flops["total"], loss_terms)
        tracker.use_dataset(cfg.data.shards)  # lineage: the shard set (manifest, sha256s) is this run's input
        self.best = (BestWeights(self.run_dir, cfg.tracking.best_metric, cfg.tracking.best_mode)
                     if self.main_process else None)
        # LPIPS / rFID / sharpness in validation only when asked (metrics.in_validation): weights load once here,
        # and rFID's reference statistics of the val split are read from their cache (computed on first use).
        self.field_metrics = (fid_stats.field_metrics(cfg, cfg.data.shards, "val", accelerator)
                              if cfg.metrics.in_validation else None)
        self.stop = StopFlag(compile_workers=cfg.train.compile)
        if self.manifest["splits"]["val"]["count"] == 0:  # decided from the manifest, identically on every rank
            raise UserError(f"data.shards {cfg.data.shards} has no validation images; rebuild it with "
                            f"`python -m pipeline.shards ... --val-fraction 0.1`")
        # Fixed validation images for the media panels; only the main process logs media.
        self.media_images = _first_images(cfg, cfg.tracking.media_images) if self.main_process else None
        if self.media_images is not None and self.media_images.dtype != torch.uint8:  # arrays: as training batches
            self.media_images = t.augment(self.media_images.to(device), train=False).cpu()

    # -- training --------------------------------------------------------------------------------

    def run(self) -> int:
        """Train to train.max_steps, or until a stop signal (then one checkpoint and EXIT_PREEMPTED)."""
        cfg, accelerator = self.cfg, self.accelerator
        self.images_per_step = cfg.data.batch_size_per_device * cfg.train.grad_accum_steps * accelerator.num_processes
        self.peak = peak_flops(self.device)
        self.clock = IntervalClock()  # images/s over a logging interval, media/eval/checkpoints left out
        start_step, loop_start = self.step, time.perf_counter()
        self.bar = tqdm(total=cfg.train.max_steps, initial=self.step,
                        disable=not accelerator.is_local_main_process, dynamic_ncols=True)
        exit_code = 0
        batches = iter(self.stream)
        while self.step < cfg.train.max_steps:
            self.train_step(batches)
            last = self.step == cfg.train.max_steps
            if self.tracker.is_due("scalars", self.step, final=last):
                self.log_scalars()
            t_other = time.perf_counter()
            if self.cadences(last):  # media, validation, checkpoint; True: a stop signal, and it was saved
                exit_code = EXIT_PREEMPTED
                break
            self.clock.other_seconds += time.perf_counter() - t_other
        self.bar.close()
        return self.finish(exit_code, time.perf_counter() - loop_start, start_step)

    def train_step(self, batches) -> None:
        """One optimizer step of the VAE (and of the discriminator when its stage is on), the EMA, the meter."""
        cfg, accelerator, t, device = self.cfg, self.accelerator, self.t, self.device
        t0 = time.perf_counter()
        micro = [next(batches).images.to(device, non_blocking=True) for _ in range(cfg.train.grad_accum_steps)]
        self.clock.data_seconds += time.perf_counter() - t0
        micro = [t.augment(m, train=True).contiguous(memory_format=t.memory_format) for m in micro]
        step = self.step
        if step + 1 in cfg.train.inject_nan_at_steps and cfg.train.inject_nan_rank in (-1, accelerator.process_index):
            micro = [m * float("nan") for m in micro]  # fault injection for the non-finite guard's tests
        set_lr(t.optimizer, lr_at(step, cfg.optim, cfg.train.max_steps))
        result = train_step(t, accelerator, micro, step, cfg)  # the VAE (generator)
        if t.adversary is not None and t.adversary.schedule.disc_active(step):  # the discriminator, own optimizer
            disc = discriminator_step(t.adversary, accelerator, micro, result.fakes, step)
            self.meter.add({**disc.terms, "gan_grad_norm": disc.grad_norm}, disc.nonfinite, disc.ok,
                           training_step=False)
        self.step = step = step + 1
        if t.ema is not None:
            t.ema.update(t.vae, step, result.ok)  # the VAE only
        self.nonfinite_run = torch.where(result.ok, torch.zeros_like(self.nonfinite_run), self.nonfinite_run + 1)
        self.meter.add({**result.terms, "grad_norm": result.grad_norm}, result.nonfinite, result.ok)
        faults.kill_at("step", step, self.main_process)
        faults.pause_at("step", step)
        self.clock.steps += 1
        self.bar.update(1)

    def log_scalars(self) -> None:
        """The logging step: the interval's means (the one host sync), throughput, MFU; stops on a run of
        non-finite steps."""
        cfg, accelerator, step, clock = self.cfg, self.accelerator, self.step, self.clock
        means, bad, skipped, corrupt = self.meter.read(accelerator, self.stream.skipped_samples)  # the one sync
        seconds = clock.seconds()
        ips = self.images_per_step * clock.steps / seconds
        self.nonfinite_total += skipped
        grad_norm = means.pop("loss/grad_norm", float("nan"))
        scalars = {**means,
                   "train/grad_norm": grad_norm,
                   "train/lr": lr_at(step - 1, cfg.optim, cfg.train.max_steps),
                   "train/images_per_second": ips,
                   "train/images_per_second_per_device": ips / accelerator.num_processes,
                   "train/data_wait_fraction": clock.data_seconds / seconds,
                   "train/nonfinite_steps": self.nonfinite_total,
                   "train/skipped_samples": corrupt,
                   "train/checkpoint_seconds": self.checkpointer.last_save_seconds,
                   "train/memory_gb": _memory_gb(self.device),
                   "train/epoch": self.stream.position / self.stream.samples_per_epoch}
        scalars.update({f"train/nonfinite/{k}": v for k, v in bad.items()})
        scalars.update(window_health(self.t.vae))  # codebook usage/perplexity over the interval, all ranks
        if self.peak:
            scalars["train/mfu"] = self.flops["total"] * ips / accelerator.num_processes / self.peak
        self.tracker.log_scalars(step, scalars)
        self.bar.set_postfix(loss=f"{scalars.get('loss/total', float('nan')):.4f}", ips=f"{ips:.0f}")
        if bad:
            accelerator.print(f"step {step}: skipped non-finite steps (term: steps) {bad}")
        if self.nonfinite_run.item() >= cfg.train.max_nonfinite_steps:  # checked on logging steps only
            terms = ", ".join(k for k in bad if k not in ("total", "grad_norm")) or "the gradients"
            self.bar.close()
            self.tracker.finish(exit_code=1)
            raise SystemExit(f"error: stopped at step {step}: {cfg.train.max_nonfinite_steps} consecutive steps "
                             f"had a non-finite loss or gradient (non-finite term: {terms}); lower optim.lr, "
                             f"use bf16 instead of fp16, or check the data")
        self.clock.restart()

    def cadences(self, last: bool) -> bool:
        """Media, validation and the checkpoint, each on its own cadence (and all at the last step); True when a
        stop signal arrived: the checkpoint of this step is saved and the run must exit. Evaluation and media
        must not consume the training random streams."""
        cfg, accelerator, t, step, device = self.cfg, self.accelerator, self.t, self.step, self.device
        if self.tracker.is_due("media", step, final=last):
            with preserved_rng(device):
                # every rank encodes a share of the train images; the main process fits and saves the prior
                expost = fit_during_training(cfg, _eval_model(t), t.augment, accelerator, step, self.run_dir,
                                             "ema" if t.ema is not None else "raw")
                self.tracker.log_media(step, _eval_model(t), self.media_images, expost=expost,
                                       critic=t.adversary.disc if t.adversary is not None else None)
        if self.tracker.is_due("eval", step, final=last):
            with preserved_rng(device):
                metrics = validate(_eval_model(t), t.loss, t.augment,
                                   val_batches(cfg, accelerator.process_index, accelerator.num_processes),
                                   accelerator, step, self.field_metrics)
            self.tracker.log_eval(step, metrics)
            if self.best is not None:
                self.best.update(step, metrics, _eval_model(t))
        stopping = self.stop.should_stop()
        saved = self.checkpointer.maybe_save(step, t.parts, self.state_dict, force=stopping or last)
        if saved:
            self.stop.check_checkpoint_time(self.checkpointer.last_save_seconds, accelerator)
        if stopping:
            accelerator.print(f"received {self.stop.received or 'a stop signal on another rank'}: "
                              f"saved step {step}, exiting with {EXIT_PREEMPTED}")
        return stopping

    # -- the end ---------------------------------------------------------------------------------

    def finish(self, exit_code: int, wall: float, start_step: int) -> int:
        """summary.json and the model artifacts (when done), the exit record, W&B flushed; all ranks leave together."""
        accelerator, tracker, run_dir, step = self.accelerator, self.tracker, self.run_dir, self.step
        flops_per_image = self.flops["total"]
        summary = {"step": step, "images_seen": self.stream.position, "wall_seconds": wall,
                   "images_per_second": self.images_per_step * (step - start_step) / max(wall, 1e-9),
                   "flops_per_image": flops_per_image, "flops_per_image_by_network": self.flops,
                   "world_size": accelerator.num_processes,
                   "exit_code": exit_code}
        if self.peak:
            summary["mfu"] = flops_per_image * summary["images_per_second"] / accelerator.num_processes / self.peak
        if exit_code == 0:
            summary.update({k: v for k, v in tracker.last_scalars.items() if k.startswith(("loss/", "val/"))})
            if self.main_process:
                durable.write_json(run_dir / "summary.json", summary, indent=2)
                # The trained weights (EMA when on) as the run's model artifact: final, and best by best_metric.
                tracker.log_model(_eval_model(self.t).state_dict(), ["final", "latest"], {"step": step})
                if self.best.state is not None:
                    tracker.log_model(self.best.weights(), ["best"], self.best.state)
        tracker.set_summary(summary)
        if self.main_process:
            self.lock.record_exit(self.segment, exit_code, step)
        wandb_dir = tracker.wandb_dir
        tracker.finish(exit_code)
        # Exit together, after the main process has flushed W&B: under `srun --kill-on-bad-exit` a rank
        # leaving early with 75 would get the main process killed mid-flush.
        accelerator.wait_for_everyone()
        if self.main_process and exit_code == 0:
            print(f"\nrun folder: {run_dir}  (metrics.jsonl, summary.json, checkpoints/)\n"
                  f"images:     {run_dir / 'media'}")
            if wandb_dir is not None and self.cfg.tracking.mode == "offline":
                print(f"W&B:        {wandb_dir} (offline); upload the run with all its segments: "
                      f"make sync RUNS={run_dir}")
        accelerator.end_training()
        return exit_code


class IntervalClock:
    """Wall time of a logging interval for images/s: the time in media, evaluation and checkpoints
    (other_seconds) is left out, the time waiting for data (data_seconds) is reported as a fraction."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.start, self.steps, self.data_seconds, self.other_seconds = time.perf_counter(), 0, 0.0, 0.0

    def seconds(self) -> float:
        return time.perf_counter() - self.start - self.other_seconds


def _eval_model(t: Training) -> torch.nn.Module:
    return t.ema.module if t.ema is not None else t.vae


def _first_images(cfg: Config, n: int) -> torch.Tensor:
    """A fixed set of validation images for media panels (the same at every step, on every rank)."""
    images = []
    for batch in val_batches(cfg, rank=0, world_size=1):
        images.append(batch.images)
        if sum(len(x) for x in images) >= n:
            break
    return torch.cat(images)[:n]


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (KiB on Linux)


@exit_on_user_error
def cli(argv: list[str]) -> int:
    return main(cli_config(argv))


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
