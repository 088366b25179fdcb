"""Loading benchmark prompt sets: JSONL files of `{"id": ..., "prompt": ...}` rows (see `bench/prompts/README.md`).

Validation is strict because a bad row would otherwise surface as a confusing failure minutes into a benchmark:
every problem is reported with the file and line number. Extra fields in a row are kept, so a set can carry
metadata (for example a category) without a change here. Blank lines are skipped.

This module shares its name with the data folder `bench/prompts/`; that folder must stay a plain folder (no
`__init__.py`) so that `import bench.prompts` finds this module.
"""

from __future__ import annotations

import json
from pathlib import Path

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"  # the sets shipped with the project


def load_prompts(path: str | Path) -> list[dict]:
    """Rows of a prompt file, in file order. Raises ValueError naming the file and line on any bad row."""
    path = Path(path)
    rows: list[dict] = []
    first_line_of: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON: {e.msg}") from e
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for key in ("id", "prompt"):
                if key not in row:
                    raise ValueError(f"{where}: missing field {key!r}")
                if not isinstance(row[key], str) or not row[key]:
                    raise ValueError(f"{where}: field {key!r} must be a non-empty string, got {row[key]!r}")
            if row["id"] in first_line_of:
                raise ValueError(f"{where}: duplicate id {row['id']!r} (first on line {first_line_of[row['id']]})")
            first_line_of[row["id"]] = line_no
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompts (the file is empty)")
    return rows
