"""The Hugging Face model card (README.md) of a merged model, and its evaluation section.

The merge stage writes the card inside its atomic directory write, from the lineage `core`
alone, so its bytes are as deterministic as the shards': YAML front matter with `base_model`
(the three checkpoints: base, ITM, LRM), `base_model_relation: merge`, the tags, the method
and the params, then a readable summary.

The evaluation cannot be in that card: the `evaluate` stage runs after the merge and reads
the merged model, so a merge output that held its results would make a cycle in the DAG.
The merge-time card therefore holds a fixed placeholder between two markers naming the report
row (`reports/report.json`, row RAIN or the baseline's name), and `rain release` replaces the
text between the markers with the table from that report. `unfilled` reverses it, so an
audit compares a released card with the digest the lineage recorded for the merge-time card.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from rain_tasks.io.artifacts import write_text
from rain_tasks.io.digest import json_digest

CARD = "README.md"
REPORT = "reports/report.json"
TAGS = ("merge", "rain-merging")
#: the three checkpoints in the order `base_model` lists them, with their lineage roles
CHECKPOINT_ROLES = {"base": "models.base", "ITM": "models.itm", "LRM": "models.lrm"}
_START, _END = "<!-- rain:evaluation -->", "<!-- /rain:evaluation -->"
_EVALUATION = re.compile(re.escape(_START) + r"\n.*?\n" + re.escape(_END), re.DOTALL)
PLACEHOLDER = (
    "Not measured at merge time: the `evaluate` stage runs after the merge (it reads this model) and writes "
    f"`reports/report.md` and `{REPORT}` in the project. `rain release` fills this section from that report."
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def checkpoint_name(root: Path, recorded_path: str) -> str:
    """How the card names a checkpoint: the hub id its config.json's `_name_or_path` gives, else its path."""
    config = root / recorded_path / "config.json"
    name = json.loads(config.read_text()).get("_name_or_path", "") if config.is_file() else ""
    return name if _HUB_ID.match(name) else recorded_path


def render_card(core: dict, root: Path, evaluation_row: str) -> str:
    """The merge-time card of the model whose lineage core is `core` (inputs resolved under `root`)."""
    inputs = core["inputs"]
    meta = {
        "base_model": [checkpoint_name(root, inputs[role]["path"]) for role in CHECKPOINT_ROLES.values() if role in inputs],
        "base_model_relation": "merge",
        "tags": list(TAGS),
        "library_name": "transformers",
        "merge_method": core["method"],
        "merge_params": core["method_params"],
        "params": core["params"],
        "rain_lineage": json_digest(core),
        "rain_evaluation": {"report": REPORT, "row": evaluation_row},
    }
    front = yaml.safe_dump(meta, sort_keys=True, allow_unicode=True, width=1000)
    rows = [f"| {role} | `{rec['path']}` | {len(rec['files'])} | `{json_digest(rec['files'])[:16]}` |"
            for role, rec in sorted(inputs.items())]
    checkpoints = ", ".join(f"{label} `{inputs[role]['path']}`" for label, role in CHECKPOINT_ROLES.items() if role in inputs)
    return "\n".join([
        f"---\n{front}---",
        f"# {evaluation_row}: a `{core['method']}` merge",
        "",
        f"Merged by the RAIN-Merging pipeline (stages: {' → '.join(core.get('stages') or ['outside the pipeline'])}) "
        f"with `{core['method']}` and params `{json.dumps(core['method_params'], sort_keys=True)}`; "
        f"checkpoints: {checkpoints}.",
        "",
        "## Inputs",
        "",
        "| role | path | files | sha256 of the file digests |",
        "|---|---|---:|---|",
        *rows,
        "",
        "## Evaluation",
        "",
        _START,
        PLACEHOLDER,
        _END,
        "",
        "## Lineage",
        "",
        f"`lineage.json` beside this card records every input file's sha256, the params and the digest of every "
        f"file here; each shard's safetensors metadata names lineage `{json_digest(core)[:12]}`. Audit with "
        "`rain verify DIR_OR_S3_URI [--project ROOT]`; print the chain, and the run's provenance (code version, "
        "Prefect flow run) where the project holds its run record, with `rain lineage DIR --project ROOT`.",
        "",
    ])


def write_card(model_dir: Path, core: dict, root: Path, evaluation_row: str) -> Path:
    """Write README.md into `model_dir` (the merge's temporary directory, before lineage.json records it)."""
    write_text(model_dir / CARD, render_card(core, root, evaluation_row))
    return model_dir / CARD


def front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a card."""
    if not text.startswith("---\n"):
        raise ValueError("model card has no YAML front matter")
    return yaml.safe_load(text[4:text.index("\n---", 3)]) or {}


def _replace_evaluation(text: str, body: str) -> str:
    if not _EVALUATION.search(text):
        raise ValueError(f"model card lacks the {_START} … {_END} section; it was not written by the merge stage")
    return _EVALUATION.sub(lambda _: f"{_START}\n{body}\n{_END}", text, count=1)


def fill_evaluation(text: str, table: str) -> str:
    """The card with its evaluation section replaced by `table` (markdown)."""
    return _replace_evaluation(text, table.strip("\n"))


def unfilled(text: str) -> str:
    """The card as the merge wrote it: the evaluation section back to the placeholder."""
    return _replace_evaluation(text, PLACEHOLDER)
