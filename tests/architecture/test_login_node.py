"""What runs on a login node imports no torch: `make submit DRY_RUN=1`, `esa validate`, `esa analyze`,
`make status`, `esa plan-memory` and building any command's parser."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def torch_free(code: str, tmp_path: Path) -> None:
    """Run `code` in a fresh interpreter; it must finish without torch or transformers imported."""
    check = (code + "\nimport sys\nheavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
             "assert not heavy, f'imported {heavy}'\n")
    env = {**os.environ, "ESA_RUNS": str(tmp_path / "runs"),
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    r = subprocess.run([sys.executable, "-c", check], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("phase", [1, 2, 3])
def test_submit_dry_run(tmp_path, phase):
    torch_free(f"from jobs.cli import main\nassert main(['submit', '--phase', '{phase}', '--dry-run']) == 0", tmp_path)


def test_validate_and_status(tmp_path):
    torch_free("from esa.cli import main\n"
               "assert main(['validate', 'manifests/phase2.toml', 'manifests/tiny/phase3.toml']) == 0\n"
               "from jobs.plans import load_plan, write_expanded\n"
               "run = load_plan('manifests/tiny/phase2.toml')\nwrite_expanded(run)\n"
               "paths = [str(run.manifest_path(j)) for j in run.jobs]\n"
               "assert main(['validate', *paths]) == 0\n"
               "from jobs.cli import main as jobs_main\nassert jobs_main(['status', str(run.layout.root), '--no-sacct']) == 0",
               tmp_path)


def test_analyze(tmp_path):
    torch_free(f"from fixtures.synthetic import example_run\nexample_run({str(tmp_path / 'run')!r})\n"
               f"from esa.cli import main\nassert main(['analyze', {str(tmp_path / 'run')!r}]) == 0", tmp_path)


def test_plan_memory(tmp_path):
    torch_free("from esa.cli import main\n"
               "assert main(['plan-memory', '--model', 'llama-3.1-8b', '--metric', 'grad_x_weight', '--seq-len', "
               "'2048', '--batch-size', '1', '--dtype', 'bf16', '--gpu-memory', '80G', '--json']) == 0", tmp_path)


def test_profile_dry_run(tmp_path):
    torch_free("from esa.cli import main\n"
               "assert main(['profile', '--model', 'mixtral-8x7b', '--metric', 'grad_x_weight', '--seq-len', '2048', "
               "'--dry-run', '--gpu-memory', '80G', '--out-dir', '/tmp/never-written']) == 0\n"
               "import os\nassert not os.path.exists('/tmp/never-written')", tmp_path)
