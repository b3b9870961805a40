"""Time the two orchestrators over one DVC record: `make demo`'s `dvc repro` (+ push), then `make flow`'s
flow, then `dvc repro` again, and a scheduled run (the flow with pull and push) on a fresh clone whose
remote (the local S3 server) holds everything.

Usage: python benchmarks/orchestrators.py [--family default|small|mini] [--workdir DIR]
`default` is the project's params.yaml as it is (what `make demo` builds); `small` and `mini` are the
scaled-down families of rain_dev/projects.py. Prints one JSON object of wall seconds and the flow's states.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from rain_dev.projects import MINI_OVERRIDES, MINI_ZOO, SMALL_ZOO, fresh_project, project_env, sh  # noqa: E402

from rain_dev.s3server import DUMMY_CREDENTIALS, local_s3  # noqa: E402

FAMILIES = {"default": ({}, None), "small": (SMALL_ZOO, None), "mini": (MINI_ZOO, MINI_OVERRIDES)}
FLOW_STATES = str(ROOT / "tests" / "flow_states.py")


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    """Wall seconds and output of a command (raising on failure)."""
    start = time.perf_counter()
    out = sh(cmd, cwd, env)
    return round(time.perf_counter() - start, 1), out


def states(log: str) -> str:
    """The flow's summary line (tests/flow_states.py)."""
    return re.search(r"^cached=.*$", log, flags=re.M).group(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=tuple(FAMILIES), default="default")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="rain-orch-"))
    env = {**project_env(tmp), **DUMMY_CREDENTIALS, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}
    zoo, overrides = FAMILIES[args.family]
    root = fresh_project(tmp / "project", env, zoo, overrides)
    figures: dict[str, object] = {"family": args.family, "load_average_start": os.getloadavg()[0]}
    with local_s3("rain-artifacts") as endpoint:
        sh(["dvc", "remote", "modify", "--local", "storage", "endpointurl", endpoint], root, env)
        figures["dvc_repro_s"], _ = timed(["dvc", "repro"], root, env)  # make demo
        figures["dvc_push_s"], _ = timed(["dvc", "push", "--run-cache"], root, env)
        figures["flow_after_repro_s"], log = timed([sys.executable, FLOW_STATES, str(root)], root, env)  # make flow
        figures["flow_after_repro_states"] = states(log)
        figures["repro_after_flow_s"], log = timed(["dvc", "repro"], root, env)
        figures["repro_after_flow_ran"] = re.findall(r"Running stage '([a-z_]+)'", log)
        sh(["git", "add", "-A"], root, env)
        sh(["git", "commit", "-qm", "outputs"], root, env)
        clone = tmp / "clone"
        sh(["git", "clone", "-q", str(root), str(clone)], tmp, env)
        sh(["dvc", "remote", "modify", "--local", "storage", "endpointurl", endpoint], clone, env)
        script = (f"from flows.rain_merge import rain_merge; s = rain_merge(project_dir={str(clone)!r}, pull=True, push=True); "
                  "print('cached=%d' % sum(r['state'] == 'Cached' for r in s.values()), 'of', len(s))")
        figures["scheduled_fresh_clone_s"], log = timed([sys.executable, "-c", script], clone, env)
        figures["scheduled_fresh_clone_states"] = re.search(r"^cached=.*$", log, flags=re.M).group(0)
    figures["load_average_end"] = os.getloadavg()[0]
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
