"""pandera schemas for every table that crosses a stage boundary, and the loader that applies them.

Calibration sets follow the published RAIN-Merging format (reasoning: prompt/reasoning/response;
instruction: prompt/reason/response plus per-instruction text spans). A malformed row is
refused with a message that names the file, the row and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pandera.pandas as pa


def _is_text(v: Any) -> bool:
    return isinstance(v, str) and v.strip() != ""


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


def _is_nonempty_str_list(v: Any) -> bool:
    return _is_str_list(v) and len(v) > 0 and all(s != "" for s in v)


def _is_related_list(v: Any) -> bool:
    """Each entry names its instruction and gives prompt spans I(x) and response spans R(x)."""
    return (
        isinstance(v, list)
        and len(v) > 0
        and all(
            isinstance(e, dict)
            and isinstance(e.get("instruction_id"), str)
            and _is_nonempty_str_list(e.get("prompt_spans"))
            and _is_str_list(e.get("response_spans"))
            for e in v
        )
    )


def _element(fn, message: str) -> pa.Check:
    return pa.Check(fn, element_wise=True, error=message)


_TEXT = _element(_is_text, "must be a non-empty string")

REASONING_SCHEMA = pa.DataFrameSchema(
    {
        "prompt": pa.Column(object, _TEXT),
        "reasoning": pa.Column(object, _TEXT),
        "response": pa.Column(object, _TEXT),
    },
    strict=False,
    name="reasoning calibration set",
)

INSTRUCTION_SCHEMA = pa.DataFrameSchema(
    {
        "id": pa.Column(object, _element(lambda v: isinstance(v, (int, str)) and not isinstance(v, bool), "must be an int or string id")),
        "prompt": pa.Column(object, _TEXT),
        "reason": pa.Column(object, _TEXT),
        "response": pa.Column(object, _TEXT),
        "instruction_id_list": pa.Column(object, _element(_is_nonempty_str_list, "must be a non-empty list of instruction ids")),
        "related_prompt_list": pa.Column(
            object,
            _element(
                _is_related_list,
                "must be a non-empty list of {instruction_id, prompt_spans: [non-empty str], response_spans: [str]}",
            ),
        ),
        "unrelated_response_spans": pa.Column(object, _element(_is_str_list, "must be a list of strings")),
    },
    strict=False,
    name="instruction calibration set",
)

INSTRUCTION_EVAL_SCHEMA = pa.DataFrameSchema(
    {
        "id": pa.Column(object),
        "prompt": pa.Column(object, _TEXT),
        "instruction_id_list": pa.Column(object, _element(_is_nonempty_str_list, "must be a non-empty list of instruction ids")),
        "kwargs": pa.Column(object, _element(lambda v: isinstance(v, list) and all(isinstance(d, dict) for d in v), "must be a list of dicts")),
        "answer": pa.Column(object, _TEXT),
    },
    strict=False,
    name="instruction evaluation set",
)

SCHEMAS = {
    "reasoning": REASONING_SCHEMA,
    "instruction": INSTRUCTION_SCHEMA,
    "instruction_eval": INSTRUCTION_EVAL_SCHEMA,
}


class SchemaViolation(ValueError):
    """A table failed its schema; the message names file, row and field."""


def read_records(path: str | Path) -> list[dict]:
    """Read a JSON-lines file or a JSON array file into dicts (the published sets use both)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: calibration/evaluation file not found")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SchemaViolation(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
    bad = [i for i, r in enumerate(records) if not isinstance(r, dict)]
    if bad:
        raise SchemaViolation(f"{path}: row {bad[0]} is not a JSON object")
    return records


def validate_records(records: list[dict], kind: str, source: str = "<records>") -> pd.DataFrame:
    """Validate rows against the schema `kind`; raise SchemaViolation naming row and field."""
    schema = SCHEMAS[kind]
    if not records:
        raise SchemaViolation(f"{source}: the {schema.name} is empty")
    df = pd.DataFrame.from_records(records)
    df = df.astype({c: object for c in df.columns})
    missing = [c for c in schema.columns if c not in df.columns]
    if missing:
        raise SchemaViolation(f"{source}: {schema.name} lacks required field(s) {missing}")
    holes = [(i, c) for c in schema.columns for i, v in df[c].items() if v is None or (isinstance(v, float) and v != v)]
    if holes:
        i, c = holes[0]
        raise SchemaViolation(f"{source}: row {i} field {c!r}: missing value ({len(holes)} missing in all)")
    try:
        schema.validate(df, lazy=True)
    except pa.errors.SchemaErrors as err:
        fc = err.failure_cases
        first = fc.iloc[0]
        raise SchemaViolation(
            f"{source}: row {first['index']} field {first['column']!r}: {first['check']} "
            f"(got {str(first['failure_case'])[:80]!r}; {len(fc)} failure(s) in all)"
        ) from None
    return df


def load_records(path: str | Path, kind: str) -> list[dict]:
    """Read and validate a calibration or evaluation file; return its rows as dicts."""
    records = read_records(path)
    validate_records(records, kind, source=str(path))
    return records


# --- Stage 2 tables: attention statistics and α per (layer, query head) ---

_FINITE = pa.Check(lambda s: s.abs().lt(float("inf")), error="must be finite")


def _complete_grid(df: pd.DataFrame) -> bool:
    """Exactly one row per (layer, head) of a full layers × heads grid (with `unique`, no holes)."""
    return len(df) == (df["layer"].max() + 1) * (df["head"].max() + 1)


_HEAD_KEYS = {"layer": pa.Column("int64", pa.Check.ge(0)), "head": pa.Column("int64", pa.Check.ge(0))}
PASS_COLUMNS = ("a0", "a1", "a2", "u0", "u1", "u2")
_MASS = [pa.Check.in_range(0.0, 1.0 + 1e-6)]  # an attention mass (NaN: the pass did not run)


def _complete_sample_grid(df: pd.DataFrame) -> bool:
    """Exactly one row per (sample, layer, head) of a full samples × layers × heads grid."""
    return len(df) == (df["sample"].max() + 1) * (df["layer"].max() + 1) * (df["head"].max() + 1)


STATS_SCHEMA = pa.DataFrameSchema(
    {
        "sample": pa.Column("int64", pa.Check.ge(0)),
        **_HEAD_KEYS,
        **{c: pa.Column("float64", _MASS, nullable=c in ("a2", "u2")) for c in PASS_COLUMNS},
    },
    checks=[
        pa.Check(_complete_sample_grid, error="must hold exactly one row per (sample, layer, head) of the full grid"),
        pa.Check(lambda df: df["a2"].isna().eq(df["u2"].isna()).all() and df["a2"].isna().nunique() == 1,
                 error="pass 2 (the curvature pass) must be present in every row or in none"),
    ],
    unique=["sample", "layer", "head"],
    strict=True,
    name="attention statistics",
)

ALPHA_SCHEMA = pa.DataFrameSchema(
    {
        **_HEAD_KEYS,
        "kv_group": pa.Column("int64", pa.Check.ge(0)),
        **{c: pa.Column("float64", _FINITE, nullable=c in ("a2", "u2")) for c in PASS_COLUMNS},  # means over samples
        "g": pa.Column("float64", _FINITE),
        "g_se": pa.Column("float64", pa.Check.ge(0.0), nullable=True),  # standard error of g over samples (NaN for one sample)
        "H": pa.Column("float64", _FINITE),
        "significant": pa.Column(bool),  # |g| ≥ min_t·g_se; otherwise the head keeps the prior
        "alpha_solved": pa.Column("float64", _FINITE),
        "alpha": pa.Column("float64", _FINITE),
    },
    checks=[pa.Check(_complete_grid, error="must hold exactly one row per (layer, head) of the full grid")],
    unique=["layer", "head"],
    strict=True,
    name="alpha per head",
)


def alpha_schema(box_lo: float, box_hi: float) -> pa.DataFrameSchema:
    """ALPHA_SCHEMA with α also required inside the box [box_lo, box_hi] it was solved in."""
    return ALPHA_SCHEMA.update_column("alpha", checks=[_FINITE, pa.Check.in_range(box_lo, box_hi)])


# --- Stage 1 table: the projection report, one row per layer × module × KV group ---

from rain_tasks.io.arch import MODULES as _MODULES  # noqa: E402

_RATIO = pa.Column("float64", pa.Check.ge(0.0), nullable=True)  # NaN where ‖Δ‖ or the held-out Gram is absent

PROJECTION_REPORT_SCHEMA = pa.DataFrameSchema(
    {
        "layer": pa.Column("int64", pa.Check.ge(0)),
        "module": pa.Column(str, pa.Check.isin(_MODULES)),
        "group": pa.Column("int64", pa.Check.ge(-1)),  # block: KV group of k/v rows, query head of o columns; -1: whole
        "path": pa.Column(str, pa.Check.isin(["gram", "rows"])),
        "d_in": pa.Column("int64", pa.Check.ge(1)),  # width of [W | b]
        "rows": pa.Column("int64", pa.Check.ge(0)),
        "rank_kept": pa.Column("int64", pa.Check.ge(0)),
        "energy_protected": pa.Column("float64", pa.Check.in_range(0.0, 1.0 + 1e-9)),
        "norm_ratio": _RATIO,
        "residual_calib": _RATIO,
        "outlier_dims": pa.Column("int64", pa.Check.ge(0)),  # input dims with RMS > OUTLIER_FACTOR × the median
        "residual_calib_inliers": _RATIO,  # the calibration residual with those dimensions left out
        "residual_heldout": _RATIO,
    },
    checks=[pa.Check(lambda df: df["rank_kept"] <= df["d_in"], error="rank_kept cannot exceed d_in")],
    unique=["layer", "module", "group"],
    strict=True,
    name="projection report",
)


# --- Task-vector orthogonality: one row per layer × module × side (left: output space, right: input space) ---

_UNIT = pa.Column("float64", pa.Check.in_range(0.0, 1.0 + 1e-6))

ORTHOGONALITY_SCHEMA = pa.DataFrameSchema(
    {
        "layer": pa.Column("int64", pa.Check.ge(0)),
        "module": pa.Column(str, pa.Check.isin(_MODULES)),
        "side": pa.Column(str, pa.Check.isin(["left", "right"])),
        "dim": pa.Column("int64", pa.Check.ge(1)),  # dimension of the space the subspaces live in
        "rank": pa.Column("int64", pa.Check.ge(1)),
        "cos_max": _UNIT,  # cosine of the smallest principal angle
        "cos_mean": _UNIT,
        "cos_rms": _UNIT,
        "random_rms": _UNIT,  # √(rank/dim): the rms cosine of two random subspaces
        "energy_r": _UNIT,  # share of ‖Δ_R‖²_F in its top-rank singular values
        "energy_i": _UNIT,
    },
    checks=[
        pa.Check(lambda df: df["rank"] <= df["dim"], error="rank cannot exceed dim"),
        pa.Check(lambda df: (df["cos_mean"] <= df["cos_rms"] + 1e-9) & (df["cos_rms"] <= df["cos_max"] + 1e-9),
                 error="cosines must satisfy mean <= rms <= max"),
    ],
    unique=["layer", "module", "side"],
    strict=True,
    name="task-vector orthogonality",
)
