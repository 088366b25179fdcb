"""load_prompts validation, and the shipped benchmark prompt sets."""

from __future__ import annotations

import json

import pytest

from bench.prompts import PROMPTS_DIR, load_prompts

SETS = ("chat", "code", "math", "editing")


def write(tmp_path, text: str):
    path = tmp_path / "p.jsonl"
    path.write_text(text, encoding="utf-8")
    return path


def test_loads_rows_in_order_skipping_blank_lines(tmp_path):
    path = write(tmp_path, '{"id": "a", "prompt": "x"}\n\n   \n{"id": "b", "prompt": "y", "tag": 1}\n')
    assert load_prompts(path) == [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y", "tag": 1}]
    assert load_prompts(str(path))[0]["id"] == "a"


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": \n', r"p\.jsonl:2: invalid JSON"),
        ('["a", "x"]\n', r"p\.jsonl:1: expected a JSON object"),
        ('{"prompt": "x"}\n', r"p\.jsonl:1: missing field 'id'"),
        ('{"id": "a"}\n', r"p\.jsonl:1: missing field 'prompt'"),
        ('{"id": 3, "prompt": "x"}\n', r"p\.jsonl:1: field 'id' must be a non-empty string"),
        ('{"id": "a", "prompt": null}\n', r"p\.jsonl:1: field 'prompt' must be a non-empty string"),
        ('{"id": "a", "prompt": ""}\n', r"p\.jsonl:1: field 'prompt' must be a non-empty string"),
        (
            '{"id": "a", "prompt": "x"}\n\n{"id": "a", "prompt": "y"}\n',
            r"p\.jsonl:3: duplicate id 'a' \(first on line 1\)",
        ),
        ("", r"p\.jsonl: no prompts"),
        ("\n  \n", r"p\.jsonl: no prompts"),
    ],
)
def test_bad_files_raise_with_file_and_line(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_prompts(write(tmp_path, text))


@pytest.mark.parametrize("name", SETS)
def test_shipped_set_loads(name):
    rows = load_prompts(PROMPTS_DIR / f"{name}.jsonl")
    assert len(rows) == 10
    assert [r["id"] for r in rows] == [f"{name}-{i:02d}" for i in range(1, 11)]


def test_all_is_the_concatenation_with_unique_ids():
    rows = load_prompts(PROMPTS_DIR / "all.jsonl")
    assert len(rows) == 40
    assert len({r["id"] for r in rows}) == 40
    assert rows == [row for name in SETS for row in load_prompts(PROMPTS_DIR / f"{name}.jsonl")]


def test_shipped_rows_have_only_id_and_prompt():
    for line in (PROMPTS_DIR / "all.jsonl").read_text(encoding="utf-8").splitlines():
        assert set(json.loads(line)) == {"id", "prompt"}


def test_editing_and_code_prompts_carry_text_to_rework():
    # the answer should be able to copy from the prompt: each carries a passage or a code block after a blank line
    for name in ("editing", "code"):
        for row in load_prompts(PROMPTS_DIR / f"{name}.jsonl"):
            assert "\n\n" in row["prompt"], row["id"]
    code_rows = load_prompts(PROMPTS_DIR / "code.jsonl")
    assert all("```" in r["prompt"] for r in code_rows)
