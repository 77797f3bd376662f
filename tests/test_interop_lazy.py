"""jformer.interop imports torch only when a function needs it, and says how to install it if missing."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_importing_interop_does_not_import_torch():
    result = _run("import jformer.interop, sys; assert 'torch' not in sys.modules, 'torch was imported'")
    assert result.returncode == 0, result.stderr


def test_without_torch_a_conversion_says_how_to_install_it():
    # sys.modules["torch"] = None makes `import torch` raise ImportError, as on a machine without it.
    code = """
import sys
sys.modules["torch"] = None
from jformer import interop
try:
    interop.from_torch_encoder(object())
except ImportError as e:
    print(e)
else:
    raise SystemExit("no ImportError")
"""
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert "pip install torch==2.13.0" in result.stdout, result.stdout
