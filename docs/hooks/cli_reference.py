"""MkDocs hook: the command-line reference is each verb's own `--help`, captured at build time.

A page line ``<!-- csdiff-help VERB -->`` becomes the output of ``csdiff VERB --help``
(``<!-- csdiff-help -->``: the overview of ``csdiff --help``), so the reference cannot drift
from the parser. The CLI runs in-process: Lightning is imported once for all verbs.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys

MARKER = re.compile(r"^<!-- csdiff-help ?([\w-]*) -->$", re.MULTILINE)
_cache: dict[str, str] = {}


def help_text(verb: str) -> str:
    """What `csdiff VERB --help` prints on a terminal 100 columns wide."""
    if verb not in _cache:
        from csdiff.cli import main

        out = io.StringIO()
        columns = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = "100"
        argv, sys.argv = sys.argv, ["csdiff"]  # the usage line names `csdiff`, not mkdocs
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
                code = main(args=[verb, "--help"] if verb else ["--help"])
        except SystemExit as stop:
            code = stop.code
        finally:
            sys.argv = argv
            if columns is None:
                del os.environ["COLUMNS"]
            else:
                os.environ["COLUMNS"] = columns
        if code not in (0, None):
            raise RuntimeError(f"csdiff {verb} --help exited with {code}")
        _cache[verb] = out.getvalue().rstrip()
    return _cache[verb]


def on_page_markdown(markdown: str, page, config, files) -> str:
    return MARKER.sub(lambda m: f"```text\n{help_text(m.group(1))}\n```", markdown)
