"""MkDocs hook: the site's home page is README.md, so the two never drift apart.

README.md links to the docs as ``docs/<page>.md`` (what GitHub shows); on the site those pages are siblings
of the home page, so the ``docs/`` prefix is dropped. The docs link to the home page as ``../README.md`` (what
GitHub shows), which on the site is ``index.md``. MkDocs then validates every link of the result like any
other page's (``validation:`` in mkdocs.yml, ``--strict``).
Hook API: https://www.mkdocs.org/user-guide/configuration/#hooks
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

README = Path(__file__).resolve().parents[1] / "README.md"


def home_page(markdown: str) -> str:
    """README's Markdown with its ``](docs/...)`` links made relative to the site's root."""
    return re.sub(r"\]\(docs/", "](", markdown)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """A docs page's ``](../README.md...)`` links, pointed at the home page the site makes of README."""
    return re.sub(r"\]\(\.\./README\.md", "](index.md", markdown)


def on_files(files: Files, config: Any) -> Files:
    files.append(File.generated(config, "index.md", content=home_page(README.read_text(encoding="utf-8"))))
    return files
