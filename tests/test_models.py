"""pipeline/models: shapes, precision, the latent contract, known FLOP/parameter counts, bad configs.

Tiny widths ([8, 16, 32]) and batches of 2-4 keep this file fast on CPU; the full one-batch
overfit of every architecture is marked slow (a fast one for dcgan stays in the default run).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import BlockSpec, ConfigError, ModelConfig, load_config
from pipeline.models import VAEOutput, build_model, training_flops_per_image

TINY: dict[str, dict] = {
    "conv": dict(arch="conv", channels=[8, 16, 32], latent_dim=16),
    "dcgan": dict(arch="dcgan", channels=[8, 16, 32], latent="spatial", latent_channels=4),
    "dcgan_vector": dict(arch="dcgan", channels=[8, 16, 32], latent="vector", latent_dim=16, output="sigmoid"),
    "vanilla": dict(arch="vanilla", channels=[8, 16, 32], latent_dim=16),
    "resnet": dict(arch="resnet", channels=[8, 16, 32], latent="spatial", latent_channels=4, attention_levels=[2]),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU the threads' spin-waits
    made this file 5x slower; restored afterwards so other test modules are unaffected."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def expected_latent(name: str, size: int) -> tuple[int, ...]:
    """conv/vanilla/dcgan halve 3 times (f=8); resnet's 3 levels downsample twice (f=4)."""
    return {"conv": (16,), "dcgan": (4, size // 8, size // 8), "dcgan_vector": (16,), "vanilla": (16,),
            "resnet": (4, size // 4, size // 4)}[name]


def tiny(name: str, size: int = 32, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(ModelConfig(**{**TINY[name], **overrides}), size)


def images(n: int = 4, size: int = 32, output: str = "tanh", seed: int = 0) -> torch.Tensor:
    """Distinct smooth colour gratings in the output range (learnable, unlike noise)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        f = torch.rand(3, 2, generator=g) * 4 + 1
        phase = torch.rand(3, generator=g) * 2 * math.pi
        out.append(torch.stack([0.8 * torch.sin(2 * math.pi * (f[c, 0] * xx + f[c, 1] * yy) + phase[c])
                                for c in range(3)]))
    x = torch.stack(out)
    return (x + 1) / 2 if output == "sigmoid" else x


def head_layer(model) -> nn.Module:
    """The last Linear/Conv2d of the mu/logvar heads (mu is the first half of its outputs)."""
    return [m for m in model.heads.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]


# ----------------------------------------------------------------------------------------------
# Shapes and precision
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("name", list(TINY))
def test_shapes(name, size):
    model = tiny(name, size)
    assert model.latent_shape == expected_latent(name, size)
    lo, hi = model.output_range
    with torch.no_grad():
        out = model(images(2, size, model.output))
    assert isinstance(out, VAEOutput)
    assert out.recon.shape == (2, 3, size, size)
    assert out.mu.shape == out.logvar.shape == out.z.shape == (2, *model.latent_shape)
    assert lo <= out.recon.min() and out.recon.max() <= hi


# bf16 on CPU is slow without AMX, so only 32 px runs by default.
@pytest.mark.parametrize("size", [32, pytest.param(64, marks=pytest.mark.slow), pytest.param(128, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", list(TINY))
def test_bf16_forward_backward(name, size):
    model = tiny(name, size)
    x = images(2, size, model.output)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = F.mse_loss(out.recon.float(), x) + 1e-3 * out.mu.square().mean()
    assert out.recon.dtype == torch.bfloat16
    assert out.mu.dtype == out.logvar.dtype == torch.float32  # upcast under autocast (base.py)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("name", list(TINY))
def test_channels_last_matches_contiguous(name):
    model = tiny(name).eval()
    x = images(2)
    torch.manual_seed(1)
    ref = model(x)
    model = model.to(memory_format=torch.channels_last)
    torch.manual_seed(1)
    out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out.mu, ref.mu, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.z, ref.z, atol=1e-5, rtol=1e-4)  # same noise whatever the layout
    torch.testing.assert_close(out.recon, ref.recon, atol=1e-5, rtol=1e-4)


def test_seed_shapes():
    """The original models' published bottlenecks come out of their recipes' widths."""
    with torch.device("meta"):
        dogs = build_model(ModelConfig(arch="dcgan", latent="spatial", latent_channels=32,
                                       channels=[64, 128, 256, 512], output="sigmoid"), 64)
        flowers = build_model(ModelConfig(arch="conv", channels=[8, 16, 32, 64, 128, 256], latent_dim=4096), 256)
        vanilla = build_model(ModelConfig(arch="vanilla", channels=[32, 64, 128, 256, 512], latent_dim=128), 64)
    assert dogs.latent_shape == (32, 4, 4)            # the DCGAN dog VAE: "4 x 4 x 32 = 512"
    assert flowers.feature_shape == (256, 4, 4)       # the flowers conv VAE: nn.Linear(4096, 4096) heads
    assert head_layer(flowers).in_features == 4096
    assert vanilla.feature_shape == (512, 2, 2)       # AntixK: hidden_dims[-1] * 4


def test_resnet_levels_reproduce_ldm_kl_f8_parameter_count():
    """channels [128,256,512,512] x 2 blocks, mid attention, z=4 is Stable Diffusion's VAE: 83,653,863."""
    with torch.device("meta"):
        model = build_model(ModelConfig(arch="resnet", latent="spatial", latent_channels=4,
                                        channels=[128, 256, 512, 512], blocks_per_level=2,
                                        attention_levels=[3]), 256)
    assert model.num_parameters() == 83_653_863
    assert model.latent_shape == (4, 32, 32)
    # Counted on a weightless meta copy, so a meta-built model works too. Pinned as measured (torch
    # 2.14.1's counter): 2.68 TFLOPs per 256 px image for forward + backward, 447 GMACs forward.
    assert training_flops_per_image(model, 256) == 2_684_275_359_744


# ----------------------------------------------------------------------------------------------
# The latent contract: Monte-Carlo samples, clamping, prior samples
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TINY))
def test_samples_per_input_are_sample_major(name):
    model = tiny(name, samples_per_input=3).eval()
    x = images(2, output=model.output)
    torch.manual_seed(7)
    out = model(x)
    assert out.recon.shape == (6, 3, 32, 32) and out.z.shape == (6, *model.latent_shape)
    assert out.mu.shape == (2, *model.latent_shape)
    mu, logvar = model.encode(x)
    torch.manual_seed(7)
    eps = torch.randn(3, *mu.shape)
    expected = (mu + eps * torch.exp(0.5 * logvar)).reshape(6, *mu.shape[1:])  # z[l*B + i]: sample l of input i
    torch.testing.assert_close(out.z, expected)
    torch.testing.assert_close(out.recon, model.decode(out.z), atol=1e-5, rtol=1e-4)
    assert model(x, n_samples=1).recon.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("name", list(TINY))
def test_logvar_is_clamped(name):
    model = tiny(name, logvar_min=-4.0, logvar_max=2.0)
    layer = head_layer(model)
    half = layer.bias.shape[0] // 2
    x = images(2, output=model.output)
    with torch.no_grad():
        layer.weight.zero_()
        for value, expected in [(100.0, 2.0), (-100.0, -4.0), (1.5, 1.5)]:
            layer.bias[half:] = value
            mu, logvar = model.encode(x)
            assert torch.equal(logvar, torch.full_like(logvar, expected))
    # Defaults keep exp(logvar) finite even in fp16: exp(-30) > 0 and exp(20) < 65504**2.
    assert ModelConfig().logvar_min == -30.0 and ModelConfig().logvar_max == 20.0


@pytest.mark.parametrize("name", list(TINY))
def test_sample(name):
    model = tiny(name).eval()
    lo, hi = model.output_range
    imgs = model.sample(5)
    assert imgs.shape == (5, 3, 32, 32) and not imgs.requires_grad
    assert lo <= imgs.min() and imgs.max() <= hi
    a = model.sample(3, generator=torch.Generator().manual_seed(3))
    b = model.sample(3, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    cold = model.sample(3, temperature=0.0)  # z = 0 for every sample
    with torch.no_grad():
        mean = model.decode(torch.zeros(1, *model.latent_shape))
    torch.testing.assert_close(cold, mean.expand(3, -1, -1, -1), atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# One-batch overfit: 4 distinct gratings at 32 px, MSE + 1e-3 KL, Adam lr 3e-3.
# Measured on CPU (factor = first step's reconstruction MSE / last step's):
#   60 steps: dcgan 21x;  150 steps: conv 17x, dcgan 73x, dcgan_vector 80x, vanilla 36x, resnet 76x.
# Asserted: at least 5x.
# ----------------------------------------------------------------------------------------------


def overfit_factor(name: str, steps: int) -> float:
    model = tiny(name)
    x = images(4, output=model.output)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = last = None
    for _ in range(steps):
        out = model(x)
        recon = F.mse_loss(out.recon, x.repeat(model.samples_per_input, 1, 1, 1))
        kl = 0.5 * (out.mu.square() + out.logvar.exp() - 1 - out.logvar).mean()
        opt.zero_grad()
        (recon + 1e-3 * kl).backward()
        opt.step()
        first = recon.item() if first is None else first
        last = recon.item()
    return first / last


def test_overfit_one_batch_fast():
    assert overfit_factor("dcgan", 60) >= 5.0


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TINY))
def test_overfit_one_batch(name):
    assert overfit_factor(name, 150) >= 5.0


# ----------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------


def test_training_flops_known_answer():
    """vanilla, one level of 8 channels, 32 px, latent 4: forward FLOPs by hand (2 per MAC).

    Backward costs 2x forward for every layer except the first conv, whose input needs no gradient.
    """
    model = build_model(ModelConfig(arch="vanilla", channels=[8], latent_dim=4), 32)
    first_conv = 2 * 8 * 16 * 16 * 3 * 9          # conv 3->8, 3x3, stride 2 -> 16x16
    forward = (first_conv
               + 2 * (8 * 16 * 16) * 8            # Linear heads 2048 -> 2x4
               + 2 * 4 * (8 * 16 * 16)            # decoder_input 4 -> 2048
               + 2 * (8 * 16 * 16) * 8 * 9        # ConvTranspose 8->8, 3x3, 16 -> 32
               + 2 * 3 * 32 * 32 * 8 * 9)         # final conv 8->3 at 32x32
    assert training_flops_per_image(model, 32) == 3 * forward - first_conv == 2_580_480


def test_training_flops_scale_with_width_and_samples():
    def flops(**kw):
        return training_flops_per_image(tiny("resnet", **kw), 32)

    base = flops()
    assert base > 0
    assert 3.8 < flops(channels=[16, 32, 64]) / base <= 4.0  # all but the 3-channel convs scale 4x
    assert flops(samples_per_input=3) > 2 * base  # the decoder runs L times


def test_training_flops_count_attention_on_cpu():
    """CPU's fused SDPA kernel is added to FlopCounterMode's table: one attention block at N
    positions and C channels costs 24*N*C^2 (q,k,v,proj 1x1 convs) + 12*N^2*C (QK^T and AV, fwd+bwd)."""
    with_attn = training_flops_per_image(tiny("resnet"), 32)
    without = training_flops_per_image(tiny("resnet", attention_levels=[]), 32)
    n, c = 8 * 8, 32
    assert with_attn - without == 2 * (24 * n * c * c + 12 * n * n * c)  # encoder + decoder middle blocks


def test_training_flops_has_no_side_effects():
    model = tiny("dcgan").train()
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)][0]
    stats = bn.running_mean.clone()
    torch.manual_seed(0)
    state = torch.get_rng_state()
    training_flops_per_image(model, 32)
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training and torch.equal(bn.running_mean, stats)
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Explicit block lists
# ----------------------------------------------------------------------------------------------


def S(block, out=0, repeat=1):
    return BlockSpec(block=block, out=out, repeat=repeat)


def test_explicit_lists_equal_the_levels_they_spell_out():
    """channels [8, 16], 1 block per level, attention at the last level, written out by hand."""
    levels = dict(arch="resnet", latent="spatial", latent_channels=4, channels=[8, 16], blocks_per_level=1,
                  attention_levels=[1])
    encoder = [S("conv", 8), S("resnet", 8), S("downsample"), S("resnet", 16, repeat=2), S("attention"),
               S("resnet", 16), S("norm_act"), S("conv", 8)]
    decoder = [S("conv", 16), S("resnet", 16), S("attention"), S("resnet", 16, repeat=3), S("upsample"),
               S("resnet", 8, repeat=2), S("norm_act")]
    torch.manual_seed(0)
    a = build_model(ModelConfig(**levels), 32).eval()
    torch.manual_seed(0)
    b = build_model(ModelConfig(**levels, encoder=encoder, decoder=decoder), 32).eval()
    assert list(a.state_dict()) == list(b.state_dict())
    x = images(2)
    torch.manual_seed(1)
    ra = a(x).recon
    torch.manual_seed(1)
    torch.testing.assert_close(b(x).recon, ra)


def test_explicit_lists_from_yaml(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model:\n  arch: resnet\n  latent: spatial\n  latent_channels: 3\n"
        "  encoder:\n    - {block: conv, out: 16}\n    - {block: resnet, out: 16, repeat: 2}\n"
        "    - {block: downsample, repeat: 2}\n    - {block: attention}\n    - {block: norm_act}\n"
        "  decoder:\n    - {block: conv, out: 24}\n    - {block: attention}\n"
        "    - {block: upsample}\n    - {block: resnet, out: 12}\n    - {block: upsample}\n    - {block: norm_act}\n")
    cfg = load_config(recipe, check_paths=False)
    model = build_model(cfg.model, 64)
    assert model.latent_shape == (3, 16, 16)
    out = model(images(2, 64))
    assert out.recon.shape == (2, 3, 64, 64)


# ----------------------------------------------------------------------------------------------
# Bad configs: one sentence naming the key, level or list index
# ----------------------------------------------------------------------------------------------

RES = dict(arch="resnet", latent="spatial", latent_channels=4)
OK_DEC = [S("conv", 8), S("upsample"), S("upsample")]

BAD = [
    (dict(arch="conv", channels=[8, 16, 32, 64, 128, 256]), 100,
     "model.channels has 6 levels, which needs the image size to be divisible by 64, but the shards are 100 px"),
    (dict(arch="vanilla", channels=[8, 16, 32, 64, 128, 256]), 32,
     "model.channels has 6 levels, which needs the image size to be divisible by 64, but the shards are 32 px"),
    (dict(RES, channels=[8, 16, 32, 64]), 36,
     "model.channels has 4 levels (3 downsamples), which needs the image size to be divisible by 8"),
    (dict(RES, encoder=[S("conv", 8), S("atention")], decoder=OK_DEC), 32,
     "model.encoder[1] has unknown block 'atention'; did you mean attention?"),
    (dict(RES, encoder=[S("conv", 8), S("downsample", repeat=2)], decoder=[S("conv", 16), S("upsample", 32)]), 32,
     "model.decoder[1] (upsample) keeps its 16 input channels, so out must be 0 or 16, not 32"),
    (dict(RES, encoder=[S("resnet", 8), S("norm_act", 16)], decoder=OK_DEC), 32,
     "model.encoder[1] (norm_act) keeps its 8 input channels"),
    (dict(RES, encoder=[S("conv", 8), S("downsample"), S("resnet", 8), S("downsample", repeat=2)],
          decoder=OK_DEC), 36,
     "model.encoder[3] (downsample) gets a 9 px feature map, which a stride-2 downsample cannot halve; "
     "with 3 downsample blocks the image size must be divisible by 8, but the shards are 36 px"),
    (dict(RES, encoder=[S("conv", 8), S("downsample", repeat=2)], decoder=[S("conv", 8), S("upsample")]), 32,
     "model.decoder (upsample at [1]) has 1 upsample blocks but model.encoder has 2 downsample blocks, "
     "so the decoder would output 16 px for 32 px images"),
    (dict(RES, encoder=[S("resnet", 8, repeat=0)], decoder=OK_DEC), 32, "model.encoder[0] (resnet) has repeat 0"),
    (dict(RES, channels=[8, 16, 32], attention_levels=[5]), 32,
     "model.attention_levels[0] is 5, but model.channels has 3 levels (0..2)"),
    (dict(arch="conv", latent="spatial"), 32, "model.arch conv supports model.latent vector, not spatial"),
    (dict(arch="resnet", latent="vector"), 32, "model.arch resnet supports model.latent spatial, not vector"),
    (dict(arch="vae"), 32, "model.arch is 'vae'"),
    (dict(arch="dcgan", output="relu"), 32, "model.output is 'relu'"),
]


@pytest.mark.parametrize("kw,size,message", BAD)
def test_bad_config_is_one_sentence(kw, size, message):
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(**kw), size)
    text = str(err.value)
    assert text.startswith(message), text
    assert "\n" not in text


@pytest.mark.parametrize("arch, shape", [("conv", (16,)), ("vanilla", (16,)), ("dcgan", (4, 4, 4)), ("resnet", (4, 8, 8))])
def test_auto_latent_is_each_architectures_own(arch, shape):
    extra = dict(latent_dim=16, latent_channels=4, channels=[8, 16, 32])
    assert build_model(ModelConfig(arch=arch, **extra), 32).latent_shape == shape
