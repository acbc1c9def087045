"""The batch-size search: doubling then bisection on known memory curves, and on the CPU a real training
step at the returned size that runs within the budget in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, TEST_ENV
from pipeline.batchsize import GB, largest_batch

TINY = ["model.arch=conv", "model.channels=[8,16]", "model.latent_dim=8"]


class Curve:
    """A device whose step at batch b needs base + per_image * b bytes and has `capacity` bytes."""

    def __init__(self, base: int, per_image: int, capacity: float = float("inf")):
        self.base, self.per_image, self.capacity = base, per_image, capacity
        self.calls: list[int] = []

    def __call__(self, b: int) -> int | None:
        self.calls.append(b)
        need = self.base + self.per_image * b
        return None if need > self.capacity else need  # None: out of memory


@pytest.mark.parametrize("base, per_image, budget, expected", [
    (100, 3, 400, 100),      # exactly at the budget fits
    (100, 3, 399, 99),
    (100, 3, 102, 0),        # not even one image
    (0, 1, 1, 1),
    (10, 7, 10 + 7 * 37, 37),
])
def test_search_finds_the_largest_size_within_a_budget(base, per_image, budget, expected):
    r = largest_batch(Curve(base, per_image), budget, limit=10_000)
    assert r.batch_size == expected
    if expected:
        assert r.peak_bytes == base + per_image * expected <= budget


def test_search_on_out_of_memory_alone_like_a_gpu():
    curve = Curve(1000, 10, capacity=1000 + 10 * 301)
    r = largest_batch(curve, float("inf"), limit=100_000)
    assert r.batch_size == 301
    assert curve.calls[:10] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]  # doubling, then bisection
    assert len(curve.calls) <= 10 + 9


def test_search_stops_at_the_limit_and_never_runs_far_over_the_budget():
    assert largest_batch(Curve(0, 1), 10**9, limit=100).batch_size == 100
    assert largest_batch(Curve(0, 1), 10**9, limit=64).batch_size == 64
    curve = Curve(0, 1000)  # 1000 bytes per image, budget 5000: sizes far above 5 must not even be tried
    assert largest_batch(curve, 5000, limit=10**6).batch_size == 5
    assert max(curve.calls) <= 8


def _cli(shards, *args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "pipeline.batchsize", "recipes/demo.yaml", f"data.shards={shards}",
                        *TINY, *args, "--json"], cwd=ROOT, env=TEST_ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_cpu_batch_size_runs_within_the_budget_and_twice_it_does_not(tiny_shards):
    # The budget: what one training step at batch 1 costs in a fresh process, plus 80 MB.
    base = _cli(tiny_shards, "--probe", "1")["peak_bytes"]
    budget = base + 80 * 2**20
    found = _cli(tiny_shards, "--budget-gb", str(budget / GB))
    b = found["batch_size"]
    assert b >= 8 and found["peak_bytes"] <= budget and found["budget_bytes"] == int(budget)
    # Proof: a fresh training process at that size peaks within the budget; one at twice the size does not.
    assert _cli(tiny_shards, "--probe", str(b))["peak_bytes"] <= budget
    assert _cli(tiny_shards, "--probe", str(2 * b))["peak_bytes"] > budget
