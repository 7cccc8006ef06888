"""Shared by the benchmark scripts: print a Markdown report and keep it under docs/."""

from __future__ import annotations

from pathlib import Path


def save_report(lines: list[str], out: str | Path | None) -> str:
    """Join ``lines`` into Markdown, write it to ``out`` (folders made; None: don't) and print it."""
    text = "\n".join(lines) + "\n"
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    print(text)
    return text
