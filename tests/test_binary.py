"""The built one-file binary, end to end (scripts/smoke-binary). Building takes minutes, so this
runs only when ADIUVA_TEST_BINARY names a built binary:

    scripts/build-binary && ADIUVA_TEST_BINARY=dist/adiuva .venv/bin/python -m pytest tests/test_binary.py

ADIUVA_TEST_BINARY_MAX_START (seconds) also fails the test when the median cold start is slower.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BINARY = os.environ.get("ADIUVA_TEST_BINARY")

pytestmark = pytest.mark.skipif(not BINARY, reason="set ADIUVA_TEST_BINARY to a built binary (scripts/build-binary)")


def test_built_binary_passes_the_smoke_test():
    args = [sys.executable, str(REPO / "scripts" / "smoke-binary"), str(Path(BINARY).resolve()), "--starts", "3"]
    if os.environ.get("ADIUVA_TEST_BINARY_MAX_START"):
        args += ["--max-start", os.environ["ADIUVA_TEST_BINARY_MAX_START"]]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok: SIGTERM: exit code 0" in result.stdout
