"""The layers of the code hold: ``lint-imports`` with the contracts in ``pyproject.toml``
(the passes never import fxstream; the runtime never imports sympy, the passes or the planner;
every module imports only from the layers below it)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept():
    exe = Path(sys.executable).parent / "lint-imports"
    assert exe.exists(), "import-linter is missing: pip install -e '.[dev]'"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([str(exe), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout
