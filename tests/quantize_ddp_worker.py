"""Run by tests/test_quantize.py under `accelerate launch` (1 or 2 processes): the real training step of tiny
quantized VAEs on a fixed global batch per step (each rank takes its share), and a validation pass over
fixed images split between the ranks. Writes OUT/rank<r>.pt (tensors only; the test loads it with
weights_only=True) and, on rank 0, OUT/validation.json.

    accelerate launch ... tests/quantize_ddp_worker.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config  # noqa: E402
from pipeline.data import Batch  # noqa: E402
from pipeline.evaluate import validate  # noqa: E402
from pipeline.models.quantize import window_health  # noqa: E402
from pipeline.step import build_training, train_step  # noqa: E402

SIZE, GLOBAL_BATCH, STEPS = 16, 8, 6


def config(*extra: str):
    return load_config(None, ["model.arch=resnet", "model.channels=[8,16]", "model.latent_channels=4",
                              "model.quantizer.kind=ema", "model.quantizer.codebook_size=16", "optim.ema_decay=0",
                              "tracking.best_metric=val/psnr", "data.hflip=false", "optim.lr=0.01", *extra],
                       check_paths=False)


def global_images(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 256, (GLOBAL_BATCH, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)


def main(out: Path) -> None:
    accelerator = Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    share = GLOBAL_BATCH // world
    result: dict[str, torch.Tensor] = {"world": torch.tensor(world)}

    # Validation of a freshly initialised model (the same weights in every launch): the code statistics of
    # the split, each rank reading its share, reduced once.
    cfg = config()
    set_seed(0)
    t = build_training(cfg, accelerator, SIZE)
    images = torch.cat([global_images(100 + i) for i in range(3)])  # 24 images
    mine = images[rank::world]
    batches = [Batch(mine[i:i + 5], torch.zeros(len(mine[i:i + 5]), dtype=torch.long), [])
               for i in range(0, len(mine), 5)]
    metrics = validate(t.vae, t.loss, t.augment, batches, accelerator, step=0)
    if accelerator.is_main_process:
        (out / "validation.json").write_text(json.dumps(metrics))

    # Training: A restarts dead codes every 2 steps, B never does (its codebook must match one process on
    # the whole batch; restarts draw from each rank's own tokens, so A can only be compared across ranks).
    for name, extra in (("restarts", ["model.quantizer.restart_every_steps=2"]), ("plain", [])):
        cfg = config(*extra)
        set_seed(0)
        t = build_training(cfg, accelerator, SIZE)
        for step in range(STEPS):
            x = t.augment(global_images(step)[rank * share:(rank + 1) * share].to(accelerator.device), train=False)
            train_step(t, accelerator, [x], step, cfg)
        q = t.quantizers[0]
        result[f"{name}/codebook"] = q.codebook.detach().cpu().clone()
        result[f"{name}/cluster_size"] = q.ema_cluster_size.cpu().clone()
        result[f"{name}/restarts_total"] = q.restarts_total.cpu().clone()
        health = window_health(t.vae)
        result[f"{name}/usage"] = torch.tensor(health["codebook/latent/usage"], dtype=torch.float64)
        result[f"{name}/perplexity"] = torch.tensor(health["codebook/latent/perplexity"], dtype=torch.float64)
    torch.save(result, out / f"rank{rank}.pt")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
