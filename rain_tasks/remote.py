"""Pushing the DVC-tracked artifacts to the remote: transient S3 failures are retried, then reported clearly.

DVC uploads content-addressed objects, each S3 PUT is all-or-nothing, and the local cache is
only read during a push, so a push that fails half-way (endpoint down, connection dropped)
corrupts neither side: the next push uploads only the objects still missing.
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)
#: S3 error codes a retry cannot fix (credentials, permissions, a bucket that does not exist)
PERMANENT_S3_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                                "NoSuchBucket", "InvalidBucketName", "AccountProblem"})
#: the same, as they appear in `dvc push` output: reported at once
PERMANENT = (*sorted(PERMANENT_S3_CODES), "Access Denied", "Forbidden", "bucket does not exist")


class PushFailed(RuntimeError):
    """`dvc push` kept failing; the message says why and what to do."""


def _last_error(output: str) -> str:
    """DVC's own 'ERROR: …' line (the most specific part of its output), or the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["no output"])[-1]


def is_permanent(output: str) -> bool:
    """True when a failed push names an error a retry cannot fix (see PERMANENT)."""
    return any(p.lower() in output.lower() for p in PERMANENT)


def push(root: str | Path = ".", remote: str | None = None, attempts: int = 3, backoff_s: float = 2.0) -> None:
    """`dvc push` with up to `attempts` tries and exponential backoff; raise PushFailed after the last one."""
    cmd = ["dvc", "push", *(["-r", remote] if remote else [])]
    for attempt in range(1, attempts + 1):
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
        if proc.returncode == 0:
            return
        error = _last_error(proc.stdout + proc.stderr)
        log.warning("dvc push attempt %d/%d failed: %s", attempt, attempts, error)
        if is_permanent(proc.stdout + proc.stderr):
            raise PushFailed(f"dvc push to {remote or 'the default remote'} was refused: {error}. Retrying cannot fix "
                             "this: check the credentials, the bucket's name and permissions (`dvc remote list`), then "
                             "rerun `dvc push`.")
        if attempt < attempts:
            time.sleep(backoff_s * 2 ** (attempt - 1))
    raise PushFailed(
        f"dvc push to {remote or 'the default remote'} failed {attempts} time(s); last error: {error}. Nothing is lost: "
        "the artifacts stay in the local DVC cache and the remote holds only complete objects. Check that the remote is "
        "reachable and its endpointurl and credentials are right (`dvc remote list`), then rerun `dvc push`: it uploads "
        "only what is missing."
    )
