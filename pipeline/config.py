"""The typed recipe: nested dataclasses loaded from YAML, then `key=value` overrides, then validated.

    cfg = load_config("recipes/flowers.yaml", ["train.max_steps=50", "model.latent_dim=64"])

Precedence: dataclass defaults < recipe file < command-line overrides. Every mistake a user can
make here (unknown key, wrong type, bad choice, missing shards) raises `ConfigError` with one
sentence naming the file and the dotted key; `main()`s turn it into exit code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


from pipeline import durable
from pipeline.errors import ConfigError, exit_on_user_error  # noqa: F401 (ConfigError: also imported from here)


# --------------------------------------------------------------------------------------------
# The tree. Every field: what it is, its unit, and its allowed values where they are a choice.
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    shards: str = "shards/demo"
    """Folder written by `make shards` (holds manifest.json and the train-/val- tar files)."""
    batch_size_per_device: int = 32
    """Training images per optimizer micro-step on each device (global batch = this x devices x grad_accum_steps)."""
    val_batch_size_per_device: int = 64
    """Images per validation batch on each device."""
    num_workers: int = 2
    """DataLoader worker processes per device for decoding; 0 decodes in the training process."""
    order: str = "permutation"
    """permutation: every epoch one global shuffle of all training samples, each seen exactly once per
    epoch whatever the shard count, independent of the world size (a run can resume on another number
    of processes) | resampled: each reader draws whole shards with replacement and streams them
    through a shuffle buffer (open_clip's --dataset-resampled; sets with far more shards than readers)."""
    decode: str = "cpu"
    """cpu: the data workers decode the stored images | gpu: the workers only read the stored JPEG bytes
    and each batch is decoded on the GPU (nvJPEG via torchvision; needs jpg shards and CUDA) | auto: gpu
    where it can run, else cpu."""
    shuffle_buffer_samples: int = 1000
    """resampled: samples held in each worker's shuffle buffer (more = better mixing, more memory)."""
    hflip: bool = True
    """Random horizontal flip on the device (kornia.augmentation)."""
    rotation_degrees: float = 0.0
    """Random rotation in [-d, d] degrees on the device; 0 disables it."""
    verify_shards: str = "size"
    """Checked at start against manifest.json, for every shard the run reads: size (one stat per shard:
    a replaced or cut shard of another size) | sha256 (also re-hash each shard once per process before
    training: any change, at the cost of reading the whole set once) | background (size at start; the
    main process re-hashes the training shards in a thread while training runs, and a mismatch stops the
    run at the next batch)."""
    on_damaged_shard: str = "stop"
    """A shard that fails verify_shards: stop (one sentence naming it) | skip (left out of the run and
    named in a warning; the epoch is shorter by its samples) | read (named in a warning and read for what
    it still holds: samples that do not decode, or that a cut shard lacks, are skipped and counted)."""


@dataclass
class BlockSpec:
    """One entry of an explicit `resnet` encoder/decoder list (the structure-file ResNet VAE's design, typed)."""

    block: str = ""
    """resnet | attention | downsample | upsample | conv | norm_act | quantize"""
    out: int = 0
    """Output channels (resnet, conv); 0 keeps the input channel count."""
    repeat: int = 1
    """How many times to stack this block."""
    codebook_size: int = 0
    """quantize: codes of this block's codebook; 0 takes model.quantizer.codebook_size."""


@dataclass
class QuantizerConfig:
    """Quantized latents (pipeline/models/quantize.py): the bottleneck, and every `quantize` block of a resnet
    block list, look their input up in a codebook instead of sampling a Gaussian; the KL term is then
    replaced by the quantizer's own loss. Tokens: a spatial latent has one token per position (its
    latent_channels values); a vector latent is cut into latent_dim / token_dim tokens."""

    kind: str = "none"
    """none (a Gaussian VAE) | vq (nearest code, straight-through gradients, codebook loss) | ema (the codebook
    follows an exponential moving average of its assigned encoder outputs, all-reduced over ranks) | fsq
    (finite scalar quantization: each dimension rounded to `fsq_levels` values; no codebook to collapse)."""
    latent: bool = True
    """Quantize the bottleneck; false quantizes only the `quantize` blocks of model.encoder/decoder."""
    codebook_size: int = 1024
    """vq/ema: number of codes (fsq: the product of fsq_levels)."""
    lookup_dim: int = 0
    """vq/ema: look codes up in a space of this many dimensions, reached by a linear projection of the token and
    projected back after the lookup (ViT-VQGAN's / LlamaGen's factorised codes); 0 looks up the token itself."""
    l2_normalize: bool = False
    """vq/ema: compare l2-normalised tokens with l2-normalised codes (cosine similarity; ViT-VQGAN)."""
    commitment: float = 0.25
    """beta: weight of the commitment loss ||z_e - sg(e)||^2 that keeps the encoder near its codes."""
    codebook_weight: float = 1.0
    """vq: weight of the codebook loss ||sg(z_e) - e||^2 (ema updates the codebook without a loss)."""
    ema_decay: float = 0.99
    """ema: decay of the codebook's moving averages, one update per optimizer step."""
    ema_epsilon: float = 1.0e-5
    """ema: Laplace smoothing of the cluster sizes (keeps unused codes from dividing by zero)."""
    fsq_levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    """fsq: values per dimension (Mentzer et al. 2023: [8, 5, 5, 5] = 1000 codes, [8, 8, 8, 5, 5, 5] = 64000);
    tokens of another width are projected to len(fsq_levels) dimensions and back."""
    token_dim: int = 4
    """Vector latents only: values per token (latent_dim must be a multiple of it)."""
    restart_every_steps: int = 0
    """vq/ema: every this many optimizer steps, codes used fewer than `restart_threshold` times (over all ranks)
    since the last check are moved onto encoder outputs gathered from every rank; 0 never restarts."""
    restart_threshold: float = 1.0
    """vq/ema: a code assigned fewer tokens than this since the last check is dead."""


@dataclass
class ModelConfig:
    arch: str = "conv"
    """conv (the flowers conv VAE) | dcgan (the DCGAN dog VAE) | vanilla (AntixK's VanillaVAE) | resnet (LDM-style)."""
    in_channels: int = 3
    """Image channels."""
    latent: str = "auto"
    """vector (a flat z through Linear heads) | spatial (z is latent_channels x H/f x W/f) | auto: the
    architecture's own (conv, vanilla: vector; dcgan, resnet: spatial)."""
    latent_dim: int = 128
    """Size of a vector latent."""
    latent_channels: int = 4
    """Channels of a spatial latent."""
    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    """Width of each resolution level of the encoder (the decoder mirrors it); each level halves H and W."""
    blocks_per_level: int = 1
    """resnet: ResNet blocks per level."""
    attention_levels: list[int] = field(default_factory=list)
    """resnet: indices into `channels` of the levels that get a self-attention block."""
    encoder: list[BlockSpec] = field(default_factory=list)
    """resnet: an explicit encoder block list; when given it replaces channels/blocks_per_level."""
    decoder: list[BlockSpec] = field(default_factory=list)
    """resnet: an explicit decoder block list; when given it replaces channels/blocks_per_level."""
    downsample_padding: str = "symmetric"
    """resnet: symmetric (conv3x3 stride 2, one pixel of zeros on every side) | ldm (one pixel of zeros on the
    right and bottom only, then conv3x3 stride 2: LDM's and diffusers' Downsample; needed to export to diffusers)."""
    output: str = "tanh"
    """Output activation, which also sets the data range: tanh -> [-1, 1], sigmoid -> [0, 1], linear -> [-1, 1]
    with no activation (LDM's decoder: it ends at its last conv; what diffusers' AutoencoderKL can express)."""
    samples_per_input: int = 1
    """Monte-Carlo samples of z per input; the reconstruction term is averaged over them (the DCGAN dog
    VAE's no_of_sample)."""
    logvar_min: float = -30.0
    """Lower clamp of the encoder's log-variance (nats); keeps exp() finite in bf16/fp16."""
    logvar_max: float = 20.0
    """Upper clamp of the encoder's log-variance (nats)."""
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    """Quantized latents (VQ-VAE / VQGAN / FSQ tokenizers); kind none keeps the Gaussian VAE."""
    spatial_dims: int = 2
    """Spatial axes of the data: 1 (signals [C, L]: audio, sensor series) | 2 (images [C, H, W]) | 3 (volumes
    [C, D, H, W] with D = H = W). Must match the shards' manifest (`spatial_dims`, images: 2). conv, vanilla,
    dcgan and resnet build Conv1d/Conv3d versions of the same layers; the perceptual and adversarial terms
    and data.rotation_degrees are 2-D only (README: 1-D and 3-D data)."""
    init: str = ""
    """Start from these weights instead of a random init: a diffusers AutoencoderKL folder (resnet; write the
    model section with `python -m pipeline.import_diffusers DIR --out recipes/NAME.yaml`), a `pipeline.export
    --format safetensors` folder or a run folder (its latest EMA weights). Empty: random init. Read only when a
    run starts fresh; a resumed run loads its checkpoint."""


@dataclass
class KLConfig:
    weight: float = 1.0
    """beta: the KL weight reached after the schedule's warm-up (or the cycle's peak)."""
    schedule: str = "constant"
    """constant | linear (0 -> weight over warmup_steps) | cyclical (Fu et al. 2019)."""
    warmup_steps: int = 0
    """linear: steps to ramp beta from 0 to weight."""
    cycle_steps: int = 10000
    """cyclical: length of one cycle in optimizer steps."""
    cycle_ramp_fraction: float = 0.5
    """cyclical: fraction of each cycle spent ramping beta up (the rest holds it at weight)."""
    free_bits_nats: float = 0.0
    """Free bits (Kingma et al. 2016): KL per latent dimension below this many nats is not penalised."""


@dataclass
class PerceptualConfig:
    weight: float = 0.0
    """Weight of the perceptual term; 0 disables it (and loads no backbone)."""
    backbone: str = "resnet18"
    """Any timm model name that supports features_only=True."""
    weights: str = "none"
    """hub (timm pretrained download) | none (random init: tests only) | a path to a .pth/.safetensors file."""
    layers: list[int] = field(default_factory=lambda: [1, 2, 3])
    """timm out_indices of the feature maps compared."""
    layer_weights: list[float] = field(default_factory=list)
    """Weight per entry of `layers`; empty means 1.0 each."""
    distance: str = "l1"
    """l1 | l2 between channel-normalised features."""


@dataclass
class AdversarialConfig:
    """The adversarial stage (pipeline/objective/adversarial.py): a PatchGAN discriminator with its own
    optimizer, trained from `disc_start`; its loss reaches the generator `disc_warmup_steps` later."""

    weight: float = 0.0
    """Weight of the generator's adversarial term (on top of the adaptive weight); 0 disables the stage."""
    loss: str = "hinge"
    """hinge | non_saturating (softplus) — for both the discriminator and the generator."""
    disc_layers: int = 3
    """Stride-2 conv layers of the PatchGAN (taming's n_layers); each halves the logit map."""
    disc_channels: int = 64
    """Channels of the first discriminator layer (taming's ndf); doubled per layer, at most 8x."""
    disc_start: float = 0.0
    """When the discriminator starts training: a step (a whole number >= 1) or, below 1, a fraction of
    train.max_steps (0.3 = after 30% of the run); 0 = from the first step."""
    disc_warmup_steps: int = 0
    """Steps the discriminator trains alone before its loss reaches the generator (so the generator never
    sees an untrained, random discriminator)."""
    adaptive_weight: bool = True
    """Scale the generator's adversarial term by ||grad L_rec|| / ||grad L_gan|| at the decoder's last
    layer (Esser et al. 2021), computed in float32; false uses the fixed `weight` alone."""
    adaptive_weight_max: float = 1.0e4
    """Upper clamp of the adaptive weight (taming's 1e4)."""
    lecam_weight: float = 0.0
    """LeCam regularisation of the discriminator (Tseng et al. 2021); 0 disables it."""
    lecam_ema_decay: float = 0.999
    """Decay of the EMAs of the mean real/fake logits that LeCam anchors to."""
    r1_weight: float = 0.0
    """R1 gradient penalty on real images (Mescheder et al. 2018), weight gamma/2; 0 disables it."""
    lr: float = 1.0e-4
    """Peak learning rate of the discriminator's optimizer (Adam)."""
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    """Adam betas of the discriminator (taming: 0.5, 0.9)."""
    weight_decay: float = 0.0
    """AdamW weight decay of the discriminator."""
    schedule: str = "constant"
    """constant | cosine: the discriminator's lr over its own steps (from disc_start to max_steps)."""
    warmup_steps: int = 0
    """Linear lr warm-up of the discriminator, counted from disc_start."""
    grad_clip_norm: float = 1.0
    """Clip the discriminator's gradient norm; 0 disables clipping (the norm is still checked)."""


@dataclass
class VFConfig:
    """Alignment of the latent with a frozen vision foundation model (pipeline/objective/latent.py): a learned 1x1
    projection of z to the backbone's feature width, pulled towards the backbone's features of the input image by
    a margin cosine loss per position and a margin loss on the positions' cosine-similarity matrices."""

    weight: float = 0.0
    """Weight of the alignment term, times the adaptive weight when adaptive_weight is on; 0 disables it."""
    backbone: str = "vit_small_patch14_dinov2"
    """A timm model name that supports features_only=True (DINOv2 ViTs, CNNs)."""
    weights: str = "hub"
    """hub | none (random init: tests only) | a path to a .pth/.safetensors file, as for loss.perceptual.weights."""
    layers: list[int] = field(default_factory=lambda: [-1])
    """timm out_indices of the one feature map aligned to (-1: the last)."""
    input_size: int = 224
    """The image is resized to this many px square before the backbone (a multiple of a ViT's patch size)."""
    adaptive_weight: bool = True
    """Scale the term by ||grad L_rec|| / ||grad L_vf|| at the encoder's last layer (its latent head)."""
    adaptive_weight_max: float = 1.0e8
    """Upper clamp of the adaptive weight."""
    distmat_margin: float = 0.25
    """Differences of positions' cosine similarities (latent vs features) below this are not penalised."""
    cos_margin: float = 0.5
    """Cosine similarities of a position's projected latent and its feature above 1 - this are not penalised."""
    distmat_weight: float = 1.0
    """Weight of the similarity-matrix part inside the term."""
    cos_weight: float = 1.0
    """Weight of the per-position cosine part inside the term."""


@dataclass
class EquivarianceConfig:
    """Scale/rotation equivariance of the decoder (pipeline/objective/latent.py): with `probability`, one micro-batch's
    latent and images are both downscaled and/or rotated, and the decode of the transformed latent is compared with
    the transformed images."""

    weight: float = 0.0
    """Weight of the reconstruction loss of the transformed decode; 0 disables it."""
    probability: float = 0.5
    """Chance per micro-batch that the term is computed (else it is 0 and costs nothing)."""
    scales: list[float] = field(default_factory=lambda: [0.5, 0.75])
    """Downscale factors in (0, 1] drawn from (1 = no scaling); the latent side is rounded to whole positions."""
    rotations_degrees: list[int] = field(default_factory=lambda: [90, 180, 270])
    """Rotations drawn from, multiples of 90 (0 = no rotation); a draw is never the identity."""


@dataclass
class LatentNoiseConfig:
    """Noise augmentation of the decoder's input (pipeline/objective/latent.py): z + sigma * eps is decoded and
    compared with the input images, sigma drawn per sample."""

    weight: float = 0.0
    """Weight of the reconstruction loss of the noisy-latent decode; 0 disables it."""
    sigma_min: float = 0.0
    """Lower end of the uniform range sigma is drawn from, in latent units."""
    sigma_max: float = 0.5
    """Upper end of that range."""
    warmup_steps: int = 0
    """The range grows linearly from 0 to [sigma_min, sigma_max] over this many optimizer steps."""


@dataclass
class LossConfig:
    recon: str = "l1"
    """l1 | mse | bce (needs model.output=sigmoid) | gaussian (learned log-variance)."""
    recon_weight: float = 1.0
    """Weight of the per-pixel-mean reconstruction term (the flowers conv VAE used 5; the structure-file
    ResNet VAE calls it alpha)."""
    gaussian_logvar: str = "scalar"
    """gaussian: one learned log-variance (scalar) or one per channel (channel)."""
    kl: KLConfig = field(default_factory=KLConfig)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    ssim_weight: float = 0.0
    """Weight of (1 - SSIM) (kornia); 0 disables it."""
    ssim_window: int = 11
    """SSIM Gaussian window size in pixels (odd)."""
    tv_weight: float = 0.0
    """Weight of total variation, normalised per pixel (kornia); 0 disables it."""
    sparsity_weight: float = 0.0
    """Weight of the L1 penalty on mu (the structure-file ResNet VAE's sparse term); 0 disables it."""
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    """The adversarial stage (off while adversarial.weight is 0); README: Sharp reconstructions."""
    vf: VFConfig = field(default_factory=VFConfig)
    """Latent alignment with a frozen foundation model (off while vf.weight is 0); README: Latents for diffusion."""
    equivariance: EquivarianceConfig = field(default_factory=EquivarianceConfig)
    """Scale/rotation equivariance of the decode (off while equivariance.weight is 0)."""
    latent_noise: LatentNoiseConfig = field(default_factory=LatentNoiseConfig)
    """Decoding noisy latents (off while latent_noise.weight is 0)."""


@dataclass
class OptimConfig:
    name: str = "adamw"
    """adam | adamw"""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay (adamw) or L2 (adam)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon, added to the denominator (torch's default)."""
    schedule: str = "constant"
    """constant | cosine (linear warm-up then cosine decay) | exponential (AntixK's VanillaVAE's ExponentialLR)."""
    warmup_steps: int = 0
    """Linear warm-up steps (all schedules)."""
    min_lr_ratio: float = 0.0
    """cosine: final lr as a fraction of the peak."""
    gamma: float = 0.95
    """exponential: lr multiplier applied every gamma_every_steps."""
    gamma_every_steps: int = 1000
    """exponential: steps between multiplications (AntixK's VanillaVAE multiplied once per epoch)."""
    grad_clip_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still logged)."""
    ema_decay: float = 0.999
    """Decay of the EMA copy of the weights used for media and evaluation; 0 disables EMA."""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps to train for."""
    seed: int = 0
    """Seeds the model init, the data order and augmentation."""
    mixed_precision: str = "no"
    """no | bf16 | fp16 (fp16 uses a gradient scaler)."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    compile: bool = False
    """torch.compile the model (and the discriminator)."""
    compile_mode: str = "default"
    """train.compile's mode: default | reduce-overhead (CUDA graphs: the compiled graph replays as one launch,
    for small models whose steps are launch-bound) | max-autotune | max-autotune-no-cudagraphs."""
    channels_last: bool = False
    """Use channels_last memory format (faster convolutions on tensor cores)."""
    tf32: bool = True
    """CUDA only: TF32 tensor cores for fp32 matmuls and convolutions (fp32 accumulation, 10-bit mantissa
    inputs), what fp32 work runs at on Ampere and later; false for IEEE fp32 (bitwise comparisons)."""
    cudnn_benchmark: bool = True
    """CUDA only: cuDNN times its convolution algorithms for each new input shape once and keeps the
    fastest (shapes are fixed here, so only the first steps pay); false for its heuristic choice."""
    checkpoint_every_steps: int = 500
    """Save a resumable checkpoint every this many steps (and always at the end)."""
    keep_checkpoints: int = 3
    """How many complete checkpoints to keep."""
    resume: str = "auto"
    """auto (continue from the run folder's newest complete checkpoint, if any) | never | a checkpoint folder."""
    max_nonfinite_steps: int = 20
    """Stop after this many consecutive steps with a non-finite loss or gradient."""
    inject_nan_at_steps: list[int] = field(default_factory=list)
    """Fault injection (tests of the non-finite guard): feed NaN images at these 1-based steps."""
    inject_nan_rank: int = -1
    """Fault injection: the rank that gets the NaN images; -1 means every rank."""
    freeze: list[str] = field(default_factory=list)
    """Model parts that do not train: top-level modules of the model (resnet: encoder, heads (diffusers'
    quant_conv), decoder_input (its post_quant_conv), decoder, final_layer (its decoder.conv_out)). They stay in
    eval mode, out of the optimizer and out of DDP's gradient reduction. [encoder, heads]: decoder-only
    finetuning, as stabilityai's sd-vae-ft-mse."""


@dataclass
class RunConfig:
    name: str = ""
    """Run folder name under `dir`; empty means the recipe's file name without .yaml."""
    dir: str = "runs"
    """Parent folder of run folders."""


@dataclass
class TrackingConfig:
    mode: str = "offline"
    """offline (works on compute nodes without internet; `wandb sync` later) | online | disabled."""
    project: str = "vae-pipeline"
    """W&B project."""
    entity: str = ""
    """W&B entity (team or user); empty uses your default."""
    group: str = ""
    """W&B group of the run (pipeline.sweep puts a sweep's trials in one group); empty: none."""
    log_every_steps: int = 10
    """Scalars (loss terms, lr, beta, grad norm, images/s, ...) every this many steps."""
    media_every_steps: int = 200
    """Reconstructions, prior samples, interpolations and traversals every this many steps."""
    eval_every_steps: int = 500
    """Full validation pass every this many steps (and at the end)."""
    media_images: int = 8
    """Images per media panel (validation images, prior samples)."""
    interpolation_steps: int = 10
    """Points per latent interpolation strip (spherical interpolation)."""
    traverse_dims: int = 4
    """Latent dimensions (highest KL first) shown in traversal grids."""
    best_metric: str = "val/neg_elbo_nats"
    """Validation metric that picks the run's best weights (run_dir/best/, the W&B model artifact's `best`)."""
    best_mode: str = "min"
    """min | max: whether a lower or a higher best_metric is better."""


@dataclass
class MetricsConfig:
    """The metrics the field reports beside PSNR/SSIM (pipeline.metrics): LPIPS and rFID need weights files
    that nothing here downloads; without a path the metric is skipped with a line saying what to fetch."""

    lpips_net: str = "alex"
    """alex | vgg | squeeze: the LPIPS backbone (its linear heads ship in the lpips wheel)."""
    lpips_backbone_weights: str = ""
    """Local torchvision ImageNet weights of that backbone (e.g. alexnet-owt-7be5be79.pth); empty skips LPIPS."""
    inception_weights: str = ""
    """Local torch-fidelity InceptionV3 weights (weights-inception-2015-12-05-6726825d.pth); empty skips rFID."""
    fid_features: int = 2048
    """rFID's InceptionV3 feature layer (torch-fidelity's feature_layer_fid): 2048 (pool3, what papers report) |
    768 | 192 | 64 (cheaper, not comparable with published FIDs)."""
    in_validation: bool = False
    """Also compute them (and the weight-free sharpness ratio) in training's validation passes (val/*)."""


@dataclass
class PriorConfig:
    """The ex-post prior (pipeline/prior.py): a Gaussian mixture fitted to the posterior means of training
    images at every media step, sampled beside N(0, I) in the media panels and by `pipeline.sample prior`."""

    components: int = 10
    """Gaussians in the mixture; 0 fits none (no ex-post panel, no file)."""
    covariance: str = "full"
    """full | diag: each component's covariance (full: k x D x D float64, 80 MB for k=10, D=1024)."""
    train_samples: int = 2048
    """Posterior means fitted: the first this many train images in shard order (the same on any world size)."""
    max_iterations: int = 100
    """EM iterations at most."""
    tolerance: float = 0.001
    """EM stops when the mean log-likelihood per image improves by less than this many nats."""
    ridge: float = 0.001
    """Added to every covariance's diagonal, as a fraction of the data's mean per-dimension variance."""


@dataclass
class Config:
    name: str = ""
    """The recipe's name (file name without .yaml); set by load_config."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)


# Fields whose value must be one of a fixed set: dotted key -> allowed values.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.order": ("permutation", "resampled"),
    "data.verify_shards": ("size", "sha256", "background"),
    "data.on_damaged_shard": ("stop", "skip", "read"),
    "data.decode": ("cpu", "gpu", "auto"),
    "model.arch": ("conv", "dcgan", "vanilla", "resnet"),
    "model.latent": ("auto", "vector", "spatial"),
    "model.output": ("tanh", "sigmoid", "linear"),
    "model.downsample_padding": ("symmetric", "ldm"),
    "model.quantizer.kind": ("none", "vq", "ema", "fsq"),
    "loss.recon": ("l1", "mse", "bce", "gaussian"),
    "loss.gaussian_logvar": ("scalar", "channel"),
    "loss.kl.schedule": ("constant", "linear", "cyclical"),
    "loss.perceptual.distance": ("l1", "l2"),
    "loss.adversarial.loss": ("hinge", "non_saturating"),
    "loss.adversarial.schedule": ("constant", "cosine"),
    "optim.name": ("adam", "adamw"),
    "optim.schedule": ("constant", "cosine", "exponential"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "tracking.mode": ("offline", "online", "disabled"),
    "tracking.best_mode": ("min", "max"),
    "metrics.lpips_net": ("alex", "vgg", "squeeze"),
    "prior.covariance": ("full", "diag"),
}
# Fields where a YAML boolean stands for a word: YAML 1.1 reads `no` and `false` as False, and "no" is
# accelerate's own word for "no mixed precision".
BOOLEAN_WORDS: dict[str, dict[bool, str]] = {"train.mixed_precision": {False: "no", True: "yes"}}
# What `1e-3` looks like: YAML 1.1 reads a float only with a dot, so `1e-3` and `5e-05` arrive as strings.
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
BLOCK_NAMES = ("resnet", "attention", "downsample", "upsample", "conv", "norm_act", "quantize")


# --------------------------------------------------------------------------------------------
# Loading: YAML -> dict -> dataclasses, with the dotted key in every error.
# --------------------------------------------------------------------------------------------


def _suggest(name: str, options: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, options, n=1)
    dotted = [f"{prefix}.{o}" if prefix else o for o in (close or sorted(options))]
    return f" (did you mean {dotted[0]}?)" if close else f" (allowed: {', '.join(dotted)})"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp` and convert it (dicts to dataclasses)."""
    origin = typing.get_origin(tp)
    if tp is Any:  # (pipeline.sweep's choices: any value a recipe key takes; checked by loading the recipe)
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, key, source)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list of {_type_name(item_tp)}, got {value!r}")
        return [coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else coerce(value, args[0], key, source)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (float, int) and isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        number = float(value)
        if tp is float:
            return number
        if number.is_integer():  # `train.max_steps=1e5`
            return int(number)
    if tp is str and isinstance(value, bool) and key in BOOLEAN_WORDS:
        return BOOLEAN_WORDS[key][value]
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # `run.name=123` on the command line is still a name
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def from_dict(cls: type, values: dict, prefix: str, source: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in names:
            raise ConfigError(f"{source}: unknown key {key}{_suggest(str(name), names, prefix)}")
        kwargs[name] = coerce(value, hints[name], key, source)
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value), the value read as YAML (so 3 is int, [1, 2] a list, true a bool)."""
    if "=" not in text:
        raise ConfigError(f"command line: override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def load_config(recipe: str | Path | None, overrides: list[str] = (), check_paths: bool = True) -> Config:
    """Load a recipe, apply `key=value` overrides, validate. Raises ConfigError with one sentence."""
    values: dict = {}
    source = "defaults"
    if recipe is not None:
        path = Path(recipe)
        source = f"recipe {path}"
        if not path.is_file():
            raise ConfigError(f"recipe {path} does not exist; pass a YAML file such as recipes/demo.yaml")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {path} is not valid YAML ({str(e).splitlines()[0]})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"recipe {path} must be a mapping of sections (data:, model:, ...)")
        values = loaded or {}
        values.setdefault("name", path.stem)
    cfg = from_dict(Config, values, "", source)
    for text in overrides:
        key, value = parse_override(text)
        merged = _merge(values, _nest(key, value))
        cfg = from_dict(Config, merged, "", "command line")
        values = merged
    validate(cfg, source, check_paths=check_paths)
    return cfg


def walk(obj: Any, prefix: str = ""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value):
            yield from walk(value, key)
        else:
            yield key, value


def validate(cfg: Config, source: str = "recipe", check_paths: bool = True) -> None:
    """Checks that need more than a type: choices, ranges, cross-field rules, the shards folder."""
    flat = dict(walk(cfg))
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{source}: {key} is {flat[key]!r} but must be one of {', '.join(allowed)}")
    _validate_numbers(flat, source)
    for key in ("data.batch_size_per_device", "data.val_batch_size_per_device", "train.max_steps",
                "train.grad_accum_steps", "train.checkpoint_every_steps", "train.keep_checkpoints",
                "tracking.log_every_steps", "tracking.media_every_steps", "tracking.eval_every_steps",
                "model.samples_per_input", "train.max_nonfinite_steps", "optim.gamma_every_steps"):
        if flat[key] < 1:
            raise ConfigError(f"{source}: {key} must be at least 1, got {flat[key]}")
    if cfg.prior.components > cfg.prior.train_samples:
        raise ConfigError(f"{source}: prior.components ({cfg.prior.components}) is more than prior.train_samples "
                          f"({cfg.prior.train_samples}): every Gaussian needs images to fit; lower it or raise "
                          f"prior.train_samples")
    if not cfg.tracking.best_metric.startswith("val/"):
        raise ConfigError(f"{source}: tracking.best_metric must be a validation metric such as val/neg_elbo_nats "
                          f"or val/psnr, got {cfg.tracking.best_metric!r}")
    if cfg.tracking.interpolation_steps < 2:
        raise ConfigError(f"{source}: tracking.interpolation_steps must be at least 2, got {cfg.tracking.interpolation_steps}")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"{source}: data.num_workers must be 0 or more, got {cfg.data.num_workers}")
    if not 0 <= cfg.optim.ema_decay < 1:
        raise ConfigError(f"{source}: optim.ema_decay must be in [0, 1), got {cfg.optim.ema_decay}")
    if cfg.loss.recon == "bce" and cfg.model.output != "sigmoid":
        raise ConfigError(
            f"{source}: loss.recon is bce, which needs outputs in [0, 1), but model.output is "
            f"{cfg.model.output}; set model.output=sigmoid or use l1/mse/gaussian")
    if cfg.model.logvar_min >= cfg.model.logvar_max:
        raise ConfigError(f"{source}: model.logvar_min must be below model.logvar_max")
    if cfg.loss.ssim_window < 3 or cfg.loss.ssim_window % 2 == 0:
        raise ConfigError(f"{source}: loss.ssim_window must be an odd number of at least 3, got {cfg.loss.ssim_window}")
    p = cfg.loss.perceptual
    if p.layer_weights and len(p.layer_weights) != len(p.layers):
        raise ConfigError(f"{source}: loss.perceptual.layer_weights needs one weight per entry of loss.perceptual.layers")
    _validate_adversarial(cfg, source)
    _validate_latent_regularisers(cfg, source)
    _validate_quantizer(cfg, source)
    _validate_spatial_dims(cfg, source)
    for side in ("encoder", "decoder"):
        for i, spec in enumerate(getattr(cfg.model, side)):
            if spec.block not in BLOCK_NAMES:
                raise ConfigError(f"{source}: model.{side}[{i}].block is {spec.block!r}"
                                  f"{_suggest(spec.block, list(BLOCK_NAMES))}")
    if check_paths:
        shards = Path(cfg.data.shards)
        if not (shards / "manifest.json").is_file():
            raise ConfigError(
                f"{source}: data.shards folder {shards} has no manifest.json; build it with "
                f"`make shards SRC=<image folder> NAME={shards.name}` (or `make demo-data`)")


_POSITIVE = (lambda v: math.isfinite(v) and v > 0, "a finite number above 0")
_NON_NEGATIVE = (lambda v: math.isfinite(v) and v >= 0, "a finite number of 0 or more")
_BETAS = (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)")
_STEPS = (lambda v: v >= 0, "0 or more")
# Ranges of the numbers people tune, checked here so that a bad one is this sentence, not a torch traceback.
RANGES: dict[str, tuple[Any, str]] = {
    "optim.lr": _POSITIVE, "optim.eps": _POSITIVE, "optim.gamma": _POSITIVE, "optim.betas": _BETAS,
    "optim.weight_decay": _NON_NEGATIVE, "optim.grad_clip_norm": _NON_NEGATIVE, "optim.warmup_steps": _STEPS,
    "optim.min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "loss.adversarial.lr": _POSITIVE, "loss.adversarial.betas": _BETAS,
    "loss.adversarial.weight_decay": _NON_NEGATIVE,
    **{f"loss.{k}": _NON_NEGATIVE for k in ("recon_weight", "kl.weight", "kl.free_bits_nats", "perceptual.weight",
                                             "ssim_weight", "tv_weight", "sparsity_weight", "vf.weight",
                                             "vf.distmat_margin", "vf.cos_margin", "vf.distmat_weight",
                                             "vf.cos_weight", "equivariance.weight", "latent_noise.weight",
                                             "latent_noise.sigma_min")},
    "loss.vf.input_size": (lambda v: v >= 1, "at least 1"), "loss.vf.adaptive_weight_max": _POSITIVE,
    "loss.vf.layers": (lambda v: len(v) == 1, "one timm out_index, e.g. [-1]"),
    "loss.equivariance.probability": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "loss.equivariance.scales": (lambda v: all(0 < s <= 1 for s in v), "a list of factors in (0, 1]"),
    "loss.equivariance.rotations_degrees": (lambda v: all(r % 90 == 0 for r in v), "a list of multiples of 90"),
    "loss.latent_noise.warmup_steps": _STEPS,
    "loss.kl.warmup_steps": _STEPS, "data.rotation_degrees": _NON_NEGATIVE,
    "prior.components": (lambda v: v >= 0, "0 (no ex-post prior) or more"),
    "prior.train_samples": (lambda v: v >= 1, "at least 1"), "prior.max_iterations": (lambda v: v >= 1, "at least 1"),
    "prior.tolerance": _POSITIVE, "prior.ridge": _POSITIVE,
}


def _validate_numbers(flat: dict[str, Any], source: str) -> None:
    for key, (ok, what) in RANGES.items():
        if not ok(flat[key]):
            raise ConfigError(f"{source}: {key} must be {what}, got {flat[key]}")
    for key, value in flat.items():  # NaN passes every `<` check silently: refuse it wherever it is
        if any(isinstance(v, float) and math.isnan(v) for v in (value if isinstance(value, list) else [value])):
            raise ConfigError(f"{source}: {key} is {value}; give a number")


def _validate_quantizer(cfg: Config, source: str) -> None:
    q = cfg.model.quantizer
    blocks = [f"model.{side}[{i}]" for side in ("encoder", "decoder")
              for i, spec in enumerate(getattr(cfg.model, side)) if spec.block == "quantize"]
    if q.kind == "none":
        if blocks:
            raise ConfigError(f"{source}: {blocks[0]} is a quantize block but model.quantizer.kind is none; set "
                              f"model.quantizer.kind to vq, ema or fsq (and model.quantizer.latent=false to quantize "
                              f"only the blocks)")
        return
    if not q.latent and not blocks:
        raise ConfigError(f"{source}: model.quantizer.latent is false and no block list has a quantize block, so "
                          f"nothing would be quantized; set model.quantizer.latent=true or add a quantize block")
    for key in ("codebook_size", "token_dim", "restart_every_steps", "lookup_dim"):
        low = 1 if key in ("codebook_size", "token_dim") else 0
        if getattr(q, key) < low:
            raise ConfigError(f"{source}: model.quantizer.{key} must be at least {low}, got {getattr(q, key)}")
    if q.commitment < 0 or q.codebook_weight < 0 or q.restart_threshold < 0:
        raise ConfigError(f"{source}: model.quantizer.commitment, codebook_weight and restart_threshold must be 0 "
                          f"or more")
    if not 0 < q.ema_decay < 1 or q.ema_epsilon <= 0:
        raise ConfigError(f"{source}: model.quantizer.ema_decay must be in (0, 1) and ema_epsilon positive, got "
                          f"{q.ema_decay} and {q.ema_epsilon}")
    if not q.fsq_levels or any(level < 2 for level in q.fsq_levels):
        raise ConfigError(f"{source}: model.quantizer.fsq_levels must list at least one level count, each at least 2, "
                          f"got {q.fsq_levels}")
    if q.latent and any(k in cfg.tracking.best_metric for k in ("elbo", "kl")):
        raise ConfigError(f"{source}: tracking.best_metric is {cfg.tracking.best_metric}, but a quantized latent has "
                          f"no KL or ELBO; set tracking.best_metric=val/psnr tracking.best_mode=max (or val/loss/recon)")
    if cfg.model.samples_per_input != 1:
        raise ConfigError(f"{source}: model.samples_per_input is {cfg.model.samples_per_input}, but a quantized latent "
                          f"is deterministic (one code per token), so there is nothing to sample; set it to 1")


def _validate_adversarial(cfg: Config, source: str) -> None:
    a = cfg.loss.adversarial
    for key in ("weight", "lecam_weight", "r1_weight", "weight_decay", "grad_clip_norm", "disc_start"):
        if getattr(a, key) < 0:
            raise ConfigError(f"{source}: loss.adversarial.{key} must be 0 or more, got {getattr(a, key)}")
    if a.disc_start >= 1 and a.disc_start != int(a.disc_start):
        raise ConfigError(f"{source}: loss.adversarial.disc_start is {a.disc_start}: give a whole step number, or a "
                          f"fraction of train.max_steps below 1")
    for key in ("disc_warmup_steps", "warmup_steps"):
        if getattr(a, key) < 0:
            raise ConfigError(f"{source}: loss.adversarial.{key} must be 0 or more, got {getattr(a, key)}")
    if a.disc_layers < 1 or a.disc_channels < 1:
        raise ConfigError(f"{source}: loss.adversarial.disc_layers and disc_channels must be at least 1")
    if a.lr <= 0 or a.adaptive_weight_max <= 0:
        raise ConfigError(f"{source}: loss.adversarial.lr and adaptive_weight_max must be positive")
    if not 0 <= a.lecam_ema_decay < 1:
        raise ConfigError(f"{source}: loss.adversarial.lecam_ema_decay must be in [0, 1), got {a.lecam_ema_decay}")
    if a.weight > 0 and a.r1_weight > 0 and cfg.train.compile:
        raise ConfigError(f"{source}: loss.adversarial.r1_weight needs a double backward through the "
                          f"discriminator, which torch.compile does not support; set train.compile=false or "
                          f"loss.adversarial.r1_weight=0")


def _validate_latent_regularisers(cfg: Config, source: str) -> None:
    """What the latent regularisers need from the rest of the recipe (the model's latent is checked by VAELoss,
    once the architecture has resolved model.latent=auto)."""
    loss = cfg.loss
    if loss.latent_noise.sigma_max < loss.latent_noise.sigma_min:
        raise ConfigError(f"{source}: loss.latent_noise.sigma_max ({loss.latent_noise.sigma_max}) is below "
                          f"loss.latent_noise.sigma_min ({loss.latent_noise.sigma_min}); give a range low to high")
    eq = loss.equivariance
    if eq.weight > 0 and all(s == 1 for s in eq.scales) and all(r % 360 == 0 for r in eq.rotations_degrees):
        raise ConfigError(f"{source}: loss.equivariance.scales and rotations_degrees hold only the identity, so "
                          f"there is nothing to be equivariant to; add a scale below 1 or a rotation such as 90")
    if cfg.model.quantizer.kind != "none" and cfg.model.quantizer.latent:
        for key in ("equivariance", "latent_noise"):
            if getattr(loss, key).weight > 0:
                raise ConfigError(f"{source}: loss.{key}.weight is {getattr(loss, key).weight}, but a quantized "
                                  f"latent is decoded from its codes, which a transformed or noisy latent is not; "
                                  f"set loss.{key}.weight=0 or model.quantizer.kind=none")


def _validate_spatial_dims(cfg: Config, source: str) -> None:
    dims = cfg.model.spatial_dims
    if dims not in (1, 2, 3):
        raise ConfigError(f"{source}: model.spatial_dims must be 1, 2 or 3, got {dims}")
    if dims == 2:
        return
    refused = {"loss.perceptual.weight": cfg.loss.perceptual.weight, "loss.adversarial.weight": cfg.loss.adversarial.weight,
               "loss.vf.weight": cfg.loss.vf.weight, "loss.equivariance.weight": cfg.loss.equivariance.weight,
               "data.rotation_degrees": cfg.data.rotation_degrees, "train.channels_last": cfg.train.channels_last}
    for key, value in refused.items():
        if value > 0:
            raise ConfigError(f"{source}: {key} is {value}, but it works on 2-D images only and model.spatial_dims is "
                              f"{dims}; set {key}=0")


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain data (for config.yaml in the run folder and for W&B)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    """Atomically and durably: a restart on a full disk keeps the previous config.yaml whole."""
    durable.write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


exit_on_config_error = exit_on_user_error
"""The CLI decorator under its earlier name (pipeline.errors.exit_on_user_error: any UserError -> one line, exit 2)."""


def cli_config(argv: list[str]) -> Config:
    """`RECIPE [key=value ...]` -> Config (used by train, evaluate, batchsize)."""
    if not argv or "=" in argv[0]:
        raise ConfigError("command line: give a recipe first, e.g. recipes/demo.yaml [train.max_steps=50 ...]")
    return load_config(argv[0], argv[1:])
