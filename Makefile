# Every target installs what it needs first (.venv from pyproject.toml). `make help` lists them.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
TEST_WORKERS ?= 2
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml 2>/dev/null | md5sum | cut -c1-8)

SRC ?= data/flowers
NAME ?= flowers
SIZE ?= 128
RECIPE ?= recipes/flowers.yaml
NPROC ?= 1
ARGS ?=
PARTS ?= 4

# On a machine without GPUs, the pinned (CUDA) torch only forms one gloo process group across
# `--multi_gpu` processes when ACCELERATE_USE_CPU=1 is set; without it each process runs alone.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
LAUNCH_ENV := $(if $(HAS_GPU),,ACCELERATE_USE_CPU=1)
LAUNCH_MULTI := $(if $(filter-out 1,$(NPROC)),--multi_gpu,)

.PHONY: help install demo demo-data shards shards-slurm verify train eval fid-stats export batchsize sweep test test-fast test-slurm bench-data bench-train bench-quality bench-encode encode sync clean demo-signals demo-volumes

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install: $(STAMP)  ## Create .venv and install the pinned dependencies (about 90 s the first time)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*; touch $@

demo: install  ## Build demo shards (offline), train briefly on CPU, write a W&B offline run with media
	@test -f shards/demo/manifest.json || $(MAKE) --no-print-directory demo-data
	WANDB_MODE=offline $(BIN)/python pipeline/train.py recipes/demo.yaml $(ARGS)

demo-data: install  ## Generate the offline demo image folder (data/demo) and shard it into shards/demo
	$(BIN)/python -m pipeline.demo_data data/demo
	$(BIN)/python -m pipeline.shards data/demo --name demo --size 64

demo-signals: install  ## Generate 1-D chirp signals (data/signals1d) and shard them (shards/signals1d) for recipes/signals1d.yaml
	$(BIN)/python -m pipeline.demo_arrays signals data/signals1d
	$(BIN)/python -m pipeline.shards data/signals1d --name signals1d --spatial-dims 1

demo-volumes: install  ## Generate 3-D ellipsoid volumes (data/volumes3d) and shard them (shards/volumes3d) for recipes/volumes3d.yaml
	$(BIN)/python -m pipeline.demo_arrays volumes data/volumes3d
	$(BIN)/python -m pipeline.shards data/volumes3d --name volumes3d --spatial-dims 3

shards: install  ## Shard an image folder: make shards SRC=data/flowers NAME=flowers SIZE=128
	$(BIN)/python -m pipeline.shards $(SRC) --name $(NAME) --size $(SIZE) $(ARGS)

shards-slurm: install  ## Shard on a SLURM array + a merge job: make shards-slurm SRC=data/flowers NAME=flowers PARTS=8 [ARGS="-- -p cpu"]
	$(BIN)/python -m pipeline.shards $(SRC) --name $(NAME) --size $(SIZE) --parts $(PARTS) --slurm $(ARGS)

verify: install  ## Re-hash shards/NAME against its manifest: make verify NAME=flowers
	$(BIN)/python -m pipeline.shards verify shards/$(NAME)

train: install  ## Train: make train RECIPE=recipes/flowers.yaml NPROC=8 ARGS="train.max_steps=100"
	$(LAUNCH_ENV) $(BIN)/accelerate launch $(LAUNCH_MULTI) --num_processes $(NPROC) --num_machines 1 \
		--mixed_precision no --dynamo_backend no pipeline/train.py $(RECIPE) $(ARGS)

eval: install  ## Evaluate a run (PSNR, SSIM, LPIPS, rFID, sharpness, -ELBO, bits/dim, IWAE): make eval RUN=runs/demo
	$(BIN)/python -m pipeline.evaluate $(or $(RUN),runs/demo) $(ARGS)

fid-stats: install  ## rFID reference statistics of a split, cached in shards/NAME/fid_stats: make fid-stats NAME=flowers INCEPTION=weights/weights-inception-2015-12-05-6726825d.pth NPROC=8
	$(LAUNCH_ENV) $(BIN)/accelerate launch $(LAUNCH_MULTI) --num_processes $(NPROC) --num_machines 1 \
		--mixed_precision no --dynamo_backend no -m pipeline.fid_stats shards/$(NAME) \
		--inception-weights $(or $(INCEPTION),weights/weights-inception-2015-12-05-6726825d.pth) $(ARGS)

export: install  ## Export a run's EMA weights: make export RUN=runs/ldm FORMAT=diffusers|safetensors OUT=exported/ldm
	$(BIN)/python -m pipeline.export $(or $(RUN),runs/demo) --format $(or $(FORMAT),safetensors) \
		--out $(or $(OUT),exported/$(notdir $(or $(RUN),runs/demo))) $(ARGS)

batchsize: install  ## Largest per-device batch for a recipe: make batchsize RECIPE=recipes/flowers.yaml
	$(BIN)/python -m pipeline.batchsize $(RECIPE) $(ARGS)

test: install  ## Run the whole test suite on TEST_WORKERS=2 pytest-xdist workers (includes the local two-node Slurm cluster tests)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup $(ARGS)

test-fast: install  ## Unit tests only (skips multi-process, end-to-end and Slurm tests)
	$(BIN)/python -m pytest -q -m "not slow and not slurm" $(ARGS)

test-slurm: install  ## Bring up a local two-node Slurm cluster and run the real sbatch scripts on it
	$(BIN)/python -m pytest -q -m slurm $(ARGS)

bench-data: install  ## Benchmark shard writing and reading vs raw decode, ImageFolder, webdataset; CPU per image by stage per worker count (ARGS="--workers 1,2,4,8,12")
	$(BIN)/python benchmarks/bench_data.py $(ARGS)

bench-train: install  ## Training step vs a bare PyTorch loop: ATen ops per step (flowers, resnet_f8; goal <= 1.10x) and images/s
	$(BIN)/python benchmarks/bench_train.py recipes/flowers.yaml loss.perceptual.weights=none data.batch_size_per_device=4 --ops-only
	$(BIN)/python benchmarks/bench_train.py recipes/resnet_f8.yaml train.compile=false data.batch_size_per_device=4 \
		--image-size 32 --ops-only
	$(BIN)/python benchmarks/bench_train.py $(ARGS)

bench-quality: install  ## Same wall time with and without the adversarial stage (ARGS="--arms latent": plain/+VF/+equivariance/+latent noise): PSNR, SSIM, sharpness, latent probe/HF
	$(BIN)/python benchmarks/bench_quality.py $(ARGS)

encode: install  ## Encode shards into latent shards (resumable): make encode RUN=runs/demo SHARDS=shards/demo OUT=latents/demo NPROC=2
	$(LAUNCH_ENV) $(BIN)/accelerate launch $(LAUNCH_MULTI) --num_processes $(NPROC) --num_machines 1 \
		--mixed_precision no --dynamo_backend no -m pipeline.sample $(or $(RUN),runs/demo) encode \
		$(or $(SHARDS),shards/demo) --format shards --out $(or $(OUT),latents/demo) $(ARGS)

bench-encode: install  ## Benchmark encode --format shards vs a plain loop over the same shards (prints the ratio)
	$(BIN)/python benchmarks/bench_encode.py $(ARGS)
.PHONY: bench-gpu
bench-gpu: install  ## One GPU, <5 min: images/s, MFU, warm-up, memory by precision/compile/channels_last/GAN; step vs bare; data
	$(BIN)/python benchmarks/bench_gpu.py $(ARGS)

sweep: install  ## Run a sweep (Optuna; here, or ARGS="--slurm" for a SLURM array): make sweep SWEEP=recipes/sweeps/demo_kl.yaml
	$(BIN)/python -m pipeline.sweep $(or $(SWEEP),recipes/sweeps/demo_kl.yaml) $(ARGS)

sync: install  ## Upload offline W&B runs (one `wandb sync` per run, segments in order): make sync [RUNS=runs]
	$(BIN)/python -m pipeline.wandb_log sync $(or $(RUNS),runs)

clean:  ## Remove runs/, demo data and shards (keeps .venv)
	rm -rf runs data/demo shards/demo data/signals1d shards/signals1d data/volumes3d shards/volumes3d
