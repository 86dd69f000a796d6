"""Run one benchmark job in a fresh process, so the peak memory measured is that job's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def measure(script: str, args: list[str]) -> tuple[dict, float]:
    """``python script --job *args`` -> (the JSON it prints, its peak RSS in MB)."""
    proc = subprocess.Popen([sys.executable, script, "--job", *args], stdout=subprocess.PIPE)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"benchmark job {args} failed")
    return json.loads(out), usage.ru_maxrss / 1024
