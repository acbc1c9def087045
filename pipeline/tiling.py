"""Tiled inference for spatial-latent models: images (and latents) larger than the training size.

    f = downsampling_factor(model)                           # image px per latent px (None: vector latent)
    mu, logvar = tiled_encode(model, x, tile_px=128, overlap_px=32)   # x [B,C,H,W], H, W multiples of f
    images = tiled_decode(model, z, tile_px=128, overlap_px=32)       # z [B,c,H/f,W/f]

As diffusers' AutoencoderKL.tiled_encode / tiled_decode: the input is cut into overlapping tiles of
the training size, each tile goes through the model alone (bounded memory; the model sees the size
it was trained on), and the tiles' outputs are blended where they overlap — in latent space when
encoding (the posterior's mu and logvar), in pixel space when decoding. Unlike diffusers, every tile
has the full tile size (the last one along an axis is moved back to end at the edge, and the
starts are spread evenly, aligned to f), and the blend is a normalised weighted sum: inside an
overlap the two tiles' weights ramp linearly in opposite directions and sum to one, elsewhere a
tile's weight is one. So the output moves continuously from one tile to the next instead of
stepping at a seam, and an input of at most one tile is passed to the model unchanged (bitwise the
untiled result).

A tile's output near its border differs from what the model computes on the whole image (a
convolution's receptive field crosses the border; GroupNorm and attention see only the tile), which
the overlap hides; tests/test_encode.py measures both the difference away from the seams and the
step across them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pipeline.errors import UserError


def downsampling_factor(model) -> int | None:
    """Image pixels per latent pixel of a spatial-latent model; None for a vector latent."""
    shape = tuple(model.latent_shape)
    if len(shape) != 3:
        return None
    return model.image_size // shape[-1]


def check_tiling(model, tile_px: int, overlap_px: int) -> int:
    """The model's downsampling factor f, after checking the tile options against it (UserError)."""
    f = downsampling_factor(model)
    if f is None:
        raise UserError(f"tiled inference needs a spatial latent, but this {model.arch} model has a vector "
                          f"latent of shape {list(model.latent_shape)} (only images of its {model.image_size} px "
                          f"training size fit it)")
    if tile_px < f or tile_px % f:
        raise UserError(f"--tile-size must be a positive multiple of the model's downsampling factor {f}, "
                          f"got {tile_px}")
    if overlap_px < 0 or overlap_px % f or 2 * overlap_px > tile_px:
        raise UserError(f"--tile-overlap must be a multiple of {f} between 0 and half the tile size "
                          f"({tile_px // 2}), got {overlap_px}")
    return f


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Starts of the tiles covering [0, length): every tile `tile` long, neighbours overlapping by at
    least `overlap`, starts spread evenly and multiples of `align`, the last tile ending at `length`.
    One tile (start 0) when length <= tile."""
    if length <= tile:
        return [0]
    n = max(2, math.ceil((length - overlap) / (tile - overlap)))
    span = (length - tile) // align  # the last start, in units of align (length and tile are multiples)
    starts = [align * round(k * span / (n - 1)) for k in range(n)]
    while any(b - a > tile - overlap for a, b in zip(starts, starts[1:])):  # rounding widened a gap
        n += 1
        starts = [align * round(k * span / (n - 1)) for k in range(n)]
    return starts


def _axis_weights(starts: list[int], tile: int, device) -> list[Tensor]:
    """Per tile, its weight along one axis: 1, ramping linearly to ~0 across the part it shares with
    the previous and the next tile, so that the two weights inside an overlap sum to one."""
    out = []
    for i, s in enumerate(starts):
        w = torch.ones(tile, dtype=torch.float32, device=device)
        if i > 0:  # shared with the previous tile: [s, previous end)
            n = starts[i - 1] + tile - s
            if n > 0:
                w[:n] = (torch.arange(n, dtype=torch.float32, device=device) + 0.5) / n
        if i < len(starts) - 1:  # shared with the next tile: [next start, s + tile)
            n = s + tile - starts[i + 1]
            if n > 0:
                w[tile - n:] = 1 - (torch.arange(n, dtype=torch.float32, device=device) + 0.5) / n
        out.append(w)
    return out


def _blend(run_tile, x: Tensor, tile_in: int, overlap_in: int, align_in: int, scale: float) -> list[Tensor]:
    """Run `run_tile` on every tile of x [B,C,H,W] and blend its outputs (a tuple of [B,c,h,w] tensors
    `scale` times the tile's size: 1/f when encoding, f when decoding) with ramp weights."""
    H, W = x.shape[-2:]
    th, tw = min(tile_in, H), min(tile_in, W)  # an axis shorter than a tile is one tile of its length
    rows, cols = tile_starts(H, th, overlap_in, align_in), tile_starts(W, tw, overlap_in, align_in)
    oh, ow, out_h, out_w = round(th * scale), round(tw * scale), round(H * scale), round(W * scale)
    row_w = _axis_weights([round(s * scale) for s in rows], oh, x.device)
    col_w = _axis_weights([round(s * scale) for s in cols], ow, x.device)
    sums: list[Tensor] = []
    weight = torch.zeros((out_h, out_w), dtype=torch.float32, device=x.device)
    for r, wr in zip(rows, row_w):
        for c, wc in zip(cols, col_w):
            outs = run_tile(x[..., r:r + th, c:c + tw])
            if not sums:
                sums = [torch.zeros((*o.shape[:2], out_h, out_w), dtype=torch.float32, device=x.device)
                        for o in outs]
            w = wr[:, None] * wc[None, :]
            ro, co = round(r * scale), round(c * scale)
            for acc, o in zip(sums, outs):
                acc[..., ro:ro + oh, co:co + ow] += o.float() * w
            weight[ro:ro + oh, co:co + ow] += w
    return [acc / weight for acc in sums]


def _check_size(h: int, w: int, f: int, what: str) -> None:
    if h % f or w % f:
        raise UserError(f"{what} is {w}x{h} px, which the model's downsampling factor {f} does not divide; "
                          f"crop or pad it to a multiple of {f}")


def tiled_encode(model, x: Tensor, tile_px: int, overlap_px: int) -> tuple[Tensor, Tensor]:
    """Images [B,C,H,W] (model range; H, W multiples of f) -> (mu, logvar) [B,c,H/f,W/f], blended in latent
    space. An image of at most one tile is encoded directly."""
    f = check_tiling(model, tile_px, overlap_px)
    H, W = x.shape[-2:]
    _check_size(H, W, f, "the image")
    if H <= tile_px and W <= tile_px:
        return model.encode(x)
    mu, logvar = _blend(lambda t: model.encode(t), x, tile_px, overlap_px, f, 1 / f)
    return mu, logvar


def tiled_decode(model, z: Tensor, tile_px: int, overlap_px: int) -> Tensor:
    """Latents [B,c,h,w] -> images [B,C,h*f,w*f] in the model's output range, blended in pixel space.
    A latent of at most one tile is decoded directly."""
    f = check_tiling(model, tile_px, overlap_px)
    tile, overlap = tile_px // f, overlap_px // f
    h, w = z.shape[-2:]
    if h <= tile and w <= tile:
        return model.decode(z)
    (images,) = _blend(lambda t: (model.decode(t),), z, tile, overlap, 1, f)
    return images
