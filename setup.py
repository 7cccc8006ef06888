"""PyPI long description: the README with its relative links made absolute.

Everything else is declared in pyproject.toml. On GitHub the README's links and
images are relative to the repository; on PyPI they would point nowhere, so the
long description rewrites them against ``[project.urls] "Source Code"``
(pages under ``/blob/main/``, images under ``/raw/main/``).
"""
import re
import sys
from pathlib import Path

from setuptools import setup

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - build-time only
    import tomli as tomllib

HERE = Path(__file__).parent
# Markdown links and images whose target is a repository path, not a URL or anchor.
RELATIVE_LINK = re.compile(r"(!?)\[([^\]]*)\]\((?!https?://|#|mailto:)([^)\s]+)\)")


def absolute_links(markdown: str, source_url: str) -> str:
    """Rewrite ``[text](path)`` and ``![alt](path)`` to absolute URLs under ``source_url``."""
    base = source_url.rstrip("/")

    def rewrite(match: re.Match) -> str:
        bang, text, target = match.groups()
        kind = "raw" if bang else "blob"
        return f"{bang}[{text}]({base}/{kind}/main/{target.lstrip('./')})"

    return RELATIVE_LINK.sub(rewrite, markdown)


def long_description() -> str:
    project = tomllib.loads((HERE / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    readme = (HERE / "README.md").read_text(encoding="utf-8")
    return absolute_links(readme, project["urls"]["Source Code"])


setup(long_description=long_description(), long_description_content_type="text/markdown")
