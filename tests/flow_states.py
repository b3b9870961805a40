"""Run the rain_merge flow on a project and print how its stages ended (used by test_pipeline, test_operations).

Usage: flow_states.py PROJECT [TASK_RUNNER]   (TASK_RUNNER: thread (default) or dask, a local cluster)
"""

from __future__ import annotations

import sys
from collections import Counter

from flows.rain_merge import rain_merge


def main(project: str, task_runner: str = "thread") -> None:
    summary = rain_merge(project_dir=project, task_runner=task_runner)
    states = Counter(r["state"] for r in summary.values())
    layers = Counter(s for r in summary.values() for s in r["layers"])
    ran = ",".join(name for name, r in summary.items() if r["state"] != "Cached")
    print(f"cached={states.get('Cached', 0)} completed={states.get('Completed', 0)} all={dict(states)} layers={dict(layers)}")
    print(f"ran=[{ran}]")


if __name__ == "__main__":
    main(*sys.argv[1:])
