"""benchmarks/bench_gpu.py (make bench-gpu): its CPU smoke path runs the same rows code end to end, and
without CUDA the GPU run refuses in one sentence."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_gpu  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    bench_gpu.reset_accelerate()  # leave no mixed-precision state behind for other tests


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_says_so_in_one_sentence(capsys):
    assert bench_gpu.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: make bench-gpu needs a CUDA GPU"), err


@pytest.mark.slow  # seconds: in make test, not in make test-fast
def test_cpu_quick_smoke_prints_the_table(tiny_shards, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bench_gpu.main(["--device", "cpu", "--quick", "--shards", str(tiny_shards), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| row | images/s per GPU | MFU (VAE+perceptual+disc) | warm-up s | data wait |" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["flowers fp32", "flowers_gan bf16 +cl", "train step vs bare loop", "data cpu"]
    for r in rows:
        assert not r["error"] and r["images_per_second"] > 0 and r["mfu"] is None
    train = [r for r in rows if r["kind"] == "train"]
    assert all(0 <= r["data_wait"] < 1 and r["flops_per_image"]["vae"] > 0 for r in train)
    assert train[1]["flops_per_image"]["discriminator"] > 0 == train[0]["flops_per_image"]["discriminator"]
    assert "operators per step" in rows[2]["detail"] and "CPU us per image" in rows[3]["detail"]


def test_rows_filter_and_budget(tiny_shards, tmp_path, capsys):
    """--rows runs only the matching rows; a row past --budget-s is listed as skipped, not run."""
    out = tmp_path / "rows.json"
    assert bench_gpu.main(["--device", "cpu", "--quick", "--shards", str(tiny_shards), "--out", str(out),
                           "--rows", "flowers", "--budget-s", "0"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["flowers fp32", "flowers_gan bf16 +cl"]
    assert all(r["error"].startswith("skipped: past the 0 s budget") for r in rows)
