"""The per-dimension building blocks: one factory per layer kind, indexed by model.spatial_dims.

    conv(2) is nn.Conv2d, conv(1) nn.Conv1d, conv(3) nn.Conv3d; the same for conv_transpose,
    batch_norm and max_pool. interpolate_mode(dims) is the (bi/tri)linear mode of that many axes.

The architectures call these instead of naming nn.Conv2d, so one definition builds 1-D signals
(audio, sensor series: [B, C, L]), images ([B, C, H, W]) and volumes ([B, C, D, H, W]). For 2-D they
return exactly the classes the architectures used before, so parameter names, counts and state_dict
keys are unchanged.
"""

from __future__ import annotations

from torch import nn

SPATIAL_DIMS = (1, 2, 3)

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_MAX_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_LINEAR_MODE = {1: "linear", 2: "bilinear", 3: "trilinear"}

CONV_TYPES = tuple(_CONV.values()) + tuple(_CONV_T.values())
BATCH_NORM_TYPES = tuple(_BATCH_NORM.values())


def conv(dims: int) -> type[nn.Module]:
    return _CONV[dims]


def conv_transpose(dims: int) -> type[nn.Module]:
    return _CONV_T[dims]


def batch_norm(dims: int) -> type[nn.Module]:
    return _BATCH_NORM[dims]


def max_pool(dims: int) -> type[nn.Module]:
    return _MAX_POOL[dims]


def interpolate_mode(dims: int) -> str:
    """The multilinear interpolation mode over `dims` spatial axes (for nn.Upsample / F.interpolate)."""
    return _LINEAR_MODE[dims]


def size_words(dims: int) -> tuple[str, str]:
    """(what the spatial size is called, its unit) in error sentences: images keep their wording."""
    return {1: ("signal length", "samples"), 2: ("image size", "px"), 3: ("volume side", "voxels")}[dims]
