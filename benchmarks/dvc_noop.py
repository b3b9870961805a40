"""Time of a no-op `dvc repro` (and `dvc status`) on the full pipeline tree, with the tree's file count and bytes.

Usage: python benchmarks/dvc_noop.py [--workdir DIR] [--layers 28 --hidden 32 --ffn 64] [--repeats 3]
Builds a fresh project (a copy of this repository, as rain_dev/projects.py makes them) whose zoo has `layers`
decoder layers (28 = the 7B models' count, so every per-layer output has its real-scale number of files;
widths stay small so the first repro takes minutes), runs `dvc repro` once to completion, then times
`repeats` no-op runs. DVC skips re-hashing outputs whose size, mtime and inode are unchanged, so a no-op costs
per file, not per byte. Goal (issue 7): ≤ 5 s.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _common import machine, model_parser, workdir  # noqa: E402


def tree_size(root: Path) -> tuple[int, int]:
    """(files, bytes) under the pipeline's output folders."""
    files = [p for d in ("models", "artifacts", "data", "metrics", "plots", "reports") for p in (root / d).rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    """Wall seconds and output of one command (raises on failure)."""
    from rain_dev.projects import sh

    t0 = time.perf_counter()
    out = sh(cmd, cwd, env)
    return time.perf_counter() - t0, out


def main() -> None:
    p = model_parser(__doc__, widths={"hidden": 32, "ffn": 64}, layers=28, dtype=None)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from rain_dev.projects import MINI_OVERRIDES, MINI_ZOO, fresh_project, project_env

    work = workdir(args.workdir, "rain-dvc-bench-")
    env = project_env(work)
    zoo = {**MINI_ZOO, "num_layers": args.layers, "hidden_size": args.hidden, "intermediate_size": args.ffn}
    project = fresh_project(work / "project", env, zoo, MINI_OVERRIDES)
    first, _ = timed(["dvc", "repro", "-q"], project, env)
    files, size = tree_size(project)
    noop, status = [], []
    for _ in range(args.repeats):
        seconds, out = timed(["dvc", "repro"], project, env)
        if "Running stage" in out:
            raise SystemExit(f"a repeated dvc repro ran stages again:\n{out[-2000:]}")
        noop.append(seconds)
        status.append(timed(["dvc", "status"], project, env)[0])
    result = {"layers": args.layers, "hidden": args.hidden, "files": files, "bytes": size, "first_repro_s": first,
              "noop_repro_s": noop, "status_s": status,
              "machine": machine()}
    print(f"tree: {files} files, {size / 2**20:.1f} MiB ({args.layers} layers); first dvc repro {first:.0f} s")
    print(f"no-op dvc repro: {min(noop):.2f} s best of {len(noop)} (all: {', '.join(f'{s:.2f}' for s in noop)}); "
          f"dvc status: {min(status):.2f} s (goal: <= 5 s)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
