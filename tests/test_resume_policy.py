"""pipeline.resume_policy: a setting changed for a resumed run applies from the checkpoint's step on, or is
refused with one sentence naming the key; and a resumed optimizer trains with this run's hyperparameters.
(End to end, with the record in starts.jsonl and the W&B config: tests/test_train.py's SIGUSR1 test
resumes with changed optimizer settings, then refuses an architecture change.)"""

from __future__ import annotations

import pytest
import torch

from conftest import ROOT
from pipeline.config import ConfigError, OptimConfig, walk, load_config, to_dict

BASE = ["model.arch=conv", "model.channels=[8,16]", "model.latent_dim=8", "train.max_steps=20"]
CHECKPOINT = ROOT / "runs" / "x" / "checkpoints" / "step-000010"


def state_at_step_10(*overrides: str) -> dict:
    """A trainer state as train.py stores it in a checkpoint: the step and the resolved config."""
    return {"step": 10, "config": to_dict(load_config("recipes/demo.yaml", [*BASE, *overrides], check_paths=False))}


def changes(*overrides: str, saved: dict | None = None):
    from pipeline.resume_policy import check_changes

    cfg = load_config("recipes/demo.yaml", [*BASE, *overrides], check_paths=False)
    return check_changes(saved or state_at_step_10(), cfg, CHECKPOINT)


@pytest.mark.parametrize("override, then, now", [
    ("optim.lr=0.01", 0.002, 0.01),
    ("optim.weight_decay=0.1", 0.0, 0.1),
    ("optim.betas=[0.5,0.9]", [0.9, 0.999], [0.5, 0.9]),
    ("optim.eps=1e-6", 1e-8, 1e-6),
    ("optim.schedule=exponential", "cosine", "exponential"),
    ("train.max_steps=50", 20, 50),
    ("loss.kl.weight=0.5", 0.0001, 0.5),
    ("loss.recon=mse", "l1", "mse"),
    ("data.batch_size_per_device=4", 32, 4),
    ("train.mixed_precision=bf16", "no", "bf16"),
    ("model.samples_per_input=2", 1, 2),
    ("loss.adversarial.disc_layers=2", 3, 2),  # trained without the adversarial stage: a new discriminator
    ("tracking.eval_every_steps=7", 400, 7),
])
def test_a_changed_hyperparameter_applies_and_is_reported(override, then, now):
    key = override.split("=")[0]
    assert changes(override) == {key: [then, now]}


@pytest.mark.parametrize("override, said", [
    ("model.latent_dim=16", "trained with model.latent_dim=8 and this run has model.latent_dim=16"),
    ("model.channels=[8,32]", "trained with model.channels=[8, 16] and this run has model.channels=[8, 32]"),
    ("model.output=sigmoid", "model.output=tanh and this run has model.output=sigmoid"),  # same shapes
    ("train.seed=1", "train.seed=0 and this run has train.seed=1"),
    ("data.order=resampled", "data.order=permutation and this run has data.order=resampled"),
    ("loss.recon=gaussian", "loss.recon=l1 and this run has loss.recon=gaussian"),
    ("tracking.best_metric=val/psnr", "tracking.best_metric=val/neg_elbo_nats and this run has"),
    ("train.max_steps=5", "train.max_steps is 5 but checkpoint"),
    ("train.freeze=[encoder]", 'train.freeze=[] and this run has train.freeze=["encoder"]'),  # optimizer's params
])
def test_a_changed_architecture_or_data_order_is_one_sentence_naming_the_key(override, said):
    with pytest.raises(ConfigError) as e:
        changes(override)
    message = str(e.value)
    assert said in message and str(CHECKPOINT) in message and "\n" not in message, message
    key = override.split("=")[0]
    assert f"resume with {key}=" in message or "give train.max_steps=10 or more" in message


def test_where_and_how_a_run_is_started_is_not_a_change_and_old_checkpoints_compare_nothing():
    assert changes("run.name=elsewhere", "run.dir=/tmp", "train.resume=auto", "model.init=/elsewhere") == {}
    assert changes("optim.lr=0.01", saved={"step": 10}) is None  # written before configs were stored
    older = state_at_step_10()
    del older["config"]["optim"]["eps"]  # a key the checkpoint's version did not have yet
    assert changes("optim.eps=1e-6", saved=older) == {}


def test_every_recipe_key_has_a_rule_and_every_refused_key_is_in_the_readme():
    from pipeline.config import Config
    from pipeline.resume_policy import NOT_COMPARED, RULES, rule

    for key, _ in walk(Config()):
        if key not in NOT_COMPARED:
            rule(key)  # raises KeyError for a key nobody decided about
    readme = (ROOT / "README.md").read_text()
    assert [k for k, why in RULES.items() if why and f"`{k}`" not in readme and f"`{k}.*`" not in readme] == []


def test_a_resumed_optimizer_takes_this_runs_hyperparameters_and_keeps_the_checkpoints_moments(tmp_path):
    """torch's load_state_dict replaces the param groups with the saved ones, hyperparameters included."""
    from accelerate import Accelerator

    from pipeline.checkpoint import Checkpointer, Parts
    from pipeline.optim import build_optimizer

    acc = Accelerator(cpu=True)

    def parts(cfg: OptimConfig) -> Parts:
        torch.manual_seed(0)
        model, loss = torch.nn.Linear(4, 4), torch.nn.Module()
        loss.logvar = torch.nn.Parameter(torch.zeros(()))  # the no-decay group
        model, opt = acc.prepare(model, build_optimizer(model.parameters(), [loss.logvar], cfg))
        return Parts(acc.unwrap_model(model), loss, opt, None)

    trained = parts(OptimConfig(weight_decay=0.0, betas=[0.9, 0.999], eps=1e-8))
    for _ in range(3):
        (trained.vae(torch.randn(8, 4)).pow(2).mean() + trained.loss.logvar.pow(2)).backward()
        trained.optimizer.step()
        trained.optimizer.zero_grad()
    ckpt = Checkpointer(tmp_path, acc, every_steps=1, keep=2)
    ckpt.save(3, trained, {"step": 3})

    resumed = parts(OptimConfig(weight_decay=0.1, betas=[0.5, 0.9], eps=1e-6))
    ckpt.load(ckpt.resolve("auto"), resumed)
    decay, no_decay = resumed.optimizer.param_groups
    assert (decay["weight_decay"], decay["betas"], decay["eps"]) == (0.1, (0.5, 0.9), 1e-6)
    assert (no_decay["weight_decay"], no_decay["betas"], no_decay["eps"]) == (0.0, (0.5, 0.9), 1e-6)
    mine, theirs = trained.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(v, theirs[i][k]) for i, s in mine.items() for k, v in s.items())
