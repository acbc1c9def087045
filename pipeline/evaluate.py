"""Evaluation: the validation pass used during training, and `python -m pipeline.evaluate` for a finished run.

    python -m pipeline.evaluate runs/demo                                  # latest checkpoint, EMA weights, val split
    python -m pipeline.evaluate runs/demo --checkpoint step-000200 --iwae-k 256
    python -m pipeline.evaluate runs/demo --shards shards/other --split train data.val_batch_size_per_device=128
    accelerate launch --multi_gpu --num_processes 8 -m pipeline.evaluate runs/flowers

Every rank reads a disjoint part of the split (pipeline.data.val_batches gives each sample to exactly
one rank x worker), accumulates per-sample SUMS in pipeline.split_metrics.SplitMetrics (the one
accumulator of both the validation pass and evaluate(), so each figure is computed in one place), and the
sums are all-reduced once at the end. No collective runs per batch, so ranks with uneven sample counts
never hang, and each sample counts once.
The random z of a sample is drawn from a generator seeded by its key (pipeline.inference.key_noise), so
the stochastic bounds do not depend on how many processes share the work either.

What `evaluate()` reports (RUN_DIR/eval/metrics.json, and the run's W&B summary under eval/):

- psnr, ssim: of decode(mu) (the posterior mean: deterministic) against the input, both in [0, 1];
  PSNR = 10 log10(1 / MSE) per image, capped at PSNR_CAP_DB for a perfect reconstruction, then averaged
  over images; SSIM with kornia's conventions (11 px Gaussian window; pipeline.objective.image.ssim)
  averaged over pixels, then images.
- perceptual: the recipe's loss.perceptual distance (pipeline.objective.perceptual.PerceptualDistance) of decode(mu).
  Computed when the recipe names real backbone weights (loss.perceptual.weights = hub or a file),
  whatever loss.perceptual.weight is, since a distance in random features means nothing; --perceptual on
  forces it, --perceptual off skips it (null in the file).
- neg_elbo_nats = E_x[-E_q log p(x|z) + KL(q(z|x) || p(z))]: nats per image, KL in closed form, the
  reconstruction term averaged over the same K samples of z the IWAE bound uses;
  elbo_bits_per_dim = neg_elbo_nats / (C*H*W*ln 2).
- iwae_bits_per_dim: the importance-weighted bound (Burda et al. 2016) with K samples,
  -log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x), in bits per sub-pixel; iwae_bits_per_dim_by_k gives the
  same bound for group sizes 1, 2, 4, ... K computed from the same K samples (averaged over the K/k
  disjoint groups), which is weakly decreasing in k by Jensen's inequality, exactly, not only on average.
- Likelihoods, so that bits/dim mean what they mean in the literature (8-bit data, 256 values per
  sub-pixel, a normalised discrete distribution over them): gaussian -> discretised Gaussian with the
  learned sigma; mse -> discretised Gaussian, l1 -> discretised Laplace, both with the maximum-likelihood
  fixed scale (one scalar: RMS / mean absolute error of one posterior sample per image over the evaluated
  split, or --log-scale); bce -> the continuous Bernoulli log-likelihood (the DCGAN dog VAE's BCE), which is not a
  distribution over 8-bit values, so its bits/dim are flagged as not comparable.
- kl_per_dim (nats, a list), mu_variance_per_dim, active_units (Cov_x E_q[z_d] > ACTIVE_UNIT_THRESHOLD),
  inactive_dims, and a latent-usage plot (eval/latent_usage.png: KL and Var(mu) per dimension).
- lpips, rfid (with local weights files: metrics.* / --lpips-weights, --inception-weights; otherwise null
  and one line says which file to fetch) and sharpness_ratio (no weights) of decode(mu) against the input:
  pipeline.metrics says which implementation each number comes from. rFID's real-image statistics are the
  split's cached reference (rfid_reference: its file; pipeline.fid_stats), computed on first use.
- latent/probe_accuracy (a cross-validated ridge probe of the class from the pooled posterior means; with
  latent/probe_chance beside it), latent/hf_energy_ratio (the share of the latent's spatial energy above
  0.25 cycles per position; null for a vector latent), and per channel the mean and std of mu and of one
  posterior sample z (latent/mu_channel_mean, ..., and their extremes): pipeline.split_metrics defines them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

if __package__ in (None, ""):  # run as a file (`accelerate launch pipeline/evaluate.py ...`)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from accelerate import Accelerator

from pipeline import durable, faults, fid_stats, media
from pipeline.config import ConfigError, exit_on_config_error
from pipeline.inference import check_shards, key_noise, load_run, split_batches
from pipeline.metrics import ReconstructionMetrics
from pipeline.objective.kl import kl_per_dim
from pipeline.objective.likelihood import (GAUSSIAN_LOGVAR_RANGE, fixed_log_scale, iwae_bounds,
                                           iwae_group_sizes, log_importance_weights)
from pipeline.objective.perceptual import PerceptualDistance
from pipeline.split_metrics import (ACTIVE_UNIT_THRESHOLD, PSNR_CAP_DB, SplitMetrics,  # noqa: F401 (re-exported)
                                    psnr_per_image, ssim_per_image, to_unit_range)
from pipeline.tracking import dataset_artifact, load_or_create_run_id, model_artifact, staging_in, use_artifact


@torch.no_grad()
def validate(model, loss_fn, augment, batches: Iterable, accelerator, step: int,
             field_metrics: ReconstructionMetrics | None = None) -> dict:
    """Mean reconstruction / KL / -ELBO / PSNR / SSIM over the split, KL per latent dimension and active units,
    the latent diagnostics (val/latent/*: linear-probe accuracy, high-frequency energy ratio, per-channel
    mean/std summaries; pipeline.split_metrics), and with `field_metrics` (metrics.in_validation)
    val/sharpness_ratio, val/lpips, val/rfid of the sampled reconstructions.

    `model` is the EMA (or raw) VAE, `loss_fn` the training VAELoss (its terms at `step`). Sampling z uses
    the global RNG; callers that need an untouched RNG stream wrap this in torch.random.fork_rng().
    """
    device = accelerator.device
    was_training = model.training
    model.eval()
    acc = SplitMetrics(model, device, field_metrics)
    for batch in batches:
        x = augment(batch.images.to(device, non_blocking=True), train=False)
        n = x.shape[0]
        out = model(x)
        result = loss_fn(out, x, step)
        # Loss terms are batch means: weight them by the batch size so the split mean is exact.
        for name, value in result.terms.items():
            if name != "beta":  # a schedule value, not a property of the data
                acc.add(f"loss/{name}", value.reshape(1).expand(n))
        # -ELBO with the discretised likelihood; l1/mse use this batch's maximum-likelihood scale (the
        # standalone `python -m pipeline.evaluate` fits one scale over the whole split instead).
        kind = loss_fn.cfg.recon
        log_scale = fixed_log_scale(kind, result.terms["recon"]) if kind in ("l1", "mse") else None
        if out.logvar is not None:  # a quantized bottleneck has no ELBO
            acc.add("neg_elbo_nats", loss_fn.neg_elbo(out, x, log_scale))
        acc.update(x, out.recon[:n], out.mu, out.logvar, z=out.z[:n], labels=getattr(batch, "labels", None),
                   keys=getattr(batch, "keys", None), out=out)
        faults.kill_at("validation", step, accelerator.is_main_process)  # tests: a kill mid-validation
    figures = acc.compute(accelerator)  # collective: every rank, once, at the end of the pass
    model.train(was_training)
    if figures["count"] == 0:
        return {"count": 0}
    # W&B gets the scalars as val/<name>, and a bar chart of each per-dimension list; the field metrics'
    # descriptions (lpips_net, rfid_features) and the per-channel lists stay in pipeline.evaluate's file.
    metrics = {f"val/{k}": v for k, v in figures.items()
               if k not in VALIDATION_OMITS and isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics["count"] = figures["count"]
    metrics.update({k: v for k, v in figures.items() if k in ("kl_per_dim", "mu_variance_per_dim")
                    or k.startswith("code_frequency_")})
    return metrics


VALIDATION_OMITS = {"count", "lpips_net", "rfid_features", "latent/probe_samples"}
"""SplitMetrics figures validation does not log as val/ scalars (descriptions and counts, not measurements)."""


# --------------------------------------------------------------------------------------------
# Evaluating a trained run (python -m pipeline.evaluate)
# --------------------------------------------------------------------------------------------


LIKELIHOODS = {
    "gaussian": ("discretized_gaussian", True, "discretised Gaussian, learned sigma"),
    "mse": ("discretized_gaussian", True, "discretised Gaussian, maximum-likelihood fixed sigma"),
    "l1": ("discretized_laplace", True, "discretised Laplace, maximum-likelihood fixed scale"),
    "bce": ("continuous_bernoulli", False, "continuous Bernoulli (BCE): not a distribution over 8-bit values"),
}
"""loss.recon -> (likelihood name, bits/dim comparable with the literature, description)."""


@torch.no_grad()
def log_weights(run, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, keys: list[str], k: int,
                 seed: int, log_scale: float | None, decode_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(x|z_k) [K, B], log importance weights [K, B]) for K posterior samples per image, decoded in
    chunks of about `decode_batch` images. Sample k of image i uses key_noise(key_i)[k]."""
    b = x.shape[0]
    eps = key_noise(keys, run.model.latent_shape, k, seed, x.device)  # [K, B, *latent]
    std = torch.exp(0.5 * logvar)
    per_chunk = max(1, decode_batch // b)
    log_px, log_w = [], []
    for k0 in range(0, k, per_chunk):
        e = eps[k0:k0 + per_chunk]
        kc = e.shape[0]
        z = (mu.unsqueeze(0) + e * std.unsqueeze(0)).reshape(kc * b, *mu.shape[1:])  # sample-major
        lp = run.loss.log_px_z(run.model.decode(z), x, log_scale).view(kc, b)
        lw = log_importance_weights(lp, z, mu, logvar)
        log_px.append(lp.double())
        log_w.append(lw.double())
    return torch.cat(log_px), torch.cat(log_w)


@torch.no_grad()
def evaluate(run, batches: Callable[[], Iterable], accelerator, iwae_k: int = 64, seed: int = 0,
             log_scale: float | None = None, perceptual=None, decode_batch: int = 256,
             field_metrics: ReconstructionMetrics | None = None) -> dict:
    """The metrics of the module docstring over every sample `batches()` yields on this rank, summed over ranks.

    run: a pipeline.inference.LoadedRun on accelerator.device. batches: returns a fresh iterator of Batch
    (called twice when an l1/mse likelihood needs its scale fitted first). perceptual: a
    pipeline.objective.perceptual.PerceptualDistance or None. field_metrics: LPIPS / rFID / sharpness
    (pipeline.metrics), None for all three null. Every rank returns the same dict."""
    if iwae_k < 1:
        raise ConfigError(f"--iwae-k must be at least 1, got {iwae_k}")
    model, device = run.model, run.device
    kind = run.cfg.loss.recon
    sizes = iwae_group_sizes(iwae_k)
    quantized = getattr(model, "quantizer", None) is not None  # no ELBO: codebook statistics instead
    fit_scale = kind in ("l1", "mse") and log_scale is None and not quantized
    acc = SplitMetrics(model, device, field_metrics)
    has_codes = bool(acc.codes.quantizers)
    error_sum = torch.zeros(2, dtype=torch.float64, device=device)  # the l1/mse scale fit: sum |e| or e^2, count
    start = time.perf_counter()

    def likelihood(x, mu, logvar, keys, scale):
        log_px, log_w = log_weights(run, x, mu, logvar, keys, iwae_k, seed, scale, decode_batch)
        recon_nll = -log_px.mean(0)
        acc.add("recon_nll_nats", recon_nll)
        acc.add("neg_elbo_nats", recon_nll + kl_per_dim(mu, logvar).double().sum(1))
        for g, bound in iwae_bounds(log_w).items():
            acc.add(f"iwae_{g}", -bound)

    # Pass 1: reconstruction metrics, latent statistics (and the likelihood, unless a scale must be fitted).
    for batch in batches():
        x = run.to_model_range(batch.images)
        keys = list(batch.keys)
        out = None
        if has_codes:  # the forward collects every quantizer's indices (eval mode: nothing is updated)
            out = model(x)
            mu, logvar = out.mu, out.logvar
            recon = out.recon if quantized else model.decode(mu)
        else:
            mu, logvar = model.encode(x)
            recon = model.decode(mu)
        # One posterior sample per image (sample 0 of its key noise, as the IWAE pass's first) for the
        # per-channel statistics of z and the scale fit; a quantized latent's sample is its codes.
        z = out.z[:x.shape[0]] if quantized else mu + key_noise(keys, model.latent_shape, 1, seed, device)[0] * \
            torch.exp(0.5 * logvar)
        acc.update(x, recon, mu, logvar, z=z, labels=batch.labels, keys=keys, out=out)
        if perceptual is not None:
            acc.add("perceptual", perceptual(recon, x, reduction="none"))
        if quantized:
            continue
        if fit_scale:  # the error of one posterior sample per image, as the training term
            err = model.decode(z).float() - x
            error_sum[0] += (err.abs() if kind == "l1" else err.square()).flatten(1).sum(1).double().sum()
            error_sum[1] += x.shape[0]
        else:
            likelihood(x, mu, logvar, keys, log_scale)

    scale = log_scale
    if fit_scale:  # one small all-reduce, then pass 2 with the scale every rank now shares
        fitted = accelerator.reduce(error_sum, "sum") if accelerator.num_processes > 1 else error_sum
        error, count = fitted.tolist()
        scale = fixed_log_scale(kind, error / max(1.0, count * run.pixel_dims))
        for batch in batches():
            x = run.to_model_range(batch.images)
            mu, logvar = model.encode(x)
            likelihood(x, mu, logvar, list(batch.keys), scale)

    m = acc.compute(accelerator)  # collective: every rank
    if m["count"] == 0:
        raise ConfigError("the evaluated split holds no readable samples; check --shards and --split")
    name, comparable, description = LIKELIHOODS[kind]
    if field_metrics is None:
        m.update({"lpips": None, "lpips_net": None, "rfid": None, "rfid_features": None, "rfid_reference": None,
                  "sharpness_ratio": None})
    m.setdefault("perceptual", None)
    m.update({"pixel_dims": run.pixel_dims, "psnr_cap_db": PSNR_CAP_DB})
    if quantized:
        m["quantizer"] = model.quantizer.kind
    else:
        m.update({
            "iwae_k": iwae_k,
            "iwae_nats": m[f"iwae_{iwae_k}"],
            "iwae_bits_per_dim": acc.bits_per_dim(m[f"iwae_{iwae_k}"]),
            "iwae_bits_per_dim_by_k": {str(g): acc.bits_per_dim(m.pop(f"iwae_{g}")) for g in sizes},
            "likelihood": name,
            "likelihood_description": description,
            "likelihood_log_scale": _log_scale_used(run, scale),
            "bits_per_dim_comparable": comparable,
        })
    m["seconds"] = time.perf_counter() - start
    return m


def _log_scale_used(run, fitted: float | None) -> float | list[float] | None:
    """log sigma / log b of the likelihood in output-range units (per channel for a per-channel gaussian)."""
    kind = run.cfg.loss.recon
    if kind in ("l1", "mse"):
        return fitted
    if kind == "gaussian":
        log_sigma = (0.5 * run.loss.gaussian_logvar.detach().float().clamp(*GAUSSIAN_LOGVAR_RANGE)).cpu()
        return log_sigma.item() if log_sigma.numel() == 1 else log_sigma.tolist()
    return None


def latent_usage_plot(metrics: dict, latent_shape: tuple[int, ...]) -> np.ndarray:
    """KL per latent dimension (top) over Var(mu) per dimension with the active-unit threshold noted (bottom).
    A spatial latent C x h x w is summarised per channel (summed KL, mean variance)."""
    kl = np.asarray(metrics["kl_per_dim"], dtype=np.float64)
    var = np.asarray(metrics["mu_variance_per_dim"], dtype=np.float64)
    unit = "dim"
    if len(latent_shape) > 1:
        kl = kl.reshape(latent_shape[0], -1).sum(1)
        var = var.reshape(latent_shape[0], -1).mean(1)
        unit = "channel"
    top = media.bar_chart(kl, title=f"KL per latent {unit} (nats)")
    bottom = media.bar_chart(var, title=f"Var_x(mu) per {unit}; active > {ACTIVE_UNIT_THRESHOLD}: "
                                        f"{metrics['active_units']}/{metrics['latent_dims']} dims")
    width = max(top.shape[1], bottom.shape[1])
    pad = [np.pad(a, ((0, 0), (0, width - a.shape[1]), (0, 0)), constant_values=255) for a in (top, bottom)]
    return np.concatenate(pad)


def log_to_wandb(run, metrics: dict, plot: np.ndarray) -> str | None:
    """The metrics into the training run's W&B summary as eval/<name> (same run id, resumed), and the plot
    as the eval/latent_usage image. tracking.mode decides offline/online/disabled. Returns the run id."""
    cfg = run.cfg
    if cfg.tracking.mode == "disabled":
        return None
    import wandb  # here: a second or two to import, and only needed when tracking is on

    run_id = load_or_create_run_id(run.run_dir)
    try:
        wb = wandb.init(project=cfg.tracking.project, entity=cfg.tracking.entity or None,
                        name=cfg.run.name or cfg.name or run.run_dir.name, id=run_id, resume="allow",
                        dir=str(run.run_dir), mode=cfg.tracking.mode,
                        settings=wandb.Settings(console="off", save_code=False, reinit="finish_previous"))
    except Exception as e:  # noqa: BLE001 - wandb raises many types when it cannot start
        raise ConfigError(f"tracking.mode is {cfg.tracking.mode} but W&B could not start "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); metrics.json was written; "
                          f"pass tracking.mode=offline or tracking.mode=disabled") from None
    # Lineage: the evaluated weights as the run's model artifact (the same weights are the same version
    # the training logged, W&B versions by content) and the shard set, both as this evaluation's inputs.
    with staging_in(run.run_dir):
        use_artifact(wb, model_artifact(run.run_dir, run_id, run.model.state_dict(), {"step": run.step}),
                     cfg.tracking.mode)
        use_artifact(wb, dataset_artifact(metrics["shards"]), cfg.tracking.mode)
    wb.summary.update({f"eval/{k}": v for k, v in metrics.items() if v is not None})
    caption = ("KL and Var(mu) per latent dimension" if "kl_per_dim" in metrics
               else "fraction of the tokens given each code, most used first, per quantizer")
    wb.log({"eval/latent_usage": wandb.Image(plot, caption=caption)})
    wb.finish()
    wandb.teardown()  # wait for wandb-core to flush the offline file before we exit (see pipeline.tracking)
    return run_id


def build_perceptual(run, choice: str):
    """The perceptual distance the metrics use, or None (see the module docstring for auto/on/off)."""
    p = run.cfg.loss.perceptual
    if choice == "off" or (choice == "auto" and p.weights == "none"):
        return None
    try:
        return PerceptualDistance(p, run.model.output_range, run.model.in_channels).to(run.device)
    except ConfigError as e:
        raise ConfigError(f"{str(e).rstrip('.')}; or pass --perceptual off to evaluate without it") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.evaluate",
                                description="Evaluate a trained run: PSNR, SSIM, perceptual, -ELBO, IWAE bits/dim, "
                                            "active units. Writes RUN_DIR/eval/metrics.json and the W&B summary.")
    p.add_argument("run_dir", help="the run folder training wrote (runs/<run.name>)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="changes to the run's config.yaml for this evaluation (data.*, tracking.mode, ...)")
    p.add_argument("--checkpoint", help="checkpoint name under RUN_DIR/checkpoints (e.g. step-000500) or a folder; "
                                        "default: the latest")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA (default) or raw training weights")
    p.add_argument("--iwae-k", type=int, default=64, help="importance samples per image for the IWAE bound")
    p.add_argument("--shards", help="evaluate these shards instead of the run's data.shards")
    p.add_argument("--split", choices=("val", "train"), default="val")
    p.add_argument("--perceptual", choices=("auto", "on", "off"), default="auto",
                   help="auto: when loss.perceptual.weights names real weights (hub or a file)")
    p.add_argument("--log-scale", type=float, help="fixed log scale (output-range units) of the l1/mse "
                                                   "likelihood instead of the maximum-likelihood fit")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-sample noise of z")
    p.add_argument("--image-size", type=int, help="the shards' SIZE, only needed when the run's shards are gone")
    p.add_argument("--decode-batch", type=int, default=256, help="images per decoder call in the IWAE pass")
    p.add_argument("--lpips-weights", metavar="FILE", help="torchvision ImageNet weights of the LPIPS backbone "
                   "(alexnet-owt-7be5be79.pth for the default alex); = metrics.lpips_backbone_weights=FILE")
    p.add_argument("--inception-weights", metavar="FILE", help="torch-fidelity's InceptionV3 weights for rFID "
                   "(weights-inception-2015-12-05-6726825d.pth); = metrics.inception_weights=FILE")
    p.add_argument("--out", help="metrics file (default RUN_DIR/eval/metrics.json)")
    return p


@exit_on_config_error
def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_intermixed_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"command line: {bad[0]!r} is not a key=value override (options start with --)")
    accelerator = Accelerator()
    run = load_run(args.run_dir, args.overrides, args.checkpoint, args.weights, accelerator.device, args.image_size)
    shards = args.shards or run.cfg.data.shards
    check_shards(shards, run.image_size, run.cfg)
    perceptual = build_perceptual(run, args.perceptual)
    if args.lpips_weights:
        run.cfg.metrics.lpips_backbone_weights = args.lpips_weights
    if args.inception_weights:
        run.cfg.metrics.inception_weights = args.inception_weights
    field_metrics = fid_stats.field_metrics(run.cfg, shards, args.split, accelerator)  # rFID's cached reference
    rank, world = accelerator.process_index, accelerator.num_processes
    metrics = evaluate(run, lambda: split_batches(run.cfg, shards, args.split, rank, world), accelerator,
                       args.iwae_k, args.seed, args.log_scale, perceptual, args.decode_batch, field_metrics)
    info = {"run_dir": str(run.run_dir), "checkpoint": run.checkpoint.name, "step": run.step,
            "weights": run.weights, "shards": str(shards), "split": args.split, "world_size": world,
            "image_size": run.image_size, "latent_shape": list(run.model.latent_shape), "seed": args.seed,
            "perceptual_backbone": (f"{run.cfg.loss.perceptual.backbone} ({run.cfg.loss.perceptual.weights})"
                                    if perceptual is not None else None),
            "lpips_weights": run.cfg.metrics.lpips_backbone_weights or None,
            "inception_weights": run.cfg.metrics.inception_weights or None}
    metrics = {**info, **metrics}
    if accelerator.is_main_process:
        out = Path(args.out) if args.out else run.run_dir / "eval" / "metrics.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        durable.write_json(out, metrics, indent=1)
        plot = (codebook_plot(metrics) if "kl_per_dim" not in metrics
                else latent_usage_plot(metrics, run.model.latent_shape))
        media.save_png(plot, out.with_name("latent_usage.png"))
        run_id = log_to_wandb(run, metrics, plot)
        print(_report(metrics, out, run_id))
    accelerator.wait_for_everyone()
    return metrics


def _fmt(value: float | None, how) -> str:
    """A figure with how it was computed (the LPIPS net, the Inception feature layer), or why it is missing."""
    return "skipped (no weights file)" if value is None else f"{value:.4f} ({how})"


def codebook_plot(metrics: dict) -> np.ndarray:
    """The code frequencies of each quantizer (most used first), stacked: eval/latent_usage.png of a quantized run."""
    charts = []
    for key in sorted(k for k in metrics if k.startswith("code_frequency_")):
        name = key[len("code_frequency_"):]
        usage = metrics[f"codebook/{name}/usage"]
        charts.append(media.bar_chart(metrics[key], title=f"{name}: fraction of tokens per code, most used first; "
                                                          f"usage {usage:.1%}"))
    width = max(c.shape[1] for c in charts)
    return np.concatenate([np.pad(c, ((0, 0), (0, width - c.shape[1]), (0, 0)), constant_values=255) for c in charts])


def _codebook_lines(m: dict) -> list[str]:
    names = sorted(k[len("code_frequency_"):] for k in m if k.startswith("code_frequency_"))
    return [f"  codebook {n}: usage {m[f'codebook/{n}/usage']:.1%}   perplexity {m[f'codebook/{n}/perplexity']:.1f}"
            f"   {m[f'codebook/{n}/entropy_bits']:.2f} bits/token of {m[f'codebook/{n}/bits_per_token']:.2f}"
            for n in names]


def _latent_line(m: dict) -> str:
    """The latent diagnostics in one line, with why a figure is missing."""
    probe = (f"probe accuracy {m['latent/probe_accuracy']:.3f} (chance {m['latent/probe_chance']:.3f})"
             if m["latent/probe_accuracy"] is not None else "probe: n/a (fewer than two classes, or no labels)")
    hf = (f"hf energy ratio {m['latent/hf_energy_ratio']:.3f}" if m["latent/hf_energy_ratio"] is not None
          else "hf energy ratio: n/a (vector latent)")
    z = f"z channel std {m['latent/z_std_min']:.3f}..{m['latent/z_std_max']:.3f}"
    return f"  latent: {probe}   {hf}   {z}, |mean| <= {m['latent/z_mean_abs_max']:.3f}"


def _report(m: dict, out: Path, run_id: str | None) -> str:
    if "neg_elbo_nats" not in m:  # a quantized bottleneck
        inception = f"inception-{m['rfid_features']}"
        return "\n".join([
            f"{m['run_dir']} {m['checkpoint']} ({m['weights']}), {m['split']} split of {m['shards']}: {m['count']} images",
            f"  psnr {m['psnr']:.2f} dB   ssim {m['ssim']:.4f}   quantizer {m['quantizer']}",
            f"  lpips {_fmt(m['lpips'], m['lpips_net'])}   rfid {_fmt(m['rfid'], inception)}",
            _latent_line(m),
            *_codebook_lines(m),
            f"  wrote {out}" + (f" and W&B run {run_id} (summary eval/*)" if run_id else "")])
    perceptual = "off" if m["perceptual"] is None else f"{m['perceptual']:.4f}"
    comparable = "" if m["bits_per_dim_comparable"] else " (not comparable: continuous likelihood)"
    inception = f"inception-{m['rfid_features']}"
    lines = [
        f"{m['run_dir']} {m['checkpoint']} ({m['weights']}), {m['split']} split of {m['shards']}: {m['count']} images",
        f"  psnr {m['psnr']:.2f} dB   ssim {m['ssim']:.4f}   perceptual {perceptual}",
        f"  lpips {_fmt(m['lpips'], m['lpips_net'])}   rfid {_fmt(m['rfid'], inception)}"
        f"   sharpness ratio {m['sharpness_ratio']:.3f} (1 = as much fine detail as the inputs)",
        f"  -elbo {m['neg_elbo_nats']:.1f} nats = {m['elbo_bits_per_dim']:.4f} bits/dim   "
        f"iwae(k={m['iwae_k']}) {m['iwae_bits_per_dim']:.4f} bits/dim{comparable}",
        f"  likelihood {m['likelihood_description']}",
        f"  kl {m['kl_nats']:.2f} nats   active units {m['active_units']}/{m['latent_dims']}",
        _latent_line(m),
        *_codebook_lines(m),
        f"  wrote {out}" + (f" and W&B run {run_id} (summary eval/*)" if run_id else ""),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
    sys.exit(0)
