"""The dependencies point one way: pyproject.toml's import-linter contracts, checked on every run of the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

CONTRACTS = 4


def test_every_import_contract_is_kept() -> None:
    # Each contract was seen to break on a probe: `import fastapi` in service/core and an import of the HTTP
    # front in the gRPC front each made `lint-imports` report that contract BROKEN and exit 1.
    lint = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert f"Contracts: {CONTRACTS} kept, 0 broken." in run.stdout
