"""The documentation stays true: the site builds strictly, and every Python block in docs/ and
the README runs (on the tiny backbone) or is marked as needing real weights."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from csdiff.cli import main

ROOT = Path(__file__).resolve().parents[1]
# the line before a block that cannot run offline, e.g. `<!-- docs-test: needs real weights -->`
SKIP_MARK = re.compile(r"<!-- docs-test: needs (real weights|network) -->")
FENCE = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def markdown_pages() -> list[Path]:
    return sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])


def python_blocks(page: Path) -> list[tuple[int, str, bool]]:
    """(line, code, marked as needing real weights) of each ```python block of a page."""
    text = page.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        blocks.append((line, match.group(1), bool(SKIP_MARK.search(before))))
    return blocks


PAGES_WITH_CODE = [p for p in markdown_pages() if python_blocks(p)]


def test_every_python_block_is_found():
    """The pages the tests below run: a change of fence style must not make them run nothing."""
    names = {p.relative_to(ROOT).as_posix() for p in PAGES_WITH_CODE}
    assert {"README.md", "docs/concepts.md", "docs/guides/features.md", "docs/guides/segmentation.md"} <= names


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A quickstart checkpoint, for the blocks that load `last.ckpt` (one training step)."""
    from test_segmentation_cli import quick_args

    work = tmp_path_factory.mktemp("docs_fit")
    args = ["fit", *quick_args(work), "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"]
    assert main(args) == 0
    return next((work / "logs").rglob("last.ckpt"))


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_blocks_run(page, tmp_path, monkeypatch, request):
    """Each page's blocks run in order in one namespace, in an empty folder (holding a trained
    `last.ckpt` where a block loads one)."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for line, code, needs_weights in python_blocks(page):
        if needs_weights:
            continue
        if "last.ckpt" in code and not Path("last.ckpt").exists():
            Path("last.ckpt").symlink_to(request.getfixturevalue("checkpoint"))
        try:
            exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"{page.relative_to(ROOT)}, block at line {line}: {err!r}") from err


def test_site_builds_strictly(tmp_path, monkeypatch, caplog):
    """`mkdocs build --strict`: a broken link or anchor, a missing page, an API object that does
    not exist or a docstring that contradicts its signature fails; the CLI reference is each
    verb's own --help."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config
    from mkdocs.exceptions import Abort

    monkeypatch.chdir(ROOT)  # snippets (--8<--) are read relative to the working directory
    monkeypatch.setenv("NO_MKDOCS_2_WARNING", "1")
    config = load_config(str(ROOT / "mkdocs.yml"), strict=True, site_dir=str(tmp_path / "site"))
    with caplog.at_level(logging.WARNING, logger="mkdocs"):
        try:
            build(config)
        except Abort as err:
            warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            raise AssertionError(f"{err}\n" + "\n".join(warnings)) from None
    site = tmp_path / "site"
    cli = (site / "reference" / "cli" / "index.html").read_text()
    assert "usage: csdiff layers" in cli and "--trainer.max_epochs" in cli and "--images" in cli
    api = (site / "reference" / "api" / "backbone" / "index.html").read_text()
    assert "DiffusionFeatureExtractor" in api and "feature_shapes" in api
    assert (site / "changelog" / "index.html").read_text().count("Unreleased") >= 1


def test_readme_stays_short_and_links_into_the_docs():
    """The README is the front page (what, the two commands, the tasks, where to read on, how to
    cite); the documentation lives in docs/. Its links to docs/ pages must exist."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    links = re.findall(r"\]\((docs/[^)#]+)", text)
    assert links and all((ROOT / link).exists() for link in links), [
        link for link in links if not (ROOT / link).exists()
    ]
