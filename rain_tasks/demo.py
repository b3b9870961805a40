"""`make demo`: the whole pipeline under `dvc repro` with artifacts pushed to a local S3 server."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from rain_tasks.remote import push
from rain_tasks.s3server import local_s3
from rain_tasks.stages import MERGED

REMOTE = "storage"


def _dvc(*args: str, root: Path) -> None:
    subprocess.run(["dvc", *args], cwd=root, check=True)


def run_demo(root: str | Path = ".", bucket: str = "rain-artifacts") -> None:
    """Start the local S3 server, `dvc repro`, `dvc push`, then say where the merged model and report are."""
    root = Path(root).resolve()
    start = time.monotonic()
    with local_s3(bucket) as endpoint:
        _dvc("remote", "modify", "--local", REMOTE, "endpointurl", endpoint, root=root)
        _dvc("repro", root=root)
        push(root, REMOTE)
        _dvc("remote", "modify", "--local", "--unset", REMOTE, "endpointurl", root=root)
    print()
    print((root / "reports/report.md").read_text())
    print(f"merged model: {root / MERGED}")
    print(f"report:       {root / 'reports/report.md'}")
    print(f"metrics:      {root / 'metrics/eval.json'}  (dvc metrics show)")
    print(f"artifacts pushed to s3://{bucket} on the local S3 server; demo took {time.monotonic() - start:.0f} s")
