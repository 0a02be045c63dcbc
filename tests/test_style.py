"""Style: the code passes ruff's lint and format as configured in pyproject.toml, with the ruff
that the pre-commit hook runs, so that the hook and the suite (CI) enforce the same rules.

Fix a failure with `ruff check --fix . && ruff format .` (CONTRIBUTING.md, Style)."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def ruff(*args: str) -> subprocess.CompletedProcess:
    """`ruff ARGS` from the repository root, with the ruff installed beside this Python (the test extra)."""
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_ruff_check_passes():
    done = ruff("check", "--output-format", "concise", ".")
    assert done.returncode == 0, f"`ruff check .` failed (fix: ruff check --fix .):\n{done.stdout}{done.stderr}"


def test_ruff_format_check_passes():
    done = ruff("format", "--check", ".")
    assert done.returncode == 0, f"`ruff format --check .` failed (fix: ruff format .):\n{done.stdout}{done.stderr}"


def test_pre_commit_hook_runs_the_installed_and_pinned_ruff():
    done = ruff("--version")
    assert done.returncode == 0, done.stdout + done.stderr
    installed = done.stdout.split()[-1]  # "ruff 0.17.6"
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    (hook,) = [repo for repo in config["repos"] if repo["repo"].endswith("/ruff-pre-commit")]
    assert hook["rev"] == f"v{installed}", f".pre-commit-config.yaml runs ruff {hook['rev']}, this venv has {installed}"
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    pins = re.findall(r"^ruff==(\S+)$", setup["options.extras_require"]["test"], re.M)
    assert pins == [installed], f"setup.cfg's test extra pins ruff {pins}, this venv has {installed}"
