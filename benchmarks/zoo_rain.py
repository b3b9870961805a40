"""RAIN-Merging against task arithmetic on a built zoo: a grid of α variant × scale × projection.energy × λ × scope,
measured by the evaluation code on the VALIDATION prompts (choose settings there; `--split test` only to report).

Usage: python benchmarks/zoo_rain.py [--project .] [--split val|test] [--energies 0.5 0.9 0.99] [--lambdas 0.5 1.0 1.5]
       [--variants curvature two_pass] [--alpha-scale absolute relative] [--scopes linear all] [--workdir DIR] [--max-eval N]
Reads the project's params.yaml (models, calibration sets, every other section as configured) and its built
zoo (`dvc repro zoo` or `make demo`). For each energy, one working project (the models and data linked, not
copied) runs task_vectors → features → projection through `run_stage`; for each λ and scope it then runs
attention_stats (which measures along exactly that update) and, per α variant and scale, alpha → merge. The
baselines stage makes task arithmetic at each λ. Scope 'linear' merges the Linear layers only (what the paper
merges); 'all' adds embeddings and norms with their plain Δ. Every model is then evaluated once (close rate,
correctness, compliance, close∧correct∧comply, L_think, KL at `</think>`, early-close mass, KL on its own thinking,
h_drift). Prints a markdown table and one JSON line.
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
COLUMNS = ("close_rate", "correct_rate", "comply_rate", "close_correct_comply_rate", "l_think", "kl_close", "early_close_mass",
           "kl_own", "h_drift")
#: evaluation prompts per split: settings are chosen on `val`, the report scores `test`
SPLITS = {"val": "data/eval/instruction_val.jsonl", "test": "data/eval/instruction_eval.jsonl"}


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
    from rain_tasks.pipeline.runner import run_stage

    params = load_params(dest / "params.yaml")
    for name in stages:
        run_stage(name, params, dest)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--project", type=Path, default=Path("."))
    p.add_argument("--workdir", type=Path)
    p.add_argument("--split", choices=sorted(SPLITS), default="val")
    p.add_argument("--energies", type=float, nargs="+", default=[0.5, 0.9, 0.99])
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.5, 1.0, 1.5])
    p.add_argument("--variants", nargs="+", default=["curvature"], choices=["curvature", "two_pass"])
    p.add_argument("--alpha-scale", nargs="+", default=["absolute"], choices=["absolute", "relative"])
    p.add_argument("--scopes", nargs="+", default=["linear", "all"], choices=["linear", "all"],
                   help="what RAIN and task arithmetic merge: the Linear layers, or embeddings and norms too (plain Δ)")
    p.add_argument("--max-eval", type=int)
    args = p.parse_args()

    from rain_tasks.evaluate.evaluation import evaluate_models
    from rain_tasks.model.runtime import configure

    configure()
    project = args.project.resolve()
    prompts = project / SPLITS[args.split]
    if not prompts.is_file():
        raise SystemExit(f"{prompts}: no {args.split} prompts; rebuild the zoo (its validation split) or pass --split test")
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
    for energy in args.energies:
        dest = working_project(project, work / f"rain_{energy:g}", {"projection": {"energy": energy}})
        run(dest, RAIN_STAGES[:3])
        for lam in args.lambdas:
            for scope in args.scopes:
                for variant in args.variants:
                    for scale in args.alpha_scale:
                        set_params(project, dest, {"projection": {"energy": energy}, "merge": {"lam": lam, "scope": scope},
                                                   "alpha": {"variant": variant, "scale": scale}})
                        run(dest, ("attention_stats", "alpha", "merge") if variant == args.variants[0] and scale == args.alpha_scale[0]
                            else ("alpha", "merge"))
                        name = f"rain_{variant}_{scale}_{energy:g}_{lam:g}_{scope}"
                        (dest / "models/merged").rename(dest / "models" / name)
                        models[name] = dest / "models" / name
                        rows[name] = {"method": f"RAIN {scope} ({variant}, {scale} α)", "energy": energy, "lam": lam, "scale": scale}
    e = yaml.safe_load((project / "params.yaml").read_text())["evaluate"]
    results = evaluate_models(project / "models/lrm", models, prompts, project / "data/eval/reasoning_eval.jsonl",
                              e["max_new_tokens"], e["batch_size"], e["neighbour_radius"], args.max_eval)
    table = [{**rows[n], **{c: results[n].get(c, float("nan")) for c in COLUMNS}} for n in models]
    table.sort(key=lambda r: (r["lam"], r["method"], r["energy"] or 0))
    print(f"evaluated on the {args.split} prompts ({prompts})")
    print("| method | energy | λ | closed | correct | complies | close∧correct∧comply | L_think | KL `</think>` | early close | KL own | h_drift |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in table:
        energy = "" if r["energy"] is None else f"{r['energy']:g}"
        values = [f"{r[c]:.2e}" if c in ("l_think", "kl_close", "kl_own") else f"{r[c]:.3f}" for c in COLUMNS]
        print(f"| {r['method']} | {energy} | {r['lam']:g} | " + " | ".join(values) + " |")
    print(json.dumps({"workdir": str(work), "split": args.split, "rows": table}))


if __name__ == "__main__":
    main()
