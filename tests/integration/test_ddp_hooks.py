"""edgeddl's compressors as PyTorch DDP comm hooks, under `torchrun --nproc-per-node 2`
(gloo, CPU): `none` is plain DDP to the bit, every compressor keeps the replicas equal and
learns, and the sparse ones send a fraction of the bytes (`ddp_worker.py` does the runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from edgeddl.ddp import CompressionState

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("ddp") / "runs.json"
    worker = Path(__file__).parent / "ddp_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*cmd, str(worker), str(out)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(out.read_text()))


def test_none_is_plain_ddp_to_the_bit(runs: dict[str, Any]) -> None:
    assert runs["none"]["trajectory"] == runs["plain"]["trajectory"]
    assert runs["none"]["bytes_sent"] == runs["none"]["dense_bytes"] > 0


def test_powersgd_agrees_with_torchs_own_hook(runs: dict[str, Any]) -> None:
    """Matched settings (`ddp_worker.MATCHED`: rank 4, compression from the third step,
    no error feedback, torch's `min_compression_rate=1`, torch started from edgeddl's Q):
    the two trajectories agree to float tolerance, and differ from plain DDP's."""
    ours, theirs, plain = (
        torch.tensor(runs[k]["trajectory"]) for k in ("powersgd_matched", "torch_powersgd", "plain")
    )
    assert (ours - theirs).abs().max() < 1e-5
    assert (ours[-1] - plain[-1]).abs().max() > 1e-2  # compressed: not plain DDP
    assert torch.equal(ours[:2], plain[:2])  # the dense first steps


@pytest.mark.parametrize(
    ("name", "most"),
    [
        ("two_step", 0.12),
        ("topk", 0.12),
        ("dgc", 0.12),
        ("randomk", 0.3),
        ("qsgd", 0.2),
        ("powersgd", 0.25),
        ("fp16", 0.55),
    ],
)
def test_every_compressor_keeps_replicas_equal_learns_and_sends_less(
    runs: dict[str, Any], name: str, most: float
) -> None:
    r, plain = runs[name], runs["plain"]
    assert r["replicas_equal"]
    assert r["last_loss"] < r["first_loss"] - 0.3  # plain DDP: 2.31 -> 1.83
    assert r["accuracy"] > plain["accuracy"] - 0.05
    assert 0 < r["bytes_sent"] < most * r["dense_bytes"]


def test_bad_settings_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="dense_steps must be >= 1"):
        CompressionState("topk", dense_steps=0)
    with pytest.raises(ValueError, match="density must be in"):
        CompressionState("topk", density=2.0)
    with pytest.raises(ValueError, match="did you mean 'topk'"):
        CompressionState("toppk")
    with pytest.raises(ValueError, match="unknown option 'densty'; allowed: adapt_threshold"):
        CompressionState("topk", densty=0.1)


def test_the_example_script_learns_with_a_fraction_of_the_bytes() -> None:
    example = Path(__file__).parents[2] / "examples" / "ddp_two_step.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run([*cmd, str(example)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]  # "accuracy 0.984; sent N bytes, 6.8% of dense"
    accuracy, share = float(last.split()[1].rstrip(";")), float(last.split()[-3].rstrip("%"))
    assert accuracy > 0.9 and share < 10.0, last
