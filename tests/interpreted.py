"""Run a snippet under Triton's interpreter (TRITON_INTERPRET=1: Triton kernels on CPU tensors). The interpreter is
chosen when `triton.jit` decorates, so the snippet runs in a child process with the variable set; it prints one
JSON line last, which comes back as a dict (tests/test_triton_interpreter.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_interpreted(code: str, timeout: int = 900) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
