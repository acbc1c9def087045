"""train.freeze: decoder-only finetuning of an imported diffusers VAE (as sd-vae-ft-mse). The frozen parts are
bitwise what was imported after training on 2 processes (raw and EMA weights), every other tensor moved, the
export back to diffusers keeps the frozen encoder and the folder's scaling factor; the same 2-process run
SIGKILLed (every process) after a checkpoint and started again with the same command repeats the uninterrupted
one bit for bit and exports the same diffusers folder; a run folder is a model.init; frozen parts stay in eval
mode; a wrong part name is one sentence."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TEST_ENV, free_port
from pipeline import export, import_diffusers
from pipeline.config import ConfigError, ModelConfig, load_config
from pipeline.models import build_model
from processes import Launch

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
FROZEN = ("encoder.", "heads.")  # the imported recipe's default train.freeze: [encoder, heads]
STEPS, KILL_AT = 4, 2  # checkpoints every 2 steps: the kill lands right after step 2's, 2 steps remain


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


def _command(recipe: Path, shards: Path, run_dir: Path) -> list[str]:
    """The 2-process finetune of the imported recipe (its train.freeze as imported: decoder-only)."""
    return [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
            "--dynamo_backend", "no", "pipeline/train.py", str(recipe), f"data.shards={shards}",
            f"run.dir={run_dir.parent}", f"run.name={run_dir.name}", "data.batch_size_per_device=4",
            "data.num_workers=0", f"train.max_steps={STEPS}", "train.checkpoint_every_steps=2",
            "train.keep_checkpoints=5", "optim.ema_decay=0.5", "tracking.mode=disabled", "tracking.log_every_steps=1",
            "tracking.eval_every_steps=1000", "tracking.media_every_steps=1000"]


@pytest.fixture(scope="module")
def finetuned(imported, tiny_shards, tmp_path_factory) -> Path:
    """The uninterrupted 2-process finetune (shared by the tests below: the kill test's reference)."""
    run_dir = tmp_path_factory.mktemp("ft") / "whole"
    launch = Launch(_command(imported, tiny_shards, run_dir), TEST_ENV, ROOT)
    assert launch.wait(300) == 0, launch.output()[-4000:]
    return run_dir


def _imported_state(recipe: Path) -> dict[str, torch.Tensor]:
    """The imported weights in this pipeline's layout (what the finetune starts from)."""
    cfg = load_config(recipe, check_paths=False)
    return import_diffusers.init_state(cfg.model.init, cfg.model, 32)


def _weights(run_dir: Path, step: int, name: str, prefix: str) -> dict[str, torch.Tensor]:
    state = load_file(str(run_dir / "checkpoints" / f"step-{step:06d}" / name))
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _train_rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if "loss/total" in r]


@pytest.mark.slow
def test_frozen_parts_do_not_move_on_2_processes_the_rest_does_and_the_export_keeps_them(imported, finetuned,
                                                                                        tmp_path):
    run_dir = finetuned
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2
    cfg = load_config(imported, check_paths=False)
    start = _imported_state(imported)
    for name, prefix in (("model.safetensors", "vae."), ("ema.safetensors", "module.")):
        trained = _weights(run_dir, STEPS, name, prefix)
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
def test_a_frozen_run_killed_after_a_checkpoint_resumes_bitwise_on_2_processes_and_exports_the_same(
        imported, tiny_shards, finetuned, tmp_path):
    run_dir = tmp_path / "killed"
    cmd = _command(imported, tiny_shards, run_dir)
    # The main process SIGKILLs its launcher and itself right after step 2's checkpoint was committed; every
    # other process (the other rank, in its own session under torch's elastic agent) must die with them.
    first = Launch(cmd, {**TEST_ENV, "VAE_KILL_AT": f"after-checkpoint@{KILL_AT}"}, ROOT)
    assert first.wait(180) == -9, first.output()[-3000:]  # the launcher, SIGKILLed by the main process
    assert first.survivors() == [], "processes of the killed run are still alive"
    first.kill_all()  # (a no-op when the assertion above holds)
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == f"step-{KILL_AT:06d}", first.output()[-3000:]
    assert not (checkpoints / f"step-{STEPS:06d}").exists() and not (run_dir / "summary.json").exists()

    second = Launch(cmd, TEST_ENV, ROOT)  # the same command
    assert second.wait(300) == 0, second.output()[-4000:]
    assert f"resumed from {checkpoints / f'step-{KILL_AT:06d}'} at step {KILL_AT}" in second.output()
    # The restarted process started from the checkpoint and did the remaining steps (not a survivor of the first).
    starts = [json.loads(line) for line in (run_dir / "starts.jsonl").read_text().splitlines()]
    assert [s["segment"] for s in starts] == [1, 2] and starts[1]["step"] == KILL_AT
    assert starts[1]["world_size"] == 2
    assert starts[1]["pid"] in second.seen and starts[1]["pid"] not in first.seen
    resumed = {r["step"]: r for r in _train_rows(run_dir) if r["segment"] == 2}
    assert sorted(resumed) == list(range(KILL_AT + 1, STEPS + 1)), sorted(resumed)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == STEPS and summary["world_size"] == 2

    # Bitwise the uninterrupted 2-process run: its losses, final weights, EMA and optimizer state.
    ref = {r["step"]: r for r in _train_rows(finetuned)}
    diffs = {(s, k): (ref[s][k], r[k]) for s, r in resumed.items() for k in ref[s]
             if k.startswith("loss/") and ref[s][k] != r[k]}
    assert not diffs, f"resumed losses differ from the uninterrupted run: {dict(list(diffs.items())[:8])}"
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        a, b = _weights(finetuned, STEPS, name, ""), _weights(run_dir, STEPS, name, "")
        assert a and sorted(a) == sorted(b), name
        assert [k for k in a if not torch.equal(a[k], b[k])] == [], name
    final = checkpoints / f"step-{STEPS:06d}" / "optimizer.json"
    assert json.loads(final.read_text()) == json.loads((finetuned / final.relative_to(run_dir)).read_text())
    # The frozen parts are still the imported weights, raw and EMA.
    start = _imported_state(imported)
    frozen = [k for k in start if k.startswith(FROZEN)]
    for name, prefix in (("model.safetensors", "vae."), ("ema.safetensors", "module.")):
        after = _weights(run_dir, STEPS, name, prefix)
        assert frozen and all(torch.equal(after[k], start[k]) for k in frozen), name

    # Its export loads in diffusers, and is the uninterrupted run's export (the trained decoder included).
    from diffusers import AutoencoderKL

    export.main([str(finetuned), "--format", "diffusers", "--out", str(tmp_path / "whole-export")])
    export.main([str(run_dir), "--format", "diffusers", "--out", str(tmp_path / "resumed-export")])
    whole = AutoencoderKL.from_pretrained(str(tmp_path / "whole-export")).state_dict()
    again = AutoencoderKL.from_pretrained(str(tmp_path / "resumed-export")).state_dict()
    assert sorted(whole) == sorted(again) and any(k.startswith("decoder.") for k in whole)
    assert [k for k in whole if not torch.equal(whole[k], again[k])] == []


@pytest.mark.slow
def test_a_run_folder_is_a_model_init_with_its_latest_ema_weights(imported, finetuned):
    cfg = load_config(imported, check_paths=False)
    cfg.model.init = str(finetuned)
    model = build_model(cfg.model, 32)
    import_diffusers.load_init(model, cfg.model)
    ema = _weights(finetuned, STEPS, "ema.safetensors", "module.")
    assert sorted(model.state_dict()) == sorted(ema)
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
