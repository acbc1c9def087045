"""pipeline/preemption.py: the stop flag's own gloo group gives up on a rank that never answers after
GROUP_TIMEOUT (5 minutes), not gloo's default 30 minutes of silence. Two real gloo processes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, TEST_ENV, free_port

pytestmark = pytest.mark.slow

# Rank 1 joins the group, then never takes part in the flag's all-reduce (a node that hangs or is gone);
# rank 0 asks twice, and the second call waits for the first all-reduce. GROUP_TIMEOUT made 2 s here.
RANK = """
import sys, time
from datetime import timedelta
import torch.distributed as dist
from pipeline import preemption

rank, port = int(sys.argv[1]), sys.argv[2]
preemption.GROUP_TIMEOUT = timedelta(seconds=2)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
flag = preemption.StopFlag()
if rank == 1:
    time.sleep(60)
    sys.exit(0)
start = time.monotonic()
try:
    flag.should_stop()
    flag.should_stop()
except RuntimeError as e:
    print(f"gave up after {time.monotonic() - start:.0f} s: {str(e).splitlines()[0][:200]}", flush=True)
"""


def test_the_stop_flag_gives_up_on_a_silent_rank_after_its_group_timeout():
    port = free_port()
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(rank), str(port)], cwd=ROOT, env=TEST_ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        out, _ = ranks[0].communicate(timeout=40)  # without the group's timeout: 30 minutes
    finally:
        for p in ranks:
            p.kill()
            p.wait()
    assert "gave up after" in out, out[-3000:]
    assert int(out.split("gave up after ")[1].split(" s")[0]) < 10
