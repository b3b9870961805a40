"""`make demo` (`python -m rain_dev.demo`): the whole pipeline under `dvc repro` with artifacts pushed to a local S3 server, and the merged
model released there, signed with a demo key pair kept under .rain/keys (git-ignored), then verified."""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

from rain_dev.s3server import local_s3
from rain_tasks.audit.lineage import audit
from rain_tasks.audit.release import S3Files, release, s3_client
from rain_tasks.audit.signing import SigningConfig, TrustConfig, generate_key_pair
from rain_tasks.cli import guarded
from rain_tasks.io.remote import push
from rain_tasks.pipeline.stages import MERGED

REMOTE = "storage"
DEMO_KEYS = ".rain/keys"  # the demo's signing key pair, outside git


def _dvc(*args: str, root: Path) -> None:
    subprocess.run(["dvc", *args], cwd=root, check=True)


def release_signed(root: Path, endpoint: str, bucket: str) -> str:
    """Release the merged model to the local S3 server signed with the demo key pair, and verify it with the public
    key; return the release's URI."""
    private, public = generate_key_pair(root / DEMO_KEYS)
    uri = f"s3://{bucket}/releases/rain-merged/demo"
    client = s3_client(endpoint)
    release(root / MERGED, uri, root, client=client, signing=SigningConfig(key=private))
    report = audit(S3Files.open(uri, client), trust=TrustConfig(key=public))
    if not report.ok:
        raise RuntimeError(f"the demo release does not verify:\n{report.format()}")
    return uri


def run_demo(root: str | Path = ".", bucket: str = "rain-artifacts") -> None:
    """Start the local S3 server, `dvc repro`, `dvc push`, then say where the merged model and report are."""
    root = Path(root).resolve()
    start = time.monotonic()
    with local_s3(bucket) as endpoint:
        _dvc("remote", "modify", "--local", REMOTE, "endpointurl", endpoint, root=root)
        _dvc("repro", root=root)
        push(root, REMOTE)
        _dvc("remote", "modify", "--local", "--unset", REMOTE, "endpointurl", root=root)
        released = release_signed(root, endpoint, bucket)
    print()
    print((root / "reports/report.md").read_text())
    print(f"merged model: {root / MERGED}")
    print(f"report:       {root / 'reports/report.md'}")
    print(f"metrics:      {root / 'metrics/eval.json'}  (dvc metrics show)")
    print(f"release:      {released}  (signed with {root / DEMO_KEYS}; verified with its public key)")
    print(f"artifacts pushed to s3://{bucket} on the local S3 server; demo took {time.monotonic() - start:.0f} s")


def main(argv: list[str] | None = None) -> int:
    """`python -m rain_dev.demo [--project DIR]`: the demo with the CLI's error messages."""
    parser = argparse.ArgumentParser(description="run the pipeline with dvc repro, push to a local S3 server, print the report")
    parser.add_argument("--project", default=".")
    project = parser.parse_args(argv).project
    return guarded(lambda: run_demo(project))


if __name__ == "__main__":
    raise SystemExit(main())
