"""Start from a VAE people already use: a diffusers AutoencoderKL folder (Stable Diffusion's and SDXL's VAE, with
quant_conv and 4 latent channels, or a FLUX-style one without quant_conv, 16 channels and a shift_factor), a
`pipeline.export --format safetensors` folder, or another run's folder, as a recipe's `model.init`.

    python -m pipeline.import_diffusers path/to/sdxl-vae --out recipes/sdxl_vae.yaml   # the model section
    python pipeline/train.py recipes/sdxl_vae.yaml data.shards=shards/flowers          # starts from its weights
    python -m pipeline.export runs/sdxl_vae --format diffusers --out exported/sdxl_vae # and back to diffusers

The recipe it writes holds the model section derived from DIR/config.json (block_out_channels -> channels,
layers_per_block -> blocks_per_level, the Attn*Block2D levels and the middle block's attention ->
attention_levels, latent_channels; output linear and downsample_padding ldm, which is what AutoencoderKL computes),
`model.init: DIR`, and `train.freeze: [encoder, heads]` (decoder-only finetuning, as stabilityai's sd-vae-ft-mse;
plus decoder_input for a folder without post_quant_conv, so that it stays absent; `--freeze` with no names trains
everything). The weights are read from DIR when training starts, not copied; a
resumed run loads its checkpoint instead. A config our resnet cannot express (another block type or activation,
norm_num_groups that differ from ours, attention in the deepest level's down block) stops with one sentence
(exit 2).

The mapping of tensor names is export.py's `diffusers_key_map`, read backwards. A folder without quant_conv
(use_quant_conv false) imports our head as the identity 1x1 conv, and the export leaves it out again while it
still is the identity (freeze `heads` and `decoder_input` to keep a FLUX-style layout; trained, they become a
quant_conv that diffusers loads as well). scaling_factor and shift_factor stay in DIR/config.json: the export
reuses them for a run that kept the encoder and heads frozen (its latents are the imported ones), and measures
new ones otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from safetensors.torch import load_file
from torch import Tensor

from pipeline import durable
from pipeline.config import Config, ConfigError, ModelConfig
from pipeline.errors import UserError, exit_on_user_error
from pipeline.models import VAE, build_model
from pipeline.models.base import group_count

WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_DEFAULTS = {  # AutoencoderKL.__init__'s defaults: a config.json may omit any of these
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1, "act_fn": "silu",
    "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32, "scaling_factor": 0.18215, "shift_factor": None,
    "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}
LEGACY_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
"""Attention names of older diffusers checkpoints (which diffusers itself renames on load)."""
ARCHITECTURE_KEYS = ("arch", "in_channels", "latent_channels", "channels", "blocks_per_level", "attention_levels",
                     "downsample_padding", "output", "logvar_min", "logvar_max", "encoder", "decoder")


def diffusers_config(folder: Path) -> dict:
    """DIR/config.json with AutoencoderKL's defaults filled in; UserError if DIR is no AutoencoderKL folder."""
    path = folder / "config.json"
    if not path.is_file() or not (folder / WEIGHTS).is_file():
        raise UserError(f"{folder} is not a diffusers AutoencoderKL folder (it needs config.json and {WEIGHTS}; "
                          f"re-save a .bin one with AutoencoderKL.from_pretrained(...).save_pretrained(...))")
    config = json.loads(path.read_text())
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise UserError(f"{path} describes a {config['_class_name']}, but only AutoencoderKL maps onto our resnet")
    return {**DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if k in DIFFUSERS_DEFAULTS}}


def model_config(config: dict, source: str) -> ModelConfig:
    """The resnet model section that computes what this AutoencoderKL config computes, or UserError with one
    sentence on what our resnet cannot express."""
    from pipeline.export import LDMLayout

    def refuse(what: str) -> UserError:
        return UserError(f"{source} has {what}, which our resnet architecture cannot express, so it cannot be "
                           f"imported")

    channels, down, up = list(config["block_out_channels"]), list(config["down_block_types"]), list(config["up_block_types"])
    if config["in_channels"] != config["out_channels"]:
        raise refuse(f"in_channels {config['in_channels']} but out_channels {config['out_channels']}")
    if config["act_fn"] != "silu":
        raise refuse(f"act_fn {config['act_fn']} (ours is silu)")
    if len(down) != len(channels) or len(up) != len(channels):
        raise refuse(f"{len(down)} down and {len(up)} up blocks for {len(channels)} block_out_channels")
    attention = [i for i, t in enumerate(down) if t == "AttnDownEncoderBlock2D"]
    if config["mid_block_add_attention"]:
        attention.append(len(channels) - 1)  # our deepest level's attention is the middle block's
    layout = LDMLayout(channels, int(config["layers_per_block"]), sorted(set(attention)))
    if (down, up) != tuple(layout.block_types()):
        raise refuse(f"down_block_types {down} and up_block_types {up} (ours: per level DownEncoderBlock2D or "
                     f"AttnDownEncoderBlock2D except the deepest, the decoder mirroring them)")
    groups = config["norm_num_groups"]
    if any(group_count(c) != groups for c in channels):
        raise refuse(f"norm_num_groups {groups} for block_out_channels {channels} (ours: gcd(32, channels) groups "
                     f"per GroupNorm: {[group_count(c) for c in channels]})")
    return ModelConfig(arch="resnet", latent="spatial", in_channels=config["in_channels"],
                       latent_channels=config["latent_channels"], channels=channels,
                       blocks_per_level=layout.blocks_per_level, attention_levels=layout.attention_levels,
                       output="linear", downsample_padding="ldm")


def from_diffusers(folder: Path, model_cfg: ModelConfig, image_size: int) -> dict[str, Tensor]:
    """Our state dict for `model_cfg` from a diffusers folder (ConfigError if the folder's model is another one)."""
    from pipeline.export import OPTIONAL_CONVS, diffusers_key_map, ldm_layout

    config = diffusers_config(folder)
    derived = model_config(config, str(folder / "config.json"))
    for key in ARCHITECTURE_KEYS:
        theirs, ours = getattr(derived, key), getattr(model_cfg, key)
        if theirs != ours:
            raise ConfigError(f"model.init {folder} is an AutoencoderKL with model.{key} {theirs}, but the recipe "
                              f"has model.{key} {ours}; write the model section with `python -m "
                              f"pipeline.import_diffusers {folder} --out recipes/NAME.yaml`")
    theirs = load_file(str(folder / WEIGHTS), device="cpu")
    for old, new in LEGACY_ATTENTION.items():
        theirs = {k.replace(old, new): v for k, v in theirs.items()}
    model = build_model(model_cfg, image_size)
    own = model.state_dict()
    absent = {part for part, name in OPTIONAL_CONVS.items() if not config[f"use_{name}"]}
    state, used = {}, set()
    for ours, names in diffusers_key_map(model_cfg, ldm_layout(model_cfg, image_size), own):
        if ours.split(".")[0] in absent:  # no quant_conv / post_quant_conv: ours is the identity 1x1 conv
            state[ours] = (torch.eye(own[ours].shape[0]).reshape(own[ours].shape) if ours.endswith(".weight")
                           else torch.zeros_like(own[ours]))
            continue
        missing = [n for n in names if n not in theirs]
        if missing:
            raise ConfigError(f"model.init {folder}/{WEIGHTS} has no tensor {missing[0]}, which its config.json "
                              f"implies; the file does not belong to that config")
        state[ours] = torch.cat([theirs[n] for n in names]).reshape(own[ours].shape)
        used.update(names)
    extra = sorted(set(theirs) - used)
    if extra:
        raise ConfigError(f"model.init {folder}/{WEIGHTS} holds tensors its config.json does not describe "
                          f"({', '.join(extra[:3])}); the file does not belong to that config")
    return state


def init_state(path: str, model_cfg: ModelConfig, image_size: int) -> dict[str, Tensor]:
    """The weights `model.init` names, under our names: a diffusers AutoencoderKL folder, a `--format
    safetensors` export (model.safetensors + model.yaml) or a run folder (its latest checkpoint's EMA weights)."""
    folder = Path(path)
    if (folder / "config.json").is_file():
        return from_diffusers(folder, model_cfg, image_size)
    if (folder / "model.safetensors").is_file() and (folder / "model.yaml").is_file():
        return load_file(str(folder / "model.safetensors"), device="cpu")
    if (folder / "config.yaml").is_file():
        from pipeline.inference import load_run

        return {k: v.detach().clone() for k, v in load_run(folder, device="cpu").model.state_dict().items()}
    raise ConfigError(f"model.init {folder} is neither a diffusers AutoencoderKL folder (config.json), an export "
                      f"(model.safetensors and model.yaml) nor a run folder (config.yaml)")


def load_init(model: VAE, model_cfg: ModelConfig) -> None:
    """Copy model.init's weights into `model` (built from model_cfg); one sentence if they do not fit it."""
    state = init_state(model_cfg.init, model_cfg, model.image_size)
    own = model.state_dict()
    for key in sorted(set(own) | set(state)):
        if key not in state or key not in own or state[key].shape != own[key].shape:
            what = (f"has no tensor {key}" if key not in state else f"has a tensor {key} the model lacks"
                    if key not in own else f"has {key} of shape {list(state[key].shape)}, the model "
                                           f"{list(own[key].shape)}")
            raise ConfigError(f"model.init {model_cfg.init} {what}: it holds another architecture than the "
                              f"recipe's model section; give that model's settings")
    model.load_state_dict(state, strict=True)


def kept_latent_factors(cfg: Config) -> tuple[float, float | None] | None:
    """(scaling_factor, shift_factor) of the diffusers folder the run started from, when the run kept its encoder
    and heads frozen (its latents are the imported ones, so diffusion models trained on them still fit); else None."""
    folder = Path(cfg.model.init) if cfg.model.init else None
    if folder is None or not (folder / "config.json").is_file() or not {"encoder", "heads"} <= set(cfg.train.freeze):
        return None
    config = diffusers_config(folder)
    return config["scaling_factor"], config["shift_factor"]


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


def recipe_text(folder: str, model_cfg: ModelConfig, config: dict, freeze: list[str], command: str) -> str:
    def flow(values) -> str:
        return "[" + ", ".join(str(v) for v in values) + "]"

    shift = config["shift_factor"]
    lines = [
        f"# Imported from the diffusers AutoencoderKL in {folder}: {command}",
        f"# Diffusion models use its latents as (z - shift_factor) * scaling_factor with scaling_factor "
        f"{config['scaling_factor']:g}, shift_factor {'none' if shift is None else f'{shift:g}'} ({folder}/config.json;",
        "# pipeline.export keeps them while train.freeze holds encoder and heads, and measures new ones otherwise).",
        "model:",
        f"  init: {folder}  # start from its weights (a resumed run loads its checkpoint instead)",
        "  arch: resnet  # AutoencoderKL is LDM's architecture",
        "  latent: spatial",
        f"  in_channels: {model_cfg.in_channels}",
        f"  latent_channels: {model_cfg.latent_channels}  # latent_channels",
        f"  channels: {flow(model_cfg.channels)}  # block_out_channels",
        f"  blocks_per_level: {model_cfg.blocks_per_level}  # layers_per_block",
        f"  attention_levels: {flow(model_cfg.attention_levels)}  # the Attn*Block2D levels; the deepest: the "
        f"middle block's attention",
        "  output: linear  # its decoder ends at its last conv",
        "  downsample_padding: ldm  # its Downsample2D pads right and bottom only",
        "train:",
        f"  freeze: {flow(freeze)}  # " + ("decoder-only finetuning (as sd-vae-ft-mse): the latents stay those "
                                           "diffusion models were trained on" if freeze else "train everything"),
    ]
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.import_diffusers",
                                description="Write a recipe that starts training from a diffusers AutoencoderKL.")
    p.add_argument("folder", help="a diffusers AutoencoderKL folder (config.json, diffusion_pytorch_model.safetensors)")
    p.add_argument("--out", required=True, help="the recipe to write, e.g. recipes/sd_vae.yaml")
    p.add_argument("--freeze", nargs="*", default=None,
                   help="model parts to keep frozen (default: encoder heads, decoder-only finetuning, and "
                        "decoder_input where the folder has no post_quant_conv; no names: train everything)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> ModelConfig:
    args = _parser().parse_args(argv)
    folder, out = Path(args.folder), Path(args.out)
    if out.exists() and not args.force:
        raise UserError(f"--out {out} already exists; choose another file or pass --force")
    config = diffusers_config(folder)
    model_cfg = model_config(config, str(folder / "config.json"))
    model_cfg.init = args.folder
    freeze = args.freeze
    if freeze is None:  # decoder-only; a folder without post_quant_conv keeps it absent (the identity)
        freeze = ["encoder", "heads"] + ([] if config["use_post_quant_conv"] else ["decoder_input"])
    # Map the weights once now, so a folder whose tensors do not fit its config fails here, not at training.
    load_init(build_model(model_cfg, int(config["sample_size"])), model_cfg)
    command = "python -m pipeline.import_diffusers " + " ".join(sys.argv[1:] if argv is None else argv)
    out.parent.mkdir(parents=True, exist_ok=True)
    durable.write_text(out, recipe_text(args.folder, model_cfg, config, freeze, command))
    print(f"wrote {out}: resnet {model_cfg.channels} x{model_cfg.blocks_per_level}, {model_cfg.latent_channels} "
          f"latent channels, starting from {folder}")
    return model_cfg


if __name__ == "__main__":
    main()
    sys.exit(0)
