"""The recipe system: precedence, types, and the one-sentence errors users see (exit code 2)."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import BlockSpec, ConfigError, load_config, parse_override, save_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def shards(tmp_path):
    d = tmp_path / "shards" / "toy"
    d.mkdir(parents=True)
    (d / "manifest.json").write_text("{}")
    return d


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_precedence_defaults_recipe_overrides(tmp_path, shards):
    recipe = write(tmp_path, f"data: {{shards: {shards}}}\ntrain: {{max_steps: 7, seed: 3}}\n")
    cfg = load_config(recipe, ["train.max_steps=50"])
    assert cfg.train.max_steps == 50  # override beats recipe
    assert cfg.train.seed == 3  # recipe beats default
    assert cfg.optim.lr == 1e-3  # default
    assert cfg.name == "r"  # recipe file name


@pytest.mark.parametrize("text, expected", [
    ("a.b=3", ("a.b", 3)),
    ("a.b=3.5", ("a.b", 3.5)),
    ("a.b=true", ("a.b", True)),
    ("a.b=[1, 2]", ("a.b", [1, 2])),
    ("a.b=hello", ("a.b", "hello")),
    ("a.b=", ("a.b", "")),
])
def test_parse_override(text, expected):
    assert parse_override(text) == expected


def test_nested_sections_and_block_lists(tmp_path, shards):
    recipe = write(tmp_path, f"""
data: {{shards: {shards}}}
loss: {{kl: {{weight: 0.5, schedule: linear, warmup_steps: 100}}, perceptual: {{weight: 1}}}}
model:
  arch: resnet
  encoder:
    - {{block: resnet, out: 64, repeat: 2}}
    - {{block: downsample}}
""")
    cfg = load_config(recipe, ["loss.kl.free_bits_nats=0.25"])
    assert cfg.loss.kl.weight == 0.5 and cfg.loss.kl.free_bits_nats == 0.25
    assert cfg.loss.perceptual.weight == 1.0 and isinstance(cfg.loss.perceptual.weight, float)
    assert cfg.model.encoder == [BlockSpec("resnet", 64, 2), BlockSpec("downsample", 0, 1)]


@pytest.mark.parametrize("overrides, message", [
    (["model.latnet_dim=64"], "unknown key model.latnet_dim (did you mean model.latent_dim?)"),
    (["trian.max_steps=5"], "unknown key trian (did you mean train?)"),
    (["train.max_steps=abc"], "train.max_steps must be int, got 'abc'"),
    (["train.max_steps=1.5"], "train.max_steps must be int"),
    (["data.hflip=3"], "data.hflip must be bool"),
    (["model.channels=8"], "model.channels must be a list of int"),
    (["model.arch=transformer"], "model.arch is 'transformer' but must be one of conv, dcgan, vanilla, resnet"),
    (["loss.recon=bce"], "loss.recon is bce, which needs outputs in [0, 1)"),
    (["model.encoder=[{block: resnett}]"], "model.encoder[0].block is 'resnett' (did you mean resnet?)"),
    (["model.decoder=[{block: resnet, outt: 3}]"], "unknown key model.decoder[0].outt (did you mean model.decoder[0].out?)"),
    (["train.max_steps=0"], "train.max_steps must be at least 1"),
    (["nokey"], "must look like section.key=value"),
])
def test_bad_overrides_name_the_key(tmp_path, shards, overrides, message):
    recipe = write(tmp_path, f"data: {{shards: {shards}}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(recipe, overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_recipe_errors_name_the_file(tmp_path, shards):
    recipe = write(tmp_path, f"data: {{shards: {shards}}}\noptim: {{lr: fast}}\n", "bad.yaml")
    with pytest.raises(ConfigError, match=r"recipe .*bad.yaml: optim.lr must be float, got 'fast'"):
        load_config(recipe)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "data: [unclosed\n", "broken.yaml"))


def test_missing_shards_says_what_to_do(tmp_path):
    recipe = write(tmp_path, f"data: {{shards: {tmp_path / 'nope'}}}\n")
    with pytest.raises(ConfigError, match=r"has no manifest.json; build it with `make shards"):
        load_config(recipe)


def test_yaml_is_read_safely(tmp_path, shards):
    # A python tag would run code with yaml.load; safe_load refuses it.
    recipe = write(tmp_path, f"data: {{shards: {shards}}}\nname: !!python/object/apply:os.system ['touch {tmp_path}/pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(recipe)
    assert not (tmp_path / "pwned").exists()


def test_saved_config_loads_back_identically(tmp_path, shards):
    recipe = write(tmp_path, f"data: {{shards: {shards}}}\nmodel: {{encoder: [{{block: attention}}]}}\n")
    cfg = load_config(recipe, ["train.max_steps=9"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_cli_exit_code_2_with_one_line(tmp_path, shards):
    recipe = write(tmp_path, f"data: {{shards: {shards}}}\n")
    code = "import sys; from pipeline.config import cli_config, exit_on_config_error; exit_on_config_error(cli_config)(sys.argv[1:])"
    r = subprocess.run([sys.executable, "-c", code, str(recipe), "model.latnet_dim=3"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: command line: unknown key model.latnet_dim (did you mean model.latent_dim?)"]


# Numbers as people type them: YAML 1.1 reads `1e-3` as a string and `no`/`false` as a boolean.
@pytest.mark.parametrize("override, key, expected", [
    ("optim.lr=1e-3", "optim.lr", 0.001),
    ("optim.lr=5E-4", "optim.lr", 0.0005),
    ("loss.kl.weight=1e-05", "loss.kl.weight", 1e-5),
    ("optim.betas=[0.9, 1e-3]", "optim.betas", [0.9, 0.001]),
    ("train.max_steps=1e4", "train.max_steps", 10000),
    ("train.mixed_precision=no", "train.mixed_precision", "no"),
    ("train.mixed_precision=false", "train.mixed_precision", "no"),
    ("train.mixed_precision=bf16", "train.mixed_precision", "bf16"),
])
def test_numbers_and_words_as_people_type_them(tmp_path, shards, override, key, expected):
    nested = override.split("=", 1)[1]  # the value as typed, in the recipe: `loss: {kl: {weight: 1e-05}}`
    for part in reversed(key.split(".")):
        nested = f"{{{part}: {nested}}}"
    recipe = write(tmp_path, f"data: {{shards: {shards}}}\n{nested[1:-1]}\n")
    for cfg in (load_config(recipe), load_config(write(tmp_path, f"data: {{shards: {shards}}}\n", "plain.yaml"),
                                                  [override])):
        got = cfg
        for part in key.split("."):
            got = getattr(got, part)
        assert got == expected and type(got) is type(expected), (override, got)


@pytest.mark.parametrize("override, message", [
    ("optim.lr=.nan", "optim.lr must be a finite number above 0, got nan"),
    ("optim.lr=.inf", "optim.lr must be a finite number above 0, got inf"),
    ("optim.lr=0", "optim.lr must be a finite number above 0, got 0.0"),
    ("optim.betas=[1.5,2]", "optim.betas must be two numbers in [0, 1), got [1.5, 2.0]"),
    ("optim.betas=[0.9,-0.1]", "optim.betas must be two numbers in [0, 1), got [0.9, -0.1]"),
    ("optim.betas=[0.9]", "optim.betas must be two numbers in [0, 1), got [0.9]"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be a finite number of 0 or more, got -0.1"),
    ("optim.eps=0", "optim.eps must be a finite number above 0, got 0.0"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio must be in [0, 1], got 2.0"),
    ("optim.grad_clip_norm=-1", "optim.grad_clip_norm must be a finite number of 0 or more, got -1.0"),
    ("optim.warmup_steps=-1", "optim.warmup_steps must be 0 or more, got -1"),
    ("optim.gamma=0", "optim.gamma must be a finite number above 0, got 0.0"),
    ("optim.gamma_every_steps=0", "optim.gamma_every_steps must be at least 1, got 0"),
    ("loss.adversarial.lr=.nan", "loss.adversarial.lr must be a finite number above 0, got nan"),
    ("loss.adversarial.betas=[1,0.9]", "loss.adversarial.betas must be two numbers in [0, 1), got [1.0, 0.9]"),
    ("loss.kl.weight=.nan", "loss.kl.weight must be a finite number of 0 or more, got nan"),
    ("loss.recon_weight=-1", "loss.recon_weight must be a finite number of 0 or more, got -1.0"),
    ("model.logvar_max=.nan", "model.logvar_max is nan; give a number"),
    ("train.mixed_precision=yes", "train.mixed_precision is 'yes' but must be one of no, bf16, fp16"),
])
def test_out_of_range_values_are_one_sentence_naming_the_key(tmp_path, shards, override, message):
    recipe = write(tmp_path, f"data: {{shards: {shards}}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(recipe, [override])
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
