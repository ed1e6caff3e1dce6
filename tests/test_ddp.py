"""Two CPU processes under DDP follow the same loss curve as one process at the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import ROOT, offline_env


def curve(devices: int, tmp_path) -> list[float]:
    out = tmp_path / f"losses-{devices}.json"
    result = subprocess.run(
        [sys.executable, "-m", "tests.ddp_curve", str(devices), "16", str(out)],
        cwd=ROOT,
        env=offline_env(tmp_path) | {"OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_two_process_ddp_matches_one_process(tmp_path):
    one, two = curve(1, tmp_path), curve(2, tmp_path)
    assert len(one) == len(two) == 8
    # Same examples, masks and initial weights; the only difference is that each rank averages the
    # MLM loss over its own masked tokens before gradients are averaged, so allow 2% per step.
    for step, (a, b) in enumerate(zip(one, two, strict=True)):
        assert abs(a - b) <= 0.02 * a, f"step {step}: 1 process {a:.4f} vs 2 processes {b:.4f}"
    assert one[-1] < one[0], "the curve should move (training happens)"
