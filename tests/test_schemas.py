"""Calibration schemas: the published sets validate as they are; malformed rows are refused by row and field."""

from __future__ import annotations

import json

import pytest

from rain_tasks.io.schemas import SchemaViolation, load_records, validate_records
from rain_dev.tiny import instruction_rows, reasoning_rows, write_jsonl


def test_published_sets_validate(published):
    assert len(load_records(published / "reasoning_calibration_set.json", "reasoning")) == 150
    assert len(load_records(published / "instruction_calibration_set.jsonl", "instruction")) == 365


@pytest.mark.parametrize(
    ("kind", "rows", "row", "field", "value"),
    [
        ("reasoning", reasoning_rows(), 2, "reasoning", 7),
        ("reasoning", reasoning_rows(), 4, "prompt", "   "),
        ("instruction", instruction_rows(), 3, "related_prompt_list", [{"instruction_id": "x", "prompt_spans": []}]),
        ("instruction", instruction_rows(), 1, "unrelated_response_spans", "not a list"),
        ("instruction", instruction_rows(), 5, "instruction_id_list", []),
    ],
)
def test_malformed_row_is_refused_naming_row_and_field(tmp_path, kind, rows, row, field, value):
    rows[row][field] = value
    path = write_jsonl(tmp_path / "set.jsonl", rows)
    with pytest.raises(SchemaViolation, match=rf"set.jsonl: row {row} field '{field}'"):
        load_records(path, kind)


def test_missing_field_and_empty_set_and_bad_json(tmp_path):
    rows = reasoning_rows()
    del rows[1]["response"]
    with pytest.raises(SchemaViolation, match=r"row 1 field 'response': missing value"):
        validate_records(rows, "reasoning", "x")
    with pytest.raises(SchemaViolation, match="is empty"):
        validate_records([], "instruction", "x")
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(reasoning_rows()[0]) + "\n{not json\n")
    with pytest.raises(SchemaViolation, match="line 2 is not valid JSON"):
        load_records(path, "reasoning")


def test_params_yaml_reads_the_same_through_dvcs_yaml_parser():
    """DVC reads params.yaml with ruamel (YAML 1.2, stricter in flow lists than PyYAML): both must agree."""
    from pathlib import Path

    import yaml
    from ruamel.yaml import YAML

    path = Path(__file__).resolve().parents[1] / "params.yaml"
    assert YAML(typ="safe").load(path.read_text()) == yaml.safe_load(path.read_text())
