"""Moving the DVC-tracked artifacts to and from the remote: transient S3 failures are retried, then reported clearly.

Both directions include DVC's run cache (`--run-cache`: the stage outputs recorded per deps and
params), so a machine with only the repository and the remote reuses every stage result the
remote holds, whether `dvc repro` or the Prefect flow computed it. DVC moves content-addressed
objects, each S3 PUT is all-or-nothing, and the source side is only read, so a transfer that
fails half-way (endpoint down, connection dropped) corrupts neither side: the next one moves
only the objects still missing.
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
    """`dvc push` (or `dvc pull`) kept failing; the message says why and what to do."""


def _last_error(output: str) -> str:
    """DVC's own 'ERROR: …' line (the most specific part of its output), or the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["no output"])[-1]


def is_permanent(output: str) -> bool:
    """True when a failed dvc command names an error a retry cannot fix (see PERMANENT)."""
    return any(p.lower() in output.lower() for p in PERMANENT)


def _dvc_with_retries(verb: str, args: list[str], root: str | Path, attempts: int, backoff_s: float) -> str | None:
    """Run `dvc VERB ARGS` up to `attempts` times with exponential backoff; None on success, else the last error
    (PushFailed at once when the error is permanent: refused credentials, a missing bucket)."""
    for attempt in range(1, attempts + 1):
        proc = subprocess.run(["dvc", verb, *args], cwd=root, capture_output=True, text=True)
        if proc.returncode == 0:
            return None
        error = _last_error(proc.stdout + proc.stderr)
        log.warning("dvc %s attempt %d/%d failed: %s", verb, attempt, attempts, error)
        if is_permanent(proc.stdout + proc.stderr):
            raise PushFailed(f"dvc {verb} was refused: {error}. Retrying cannot fix this: check the credentials, the "
                             "bucket's name and permissions (`dvc remote list`), then run it again.")
        if attempt < attempts:
            time.sleep(backoff_s * 2 ** (attempt - 1))
    return error


def push(root: str | Path = ".", remote: str | None = None, attempts: int = 3, backoff_s: float = 2.0) -> None:
    """`dvc push --run-cache` with up to `attempts` tries and exponential backoff; raise PushFailed after the last."""
    error = _dvc_with_retries("push", ["--run-cache", *(["-r", remote] if remote else [])], root, attempts, backoff_s)
    if error is not None:
        raise PushFailed(
            f"dvc push to {remote or 'the default remote'} failed {attempts} time(s); last error: {error}. Nothing is "
            "lost: the artifacts stay in the local DVC cache and the remote holds only complete objects. Check that the "
            "remote is reachable and its endpointurl and credentials are right (`dvc remote list`), then rerun "
            "`dvc push --run-cache` (or the flow: its stages are committed, so it only pushes): it uploads only what is "
            "missing."
        )


def pull(root: str | Path = ".", remote: str | None = None, attempts: int = 3, backoff_s: float = 2.0) -> None:
    """`dvc pull --run-cache --allow-missing` (objects the remote lacks are left to the stages that make them) with
    retries; raise PushFailed after the last attempt."""
    args = ["--run-cache", "--allow-missing", *(["-r", remote] if remote else [])]
    error = _dvc_with_retries("pull", args, root, attempts, backoff_s)
    if error is not None:
        raise PushFailed(
            f"dvc pull from {remote or 'the default remote'} failed {attempts} time(s); last error: {error}. Check that "
            "the remote is reachable and its endpointurl and credentials are right (`dvc remote list`), then run again."
        )
