"""Lineage of a merged model: what went into it, recorded inside the model directory, and its audit.

`lineage.json` is written into the merge's temporary directory before the atomic rename, so a
merged model directory exists complete with its lineage or not at all. Its parts:

  core         everything that determines the tensors: per-file sha256 of every input (the three
               checkpoints shard by shard, the calibration sets, the intermediate artifacts), the
               merge method and its params, and the params upstream of the merge. Deterministic.
  core_digest  sha256 of `core` (canonical JSON). Every output shard's safetensors `__metadata__`
               carries it (`rain_lineage`) and the run name made from it (`rain_run`), so a shard
               found on its own still names the lineage it belongs to.
  provenance   how it was made: git commit and dirty flag, a digest of the package sources, the
               dvc.lock stage digests as found, the Prefect flow-run id (null under `dvc repro`)
               and library versions.
  outputs      sha256 of every other file in the directory.

Determinism: shard bytes depend only on `core`, so identical inputs give bit-identical shards
whichever orchestrator ran them (DVC and Prefect caches and the determinism tests rely on it).
Volatile facts (flow-run id, commit, versions) live only in `provenance`, outside the digest the
shards carry, and no timestamp is recorded (the Prefect flow run and git have theirs). Compare
two runs by their shards and `core_digest`, not by lineage.json's bytes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import yaml

from rain_tasks.checkpoint import atomic_path, read_metadata
from rain_tasks.digest import file_digest, json_digest, tree_digests

LINEAGE = "lineage.json"
SCHEMA = 1
LIBRARIES = ("torch", "transformers", "safetensors", "numpy", "prefect", "dvc", "rain-merging")
_PACKAGES = ("rain_tasks", "flows")


# --- recording ----------------------------------------------------------------------------------


def record_inputs(root: str | Path, inputs: dict[str, str]) -> dict[str, dict]:
    """Role -> {path, files: {name: sha256}} for each input file or directory (paths relative to `root`)."""
    root = Path(root)
    return {role: {"path": rel, "files": tree_digests(root / rel)} for role, rel in sorted(inputs.items())}


def build_core(inputs: dict[str, dict], method: str, method_params: dict, params: dict[str, Any]) -> dict:
    """The deterministic part of a lineage: recorded inputs, the method, its params and the upstream params."""
    return {"schema": SCHEMA, "method": method, "method_params": method_params, "inputs": inputs, "params": params}


def run_name(core: dict) -> str:
    """A run name made from the content it was computed from (identical runs share it)."""
    return f"{core['method']}-{json_digest(core)[:12]}"


def shard_metadata(core: dict) -> dict[str, str]:
    """The safetensors `__metadata__` entries that tie every output shard to its lineage."""
    return {"rain_lineage": json_digest(core), "rain_run": run_name(core)}


def provenance(root: str | Path) -> dict:
    """Where and how the merge ran: code version, dvc.lock, Prefect flow run, library versions."""
    root = Path(root)
    return {
        "git": _git(root),
        "code_digest": json_digest({p: _source_digests(root / p) for p in _PACKAGES}),
        "dvc_lock": _dvc_lock(root / "dvc.lock"),
        "prefect_flow_run_id": _flow_run_id(),
        "python": sys.version.split()[0],
        "libraries": {name: _version(name) for name in LIBRARIES},
    }


def write_lineage(model_dir: str | Path, core: dict, prov: dict) -> Path:
    """Write lineage.json into `model_dir` (call it on the temporary directory, before the rename)."""
    model_dir = Path(model_dir)
    outputs = {name: sha for name, sha in tree_digests(model_dir).items() if name != LINEAGE}
    doc = {"core": core, "core_digest": json_digest(core), "provenance": prov, "outputs": outputs}
    with atomic_path(model_dir / LINEAGE) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return model_dir / LINEAGE


def _git(root: Path) -> dict:
    """HEAD commit and whether tracked files differ from it (dvc.lock, which DVC rewrites, excluded)."""
    def git(*args: str) -> str | None:
        proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "note": f"{root} is not a git repository with a commit"}
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)dvc.lock")
    return {"commit": commit, "dirty": bool(status)}


def _source_digests(package: Path) -> dict[str, str]:
    """sha256 of each Python source of a package (bytecode caches excluded)."""
    return {p.relative_to(package).as_posix(): file_digest(p) for p in sorted(package.rglob("*.py"))} if package.is_dir() else {}


def _dvc_lock(path: Path) -> dict[str, dict[str, str]]:
    """Stage -> {output path: md5} from dvc.lock as found ({} when there is none, e.g. a Prefect-only project)."""
    if not path.is_file():
        return {}
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages", {})
    return {name: {o["path"]: o.get("md5", "") for o in s.get("outs", [])} for name, s in sorted(stages.items())}


def _flow_run_id() -> str | None:
    """The Prefect flow run this process works for, if any (Prefect is only consulted when already loaded)."""
    if "prefect" not in sys.modules:
        return None
    from prefect.runtime import flow_run

    return flow_run.id


def _version(dist: str) -> str | None:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return None


# --- auditing -----------------------------------------------------------------------------------


@dataclass
class LineageReport:
    """The outcome of an audit: what was checked and every mismatch found (empty means verified)."""

    model_dir: Path
    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        head = f"{self.model_dir}: " + ("lineage verified" if self.ok else f"{len(self.problems)} mismatch(es)")
        return "\n".join([head, *(f"  checked: {c}" for c in self.checked), *(f"  MISMATCH: {p}" for p in self.problems)])


def verify_lineage(model_dir: str | Path, project: str | Path | None = None) -> LineageReport:
    """Re-hash a merged model directory against its lineage.json; with `project` (a project root), also
    re-hash the recorded inputs found there and compare the recorded params with its params.yaml."""
    model_dir = Path(model_dir)
    report = LineageReport(model_dir)
    doc = _load(model_dir / LINEAGE, report)
    if doc is None:
        return report
    core = doc["core"]
    if json_digest(core) != doc.get("core_digest"):
        report.problems.append(f"{LINEAGE}: core_digest does not match its core section (the record was edited)")
    _check_outputs(model_dir, doc["outputs"], report)
    _check_shard_metadata(model_dir, core, report)
    if project is not None:
        _check_inputs(Path(project), core["inputs"], report)
        _check_params(core["params"], _current_params(Path(project), tuple(core["params"])), report)
    return report


def _load(path: Path, report: LineageReport) -> dict | None:
    if not path.is_file():
        report.problems.append(f"{path}: no {LINEAGE}; this directory was not written by the merge stage (rerun it)")
        return None
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        report.problems.append(f"{path}: not valid JSON ({e}); restore it from the release or rerun the merge")
        return None
    if not isinstance(doc, dict) or not {"core", "core_digest", "outputs"} <= doc.keys():
        report.problems.append(f"{path}: lacks the core/core_digest/outputs sections; restore it or rerun the merge")
        return None
    return doc


def _compare_files(label: str, recorded: dict[str, str], found: dict[str, str], report: LineageReport) -> None:
    """One message per file that is missing, unexpected or has different bytes."""
    for name in sorted(recorded.keys() | found.keys()):
        was, now = recorded.get(name), found.get(name)
        if was == now:
            continue
        if now is None:
            report.problems.append(f"{label}: {name} is missing (recorded sha256 {was[:12]}…)")
        elif was is None:
            report.problems.append(f"{label}: {name} is not in the lineage record (unexpected file)")
        else:
            report.problems.append(f"{label}: {name} differs: recorded sha256 {was[:12]}…, now {now[:12]}…")


def _check_outputs(model_dir: Path, recorded: dict[str, str], report: LineageReport) -> None:
    found = {name: sha for name, sha in tree_digests(model_dir).items() if name != LINEAGE}
    _compare_files("output", recorded, found, report)
    report.checked.append(f"{len(found)} output files re-hashed")


def _check_shard_metadata(model_dir: Path, core: dict, report: LineageReport) -> None:
    expected = shard_metadata(core)
    shards = sorted(model_dir.glob("*.safetensors"))
    for shard in shards:
        try:
            meta = read_metadata(shard)
        except Exception as e:  # a truncated or foreign file: report it, keep auditing the rest
            report.problems.append(f"output: {shard.name} is not a readable safetensors file ({e})")
            continue
        for key, value in expected.items():
            if meta.get(key) != value:
                report.problems.append(f"output: {shard.name} __metadata__ {key} is {meta.get(key)!r}, lineage says {value!r}")
    report.checked.append(f"{len(shards)} shard headers name lineage {expected['rain_lineage'][:12]}…")


def _check_inputs(project: Path, inputs: dict[str, dict], report: LineageReport) -> None:
    for role, rec in sorted(inputs.items()):
        path, label = project / rec["path"], role if role == rec["path"] else f"{role} ({rec['path']})"
        if not path.exists():
            report.checked.append(f"input {label} not available in {project}; skipped")
            continue
        _compare_files(f"input {label}", rec["files"], tree_digests(path), report)
        report.checked.append(f"input {label} re-hashed")


def _current_params(project: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """The project's params.yaml values under the recorded keys."""
    from rain_tasks.params import load_params
    from rain_tasks.stages import param_values

    return param_values(load_params(project / "params.yaml"), keys)


def _check_params(recorded: dict[str, Any], current: dict[str, Any], report: LineageReport) -> None:
    was, now = _flatten(recorded), _flatten(current)
    for key in sorted(was.keys() | now.keys()):
        if was.get(key, "<absent>") != now.get(key, "<absent>"):
            report.problems.append(f"param {key}: recorded {was.get(key, '<absent>')!r}, now {now.get(key, '<absent>')!r}")
    report.checked.append(f"{len(was)} params compared")


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1} (lists stay leaves)."""
    if not isinstance(obj, dict):
        return {prefix: obj}
    out: dict[str, Any] = {}
    for k, v in obj.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out

