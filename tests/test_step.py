"""The training step as a GPU runs it, checked on CPU through what it dispatches (pipeline.dispatch.OpLog):
- no host sync in a step: nothing read back (.item(), bool() of a tensor), nothing made from Python data
  (torch.tensor(...) on the device), for every switch a recipe can turn on — SSIM, TV, perceptual, KL warm-up,
  the adversarial stage with its adaptive weight and LeCam anchors, EMA, codebooks with dead-code restarts,
  channels_last, bf16 and fp32 (Accelerate makes no fp16 GradScaler on CPU: that path is bench-gpu's);
- the step's operators (each at least one kernel launch on a GPU, where small models are launch-bound) at
  most 10 % over a bare PyTorch loop of the same model and loss (benchmarks/bench_train.py prints the same
  count; BENCHMARKS.md has the before/after)."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import ROOT
from pipeline.config import load_config

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_train import OPS_GOAL, bare_step_fn, op_log, pipeline_step_fn  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")

TINY_CONV = ["model.channels=[8,16]", "model.latent_dim=8", "loss.perceptual.weights=none",
             "loss.perceptual.backbone=test_resnet", "loss.perceptual.layers=[1,2]"]
SYNC_CASES = {
    # BatchNorm, channels_last, flip + rotation, L1 + SSIM + TV + perceptual, KL warm-up, EMA (bf16)
    "flowers": ("recipes/flowers.yaml", TINY_CONV),
    # + the discriminator's step, the adaptive weight, LeCam anchors and R1 from the first step
    "flowers_gan": ("recipes/flowers_gan.yaml", [*TINY_CONV, "loss.adversarial.disc_start=0",
                                                 "loss.adversarial.disc_channels=8", "loss.adversarial.disc_layers=2",
                                                 "loss.adversarial.r1_weight=1.0"]),
    # fp32 (TF32 on a GPU), the gaussian likelihood's learned variance
    "gaussian": ("recipes/flowers.yaml", [*TINY_CONV, 'train.mixed_precision="no"', "loss.recon=gaussian"]),
    # GroupNorm, attention, sparsity
    "resnet_f8": ("recipes/resnet_f8.yaml", ["model.channels=[8,16]", "model.attention_levels=[1]",
                                             "train.compile=false"]),
    # an EMA codebook with dead-code restarts in every step
    "vq_f8": ("recipes/vq_f8.yaml", ["model.channels=[8,16]", "model.quantizer.kind=ema",
                                     "model.quantizer.codebook_size=32", "model.quantizer.restart_every_steps=1"]),
}


def _batch(size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", SYNC_CASES)
def test_a_training_step_never_makes_the_host_wait_for_the_device(case):
    from accelerate import Accelerator

    recipe, overrides = SYNC_CASES[case]
    cfg = load_config(recipe, ["data.batch_size_per_device=4", *overrides], check_paths=False)
    accelerator = Accelerator(cpu=True, mixed_precision=cfg.train.mixed_precision)
    log = op_log(pipeline_step_fn(cfg, accelerator, _batch()))
    assert log.ops > 100  # (the step ran under the log)
    assert log.syncs == [], f"host syncs in a training step: {log.syncs}"


@pytest.mark.parametrize("recipe, overrides, size", [
    # The recipes' layers at 4 channels each (the count does not depend on widths or image size)
    ("recipes/flowers.yaml", ["loss.perceptual.weights=none", "model.channels=[4,4,4,4,4,4]",
                              "model.latent_dim=4"], 64),  # BatchNorm: 36 buffers put back after a skip
    ("recipes/resnet_f8.yaml", ["model.channels=[4,4,4,4]", "model.latent_channels=4", "train.compile=false"],
     32),  # GroupNorm, attention
])
@pytest.mark.slow  # seconds: in make test, not in make test-fast
def test_the_step_dispatches_at_most_ten_percent_more_operators_than_a_bare_loop(recipe, overrides, size):
    from accelerate import Accelerator

    cfg = load_config(recipe, ["data.batch_size_per_device=4", *overrides], check_paths=False)
    accelerator = Accelerator(cpu=True, mixed_precision=cfg.train.mixed_precision)
    batch = _batch(size)
    bare, ours = op_log(bare_step_fn(cfg, batch, accelerator.device)), op_log(pipeline_step_fn(cfg, accelerator, batch))
    extra = (ours.counts - bare.counts).most_common(6)
    assert ours.ops <= OPS_GOAL * bare.ops, f"{ours.ops} vs {bare.ops} bare: {ours.ops / bare.ops:.3f}x; extra {extra}"


def test_the_op_log_sees_the_host_syncs_it_is_there_to_catch():
    """Each kind of sync the test above must catch, caught (a log that saw nothing would pass it)."""
    from pipeline.dispatch import OpLog

    x = torch.ones(3)
    with OpLog() as log:
        _ = x.sum().item()
        _ = bool(x.sum() > 0)
        _ = torch.tensor([[1.5]])
        _ = x.nonzero()
    assert [op for op, _ in log.syncs] == ["_local_scalar_dense", "_local_scalar_dense", "lift_fresh", "nonzero"]
