"""What ``import regionclip`` does to the process: no torch, and the OpenMP wait policy."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = ("import os, sys\n"
         "import regionclip\n"
         "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)\n")


def _import_regionclip(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # conftest sets it here
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                          env={**clean, **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_import_sets_a_passive_omp_wait_policy_before_torch_loads():
    """From Python, detect ran 7-12x slower than from the CLI on a busy machine: only the CLI set it."""
    assert _import_regionclip() == "PASSIVE False"


def test_a_users_omp_wait_policy_is_kept():
    assert _import_regionclip(OMP_WAIT_POLICY="ACTIVE") == "ACTIVE False"
