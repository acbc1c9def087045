"""train.freeze: decoder-only finetuning of an imported diffusers VAE (as sd-vae-ft-mse). The frozen parts are
bitwise what was imported after training on 2 processes (raw and EMA weights), every other tensor moved, the
export back to diffusers keeps the frozen encoder and the folder's scaling factor; a resumed run repeats the
uninterrupted one bit for bit; frozen parts stay in eval mode; a wrong part name is one sentence."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TEST_ENV, free_port
from pipeline import export, import_diffusers
from pipeline.config import ConfigError, ModelConfig, load_config
from pipeline.models import build_model

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
FROZEN = ("encoder.", "heads.")  # the imported recipe's default train.freeze: [encoder, heads]


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    """An SD-layout AutoencoderKL (random init, saved locally) imported as a recipe; returns the recipe."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("freeze")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=32, sample_size=32,
                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                  latent_channels=4).save_pretrained(str(root / "vae"))
    import_diffusers.main([str(root / "vae"), "--out", str(root / "imported.yaml")])
    return root / "imported.yaml"


def _args(recipe: Path, shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [str(recipe), f"data.shards={shards}", f"run.dir={run_dir.parent}", f"run.name={run_dir.name}",
            "data.batch_size_per_device=4", "data.num_workers=0", "train.max_steps=4", "train.checkpoint_every_steps=2",
            "train.keep_checkpoints=5", "optim.ema_decay=0.5", "tracking.mode=disabled", "tracking.log_every_steps=1",
            "tracking.eval_every_steps=1000", "tracking.media_every_steps=1000", *extra]


def _train(argv: list[str], nproc: int = 1) -> None:
    launch = ([ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
               "--main_process_port", str(free_port())] if nproc > 1 else [sys.executable])
    r = subprocess.run([*launch, "pipeline/train.py", *argv], cwd=ROOT, env=TEST_ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def _weights(run_dir: Path, step: int, name: str, prefix: str) -> dict[str, torch.Tensor]:
    state = load_file(str(run_dir / "checkpoints" / f"step-{step:06d}" / name))
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.slow
def test_frozen_parts_do_not_move_on_2_processes_the_rest_does_and_the_export_keeps_them(imported, tiny_shards,
                                                                                        tmp_path):
    run_dir = tmp_path / "ft"
    _train(_args(imported, tiny_shards, run_dir), nproc=2)
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2
    cfg = load_config(imported, check_paths=False)
    start = import_diffusers.init_state(cfg.model.init, cfg.model, 32)
    for name, prefix in (("model.safetensors", "vae."), ("ema.safetensors", "module.")):
        trained = _weights(run_dir, 4, name, prefix)
        assert sorted(trained) == sorted(start)
        frozen = [k for k in start if k.startswith(FROZEN)]
        assert frozen and all(torch.equal(trained[k], start[k]) for k in frozen), name
        moved = [k for k in start if not k.startswith(FROZEN) and not torch.equal(trained[k], start[k])]
        assert moved == [k for k in start if not k.startswith(FROZEN)], name  # every trained tensor moved
    # The optimizer holds the trained tensors only (its param groups, as the checkpoint's optimizer.json stores them).
    saved = json.loads((run_dir / "checkpoints" / "step-000004" / "optimizer.json").read_text())
    groups = [dict(g["__dict__"]) for g in dict(saved["__dict__"])["param_groups"]]
    assert sum(len(g["params"]) for g in groups) == len([k for k in start if not k.startswith(FROZEN)])

    # Back to diffusers: its encoder and quant_conv are the imported ones, and so is its scaling factor.
    from diffusers import AutoencoderKL

    out = tmp_path / "exported"
    export.main([str(run_dir), "--format", "diffusers", "--out", str(out)])
    original = load_file(str(Path(cfg.model.init) / import_diffusers.WEIGHTS))
    exported = load_file(str(out / import_diffusers.WEIGHTS))
    assert all(torch.equal(exported[k], v) for k, v in original.items() if k.startswith(("encoder.", "quant_conv.")))
    assert not torch.equal(exported["decoder.conv_out.weight"], original["decoder.conv_out.weight"])
    vae = AutoencoderKL.from_pretrained(str(out))
    assert vae.config.scaling_factor == 0.18215 and vae.config.shift_factor is None


@pytest.mark.slow
def test_a_frozen_run_resumed_from_its_checkpoint_repeats_the_uninterrupted_one(imported, tiny_shards, tmp_path):
    whole = tmp_path / "whole"
    _train(_args(imported, tiny_shards, whole))
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)  # as if killed after the step-2 checkpoint
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    (resumed / "checkpoints" / "latest").write_text("step-000002")
    (resumed / "summary.json").unlink()
    _train(_args(imported, tiny_shards, resumed))
    starts = [json.loads(line) for line in (resumed / "starts.jsonl").read_text().splitlines()]
    assert starts[-1]["step"] == 2 and json.loads((resumed / "summary.json").read_text())["step"] == 4
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        a, b = _weights(whole, 4, name, ""), _weights(resumed, 4, name, "")
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), name
    cfg = load_config(imported, check_paths=False)
    start = import_diffusers.init_state(cfg.model.init, cfg.model, 32)
    after = _weights(resumed, 4, "model.safetensors", "vae.")
    assert all(torch.equal(after[k], v) for k, v in start.items() if k.startswith(FROZEN))
    # A run folder is a model.init too: its latest EMA weights.
    cfg.model.init = str(whole)
    model = build_model(cfg.model, 32)
    import_diffusers.load_init(model, cfg.model)
    ema = _weights(whole, 4, "ema.safetensors", "module.")
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())


def test_frozen_parts_stay_in_eval_mode_and_out_of_the_gradients():
    model = build_model(ModelConfig(arch="conv", channels=[8, 16], latent_dim=8), 16)  # BatchNorm in every part
    model.freeze(["encoder"])
    model.train()
    assert not any(m.training for m in model.encoder.modules())
    assert model.decoder.training and all(m.training for m in model.decoder.modules())
    assert not any(p.requires_grad for p in model.encoder.parameters())
    before = [b.clone() for b in model.encoder.buffers()]  # BatchNorm statistics: eval mode leaves them
    model(torch.rand(4, 3, 16, 16) * 2 - 1).recon.mean().backward()
    assert all(torch.equal(a, b) for a, b in zip(before, model.encoder.buffers()))
    assert all(p.grad is None for p in model.encoder.parameters())


@pytest.mark.parametrize("parts, message", [
    (["encodr"], "train.freeze names 'encodr', which is not a part of the resnet model (did you mean encoder?); "
                 "its parts are encoder, heads, decoder_input, decoder, final_layer"),
    (["encoder", "heads", "decoder_input", "decoder", "final_layer"], "so nothing would train"),
])
def test_a_wrong_part_is_one_sentence(parts, message):
    model = build_model(ModelConfig(arch="resnet", channels=[32, 64], latent_channels=4), 16)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        model.freeze(parts)
