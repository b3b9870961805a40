"""Releasing a merged model to S3 and auditing the release in place.

`release` uploads a model directory that passes its own audit to s3://bucket/prefix/NAME/VERSION
with boto3: every object carries an S3 SHA-256 checksum (ChecksumAlgorithm='SHA256', which S3
computes and checks on upload); files above the part size go up as multipart uploads, whose
checksum S3 keeps only as a checksum of the parts' checksums ("composite"). The model card gets
its evaluation table on the way (rain_tasks.card). Beside the files go `release.json` (per
object: sha256, size and, for multipart objects, each part's sha256, so a composite checksum
can be tied to the whole file's digest) and, last, `lineage.json`, written only if absent: a
version is complete once it has lineage.json, and a version that exists is never overwritten.

`S3Files` lets `rain_tasks.lineage.audit` check a release without downloading it: digests come
from the stored checksums (composites resolved through release.json), shard headers from ranged
reads; an object without a usable checksum is downloaded and hashed, and the report says so.

Endpoint and credentials come from the standard AWS configuration (environment, ~/.aws,
AWS_ENDPOINT_URL for MinIO or a local server): real S3 is a configuration change.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rain_tasks.card import CARD, evaluation_table, fill_evaluation
from rain_tasks.checkpoint import parse_size
from rain_tasks.digest import file_digest, tree_files
from rain_tasks.lineage import LINEAGE, RECORDS, RELEASE_MANIFEST, LineageReport, verify_lineage

DEFAULT_PART_SIZE = "64MB"
_CHUNK = 1 << 20


class ReleaseError(ValueError):
    """A release refused (the version exists, the model fails its audit); the message says why and what to do."""


@dataclass(frozen=True)
class S3Location:
    """s3://bucket/prefix/NAME/VERSION split into the bucket and the key prefix of the version's objects."""

    bucket: str
    prefix: str  # no trailing slash

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        if not uri.startswith("s3://"):
            raise ValueError(f"{uri!r} is not an s3:// URI")
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        prefix = prefix.strip("/")
        if not bucket or not prefix:
            raise ValueError(f"{uri!r}: give s3://BUCKET/PREFIX/NAME/VERSION (a key prefix under the bucket)")
        return cls(bucket, prefix)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def s3_client() -> Any:
    """A boto3 S3 client from the standard AWS configuration (AWS_ENDPOINT_URL, credentials, region)."""
    import boto3

    return boto3.client("s3")


# --- checksums ----------------------------------------------------------------------------------


def part_size_for(size: int, part_size: int) -> int:
    """The part size boto3 actually uses for a file of `size` bytes (S3's 5 MiB floor and 10,000-part cap applied)."""
    from s3transfer.utils import ChunksizeAdjuster

    return ChunksizeAdjuster().adjust_chunksize(part_size, size)


def file_record(path: Path, part_size: int) -> dict[str, Any]:
    """sha256 and size of a file and, when it uploads in parts (size ≥ part_size), each part's sha256, in one read."""
    size = path.stat().st_size
    if size < part_size:
        return {"sha256": file_digest(path), "size": size}
    step = part_size_for(size, part_size)
    whole, parts = hashlib.sha256(), []
    with open(path, "rb") as f:
        for _ in range(math.ceil(size / step)):
            part, left = hashlib.sha256(), step
            while left and (chunk := f.read(min(_CHUNK, left))):
                whole.update(chunk)
                part.update(chunk)
                left -= len(chunk)
            parts.append(part.hexdigest())
    return {"sha256": whole.hexdigest(), "size": size, "parts": parts}


def composite_checksum(part_digests: list[str]) -> str:
    """S3's COMPOSITE SHA-256 of a multipart object: base64(sha256(the part digests concatenated))."""
    joined = b"".join(bytes.fromhex(d) for d in part_digests)
    return base64.b64encode(hashlib.sha256(joined).digest()).decode()


def stored_checksum(client: Any, bucket: str, key: str) -> tuple[str | None, bool]:
    """(the SHA-256 checksum S3 stores with an object, whether it is COMPOSITE), from GetObjectAttributes.

    S3 writes a composite as `base64-N` in some responses and names its type in others; both are read."""
    checksum = client.get_object_attributes(Bucket=bucket, Key=key, ObjectAttributes=["Checksum"]).get("Checksum") or {}
    value = checksum.get("ChecksumSHA256")
    if value is None:
        return None, False
    base, _, parts = value.partition("-")
    return base, bool(parts) or checksum.get("ChecksumType") == "COMPOSITE"


# --- release ------------------------------------------------------------------------------------


@dataclass
class Release:
    """What a release uploaded, and whether the card got an evaluation table."""

    location: S3Location
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    evaluated: bool = False

    def format(self) -> str:
        multipart = sum("parts" in o for o in self.objects.values())
        return (f"released {len(self.objects) + 2} objects to {self.location} ({multipart} multipart, SHA-256 checksums); "
                + ("model card with the evaluation table" if self.evaluated else
                   "no evaluation report found: the model card keeps its placeholder"))


def release(model_dir: str | Path, uri: str, project: str | Path = ".", part_size: str | int | None = None,
            client: Any = None) -> Release:
    """Upload a merged model that passes its audit to `uri`; refuse an existing version (see the module docstring)."""
    model_dir, target = Path(model_dir), S3Location.parse(uri)
    report = verify_lineage(model_dir)
    if not report.ok:
        raise ReleaseError(f"{model_dir} fails its lineage audit; not released:\n{report.format()}")
    client = client or s3_client()
    _refuse_existing(client, target)
    result = Release(target)
    card, result.evaluated = _released_card(model_dir, Path(project))
    size = parse_size(part_size or DEFAULT_PART_SIZE)
    config = _transfer_config(size)
    for name in tree_files(model_dir):  # each file is hashed once, by its upload record
        if name not in (*RECORDS, CARD):
            result.objects[name] = _upload_file(client, model_dir / name, target, name, size, config)
    result.objects[CARD] = _upload_bytes(client, card, target, CARD, size, config)
    manifest = {"schema": 1, "source": str(model_dir), "objects": result.objects}
    _upload_bytes(client, json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n", target, RELEASE_MANIFEST, size, config)
    _put_if_absent(client, target, LINEAGE, (model_dir / LINEAGE).read_bytes())
    return result


def _refuse_existing(client: Any, target: S3Location) -> None:
    if not client.list_objects_v2(Bucket=target.bucket, Prefix=target.prefix + "/", MaxKeys=1).get("KeyCount"):
        return
    state = ("a complete release" if S3Files(target, client).read_bytes(LINEAGE) is not None else
             f"an incomplete release (no {LINEAGE}: an interrupted upload; delete the prefix, then release again)")
    raise ReleaseError(f"{target} already exists: {state}. Released versions are never overwritten; "
                       "release under a new VERSION.")


def _released_card(model_dir: Path, project: Path) -> tuple[bytes, bool]:
    """The card as released: its evaluation section filled from the project's report where there is one."""
    if not (model_dir / CARD).is_file():
        raise ReleaseError(f"{model_dir} has no model card ({CARD}); rerun the stage that merged it")
    text = (model_dir / CARD).read_text(encoding="utf-8")
    table = evaluation_table(text, project)
    return (fill_evaluation(text, table) if table else text).encode("utf-8"), table is not None


def _transfer_config(part_size: int) -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size)


def _upload_file(client: Any, path: Path, target: S3Location, name: str, part_size: int, config: Any) -> dict[str, Any]:
    record = file_record(path, part_size)
    client.upload_file(str(path), target.bucket, target.key(name), ExtraArgs={"ChecksumAlgorithm": "SHA256"}, Config=config)
    return record


def _upload_bytes(client: Any, data: bytes, target: S3Location, name: str, part_size: int, config: Any) -> dict[str, Any]:
    """Upload generated bytes the way files go (multipart above the part size), returning their record."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        return _upload_file(client, path, target, name, part_size, config)


def _put_if_absent(client: Any, target: S3Location, name: str, data: bytes) -> None:
    """The closing write: only if no concurrent release wrote this version first (S3 conditional write)."""
    from botocore.exceptions import ClientError

    try:
        client.put_object(Bucket=target.bucket, Key=target.key(name), Body=data, ChecksumAlgorithm="SHA256", IfNoneMatch="*")
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
            raise ReleaseError(f"{target}: another release of this version finished first; release under a new VERSION") from e
        raise


# --- auditing in place --------------------------------------------------------------------------


@dataclass
class S3Files:
    """A released model read through the S3 API for `rain_tasks.lineage.audit` (see the module docstring)."""

    target: S3Location
    client: Any
    manifest: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def open(cls, uri: str, client: Any = None) -> S3Files:
        files = cls(S3Location.parse(uri), client or s3_client())
        raw = files.read_bytes(RELEASE_MANIFEST)
        files.manifest = json.loads(raw)["objects"] if raw is not None else {}
        return files

    @property
    def location(self) -> str:
        return str(self.target)

    def read_bytes(self, name: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.target.bucket, Key=self.target.key(name))["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise

    def digests(self, report: LineageReport) -> dict[str, str]:
        names = [k[len(self.target.prefix) + 1:] for k in self._keys()]
        found = {name: self._digest(name, report) for name in names if name not in RECORDS}
        if not self.manifest:
            report.checked.append(f"no {RELEASE_MANIFEST} in the release: multipart objects are downloaded to hash them")
        return found

    def shard_metadata(self, name: str) -> dict[str, str]:
        """The header of a safetensors object from two ranged reads (its length, then the JSON)."""
        (length,) = struct.unpack("<Q", self._range(name, 0, 8))
        header = json.loads(self._range(name, 8, length))
        return dict(header.get("__metadata__") or {})

    def _keys(self) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.target.bucket, Prefix=self.target.prefix + "/")
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def _range(self, name: str, start: int, length: int) -> bytes:
        response = self.client.get_object(Bucket=self.target.bucket, Key=self.target.key(name),
                                          Range=f"bytes={start}-{start + length - 1}")
        return response["Body"].read()

    def _digest(self, name: str, report: LineageReport) -> str:
        """The sha256 of an object from its stored checksum where that suffices, else by downloading it."""
        stored, composite = stored_checksum(self.client, self.target.bucket, self.target.key(name))
        if stored and not composite:
            return base64.b64decode(stored).hex()
        recorded = self.manifest.get(name, {})
        if stored and "parts" in recorded and composite_checksum(recorded["parts"]) == stored:
            return recorded["sha256"]
        reason = ("no SHA-256 checksum stored with it" if not stored else
                  f"its multipart checksum does not match {RELEASE_MANIFEST}" if "parts" in recorded else
                  f"multipart, and {RELEASE_MANIFEST} has no part digests for it")
        report.checked.append(f"downloaded {name} to hash it ({reason})")
        return self._download_digest(name)

    def _download_digest(self, name: str) -> str:
        body = self.client.get_object(Bucket=self.target.bucket, Key=self.target.key(name))["Body"]
        h = hashlib.sha256()
        while chunk := body.read(_CHUNK):
            h.update(chunk)
        return h.hexdigest()
