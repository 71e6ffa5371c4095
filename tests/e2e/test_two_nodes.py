"""Losing the node that holds the model replica: the service answers again once it is replaced."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(400)
def test_service_recovers_after_the_model_node_is_lost(tiny_checkpoints):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("two_node_scenario.py"))], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=380)
    steps = [line for line in done.stdout.splitlines() if line.startswith(("answers", "node", "new node"))]
    assert steps == ["answers before: True", "node removed", "new node added", "answers after: True"], \
        done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0
