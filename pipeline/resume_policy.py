"""What a resumed run may change. A run continued with settings other than those its checkpoint was
trained with either takes them from the checkpoint's step on — and says so: printed, in starts.jsonl
(`changed`) and in the W&B config (`changed_on_resume`) — or is refused with one sentence naming the
key, before anything in the run folder is replaced.

    changes = check_changes(trainer_state, cfg, checkpoint)   # {key: [checkpoint's value, this run's]}

The rule per key is RULES (the most specific entry wins; the table: README, Resume, "Changed settings").
Refused: what the checkpoint's contents are made of or positioned in — the architecture (its weights),
the learned log-variance's shape, which parameters train (train.freeze: the optimizer's contents), the
discriminator's architecture, the data order and seed (its data
position and random streams), the metric that chose the best weights so far. Everything else applies:
optimizer hyperparameters (the checkpoint's moments are kept, its param groups' lr/betas/eps/weight
decay are not), schedules (functions of the step), max_steps, loss weights, data loading, precision,
cadences and tracking.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError, walk

APPLIES = None
ARCHITECTURE = "the checkpoint's weights are those of the model it was trained with"
DISCRIMINATOR = "the checkpoint's discriminator weights are those of the discriminator it was trained with"
BEST = "the best weights so far (best/best.json) were chosen by the checkpoint's metric"
# Dotted key or section -> None (a change applies from the checkpoint's step on) or why it is refused.
RULES: dict[str, str | None] = {
    "model": ARCHITECTURE,
    "model.samples_per_input": APPLIES,  # Monte-Carlo samples of z: not in the weights
    "model.logvar_min": APPLIES,  # clamps of the encoder's output, not weights
    "model.logvar_max": APPLIES,
    **{f"model.quantizer.{k}": APPLIES for k in ("commitment", "codebook_weight", "ema_decay", "ema_epsilon",
                                                 "restart_every_steps", "restart_threshold")},
    "loss": APPLIES,
    "loss.recon": APPLIES,  # refused to or from gaussian, whose learned log-variance the checkpoint holds
    "loss.gaussian_logvar": "the checkpoint's learned log-variance has the shape it gives",
    "loss.vf.backbone": "the checkpoint's latent projection has the width of that backbone's features",
    "loss.vf.layers": "the checkpoint's latent projection has the width of that feature map",
    "loss.adversarial.disc_layers": DISCRIMINATOR,
    "loss.adversarial.disc_channels": DISCRIMINATOR,
    "optim": APPLIES,
    "train": APPLIES,
    "train.max_steps": APPLIES,  # refused below the checkpoint's step
    "train.freeze": "the checkpoint's optimizer holds moments for exactly the parameters that trained",
    "train.seed": "the data order and the random streams the checkpoint continues are derived from it",
    "data": APPLIES,  # data.shards: the folder may move; another shard set is refused by the data stream
    "data.order": "the checkpoint's data position is a position in that order",
    "tracking": APPLIES,
    "tracking.best_metric": BEST,
    "tracking.best_mode": BEST,
    "metrics": APPLIES,
    "prior": APPLIES,  # refitted at every media step from the weights of that step
}
NOT_COMPARED = ("name", "run.name", "run.dir", "train.resume", "model.init")
"""Where the run is and how it was started: not settings of the training (model.init is read only by a fresh
start; a resumed run continues its checkpoint's weights)."""


def rule(key: str) -> str | None:
    """RULES' entry for a dotted key: the longest entry that is the key or a section above it."""
    matches = [k for k in RULES if key == k or key.startswith(k + ".")]
    if not matches:
        raise KeyError(f"{key} has no entry in pipeline.resume_policy.RULES")
    return RULES[max(matches, key=len)]


def check_changes(trainer_state: dict, cfg: Config, checkpoint: Path) -> dict[str, list] | None:
    """The settings of `cfg` that differ from those the checkpoint was trained with, as {key: [then, now]};
    ConfigError naming the first key that cannot change. None when the checkpoint holds no config
    (written before configs were stored in checkpoints): then nothing can be compared."""
    saved = trainer_state.get("config")
    if not isinstance(saved, dict):
        return None
    then, now = _flat(saved), dict(walk(cfg))
    step = int(trainer_state.get("step", 0))
    changes = {}
    for key, value in now.items():
        if key in NOT_COMPARED or key not in then or _same(then[key], value):
            continue  # (a key the checkpoint's version did not have yet: nothing to compare it with)
        why = _refusal(key, then, now)
        if why is not None:
            raise ConfigError(
                f"checkpoint {checkpoint} was trained with {key}={_text(then[key])} and this run has "
                f"{key}={_text(value)}, which cannot change when a run is resumed ({why}); resume with "
                f"{key}={_text(then[key])}, or train in a new run folder (run.name=...) or from scratch "
                f"(train.resume=never)")
        changes[key] = [_plain(then[key]), _plain(value)]
    if cfg.train.max_steps < step:
        raise ConfigError(f"train.max_steps is {cfg.train.max_steps} but checkpoint {checkpoint} is at step {step}, "
                          f"where this run resumes; give train.max_steps={step} or more, or start over with "
                          f"train.resume=never")
    return changes


def describe(changes: dict[str, list]) -> str:
    """`optim.weight_decay 0.0 -> 0.1, train.max_steps 100 -> 200` for the log line."""
    return ", ".join(f"{k} {_text(old)} -> {_text(new)}" for k, (old, new) in changes.items())


def _refusal(key: str, then: dict[str, Any], now: dict[str, Any]) -> str | None:
    if key == "loss.recon":
        return ("the checkpoint holds the gaussian likelihood's learned log-variance"
                if "gaussian" in (then[key], now[key]) else None)
    if key == "loss.gaussian_logvar" and then.get("loss.recon") != "gaussian":
        return None  # no learned log-variance in the checkpoint
    if key.startswith("loss.adversarial.disc_") and not then.get("loss.adversarial.weight"):
        return None  # trained without the adversarial stage: the discriminator starts afresh anyway
    if key == "loss.vf.weight":  # the latent projection is in the checkpoint exactly when the alignment was on
        return ("the checkpoint's loss state holds the latent alignment's projection exactly when loss.vf.weight > 0"
                if (then[key] > 0) != (now[key] > 0) else None)
    if key in ("loss.vf.backbone", "loss.vf.layers") and not then.get("loss.vf.weight"):
        return None  # trained without the alignment: no projection in the checkpoint
    return rule(key)


def _flat(values: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flat(v, key) if isinstance(v, dict) else {key: v})
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal as the config holds them (JSON turned a BlockSpec list into dicts, tuples into lists)."""
    return json.dumps(_plain(a), sort_keys=True) == json.dumps(_plain(b), sort_keys=True)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _text(value: Any) -> str:
    value = _plain(value)
    return value if isinstance(value, str) else json.dumps(value)
