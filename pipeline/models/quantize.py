"""Quantized latents: VQ (van den Oord et al. 2017), EMA-VQ (ibid., appendix; Razavi et al. 2019) and FSQ
(Mentzer et al. 2023), with codebook health measured over every rank.

    q = Quantizer(cfg.model.quantizer, token_dim=4, layout="channels", name="latent")
    out = q(z_e, track=model.training)     # QuantizerOutput(z_q, indices, loss, terms)
    q.after_step(step, ok)                 # once per optimizer step, on every rank (pipeline.step does it)
    health = q.read_window()               # usage, perplexity, restarts since the last read (logging steps)

Tokens. layout "channels": a tensor [B, C, *S] has one token of C values per position (a spatial latent,
or a feature map inside a block list); layout "vector": [B, D] is cut into D / token_dim tokens.
`indices` has the token grid's shape: [B, *S] or [B, D / token_dim].

Losses (float32, autocast off; means over every token value, taming's convention):
    commitment = mean (z - sg(e))^2,  codebook = mean (sg(z) - e)^2   (vq only; ema moves the codebook itself)
    loss = codebook_weight * codebook + commitment_weight * commitment                 (fsq: no loss)
The decoder sees z + sg(e - z): the value of the code, the gradient of the encoder (straight-through).

Distributed training. Everything that changes a codebook happens in `after_step`, once per optimizer
step, after the statistics of the step's micro-batches (code counts, and for ema the sums of the assigned
tokens) have been all-reduced over ranks in one collective, so every rank applies the same update and
holds the same codebook (EMA codebook statistics that are never all-reduced let ranks drift apart:
espnet #6284, vector-quantize-pytorch #17). A step whose loss or gradient was non-finite (`ok` false)
changes nothing. The statistics live in buffers, so checkpoints carry them and a resumed run continues
bit for bit.

Dead codes. Every `restart_every_steps` steps the codes assigned fewer than `restart_threshold` tokens
(summed over ranks) since the last check are moved onto encoder outputs: each rank contributes
`codebook_size` tokens of its last micro-batch (evenly spaced), they are all-gathered, and each dead code
takes one of them, chosen by a generator seeded with the step (the same choice on every rank; the
training RNG streams are not touched). Restarts are counted (`restarts_total`).

Health. `usage_counts` accumulates the all-reduced code counts of the training steps since the last
`read_window()` (the logging interval): usage = fraction of codes used at least once, perplexity =
exp(entropy of the code frequencies) — over the whole window and every rank, not per batch, which would
hide dead codes (a batch cannot use more codes than it has tokens).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import ConfigError, QuantizerConfig

FSQ_EPS = 1e-3
"""FSQ's bound keeps tanh a little inside the outermost levels (the paper's reference code: 1e-3)."""


@dataclass
class QuantizerOutput:
    z_q: Tensor
    """The input's shape: the codes, with the input's gradient (straight-through)."""
    indices: Tensor
    """[B, *token grid] int64 code indices."""
    loss: Tensor
    """float32 scalar with grad: the weighted quantizer loss that replaces the KL term (0 for fsq)."""
    terms: dict[str, Tensor] = field(default_factory=dict)
    """Detached raw terms: commitment, and codebook for vq."""


def _full_precision(device_type: str):
    """Autocast off (the lookup and the losses run in float32); a no-op on devices without autocast (meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class Quantizer(nn.Module):
    def __init__(self, cfg: QuantizerConfig, token_dim: int, layout: str = "channels", name: str = "latent",
                 codebook_size: int = 0):
        super().__init__()
        if layout not in ("channels", "vector"):
            raise ValueError(f"layout must be channels or vector, not {layout!r}")
        self.kind, self.layout, self.name = cfg.kind, layout, name
        self.token_dim = int(token_dim)
        self.commitment_weight = float(cfg.commitment)
        self.codebook_weight = float(cfg.codebook_weight)
        self.decay, self.epsilon = float(cfg.ema_decay), float(cfg.ema_epsilon)
        self.l2 = bool(cfg.l2_normalize) and cfg.kind != "fsq"
        self.restart_every = int(cfg.restart_every_steps) if cfg.kind != "fsq" else 0
        self.restart_threshold = float(cfg.restart_threshold)
        if cfg.kind == "fsq":
            levels = [int(v) for v in cfg.fsq_levels]
            self.num_codes = math.prod(levels)
            self.code_dim = len(levels)
            self.register_buffer("levels", torch.tensor(levels, dtype=torch.int64), persistent=False)
            basis = [math.prod(levels[:i]) for i in range(len(levels))]
            self.register_buffer("basis", torch.tensor(basis, dtype=torch.int64), persistent=False)
        else:
            self.num_codes = int(codebook_size or cfg.codebook_size)
            self.code_dim = int(cfg.lookup_dim) or self.token_dim
        if self.num_codes > 2**31 - 1:
            raise ConfigError(f"model.quantizer has {self.num_codes} codes, more than int32 indices can hold; "
                              f"use fewer fsq_levels or a smaller codebook_size")
        project = self.code_dim != self.token_dim
        self.proj_in = nn.Linear(self.token_dim, self.code_dim) if project else nn.Identity()
        self.proj_out = nn.Linear(self.code_dim, self.token_dim) if project else nn.Identity()
        k, d = self.num_codes, self.code_dim
        if cfg.kind == "vq":
            self.codebook = nn.Parameter(self._init_codes(k, d))
        elif cfg.kind == "ema":
            codes = self._init_codes(k, d)
            self.register_buffer("codebook", codes)
            self.register_buffer("ema_cluster_size", torch.ones(k))
            self.register_buffer("ema_embed_sum", codes.clone())
        # Health and restart statistics (all-reduced, identical on every rank; in checkpoints).
        self.register_buffer("usage_counts", torch.zeros(k))
        self.register_buffer("restart_counts", torch.zeros(k))
        self.register_buffer("restarts_total", torch.zeros((), dtype=torch.int64))
        self.register_buffer("restarts_read", torch.zeros((), dtype=torch.int64))
        # This step's local statistics (summed over its micro-batches, reduced in after_step): not state.
        self._step_counts: Tensor | None = None
        self._step_sums: Tensor | None = None
        self._recent: Tensor | None = None

    def _init_codes(self, k: int, d: int) -> Tensor:
        codes = torch.empty(k, d).uniform_(-1.0 / k, 1.0 / k)  # taming's VectorQuantizer init
        return F.normalize(codes, dim=1) if self.l2 else codes

    # -- tokens -----------------------------------------------------------------------------------

    def to_tokens(self, z: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """[B, C, *S] or [B, D] -> ([N, token_dim] tokens, token grid [B, *S] / [B, D/token_dim])."""
        if self.layout == "channels":
            if z.shape[1] != self.token_dim:
                raise ValueError(f"quantizer {self.name} expects {self.token_dim} channels, got {z.shape[1]}")
            grid = (z.shape[0], *z.shape[2:])
            return z.movedim(1, -1).reshape(-1, self.token_dim), grid
        if z.shape[1] % self.token_dim:
            raise ValueError(f"quantizer {self.name}: {z.shape[1]} values are not tokens of {self.token_dim}")
        return z.reshape(-1, self.token_dim), (z.shape[0], z.shape[1] // self.token_dim)

    def from_tokens(self, tokens: Tensor, grid: tuple[int, ...]) -> Tensor:
        if self.layout == "channels":
            return tokens.reshape(*grid, self.token_dim).movedim(-1, 1)
        return tokens.reshape(grid[0], -1)

    # -- quantization -----------------------------------------------------------------------------

    def _lookup(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Lookup-space tokens [N, code_dim] (float32) -> (codes [N, code_dim], indices [N])."""
        if self.kind == "fsq":
            levels = self.levels.to(u.dtype)
            half_l = (levels - 1) * (1 - FSQ_EPS) / 2
            offset = torch.where(self.levels % 2 == 0, 0.5, 0.0).to(u.dtype)
            shift = torch.atanh(offset / half_l)
            bounded = torch.tanh(u + shift) * half_l - offset
            half_width = (self.levels // 2).to(u.dtype)
            codes = (bounded + (bounded.round() - bounded).detach()) / half_width  # round, straight-through
            digits = (codes.detach() * half_width + half_width).round().long()
            return codes, (digits * self.basis).sum(-1)
        codebook = self.codebook.float()
        if self.l2:
            codebook = F.normalize(codebook, dim=1)
        dist2 = u.square().sum(1, keepdim=True) - 2 * u @ codebook.t() + codebook.square().sum(1)
        indices = dist2.argmin(1)
        return codebook[indices], indices

    def codes(self, indices: Tensor) -> Tensor:
        """Code indices [...] -> lookup-space codes [..., code_dim] (float32)."""
        if self.kind == "fsq":
            half_width = self.levels // 2
            digits = (indices.unsqueeze(-1) // self.basis) % self.levels
            return (digits - half_width).float() / half_width.float()
        codebook = self.codebook.float()
        return (F.normalize(codebook, dim=1) if self.l2 else codebook)[indices]

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Code indices [B, *token grid] -> the quantized tensor the decoder takes ([B, C, *S] or [B, D])."""
        tokens = self.proj_out(self.codes(indices.reshape(-1)).to(self._param_dtype()))
        return self.from_tokens(tokens, tuple(indices.shape))

    def _param_dtype(self) -> torch.dtype:
        p = next(self.proj_out.parameters(), None)
        return p.dtype if p is not None else torch.float32

    def forward(self, z: Tensor, track: bool = False) -> QuantizerOutput:
        """Quantize z ([B, C, *S] or [B, D]). track: count codes (and EMA sums) for after_step: training only."""
        tokens, grid = self.to_tokens(z)
        u = self.proj_in(tokens)
        with _full_precision(z.device.type):
            u = u.float()
            if self.l2:
                u = F.normalize(u, dim=1)
            codes, indices = self._lookup(u)
            terms: dict[str, Tensor] = {}
            if self.kind == "fsq":
                quantized = codes  # already straight-through
                loss = torch.zeros((), device=z.device)
            else:
                commitment = (u - codes.detach()).square().mean()
                terms["commitment"] = commitment.detach()
                loss = self.commitment_weight * commitment
                if self.kind == "vq":
                    codebook = (u.detach() - codes).square().mean()
                    terms["codebook"] = codebook.detach()
                    loss = loss + self.codebook_weight * codebook
                quantized = u + (codes - u).detach()
        if track:
            self._track(u.detach(), indices)
        z_q = self.from_tokens(self.proj_out(quantized).to(z.dtype), grid)
        return QuantizerOutput(z_q=z_q, indices=indices.view(grid), loss=loss, terms=terms)

    # -- statistics and codebook updates (once per optimizer step) -------------------------------

    @torch.no_grad()
    def _track(self, u: Tensor, indices: Tensor) -> None:
        counts = torch.bincount(indices, minlength=self.num_codes).float()
        self._step_counts = counts if self._step_counts is None else self._step_counts + counts
        if self.kind == "ema":
            sums = torch.zeros(self.num_codes, self.code_dim, device=u.device).index_add_(0, indices, u)
            self._step_sums = sums if self._step_sums is None else self._step_sums + sums
        if self.restart_every:
            pick = torch.linspace(0, u.shape[0] - 1, self.num_codes, device=u.device).round().long()
            self._recent = u[pick].clone()

    @torch.no_grad()
    def after_step(self, step: int, ok: Tensor) -> None:
        """Apply the step's statistics (`step` = optimizer steps taken before it, as in train_step): all-reduce
        them over ranks, count usage, move the EMA codebook, restart dead codes when due. Call on every rank."""
        if self._step_counts is None:
            return  # this step ran no tracked forward (e.g. a frozen quantizer)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        parts = [self._step_counts] + ([self._step_sums.flatten()] if self.kind == "ema" else [])
        packed = torch.cat(parts)
        if world > 1:
            dist.all_reduce(packed)
        counts = packed[: self.num_codes]
        keep = ok.to(counts.dtype)
        self.usage_counts += counts * keep
        self.restart_counts += counts * keep
        if self.kind == "ema":
            sums = packed[self.num_codes:].view(self.num_codes, self.code_dim)
            size = torch.lerp(self.ema_cluster_size, counts, 1 - self.decay)
            embed = torch.lerp(self.ema_embed_sum, sums, 1 - self.decay)
            self.ema_cluster_size.copy_(torch.where(ok, size, self.ema_cluster_size))
            self.ema_embed_sum.copy_(torch.where(ok, embed, self.ema_embed_sum))
            self._refresh_ema_codebook()
        if self.restart_every and (step + 1) % self.restart_every == 0:
            self._restart_dead(step, ok, world)
        self._step_counts = self._step_sums = None

    def _refresh_ema_codebook(self) -> None:
        n = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.epsilon) / (n + self.num_codes * self.epsilon) * n
        codes = self.ema_embed_sum / smoothed.unsqueeze(1)
        self.codebook.copy_(F.normalize(codes, dim=1) if self.l2 else codes)

    def _restart_dead(self, step: int, ok: Tensor, world: int) -> None:
        candidates = self._recent
        if world > 1:
            gathered = [torch.empty_like(candidates) for _ in range(world)]
            dist.all_gather(gathered, candidates.contiguous())
            candidates = torch.cat(gathered)
        # The same choice on every rank, drawn on the device (a CPU draw copied over would wait for the queue).
        g = torch.Generator(device=candidates.device).manual_seed(1_000_003 * (step + 1))
        pick = torch.randint(candidates.shape[0], (self.num_codes,), generator=g, device=candidates.device)
        dead = (self.restart_counts < self.restart_threshold) & ok
        new = candidates[pick]
        if self.kind == "vq":
            self.codebook.data.copy_(torch.where(dead.unsqueeze(1), new.to(self.codebook.dtype), self.codebook.data))
        else:
            size = torch.full_like(self.ema_cluster_size, max(self.restart_threshold, 1.0))
            self.ema_cluster_size.copy_(torch.where(dead, size, self.ema_cluster_size))
            self.ema_embed_sum.copy_(torch.where(dead.unsqueeze(1), new * size.unsqueeze(1), self.ema_embed_sum))
            self._refresh_ema_codebook()
        self.restarts_total += dead.sum()
        self.restart_counts.copy_(torch.where(ok, torch.zeros_like(self.restart_counts), self.restart_counts))

    @torch.no_grad()
    def read_window(self) -> dict[str, float]:
        """Usage, perplexity and restarts of the training steps since the last call (all ranks), then reset.
        Identical on every rank; one host sync (call it on logging steps)."""
        stats = code_statistics(self.usage_counts)
        stats["restarts"] = float(self.restarts_total - self.restarts_read)
        self.restarts_read.copy_(self.restarts_total)
        self.usage_counts.zero_()
        return stats

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, name={self.name}, codes={self.num_codes}, token_dim={self.token_dim}, "
                f"code_dim={self.code_dim}, layout={self.layout}")


def codes_dtype(num_codes: int) -> np.dtype:
    """The integer type code maps are stored in: uint16 up to 65,536 codes, else int32."""
    return np.dtype(np.uint16) if num_codes <= 2**16 else np.dtype(np.int32)


def window_health(model: nn.Module) -> dict[str, float]:
    """`codebook/<name>/{usage,perplexity,entropy_bits,restarts}` of every quantizer over the training steps
    since the last call (read_window: all ranks, then reset); {} for an unquantized model."""
    out = {}
    for q in quantizers(model):
        stats = q.read_window()
        out.update({f"codebook/{q.name}/{k}": v for k, v in stats.items() if k != "tokens"})
    return out


def code_statistics(counts: Tensor) -> dict[str, float]:
    """usage (fraction of codes used), perplexity exp(H) and entropy in bits per token of code counts [K]."""
    counts = counts.double()
    total = counts.sum()
    if total <= 0:
        return {"usage": 0.0, "perplexity": 0.0, "entropy_bits": 0.0, "tokens": 0.0}
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    entropy = entropy.clamp_min(0.0)  # (-0.0 for a single code)
    return {"usage": float((counts > 0).double().mean()), "perplexity": float(entropy.exp()),
            "entropy_bits": float(entropy / math.log(2)), "tokens": float(total)}


class QuantizeBlock(nn.Module):
    """A `quantize` entry of a resnet block list: quantizes the feature map at that point (one token per position,
    its channels as values). VAE.forward collects its loss and indices after each forward."""

    def __init__(self, cfg: QuantizerConfig, channels: int, name: str, codebook_size: int = 0):
        super().__init__()
        self.quantizer = Quantizer(cfg, channels, "channels", name, codebook_size)
        self.pending: list[QuantizerOutput] = []

    def forward(self, x: Tensor) -> Tensor:
        out = self.quantizer(x, track=self.training and torch.is_grad_enabled())
        self.pending.append(out)
        return out.z_q


def keep_eager(model: nn.Module) -> None:
    """Before torch.compile(model): the codebook bookkeeping (Quantizer._track, which keeps this step's
    statistics on the module) and the quantize blocks (their `pending` list) run eagerly, with graph breaks
    around them; everything else compiles. Done per instance, on demand: torch.compiler.disable imports
    torch._dynamo (~1.4 s), which a process that never compiles should not pay for."""
    for m in model.modules():
        if isinstance(m, Quantizer):
            m._track = torch.compiler.disable(m._track)
        elif isinstance(m, QuantizeBlock):
            m.forward = torch.compiler.disable(m.forward)


def quantizers(model: nn.Module) -> list[Quantizer]:
    """Every Quantizer in a model (bottleneck and blocks), in module order."""
    return [m for m in model.modules() if isinstance(m, Quantizer)]
