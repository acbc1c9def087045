"""The one accumulator of a pass over a split, shared by training's validation pass and `pipeline.evaluate`.

    acc = SplitMetrics(model, device, field_metrics)              # field_metrics: pipeline.metrics, or None
    for batch in batches:
        acc.update(x, recon, mu, logvar, z=z, labels=batch.labels, keys=batch.keys, out=out)
        acc.add("neg_elbo_nats", per_sample)                      # what only the caller knows how to compute
    figures = acc.compute(accelerator)                            # the same dict on every rank

Every quantity is a float64 SUM over samples (or over samples x latent positions) on each rank; compute()
all-reduces the sums (one vector, plus one small reduction for the probe's held-out hits) and divides by
the global counts only then, so 1 and N processes give the same figures however unevenly the samples
are spread (never a mean of per-rank means). No collective runs per batch: a rank that got no batch still
takes part in compute() with zeros.

What compute() returns (unprefixed; validation logs the scalars as val/<name>, evaluate writes them all):

- count; psnr, ssim of `recon` against `x` (both in [0, 1]: PSNR capped at PSNR_CAP_DB, SSIM with kornia's
  conventions, per sample then averaged); the mean of every name given to add() (loss/<term>,
  neg_elbo_nats, ...), and elbo_bits_per_dim = neg_elbo_nats / (values per sample * ln 2) when
  neg_elbo_nats was added (bits_per_dim() converts any other bound the same way).
- kl_nats and kl_per_dim (closed-form KL of q(z|x) to N(0, I), Gaussian latents only), mu_variance_per_dim,
  active_units (Var_x E[z_d | x] > ACTIVE_UNIT_THRESHOLD), latent_dims, inactive_dims.
- codebook/<name>/{usage, perplexity, entropy_bits, bits_per_token, tokens} and code_frequency_<name> for
  every quantizer (pipeline.models.quantize), over the whole split.
- lpips, lpips_net, rfid, rfid_features, sharpness_ratio: pipeline.metrics.ReconstructionMetrics, when given.
- latent/*: the latent diagnostics below.

Latent diagnostics:

- latent/probe_accuracy: how linearly decodable the class is from the latent. Features: the posterior mean
  mu pooled over its spatial positions (a vector latent as it is), standardised; classifier: ridge
  regression onto one-hot labels (sklearn's RidgeClassifier), penalty PROBE_RIDGE per sample, solved in
  closed form in float64; accuracy by PROBE_FOLDS-fold cross-validation, each sample's fold fixed by the
  hash of its key (probe_fold), so each labelled sample is predicted once by a probe fitted on the other
  folds. The fit needs only the sums X^T X, X^T Y and counts per fold (all-reduced); the predictions run
  where the samples are. latent/probe_chance is the accuracy of always answering the most frequent class:
  the level to compare with (1 / classes for balanced classes). None (not logged) without at least two
  classes among the labelled samples (unlabelled shards have label -1) or without sample keys.
- latent/hf_energy_ratio: how much of the latent's spatial variation is fine-grained (what EQ-VAE's
  equivariance regularisation reduces): per sample, each channel of mu minus its spatial mean, |n-D FFT|^2
  over the spatial axes (2-D for images, 1-D signals, 3-D volumes), the energy at radius > LATENT_HF_CUTOFF
  cycles per latent position divided by all of it, pooled over channels; then averaged over samples. 0 for a latent
  without spatial variation, 1 for a +-1 checkerboard. None for a vector latent: it has no spatial axes,
  so it has no spectrum.
- latent/mu_channel_mean, mu_channel_std, z_channel_mean, z_channel_std (lists, one entry per channel; a
  vector latent's dimensions count as channels): mean and standard deviation over samples and positions of
  the posterior mean mu and of one posterior sample z; and their summaries latent/mu_mean_abs_max,
  mu_std_min, mu_std_max, z_mean_abs_max, z_std_min, z_std_max. A latent a diffusion model is to be trained
  on should have z channels near mean 0 and std 1; a channel whose mu std is near 0 carries nothing.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import torch
from torch import Tensor

from pipeline.models.quantize import code_statistics, quantizers
from pipeline.objective.image import ssim as ssim_map
from pipeline.objective.kl import kl_per_dim

PSNR_CAP_DB = 100.0
"""PSNR of a perfect reconstruction (MSE = 0) is reported as this value instead of infinity."""

ACTIVE_UNIT_THRESHOLD = 0.01
"""A latent dimension is active when Cov_x(E_q[z_d | x]) > 0.01 (Burda et al. 2016)."""

PROBE_FOLDS = 5
"""Cross-validation folds of the linear probe; a sample's fold is the hash of its key modulo this."""

PROBE_RIDGE = 1e-2
"""Ridge penalty of the linear probe per training sample, on standardised features."""

LATENT_HF_CUTOFF = 0.25
"""Spatial frequency (cycles per latent position; Nyquist is 0.5) above which latent energy is high-frequency.
Strictly above: on a 4 x 4 latent the 0.25 ring is the lowest non-zero frequency and stays low."""


# --------------------------------------------------------------------------------------------
# Per-sample figures
# --------------------------------------------------------------------------------------------


def to_unit_range(images: Tensor, output_range: tuple[float, float]) -> Tensor:
    low, high = output_range
    return ((images.float() - low) / (high - low)).clamp(0, 1)


def psnr_per_image(recon01: Tensor, target01: Tensor) -> Tensor:
    """PSNR in dB per image for images in [0, 1], capped at PSNR_CAP_DB."""
    mse = (recon01 - target01).pow(2).flatten(1).mean(1)
    psnr = 10 * torch.log10(1.0 / mse.clamp_min(1e-30))
    return psnr.clamp(max=PSNR_CAP_DB)


def ssim_per_image(recon01: Tensor, target01: Tensor, window: int = 11) -> Tensor:
    """Images, signals and volumes (pipeline.objective.image.ssim: kornia's SSIM without a host sync)."""
    return ssim_map(recon01, target01, window).flatten(1).mean(1)


def latent_hf_ratio(mu: Tensor, cutoff: float = LATENT_HF_CUTOFF) -> Tensor:
    """[B] float64 fraction of each sample's mean-free latent energy above `cutoff` (see the module docstring).
    mu: [B, C, *spatial] with 1 to 3 spatial axes."""
    x = mu.double()
    axes = tuple(range(2, x.dim()))
    x = x - x.mean(axes, keepdim=True)  # the channel's offset is reported by latent/mu_channel_mean instead
    power = torch.fft.fftn(x, dim=axes).abs().square().sum(1)  # [B, *spatial], channels pooled
    radius2 = torch.zeros((), dtype=torch.float64, device=x.device)
    for i, n in enumerate(x.shape[2:]):
        view = [1] * len(axes)
        view[i] = n
        radius2 = radius2 + torch.fft.fftfreq(n, dtype=torch.float64, device=x.device).square().view(view)
    high = (power * (radius2.sqrt() > cutoff)).flatten(1).sum(1)
    total = power.flatten(1).sum(1)
    return torch.where(total > 0, high / total.clamp_min(1e-300), torch.zeros_like(total))


def probe_fold(key: str) -> int:
    """The probe's cross-validation fold of a sample: fixed by its key, whichever rank or batch it lands in."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % PROBE_FOLDS


# --------------------------------------------------------------------------------------------
# The linear probe, from per-fold sufficient statistics
# --------------------------------------------------------------------------------------------


class LinearProbe:
    """Pooled posterior means, labels and folds of this rank's labelled samples, kept on the device until
    compute() (N x D float64: 8 bytes per channel per sample): the fit's sums need the global class count,
    known only once every rank has read, and the held-out predictions need the samples themselves."""

    def __init__(self, device: torch.device | str):
        self.device = device
        self.features: list[Tensor] = []  # [B, D] float64
        self.labels: list[Tensor] = []  # [B] int64, >= 0
        self.folds: list[Tensor] = []  # [B] int64

    def update(self, mu: Tensor, labels: Tensor | None, keys: Sequence[str] | None) -> None:
        if labels is None or keys is None or len(keys) != mu.shape[0]:
            return  # no labels, or no keys to fix the folds by: the probe cannot be cross-validated
        pooled = mu.detach().double().flatten(2).mean(2) if mu.dim() > 2 else mu.detach().double()
        labels = labels.to(pooled.device).long()
        keep = labels >= 0  # -1: the shards have no classes
        self.features.append(pooled[keep])
        self.labels.append(labels[keep])
        folds = torch.tensor([probe_fold(k) for k in keys], dtype=torch.int64).to(pooled.device)
        self.folds.append(folds[keep])

    def max_label(self) -> int:
        labels = torch.cat(self.labels) if self.labels else torch.zeros(0, dtype=torch.int64)
        return int(labels.max()) if labels.numel() else -1  # a host sync, once, at the end of the pass

    def _local(self, dims: int) -> tuple[Tensor, Tensor, Tensor]:
        if not self.features:
            return (torch.zeros(0, dims, dtype=torch.float64, device=self.device),
                    torch.zeros(0, dtype=torch.int64, device=self.device),
                    torch.zeros(0, dtype=torch.int64, device=self.device))
        return torch.cat(self.features), torch.cat(self.labels), torch.cat(self.folds)

    def statistics(self, dims: int, classes: int) -> Tensor:
        """Flat float64 [PROBE_FOLDS * (D+1) * (D+1+K)] of this rank: per fold X~^T [X~, Y] with X~ = [x, 1]
        and Y one-hot (the bias column holds the counts: n, sum x and the class counts)."""
        x, y, folds = self._local(dims)
        x1 = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64, device=x.device)], 1)
        joint = torch.cat([x1, torch.nn.functional.one_hot(y, classes).double()], 1) if classes else x1
        stats = torch.zeros(PROBE_FOLDS, dims + 1, dims + 1 + classes, dtype=torch.float64, device=x.device)
        for f in range(PROBE_FOLDS):
            rows = folds == f
            stats[f] = x1[rows].T @ joint[rows]
        return stats.flatten()

    def hits(self, stats: Tensor, dims: int, classes: int) -> Tensor:
        """float64 [2] on the CPU: (probe hits, samples predicted) among this rank's samples, each predicted
        by the fit of the global `stats` of the other folds."""
        stats = stats.reshape(PROBE_FOLDS, dims + 1, dims + 1 + classes).cpu()  # tiny: solved on the CPU
        x, y, folds = (t.cpu() for t in self._local(dims))
        out = torch.zeros(2, dtype=torch.float64)
        for f in range(PROBE_FOLDS):
            rows = folds == f
            fit = _ridge(stats.sum(0) - stats[f], dims)
            if fit is None or not bool(rows.any()):
                continue
            mean, std, weights, bias = fit
            scores = ((x[rows] - mean) / std) @ weights + bias
            out[0] += (scores.argmax(1) == y[rows]).sum()
            out[1] += int(rows.sum())
        return out


def _class_counts(stats: Tensor, dims: int, classes: int) -> Tensor:
    """Labelled samples per class [K], from the flat statistics of LinearProbe.statistics."""
    return stats.reshape(PROBE_FOLDS, dims + 1, dims + 1 + classes)[:, dims, dims + 1:].sum(0)


def _ridge(stats: Tensor, dims: int) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """The ridge classifier of summed statistics [D+1, D+1+K] (see LinearProbe.statistics): (mean, std,
    weights [D, K], bias [K]) on standardised features, or None without samples."""
    n = stats[dims, dims].item()
    if n < 1:
        return None
    sum_x, gram = stats[:dims, dims], stats[:dims, :dims]
    class_counts, xy = stats[dims, dims + 1:], stats[:dims, dims + 1:]
    mean = sum_x / n
    cov = gram / n - torch.outer(mean, mean)
    var = cov.diagonal().clamp_min(0)
    # A dimension that does not vary (a dead channel) keeps std 1: it is ~0 after centring and gets no weight.
    std = torch.where(var > 1e-12 * var.max().clamp_min(1e-300), var.sqrt(), torch.ones_like(var))
    corr = cov / torch.outer(std, std)
    cross = (xy - torch.outer(mean, class_counts)) / std[:, None] / n  # E[u y^T], u standardised
    weights = torch.linalg.solve(corr + PROBE_RIDGE * torch.eye(dims, dtype=torch.float64), cross)
    bias = class_counts / n  # the class frequencies: u is centred
    return mean, std, weights, bias


# --------------------------------------------------------------------------------------------
# Code counts
# --------------------------------------------------------------------------------------------


class CodeCounts:
    """Code counts of every quantizer of `model` over a whole pass, summed over ranks once at the end:
    usage, perplexity and bits per token over the split, not per batch (a batch cannot show dead codes)."""

    def __init__(self, model, device: torch.device | str):
        self.quantizers = quantizers(model)
        self.counts = {q.name: torch.zeros(q.num_codes, dtype=torch.float64, device=device) for q in self.quantizers}

    def add(self, out) -> None:
        indices = dict(out.block_indices)
        if out.indices is not None:
            indices["latent"] = out.indices
        for name, idx in indices.items():
            self.counts[name] += torch.bincount(idx.flatten(), minlength=self.counts[name].numel()).double()

    def results(self, counts: dict[str, Tensor]) -> dict:
        """From the summed `counts`: {"codebook/<name>/usage" | perplexity | entropy_bits | bits_per_token |
        tokens: float, "code_frequency_<name>": the code frequencies sorted from the most used (a list)}."""
        out: dict = {}
        for q in self.quantizers:
            c = counts[q.name]
            stats = code_statistics(c)
            stats["bits_per_token"] = math.log2(q.num_codes)  # what an index costs when stored uncompressed
            out.update({f"codebook/{q.name}/{k}": v for k, v in stats.items()})
            total = c.sum().clamp_min(1)
            out[f"code_frequency_{q.name}"] = (c.sort(descending=True).values / total).float().cpu().tolist()
        return out


# --------------------------------------------------------------------------------------------
# The accumulator
# --------------------------------------------------------------------------------------------


class SplitMetrics:
    """Per-rank float64 sums of one pass over a split; compute() reduces them over ranks (module docstring)."""

    def __init__(self, model, device: torch.device | str, field_metrics=None):
        self.device = device
        self.latent_shape = tuple(model.latent_shape)
        self.values_per_sample = model.values_per_sample
        self.output_range = model.output_range
        self.gaussian = getattr(model, "quantizer", None) is None  # a quantized bottleneck has no KL
        self.spatial = len(self.latent_shape) > 1
        dims, channels = math.prod(self.latent_shape), self.latent_shape[0]
        self.dims, self.channels = dims, channels
        zeros = lambda n: torch.zeros(n, dtype=torch.float64, device=device)  # noqa: E731
        self.count = zeros(())
        self.sums: dict[str, Tensor] = {}  # name -> scalar sum over samples
        self.mu_sum, self.mu_sq_sum, self.kl_sum = zeros(dims), zeros(dims), zeros(dims)
        # Per channel, over samples x positions: sum mu, sum mu^2, sum z, sum z^2, and the positions counted.
        self.channel = zeros((4, channels))
        self.channel_count = zeros(2)
        self.hf_sum = zeros(())
        self.codes = CodeCounts(model, device)
        self.probe = LinearProbe(device)
        self.field = field_metrics.fresh() if field_metrics is not None else None

    def add(self, name: str, per_sample: Tensor) -> None:
        """A caller's own per-sample figure [B] (a loss term, -ELBO, an IWAE bound), averaged over the split."""
        value = per_sample.detach().double().sum()
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    @torch.no_grad()
    def update(self, x: Tensor, recon: Tensor, mu: Tensor, logvar: Tensor | None = None, z: Tensor | None = None,
               labels: Tensor | None = None, keys: Sequence[str] | None = None, out=None) -> None:
        """One batch. x: the inputs and recon: the reconstruction to score, both in the model's output range;
        mu, logvar: the posterior [B, *latent_shape] (logvar None when quantized); z: one posterior sample
        per input (the codes when quantized); labels, keys: for the probe; out: the model's VAEOutput when
        it ran forward (its code indices are counted)."""
        n = x.shape[0]
        r01, t01 = to_unit_range(recon, self.output_range), to_unit_range(x, self.output_range)
        self.count += n
        self.add("psnr", psnr_per_image(r01, t01))
        self.add("ssim", ssim_per_image(r01, t01))
        if self.field is not None:
            self.field.update(r01, t01)
        if out is not None:
            self.codes.add(out)
        flat = mu.detach().flatten(1).double()
        self.mu_sum += flat.sum(0)
        self.mu_sq_sum += flat.square().sum(0)
        if self.gaussian and logvar is not None:
            self.kl_sum += kl_per_dim(mu, logvar).double().sum(0)
        self._channels(0, mu)
        if z is not None:
            self._channels(1, z)
        if self.spatial:
            self.hf_sum += latent_hf_ratio(mu).sum()
        self.probe.update(mu, labels, keys)

    def _channels(self, which: int, latent: Tensor) -> None:
        v = latent.detach().double().reshape(latent.shape[0], self.channels, -1)  # [B, C, positions]
        self.channel[2 * which] += v.sum((0, 2))
        self.channel[2 * which + 1] += v.square().sum((0, 2))
        self.channel_count[which] += v.shape[0] * v.shape[2]

    def bits_per_dim(self, nats: float) -> float:
        """Nats per sample -> bits per value (C*H*W, C*L or C*D*H*W values per sample)."""
        return nats / (self.values_per_sample * math.log(2))

    def compute(self, accelerator=None) -> dict:
        """The figures of the module docstring over every rank's samples. Collective: every rank calls it."""
        world = accelerator.num_processes if accelerator is not None else 1
        names, max_label = sorted(self.sums), self.probe.max_label()
        if world > 1:  # a rank without batches knows no names and no labels: agree on both
            from accelerate.utils import gather_object

            gathered = gather_object([(names, max_label)])
            names = sorted({n for sub, _ in gathered for n in sub})
            max_label = max(m for _, m in gathered)
        classes = max_label + 1
        probe_dims = self.channels if self.spatial else self.dims
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        parts = {
            "count": self.count.reshape(1),
            "sums": torch.stack([self.sums.get(k, zero) for k in names]) if names else zero.reshape(0),
            "mu": self.mu_sum, "mu_sq": self.mu_sq_sum, "kl": self.kl_sum,
            "channel": self.channel.flatten(), "channel_count": self.channel_count, "hf": self.hf_sum.reshape(1),
            **{f"code:{q}": c for q, c in self.codes.counts.items()},
            "probe": self.probe.statistics(probe_dims, classes),
        }
        flat = torch.cat([p.to(self.device) for p in parts.values()])
        if world > 1:
            flat = accelerator.reduce(flat, "sum")
        total = dict(zip(parts, flat.split([p.numel() for p in parts.values()])))
        field = self.field.results(accelerator) if self.field is not None else {}  # its own all-reduce
        n = total["count"].item()  # the one host sync of the figures
        probe_hits, class_counts = None, _class_counts(total["probe"], probe_dims, classes)
        if int((class_counts > 0).sum()) >= 2:  # the same decision on every rank: from the reduced sums
            hits = self.probe.hits(total["probe"], probe_dims, classes).to(self.device)
            probe_hits = accelerator.reduce(hits, "sum") if world > 1 else hits
        if n == 0:
            return {"count": 0}

        figures: dict = {"count": int(n)}
        figures.update({k: v / n for k, v in zip(names, total["sums"].tolist())})
        if "neg_elbo_nats" in figures:
            figures["elbo_bits_per_dim"] = self.bits_per_dim(figures["neg_elbo_nats"])
        mean_mu = total["mu"] / n
        var_mu = (total["mu_sq"] / n - mean_mu.square()).clamp_min(0)
        active = var_mu > ACTIVE_UNIT_THRESHOLD
        if self.gaussian:
            kl = total["kl"] / n
            figures["kl_nats"] = kl.sum().item()
            figures["kl_per_dim"] = kl.float().cpu().tolist()
        figures["active_units"] = int(active.sum().item())
        figures["latent_dims"] = int(var_mu.numel())
        figures["inactive_dims"] = torch.nonzero(~active).flatten().tolist()
        figures["mu_variance_per_dim"] = var_mu.float().cpu().tolist()
        figures.update(self.codes.results({q.name: total[f"code:{q.name}"] for q in self.codes.quantizers}))
        figures.update(field)
        figures.update(self._latent_figures(total, probe_hits, class_counts, n))
        return figures

    def _latent_figures(self, total: dict[str, Tensor], probe_hits: Tensor | None, class_counts: Tensor,
                        n: float) -> dict:
        out: dict = {}
        if probe_hits is not None and probe_hits[1].item() > 0:
            hits, predicted = probe_hits.tolist()
            out["latent/probe_accuracy"] = hits / predicted
            out["latent/probe_chance"] = (class_counts.max() / class_counts.sum()).item()
            out["latent/probe_samples"] = int(predicted)
        else:
            out["latent/probe_accuracy"] = out["latent/probe_chance"] = None
        out["latent/hf_energy_ratio"] = total["hf"].item() / n if self.spatial else None
        channel = total["channel"].reshape(4, self.channels)
        for which, name in enumerate(("mu", "z")):
            m = total["channel_count"][which].item()
            if m == 0:  # no samples of z were given
                continue
            mean = channel[2 * which] / m
            std = (channel[2 * which + 1] / m - mean.square()).clamp_min(0).sqrt()
            out[f"latent/{name}_mean_abs_max"] = mean.abs().max().item()
            out[f"latent/{name}_std_min"] = std.min().item()
            out[f"latent/{name}_std_max"] = std.max().item()
            out[f"latent/{name}_channel_mean"] = mean.float().cpu().tolist()
            out[f"latent/{name}_channel_std"] = std.float().cpu().tolist()
        return out
