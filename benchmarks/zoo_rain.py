"""RAIN-Merging against task arithmetic on a built zoo: a grid of projection.energy × λ, measured by the evaluation code.

Usage: python benchmarks/zoo_rain.py [--project .] [--energies 0.5 0.9 0.99] [--lambdas 0.5 1.0 1.5]
       [--alpha-scale absolute relative] [--scopes linear all] [--workdir DIR] [--max-eval N]
Reads the project's params.yaml (models, calibration sets, every other section as configured) and its built
zoo (`dvc repro zoo` or `rain demo`). For each energy and α scale, one working project (the models and data
linked, not copied) runs task_vectors → features → projection → attention_stats → alpha through `run_stage`,
then merge at each λ; the baselines stage makes task arithmetic at each λ. Both on the Linear layers only (what
the paper merges) and on all parameters (embeddings and norms too, with their plain Δ). Every model is then
evaluated once on the held-out sets (close rate, correctness, compliance, L_think, h_drift).
Prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

RAIN_STAGES = ("task_vectors", "features", "projection", "attention_stats", "alpha")
LINKED = ("models/base", "models/itm", "models/lrm", "data")
COLUMNS = ("close_rate", "correct_rate", "comply_rate", "l_think", "h_drift")


def set_params(project: Path, dest: Path, overrides: dict[str, dict]) -> None:
    """dest/params.yaml: project's params with `overrides` merged into their sections."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section] = {**params.get(section, {}), **values}
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def working_project(project: Path, dest: Path, overrides: dict[str, dict]) -> Path:
    """`dest` with the project's models and data linked and its params updated."""
    for rel in LINKED:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).symlink_to((project / rel).resolve(), target_is_directory=True)
    set_params(project, dest, overrides)
    return dest


def run(dest: Path, stages: tuple[str, ...]) -> None:
    from rain_tasks.params import load_params
    from rain_tasks.stages import run_stage

    params = load_params(dest / "params.yaml")
    for name in stages:
        run_stage(name, params, dest)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--project", type=Path, default=Path("."))
    p.add_argument("--workdir", type=Path)
    p.add_argument("--energies", type=float, nargs="+", default=[0.5, 0.9, 0.99])
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.5, 1.0, 1.5])
    p.add_argument("--alpha-scale", nargs="+", default=["absolute"], choices=["absolute", "relative"])
    p.add_argument("--scopes", nargs="+", default=["linear", "all"], choices=["linear", "all"],
                   help="what RAIN and task arithmetic merge: the Linear layers, or embeddings and norms too (plain Δ)")
    p.add_argument("--max-eval", type=int)
    args = p.parse_args()

    from rain_tasks.evaluation import evaluate_models
    from rain_tasks.runtime import configure

    configure()
    project = args.project.resolve()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="rain-zoo-grid-"))
    models: dict[str, Path] = {"LRM": project / "models/lrm"}
    rows: dict[str, dict] = {"LRM": {"method": "LRM", "energy": None, "lam": 0.0, "scale": None}}
    ta = [{"name": f"ta_{scope}_{lam:g}", "method": "task_arithmetic", "lam": lam, "scope": scope}
          for scope in args.scopes for lam in args.lambdas]
    base = working_project(project, work / "ta", {"baselines": {"runs": ta}})
    run(base, ("task_vectors", "baselines"))
    for r in ta:
        models[r["name"]] = base / "models/baselines" / r["name"]
        rows[r["name"]] = {"method": f"TA {r['scope']}", "energy": None, "lam": r["lam"], "scale": None}
    for scale in args.alpha_scale:
        for energy in args.energies:
            overrides = {"projection": {"energy": energy}, "alpha": {"scale": scale}}
            dest = working_project(project, work / f"rain_{scale}_{energy:g}", overrides)
            run(dest, RAIN_STAGES)
            for lam in args.lambdas:
                for scope in args.scopes:
                    set_params(project, dest, {**overrides, "merge": {"lam": lam, "scope": scope}})
                    run(dest, ("merge",))
                    name = f"rain_{scale}_{energy:g}_{lam:g}_{scope}"
                    (dest / "models/merged").rename(dest / "models" / name)
                    models[name] = dest / "models" / name
                    rows[name] = {"method": f"RAIN {scope} ({scale} α)", "energy": energy, "lam": lam, "scale": scale}
    e = yaml.safe_load((project / "params.yaml").read_text())["evaluate"]
    results = evaluate_models(project / "models/lrm", models, project / "data/eval/instruction_eval.jsonl",
                              project / "data/eval/reasoning_eval.jsonl", e["max_new_tokens"], e["batch_size"],
                              e["neighbour_radius"], args.max_eval)
    table = [{**rows[n], **{c: results[n][c] for c in COLUMNS}} for n in models]
    table.sort(key=lambda r: (r["lam"], r["method"], r["energy"] or 0))
    print("| method | energy | λ | `</think>` closed | correct | complies | L_think | h_drift |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in table:
        energy = "" if r["energy"] is None else f"{r['energy']:g}"
        values = [f"{r[c]:.2e}" if c == "l_think" else f"{r[c]:.3f}" for c in COLUMNS]
        print(f"| {r['method']} | {energy} | {r['lam']:g} | " + " | ".join(values) + " |")
    print(json.dumps({"workdir": str(work), "rows": table}))


if __name__ == "__main__":
    main()
