"""A score for samples without downloaded weights: the project's own classifier (pipeline.classifier, trained
on the shards' class labels) as the Inception network of an Inception Score.

    probs = class_probabilities(classifier, images_uint8)         # p(y | x) [N, classes]
    inception_like_score(probs)                                   # exp(E_x KL(p(y|x) || p(y))), in [1, classes]
    score_prior_samples(run, "runs/demo-classifier.safetensors")  # val images, their reconstructions, N(0, I), ex-post
    python -m pipeline.sample runs/demo prior --score runs/demo-classifier.safetensors

The score is 1 when every image gets the same class distribution (nothing recognisable, or one class only)
and the number of classes when each image is confidently one class and the classes are equally frequent;
the class histogram (fraction of images whose most likely class is each class) shows which. Val images give
the ceiling for this classifier; their reconstructions decode(mu) the ceiling for anything this decoder draws: a
classifier trained on sharp images can read a blurred decode as one class, and then no prior's samples can score
above the reconstructions, however good the prior. Like the Inception Score it says nothing about closeness to the data
beyond the classifier's view, and it depends on the classifier: compare numbers made with the same file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from pipeline.errors import UserError


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, list[str]]:
    """The timm classifier pipeline.classifier saved (safetensors + its backbone and classes in the metadata),
    in eval mode on `device`, and its class names. Read without pickle; UserError for another file."""
    import timm
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"classifier {path} does not exist; train one with `python -m pipeline.classifier "
                          f"RECIPE --out {path}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as e:
        raise UserError(f"classifier {path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    if "backbone" not in meta or "classes" not in meta:
        raise UserError(f"{path} has no backbone/classes metadata: give a file `python -m pipeline.classifier` wrote")
    classes = json.loads(meta["classes"])
    model = timm.create_model(meta["backbone"], pretrained=False, num_classes=len(classes))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"classifier {path} does not fit {meta['backbone']} ({str(e).splitlines()[0]})") from None
    return model.to(device).eval().requires_grad_(False), classes


@torch.no_grad()
def class_probabilities(classifier: nn.Module, images: Tensor, batch_size: int = 128) -> Tensor:
    """p(y | x) float64 [N, classes] of uint8 images [N, 3, H, W], prepared as pipeline.classifier trained on
    them ([0, 1], then the backbone's mean and std)."""
    pc = getattr(classifier, "pretrained_cfg", {}) or {}
    device = next(classifier.parameters()).device
    mean = torch.tensor(pc.get("mean", (0.485, 0.456, 0.406)), device=device).view(1, -1, 1, 1)
    std = torch.tensor(pc.get("std", (0.229, 0.224, 0.225)), device=device).view(1, -1, 1, 1)
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device).float() / 255.0
        out.append(classifier((x - mean) / std).double().softmax(1).cpu())
    return torch.cat(out)


def inception_like_score(probs: Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))), p(y) the mean of p(y|x) over the images: 1 for identical predictions,
    the number of classes for confident predictions spread evenly over the classes."""
    p = probs.double()
    marginal = p.mean(0, keepdim=True)
    kl = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - marginal.clamp_min(1e-300).log()), torch.zeros_like(p))
    return float(kl.sum(1).mean().exp())


def summarize(probs: Tensor, classes: list[str]) -> dict:
    """{"score", "histogram" {class: fraction of images whose argmax it is}, "mean_max_probability", "count"}."""
    top = probs.argmax(1)
    counts = torch.bincount(top, minlength=len(classes)).double() / max(1, len(probs))
    return {"score": inception_like_score(probs), "count": len(probs),
            "mean_max_probability": float(probs.max(1).values.mean()),
            "histogram": {c: round(float(counts[i]), 4) for i, c in enumerate(classes)}}


@torch.no_grad()
def score_prior_samples(run, classifier_path: str | Path, n: int = 500, seed: int = 0, temperature: float = 1.0,
                        batch_size: int = 64, expost=None) -> dict:
    """The classifier's score and class histogram of n decoded N(0, I) samples, n ex-post prior samples
    (`expost`: a pipeline.prior.ExpostPrior fitted to this run's weights, or None to leave them out), the
    first n val images of the run's shards (the classifier's ceiling) and their reconstructions decode(mu) (the
    decoder's), for a pipeline.inference.LoadedRun of an image run.
    Returns {"classifier", "val", "reconstructions", "normal", "expost"?} (see summarize)."""
    from pipeline import media
    from pipeline.inference import check_shards, split_batches

    classifier, classes = load_classifier(classifier_path, run.device)
    if run.classes and list(run.classes) != list(classes):
        raise UserError(f"classifier {classifier_path} was trained on classes {classes}, the run's shards have "
                          f"{run.classes}; train it on the same shards")
    model = run.model

    def decoded(z_or_sampler) -> Tensor:
        images = []
        for i in range(0, n, batch_size):
            m = min(batch_size, n - i)
            x = z_or_sampler(m)
            images.append(torch.from_numpy(media.to_uint8(model.decode(x.to(run.device)), model.output_range))
                          .permute(0, 3, 1, 2))
        return torch.cat(images)

    result: dict = {"classifier": str(classifier_path), "classes": classes, "temperature": temperature}
    check_shards(run.cfg.data.shards, run.image_size)
    val = []
    for batch in split_batches(run.cfg, run.cfg.data.shards, "val", num_workers=0):
        val.append(batch.images)
        if sum(len(v) for v in val) >= n:
            break
    val = torch.cat(val)[:n]
    result["val"] = summarize(class_probabilities(classifier, val), classes)
    recon = [torch.from_numpy(media.to_uint8(model.decode(model.encode(run.to_model_range(val[i:i + batch_size]))[0]),
                                             model.output_range)).permute(0, 3, 1, 2)
             for i in range(0, len(val), batch_size)]
    result["reconstructions"] = summarize(class_probabilities(classifier, torch.cat(recon)), classes)
    g = torch.Generator().manual_seed(seed)
    normal = decoded(lambda m: torch.randn((m, *model.latent_shape), generator=g) * temperature)
    result["normal"] = summarize(class_probabilities(classifier, normal), classes)
    if expost is not None:
        g = torch.Generator().manual_seed(seed)
        samples = decoded(lambda m: expost.sample(m, g, temperature))
        result["expost"] = summarize(class_probabilities(classifier, samples), classes)
    return result


def format_scores(result: dict) -> str:
    """A few lines for the terminal: one per image set, score then histogram."""
    lines = [f"classifier score exp(E KL(p(y|x) || p(y))) (1 .. {len(result['classes'])}), class histogram:"]
    for name, label in (("val", "val images"), ("reconstructions", "val decode(mu)"), ("normal", "N(0, I) samples"),
                        ("expost", "ex-post samples")):
        if name in result:
            r = result[name]
            hist = " ".join(f"{c} {v:.2f}" for c, v in r["histogram"].items())
            lines.append(f"  {label:16s} {r['score']:.3f}  (n {r['count']}, mean max p {r['mean_max_probability']:.2f})"
                         f"  {hist}")
    return "\n".join(lines)
