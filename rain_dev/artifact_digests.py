"""Build the mini-family project with `dvc repro` and record (or compare) every stage output's digests.

Used to show that a refactoring leaves artifacts bit-identical:
  python -m rain_dev.artifact_digests record /path/baseline.json    # before
  python -m rain_dev.artifact_digests compare /path/baseline.json   # after: exit 1 on any difference
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from rain_dev.projects import MINI_OVERRIDES, MINI_ZOO, fresh_project, project_env, sh
from rain_dev.s3server import DUMMY_CREDENTIALS
from rain_tasks.io.digest import tree_digests
from rain_tasks.pipeline.stages import STAGES


def digests() -> dict[str, dict[str, str]]:
    """Every stage output's per-file digests after `dvc repro` of a fresh mini-family project."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**project_env(Path(tmp)), **DUMMY_CREDENTIALS}
        root = fresh_project(Path(tmp) / "project", env, MINI_ZOO, MINI_OVERRIDES)
        sh(["dvc", "repro"], root, env)
        return {out: tree_digests(root / out) for out in sorted({o for s in STAGES for o in s.outputs})}


def main(mode: str, path: str) -> int:
    """Record the digests to `path`, or compare them with the ones recorded there."""
    now = digests()
    if mode == "record":
        Path(path).write_text(json.dumps(now, indent=1, sort_keys=True))
        print(f"recorded {sum(len(v) for v in now.values())} files in {len(now)} outputs")
        return 0
    then = json.loads(Path(path).read_text())
    diff = sorted(f"{o}/{f}" for o in set(then) | set(now) for f in set(then.get(o, {})) | set(now.get(o, {}))
                  if then.get(o, {}).get(f) != now.get(o, {}).get(f))
    print(f"{sum(len(v) for v in now.values())} files in {len(now)} outputs; {len(diff)} differ")
    print("\n".join(diff))
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
