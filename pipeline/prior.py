"""The ex-post prior: a Gaussian mixture fitted to the posterior means of training images, to sample from.

A VAE with a weak KL (the demo's 1e-4) reconstructs well, but its aggregate posterior is far from N(0, I),
so decode(z ~ N(0, I)) shows nothing. Fitting a density to the encoder's means after training and sampling
from it instead ("ex-post density estimation", Ghosh et al., From Variational to Deterministic
Autoencoders, ICLR 2020, sec. 4) gives samples that look like the data. It cannot change reconstructions:
the model is only read.

    python -m pipeline.prior runs/demo [--checkpoint step-000400] [--weights ema|raw]   # fit for a checkpoint
    accelerate launch --multi_gpu --num_processes 2 -m pipeline.prior runs/demo          # the same file
    prior = ExpostPrior.load(runs/demo/expost_prior.safetensors); z = prior.sample(64, generator)

Training fits one at every media step (prior.* keys; the last fit is of the final weights) and writes
RUN_DIR/expost_prior.safetensors; `python -m pipeline.sample RUN prior` samples from it by default.

The fit. The posterior means of the first prior.train_samples images of the train split (in shard order,
read identically on every rank), flattened and in float64, sorted by sample key; a mixture of
prior.components Gaussians with full or diagonal covariances, initialised by k-means++ seeding (a generator
seeded with train.seed) and Lloyd iterations, then EM until the mean log-likelihood per sample improves by
less than prior.tolerance nats or prior.max_iterations pass. Each covariance gets prior.ridge x (the mean
per-dimension variance of the data) added to its diagonal: with fewer images per component than latent
dimensions a full covariance is singular without it. Under `accelerate launch` the ranks encode alternate
fixed batches and sum their rows into one array (each row is written by one rank, so the sum is exact);
the main process fits on one CPU thread. The result is the same file bit for bit for any number of
processes and for any thread count.

The file: safetensors of plain float64 tensors `weights` [k], `means` [k, D], `covariances` [k, D, D]
(full) or [k, D] (diag), and one metadata string `expost_prior`: JSON (sorted keys) of the format, covariance,
latent_shape, step, weights and the fit's figures; read without pickle.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

from pipeline import durable
from pipeline.config import ConfigError, PriorConfig
from pipeline.errors import UserError

FILE_NAME = "expost_prior.safetensors"
FORMAT = "pipeline.prior gaussian mixture v1"
META_KEY = "expost_prior"  # the one metadata entry: JSON of the format, covariance, latent_shape and the fit
LLOYD_ITERATIONS = 20  # k-means refinement of the seeding before EM (stops earlier when assignments settle)


# --------------------------------------------------------------------------------------------
# The mixture
# --------------------------------------------------------------------------------------------


@dataclass
class ExpostPrior:
    """A Gaussian mixture over flattened latents, float64 on the CPU."""

    weights: Tensor
    """[k] mixing weights, summing to 1."""
    means: Tensor
    """[k, D]."""
    covariances: Tensor
    """[k, D, D] (full) or [k, D] (diagonal variances)."""
    latent_shape: tuple[int, ...]
    meta: dict = field(default_factory=dict)
    """What was fitted and how: step, weights (ema/raw), samples, iterations, converged, log_likelihood, ..."""

    @property
    def covariance(self) -> str:
        return "full" if self.covariances.dim() == 3 else "diag"

    @property
    def components(self) -> int:
        return int(self.weights.numel())

    def _scales(self) -> Tensor:
        """Cholesky factors [k, D, D] (full) or standard deviations [k, D] (diag)."""
        if self.covariance == "diag":
            return self.covariances.sqrt()
        return torch.linalg.cholesky(self.covariances)

    def sample(self, n: int, generator: torch.Generator, temperature: float = 1.0) -> Tensor:
        """n latents float32 [n, *latent_shape]: a component by its weight, then mean + temperature x
        (its covariance's square root) x N(0, I); all draws from `generator` (CPU)."""
        with one_thread():
            comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
            eps = torch.randn((n, self.means.shape[1]), generator=generator, dtype=torch.float64) * temperature
            scales = self._scales()[comp]
            if self.covariance == "diag":
                z = self.means[comp] + scales * eps
            else:
                z = self.means[comp] + (scales @ eps[:, :, None])[:, :, 0]
        return z.float().reshape(n, *self.latent_shape)

    def log_prob(self, x: Tensor) -> Tensor:
        """log density [N] (nats) of flattened latents x [N, D]."""
        with one_thread():
            return torch.logsumexp(_log_joint(x.double(), self.weights, self.means, self.covariances), dim=1)

    # -- the file ----------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """safetensors, written atomically and durably (pipeline.durable)."""
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        tensors = {"weights": self.weights.contiguous(), "means": self.means.contiguous(),
                   "covariances": self.covariances.contiguous()}
        # One metadata string: safetensors writes its metadata map in hash order, which varies between
        # processes, so several keys would make the same fit a different file.
        meta = {META_KEY: json.dumps({"format": FORMAT, "covariance": self.covariance,
                                      "latent_shape": list(self.latent_shape), **self.meta}, sort_keys=True)}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return durable.write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta),
                                  tmp=path.with_name(f".{path.name}.tmp"), errors=(SafetensorError,))

    @classmethod
    def load(cls, path: str | Path) -> "ExpostPrior":
        """Read a file save() wrote (safetensors: plain tensors and strings, no pickle); UserError otherwise."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, SafetensorError) as e:
            raise UserError(f"{path} is not a readable ex-post prior ({str(e).splitlines()[0]}); fit it again "
                              f"with `python -m pipeline.prior RUN_DIR`") from None
        try:
            meta = json.loads(meta.get(META_KEY, "{}"))
        except ValueError:
            meta = {}
        if meta.get("format") != FORMAT or set(tensors) != {"weights", "means", "covariances"}:
            raise UserError(f"{path} is not an ex-post prior file ({FORMAT}); fit one with "
                              f"`python -m pipeline.prior RUN_DIR`")
        shape = tuple(meta.pop("latent_shape"))
        for k in ("format", "covariance"):
            meta.pop(k)
        w, m, c = (tensors[k].double() for k in ("weights", "means", "covariances"))
        k, d = m.shape
        if w.shape != (k,) or c.shape not in ((k, d), (k, d, d)) or math.prod(shape) != d:
            raise UserError(f"{path} holds arrays of inconsistent shapes ({list(w.shape)}, {list(m.shape)}, "
                              f"{list(c.shape)}, latent {list(shape)}); fit it again")
        return cls(w, m, c, shape, meta)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run on one CPU thread: a float64 matrix product may round differently with another thread count,
    and the fit must not depend on how the process was launched."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# EM
# --------------------------------------------------------------------------------------------


def _log_joint(x: Tensor, weights: Tensor, means: Tensor, covariances: Tensor) -> Tensor:
    """log w_k + log N(x_n | mean_k, cov_k) as [N, k]."""
    n, d = x.shape
    const = d * math.log(2 * math.pi)
    out = torch.empty((n, len(weights)), dtype=torch.float64)
    for k in range(len(weights)):
        diff = x - means[k]
        if covariances.dim() == 2:
            var = covariances[k]
            maha = (diff.square() / var).sum(1)
            logdet = var.log().sum()
        else:
            chol = torch.linalg.cholesky(covariances[k])
            sol = torch.linalg.solve_triangular(chol, diff.T, upper=False)  # L^-1 (x - m): [D, N]
            maha = sol.square().sum(0)
            logdet = 2 * chol.diagonal().log().sum()
        out[:, k] = weights[k].log() - 0.5 * (const + logdet + maha)
    return out


def _m_step(x: Tensor, resp: Tensor, covariance: str, ridge: float) -> tuple[Tensor, Tensor, Tensor]:
    """Weights, means and (ridge-regularised) covariances from responsibilities resp [N, k]."""
    nk = resp.sum(0) + 10 * torch.finfo(torch.float64).eps  # an empty component keeps a finite mean
    means = (resp.T @ x) / nk[:, None]
    if covariance == "diag":
        covs = (resp.T @ x.square()) / nk[:, None] - means.square()
        covs = covs.clamp_min(0) + ridge
    else:
        covs = torch.empty((len(nk), x.shape[1], x.shape[1]), dtype=torch.float64)
        for k in range(len(nk)):
            diff = x - means[k]
            covs[k] = (resp[:, k, None] * diff).T @ diff / nk[k]
            covs[k] = 0.5 * (covs[k] + covs[k].T)  # exactly symmetric for the Cholesky factorisation
            covs[k].diagonal().add_(ridge)
    return nk / nk.sum(), means, covs


def _kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k initial centres: the first uniformly, each next one with probability proportional to its squared
    distance from the nearest centre chosen so far (Arthur & Vassilvitskii 2007)."""
    first = int(torch.randint(len(x), (1,), generator=generator))
    centres = [x[first]]
    d2 = (x - x[first]).square().sum(1)
    for _ in range(1, k):
        if float(d2.sum()) <= 0:  # fewer distinct points than components: repeat one
            nxt = int(torch.randint(len(x), (1,), generator=generator))
        else:
            nxt = int(torch.multinomial(d2 / d2.sum(), 1, generator=generator))
        centres.append(x[nxt])
        d2 = torch.minimum(d2, (x - x[nxt]).square().sum(1))
    return torch.stack(centres)


def _assign(x: Tensor, centres: Tensor) -> Tensor:
    d2 = (x.square().sum(1, keepdim=True) - 2 * x @ centres.T + centres.square().sum(1))
    return d2.argmin(1)


def fit_gmm(x: Tensor, components: int, covariance: str = "full", max_iterations: int = 100,
            tolerance: float = 1e-3, ridge: float = 1e-3, seed: int = 0,
            latent_shape: tuple[int, ...] | None = None) -> ExpostPrior:
    """A Gaussian mixture fitted to the rows of x [N, D] by EM in float64 (the module doc's procedure).
    The same x, settings and seed give the same result bit for bit."""
    if covariance not in ("full", "diag"):
        raise ValueError(f"covariance must be full or diag, got {covariance!r}")
    if x.dim() != 2 or len(x) < components:
        raise ConfigError(f"the ex-post prior needs at least prior.components={components} latents, got "
                          f"{len(x)}; lower prior.components or raise prior.train_samples")
    with one_thread():
        x = x.detach().to("cpu", torch.float64).contiguous()
        g = torch.Generator().manual_seed(seed)
        scale = float(x.var(0, unbiased=False).mean())
        ridge_abs = ridge * (scale if scale > 0 else 1.0)
        centres = _kmeans_plus_plus(x, components, g)
        labels = _assign(x, centres)
        for _ in range(LLOYD_ITERATIONS):
            for k in range(components):
                members = labels == k
                if members.any():
                    centres[k] = x[members].mean(0)
            new = _assign(x, centres)
            if torch.equal(new, labels):
                break
            labels = new
        resp = torch.nn.functional.one_hot(labels, components).double()
        weights, means, covs = _m_step(x, resp, covariance, ridge_abs)
        previous, converged, iterations, ll = -math.inf, False, 0, -math.inf
        for iterations in range(1, max_iterations + 1):
            joint = _log_joint(x, weights, means, covs)  # E-step
            log_norm = torch.logsumexp(joint, dim=1)
            ll = float(log_norm.mean())
            resp = (joint - log_norm[:, None]).exp()
            weights, means, covs = _m_step(x, resp, covariance, ridge_abs)  # M-step
            if abs(ll - previous) < tolerance:
                converged = True
                break
            previous = ll
    meta = {"samples": len(x), "iterations": iterations, "converged": converged,
            "log_likelihood_per_sample": ll, "seed": seed, "ridge": ridge, "tolerance": tolerance}
    return ExpostPrior(weights, means, covs, tuple(latent_shape or (x.shape[1],)), meta)


# --------------------------------------------------------------------------------------------
# Posterior means of training images, on any number of processes
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def posterior_means(model: torch.nn.Module, batches: Iterator, limit: int,
                    to_model_range: Callable[[Tensor], Tensor], rank: int = 0, world_size: int = 1,
                    reduce: Callable[[Tensor], Tensor] | None = None) -> tuple[list[str], Tensor]:
    """(keys, mu float32 [N, *latent]) of the first `limit` samples of `batches`, sorted by key.

    `batches` must yield the same Batches on every rank (a world-size-1 reader); rank r encodes batch j when
    j % world_size == r, so each batch is encoded whole, by one rank, as on one process; `reduce` sums the
    rows over ranks (an all-reduce) so every rank gets them all."""
    keys: list[str] = []
    rows: list[tuple[int, Tensor]] = []  # (first row, mu of that batch) encoded here
    for j, batch in enumerate(batches):
        take = min(len(batch.keys), limit - len(keys))
        if j % world_size == rank:
            mu, _ = model.encode(to_model_range(batch.images[:take]))
            rows.append((len(keys), mu.float()))
        keys += list(batch.keys[:take])
        if len(keys) >= limit:
            break
    if not keys:
        raise UserError("the train split holds no readable samples to fit the ex-post prior on")
    shape = tuple(rows[0][1].shape[1:]) if rows else tuple(model.latent_shape)
    device = rows[0][1].device if rows else next(model.parameters()).device
    mu = torch.zeros((len(keys), *shape), device=device)
    for start, block in rows:
        mu[start:start + len(block)] = block
    if reduce is not None and world_size > 1:
        mu = reduce(mu)  # zeros elsewhere: x + 0 is exact, whatever the order of the sum
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return [keys[i] for i in order], mu.cpu()[order]


def fit_model_prior(model: torch.nn.Module, cfg, to_model_range: Callable[[Tensor], Tensor], accelerator=None,
                    meta: dict | None = None) -> ExpostPrior | None:
    """The ex-post prior of `model` under cfg.prior, from the run's train split; every rank must call it
    (with an accelerator: a collective). Returns the prior on the main process, None on the others and
    for a quantized model (no Gaussian latent)."""
    from pipeline.data import val_batches

    if getattr(model, "quantizer", None) is not None:
        return None
    p: PriorConfig = cfg.prior
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    local = copy.deepcopy(cfg)
    local.data.verify_shards = "size"  # not a sha256 of every train shard at every media step
    batches = val_batches(local, rank=0, world_size=1, num_workers=0, split="train")
    try:
        keys, mu = posterior_means(model, batches, p.train_samples, to_model_range, rank, world,
                                   (lambda t: accelerator.reduce(t, "sum")) if accelerator is not None else None)
    finally:
        batches.close()
    if rank != 0:
        return None
    # a train split smaller than prior.components (tiny test sets) gets one Gaussian per image rather than none
    prior = fit_gmm(mu.flatten(1), min(p.components, len(mu)), p.covariance, p.max_iterations, p.tolerance, p.ridge,
                    cfg.train.seed, tuple(mu.shape[1:]))
    prior.meta.update({"first_key": keys[0], "last_key": keys[-1], **(meta or {})})
    return prior


def fit_during_training(cfg, model: torch.nn.Module, augment, accelerator, step: int, run_dir: Path,
                        weights: str) -> ExpostPrior | None:
    """Training's fit at a media step (every rank calls it): the prior of `model` (the weights media and
    evaluation use, `weights` = ema | raw), saved to run_dir/expost_prior.safetensors by the main process
    and returned there; None elsewhere, when prior.components is 0, and for quantized models."""
    from pipeline.media import evaluating

    if cfg.prior.components == 0:
        return None
    bare = accelerator.unwrap_model(model)
    with evaluating(bare):
        prior = fit_model_prior(bare, cfg, lambda x: augment(x.to(accelerator.device), train=False), accelerator,
                                {"step": step, "weights": weights})
    if prior is not None:
        prior.save(Path(run_dir) / FILE_NAME)
    return prior


# --------------------------------------------------------------------------------------------
# Command line: fit for a checkpoint
# --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.prior", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="the run folder training wrote (runs/<run.name>)")
    p.add_argument("overrides", nargs="*", help="prior.* overrides, e.g. prior.components=20 prior.covariance=diag")
    p.add_argument("--checkpoint", help="checkpoint name (step-000500) or folder; default: the latest")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--out", help=f"output file (default RUN_DIR/{FILE_NAME})")
    return p


def main(argv: list[str] | None = None) -> int:
    from pipeline.errors import exit_on_user_error

    args = _parser().parse_intermixed_args(argv)  # overrides may follow the options

    @exit_on_user_error
    def run() -> int:
        from accelerate import Accelerator

        from pipeline.inference import load_run

        bad = [o for o in args.overrides if not o.startswith("prior.")]
        if bad:
            raise ConfigError(f"only prior.* settings can be changed when fitting a prior, got {bad[0]}")
        accelerator = Accelerator()
        run = load_run(args.run_dir, args.overrides, args.checkpoint, args.weights, accelerator.device)
        prior = fit_model_prior(run.model, run.cfg, run.to_model_range, accelerator,
                                {"step": run.step, "weights": run.weights})
        if accelerator.is_main_process:
            if prior is None:
                raise UserError(f"{args.run_dir} is a quantized model: it has no Gaussian latent to fit a prior to")
            out = prior.save(Path(args.out) if args.out else Path(args.run_dir) / FILE_NAME)
            print(describe(prior) + f"; wrote {out}")
        accelerator.wait_for_everyone()
        return 0

    return run()


def describe(prior: ExpostPrior) -> str:
    m = prior.meta
    return (f"ex-post prior: {prior.components} {prior.covariance}-covariance Gaussians over "
            f"{math.prod(prior.latent_shape)} latent dims from {m.get('samples')} train images "
            f"({m.get('iterations')} EM iterations, {'converged' if m.get('converged') else 'not converged'}, "
            f"{m.get('log_likelihood_per_sample', float('nan')):.1f} nats per image)")


if __name__ == "__main__":
    sys.exit(main())
