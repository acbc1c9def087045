"""Export a trained run's EMA weights for other code: diffusers' AutoencoderKL, or plain safetensors.

    python -m pipeline.export runs/ldm --format diffusers --out exported/ldm      # AutoencoderKL.from_pretrained(...)
    python -m pipeline.export runs/demo --format safetensors --out exported/demo  # any architecture
    python -m pipeline.export runs/ldm --format diffusers --out DIR --checkpoint step-002000 --scale-images 5000

--format diffusers (resnet models in the LDM layout) writes DIR/config.json and
DIR/diffusion_pytorch_model.safetensors, the folder `diffusers.AutoencoderKL.from_pretrained(DIR)` loads; its
encode/decode equal ours (tests/test_export.py checks 1e-4). The layout must be LDM's, which a recipe gets with

    model: {arch: resnet, output: linear, downsample_padding: ldm, channels: [...], blocks_per_level: N,
            attention_levels: [...]}         # (or explicit encoder/decoder lists that expand to the same)

with GroupNorm widths that all use the same number of groups (32 for multiples of 32) and the default logvar
clamp [-30, 20]; anything else stops with one sentence saying what does not map. Block mapping: our encoder's
first conv -> encoder.conv_in; each level's ResNet (and attention) blocks -> down_blocks[i].resnets (attentions),
its downsample -> down_blocks[i].downsamplers[0]; the middle ResNet, attention, ResNet -> mid_block;
GroupNorm+SiLU -> conv_norm_out; the conv to 2 x latent channels -> conv_out; our heads -> quant_conv and
decoder_input -> post_quant_conv; the decoder mirrors it (up_blocks[0] is the deepest level) and final_layer ->
decoder.conv_out. Our fused attention qkv 1x1 conv is split into to_q, to_k, to_v. The mapping has one home,
`diffusers_key_map`, which pipeline/import_diffusers.py reads backwards; heads and decoder_input that are still
the identity (a FLUX-style import) are left out, with use_quant_conv / use_post_quant_conv false.

A run that started from a diffusers folder (model.init, pipeline/import_diffusers.py) with train.freeze holding
encoder and heads keeps that folder's scaling_factor and shift_factor (its latents are unchanged). Otherwise
scaling_factor and shift_factor are measured over the train split (all of it unless --scale-images): the
mean and standard deviation of z ~ q(z|x) over every latent element, computed exactly from the posterior
(E[z] = E[mu], E[z^2] = E[mu^2 + sigma^2]), so no sampling noise: shift_factor = mean, scaling_factor = 1/std.
Diffusion code then trains on (z - shift_factor) * scaling_factor, which has unit variance (Stable Diffusion 1/2
and SDXL pipelines ignore shift_factor and use z * scaling_factor: fine when the mean is near 0, which
export.json reports).

--format safetensors writes DIR/model.safetensors (the EMA weights, this pipeline's key names) and
DIR/model.yaml (the resolved `model:` section plus image_size, latent_shape and output_range), which
`load_exported(DIR)` turns back into the model.

Nothing is overwritten: DIR must not exist or be empty (or pass --force); files are written to a temporary
folder next to DIR and renamed into place, so an interrupted export leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from pipeline import durable
from pipeline.config import BlockSpec, ConfigError, ModelConfig, coerce
from pipeline.errors import UserError, exit_on_user_error
from pipeline.inference import check_shards, load_run, split_batches
from pipeline.import_diffusers import kept_latent_factors
from pipeline.models import VAE, build_model
from pipeline.models.base import group_count
from pipeline.models.resnet import level_specs

DIFFUSERS_VERSION = "0.42.1"
"""The diffusers version the export is tested against (pyproject's test extra); written into config.json."""

LOGVAR_CLAMP = (-30.0, 20.0)
"""diffusers' DiagonalGaussianDistribution clamps logvar to this range, hard-coded."""


# --------------------------------------------------------------------------------------------
# Our block list -> diffusers' names
# --------------------------------------------------------------------------------------------


def _expand(specs: list[BlockSpec], c_in: int) -> list[tuple[str, int]]:
    """A block list as one (block, out channels) entry per module, repeats unrolled, out resolved."""
    out, c = [], c_in
    for s in specs:
        for _ in range(s.repeat):
            c = s.out or c
            out.append((s.block, c))
    return out


@dataclasses.dataclass
class LDMLayout:
    channels: list[int]
    blocks_per_level: int
    attention_levels: list[int]

    def named(self, side: str, latent_channels: int) -> list[tuple[str, int, str]]:
        """(block, out channels, diffusers module name) for every module of our `side` stack, in order."""
        ch, n, last = self.channels, self.blocks_per_level, len(self.channels) - 1
        attn = set(self.attention_levels)
        mid = [("resnet", ch[-1], f"{side}.mid_block.resnets.0"),
               *([("attention", ch[-1], f"{side}.mid_block.attentions.0")] if last in attn else []),
               ("resnet", ch[-1], f"{side}.mid_block.resnets.1")]

        def level(prefix: str, c: int, count: int, with_attention: bool) -> list[tuple[str, int, str]]:
            mods = []
            for j in range(count):
                mods.append(("resnet", c, f"{prefix}.resnets.{j}"))
                if with_attention:
                    mods.append(("attention", c, f"{prefix}.attentions.{j}"))
            return mods

        if side == "encoder":
            mods = [("conv", ch[0], "encoder.conv_in")]
            for i in range(len(ch)):
                mods += level(f"encoder.down_blocks.{i}", ch[i], n, i in attn and i != last)
                if i != last:
                    mods.append(("downsample", ch[i], f"encoder.down_blocks.{i}.downsamplers.0"))
            return mods + mid + [("norm_act", ch[-1], "encoder.conv_norm_out"),
                                 ("conv", 2 * latent_channels, "encoder.conv_out")]
        mods = [("conv", ch[-1], "decoder.conv_in"), *mid]
        for k, i in enumerate(reversed(range(len(ch)))):
            mods += level(f"decoder.up_blocks.{k}", ch[i], n + 1, i in attn and i != last)
            if i != 0:
                mods.append(("upsample", ch[i], f"decoder.up_blocks.{k}.upsamplers.0"))
        return mods + [("norm_act", ch[0], "decoder.conv_norm_out")]

    def block_types(self) -> tuple[list[str], list[str]]:
        last = len(self.channels) - 1
        attn = {i for i in self.attention_levels if i != last}
        down = ["AttnDownEncoderBlock2D" if i in attn else "DownEncoderBlock2D" for i in range(last + 1)]
        up = ["AttnUpDecoderBlock2D" if i in attn else "UpDecoderBlock2D" for i in reversed(range(last + 1))]
        return down, up


def _layout_from_encoder(cfg: ModelConfig) -> LDMLayout:
    """The levels an explicit encoder list would have in LDM's layout (checked against both lists after)."""
    mods = _expand(cfg.encoder, cfg.in_channels)
    segments, current = [], []
    for block, c in mods:
        if block == "downsample":
            segments.append(current)
            current = []
        else:
            current.append((block, c))
    segments.append(current)
    channels = [next((c for b, c in reversed(seg) if b == "resnet"), 0) for seg in segments[:-1]]
    last_resnets = [c for b, c in segments[-1] if b == "resnet"]
    channels.append(last_resnets[0] if last_resnets else 0)
    n = sum(1 for b, _ in segments[0] if b == "resnet")
    attention = [i for i, seg in enumerate(segments[:-1]) if any(b == "attention" for b, _ in seg)]
    if any(b == "attention" for b, _ in segments[-1]):
        attention.append(len(segments) - 1)
    return LDMLayout(channels, n, attention)


def ldm_layout(model_cfg: ModelConfig, image_size: int) -> LDMLayout:
    """The model's LDM levels, or ConfigError with one sentence on what diffusers' AutoencoderKL cannot express."""
    cfg = model_cfg
    fallback = "; export it with --format safetensors instead"
    if cfg.arch != "resnet":
        raise ConfigError(f"model.arch is {cfg.arch}, but only resnet models in the LDM layout map onto diffusers' "
                          f"AutoencoderKL{fallback}")
    if cfg.quantizer.kind != "none":
        raise ConfigError(f"model.quantizer.kind is {cfg.quantizer.kind}, but diffusers' AutoencoderKL has a Gaussian "
                          f"latent, not a codebook{fallback}")
    if cfg.output != "linear":
        raise ConfigError(f"model.output is {cfg.output}, but diffusers' AutoencoderKL decoder ends at its last "
                          f"convolution with no activation, so it would not reproduce this model's images; train "
                          f"with model.output=linear (LDM's choice){fallback}")
    if (cfg.logvar_min, cfg.logvar_max) != LOGVAR_CLAMP:
        raise ConfigError(f"model.logvar_min/max are {cfg.logvar_min}/{cfg.logvar_max}, but diffusers clamps the "
                          f"log-variance to {LOGVAR_CLAMP[0]:g}/{LOGVAR_CLAMP[1]:g}{fallback}")
    explicit = bool(cfg.encoder or cfg.decoder)
    layout = (_layout_from_encoder(cfg) if cfg.encoder
              else LDMLayout(list(cfg.channels), cfg.blocks_per_level, list(cfg.attention_levels)))
    if len(layout.channels) > 1 and cfg.downsample_padding != "ldm":
        raise ConfigError(f"model.downsample_padding is {cfg.downsample_padding}, but diffusers' Downsample2D pads "
                          f"only the right and bottom; train with model.downsample_padding=ldm{fallback}")
    lc = cfg.latent_channels
    for side in ("encoder", "decoder"):
        ours = _expand(getattr(cfg, side) or level_specs(cfg, side), cfg.in_channels if side == "encoder" else lc)
        theirs = [(b, c) for b, c, _ in layout.named(side, lc)] if layout.blocks_per_level >= 1 else []
        if ours != theirs:
            where = f"the explicit model.{side} list" if explicit else f"the {side} built from model.channels"
            raise ConfigError(f"{where} is not LDM's layout (per level {layout.blocks_per_level or 'N'} ResNet blocks "
                              f"and a downsample, a middle ResNet-attention-ResNet, GroupNorm+SiLU, a conv to "
                              f"{2 * lc} channels, and the decoder mirroring it with one more ResNet per level), "
                              f"which diffusers' AutoencoderKL cannot express{fallback}")
    groups = {group_count(c) for c in layout.channels}
    if len(groups) != 1:
        raise ConfigError(f"model.channels {layout.channels} give GroupNorm layers {sorted(groups)} groups, but "
                          f"diffusers uses one norm_num_groups for all of them; use widths that are all multiples "
                          f"of 32 (or share their gcd with 32){fallback}")
    return layout


def diffusers_config(model: VAE, model_cfg: ModelConfig, layout: LDMLayout, scaling: float, shift: float) -> dict:
    down, up = layout.block_types()
    last = len(layout.channels) - 1
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": model_cfg.in_channels,
        "out_channels": model_cfg.in_channels,
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": layout.channels,
        "layers_per_block": layout.blocks_per_level,
        "act_fn": "silu",
        "latent_channels": model_cfg.latent_channels,
        "norm_num_groups": group_count(layout.channels[0]),
        "sample_size": model.image_size,
        "scaling_factor": scaling,
        "shift_factor": shift,
        "latents_mean": None,
        "latents_std": None,
        "force_upcast": True,
        "use_quant_conv": not is_identity(model, "heads"),
        "use_post_quant_conv": not is_identity(model, "decoder_input"),
        "mid_block_add_attention": last in layout.attention_levels,
    }


def diffusers_key_map(model_cfg: ModelConfig, layout: LDMLayout, our_keys) -> list[tuple[str, tuple[str, ...]]]:
    """(our state-dict key, the diffusers AutoencoderKL key(s) holding it) for every tensor of ours, each exactly
    once: the one home of the mapping, read forwards by the export and backwards by pipeline.import_diffusers.
    Our fused attention qkv maps to three keys (to_q, to_k, to_v: its thirds along the output channels)."""
    lc, ours = model_cfg.latent_channels, set(our_keys)
    pairs: list[tuple[str, tuple[str, ...]]] = []

    def put(our: str, *theirs: str) -> None:
        pairs.append((our, theirs))

    for side in ("encoder", "decoder"):
        for index, (block, c, name) in enumerate(layout.named(side, lc)):
            p = f"{side}.{index}."
            for kind in ("weight", "bias"):
                if block == "conv":
                    put(p + kind, f"{name}.{kind}")
                elif block == "norm_act":
                    put(f"{p}0.{kind}", f"{name}.{kind}")
                elif block in ("downsample", "upsample"):
                    put(f"{p}conv.{kind}", f"{name}.conv.{kind}")
                elif block == "resnet":
                    for part in ("norm1", "conv1", "norm2", "conv2"):
                        put(f"{p}{part}.{kind}", f"{name}.{part}.{kind}")
                    if f"{p}skip.{kind}" in ours:  # a 1x1 skip only where the channels change
                        put(f"{p}skip.{kind}", f"{name}.conv_shortcut.{kind}")
                elif block == "attention":
                    put(f"{p}norm.{kind}", f"{name}.group_norm.{kind}")
                    put(f"{p}qkv.{kind}", *(f"{name}.{q}.{kind}" for q in ("to_q", "to_k", "to_v")))
                    put(f"{p}proj.{kind}", f"{name}.to_out.0.{kind}")
    for our, theirs in (("heads", "quant_conv"), ("decoder_input", "post_quant_conv"), ("final_layer", "decoder.conv_out")):
        for kind in ("weight", "bias"):
            put(f"{our}.{kind}", f"{theirs}.{kind}")
    unmapped = ours - {our for our, _ in pairs}
    if unmapped:  # a tensor we did not map would silently be missing from the export
        raise RuntimeError(f"the diffusers mapping leaves tensors unmapped: {sorted(unmapped)[:5]}")
    return pairs


OPTIONAL_CONVS = {"heads": "quant_conv", "decoder_input": "post_quant_conv"}
"""Our 1x1 convs around the latent that a diffusers AutoencoderKL may leave out (use_quant_conv /
use_post_quant_conv false, as FLUX's VAE does): imported as the identity, exported as absent while they still are."""


def _linear(name: str) -> bool:
    """diffusers' attention projections are Linear layers where ours are 1x1 convs: [C, C] vs [C, C, 1, 1]."""
    return name.endswith(".weight") and any(f".{q}." in name for q in ("to_q", "to_k", "to_v", "to_out"))


def is_identity(model: VAE, part: str) -> bool:
    """Whether our 1x1 conv `part` (heads, decoder_input) maps its input to itself exactly."""
    conv = getattr(model, part)
    weight = conv.weight.detach().flatten(1)
    return (weight.shape[0] == weight.shape[1] and torch.equal(weight, torch.eye(weight.shape[0], dtype=weight.dtype,
                                                                                   device=weight.device))
            and not conv.bias.detach().any())


def diffusers_state_dict(model: VAE, model_cfg: ModelConfig, layout: LDMLayout) -> dict[str, Tensor]:
    """Our weights under diffusers' AutoencoderKL names (every tensor, each exactly once); quant_conv and
    post_quant_conv are left out while ours are the identity (a FLUX-style import that kept them so)."""
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    absent = {f"{part}." for part in OPTIONAL_CONVS if is_identity(model, part)}
    out: dict[str, Tensor] = {}
    for ours, theirs in diffusers_key_map(model_cfg, layout, state):
        if any(ours.startswith(a) for a in absent):
            continue
        for name, piece in zip(theirs, state[ours].chunk(len(theirs))):
            out[name] = (piece.flatten(1) if _linear(name) else piece).contiguous()
    return out


# --------------------------------------------------------------------------------------------
# Latent statistics over the train split
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def latent_statistics(run, shards: str, split: str = "train", max_images: int = 0) -> dict:
    """Mean and standard deviation of z ~ q(z|x) over every latent element of the split (exact moments)."""
    n = 0
    total = torch.zeros(3, dtype=torch.float64)  # elements, sum E[z], sum E[z^2]
    for batch in split_batches(run.cfg, shards, split):
        x = run.to_model_range(batch.images)
        if max_images:
            x = x[:max_images - n]
        mu, logvar = run.model.encode(x)
        mu, var = mu.double(), logvar.double().exp()
        total += torch.stack([torch.tensor(float(mu.numel()), dtype=torch.float64),
                              mu.sum().cpu(), (mu.square() + var).sum().cpu()])
        n += x.shape[0]
        if max_images and n >= max_images:
            break
    if n == 0:
        raise UserError(f"the {split} split of {shards} holds no readable images to measure the latent scale on")
    count, s1, s2 = total.tolist()
    mean = s1 / count
    std = math.sqrt(max(s2 / count - mean * mean, 0.0))
    if std == 0:
        raise UserError("every latent of the measured images is identical (std 0), so no scaling_factor exists")
    return {"images": n, "split": split, "shards": str(shards), "mean": mean, "std": std}


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _prepare_out(out: Path, force: bool) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"--out {out} already exists and is not empty; choose another folder or pass --force")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    """The staging folder, every file in it written with durable.write_staged, in place of --out."""
    durable.replace_folder(tmp, out, parked=out.with_name(f".{out.name}.old-{os.getpid()}"))


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    durable.write_staged(path, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
                         errors=(SafetensorError,))


def _save_text(text: str, path: Path) -> None:
    durable.write_staged(path, lambda p: p.write_text(text, encoding="utf-8"))


def model_yaml(run) -> dict:
    model = run.model
    return {"model": dataclasses.asdict(run.cfg.model), "image_size": run.image_size,
            "latent_shape": list(model.latent_shape), "output_range": list(model.output_range)}


def load_exported(folder: str | Path, device: str | torch.device = "cpu") -> VAE:
    """The model a --format safetensors export holds (eval mode)."""
    folder = Path(folder)
    info = yaml.safe_load((folder / "model.yaml").read_text())
    cfg = coerce(info["model"], ModelConfig, "model", str(folder / "model.yaml"))
    model = build_model(cfg, int(info["image_size"]))
    model.load_state_dict(load_file(str(folder / "model.safetensors"), device="cpu"), strict=True)
    return model.to(device).eval()


def export(run_dir: str, fmt: str, out: str, checkpoint: str | None = None, weights: str = "ema",
           shards: str | None = None, scale_images: int = 0, force: bool = False) -> dict:
    """Write the export; returns what was written (and the measured latent statistics for diffusers)."""
    if fmt not in ("diffusers", "safetensors"):
        raise UserError(f"--format must be diffusers or safetensors, got {fmt!r}")
    run = load_run(run_dir, (), checkpoint, weights, "cpu")
    out_dir = Path(out)
    info = {"run_dir": str(run.run_dir), "checkpoint": run.checkpoint.name, "step": run.step, "weights": run.weights,
            "format": fmt}
    if fmt == "safetensors":
        tmp = _prepare_out(out_dir, force)
        state = {k: v.detach().cpu().contiguous() for k, v in run.model.state_dict().items()}
        _save_tensors(state, tmp / "model.safetensors")
        _save_text(yaml.safe_dump(model_yaml(run), sort_keys=False), tmp / "model.yaml")
        _save_text(json.dumps(info, indent=1), tmp / "export.json")
        _publish(tmp, out_dir)
        return info
    layout = ldm_layout(run.cfg.model, run.image_size)  # before reading any data: a model that cannot map stops here
    shards = shards or run.cfg.data.shards
    check_shards(shards, run.image_size)
    stats = latent_statistics(run, shards, "train", scale_images)
    # A run that started from a diffusers VAE and never trained its encoder has that VAE's latents: keep its
    # factors, which the diffusion models trained on them expect (pipeline/import_diffusers.py).
    kept = kept_latent_factors(run.cfg)
    scaling, shift = kept if kept is not None else (1.0 / stats["std"], stats["mean"])
    config = diffusers_config(run.model, run.cfg.model, layout, scaling, shift)
    stats["factors"] = f"kept from {run.cfg.model.init}" if kept is not None else "measured"
    tensors = diffusers_state_dict(run.model, run.cfg.model, layout)
    tmp = _prepare_out(out_dir, force)
    _save_tensors(tensors, tmp / "diffusion_pytorch_model.safetensors")
    _save_text(json.dumps(config, indent=2), tmp / "config.json")
    info["latent_statistics"] = stats
    _save_text(json.dumps(info, indent=1), tmp / "export.json")
    _publish(tmp, out_dir)
    return {**info, "scaling_factor": config["scaling_factor"], "shift_factor": config["shift_factor"]}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.export",
                                description="Export a run's EMA weights: diffusers AutoencoderKL (resnet models in "
                                            "the LDM layout) or plain safetensors (any model).")
    p.add_argument("run_dir", help="the run folder training wrote (runs/<run.name>)")
    p.add_argument("--format", required=True, choices=("diffusers", "safetensors"))
    p.add_argument("--out", required=True, help="the folder to write (must not exist or be empty)")
    p.add_argument("--checkpoint", help="checkpoint name under RUN_DIR/checkpoints; default: the latest")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA (default) or raw training weights")
    p.add_argument("--shards", help="diffusers: measure the latent scale on these shards' train split "
                                    "(default: the run's data.shards)")
    p.add_argument("--scale-images", type=int, default=0, help="diffusers: images the scale is measured on "
                                                               "(0, the default: the whole train split)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    result = export(args.run_dir, args.format, args.out, args.checkpoint, args.weights, args.shards,
                    args.scale_images, args.force)
    line = f"wrote {args.out} ({args.format}, {result['checkpoint']} {result['weights']} weights)"
    if args.format == "diffusers":
        s = result["latent_statistics"]
        shift = "none" if result["shift_factor"] is None else f"{result['shift_factor']:.6g}"
        where = (s["factors"] if s["factors"] != "measured" else f"measured on {s['images']} {s['split']} images")
        line += f"; scaling_factor {result['scaling_factor']:.6g}, shift_factor {shift} {where}"
    print(line)
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
