"""Quantized latents (issue 9): VQ / EMA-VQ / FSQ known answers, dead-code restarts, codebooks identical on every
rank, code statistics over ranks equal to one process, quantize blocks, and recipes/vq_f8.yaml end to end
(trainer, W&B offline, evaluate, sample encode/decode of integer code maps)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, TEST_ENV, free_port
from pipeline.config import ConfigError, QuantizerConfig, load_config
from pipeline.models import build_model
from pipeline.models.quantize import Quantizer, code_statistics, quantizers
from pipeline.objective import VAELoss

OK = torch.tensor(True)


def vq(**kw) -> Quantizer:
    return Quantizer(QuantizerConfig(kind=kw.pop("kind", "vq"), codebook_size=kw.pop("k", 3), **kw), token_dim=2)


# -- known answers ---------------------------------------------------------------------------------


def test_vq_picks_nearest_codes_and_passes_gradients_straight_through():
    q = vq(commitment=0.25)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    # [B=1, C=2, H=1, W=2]: tokens (0.9, 0.1) -> code 1 and (0.2, 0.6) -> code 2
    z = torch.tensor([[[[0.9, 0.2]], [[0.1, 0.6]]]], requires_grad=True)
    out = q(z)
    assert out.indices.tolist() == [[[1, 2]]]
    assert torch.equal(out.z_q.detach(), torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]]))
    sq = (0.1**2 + 0.1**2 + 0.2**2 + 0.4**2) / 4  # mean over the 4 token values
    assert out.terms["commitment"].item() == pytest.approx(sq)
    assert out.terms["codebook"].item() == pytest.approx(sq)
    assert out.loss.item() == pytest.approx(sq + 0.25 * sq)
    w = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])
    (out.z_q * w).sum().backward(retain_graph=True)
    assert torch.equal(z.grad, w)  # straight-through: d z_q / d z = I
    assert q.codebook.grad is None  # the decoder's gradient never reaches the codebook
    z.grad = None
    out.loss.backward()
    e = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    assert torch.allclose(z.grad, 0.25 * 2 * (z.detach() - e) / 4)  # only the commitment term moves the encoder
    expected = torch.zeros(3, 2)
    expected[1] = 2 * (torch.tensor([1.0, 0.0]) - torch.tensor([0.9, 0.1])) / 4
    expected[2] = 2 * (torch.tensor([0.0, 1.0]) - torch.tensor([0.2, 0.6])) / 4
    assert torch.allclose(q.codebook.grad, expected)  # the codebook term pulls the used codes to their tokens


def test_factorised_l2_lookup_projects_and_normalises():
    q = Quantizer(QuantizerConfig(kind="vq", codebook_size=8, lookup_dim=3, l2_normalize=True), token_dim=5)
    z = torch.randn(2, 5, 4, 4)
    out = q(z)
    assert out.z_q.shape == z.shape and out.indices.shape == (2, 4, 4)
    codes = q.codes(out.indices)
    assert torch.allclose(codes.norm(dim=-1), torch.ones(2, 4, 4))  # unit codes in the 3-d lookup space
    assert torch.allclose(q.decode_indices(out.indices), out.z_q, atol=1e-6)  # the decoder sees the codes


def test_fsq_rounds_to_its_grid_and_indices_round_trip():
    q = Quantizer(QuantizerConfig(kind="fsq", fsq_levels=[8, 5, 3]), token_dim=3)
    assert q.num_codes == 120
    everything = torch.arange(120)
    codes = q.codes(everything)
    assert len({tuple(c.tolist()) for c in codes}) == 120  # a bijection between indices and grid points
    z = (torch.randn(16, 3, 5, 5) * 3).requires_grad_()
    out = q(z)
    assert torch.equal(q.decode_indices(out.indices), out.z_q.detach())  # codes -> indices -> codes
    half = torch.tensor([4.0, 2.0, 1.0]).view(1, 3, 1, 1)
    grid = out.z_q.detach() * half
    assert torch.equal(grid, grid.round())  # every value on the level grid
    assert out.loss.item() == 0.0 and not out.terms  # no codebook, no loss
    out.z_q.sum().backward()
    assert (z.grad != 0).any()  # the gradient of the bound passes the rounding


def test_ema_codebook_moves_by_the_step_statistics():
    q = vq(kind="ema", k=2, ema_decay=0.5, ema_epsilon=1e-12)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        q.ema_embed_sum.copy_(q.codebook)
    tokens = torch.tensor([[0.2, 0.0], [0.0, 0.2], [0.8, 1.0]])  # 2 tokens to code 0, 1 to code 1
    q(tokens.t().reshape(1, 2, 1, 3), track=True)
    q.after_step(0, OK)
    size = torch.tensor([0.5 * 1 + 0.5 * 2, 0.5 * 1 + 0.5 * 1])
    embed = torch.stack([0.5 * torch.tensor([0.0, 0.0]) + 0.5 * torch.tensor([0.2, 0.2]),
                         0.5 * torch.tensor([1.0, 1.0]) + 0.5 * torch.tensor([0.8, 1.0])])
    assert torch.allclose(q.ema_cluster_size, size)
    assert torch.allclose(q.codebook, embed / size.unsqueeze(1))
    before = q.codebook.clone()
    q(tokens.t().reshape(1, 2, 1, 3), track=True)
    q.after_step(1, torch.tensor(False))  # a skipped (non-finite) step changes nothing
    assert torch.equal(q.codebook, before) and q.usage_counts.sum() == 3


def test_dead_codes_restart_on_encoder_outputs_and_are_counted():
    q = vq(k=4, restart_every_steps=2, restart_threshold=1.0)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0.0], [9.0, 9.0], [-9.0, 9.0], [9.0, -9.0]]))
    tokens = (torch.randn(1, 2, 4, 4) * 0.1)  # every token is nearest to code 0
    for step in range(2):
        q(tokens, track=True)
        q.after_step(step, OK)
    assert q.restarts_total.item() == 3  # codes 1..3 were never used
    assert torch.equal(q.codebook[0].detach(), torch.zeros(2))  # the used code stays
    flat = tokens.movedim(1, -1).reshape(-1, 2)
    for row in q.codebook[1:].detach():
        assert (flat - row).abs().sum(1).min() < 1e-6  # each restarted code is one of the encoder's outputs
    assert q.read_window()["restarts"] == 3.0 and q.read_window()["restarts"] == 0.0  # counted once per window


def test_code_statistics_known_answer():
    s = code_statistics(torch.tensor([2.0, 2.0, 0.0, 0.0]))
    assert s["usage"] == 0.5 and s["perplexity"] == pytest.approx(2.0) and s["entropy_bits"] == pytest.approx(1.0)


# -- models, loss, config --------------------------------------------------------------------------


def cfg(*overrides: str):
    return load_config(None, ["tracking.best_metric=val/psnr", *overrides], check_paths=False)


@pytest.mark.parametrize("arch, extra", [("conv", ["model.channels=[8]", "model.latent_dim=8"]),
                                         ("vanilla", ["model.channels=[8]", "model.latent_dim=8"]),
                                         ("dcgan", ["model.channels=[8]"]), ("resnet", ["model.channels=[8,8]"])])
def test_every_architecture_quantizes_and_the_quantizer_loss_replaces_kl(arch, extra):
    c = cfg(f"model.arch={arch}", "model.quantizer.kind=vq", "model.quantizer.codebook_size=8", *extra)
    model = build_model(c.model, 16)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = model(x)
    assert out.logvar is None and out.indices is not None and out.recon.shape == x.shape
    loss = VAELoss(c.loss, model.output_range, 3)
    result = loss(out, x, 0)
    assert "kl" not in result.terms and "beta" not in result.terms
    assert result.total.item() == pytest.approx(result.terms["recon"].item() + out.quant_loss.item(), rel=1e-6)
    assert "quantizer latent (vq, 8 codes" in " + ".join(loss.active_terms(model))
    assert model.sample(3).shape == (3, 3, 16, 16)  # decoded uniformly random codes


def test_quantize_blocks_in_a_block_list_validate_and_train():
    blocks = ["model.arch=resnet", "model.quantizer.kind=ema", "model.quantizer.latent=false",
              "model.encoder=[{block: conv, out: 8}, {block: downsample}, {block: quantize, codebook_size: 16}, "
              "{block: resnet, out: 8}]", "model.decoder=[{block: conv, out: 8}, {block: upsample}, {block: quantize}]"]
    model = build_model(cfg(*blocks).model, 8)
    names = [q.name for q in quantizers(model)]
    assert names == ["encoder.2", "decoder.2"] and [q.num_codes for q in quantizers(model)] == [16, 1024]
    out = model(torch.rand(2, 3, 8, 8))
    assert set(out.block_indices) == {"encoder.2", "decoder.2"} and out.logvar is not None  # a Gaussian bottleneck
    out.quant_loss.backward()
    with pytest.raises(ConfigError, match=r"model.encoder\[2\] is a quantize block but model.quantizer.kind is none"):
        cfg(*[b.replace("kind=ema", "kind=none") for b in blocks])
    with pytest.raises(ConfigError, match=r"model.encoder\[1\] \(downsample\) has codebook_size 4; only quantize"):
        build_model(cfg(*[b.replace("{block: downsample}", "{block: downsample, codebook_size: 4}")
                          for b in blocks]).model, 8)


PSNR = "tracking.best_metric=val/psnr"


def test_quantize_blocks_train_through_the_training_step(fresh_accelerator_state):
    """The trainer's own step (pipeline.step) on a block-list model: both blocks' codebooks are counted once per
    step (after_step), their usage reaches window_health, and the step lowers the loss."""
    from accelerate import Accelerator

    from pipeline.models.quantize import window_health
    from pipeline.step import build_training, train_step

    c = cfg("model.arch=resnet", "model.quantizer.kind=vq", "model.quantizer.latent=false", "optim.lr=0.01",
            "model.quantizer.codebook_size=16", "model.quantizer.restart_every_steps=2", "optim.ema_decay=0",
            "model.encoder=[{block: conv, out: 8}, {block: downsample}, {block: quantize}, {block: resnet, out: 8}]",
            "model.decoder=[{block: conv, out: 8}, {block: quantize}, {block: upsample}]", "data.hflip=false")
    accelerator = Accelerator(cpu=True)
    t = build_training(c, accelerator, 8)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    totals = [train_step(t, accelerator, [x], step, c).terms["total"].item() for step in range(6)]
    assert totals[-1] < totals[0], totals
    health = window_health(t.vae)
    assert {"codebook/encoder.2/usage", "codebook/decoder.1/usage"} <= set(health)
    assert all(0 < health[f"codebook/{n}/usage"] <= 1 for n in ("encoder.2", "decoder.1"))
    assert sum(q.usage_counts.sum().item() for q in t.quantizers) == 0  # read_window reset the window


@pytest.mark.parametrize("overrides, sentence", [
    (["model.quantizer.kind=vq", "model.samples_per_input=2", PSNR], "a quantized latent is deterministic"),
    (["model.quantizer.kind=vq", "tracking.best_metric=val/neg_elbo_nats"],
     "tracking.best_metric is val/neg_elbo_nats, but a quantized latent has no KL"),
    (["model.quantizer.kind=fsq", "model.quantizer.fsq_levels=[8,1]", PSNR], "each at least 2"),
    (["model.quantizer.kind=ema", "model.quantizer.ema_decay=1.0", PSNR], "ema_decay must be in"),
    (["model.quantizer.kind=bq"], "model.quantizer.kind is 'bq' but must be one of none, vq, ema, fsq"),
    (["model.quantizer.kind=vq", "model.quantizer.latent=false"], "nothing would be quantized"),
])
def test_quantizer_config_mistakes_are_one_sentence(overrides, sentence):
    with pytest.raises(ConfigError, match=sentence):
        cfg(*overrides)


def test_vector_latent_must_cut_into_tokens():
    with pytest.raises(ConfigError, match="model.latent_dim 10 is not a multiple of model.quantizer.token_dim 4"):
        build_model(cfg("model.arch=conv", "model.channels=[8]", "model.latent_dim=10",
                        "model.quantizer.kind=vq").model, 16)


# -- every rank holds the same codebook; statistics over ranks = one process --------------------------


@pytest.mark.slow
def test_codebooks_identical_on_two_ranks_and_statistics_equal_one_process(tmp_path):
    """tests/quantize_ddp_worker.py: 6 real training steps (pipeline.step.train_step) of a tiny EMA-VQ resnet on 2
    gloo processes and on 1 with the same global batches. Every rank ends with the bitwise same codebook, also
    after dead-code restarts; without restarts the codebook equals the 1-process one (up to summation order);
    usage/perplexity of the training window and of a validation pass over split data equal one process's."""
    results = {}
    for n in (2, 1):
        out = tmp_path / f"p{n}"
        out.mkdir()
        launch = [] if n == 1 else [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu",
                                    "--num_processes", "2", "--num_machines", "1", "--main_process_ip", "127.0.0.1",
                                    "--main_process_port", str(free_port()), "--mixed_precision", "no",
                                    "--dynamo_backend", "no"]
        cmd = [*launch, "tests/quantize_ddp_worker.py", str(out)] if launch else [sys.executable,
                                                                                 "tests/quantize_ddp_worker.py", str(out)]
        done = subprocess.run(cmd, cwd=ROOT, env=TEST_ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        results[n] = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(n)]
        results[n].append(json.loads((out / "validation.json").read_text()))
    r0, r1, val2 = results[2]
    one, val1 = results[1]
    assert r0["world"].item() == r1["world"].item() == 2 and one["world"].item() == 1
    for key in r0:
        assert torch.equal(r0[key], r1[key]), f"{key} differs between the ranks"
    assert r0["restarts/restarts_total"].item() > 0  # restarts happened, identically on both ranks
    assert torch.allclose(r0["plain/codebook"], one["plain/codebook"], atol=1e-5)
    assert torch.equal(r0["plain/cluster_size"], one["plain/cluster_size"])  # code counts: exact integers
    assert r0["plain/usage"].item() == one["plain/usage"].item()
    assert r0["plain/perplexity"].item() == pytest.approx(one["plain/perplexity"].item(), rel=1e-12)
    codebook_metrics = {k: v for k, v in val1.items() if "codebook" in k or "code_frequency" in k}
    assert codebook_metrics and all(val2[k] == pytest.approx(v, rel=1e-12) for k, v in codebook_metrics.items())
    assert val1["val/codebook/latent/tokens"] == 24 * 8 * 8


# -- recipes/vq_f8.yaml end to end ------------------------------------------------------------------


@pytest.fixture(scope="module")
def vq_run(tiny_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("vq") / "vq_f8"
    argv = [sys.executable, "pipeline/train.py", "recipes/vq_f8.yaml", f"data.shards={tiny_shards}",
            f"run.dir={run_dir.parent}", "run.name=vq_f8", "train.max_steps=40", "data.batch_size_per_device=16",
            "data.num_workers=0", "data.val_batch_size_per_device=16", "tracking.media_every_steps=20",
            "tracking.eval_every_steps=20", "tracking.media_images=4", "train.checkpoint_every_steps=20",
            "model.quantizer.restart_every_steps=10", "optim.warmup_steps=5"]
    done = subprocess.run(argv, cwd=ROOT, env=TEST_ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, done.stdout


@pytest.mark.slow
def test_vq_recipe_trains_with_most_of_its_codebook_in_use_on_wandb(vq_run):
    from pipeline import wandb_log

    run_dir, stdout = vq_run
    assert "loss = 5 x recon (l1) + quantizer latent (vq, 1024 codes: codebook + 0.25 x commitment)" in stdout
    rows = wandb_log.history(run_dir)
    usage = [(r["_step"], r["codebook/latent/usage"]) for r in rows if "codebook/latent/usage" in r]
    assert usage and usage[-1][0] == 40 and usage[-1][1] > 0.5, usage  # the training window at the end
    assert sum(r.get("codebook/latent/restarts", 0) for r in rows) > 0
    assert all("loss/kl" not in r for r in rows) and any("loss/quantizer_commitment" in r for r in rows)
    val = [r for r in rows if "val/codebook/latent/usage" in r][-1]  # over the whole (small) val split:
    used, tokens = val["val/codebook/latent/usage"] * 1024, val["val/codebook/latent/tokens"]
    assert tokens == val["val/count"] * 16 and used >= 0.5 * tokens, (used, tokens)  # most tokens get a code of their own
    media = {(key, step) for key, step, _ in wandb_log.media(run_dir)}
    assert {("media/samples", 40), ("media/interpolations", 40), ("val/code_frequency_latent", 40)} <= media


@pytest.mark.slow
def test_vq_run_evaluates_and_encodes_integer_code_maps_that_decode(vq_run, tiny_shards, tmp_path):
    run_dir, _ = vq_run

    def sample(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline.sample", str(run_dir), *argv], cwd=ROOT, env=TEST_ENV,
                              capture_output=True, text=True, timeout=300)

    done = subprocess.run([sys.executable, "-m", "pipeline.evaluate", str(run_dir), "tracking.mode=disabled"],
                          cwd=ROOT, env=TEST_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert "neg_elbo_nats" not in m and m["quantizer"] == "vq"
    assert 0 < m["codebook/latent/usage"] <= 1 and 1 <= m["codebook/latent/perplexity"] <= 1024
    assert m["codebook/latent/bits_per_token"] == 10.0
    assert m["codebook/latent/entropy_bits"] == pytest.approx(math.log2(m["codebook/latent/perplexity"]))
    assert "codebook latent: usage" in done.stdout

    done = sample("encode", str(tiny_shards), "--split", "val", "--out", str(tmp_path / "codes"))
    assert done.returncode == 0, done.stderr[-3000:]
    codes = np.load(tmp_path / "codes" / "codes.npy", allow_pickle=False)
    assert codes.dtype == np.uint16 and codes.shape[1:] == (4, 4) and codes.max() < 1024  # 32 px / f8
    assert json.loads((tmp_path / "codes" / "meta.json").read_text())["code_grid"] == [4, 4]
    done = sample("decode", str(tmp_path / "codes" / "codes.npy"), "--out", str(tmp_path / "decoded"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((tmp_path / "decoded").glob("*.png"))) == len(codes)
    done = sample("encode", str(tiny_shards), "--split", "val", "--format", "shards", "--store", "z",
                  "--out", str(tmp_path / "bad"))
    assert done.returncode == 2 and "this run's latent is quantized" in done.stderr


@pytest.mark.parametrize("dims, arch, size, grid", [(1, "resnet", 32, (16,)), (3, "resnet", 8, (4, 4, 4)),
                                                    (3, "dcgan", 8, (2, 2, 2))])
def test_signals_and_volumes_quantize_per_position(dims, arch, size, grid):
    """A 1-D or 3-D spatial latent has one token per position, like an image's (model.spatial_dims)."""
    c = cfg(f"model.arch={arch}", f"model.spatial_dims={dims}", "model.channels=[8,8]", "model.in_channels=1",
            "model.latent_channels=2", "model.quantizer.kind=fsq", "model.quantizer.fsq_levels=[5,5]")
    model = build_model(c.model, size)
    x = torch.rand(2, 1, *[size] * dims)
    out = model(x)
    assert model.code_grid == grid and tuple(out.indices.shape) == (2, *grid)
    assert torch.equal(model.decode_indices(out.indices), out.recon)  # the codes are all the decoder sees
    assert model.sample(2).shape == x.shape
