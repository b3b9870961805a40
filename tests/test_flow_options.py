"""The flow's operational options, without running it: which failures are retried, and where results go."""

from __future__ import annotations

import errno

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from prefect.filesystems import LocalFileSystem

from flows.rain_merge import is_transient, layer_runner, resolve_result_storage


@pytest.mark.parametrize(
    ("exc", "retried"),
    [
        (OSError(errno.EIO, "Input/output error"), True),
        (ConnectionResetError("peer reset"), True),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
        (ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject"), True),
        (ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "PutObject"), False),
        (ClientError({"Error": {"Code": "NoSuchBucket"}, "ResponseMetadata": {"HTTPStatusCode": 404}}, "PutObject"), False),
        (FileNotFoundError("models/lrm/config.json"), False),
        (PermissionError("read-only"), False),
        (OSError(errno.ENOSPC, "No space left on device"), False),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), False),
        (ValueError("merge.lam must be finite"), False),
    ],
)
def test_only_transient_storage_errors_are_retried(exc, retried):
    assert is_transient(exc) is retried


def test_result_storage_is_prefects_default_or_a_local_path(tmp_path):
    assert resolve_result_storage(None) is None
    storage = resolve_result_storage(str(tmp_path / "results"))
    assert isinstance(storage, LocalFileSystem) and storage.basepath == str(tmp_path / "results")


def test_unknown_task_runner_is_refused():
    with pytest.raises(ValueError, match="task_runner must be 'thread' or 'dask'"):
        layer_runner("ray")
