"""Lineage of a merged model: what went into it, recorded inside the model directory, its audit and its chain.

`lineage.json` (after the model card, rain_tasks.audit.card) is written into the merging stage's
temporary directory before the atomic rename, so a merged model directory exists complete with
its lineage or not at all. Its parts:

  core         everything that determines the tensors: per-file sha256 of every input (the three
               checkpoints shard by shard, the calibration sets, the intermediate artifacts), the
               merge method and its params, and the params upstream of the merge. Deterministic.
  core_digest  sha256 of `core` (canonical JSON). Every output shard's safetensors `__metadata__`
               carries it (`rain_lineage`) and the run name made from it (`rain_run`), so a shard
               found on its own still names the lineage it belongs to.
  outputs      sha256 of every other file in the directory (the model card included; hidden files too).
  lineage_digest  sha256 of {core_digest, outputs}: one digest that pins the whole model, printed by
               `rain verify` and checked against `--lineage-digest` (and covered by a release's signature).

Determinism: lineage.json and the shards depend only on `core`, so identical inputs give
bit-identical model directories whichever orchestrator ran them (the shared DVC record of what
is up to date, rain_tasks.pipeline.dvc_state, and the determinism tests rely on it). The volatile facts
of a run (`provenance`: git commit and dirty flag, a digest of the package sources, the
dvc.lock stage digests as found, the Prefect flow-run id, null under `dvc repro`, library
versions; plus host, wall time and when) go to the stage's run record (rain_tasks.pipeline.runs,
`.rain/runs/`, ignored by git and DVC), found again by the model's `core_digest`.

`audit` checks a model wherever its files are (`ModelFiles`: a local directory here, a released
S3 version in rain_tasks.audit.release) and reports every difference; `describe` prints the chain
inputs → stages → output.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Protocol

import yaml

from rain_tasks.audit.card import CARD, unfilled, write_card
from rain_tasks.audit.signing import (SignatureError, TrustConfig, compare_signed, provenance_problems,
                                      verified_manifest)
from rain_tasks.io.checkpoint import read_metadata
from rain_tasks.io.artifacts import write_json
from rain_tasks.io.digest import file_digest, json_digest, tree_digests
from rain_tasks.io.guards import confined, unsafe_name
from rain_tasks.params import load_params, param_values

LINEAGE = "lineage.json"
RELEASE_MANIFEST = "release.json"  # beside a released model (rain_tasks.audit.release)
RELEASE_SIGNATURE = "release.sig"  # model-signing bundle over every released file (rain_tasks.audit.signing)
PROVENANCE = "provenance.intoto.json"  # signed in-toto SLSA provenance statement (rain_tasks.audit.signing)
#: files that record a model rather than belong to it: never among the `outputs`
RECORDS = (LINEAGE, RELEASE_MANIFEST, RELEASE_SIGNATURE, PROVENANCE)
SCHEMA = 1
LIBRARIES = ("torch", "transformers", "safetensors", "numpy", "prefect", "dvc", "rain-merging")
_PACKAGES = ("rain_tasks", "flows")


# --- recording ----------------------------------------------------------------------------------


def record_inputs(root: str | Path, inputs: dict[str, str]) -> dict[str, dict]:
    """Role -> {path, files: {name: sha256}} for each input file or directory (paths relative to `root`)."""
    root = Path(root)
    return {role: {"path": rel, "files": tree_digests(root / rel, remembered=True)} for role, rel in sorted(inputs.items())}


def build_core(inputs: dict[str, dict], method: str, method_params: dict, params: dict[str, Any],
               stages: tuple[str, ...] = ()) -> dict:
    """The deterministic part of a lineage: recorded inputs, the method, its params, the upstream params and
    the registry stages that produced the model (upstream first, its own stage last; empty outside the pipeline)."""
    return {"schema": SCHEMA, "method": method, "method_params": method_params, "inputs": inputs, "params": params,
            "stages": list(stages)}


def run_name(core: dict) -> str:
    """A run name made from the content it was computed from (identical runs share it)."""
    return f"{core['method']}-{json_digest(core)[:12]}"


def shard_metadata(core: dict) -> dict[str, str]:
    """The safetensors `__metadata__` entries that tie every output shard to its lineage."""
    return {"rain_lineage": json_digest(core), "rain_run": run_name(core)}


def provenance(root: str | Path) -> dict:
    """Where and how a stage ran: code version, dvc.lock, Prefect flow run, library versions (for its run record)."""
    root = Path(root)
    return {
        "git": _git(root),
        "code_digest": json_digest({p: _source_digests(root / p) for p in _PACKAGES}),
        "dvc_lock": _dvc_lock(root / "dvc.lock"),
        "prefect_flow_run_id": _flow_run_id(),
        "python": sys.version.split()[0],
        "libraries": {name: _version(name) for name in LIBRARIES},
    }


def write_lineage(model_dir: str | Path, core: dict) -> Path:
    """Write lineage.json into `model_dir` (call it on the temporary directory, before the rename); its bytes
    depend only on `core` and the files (the run's volatile provenance goes to its run record, rain_tasks.pipeline.runs)."""
    model_dir = Path(model_dir)
    outputs = {name: sha for name, sha in tree_digests(model_dir, hidden=True).items() if name != LINEAGE}
    doc = {"core": core, "core_digest": json_digest(core), "outputs": outputs,
           "lineage_digest": lineage_digest(json_digest(core), outputs)}
    write_json(model_dir / LINEAGE, doc)
    return model_dir / LINEAGE


def lineage_digest(core_digest: str, outputs: dict[str, str]) -> str:
    """The digest of a whole model: its core's digest and every output file's sha256 (see the module docstring)."""
    return json_digest({"core_digest": core_digest, "outputs": outputs})


def write_records(model_dir: str | Path, core: dict, root: str | Path, evaluation_row: str) -> None:
    """The `finalize` of every merging stage: the model card, then lineage.json (which records the card's digest).

    `evaluation_row` names the model's row in the evaluation report (see rain_tasks.audit.card)."""
    write_card(Path(model_dir), core, Path(root), evaluation_row)
    write_lineage(model_dir, core)


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


class ModelFiles(Protocol):
    """Where a merged model's files are, read as cheaply as the place allows: a local directory
    (LocalFiles) or a released S3 version (rain_tasks.audit.release.S3Files)."""

    location: str

    def read_bytes(self, name: str) -> bytes | None:
        """A small file's bytes (lineage.json, the card); None when absent."""

    def digests(self, report: LineageReport, signed: dict[str, str] | None) -> dict[str, str]:
        """sha256 of every file, hidden ones and the RECORDS included (noting in `report` any file it had to read in
        full to get one); `signed` holds the digests a verified signature covers (None when none was checked)."""

    def shard_metadata(self, name: str) -> dict[str, str]:
        """The safetensors `__metadata__` of a shard (its header only)."""


@dataclass
class LineageReport:
    """The outcome of an audit: what was checked and every mismatch found (empty means verified)."""

    location: str
    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    digest: str | None = None  # the lineage_digest the model's files give

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        head = f"{self.location}: " + ("lineage verified" if self.ok else f"{len(self.problems)} mismatch(es)")
        head += f" (lineage digest {self.digest})" if self.digest else ""
        return "\n".join([head, *(f"  checked: {c}" for c in self.checked), *(f"  MISMATCH: {p}" for p in self.problems)])


@dataclass
class LocalFiles:
    """A merged model directory on this machine."""

    model_dir: Path

    @property
    def location(self) -> str:
        return str(self.model_dir)

    def read_bytes(self, name: str) -> bytes | None:
        path = self.model_dir / name
        return path.read_bytes() if path.is_file() else None

    def digests(self, report: LineageReport, signed: dict[str, str] | None) -> dict[str, str]:
        return tree_digests(self.model_dir, hidden=True)

    def shard_metadata(self, name: str) -> dict[str, str]:
        return read_metadata(self.model_dir / name)


def verify_lineage(model_dir: str | Path, project: str | Path | None = None) -> LineageReport:
    """Re-hash a merged model directory against its lineage.json (see `audit`)."""
    return audit(LocalFiles(Path(model_dir)), project)


def audit(files: ModelFiles, project: str | Path | None = None, trust: TrustConfig | None = None,
          expected_digest: str | None = None) -> LineageReport:
    """Check a model's files against its lineage.json: every file's digest (hidden files included), the lineage
    digest over the outputs (against `expected_digest` when given), the shard headers' lineage, the record itself;
    with `trust`, the release signature over every file and the signed provenance; with `project` (a project
    root), also re-hash the recorded inputs found there (never outside it) and compare its params.yaml."""
    report = LineageReport(files.location)
    signed = _signed_digests(files, trust, report) if trust is not None else None
    doc = load_lineage(files, report)
    everything = files.digests(report, signed)
    if signed is not None:
        _check_signed(files, trust, signed, everything, report)
    if doc is None:
        return report
    core = doc["core"]
    if json_digest(core) != doc["core_digest"]:
        report.problems.append(f"{LINEAGE}: core_digest does not match its core section (the record was edited)")
    if lineage_digest(doc["core_digest"], doc["outputs"]) != doc.get("lineage_digest"):
        report.problems.append(f"{LINEAGE}: lineage_digest does not cover its core_digest and outputs (the record was edited)")
    report.digest = doc.get("lineage_digest")
    if expected_digest is not None and expected_digest != report.digest:
        report.problems.append(f"{LINEAGE}: lineage digest {report.digest} is not the expected {expected_digest}")
    found = _output_digests(files, {n: d for n, d in everything.items() if n not in RECORDS}, report)
    _compare_files("output", doc["outputs"], found, report)
    report.checked.append(f"{len(found)} output files' digests compared")
    _check_shard_metadata(files, sorted(n for n in found if n.endswith(".safetensors")), core, report)
    if project is not None:
        _check_inputs(Path(project), core["inputs"], report)
        _check_params(core["params"], _current_params(Path(project), tuple(core["params"])), report)
    return report


def _signed_digests(files: ModelFiles, trust: TrustConfig, report: LineageReport) -> dict[str, str] | None:
    """The digests the release signature covers, once it verifies with `trust`; None (a problem noted) otherwise."""
    bundle = files.read_bytes(RELEASE_SIGNATURE)
    if bundle is None:
        report.problems.append(f"signature: no {RELEASE_SIGNATURE}: the model is unsigned")
        return None
    try:
        signed = verified_manifest(bundle, trust)
    except SignatureError as e:
        report.problems.append(f"signature: {e}")
        return None
    report.checked.append(f"{RELEASE_SIGNATURE}: signature and signer verified ({len(signed)} files signed)")
    return signed


def _check_signed(files: ModelFiles, trust: TrustConfig, signed: dict[str, str], everything: dict[str, str],
                  report: LineageReport) -> None:
    """Every file but the signature itself is signed with its digest, and the provenance is signed and agrees."""
    report.problems += compare_signed(signed, {n: d for n, d in everything.items() if n != RELEASE_SIGNATURE})
    envelope = files.read_bytes(PROVENANCE)
    if envelope is None:
        report.problems.append(f"provenance: no {PROVENANCE} beside the signed files")
        return
    report.problems += provenance_problems(envelope, trust, signed)
    report.checked.append(f"{PROVENANCE}: in-toto SLSA provenance checked against the signed files")


def load_lineage(files: ModelFiles, report: LineageReport) -> dict | None:
    where = f"{files.location}/{LINEAGE}"
    raw = files.read_bytes(LINEAGE)
    if raw is None:
        report.problems.append(f"{where}: no {LINEAGE}; not a model written by a merging stage (rerun it) nor a complete release")
        return None
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        report.problems.append(f"{where}: not valid JSON ({e}); restore it from the release or rerun the merge")
        return None
    malformed = _malformed(doc)
    if malformed:
        report.problems.append(f"{where}: malformed: {malformed}; restore it from the release or rerun the merge")
        return None
    return doc


def _malformed(doc: Any) -> str | None:
    """What is wrong with the structure of a lineage document (None when it has the shape the audit reads)."""
    if not isinstance(doc, dict) or not {"core", "core_digest", "outputs"} <= doc.keys():
        return "lacks the core/core_digest/outputs sections"
    core, outputs = doc["core"], doc["outputs"]
    if not isinstance(core, dict) or not isinstance(core.get("method"), str) or not isinstance(core.get("params"), dict) \
            or not isinstance(core.get("method_params"), dict) or not isinstance(core.get("inputs"), dict):
        return "core must hold method, method_params, params and inputs"
    for role, rec in core["inputs"].items():
        if not (isinstance(rec, dict) and isinstance(rec.get("path"), str) and isinstance(rec.get("files"), dict)):
            return f"input {role!r} must have a path and a files mapping"
    if not isinstance(doc["core_digest"], str):
        return "core_digest must be a sha256 string"
    if not isinstance(outputs, dict) or not outputs:
        return f"outputs must be a non-empty mapping of file name to sha256, not {json.dumps(outputs)[:40]}"
    bad = [n for n, sha in outputs.items() if not (isinstance(sha, str) and len(sha) == 64) or unsafe_name(n)]
    return f"outputs has entries that are not (relative name, sha256): {bad[:3]}" if bad else None


def _output_digests(files: ModelFiles, found: dict[str, str], report: LineageReport) -> dict[str, str]:
    """The files' digests, the model card's taken as the merge wrote it (a release fills its evaluation section)."""
    found = dict(found)
    if CARD in found:
        text = files.read_bytes(CARD).decode("utf-8")
        try:
            found[CARD] = hashlib.sha256(unfilled(text).encode("utf-8")).hexdigest()
            report.checked.append(f"{CARD} compared as the merge wrote it (evaluation section back to its placeholder)")
        except ValueError as e:  # no evaluation markers: compare the bytes as they are
            report.checked.append(f"{CARD}: {e}")
    return found


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


def _check_shard_metadata(files: ModelFiles, shards: list[str], core: dict, report: LineageReport) -> None:
    expected = shard_metadata(core)
    for shard in shards:
        try:
            meta = files.shard_metadata(shard)
        except Exception as e:  # a truncated or foreign file: report it, keep auditing the rest
            report.problems.append(f"output: {shard} is not a readable safetensors file ({e})")
            continue
        for key, value in expected.items():
            if meta.get(key) != value:
                report.problems.append(f"output: {shard} __metadata__ {key} is {meta.get(key)!r}, lineage says {value!r}")
    report.checked.append(f"{len(shards)} shard headers name lineage {expected['rain_lineage'][:12]}…")


def _check_inputs(project: Path, inputs: dict[str, dict], report: LineageReport) -> None:
    for role, rec in sorted(inputs.items()):
        path, label = confined(project, rec["path"]), role if role == rec["path"] else f"{role} ({rec['path']})"
        if path is None:
            report.problems.append(f"input {label}: the recorded path leaves the project {project}; not followed")
            continue
        if not path.exists():
            report.checked.append(f"input {label} not available in {project}; skipped")
            continue
        _compare_files(f"input {label}", rec["files"], tree_digests(path), report)
        report.checked.append(f"input {label} re-hashed")


def _current_params(project: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """The project's params.yaml values under the recorded keys."""
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
