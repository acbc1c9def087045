"""The reconstruction metrics the field compares beside PSNR/SSIM: LPIPS, rFID and a weight-free sharpness ratio.

    metrics = ReconstructionMetrics.build(cfg.metrics, device)   # one printed line per metric it must skip
    for ...: metrics.update(recon01, target01)                    # [B, 3, H, W] in [0, 1]
    figures = metrics.results(accelerator)                        # one all-reduce; the same dict on every rank

Where the numbers come from (implementations of "LPIPS" and "FID" differ, up to 2x for FID; compare only
numbers computed the same way, on the same number of images):

- lpips: the `lpips` package (Zhang et al. 2018, v0.1 linear heads, which ship in its wheel), backbone
  metrics.lpips_net (alex by default, as that package recommends for evaluation), images in [-1, 1],
  spatially averaged, then averaged over images. Needs images of at least 32 px (alex).
- rfid: the Frechet distance between InceptionV3 pool features (2048-d) of the reconstructions and of
  their own inputs, over the evaluated split; the inputs' statistics come from the split's cached reference
  (pipeline.fid_stats: computed once per shards, split and weights file) when one is attached, and the
  evaluation checks it scored exactly those images (count and uint8 pixel sum). Features: torch-fidelity's FeatureExtractorInceptionV3 (the
  TensorFlow FID network and weights, with TF 1.x's bilinear resize to 299 px) on uint8 images, as
  torch-fidelity, pytorch-fid and the original TF code compute FID. Statistics: mean and unbiased
  covariance (numpy.cov's), accumulated as float64 sums (n, sum f, sum f f^T) on every rank and
  all-reduced once, so 1 and N processes give the same number. Formula: torch-fidelity's
  fid_statistics_to_metric. FID is biased upwards for small n: `count` is reported with it.
- sharpness_ratio (no weights): high-frequency spectral energy of the reconstructions divided by that of
  their inputs, summed over the split. Per image: luma (Rec. 601), minus its mean, times a 2-D Hann window
  (so the image border adds no spurious high frequencies), |FFT|^2, summed over spatial frequencies of
  radius >= SHARPNESS_CUTOFF cycles/pixel (half of Nyquist). 1 = as much fine detail as the inputs,
  < 1 blurrier (a VAE trained on pixel losses), > 1 added high-frequency content (noise, GAN artefacts).

Weights are local files (nothing downloads): metrics.lpips_backbone_weights is torchvision's ImageNet file of
the backbone, metrics.inception_weights torch-fidelity's converted Inception file. Both are read with
torch.load(weights_only=True) (or as .safetensors) and checked key by key against the network; a metric
without a file is skipped with one line naming the file and how to fetch it.
"""

from __future__ import annotations

import contextlib
import io
import math
import pickle
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from pipeline.config import ConfigError, MetricsConfig

SHARPNESS_CUTOFF = 0.25
"""Spatial frequency (cycles per pixel; Nyquist is 0.5) from which energy counts as high-frequency."""

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
FID_FEATURE_LAYERS = (64, 192, 768, 2048)
"""torch-fidelity's InceptionV3 feature layers (its feature_layer_fid); 2048 (pool3) is the FID everybody reports."""

LPIPS_BACKBONES = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}
"""metrics.lpips_net -> the torchvision weights enum whose IMAGENET1K_V1 file the backbone needs."""


# --------------------------------------------------------------------------------------------
# Sharpness: weight-free
# --------------------------------------------------------------------------------------------


def high_frequency_energy(images01: Tensor, cutoff: float = SHARPNESS_CUTOFF) -> Tensor:
    """Per-image spectral energy [B] (float64) of the Hann-windowed, mean-free luma at radius >= cutoff.
    Signals [B, C, L] and volumes [B, C, D, H, W]: the same over 1 or 3 axes, channels averaged."""
    x = images01.double()
    if x.dim() != 4:
        return _high_frequency_energy_nd(x.mean(1), cutoff)
    if x.shape[1] == 3:
        luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    else:
        luma = x.mean(1)
    h, w = luma.shape[-2:]
    luma = luma - luma.mean((-2, -1), keepdim=True)
    window = torch.outer(torch.hann_window(h, periodic=False, dtype=torch.float64, device=x.device),
                         torch.hann_window(w, periodic=False, dtype=torch.float64, device=x.device))
    power = torch.fft.fft2(luma * window).abs().square()
    fy = torch.fft.fftfreq(h, dtype=torch.float64, device=x.device)
    fx = torch.fft.fftfreq(w, dtype=torch.float64, device=x.device)
    high = (fy[:, None].square() + fx[None, :].square()).sqrt() >= cutoff
    return (power * high).sum((-2, -1)) / (h * w)


def _high_frequency_energy_nd(x: Tensor, cutoff: float) -> Tensor:
    """high_frequency_energy of mean-free [B, *spatial] over all its spatial axes (separable Hann window)."""
    axes = tuple(range(1, x.dim()))
    x = x - x.mean(axes, keepdim=True)
    radius2 = torch.zeros((), dtype=torch.float64, device=x.device)
    for i, n in enumerate(x.shape[1:]):
        view = [1] * (x.dim() - 1)
        view[i] = n
        x = x * torch.hann_window(n, periodic=False, dtype=torch.float64, device=x.device).view(1, *view)
        radius2 = radius2 + torch.fft.fftfreq(n, dtype=torch.float64, device=x.device).square().view(view)
    power = torch.fft.fftn(x, dim=axes).abs().square()
    return (power * (radius2.sqrt() >= cutoff)).flatten(1).sum(1) / math.prod(x.shape[1:])


# --------------------------------------------------------------------------------------------
# FID from streamed sufficient statistics
# --------------------------------------------------------------------------------------------


class FeatureMoments:
    """n, sum f and sum f f^T of feature vectors, float64, on one rank (`add`), flattened for one all-reduce."""

    def __init__(self, dims: int, device: torch.device | str = "cpu"):
        self.dims = dims
        self.n = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(dims, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dims, dims, dtype=torch.float64, device=device)

    def add(self, features: Tensor) -> None:
        f = features.detach().double().reshape(-1, self.dims)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def flat(self) -> Tensor:
        return torch.cat([self.n.reshape(1), self.sum, self.outer.flatten()])

    @classmethod
    def from_flat(cls, flat: Tensor, dims: int) -> "FeatureMoments":
        m = cls(dims, flat.device)
        m.n, m.sum, m.outer = flat[0].clone(), flat[1:1 + dims].clone(), flat[1 + dims:].reshape(dims, dims).clone()
        return m

    def mean_cov(self) -> tuple[Tensor, Tensor]:
        """Mean and unbiased covariance (numpy.cov's n - 1), float64."""
        n = self.n.item()
        mean = self.sum / n
        cov = (self.outer - n * torch.outer(mean, mean)) / (n - 1)
        return mean, (cov + cov.T) / 2  # exactly symmetric, as numpy.cov's


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigenvalues below 0 -> 0)."""
    w, v = torch.linalg.eigh(matrix)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(a: FeatureMoments, b: FeatureMoments) -> float:
    """FID = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1 S2)^(1/2), in float64.

    tr (S1 S2)^(1/2) is computed as tr (S1^(1/2) S2 S1^(1/2))^(1/2) (the same number: S1 S2 is similar to
    that symmetric PSD matrix) with two symmetric eigendecompositions, instead of pytorch-fid's
    scipy.linalg.sqrtm or torch-fidelity's general eigenvalues of S1 S2: same value (tests compare against
    sqrtm), several times faster on CPU at 2048 dimensions, and no complex round-off for singular covariances."""
    (mu1, s1), (mu2, s2) = a.mean_cov(), b.mean_cov()
    root = _psd_sqrt(s1)
    inner = root @ s2 @ root
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_covmean)


# --------------------------------------------------------------------------------------------
# Weights files: local, checked, never unpickled
# --------------------------------------------------------------------------------------------


def read_weights(path: str | Path, key: str) -> dict[str, Tensor]:
    """A state dict from a .safetensors file or a torch file read with weights_only=True; ConfigError otherwise."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{key} file {p} does not exist; give the path of the downloaded weights file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p), device="cpu")
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key} file {p} is not a plain tensor state dict that loads with weights_only=True "
                          f"({first}); use the original weights file") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"{key} file {p} does not hold a state dict of tensors; use the original weights file")
    return state


def _load_checked(module: torch.nn.Module, state: dict[str, Tensor], key: str, path: str, what: str) -> None:
    """Load `state` into `module` only if it has exactly the module's tensors (names and shapes)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        problems = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                    f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                    f"{len(wrong)} of another shape (e.g. {wrong[0]})" if wrong else ""]
        raise ConfigError(f"{key} file {path} does not hold {what}: tensors "
                          f"{', '.join(p for p in problems if p)}; use the original weights file")
    module.load_state_dict(state, strict=True)


def _fetch_hint(key: str, url: str, flag: str) -> str:
    name = url.rsplit("/", 1)[-1]
    return (f"on a machine with internet `curl -LO {url}`, copy {name} here and pass {flag} {name} "
            f"(or {key}={name})")


def lpips_backbone_url(net: str) -> str:
    import torchvision.models as tvm

    return getattr(tvm, LPIPS_BACKBONES[net]).IMAGENET1K_V1.url  # a constant: nothing is fetched


def load_lpips(net: str, backbone_weights: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    """lpips.LPIPS(net) with its v0.1 linear heads from the wheel and the backbone from a local torchvision file."""
    import lpips

    if net not in LPIPS_BACKBONES:
        raise ConfigError(f"metrics.lpips_net is {net!r} but must be one of {', '.join(LPIPS_BACKBONES)}")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # torchvision's deprecation of `pretrained=`, which lpips 0.1.4 passes
        # pretrained=False: no heads loaded by lpips (its torch.load is not weights_only); pnet_rand=True: the
        # backbone is built without torchvision's download. Both are loaded below from local files.
        model = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False)
    heads_file = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    heads = read_weights(heads_file, "the lpips wheel's linear heads")
    _load_checked(model.lins, _heads_for(heads), "lpips heads", str(heads_file), f"LPIPS {net} heads")
    backbone = read_weights(backbone_weights, "metrics.lpips_backbone_weights")
    # lpips keeps torchvision's `features` modules under their indices, split into slices:
    # net.slice2.3.weight is torchvision's features.3.weight.
    renamed = {name: backbone.get("features." + name.split(".", 1)[1]) for name in model.net.state_dict()}
    missing = [n for n, v in renamed.items() if v is None]
    if missing:
        raise ConfigError(f"metrics.lpips_backbone_weights file {backbone_weights} does not hold torchvision's "
                          f"{LPIPS_BACKBONES[net].split('_')[0]} ImageNet weights (no features."
                          f"{missing[0].split('.', 1)[1]}); fetch {lpips_backbone_url(net)}")
    _load_checked(model.net, renamed, "metrics.lpips_backbone_weights", backbone_weights,
                  f"torchvision's {LPIPS_BACKBONES[net].split('_')[0]} weights")
    return model.eval().requires_grad_(False).to(device)


def _heads_for(heads: dict[str, Tensor]) -> dict[str, Tensor]:
    """The wheel's head keys (lin0.model.1.weight) as keys of model.lins (0.model.1.weight)."""
    return {k[len("lin"):]: v for k, v in heads.items() if k.startswith("lin")}


def load_inception(weights: str, device: torch.device | str = "cpu", features: int = 2048) -> torch.nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 (feature layer `features`) with weights from a local file.

    torch-fidelity 0.4.0 reads a given path with torch.load(weights_only=False) and otherwise downloads, so
    the file is read here (weights_only=True) and handed to its constructor in place of the download."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    state = read_weights(weights, "metrics.inception_weights")
    original = fe.load_state_dict_from_url

    def local_file(url, *args, **kwargs):
        return state

    fe.load_state_dict_from_url = local_file
    try:
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", [str(features)])
    except RuntimeError as e:  # load_state_dict(strict=True) of another network's tensors
        first = str(e).strip().splitlines()[0][:160]
        raise ConfigError(f"metrics.inception_weights file {weights} does not hold torch-fidelity's InceptionV3 "
                          f"weights ({first}); fetch {INCEPTION_URL}") from None
    finally:
        fe.load_state_dict_from_url = original
    return model.eval().to(device)


# --------------------------------------------------------------------------------------------
# The accumulator evaluate() and validation feed
# --------------------------------------------------------------------------------------------


class ReconstructionMetrics:
    """Accumulates LPIPS (when its weights are given), rFID moments (likewise) and the sharpness sums per rank."""

    def __init__(self, lpips_model: torch.nn.Module | None, inception: torch.nn.Module | None,
                 device: torch.device | str, lpips_net: str = "alex", fid_features: int = 2048, reference=None):
        self.lpips_model, self.inception, self.device, self.lpips_net = lpips_model, inception, device, lpips_net
        self.fid_features = fid_features
        # The real images' moments of the whole split (pipeline.fid_stats.Reference), or None: computed here.
        self.reference = reference
        # n, lpips, hf(recon), hf(input), the inputs' uint8 values summed (checked against the reference's)
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)
        self.fid = ([FeatureMoments(fid_features, device) for _ in range(1 if reference is not None else 2)]
                    if inception is not None else None)

    @classmethod
    def build(cls, cfg: MetricsConfig, device: torch.device | str,
              say: Callable[[str], None] | None = print) -> "ReconstructionMetrics":
        """Load what cfg names; for each metric without weights, `say` one line naming the file to fetch."""
        lpips_model = inception = None
        if cfg.lpips_backbone_weights:
            lpips_model = load_lpips(cfg.lpips_net, cfg.lpips_backbone_weights, device)
        elif say:
            say(f"lpips: skipped, no metrics.lpips_backbone_weights; "
                + _fetch_hint("metrics.lpips_backbone_weights", lpips_backbone_url(cfg.lpips_net), "--lpips-weights"))
        if cfg.inception_weights:
            if cfg.fid_features not in FID_FEATURE_LAYERS:
                raise ConfigError(f"metrics.fid_features is {cfg.fid_features} but must be one of "
                                  f"{', '.join(map(str, FID_FEATURE_LAYERS))} (2048 is the FID papers report)")
            inception = load_inception(cfg.inception_weights, device, cfg.fid_features)
        elif say:
            say("rfid: skipped, no metrics.inception_weights; "
                + _fetch_hint("metrics.inception_weights", INCEPTION_URL, "--inception-weights"))
        return cls(lpips_model, inception, device, cfg.lpips_net, cfg.fid_features)

    def fresh(self) -> "ReconstructionMetrics":
        """An empty accumulator sharing the loaded networks (one per validation pass)."""
        return ReconstructionMetrics(self.lpips_model, self.inception, self.device, self.lpips_net, self.fid_features,
                                     self.reference)

    @torch.no_grad()
    def update(self, recon01: Tensor, target01: Tensor) -> None:
        recon01, target01 = recon01.float().clamp(0, 1), target01.float().clamp(0, 1)
        self.sums[0] += recon01.shape[0]
        self.sums[2] += high_frequency_energy(recon01).sum()
        self.sums[3] += high_frequency_energy(target01).sum()
        if recon01.dim() != 4 and (self.lpips_model is not None or self.fid is not None):
            raise ConfigError("LPIPS and rFID work on 2-D images only; leave metrics.lpips_backbone_weights and "
                              "metrics.inception_weights empty for signals and volumes")
        if self.lpips_model is not None:
            try:
                self.sums[1] += self.lpips_model(recon01 * 2 - 1, target01 * 2 - 1).double().sum()
            except RuntimeError as e:  # its pooling layers run out of pixels on tiny images
                raise ConfigError(f"LPIPS ({self.lpips_net}) cannot run on {recon01.shape[-1]} px images "
                                  f"({str(e).splitlines()[0][:120]}); it needs at least 32 px, so leave "
                                  f"metrics.lpips_backbone_weights empty for these images") from None
        if self.fid is not None:
            # The inputs' features only without a reference; zip stops at the reconstructions otherwise.
            for moments, images in zip(self.fid, (recon01, target01)):
                uint8 = (images * 255).round().to(torch.uint8)  # what a PNG of the image holds
                moments.add(self.inception(uint8)[0])  # [B, fid_features] float32
            # Integers below 2**53: exact in float64 whatever the order, so comparable with the reference's sum.
            self.sums[4] += (target01 * 255).round().double().sum()

    def results(self, accelerator=None) -> dict:
        """lpips, rfid (None when skipped) and sharpness_ratio over every rank's images: one all-reduce."""
        flat = torch.cat([self.sums] + ([m.flat() for m in self.fid] if self.fid else []))
        if accelerator is not None and accelerator.num_processes > 1:
            flat = accelerator.reduce(flat, "sum")
        n, lpips_sum, hf_recon, hf_input, pixel_sum = flat[:5].tolist()
        rfid = None
        if self.fid is not None and n >= 2:
            d = self.fid_features
            size = 1 + d + d * d
            recon = FeatureMoments.from_flat(flat[5:5 + size], d)
            real = (FeatureMoments.from_flat(flat[5 + size:5 + 2 * size], d) if self.reference is None
                    else self._real(n, pixel_sum))
            rfid = frechet_distance(recon, real)
        return {
            "lpips": lpips_sum / n if self.lpips_model is not None and n else None,
            "lpips_net": self.lpips_net if self.lpips_model is not None else None,
            "rfid": rfid,
            "rfid_features": self.fid_features if self.fid is not None else None,
            "rfid_reference": (str(self.reference.path) if self.reference is not None and self.reference.path
                               else None),
            "sharpness_ratio": hf_recon / hf_input if hf_input > 0 else math.nan,
        }

    def _real(self, n: float, pixel_sum: float) -> FeatureMoments:
        """The reference's moments, once the evaluated inputs are known to be its images (count and pixel sum)."""
        ref = self.reference
        if int(n) != int(ref.moments.n.item()) or int(pixel_sum) != ref.pixel_sum:
            where = ref.path or "computed at the start of this run"
            raise ConfigError(f"rFID: the {int(n)} evaluated images are not the {int(ref.moments.n.item())} images of "
                              f"the reference statistics ({where}): count or pixel sum differs, so a shard changed "
                              f"since; check the shards (`make verify`) and delete that file to recompute it")
        return ref.moments
