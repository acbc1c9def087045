"""Run by tests/test_split_metrics.py, alone or under `accelerate launch` (2 processes): a fixed set of SAMPLES
synthetic samples (inputs, reconstructions, posteriors, labels, keys) fed to pipeline.split_metrics.SplitMetrics,
rank 0 taking the first FIRST_RANK_SHARE of them and rank 1 the rest (uneven on purpose; 0 gives rank 0
nothing at all). Writes OUT/figures-<FIRST_RANK_SHARE>.json on rank 0 for each share given (one launch,
several splits: a launch costs more than the figures).

    accelerate launch ... tests/split_metrics_worker.py OUT [FIRST_RANK_SHARE[,FIRST_RANK_SHARE...]]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import ModelConfig  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.split_metrics import SplitMetrics  # noqa: E402

SAMPLES, CLASSES, SIZE, BATCH = 60, 4, 16, 5


def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="resnet", channels=[8, 16], latent_channels=3), SIZE)


def dataset(latent_shape) -> dict[str, torch.Tensor | list[str]]:
    """The same samples in every process: latents whose pooled mean half-separates the classes."""
    g = torch.Generator().manual_seed(123)
    labels = torch.randint(0, CLASSES, (SAMPLES,), generator=g)
    x = torch.rand(SAMPLES, 3, SIZE, SIZE, generator=g) * 2 - 1
    recon = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    mu = torch.randn(SAMPLES, *latent_shape, generator=g)
    mu[:, 0] += labels.view(-1, 1, 1).float() * 0.4  # class information in channel 0, buried in noise
    logvar = torch.randn(SAMPLES, *latent_shape, generator=g) * 0.3 - 1
    z = mu + torch.randn(mu.shape, generator=g) * (0.5 * logvar).exp()
    keys = [f"sample-{i:04d}" for i in range(SAMPLES)]
    return {"x": x, "recon": recon, "mu": mu, "logvar": logvar, "z": z, "labels": labels, "keys": keys,
            "neg_elbo": torch.rand(SAMPLES, generator=g) * 100}


def main(out: Path, shares: list[int]) -> None:
    accelerator = Accelerator()
    vae = model()
    data = dataset(vae.latent_shape)
    for first_share in shares:
        figures = split_figures(accelerator, vae, data, first_share)
        if accelerator.is_main_process:
            (out / f"figures-{first_share}.json").write_text(json.dumps(figures))
    accelerator.wait_for_everyone()
    accelerator.end_training()


def split_figures(accelerator, vae, data, first_share: int) -> dict:
    rank, world = accelerator.process_index, accelerator.num_processes
    part = slice(0, SAMPLES) if world == 1 else (slice(0, first_share) if rank == 0 else slice(first_share, SAMPLES))
    idx = list(range(SAMPLES))[part]
    acc = SplitMetrics(vae, accelerator.device)
    for i in range(0, len(idx), BATCH):
        b = idx[i:i + BATCH]
        acc.update(data["x"][b], data["recon"][b], data["mu"][b], data["logvar"][b], z=data["z"][b],
                   labels=data["labels"][b], keys=[data["keys"][j] for j in b])
        acc.add("neg_elbo_nats", data["neg_elbo"][b])
    figures = acc.compute(accelerator)
    figures["world"] = world
    return figures


if __name__ == "__main__":
    main(Path(sys.argv[1]), [int(s) for s in (sys.argv[2] if len(sys.argv) > 2 else "13").split(",")])
