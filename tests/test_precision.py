"""The GPU path's switches, exercised on CPU (issue 13 item 5): train.mixed_precision=bf16 (CPU autocast)
and train.compile=true (inductor, C++ kernels), with the adversarial stage on and off, for training
steps and for an exact resume: steps 0-1, a checkpoint, steps 2-3; then a freshly built (and freshly
compiled) trainer loads the checkpoint and repeats steps 2-3 bit for bit.

In-process and tiny (resnet [8, 16] at 32 px, 4 images per micro-batch) because inductor compiling on
two cores costs tens of seconds per graph; the multi-process resume tests are in test_resume.py."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_accelerator_state")]

TINY = ["model.arch=resnet", "model.channels=[8,16]", "model.latent=spatial", "model.latent_channels=2",
        "data.batch_size_per_device=4", "optim.schedule=constant", "optim.warmup_steps=0", "optim.ema_decay=0.9"]
GAN = ["loss.adversarial.weight=0.5", "loss.adversarial.disc_channels=8", "loss.adversarial.disc_layers=2",
       "loss.adversarial.disc_start=1", "loss.adversarial.lecam_weight=0.1"]


def _trainer(cfg):
    from accelerate import Accelerator

    from pipeline.step import build_training

    accelerator = Accelerator(cpu=True, mixed_precision=cfg.train.mixed_precision)
    return accelerator, build_training(cfg, accelerator, 32)


def _steps(t, accelerator, cfg, batches, first: int) -> list[dict[str, float]]:
    """Training steps `first`, first+1, ... as train.py runs them: the VAE, then the discriminator, then EMA."""
    from pipeline.optim import lr_at, set_lr
    from pipeline.step import discriminator_step, train_step

    logged = []
    for i, images in enumerate(batches):
        step = first + i
        set_lr(t.optimizer, lr_at(step, cfg.optim, cfg.train.max_steps))
        result = train_step(t, accelerator, [images], step, cfg)
        terms = dict(result.terms)
        if t.adversary is not None and t.adversary.schedule.disc_active(step):
            d = discriminator_step(t.adversary, accelerator, [images], result.fakes, step)
            assert bool(d.ok), d.terms
            terms.update(d.terms)
        assert bool(result.ok), result.terms
        t.ema.update(t.vae, step + 1, result.ok)
        logged.append({k: v.item() for k, v in terms.items()})
    return logged


@pytest.mark.parametrize("precision, compile_, gan, extra", [
    ("bf16", False, False, []),
    # the expensive one: VAE and discriminator compiled, bf16, the adversarial terms in the graph, and the
    # switches the GPU recipes ship (flowers_gan: channels_last weights, BatchNorm statistics kept as views of
    # one flat tensor that the compiled graph writes in place). (bf16 steps with the stage eager:
    # tests/test_adversarial.py; fp32 resume with it: test_resume.py's gan case.)
    ("bf16", True, True, ["model.arch=dcgan", "train.channels_last=true"]),
])
def test_steps_and_exact_resume(tiny_shards, tmp_path, precision, compile_, gan, extra):
    from pipeline.checkpoint import Checkpointer, restore_rng, seed_rng

    cfg = load_config("recipes/demo.yaml", [f"data.shards={tiny_shards}", *TINY, *(GAN if gan else []),
                                            f"train.mixed_precision={precision}", f"train.compile={compile_}",
                                            "train.max_steps=4", *extra])
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(4, 3, 32, 32, generator=g) * 2 - 1 for _ in range(4)]

    accelerator, t = _trainer(cfg)
    seed_rng(accelerator.device, "test", 0)
    before = _steps(t, accelerator, cfg, batches[:2], 0)
    ckpt = Checkpointer(tmp_path, accelerator, every_steps=1, keep=2)
    ckpt.save(2, t.parts, {"step": 2})
    after = _steps(t, accelerator, cfg, batches[2:], 2)
    assert all(torch.isfinite(torch.tensor(list(r.values()))).all() for r in before + after)
    if gan:  # the stage really ran: D from step 1, its loss on the generator from step 1
        assert "gan_d" in before[1] and "gan_g" in after[0] and "gan_adaptive_weight" in after[0]
        assert "gan_d" not in before[0]

    accelerator, t2 = _trainer(cfg)  # a new process would build (and compile) everything again
    resumed = ckpt.load(ckpt.resolve("auto"), t2.parts)
    restore_rng(resumed.rng, accelerator.device, resumed.path)
    again = _steps(t2, accelerator, cfg, batches[2:], resumed.step)
    assert again == after, "the resumed steps differ from the uninterrupted ones"
    for name, a, b in (("vae", t.vae, t2.vae), ("ema", t.ema, t2.ema)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values())), name
    moments = t2.optimizer.optimizer.state  # in the weights' layout (torch.equal above ignores strides)
    assert all(v.stride() == p.stride() for p in t2.vae.parameters() for v in moments[p].values() if v.dim())
    if gan:
        assert all(torch.equal(x, y) for x, y in zip(t.adversary.disc.state_dict().values(),
                                                     t2.adversary.disc.state_dict().values()))
