"""Everything a run reports: metrics.jsonl and media/ PNGs in the run folder, and the same to W&B.

    tracker = Tracker(cfg, run_dir, accelerator)       # every rank; only the main process acts
    tracker.log_scalars(step, {"loss/recon": 0.12, "train/lr": 1e-3})
    tracker.log_media(step, ema_model, val_images)     # recon, samples, interpolations, traversals
    tracker.log_eval(step, {"val/psnr": 24.0, "kl_per_dim": [...]})  # scalars + a bar chart per vector
    tracker.set_summary({"images_per_second": 812.0}); tracker.finish(exit_code)

W&B mode comes from `tracking.mode`: offline (default; files under run_dir/wandb, upload later with
`wandb sync run_dir/wandb/offline-run-*`), online, or disabled (no W&B at all; metrics.jsonl and
the PNGs are still written). The W&B run id is created once and kept in run_dir/wandb_run_id, so a
resumed or requeued job continues the same W&B run (`resume="allow"`).

W&B is driven with `wandb.init` on the main process rather than `accelerator.init_trackers`: the
tracker needs the run object itself (wandb.Image, summary, finish with an exit code, preemption
mark), must work without an Accelerator (evaluate/sample scripts, tests), and Accelerate's wrapper
would add only another place for the same init arguments.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from pipeline import durable, faults, media, wandb_log
from pipeline.config import Config, ConfigError, to_dict
from pipeline.preemption import EXIT_PREEMPTED
from pipeline.runs import STARTS_FILE

RUN_ID_FILE = "wandb_run_id"
METRICS_FILE = "metrics.jsonl"
MAX_INTERPOLATION_PAIRS = 4
MEDIA_KINDS = ("recon", "samples", "expost", "interpolations", "traversals", "disc")
"""The panels log_media draws (media/<kind>-<step>.png, W&B key media/<kind>); other PNGs in media/
are log_eval's bar charts (W&B key val/<name>)."""


def _plain(value: Any) -> Any:
    """A JSON-friendly value: one-element tensors and numpy numbers become Python numbers; ints,
    floats, strings, lists and dicts pass unchanged."""
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.detach().float().item()  # a GPU sync; callers log on log steps only
    if isinstance(value, (np.generic, np.ndarray)) and np.size(value) == 1:
        return value.item()
    return value


def _is_scalar(value: Any) -> bool:
    if isinstance(value, (Tensor, np.ndarray)):
        return value.size == 1 if isinstance(value, np.ndarray) else value.numel() == 1
    return not isinstance(value, (list, tuple))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file, in order (a line cut short by a kill is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _open_metrics(path: Path):
    """Open metrics.jsonl for appending. A process killed mid-write can leave a last line without
    its newline; that fragment is not a complete record, so it is cut off (every line stays valid
    JSON for readers) and appending starts on a fresh line. Complete lines are never touched."""
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb+") as f:
            data = f.read()
            if not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")


def load_or_create_run_id(run_dir: Path) -> str:
    """The W&B run id of this run folder: read from run_dir/wandb_run_id, or created and stored."""
    path = run_dir / RUN_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # 8 chars of [0-9a-f]: valid for W&B, unique per run folder
    durable.write_text(path, run_id + "\n")
    return run_id


class Tracker:
    """Scalars, media, evaluation figures and the summary of one run; a no-op off the main process.

    Files (main process): run_dir/metrics.jsonl (one JSON object per call: {"step": s, "segment": n,
    key: value}; n counts the starts of the run folder, so rows re-logged after a restart are told apart),
    run_dir/media/<kind>-<step:06d>.png, run_dir/wandb_run_id, run_dir/wandb/ (offline/online).
    """

    def __init__(self, cfg: Config, run_dir: str | Path, accelerator: Any = None, segment: int = 0,
                 resumed_step: int = 0):
        self.cfg = cfg
        self.resumed_step = resumed_step  # the checkpoint step this start continues from (0: a fresh run)
        self.segment = segment  # which start of the run folder this is (runs.RunLock.record_start)
        self.run_dir = Path(run_dir)
        self.accelerator = accelerator
        self.active = accelerator is None or bool(accelerator.is_main_process)
        self.mode = cfg.tracking.mode
        self.run = None  # the wandb Run (offline/online, main process)
        self.wandb_floor: int | None = None  # steps up to this one are in earlier segments' W&B history
        self._fixed_z: Tensor | None = None
        self._metrics = None
        self.last_scalars: dict[str, Any] = {}  # the latest value of every scalar logged (main process)
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = _open_metrics(self.run_dir / METRICS_FILE)
        if self.mode != "disabled":
            self.run = self._init_wandb()
            self._backfill()

    # -- W&B --------------------------------------------------------------------------------

    def _init_wandb(self):
        import wandb

        run_id = load_or_create_run_id(self.run_dir)
        # A restarted run replays the steps after its checkpoint; W&B gets only the steps after the last
        # one the earlier segments hold (read from their files), so segments never overlap in steps and
        # `make sync` appends them as one history. metrics.jsonl keeps everything (with `segment`).
        self.wandb_floor = wandb_log.last_step(self.run_dir, run_id)
        settings = wandb.Settings(
            console="off",  # the trainer's own output (tqdm) is for the terminal, not the run
            save_code=False,
            allow_val_change=True,  # a resumed run may override a value (e.g. train.max_steps)
            reinit="finish_previous",  # "return_previous" (the default) would hand back a stale run
        )
        try:
            return wandb.init(
                project=self.cfg.tracking.project,
                entity=self.cfg.tracking.entity or None,
                group=self.cfg.tracking.group or None,
                name=self.cfg.run.name or self.cfg.name or self.run_dir.name,
                id=run_id,
                resume="allow",
                dir=str(self.run_dir),
                mode=self.mode,
                config={**to_dict(self.cfg), "code": code_version()},
                settings=settings,
            )
        except Exception as e:  # wandb raises UsageError/CommError/timeouts when it cannot start
            if self.mode != "online":
                raise
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(
                f"tracking.mode is online but W&B could not start ({reason.rstrip('.')}); log in with "
                f"`wandb login`, or set tracking.mode=offline and upload later with `make sync`"
            ) from None

    def _backfill(self) -> None:
        """Give W&B the steps up to the checkpoint this start resumes from that no earlier segment's
        file holds, from metrics.jsonl and media/ (both written line by line, file by file).

        A killed process loses the W&B records wandb-core had not written yet: offline it writes the
        transaction log in 32 KiB blocks and flushes only at the end (core/internal/stream/writer.go:
        offline work is never handed on, so nothing asks for a flush), so a short killed segment's file
        may hold no history at all. The steps after the checkpoint are trained again and logged live."""
        if self.mode == "online" and self.run.resumed:  # the server knows what earlier starts sent
            self.wandb_floor = max(self.wandb_floor or 0, self.run.starting_step - 1)
        floor = self.wandb_floor or 0
        if self.resumed_step <= floor:
            if self.wandb_floor is not None:
                print(f"W&B: run {self.run.id} holds steps up to {floor}; this start logs from step {floor + 1}")
            return
        import wandb

        rows: dict[int, dict[int, dict]] = {}  # step -> segment -> what that segment logged for it
        for row in read_metrics(self.run_dir / METRICS_FILE):
            step, segment = int(row.pop("step")), int(row.pop("segment", 0))
            if floor < step <= self.resumed_step:
                rows.setdefault(step, {}).setdefault(segment, {}).update(row)
        for step in sorted(rows):
            data = dict(rows[step][max(rows[step])])  # the latest segment's values for that step
            for png in sorted((self.run_dir / "media").glob(f"*-{step:06d}.png")):
                kind = png.name[: -len(f"-{step:06d}.png")]
                section = "media" if kind in MEDIA_KINDS else "val"
                data[f"{section}/{kind}"] = wandb.Image(str(png), caption=f"{png.name} (from the run folder)")
            self.run.log(data, step=step)
        print(f"W&B: run {self.run.id} holds steps up to {floor}; logged {len(rows)} more up to step "
              f"{self.resumed_step} from metrics.jsonl and media/, and logs from step {self.resumed_step + 1}")
        self.wandb_floor = self.resumed_step

    @property
    def wandb_dir(self) -> Path | None:
        """This process's W&B run folder (run_dir/wandb/offline-run-<time>-<id>), or None."""
        return Path(self.run.dir).parent if self.run is not None else None

    # -- cadence (pure functions of the config: the same answer on every rank) -----------------

    def is_due(self, kind: str, step: int, final: bool = False) -> bool:
        """Whether `kind` ("scalars" | "media" | "eval") is due after optimizer step `step`."""
        every = {"scalars": self.cfg.tracking.log_every_steps,
                 "media": self.cfg.tracking.media_every_steps,
                 "eval": self.cfg.tracking.eval_every_steps}[kind]
        return final or step % every == 0

    # -- logging ------------------------------------------------------------------------------

    def log_scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """One metrics.jsonl line {"step": step, **values} (flushed) and wandb log at `step`."""
        if not self.active:
            return
        row = {k: _plain(v) for k, v in values.items()}
        self._write_metrics(step, row)
        if self._to_wandb(step):
            self.run.log(row, step=step)

    def _to_wandb(self, step: int) -> bool:
        """Whether `step` goes to W&B: a run is open and no earlier segment logged this step."""
        return self.run is not None and (self.wandb_floor is None or step > self.wandb_floor)

    def _write_metrics(self, step: int, row: Mapping[str, Any]) -> None:
        self.last_scalars.update(row)
        head = {"step": int(step), "segment": self.segment} if self.segment else {"step": int(step)}
        line = json.dumps({**head, **row}, allow_nan=True)
        try:
            self._metrics.write(line + "\n")  # one write per line: a kill tears at most the last line
            self._metrics.flush()
        except OSError as e:  # a full disk: one sentence, not a traceback
            raise durable.write_error(Path(self._metrics.name), e) from None

    def fixed_noise(self, model: nn.Module) -> Tensor:
        """The prior-sample noise, drawn once per run from train.seed (the same on every resume)."""
        if self._fixed_z is None:
            g = torch.Generator().manual_seed(self.cfg.train.seed)
            model, n = self._unwrap(model), self.cfg.tracking.media_images
            if getattr(model, "quantizer", None) is not None:  # uniformly random codes (no prior over codes)
                self._fixed_z = torch.randint(model.quantizer.num_codes, (n, *model.code_grid), generator=g)
            else:
                self._fixed_z = torch.randn((n, *model.latent_shape), generator=g)
        return self._fixed_z

    def _unwrap(self, model: nn.Module) -> nn.Module:
        # DDP / torch.compile wrappers -> the VAE; media never calls the DDP forward (other ranks
        # are not in this call), only encode/decode of the bare module.
        if self.accelerator is not None:
            return self.accelerator.unwrap_model(model)
        return getattr(model, "_orig_mod", getattr(model, "module", model))

    def log_media(self, step: int, model: nn.Module, val_images: Tensor, fixed_z: Tensor | None = None,
                  pairs: Sequence[tuple[int, int]] | None = None, critic: nn.Module | None = None,
                  expost=None) -> dict[str, Path]:
        """Reconstruction grid, prior samples, interpolation strips and traversals of the highest-KL
        latent dims, all from the same fixed inputs every time so steps are comparable.

        val_images: a fixed validation batch [B, C, H, W], uint8 (scaled to the model's output range
          here, as DeviceAugment does) or float already in that range; the first
          tracking.media_images are shown.
        fixed_z: prior noise [N, *latent_shape]; default: fixed_noise(model).
        pairs: (i, j) index pairs into val_images for the interpolation strips; default (0, 1), (2, 3), ...
        critic: the adversarial stage's discriminator (bare), or None; adds the `disc` panel of its patch
          logits on the inputs and on their reconstructions.
        expost: the ex-post prior fitted to this model (pipeline.prior.ExpostPrior), or None; adds the
          `expost` panel of its samples (drawn from a generator seeded with train.seed) beside `samples`.
        Writes run_dir/media/{recon,samples,expost,interpolations,traversals,disc}-<step:06d>.png; returns them.
        """
        if not self.active:
            return {}
        model = self._unwrap(model)
        t = self.cfg.tracking
        images = self._as_model_input(val_images, model)[: t.media_images]
        if pairs is None:
            pairs = [(i, i + 1) for i in range(0, len(images) - 1, 2)][:MAX_INTERPOLATION_PAIRS]
        z = fixed_z if fixed_z is not None else self.fixed_noise(model)
        with media.evaluating(model):
            mu, logvar = model.encode(images.to(media.model_device(model)))
        quantized = logvar is None  # z_e before quantization: rank dims by mean z_e^2 / 2 instead of KL
        logvar = torch.zeros_like(mu) if quantized else logvar
        kl = media.kl_per_dim(mu, logvar)
        dims = media.top_kl_dims(mu, logvar, t.traverse_dims)
        pictures = {
            "recon": (media.reconstruction_grid(model, images), "inputs (top), reconstructions from mu (bottom)"
                      + (" (its nearest codes)" if quantized else "")),
            "samples": (media.prior_samples(model, z),
                        "decoded uniformly random codes (a quantized model has no prior over its codes: train one "
                        "on `python -m pipeline.sample RUN encode ... --payload codes` to sample images)"
                        if quantized else "N(0, I) prior: decoded fixed noise"),
        }
        if expost is not None:
            z_expost = expost.sample(len(z), torch.Generator().manual_seed(self.cfg.train.seed))
            pictures["expost"] = (media.prior_samples(model, z_expost),
                                  f"ex-post prior: decoded samples of {expost.components} "
                                  f"{expost.covariance}-covariance Gaussians fitted to the posterior means of "
                                  f"{expost.meta.get('samples')} train images at this step")
        if pairs:  # none when media_images is 1
            a, b = images[[i for i, _ in pairs]], images[[j for _, j in pairs]]
            pictures["interpolations"] = (media.interpolation_strips(model, a, b, max(2, t.interpolation_steps)),
                                          f"slerp between mu of val pairs {list(pairs)}, one row per pair"
                                          + (" (between z_e before quantization, each point decoded from its "
                                             "nearest codes)" if quantized else ""))
        traversals = media.latent_traversals(model, images[:1], dims)
        pictures["traversals"] = (
            np.concatenate(traversals),
            "rows: latent dims " + ", ".join(f"{d} ({float(kl[d]):.2f} {'mean z_e^2/2' if quantized else 'nats'})"
                                             for d in dims)
            + f"; columns: that dim of mu set to {list(media.TRAVERSAL_VALUES)}")
        if critic is not None:
            panel, means = media.discriminator_panel(model, critic, images)
            pictures["disc"] = (panel, "rows: inputs, the discriminator's patch logits on them, reconstructions "
                                       "from mu, its logits on those (green: judged real, red: judged fake); mean "
                                       f"logit real {means['real']:.3f}, fake {means['fake']:.3f}")
        return self._log_pictures(step, pictures)

    def _as_model_input(self, images: Tensor, model: nn.Module) -> Tensor:
        images = torch.as_tensor(images)
        if images.dtype == torch.uint8:
            lo, hi = model.output_range
            return images.float() / 255.0 * (hi - lo) + lo
        return images.float()

    def _log_pictures(self, step: int, pictures: Mapping[str, tuple[np.ndarray, str]],
                      prefix: str = "media") -> dict[str, Path]:
        paths = {}
        for kind, (arr, _) in pictures.items():
            paths[kind] = media.save_png(arr, self.run_dir / "media" / f"{kind}-{step:06d}.png")
            if prefix == "media":
                faults.kill_at("media", step, main_process=True)  # tests: a kill while drawing media
        if self._to_wandb(step):
            import wandb

            # uint8 arrays: wandb.Image would cast floats to uint8 without scaling (black images)
            self.run.log({f"{prefix}/{kind}": wandb.Image(arr, caption=caption)
                          for kind, (arr, caption) in pictures.items()}, step=step)
        return paths

    def log_eval(self, step: int, metrics: Mapping[str, Any],
                 kl_per_dim: Sequence[float] | Tensor | None = None) -> None:
        """Validation results: scalars to metrics.jsonl and W&B, and a bar chart image for each
        per-dimension vector (kl_per_dim, mu_variance_per_dim, ...) to W&B and media/<name>-<step>.png.

        Keys keep their section ("val/psnr"); a bare key ("count", "kl_per_dim") joins the section
        the other keys share, or "eval/" when they share none.
        """
        if not self.active:
            return
        metrics = dict(metrics)
        if kl_per_dim is not None:
            metrics["kl_per_dim"] = kl_per_dim
        sections = {k.split("/", 1)[0] for k in metrics if "/" in k}
        section = sections.pop() if len(sections) == 1 else "eval"
        named = {(k if "/" in k else f"{section}/{k}"): v for k, v in metrics.items()}
        vectors = {k: torch.as_tensor(v).detach().float().cpu().flatten().numpy()
                   for k, v in named.items() if not _is_scalar(v)}
        row = {k: _plain(v) for k, v in named.items() if k not in vectors}
        self._write_metrics(step, row)
        if self._to_wandb(step):
            self.run.log(row, step=step)
        charts = {}
        for key, values in vectors.items():
            name = key.split("/", 1)[1]
            unit = " (nats)" if name.startswith("kl") else ""
            caption = f"{name}{unit} per latent dimension, sum {float(values.sum()):.4g}"
            if name.startswith("code_frequency"):  # (pipeline.split_metrics.CodeCounts)
                caption = (f"{name}: fraction of the tokens given each code, most used first; "
                           f"{int((values > 0).sum())} of {len(values)} codes used")
            charts[name] = (media.bar_chart(values, title=f"{name}{unit}, step {step}"), caption)
        if charts:
            self._log_pictures(step, charts, prefix=section)

    # -- lineage: what went in, what came out -------------------------------------------------------

    def use_dataset(self, shards_dir: str | Path) -> None:
        """Record the shard set as this run's input: a dataset artifact holding manifest.json (counts,
        classes, every shard's sha256) and references to the tars, which are never uploaded."""
        if self.run is not None:
            with staging_in(self.run_dir):
                use_artifact(self.run, dataset_artifact(shards_dir), self.mode)

    def log_resume_changes(self) -> None:
        """The settings each start changed when it resumed (starts.jsonl's `changed`) into the W&B config as
        changed_on_resume: {segment: {"step", "changed": {key: [then, now]}}}, every start's, so the latest
        update holds them all; the config's own keys hold this start's values."""
        starts = self.run_dir / STARTS_FILE
        if self.run is None or not starts.is_file():
            return
        history = {}
        for line in starts.read_text().splitlines():
            try:
                start = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if start.get("changed"):
                history[str(start["segment"])] = {"step": start["step"], "changed": start["changed"]}
        if history:
            self.run.config.update({"changed_on_resume": history}, allow_val_change=True)

    def log_model(self, weights: Mapping[str, Tensor], aliases: Sequence[str], metadata: Mapping[str, Any]) -> None:
        """Record trained weights (with the run's config.yaml and model_info.json) as a version of the run's
        model artifact. The same weights give the same version (W&B versions by content)."""
        if self.run is not None:
            with staging_in(self.run_dir):
                self.run.log_artifact(model_artifact(self.run_dir, self.run.id, weights, metadata), aliases=list(aliases))

    def set_summary(self, values: Mapping[str, Any]) -> None:
        """Final figures to the W&B run summary (summary.json is the trainer's)."""
        if self.run is not None:
            self.run.summary.update({k: _plain(v) for k, v in values.items()})

    def log_model_info(self, model: nn.Module, flops_per_image: int | None = None,
                       loss_terms: Sequence[str] = ()) -> None:
        """Static facts about the model into the W&B config (model_info.*) and summary: parameter
        count, latent shape, output range, training FLOPs per image and the active loss terms."""
        if self.run is None:
            return
        model = self._unwrap(model)
        count = sum(p.numel() for p in model.parameters())
        info = {"parameters": int(count), "latent_shape": list(model.latent_shape),
                "output_range": list(model.output_range)}
        if flops_per_image is not None:
            info["training_flops_per_image"] = int(flops_per_image)
        if loss_terms:
            info["loss_terms"] = list(loss_terms)
        self.run.config.update({"model_info": info}, allow_val_change=True)
        self.run.summary.update({f"model/{k}": v for k, v in info.items() if not isinstance(v, list)})

    def finish(self, exit_code: int = 0, preempted: bool | None = None) -> None:
        """Close metrics.jsonl and finish the W&B run with `exit_code`. A preempted run (default:
        exit_code == EXIT_PREEMPTED, the SIGUSR1/SIGTERM path before a requeue) is marked
        preempting first, so W&B shows it as preempted rather than failed. Safe to call twice."""
        if preempted is None:
            preempted = exit_code == EXIT_PREEMPTED
        self.active = False  # later calls are no-ops, as on the other ranks
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self.run is not None:
            run, self.run = self.run, None
            if preempted:
                run.mark_preempting()
            run.finish(exit_code=exit_code)
            # run.finish() only *informs* wandb-core, which then flushes run-<id>.wandb on its own
            # schedule (measured: the file can still hold just its 7-byte header when finish()
            # returns). teardown() waits for wandb-core to exit, so the offline run is complete
            # on disk when we return, before a preempted job's grace period runs out.
            import wandb

            wandb.teardown(exit_code=exit_code)


# --------------------------------------------------------------------------------------------
# Lineage: artifacts and the code version (shared with pipeline.evaluate)
# --------------------------------------------------------------------------------------------


def code_version() -> dict[str, Any]:
    """{"commit": the git commit of this checkout, "dirty": whether tracked files differ from it}; None
    for both outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=20)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    if head.returncode != 0 or status.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


@contextlib.contextmanager
def staging_in(run_dir: Path):
    """Stage artifact files inside the run folder (run_dir/wandb/data) unless WANDB_DATA_DIR says
    otherwise: offline, W&B copies an artifact's files to its staging folder for the later upload, and
    `make sync` from a login node must find them where the run is."""
    if "WANDB_DATA_DIR" in os.environ:
        yield
        return
    os.environ["WANDB_DATA_DIR"] = str(run_dir / "wandb" / "data")
    try:
        yield
    finally:
        del os.environ["WANDB_DATA_DIR"]


def use_artifact(run, artifact, mode: str) -> None:
    """Mark `artifact` as an input of `run`, also offline. run.use_artifact refuses offline runs; for an
    artifact not yet logged it logs it with use_after_commit, which is what we call directly offline:
    the record goes to the transaction log and `wandb sync` commits the artifact, then marks it used
    (wandb-core core/pkg/artifacts/saver.go)."""
    if mode == "offline":
        run._log_artifact(artifact, is_user_created=True, use_after_commit=True)
    else:
        run.use_artifact(artifact)


def dataset_artifact(shards_dir: str | Path):
    import wandb

    d = Path(shards_dir)
    m = json.loads((d / "manifest.json").read_text())
    shards = [s for split in ("train", "val") for s in m["splits"][split]["shards"]]
    art = wandb.Artifact(f"shards-{m['name']}", type="dataset", metadata={
        "size": m["size"], "image_format": m["image_format"], "classes": m["classes"],
        "counts": {split: m["splits"][split]["count"] for split in ("train", "val")},
        "sha256": {s["file"]: s["sha256"] for s in shards}, "path": str(d.resolve())})
    art.add_file(str(d / "manifest.json"), name="manifest.json")
    for s in shards:  # references: the tars stay where they are; their sha256 is in the manifest
        path = durable.inside(d, s["file"], f"{d / 'manifest.json'}")
        art.add_reference(f"file://{path.resolve()}", name=s["file"], checksum=False)
    return art


def model_artifact(run_dir: Path, run_id: str, weights: Mapping[str, Tensor], metadata: Mapping[str, Any]):
    """weights.safetensors (a plain state dict of the VAE) + the run's config.yaml and model_info.json."""
    import wandb
    from safetensors.torch import save_file

    art = wandb.Artifact(f"model-{run_id}", type="model", metadata=dict(metadata))
    with tempfile.TemporaryDirectory(dir=run_dir) as tmp:
        path = Path(tmp) / "weights.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(path))
        art.add_file(str(path), name="weights.safetensors")  # copied to the staging folder now
    for name in ("config.yaml", "model_info.json"):
        if (run_dir / name).is_file():
            art.add_file(str(run_dir / name), name=name)
    return art
