"""Run the rain_merge flow on a project and print how its stages ended (used by test_pipeline)."""

from __future__ import annotations

import sys
from collections import Counter

from flows.rain_merge import rain_merge


def main(project: str) -> None:
    summary = rain_merge(project_dir=project)
    states = Counter(r["state"] for r in summary.values())
    print(f"cached={states.get('Cached', 0)} completed={states.get('Completed', 0)} all={dict(states)}")


if __name__ == "__main__":
    main(sys.argv[1])
