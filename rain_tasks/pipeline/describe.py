"""`rain lineage`: the readable chain inputs → stages → output of a merged model, from its lineage.json, the stage
registry's descriptions and the run record of the run that wrote it."""

from __future__ import annotations

import json
from pathlib import Path

from rain_tasks.audit.lineage import LineageReport, LocalFiles, load_lineage, run_name
from rain_tasks.io.digest import json_digest
from rain_tasks.pipeline.runs import find_run
from rain_tasks.pipeline.stages import STAGE_BY_NAME


def describe(model_dir: str | Path, project: str | Path = ".") -> str:
    """The chain inputs → stages → output of a merged model, from its lineage.json, with the provenance and the
    dvc.lock digests of the run that wrote it where `project` holds its run record (rain_tasks.pipeline.runs)."""
    model_dir = Path(model_dir)
    report = LineageReport(str(model_dir))
    doc = load_lineage(LocalFiles(model_dir), report)
    if doc is None:
        raise FileNotFoundError(report.problems[0])
    core, run = doc["core"], find_run(project, doc["core_digest"])
    prov = (run or {}).get("provenance", {})
    return "\n".join([
        f"{model_dir}: run {run_name(core)}, lineage {doc['core_digest'][:12]}…",
        "inputs",
        *_describe_inputs(core["inputs"]),
        "stages (outputs' md5 as dvc.lock recorded them when the merge ran)",
        *_describe_stages(core.get("stages", []), prov.get("dvc_lock", {})),
        "output",
        f"  {model_dir}  {core['method']} {json.dumps(core['method_params'], sort_keys=True)}",
        *(f"    {name:<44} sha256 {sha[:16]}" for name, sha in sorted(doc["outputs"].items())),
        _describe_provenance(run, project),
    ])


def _describe_inputs(inputs: dict[str, dict]) -> list[str]:
    width = max((len(role) for role in inputs), default=0)
    return [f"  {role:<{width}}  {rec['path']}  ({len(rec['files'])} file{'s' * (len(rec['files']) != 1)}, "
            f"sha256 of digests {json_digest(rec['files'])[:16]})" for role, rec in sorted(inputs.items())]


def _describe_stages(stages: list[str], dvc_lock: dict[str, dict[str, str]]) -> list[str]:
    if not stages:
        return ["  (merged outside the pipeline: no stages recorded)"]
    lines = []
    for i, name in enumerate(stages):
        desc = STAGE_BY_NAME[name].desc if name in STAGE_BY_NAME else "(no longer in the registry)"
        if i == len(stages) - 1:
            outs = "this run"
        elif name in dvc_lock:
            outs = ", ".join(f"{path} {md5[:12]}" for path, md5 in sorted(dvc_lock[name].items()))
        else:
            outs = "not in dvc.lock when the merge ran"
        lines.append(f"  {'→ ' if i else ''}{name}: {desc} [{outs}]")
    return lines


def _describe_provenance(run: dict | None, project: str | Path) -> str:
    if run is None:
        return f"provenance: no run record in {project} (made elsewhere, e.g. pulled from the DVC remote)"
    prov = run["provenance"]
    git = prov.get("git", {})
    commit = f"git {git.get('commit') or 'none'}" + (" (dirty)" if git.get("dirty") else "")
    flow = f"Prefect flow run {prov['prefect_flow_run_id']}" if prov.get("prefect_flow_run_id") else "no Prefect flow run"
    return (f"provenance: {commit}, code {str(prov.get('code_digest'))[:12]}, {flow}, python {prov.get('python')}; "
            f"stage {run['stage']} ran on {run['host']} at {run['finished_at']} ({run['seconds']} s)")
