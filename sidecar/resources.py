"""Files shipped beside the code: schema.sql and openapi.yaml.

They live at the repository root, where operators and reviewers look for them,
and are copied into the package when a wheel is built.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path


@cache
def read_resource(name: str) -> str:
    """Read a shipped file from the installed package or the source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / name, here.parent / name):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    raise FileNotFoundError(f"{name} is missing from the installation")
