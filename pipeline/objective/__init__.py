"""The training objective, one module per term:

    kl.py           KL(q(z|x) || N(0, I)) per latent dimension and the beta schedules
    likelihood.py   reconstruction densities, discretised log-probs of 8-bit data, latent log-densities,
                    importance weights and the IWAE bounds (the one place training and evaluation share)
    image.py        range conversion and total variation
    perceptual.py   the frozen timm backbone (build_backbone) and PerceptualDistance
    vae_loss.py     VAELoss: the weighted sum the generator minimises (LossResult with every term by name)

    from pipeline.objective import VAELoss
    loss_fn = VAELoss(cfg.loss, model.output_range, image_channels=3)
"""

from pipeline.objective.vae_loss import LossResult, VAELoss

__all__ = ["LossResult", "VAELoss"]
