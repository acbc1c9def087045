"""The perceptual term: a frozen timm backbone and the channel-normalised feature distance over it.

    backbone, mean, std = build_backbone(cfg.loss.perceptual)   # frozen-ready features_only model
    distance = PerceptualDistance(cfg.loss.perceptual, output_range=(-1, 1))   # what VAELoss adds

`loss.perceptual.weights` says where the weights come from:
- `hub`: timm's pretrained weights (Hugging Face Hub). Tried from the local cache first with the Hub in
  offline mode; only if that fails and the Hub answers within half a second is it downloaded. With no
  network this fails in about a second with one sentence (timm on its own retries for ~47 s).
- a path to a .pth / .pt / .bin / .safetensors file holding a timm-format state dict of the same
  architecture (a classifier head of any size is ignored). Loaded with timm's own
  `pretrained_cfg_overlay=dict(file=path)`, which works offline; before that, the file's tensors are
  checked against the architecture, so a file of another model fails with one sentence instead of
  being half-loaded (timm loads features_only weights non-strictly).
- `none`: random initialisation (tests only; logs a warning).

To get real weights onto an offline cluster: on a machine with internet run
`hf download timm/<model>.<tag> model.safetensors --local-dir weights/<model>` (the error message prints
the exact command), copy the file over and set `loss.perceptual.weights=weights/<model>/model.safetensors`.
Copying a populated Hugging Face cache (~/.cache/huggingface/hub) also works: `hub` then loads from it
without touching the network.

The classifier trainer that makes such a file from your own shards is pipeline/classifier.py.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from pipeline.config import ConfigError, PerceptualConfig
from pipeline.objective.image import to_unit_range

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
HUB_PROBE_TIMEOUT_S = 0.5


# --------------------------------------------------------------------------------------------
# Building the backbone
# --------------------------------------------------------------------------------------------


def build_backbone(cfg: PerceptualConfig, key: str = "loss.perceptual", what: str = "perceptual loss",
                   extra: dict | None = None) -> tuple[nn.Module, tuple[float, ...], tuple[float, ...]]:
    """`timm.create_model(cfg.backbone, features_only=True, out_indices=cfg.layers)` with the weights that
    cfg.weights names -> (model in eval mode with requires_grad False, mean, std), where mean/std are the
    backbone's pretrained_cfg normalisation for [0, 1] RGB input. Raises ConfigError with one sentence.

    key: the recipe section the settings came from (named in errors); what: the term, for the warning;
    extra: keyword arguments for architectures that take them (ViTs: dynamic_img_size), dropped for those
    that do not."""
    import timm

    name = cfg.backbone
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"{key}.backbone {name!r} is not a timm model{hint}")
    layers = tuple(int(i) for i in cfg.layers)
    if not layers:
        raise ConfigError(f"{key}.layers is empty; name at least one feature level, e.g. [1, 2, 3]")
    weights = str(cfg.weights)
    if weights == "none":
        model = _create(name, layers, pretrained=False, key=key, extra=extra)
        log.warning("%s.weights is none: the %s uses a randomly initialised %s "
                    "(only meaningful in tests)", key, what, name)
    elif weights == "hub":
        model = _create_from_hub(name, layers, key, extra)
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"{key}.weights is {weights!r}, which is neither hub, none nor an "
                              f"existing {'/'.join(WEIGHT_SUFFIXES)} file")
        if path.suffix.lower() not in WEIGHT_SUFFIXES:
            raise ConfigError(f"{key}.weights file {path} must end in one of {', '.join(WEIGHT_SUFFIXES)}")
        check_weights_file(name, path, key)
        model = _create(name, layers, pretrained=True, overlay=dict(file=str(path)), key=key, extra=extra)
    model.eval().requires_grad_(False)
    pc = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(float(m) for m in pc.get("mean", timm.data.IMAGENET_DEFAULT_MEAN))
    std = tuple(float(s) for s in pc.get("std", timm.data.IMAGENET_DEFAULT_STD))
    if len(mean) == 1:
        mean, std = mean * 3, std * 3
    return model, mean, std


def _create(name: str, layers: tuple[int, ...], pretrained: bool, overlay: dict | None = None,
            key: str = "loss.perceptual", extra: dict | None = None) -> nn.Module:
    import timm

    kwargs = dict(features_only=True, out_indices=layers)
    if overlay:
        kwargs["pretrained_cfg_overlay"] = overlay
    try:
        if extra:
            try:
                return timm.create_model(name, pretrained=pretrained, **kwargs, **extra)
            except TypeError as e:  # an architecture without these options (a CNN: no dynamic_img_size)
                if "unexpected keyword" not in str(e):
                    raise
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (IndexError, AssertionError, ValueError, TypeError, RuntimeError, NotImplementedError) as e:
        if _is_download_error(e):
            raise
        try:  # say how many levels there are, if the backbone has features at all
            levels = len(timm.create_model(name, pretrained=False, features_only=True).feature_info)
        except Exception:
            raise ConfigError(f"{key}.backbone {name} does not support features_only=True "
                              f"({_first_line(e)}); pick a convolutional timm model such as resnet18") from None
        if any(not -levels <= i < levels for i in layers):
            raise ConfigError(f"{key}.layers {list(layers)} do not fit {name}, which has feature levels "
                              f"0..{levels - 1}") from None
        raise ConfigError(f"timm could not build {name} for the perceptual loss ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _is_download_error(e: BaseException) -> bool:
    return isinstance(e, OSError) or type(e).__module__.startswith(("huggingface_hub", "requests", "urllib", "httpx"))


def check_weights_file(name: str, path: Path, key: str = "loss.perceptual") -> None:
    """Every tensor of architecture `name` except its classifier must be in the file with the same shape;
    and a file written by the classifier trainer must name the same backbone. ConfigError otherwise."""
    import timm
    from timm.models import load_state_dict

    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception as e:
            raise ConfigError(f"{key}.weights file {path} is not a readable safetensors file "
                              f"({_first_line(e)})") from None
        if meta.get("backbone") and meta["backbone"] != name:
            raise ConfigError(f"{key}.weights file {path} holds a {meta['backbone']} but "
                              f"{key}.backbone is {name}; set the backbone to {meta['backbone']}")
    try:
        sd = load_state_dict(str(path))
    except Exception as e:
        raise ConfigError(f"{key}.weights file {path} could not be read as a state dict "
                          f"({_first_line(e)})") from None
    try:
        with torch.device("meta"):  # shapes only: no memory, no init cost
            ref = timm.create_model(name, pretrained=False)
    except Exception:  # a model whose __init__ needs real values
        ref = timm.create_model(name, pretrained=False)
    classifier = (ref.pretrained_cfg or {}).get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    expected = {k: v.shape for k, v in ref.state_dict().items()
                if not k.endswith("num_batches_tracked") and not any(k.startswith(c + ".") for c in classifier)}
    bad = [k for k, shape in expected.items() if k not in sd or tuple(sd[k].shape) != tuple(shape)]
    if bad:
        raise ConfigError(f"{key}.weights file {path} does not fit backbone {name}: {len(bad)} of "
                          f"{len(expected)} tensors are missing or shaped differently (first: {bad[0]}); "
                          f"was it saved from another model?")


@contextlib.contextmanager
def _hf_offline():
    """HF_HUB_OFFLINE for the duration (huggingface_hub reads the variable only at import time)."""
    import huggingface_hub.constants as hf_constants

    old_const, old_env = hf_constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    hf_constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _reachable(url: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Can a TCP connection to url's host (or to the HTTPS proxy, if one is set) be opened within timeout?
    Runs in a daemon thread so that a hanging DNS lookup cannot block longer than timeout either."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlparse(proxy if proxy else url)
    host, port = target.hostname, target.port or (443 if target.scheme in ("https", "") else 80)
    if not host:
        return False
    result: list[bool] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _hf_cached(hub_id: str, filename: str | None) -> bool:
    """Is one of the files timm would load for hub_id in the local Hugging Face cache? (No network, and no
    model is built: deciding this by letting timm try offline costs seconds for large backbones.)"""
    from huggingface_hub import try_to_load_from_cache
    from timm.models._hub import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME, hf_split

    repo, revision = hf_split(hub_id)
    names = [filename] if filename else []
    if filename and filename.endswith(".bin"):
        names.append(filename[:-4] + ".safetensors")
    names += [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
    return any(isinstance(try_to_load_from_cache(repo, n, revision=revision), str) for n in names)


def _create_from_hub(name: str, layers: tuple[int, ...], key: str = "loss.perceptual",
                     extra: dict | None = None) -> nn.Module:
    import timm
    from huggingface_hub import constants as hf_constants
    from timm.models._hub import check_cached_file

    pc = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(pc, "hf_hub_id", None) if pc is not None else None
    url = getattr(pc, "url", None) if pc is not None else None
    if not hub_id and not url:
        raise ConfigError(f"timm has no pretrained weights for {name}; set {key}.weights to a "
                          f"file path or none")
    if hub_id:
        where = f"the Hugging Face Hub ({hub_id})"
        advice = (f"run `hf download {hub_id} model.safetensors --local-dir weights/{name}` on a machine with "
                  f"internet, copy the file over")
        probe_url = hf_constants.ENDPOINT
        if _hf_cached(hub_id, getattr(pc, "hf_hub_filename", None)):
            try:
                with _hf_offline():  # from the cache, without a single network request
                    return _create(name, layers, pretrained=True, key=key, extra=extra)
            except ConfigError:
                raise
            except Exception as e:  # e.g. an incomplete cache entry: try the network below
                log.info("%s weights could not be loaded from the local Hugging Face cache (%s)", name,
                         _first_line(e))
    else:
        where = f"{url}"
        advice = f"download {url} on a machine with internet, copy the file over"
        probe_url = url
        if check_cached_file(url):
            return _create(name, layers, pretrained=True, key=key, extra=extra)
    if not _reachable(probe_url):
        raise ConfigError(
            f"{key}.weights=hub needs the pretrained {name} weights from {where}, which cannot be "
            f"reached and are not in the local cache: {advice} and set {key}.weights to the "
            f"file's path (or use none for a random backbone)")
    try:
        return _create(name, layers, pretrained=True, key=key, extra=extra)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{key}.weights=hub could not download the {name} weights from {where} "
                          f"({_first_line(e)}); {advice} and set {key}.weights to its path") from None


# --------------------------------------------------------------------------------------------
# Perceptual distance
# --------------------------------------------------------------------------------------------


class PerceptualDistance(nn.Module):
    """Distance between channel-normalised feature maps of a frozen timm backbone (LPIPS without the
    learned linear layers): for each feature level l with weight w_l,

        f_hat = f / (||f||_2 over channels + 1e-10)                      (unit vectors, like LPIPS)
        d_l   = mean over (image, h, w) of
                sum_c (f_hat_r - f_hat_t)^2            distance: l2 -- LPIPS without its linear layers, in [0, 4]
                sum_c |f_hat_r - f_hat_t| / sqrt(C_l)  distance: l1 -- the L1 norm scaled to the L2 norm's scale:
                                                       <= ||f_hat_r - f_hat_t||_2 <= 2 (Cauchy-Schwarz), equal to
                                                       it when the difference is spread evenly over channels,
                                                       so the value does not grow with the layer's width
        d     = sum_l w_l * d_l.

    Inputs in the model's output range are converted to [0, 1], then normalised with the backbone's own
    pretrained_cfg mean/std; 1-channel images are repeated to RGB. Target features are computed under
    no_grad; gradients flow through the frozen backbone into the reconstruction.

    The backbone is NOT a registered submodule: it stays out of parameters() (so no optimizer or DDP ever
    sees it) and out of state_dict() (checkpoints do not carry tens of MB of frozen weights; it is rebuilt
    from loss.perceptual.weights when the loss is built). `.to()/.cuda()/.cpu()` of this module or of any
    parent move it along (see `_apply`); dtype conversions (.half(), .to(bfloat16)) do not touch it: it stays
    float32 and runs in bf16/fp16 under autocast. It is always in eval mode, whatever .train() says.
    """

    def __init__(self, cfg: PerceptualConfig, output_range: tuple[float, float], image_channels: int = 3,
                 key: str = "loss.perceptual", what: str = "perceptual loss", extra: dict | None = None):
        super().__init__()

        if image_channels not in (1, 3):
            raise ConfigError(f"{key} needs 1- or 3-channel images, got model.in_channels={image_channels}")
        if cfg.distance not in ("l1", "l2"):
            raise ConfigError(f"{key}.distance is {cfg.distance!r} but must be l1 or l2")
        if cfg.layer_weights and len(cfg.layer_weights) != len(cfg.layers):
            raise ConfigError(f"{key}.layer_weights needs one weight per entry of {key}.layers")
        backbone, mean, std = build_backbone(cfg, key, what, extra)
        backbone.eval().requires_grad_(False)
        object.__setattr__(self, "backbone", backbone)  # plain attribute: not registered (see class doc)
        object.__setattr__(self, "_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        object.__setattr__(self, "_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.name = cfg.backbone
        self.weights_source = cfg.weights
        self.distance = cfg.distance
        self.layer_weights = [float(w) for w in (cfg.layer_weights or [1.0] * len(cfg.layers))]
        self.output_range = (float(output_range[0]), float(output_range[1]))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        device = fn(torch.empty(0)).device  # where .to()/.cuda()/.cpu() sends tensors; dtype is ignored
        self.backbone.to(device)
        object.__setattr__(self, "_mean", self._mean.to(device))
        object.__setattr__(self, "_std", self._std.to(device))
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self

    def extra_repr(self) -> str:
        return (f"backbone={self.name} (weights: {self.weights_source}; frozen, not in parameters/state_dict), "
                f"distance={self.distance}, layer_weights={self.layer_weights}")

    def features(self, x01: Tensor) -> list[Tensor]:
        """Images in [0, 1] [N, C, H, W] -> channel-normalised float32 feature maps, one per layer."""
        if x01.shape[1] == 1:
            x01 = x01.expand(-1, 3, -1, -1)
        x = (x01.float() - self._mean) / self._std
        feats = self.backbone(x)
        return [f / (f.float().norm(dim=1, keepdim=True) + 1e-10) for f in (ff.float() for ff in feats)]

    def forward(self, recon: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        """recon [L*B, C, H, W] (sample-major), target [B, C, H, W], both in the output range -> the distance:
        a scalar (reduction='mean', averaged over images and samples)
        or per reconstruction [L*B] (reduction='none')."""
        recon = to_unit_range(recon, self.output_range)
        target = to_unit_range(target, self.output_range)
        b = target.shape[0]
        reps = recon.shape[0] // b
        # The backbone runs under the caller's autocast, if any (bf16 convolutions on fp32 weights).
        with torch.no_grad():
            ft = self.features(target)
        fr = self.features(recon)
        per_image = recon.new_zeros(recon.shape[0], dtype=torch.float32)
        for w, a, t in zip(self.layer_weights, fr, ft):
            diff = a.view(reps, *t.shape) - t.unsqueeze(0)
            d = diff.abs().sum(2) / math.sqrt(t.shape[1]) if self.distance == "l1" else diff.square().sum(2)
            per_image = per_image + w * d.flatten(2).mean(2).flatten()
        return per_image.mean() if reduction == "mean" else per_image
