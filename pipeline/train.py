"""Train a VAE on WebDataset shards with Accelerate, tracked on W&B.

    make demo-data                                    # or: make shards SRC=data/flowers NAME=flowers SIZE=128
    python pipeline/train.py recipes/demo.yaml train.max_steps=50              # one process
    accelerate launch --multi_gpu --num_processes 8 pipeline/train.py recipes/flowers.yaml
    sbatch --nodes 4 slurm/multinode.sbatch recipes/flowers.yaml               # README: Running on SLURM

Everything lands in runs/<run.name>/: config.yaml, metrics.jsonl, checkpoints/, media/, wandb/,
summary.json. Running the same command again resumes from the latest complete checkpoint
(train.resume=auto) with model, optimizer, scaler, EMA, RNG and the exact data-stream position, so the
resumed run sees exactly the batches the uninterrupted one would have. SIGUSR1/SIGTERM: every rank
finishes its step, one checkpoint is saved, and the process exits with code 75 (EXIT_PREEMPTED).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`python pipeline/train.py`, `accelerate launch ...`)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from pipeline.checkpoint import Checkpointer
from pipeline.config import Config, ConfigError, cli_config, exit_on_config_error, save_config
from pipeline.data import DeviceAugment, TrainStream, read_manifest, val_batches
from pipeline.evaluate import validate
from pipeline.meters import IntervalMeter
from pipeline.losses import VAELoss
from pipeline.models import build_model, training_flops_per_image
from pipeline.optim import EMA, build_optimizer, lr_at, set_lr
from pipeline.preemption import EXIT_PREEMPTED, StopFlag
from pipeline.tracking import Tracker

# Dense bf16 tensor-core peaks (FLOP/s) for MFU; a GPU not listed reports no MFU rather than a guess.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


class TrainModule(torch.nn.Module):
    """The VAE and its loss as one module, so DDP also averages the loss's own parameters (the learned
    log-variance of the gaussian likelihood) and one forward returns everything the step needs."""

    def __init__(self, vae: torch.nn.Module, loss: VAELoss):
        super().__init__()
        self.vae, self.loss = vae, loss

    def forward(self, images: torch.Tensor, step: int):
        out = self.vae(images)
        return self.loss(out, images, step)


def train_step(module, optimizer, accelerator, micro_batches, step: int, cfg: Config):
    """One optimizer step over `grad_accum_steps` micro-batches. Returns (loss terms, grad norm, ok), all
    device tensors: nothing here waits for the device. A non-finite gradient norm (identical on every rank
    after the all-reduce) skips the update on the device through the fused optimizer's found_inf."""
    for images in micro_batches:
        with accelerator.accumulate(module):
            result = module(images, step)
            accelerator.backward(result.total)
    clip = cfg.optim.grad_clip_norm or float("inf")  # inf: measure the norm, change nothing
    grad_norm = accelerator.clip_grad_norm_(module.parameters(), clip)
    ok = torch.isfinite(grad_norm)
    if accelerator.scaler is None:  # with fp16 the GradScaler sets found_inf itself
        optimizer.optimizer.found_inf = (~ok).float()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return result, grad_norm, ok


@dataclass
class Training:
    """Everything a training step needs. Built by build_training for train.py, pipeline.batchsize and
    benchmarks/bench_train.py alike, so the three always measure the same step."""

    vae: torch.nn.Module
    augment: DeviceAugment
    ema: EMA | None
    module: torch.nn.Module  # TrainModule(vae, loss), prepared (DDP on several processes)
    optimizer: torch.optim.Optimizer
    memory_format: torch.memory_format


def build_training(cfg: Config, accelerator: Accelerator, image_size: int) -> Training:
    vae = build_model(cfg.model, image_size)
    loss_fn = VAELoss(cfg.loss, vae.output_range, cfg.model.in_channels)
    augment = DeviceAugment(cfg.data, vae.output_range).to(accelerator.device)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    vae = vae.to(accelerator.device, memory_format=memory_format)
    ema = EMA(vae, cfg.optim.ema_decay).to(accelerator.device) if cfg.optim.ema_decay > 0 else None
    module = TrainModule(torch.compile(vae) if cfg.train.compile else vae, loss_fn)
    # The loss's own parameters (the gaussian log-variance) get no weight decay.
    optimizer = build_optimizer(vae.parameters(), [p for p in loss_fn.parameters() if p.requires_grad], cfg.optim)
    module, optimizer = accelerator.prepare(module, optimizer)
    return Training(vae, augment, ema, module, optimizer, memory_format)


def main(cfg: Config) -> int:
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision,
                              gradient_accumulation_steps=cfg.train.grad_accum_steps)
    run_dir = Path(cfg.run.dir) / (cfg.run.name or cfg.name)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    set_seed(cfg.train.seed)  # identical initial weights on every rank

    # Data: an infinite, exactly resumable train stream per rank; augmentation runs on the device.
    manifest = read_manifest(cfg.data.shards)
    stream = TrainStream(cfg, accelerator.process_index, accelerator.num_processes)

    # Model, loss, optimizer (+ EMA of the weights for media and evaluation), prepared by Accelerate.
    t = build_training(cfg, accelerator, manifest["size"])
    vae, augment, ema, module, optimizer, memory_format = t.vae, t.augment, t.ema, t.module, t.optimizer, t.memory_format
    flops_per_image = training_flops_per_image(vae, manifest["size"])
    if accelerator.is_main_process:  # lets evaluate/sample load the run even after its shards are gone
        (run_dir / "model_info.json").write_text(json.dumps(
            {"image_size": manifest["size"], "classes": manifest["classes"], "image_format": manifest["image_format"]}))

    # Resume (model, optimizer, scaler, RNG, EMA, step, data position) from the run folder.
    checkpointer = Checkpointer(run_dir, accelerator, cfg.train.checkpoint_every_steps, cfg.train.keep_checkpoints)
    step, images_seen = 0, 0
    resume_from = checkpointer.resolve(cfg.train.resume)
    if resume_from is not None:
        state = checkpointer.load(resume_from, ema)
        step, images_seen = state["step"], state["images_seen"]
        stream.load_state_dict(state["stream"])
        accelerator.print(f"resumed from {resume_from} at step {step}")

    tracker = Tracker(cfg, run_dir, accelerator)
    tracker.log_model_info(vae, flops_per_image)
    stop = StopFlag()
    if manifest["splits"]["val"]["count"] == 0:  # decided from the manifest, identically on every rank
        raise ConfigError(f"data.shards {cfg.data.shards} has no validation images; rebuild it with "
                          f"`python -m pipeline.shards ... --val-fraction 0.1`")
    # Fixed validation images for the media panels; only the main process logs media.
    media_images = _first_images(cfg, cfg.tracking.media_images) if accelerator.is_main_process else None
    images_per_step = cfg.data.batch_size_per_device * cfg.train.grad_accum_steps * accelerator.num_processes
    peak = _peak_flops(accelerator.device)
    meter = IntervalMeter()  # loss terms summed on the device; read (one sync) on logging steps
    nonfinite_run = torch.zeros((), device=accelerator.device)  # consecutive skipped steps
    nonfinite_total = 0.0
    # Interval timing for images/s; the time spent in media, evaluation and checkpoints is left out.
    data_seconds, other_seconds, interval_start, interval_steps, start_step = 0.0, 0.0, time.perf_counter(), 0, step
    loop_start = time.perf_counter()
    bar = tqdm(total=cfg.train.max_steps, initial=step, disable=not accelerator.is_local_main_process,
               dynamic_ncols=True)
    exit_code = 0

    stream_iter = iter(stream)
    while step < cfg.train.max_steps:
        t0 = time.perf_counter()
        micro = [next(stream_iter).images.to(accelerator.device, non_blocking=True)
                 for _ in range(cfg.train.grad_accum_steps)]
        data_seconds += time.perf_counter() - t0
        micro = [augment(m, train=True).contiguous(memory_format=memory_format) for m in micro]
        if step + 1 in cfg.train.inject_nan_at_steps:  # fault injection for the non-finite guard's test
            micro = [m * float("nan") for m in micro]
        set_lr(optimizer, lr_at(step, cfg.optim, cfg.train.max_steps))
        result, grad_norm, ok = train_step(module, optimizer, accelerator, micro, step, cfg)
        step += 1
        images_seen += images_per_step
        if ema is not None:
            ema.update(accelerator.unwrap_model(module).vae, step)
        nonfinite_run = torch.where(ok, torch.zeros_like(nonfinite_run), nonfinite_run + 1)
        meter.add({**result.terms, "total": result.total, "grad_norm": grad_norm}, ok)
        interval_steps += 1
        bar.update(1)

        last = step == cfg.train.max_steps
        if tracker.is_due("scalars", step, final=last):
            means, bad = meter.read(accelerator)  # the one sync of a logging step
            seconds = time.perf_counter() - interval_start - other_seconds
            ips = images_per_step * interval_steps / seconds
            nonfinite_total += max(bad.values(), default=0.0)
            scalars = {**means,
                       "train/grad_norm": means.pop("loss/grad_norm", float("nan")),
                       "train/lr": lr_at(step - 1, cfg.optim, cfg.train.max_steps),
                       "train/images_per_second": ips,
                       "train/images_per_second_per_device": ips / accelerator.num_processes,
                       "train/data_wait_fraction": data_seconds / seconds,
                       "train/nonfinite_steps": nonfinite_total,
                       "train/skipped_samples": stream.skipped_samples,
                       "train/memory_gb": _memory_gb(accelerator.device),
                       "train/epoch": images_seen / max(1, stream.samples_per_epoch)}
            scalars.update({f"train/nonfinite/{k}": v for k, v in bad.items()})
            scalars.pop("loss/grad_norm", None)
            if peak:
                scalars["train/mfu"] = flops_per_image * ips / accelerator.num_processes / peak
            tracker.log_scalars(step, scalars)
            bar.set_postfix(loss=f"{scalars.get('loss/total', float('nan')):.4f}", ips=f"{ips:.0f}")
            if bad:
                accelerator.print(f"step {step}: skipped non-finite steps (term: count) {bad}")
            if nonfinite_run.item() >= cfg.train.max_nonfinite_steps:  # checked on logging steps only
                terms = ", ".join(k for k in bad if k != "total") or "the gradients"
                bar.close()
                tracker.finish(exit_code=1)
                raise SystemExit(f"error: stopped at step {step}: {cfg.train.max_nonfinite_steps} consecutive steps "
                                 f"had a non-finite loss or gradient (non-finite term: {terms}); lower optim.lr, "
                                 f"use bf16 instead of fp16, or check the data")
            data_seconds, other_seconds, interval_start, interval_steps = 0.0, 0.0, time.perf_counter(), 0

        # Components own their cadence. Evaluation and media must not consume the training RNG stream.
        t_other = time.perf_counter()
        with torch.random.fork_rng(devices=_rng_devices(accelerator)):
            if tracker.is_due("media", step, final=last):
                tracker.log_media(step, _eval_model(ema, accelerator, module), media_images)
            if tracker.is_due("eval", step, final=last):
                metrics = validate(_eval_model(ema, accelerator, module), accelerator.unwrap_model(module).loss,
                                   augment, val_batches(cfg, accelerator.process_index, accelerator.num_processes),
                                   accelerator, step)
                tracker.log_eval(step, metrics)
        stopping = stop.should_stop()
        checkpointer.maybe_save(step, ema, lambda: {"step": step, "images_seen": images_seen,
                                                    "stream": stream.state_dict()}, force=stopping or last)
        if stopping:
            accelerator.print(f"received {stop.received or 'a stop signal on another rank'}: "
                              f"saved step {step}, exiting with {EXIT_PREEMPTED}")
            exit_code = EXIT_PREEMPTED
            break
        other_seconds += time.perf_counter() - t_other

    bar.close()
    wall = time.perf_counter() - loop_start
    summary = {"step": step, "images_seen": images_seen, "wall_seconds": wall,
               "images_per_second": images_per_step * (step - start_step) / max(wall, 1e-9),
               "flops_per_image": flops_per_image, "world_size": accelerator.num_processes,
               "exit_code": exit_code}
    if peak:
        summary["mfu"] = flops_per_image * summary["images_per_second"] / accelerator.num_processes / peak
    if exit_code == 0:
        summary.update({k: v for k, v in tracker.last_scalars.items() if k.startswith(("loss/", "val/"))})
        if accelerator.is_main_process:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    tracker.set_summary(summary)
    wandb_dir = tracker.wandb_dir
    tracker.finish(exit_code)
    if accelerator.is_main_process and exit_code == 0:
        print(f"\nrun folder: {run_dir}  (metrics.jsonl, summary.json, checkpoints/)\n"
              f"images:     {run_dir / 'media'}")
        if wandb_dir is not None and cfg.tracking.mode == "offline":
            print(f"W&B:        {wandb_dir} (offline); upload with: wandb sync {wandb_dir}  (or: make sync)")
    accelerator.end_training()
    return exit_code


def _eval_model(ema, accelerator, module):
    return ema.module if ema is not None else accelerator.unwrap_model(module).vae


def _first_images(cfg: Config, n: int) -> torch.Tensor:
    """A fixed set of validation images for media panels (the same at every step, on every rank)."""
    images = []
    for batch in val_batches(cfg, rank=0, world_size=1):
        images.append(batch.images)
        if sum(len(x) for x in images) >= n:
            break
    return torch.cat(images)[:n]


def _rng_devices(accelerator) -> list:
    return [accelerator.device] if accelerator.device.type == "cuda" else []


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (KiB on Linux)


@exit_on_config_error
def cli(argv: list[str]) -> int:
    return main(cli_config(argv))


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
