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
    bench_gpu._reset_accelerate()  # leave no mixed-precision state behind for other tests


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_says_so_in_one_sentence(capsys):
    assert bench_gpu.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: make bench-gpu needs a CUDA GPU"), err


def test_cpu_quick_smoke_prints_the_table(tiny_shards, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bench_gpu.main(["--device", "cpu", "--quick", "--shards", str(tiny_shards), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| precision | compile | channels_last | adversarial | images/s per GPU | MFU | data wait |" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [(r["precision"], r["adversarial"]) for r in rows] == [("no", False), ("bf16", True)]
    for r in rows:
        assert not r["error"] and r["images_per_second"] > 0 and 0 <= r["data_wait"] < 1 and r["mfu"] is None
