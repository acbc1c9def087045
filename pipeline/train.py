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
    if launched_by_torchrun():  # the elastic agent starts workers in their own session: die with it
        die_with_parent()
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision,
                              gradient_accumulation_steps=cfg.train.grad_accum_steps)
    main_process, device = accelerator.is_main_process, accelerator.device
    run_dir = Path(cfg.run.dir) / (cfg.run.name or cfg.name)
    lock = own_run_folder(run_dir, accelerator)  # before anything is written there
    # What this start continues, and whether its settings may continue it: a setting that cannot change on
    # resume (the architecture, the data order) is refused here, before config.yaml is replaced.
    checkpointer = Checkpointer(run_dir, accelerator, cfg.train.checkpoint_every_steps, cfg.train.keep_checkpoints)
    resume_from = checkpointer.resolve(cfg.train.resume)
    changes = check_changes(trainer_state(resume_from), cfg, resume_from) if resume_from is not None else {}
    if main_process:
        save_config(cfg, run_dir / "config.yaml")
    set_seed(cfg.train.seed)  # identical initial weights on every rank

    # Data: an infinite, exactly resumable train stream per rank; augmentation runs on the device.
    manifest = read_manifest(cfg.data.shards)
    check_fits(cfg, manifest, cfg.data.shards)  # model.spatial_dims and in_channels against the shards
    stream = TrainStream(cfg, accelerator.process_index, accelerator.num_processes)

    # Model, loss, optimizer (+ EMA of the weights for media and evaluation), prepared by Accelerate.
    t = build_training(cfg, accelerator, manifest["size"], data_range(manifest), fresh=resume_from is None)
    # For MFU: the VAE's, the perceptual backbone's and the discriminator's FLOPs (pipeline/flops.py)
    flops = step_flops_per_image(t.vae, t.loss, t.adversary.disc if t.adversary else None, manifest["size"],
                                 r1=cfg.loss.adversarial.weight > 0 and cfg.loss.adversarial.r1_weight > 0)
    flops_per_image = flops["total"]
    if cfg.train.freeze:
        trained = sum(p.numel() for p in t.vae.parameters() if p.requires_grad)
        accelerator.print(f"frozen: {', '.join(cfg.train.freeze)}; training {trained:,} of "
                          f"{t.vae.num_parameters():,} parameters")
    if main_process:  # lets evaluate/sample load the run even after its shards are gone
        durable.write_json(run_dir / "model_info.json", (
            {"image_size": manifest["size"], "classes": manifest["classes"], "image_format": manifest["image_format"],
             **{k: manifest[k] for k in ("spatial_dims", "sample_shape", "normalization") if k in manifest}}))

    # Resume weights, optimizer (with this run's hyperparameters), scaler, EMA, step and data position.
    meter = IntervalMeter()  # loss terms summed on the device; read (one sync) on logging steps
    step, nonfinite = 0, {"run": 0, "total": 0}  # consecutive and total skipped (non-finite) steps
    resumed = checkpointer.load(resume_from, t.parts) if resume_from is not None else None
    if resumed is not None:
        step, state = resumed.step, resumed.trainer
        nonfinite = state["nonfinite"]
        try:
            note = stream.load_state_dict(state["stream"])
        except ValueError as e:
            raise UserError(f"checkpoint {resume_from}: {e}") from None
        if resumed.same_world_size:
            meter.load_state_dict(state["meter"], device)
        else:
            note = (f"the checkpoint was written by {resumed.trainer['world_size']} processes and this run has "
                    f"{accelerator.num_processes}: weights, optimizer, EMA, step, schedule and data position "
                    f"continue, the random streams are reseeded, so losses are not bitwise those of an "
                    f"uninterrupted run") + (f"; {note}" if note else "")
        accelerator.print(f"resumed from {resume_from} at step {step}" + (f" ({note})" if note else ""))
        if changes is None:
            accelerator.print(f"checkpoint {resume_from} holds no config (an older version wrote it): settings "
                              f"changed since are not checked")
        elif changes:
            accelerator.print(f"changed since the checkpoint, applied from step {step + 1}: {describe(changes)}")
    changed = {"changed": changes} if changes else {}  # recorded: starts.jsonl here, the W&B config below
    segment = (lock.record_start({"step": step, "world_size": accelerator.num_processes, **changed})
               if main_process else 0)

    tracker = Tracker(cfg, run_dir, accelerator, segment=segment, resumed_step=step)
    tracker.log_resume_changes()
    loss_terms = t.loss.active_terms(t.vae)  # which of KL / quantizer loss, and every weighted extra
    accelerator.print("loss = " + " + ".join(loss_terms))
    tracker.log_model_info(t.vae, flops_per_image, loss_terms)
    tracker.use_dataset(cfg.data.shards)  # lineage: the shard set (manifest, sha256s) is this run's input
    best = BestWeights(run_dir, cfg.tracking.best_metric, cfg.tracking.best_mode) if main_process else None
    # LPIPS / rFID / sharpness in validation only when asked (metrics.in_validation): weights load once here,
    # and rFID's reference statistics of the val split are read from their cache (computed on first use).
    field_metrics = fid_stats.field_metrics(cfg, cfg.data.shards, "val", accelerator) if cfg.metrics.in_validation \
        else None
    stop = StopFlag(compile_workers=cfg.train.compile)
    if manifest["splits"]["val"]["count"] == 0:  # decided from the manifest, identically on every rank
        raise UserError(f"data.shards {cfg.data.shards} has no validation images; rebuild it with "
                          f"`python -m pipeline.shards ... --val-fraction 0.1`")
    # Fixed validation images for the media panels; only the main process logs media.
    media_images = _first_images(cfg, cfg.tracking.media_images) if main_process else None
    if media_images is not None and media_images.dtype != torch.uint8:  # arrays: normalised as training batches
        media_images = t.augment(media_images.to(device), train=False).cpu()
    images_per_step = cfg.data.batch_size_per_device * cfg.train.grad_accum_steps * accelerator.num_processes
    peak = peak_flops(device)
    nonfinite_run = torch.tensor(nonfinite["run"], device=device)
    # Interval timing for images/s; the time spent in media, evaluation and checkpoints is left out.
    data_seconds, other_seconds, interval_start, interval_steps, start_step = 0.0, 0.0, time.perf_counter(), 0, step
    loop_start = time.perf_counter()
    bar = tqdm(total=cfg.train.max_steps, initial=step, disable=not accelerator.is_local_main_process,
               dynamic_ncols=True)
    exit_code = 0

    # The very last thing before the first step: the random streams (noise, augmentation). Restored
    # here, after all the setup above, so nothing in it can shift them; seeded per rank otherwise.
    if resumed is not None and resumed.rng is not None:
        restore_rng(resumed.rng, device, resumed.path)
    else:
        seed_rng(device, "train", cfg.train.seed, accelerator.process_index, step)

    stream_iter = iter(stream)
    while step < cfg.train.max_steps:
        t0 = time.perf_counter()
        micro = [next(stream_iter).images.to(device, non_blocking=True) for _ in range(cfg.train.grad_accum_steps)]
        data_seconds += time.perf_counter() - t0
        micro = [t.augment(m, train=True).contiguous(memory_format=t.memory_format) for m in micro]
        if step + 1 in cfg.train.inject_nan_at_steps and cfg.train.inject_nan_rank in (-1, accelerator.process_index):
            micro = [m * float("nan") for m in micro]  # fault injection for the non-finite guard's tests
        set_lr(t.optimizer, lr_at(step, cfg.optim, cfg.train.max_steps))
        result = train_step(t, accelerator, micro, step, cfg)  # the VAE (generator)
        if t.adversary is not None and t.adversary.schedule.disc_active(step):  # the discriminator, own optimizer
            disc = discriminator_step(t.adversary, accelerator, micro, result.fakes, step)
            meter.add({**disc.terms, "gan_grad_norm": disc.grad_norm}, disc.nonfinite, disc.ok, training_step=False)
        step += 1
        if t.ema is not None:
            t.ema.update(t.vae, step, result.ok)  # the VAE only
        nonfinite_run = torch.where(result.ok, torch.zeros_like(nonfinite_run), nonfinite_run + 1)
        meter.add({**result.terms, "grad_norm": result.grad_norm}, result.nonfinite, result.ok)
        faults.kill_at("step", step, main_process)
        faults.pause_at("step", step)
        interval_steps += 1
        bar.update(1)

        last = step == cfg.train.max_steps
        if tracker.is_due("scalars", step, final=last):
            means, bad, skipped, corrupt = meter.read(accelerator, stream.skipped_samples)  # the one sync
            seconds = time.perf_counter() - interval_start - other_seconds
            ips = images_per_step * interval_steps / seconds
            nonfinite["total"] += skipped
            grad_norm = means.pop("loss/grad_norm", float("nan"))
            scalars = {**means,
                       "train/grad_norm": grad_norm,
                       "train/lr": lr_at(step - 1, cfg.optim, cfg.train.max_steps),
                       "train/images_per_second": ips,
                       "train/images_per_second_per_device": ips / accelerator.num_processes,
                       "train/data_wait_fraction": data_seconds / seconds,
                       "train/nonfinite_steps": nonfinite["total"],
                       "train/skipped_samples": corrupt,
                       "train/checkpoint_seconds": checkpointer.last_save_seconds,
                       "train/memory_gb": _memory_gb(device),
                       "train/epoch": stream.position / stream.samples_per_epoch}
            scalars.update({f"train/nonfinite/{k}": v for k, v in bad.items()})
            scalars.update(window_health(t.vae))  # codebook usage/perplexity over the interval, all ranks
            if peak:
                scalars["train/mfu"] = flops_per_image * ips / accelerator.num_processes / peak
            tracker.log_scalars(step, scalars)
            bar.set_postfix(loss=f"{scalars.get('loss/total', float('nan')):.4f}", ips=f"{ips:.0f}")
            if bad:
                accelerator.print(f"step {step}: skipped non-finite steps (term: steps) {bad}")
            if nonfinite_run.item() >= cfg.train.max_nonfinite_steps:  # checked on logging steps only
                terms = ", ".join(k for k in bad if k not in ("total", "grad_norm")) or "the gradients"
                bar.close()
                tracker.finish(exit_code=1)
                raise SystemExit(f"error: stopped at step {step}: {cfg.train.max_nonfinite_steps} consecutive steps "
                                 f"had a non-finite loss or gradient (non-finite term: {terms}); lower optim.lr, "
                                 f"use bf16 instead of fp16, or check the data")
            data_seconds, other_seconds, interval_start, interval_steps = 0.0, 0.0, time.perf_counter(), 0

        # Components own their cadence. Evaluation and media must not consume the training RNG streams.
        t_other = time.perf_counter()
        if tracker.is_due("media", step, final=last):
            with preserved_rng(device):
                # every rank encodes a share of the train images; the main process fits and saves the prior
                expost = fit_during_training(cfg, _eval_model(t), t.augment, accelerator, step, run_dir,
                                             "ema" if t.ema is not None else "raw")
                tracker.log_media(step, _eval_model(t), media_images, expost=expost,
                                  critic=t.adversary.disc if t.adversary is not None else None)
        if tracker.is_due("eval", step, final=last):
            with preserved_rng(device):
                metrics = validate(_eval_model(t), t.loss, t.augment,
                                   val_batches(cfg, accelerator.process_index, accelerator.num_processes),
                                   accelerator, step, field_metrics)
            tracker.log_eval(step, metrics)
            if best is not None:
                best.update(step, metrics, _eval_model(t))
        stopping = stop.should_stop()
        saved = checkpointer.maybe_save(step, t.parts, lambda: {
            "step": step, "images_seen": stream.position, "world_size": accelerator.num_processes,
            "stream": stream.state_dict(), "meter": meter.state_dict(), "config": to_dict(cfg),
            "nonfinite": {"run": int(nonfinite_run.item()), "total": nonfinite["total"]}}, force=stopping or last)
        if saved:
            stop.check_checkpoint_time(checkpointer.last_save_seconds, accelerator)
        if stopping:
            accelerator.print(f"received {stop.received or 'a stop signal on another rank'}: "
                              f"saved step {step}, exiting with {EXIT_PREEMPTED}")
            exit_code = EXIT_PREEMPTED
            break
        other_seconds += time.perf_counter() - t_other

    bar.close()
    wall = time.perf_counter() - loop_start
    summary = {"step": step, "images_seen": stream.position, "wall_seconds": wall,
               "images_per_second": images_per_step * (step - start_step) / max(wall, 1e-9),
               "flops_per_image": flops_per_image, "flops_per_image_by_network": flops,
               "world_size": accelerator.num_processes,
               "exit_code": exit_code}
    if peak:
        summary["mfu"] = flops_per_image * summary["images_per_second"] / accelerator.num_processes / peak
    if exit_code == 0:
        summary.update({k: v for k, v in tracker.last_scalars.items() if k.startswith(("loss/", "val/"))})
        if main_process:
            durable.write_json(run_dir / "summary.json", summary, indent=2)
            # The trained weights (EMA when on) as the run's model artifact: final, and best by best_metric.
            tracker.log_model(_eval_model(t).state_dict(), ["final", "latest"], {"step": step})
            if best.state is not None:
                tracker.log_model(best.weights(), ["best"], best.state)
    tracker.set_summary(summary)
    if main_process:
        lock.record_exit(segment, exit_code, step)
    wandb_dir = tracker.wandb_dir
    tracker.finish(exit_code)
    # Exit together, after the main process has flushed W&B: under `srun --kill-on-bad-exit` a rank
    # leaving early with 75 would get the main process killed mid-flush.
    accelerator.wait_for_everyone()
    if main_process and exit_code == 0:
        print(f"\nrun folder: {run_dir}  (metrics.jsonl, summary.json, checkpoints/)\n"
              f"images:     {run_dir / 'media'}")
        if wandb_dir is not None and cfg.tracking.mode == "offline":
            print(f"W&B:        {wandb_dir} (offline); upload the run with all its segments: "
                  f"make sync RUNS={run_dir}")
    accelerator.end_training()
    return exit_code


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
