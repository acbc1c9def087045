"""Pictures of a VAE for people: reconstructions, prior samples, interpolations, traversals.

Pure functions on the model API of pipeline/models (`encode(x) -> (mu, logvar)`, `decode(z)`,
`latent_shape`, `output_range`). Every picture leaves here as a uint8 numpy array [H, W, 3]:
W&B casts a float array to uint8 without scaling, so float images in [-1, 1] or [0, 1] would come
out black there. Inputs are float images in the model's output range, [B, C, H, W], on any device.

    grid = reconstruction_grid(model, val_images)     # inputs above their reconstructions
    save_png(grid, run_dir / "media" / "recon-000200.png")
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from pipeline import durable

PAD_VALUE = 0  # black padding between tiles, so a wrongly black image is not hidden by a white frame
TRAVERSAL_VALUES = (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0)  # prior standard deviations


# ------------------------------------------------------------------------------------------
# Arrays
# ------------------------------------------------------------------------------------------


def to_uint8(images: Tensor | np.ndarray, output_range: Sequence[float]) -> np.ndarray:
    """Float images [B, C, H, W] (or [C, H, W]) in `output_range` -> uint8 [B, H, W, 3].

    Values outside the range are clamped, NaN becomes the low end; 1-channel images are repeated
    to RGB.
    """
    x = torch.as_tensor(images).detach().to("cpu", torch.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"to_uint8 expects images [B, 1 or 3, H, W], got shape {tuple(x.shape)}")
    lo, hi = float(output_range[0]), float(output_range[1])
    x = torch.nan_to_num((x - lo) / (hi - lo), nan=0.0)
    x = (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def make_grid(images: np.ndarray, nrow: int, padding: int = 2, pad_value: int = PAD_VALUE) -> np.ndarray:
    """uint8 [B, H, W, 3] -> one uint8 image [rows*(H+p)+p, nrow*(W+p)+p, 3], `nrow` tiles per row
    (the last row is filled with padding if short)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"make_grid expects uint8 [B, H, W, C], got {images.dtype} {images.shape}")
    b, h, w, c = images.shape
    ncol = max(1, min(nrow, b))
    nrows = max(1, -(-b // ncol))
    out = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, np.uint8)
    for i in range(b):
        r, col = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        out[y:y + h, x:x + w] = images[i]
    return out


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 [H, W, 3] array as PNG atomically and durably (pipeline.durable)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return durable.write_with(path, lambda tmp: Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG"))


# ------------------------------------------------------------------------------------------
# Signals and volumes as pictures (model.spatial_dims 1 and 3)
# ------------------------------------------------------------------------------------------

SIGNAL_TILE = (96, 192)  # (H, W) px of one signal's line plot
CURVE_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))  # per channel
UNDER_COLOUR = (175, 175, 175)  # the input drawn under a reconstruction


def to_tiles(x: Tensor, output_range: Sequence[float], under: Tensor | None = None) -> np.ndarray:
    """A batch of any dimensionality -> uint8 tiles [B, H, W, 3]: images [B, C, H, W] as to_uint8, signals
    [B, C, L] as line plots (signal_plots; `under`: curves drawn first, in grey), volumes [B, C, D, H, W]
    as their three orthogonal mid-slices side by side (volume_slices)."""
    if x.dim() == 3:
        return signal_plots(x, output_range, under)
    if x.dim() == 5:
        return volume_slices(x, output_range)
    return to_uint8(x, output_range)


def signal_plots(x: Tensor, output_range: Sequence[float], under: Tensor | None = None,
                 size: tuple[int, int] = SIGNAL_TILE) -> np.ndarray:
    """Signals [B, C, L] -> uint8 [B, H, W, 3] line plots drawn with Pillow: the y axis spans output_range
    (values outside are clipped to the frame), one colour per channel, a grey zero line; `under` [B, C, L]
    (the inputs, for a reconstruction) is drawn first in light grey."""
    from PIL import Image, ImageDraw

    h, w = size
    lo, hi = float(output_range[0]), float(output_range[1])
    x = torch.nan_to_num(x.detach().float().cpu(), nan=lo)
    u = None if under is None else torch.nan_to_num(under.detach().float().cpu(), nan=lo)

    def points(sig: Tensor) -> list[tuple[float, float]]:
        t = torch.linspace(1, w - 2, sig.shape[-1])
        v = ((sig - lo) / (hi - lo)).clamp(0, 1)
        y = (h - 2) - v * (h - 4)
        return list(zip(t.tolist(), y.tolist()))

    tiles = []
    for i in range(x.shape[0]):
        img = Image.new("RGB", (w, h), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        if lo < 0 < hi:
            y0 = (h - 2) - (0 - lo) / (hi - lo) * (h - 4)
            draw.line([(0, y0), (w, y0)], fill=(225, 225, 225))
        for c in range(x.shape[1]):
            if u is not None:
                draw.line(points(u[i, c]), fill=UNDER_COLOUR, width=1)
        for c in range(x.shape[1]):
            draw.line(points(x[i, c]), fill=CURVE_COLOURS[c % len(CURVE_COLOURS)], width=1)
        tiles.append(np.asarray(img, dtype=np.uint8))
    return np.stack(tiles)


def volume_slices(x: Tensor, output_range: Sequence[float], gap: int = 2, min_px: int = 64) -> np.ndarray:
    """Volumes [B, C, D, H, W] -> uint8 [B, max(H, D), W + W + H + 2*gap, 3]: the mid-slices across D (an H x W
    image), across H (D x W) and across W (D x H), side by side with black gaps. 1 or 3 channels show as
    grey or RGB; otherwise the first channel. Small volumes are enlarged by a whole factor (nearest) to
    about min_px rows, so a 16-voxel volume is not a 16 px thumbnail."""
    x = x.detach().float().cpu()
    if x.shape[1] not in (1, 3):
        x = x[:, :1]
    scale = max(1, min_px // max(x.shape[-3:]))
    for axis in (2, 3, 4):
        x = x.repeat_interleave(scale, dim=axis)
    d, h, w = x.shape[-3:]
    views = [x[:, :, d // 2], x[:, :, :, h // 2], x[:, :, :, :, w // 2]]  # [B, C, H, W], [B, C, D, W], [B, C, D, H]
    rows = max(v.shape[-2] for v in views)
    # dark grey gaps: volumes often have black backgrounds, which black gaps would merge
    out = np.full((x.shape[0], rows, sum(v.shape[-1] for v in views) + gap * 2, 3), 96, np.uint8)
    col = 0
    for v in views:
        tile = to_uint8(v, output_range)
        out[:, :tile.shape[1], col:col + tile.shape[2]] = tile
        col += tile.shape[2] + gap
    return out


# ------------------------------------------------------------------------------------------
# Latent geometry
# ------------------------------------------------------------------------------------------


def slerp(a: Tensor, b: Tensor, t: float, eps: float = 1e-4) -> Tensor:
    """Spherical interpolation between latents a and b ([B, *latent_shape]), per sample over the
    flattened latent: t=0 gives a, t=1 gives b. Falls back to linear interpolation where a and b
    are nearly parallel (or antiparallel, or zero), where the spherical formula divides by ~0.

    Why spherical: under a Gaussian prior most mass lies near a shell of radius sqrt(D); linear
    mid-points of two typical latents fall inside it (norm shrinks by up to 1/sqrt(2)) and decode
    to blurry averages. Slerp keeps the norm of equal-norm endpoints.
    """
    if a.shape != b.shape:
        raise ValueError(f"slerp endpoints differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    fa, fb = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    na, nb = fa.norm(dim=1, keepdim=True), fb.norm(dim=1, keepdim=True)
    cos = ((fa / na.clamp_min(1e-12)) * (fb / nb.clamp_min(1e-12))).sum(dim=1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    spherical = (sin.abs() > eps) & (na > 1e-12) & (nb > 1e-12)
    safe = torch.where(spherical, sin, torch.ones_like(sin))
    wa = torch.where(spherical, torch.sin((1.0 - t) * omega) / safe, torch.full_like(sin, 1.0 - t))
    wb = torch.where(spherical, torch.sin(t * omega) / safe, torch.full_like(sin, t))
    return (wa * fa + wb * fb).to(a.dtype).reshape(a.shape)


def kl_per_dim(mu: Tensor, logvar: Tensor) -> Tensor:
    """Batch-mean KL(N(mu, sigma^2) || N(0, 1)) in nats per flattened latent dimension -> [D]."""
    mu, logvar = mu.flatten(1).float(), logvar.flatten(1).float()
    return (0.5 * (mu.square() + logvar.exp() - 1.0 - logvar)).mean(dim=0)


def top_kl_dims(mu: Tensor, logvar: Tensor, k: int) -> list[int]:
    """Flattened indices of the k latent dimensions with the highest batch-mean KL, highest first."""
    kl = kl_per_dim(mu, logvar)
    return torch.argsort(kl, descending=True)[: min(k, kl.numel())].tolist()


# ------------------------------------------------------------------------------------------
# Pictures of a model
# ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """no_grad + eval mode for the duration, the previous train/eval mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live (inputs are moved there)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _encode_mu(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    mu, logvar = model.encode(images.to(model_device(model), torch.float32))
    return mu.float(), (logvar.float() if logvar is not None else None)  # (quantized models: z_e, None)


def _decode(model: nn.Module, z: Tensor, under: Tensor | None = None) -> np.ndarray:
    """Latents (decode: a quantized model decodes their nearest codes) or integer code indices (decode_indices)."""
    z = z.to(model_device(model))
    images = model.decode(z) if z.is_floating_point() else model.decode_indices(z)
    return to_tiles(images.float(), model.output_range, under)


def reconstruction_grid(model: nn.Module, images: Tensor) -> np.ndarray:
    """Row 1: the inputs; row 2: their reconstructions decode(mu) (the posterior mean, no sampling,
    so the picture changes only when the model does). Signals: the reconstruction's curve is drawn
    over its input's, in grey."""
    with evaluating(model):
        mu, _ = _encode_mu(model, images)
        recon = _decode(model, mu, under=images if images.dim() == 3 else None)
    inputs = to_tiles(images, model.output_range)
    return make_grid(np.concatenate([inputs, recon]), nrow=len(inputs))


def prior_samples(model: nn.Module, z: Tensor, nrow: int = 8) -> np.ndarray:
    """decode(z) for a fixed noise batch z [N, *latent_shape] (fixed, so steps are comparable), or
    decode_indices(z) for fixed integer codes [N, *code_grid] of a quantized model."""
    with evaluating(model):
        return make_grid(_decode(model, z), nrow=nrow)


def interpolation_strips(model: nn.Module, images_a: Tensor, images_b: Tensor, steps: int = 10) -> np.ndarray:
    """One row per pair (images_a[i], images_b[i]): decode(slerp(mu_a, mu_b, t)) for `steps` values
    of t from 0 to 1 (quantized models: slerp between the z_e, before quantization; decode quantizes)."""
    if steps < 2:
        raise ValueError(f"interpolation_strips needs at least 2 steps, got {steps}")
    if len(images_a) != len(images_b):
        raise ValueError(f"interpolation_strips got {len(images_a)} start and {len(images_b)} end images")
    with evaluating(model):
        mu_a, _ = _encode_mu(model, images_a)
        mu_b, _ = _encode_mu(model, images_b)
        ts = torch.linspace(0.0, 1.0, steps).tolist()
        z = torch.stack([slerp(mu_a, mu_b, t) for t in ts], dim=1)  # [P, steps, *latent]
        tiles = _decode(model, z.flatten(0, 1))  # pair-major: row i holds pair i
    return make_grid(tiles, nrow=steps)


def latent_traversals(model: nn.Module, images: Tensor, dims: Sequence[int],
                      values: Sequence[float] = TRAVERSAL_VALUES) -> list[np.ndarray]:
    """One grid per requested latent dimension: rows = input images, columns = decode(mu with that
    dimension set to each of `values`). Dimensions index the flattened latent (a vector latent's
    index; for a spatial latent C x h x w, c*h*w + y*w + x), as top_kl_dims returns them."""
    grids = []
    with evaluating(model):
        mu, _ = _encode_mu(model, images)
        flat = mu.flatten(1)
        for d in dims:
            if not 0 <= d < flat.shape[1]:
                raise ValueError(f"latent_traversals: dimension {d} is outside the latent's {flat.shape[1]} dims")
            z = flat[:, None, :].repeat(1, len(values), 1)  # [N, V, D]
            z[:, :, d] = torch.as_tensor(values, dtype=z.dtype, device=z.device)
            tiles = _decode(model, z.reshape(-1, *mu.shape[1:]))  # image-major: row n holds image n
            grids.append(make_grid(tiles, nrow=len(values)))
    return grids


def bar_chart(values: Sequence[float], height: int = 160, title: str = "") -> np.ndarray:
    """A plain bar chart as uint8 [H, W, 3] (one bar per value, scaled to the maximum), with the
    title and the maximum written in the corner; for KL per latent dimension."""
    from PIL import Image, ImageDraw

    v = np.nan_to_num(np.asarray(values, dtype=np.float64).ravel(), nan=0.0, posinf=0.0).clip(min=0.0)
    bar_w = max(1, min(12, 1024 // max(1, v.size)))
    margin, top = 4, 18
    width = max(240, v.size * bar_w + 2 * margin)
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    peak = float(v.max()) if v.size and v.max() > 0 else 1.0
    base = height - margin
    for i, x in enumerate(v):
        h = int(round((base - top) * x / peak))
        x0 = margin + i * bar_w
        draw.rectangle([x0, base - h, x0 + max(0, bar_w - 2), base], fill=(52, 101, 164))
    draw.line([margin, base, width - margin, base], fill=(0, 0, 0))
    draw.text((margin, 2), f"{title}  max {peak:.3g}  ({v.size} dims)".strip(), fill=(0, 0, 0))
    return np.asarray(img, dtype=np.uint8)


def logit_heatmap(logits: Tensor, size: tuple[int, int]) -> np.ndarray:
    """Patch logits [B, 1, h, w] -> uint8 [B, H, W, 3] (nearest upsampling, each patch a block): green where
    the discriminator says real (sigmoid(logit) -> 1), red where it says fake (-> 0)."""
    p = torch.sigmoid(logits.detach().float().cpu())
    p = torch.nn.functional.interpolate(p, size=size, mode="nearest")[:, 0]
    rgb = torch.stack([1.0 - p, p, torch.full_like(p, 0.15)], dim=-1)
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def discriminator_panel(model: nn.Module, critic: nn.Module, images: Tensor) -> tuple[np.ndarray, dict[str, float]]:
    """Four rows: the inputs, the discriminator's patch logits on them, the reconstructions decode(mu), its
    logits on those (logit_heatmap's colours). Returns the grid and the mean logit on real and on fake."""
    with evaluating(model), evaluating(critic):
        mu, _ = _encode_mu(model, images)
        recon = model.decode(mu).float()
        real = images.to(recon.device, torch.float32)
        device = next(critic.parameters()).device
        logits_real, logits_fake = critic(real.to(device)), critic(recon.to(device))
    size = tuple(images.shape[-2:])
    rows = [to_uint8(real, model.output_range), logit_heatmap(logits_real, size),
            to_uint8(recon, model.output_range), logit_heatmap(logits_fake, size)]
    means = {"real": float(logits_real.float().mean()), "fake": float(logits_fake.float().mean())}
    return make_grid(np.concatenate(rows), nrow=len(images)), means
