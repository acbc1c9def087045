"""Import: a diffusers AutoencoderKL folder of each layout (SD/SDXL with quant_conv, FLUX-style without it,
attention in a down block) becomes a recipe whose model encodes and decodes as diffusers does (1e-4); exporting
it back gives the very tensors it came from; a config our resnet cannot express stops with one sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from pipeline import export, import_diffusers
from pipeline.config import ConfigError, ModelConfig, load_config
from pipeline.models import build_model
from test_export import _assert_same_model

TINY = dict(block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=32, sample_size=16,
            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
LAYOUTS = {
    "sd": dict(latent_channels=4, scaling_factor=0.18215),  # SD 1/2 (quant_conv, 4 channels)
    "sdxl": dict(latent_channels=4, scaling_factor=0.13025, force_upcast=False),
    "flux": dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                 use_post_quant_conv=False),  # no quant_conv, 16 channels, a shift
    "attention": dict(latent_channels=4, layers_per_block=2, down_block_types=["AttnDownEncoderBlock2D",
                                                                               "DownEncoderBlock2D"],
                      up_block_types=["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]),
    "no_mid_attention": dict(latent_channels=4, mid_block_add_attention=False),
}


def _saved_vae(folder: Path, **config):
    """A random-initialised AutoencoderKL saved with save_pretrained, every tensor moved off PyTorch's default
    init (GroupNorm's 1/0 would hide a swapped norm weight and bias)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**{**TINY, **config}).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vae.save_pretrained(str(folder))
    return vae


@pytest.mark.slow  # seconds: in make test, not in make test-fast
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_an_imported_autoencoderkl_computes_what_diffusers_computes_and_exports_back_unchanged(layout, tmp_path):
    theirs = _saved_vae(tmp_path / "vae", **LAYOUTS[layout])
    recipe = tmp_path / "imported.yaml"
    import_diffusers.main([str(tmp_path / "vae"), "--out", str(recipe)])
    cfg = load_config(recipe, check_paths=False)  # the written recipe is a valid one
    decoder_only = ["encoder", "heads"] + (["decoder_input"] if layout == "flux" else [])  # flux: no post_quant_conv
    assert cfg.model.init == str(tmp_path / "vae") and cfg.train.freeze == decoder_only
    assert cfg.model.latent_channels == LAYOUTS[layout]["latent_channels"]

    ours = build_model(cfg.model, 16).eval()
    import_diffusers.load_init(ours, cfg.model)
    _assert_same_model(ours, theirs, 16)

    # Back to diffusers: the same tensor names and values, quant_conv absent exactly where it was.
    layout_ = export.ldm_layout(cfg.model, 16)
    original = load_file(str(tmp_path / "vae" / import_diffusers.WEIGHTS))
    exported = export.diffusers_state_dict(ours, cfg.model, layout_)
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    factors = import_diffusers.kept_latent_factors(cfg)  # the encoder stays frozen: its factors are kept
    written = export.diffusers_config(ours, cfg.model, layout_, *factors)
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "down_block_types", "up_block_types",
                "norm_num_groups", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
                "scaling_factor", "shift_factor"):
        assert written[key] == config[key], key


def test_scaling_factors_are_measured_again_once_the_encoder_trains(tmp_path):
    _saved_vae(tmp_path / "vae", **LAYOUTS["flux"])
    recipe = tmp_path / "imported.yaml"
    import_diffusers.main([str(tmp_path / "vae"), "--out", str(recipe), "--freeze"])
    cfg = load_config(recipe, check_paths=False)
    assert cfg.train.freeze == [] and import_diffusers.kept_latent_factors(cfg) is None


def test_legacy_attention_names_import_like_the_current_ones(tmp_path):
    """Older diffusers checkpoints (sd-vae-ft-mse's among them) name the attention query/key/value/proj_attn."""
    theirs = _saved_vae(tmp_path / "vae", **LAYOUTS["sd"])
    path = tmp_path / "vae" / import_diffusers.WEIGHTS
    renamed = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
                .replace(".to_out.0.", ".proj_attn."): v for k, v in load_file(str(path)).items()}
    assert any(".query." in k for k in renamed)
    save_file(renamed, str(path))
    cfg = ModelConfig(**{**vars(import_diffusers.model_config(import_diffusers.diffusers_config(tmp_path / "vae"),
                                                               "x")), "init": str(tmp_path / "vae")})
    ours = build_model(cfg, 16).eval()
    import_diffusers.load_init(ours, cfg)
    _assert_same_model(ours, theirs, 16)


@pytest.mark.parametrize("change, message", [
    ({"act_fn": "relu"}, "has act_fn relu (ours is silu), which our resnet architecture cannot express"),
    ({"norm_num_groups": 16}, "has norm_num_groups 16 for block_out_channels [32, 64]"),
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
      "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"]},  # attention in the deepest down block
     "has down_block_types ['DownEncoderBlock2D', 'AttnDownEncoderBlock2D']"),
    ({"out_channels": 1}, "has in_channels 3 but out_channels 1"),
])
def test_a_config_our_resnet_cannot_express_exits_2_with_one_sentence(change, message, tmp_path, capsys):
    folder = tmp_path / "vae"
    _saved_vae(folder, **LAYOUTS["sd"])
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(SystemExit) as e:
        import_diffusers.main([str(folder), "--out", str(tmp_path / "r.yaml")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert err.endswith("cannot be imported") and not (tmp_path / "r.yaml").exists()


def test_a_recipe_whose_model_differs_from_the_init_folder_names_the_key(tmp_path):
    _saved_vae(tmp_path / "vae", **LAYOUTS["sd"])
    recipe = tmp_path / "imported.yaml"
    import_diffusers.main([str(tmp_path / "vae"), "--out", str(recipe)])
    cfg = load_config(recipe, ["model.channels=[32,32]"], check_paths=False)
    with pytest.raises(ConfigError, match=r"is an AutoencoderKL with model.channels \[32, 64\], but the recipe has "
                                          r"model.channels \[32, 32\]"):
        import_diffusers.load_init(build_model(cfg.model, 16), cfg.model)


def test_init_from_an_exported_safetensors_folder(tmp_path):
    cfg = ModelConfig(arch="resnet", channels=[32, 64], latent_channels=4)
    torch.manual_seed(1)
    source = build_model(cfg, 16)
    (tmp_path / "plain").mkdir()
    save_file(source.state_dict(), str(tmp_path / "plain" / "model.safetensors"))
    (tmp_path / "plain" / "model.yaml").write_text(yaml.safe_dump({"model": {"arch": "resnet"}, "image_size": 16}))
    cfg.init = str(tmp_path / "plain")
    model = build_model(cfg, 16)
    import_diffusers.load_init(model, cfg)
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    with pytest.raises(ConfigError, match="holds another architecture than the recipe's model section"):
        import_diffusers.load_init(build_model(ModelConfig(arch="resnet", channels=[32, 32], init=cfg.init), 16),
                                   ModelConfig(arch="resnet", channels=[32, 32], init=cfg.init))
