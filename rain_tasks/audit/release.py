"""Releasing a merged model to S3, signed, crash- and race-safe, and auditing the release in place.

`release` uploads a model directory that passes its own audit to s3://bucket/prefix/NAME/VERSION with
boto3 (NAME/VERSION are safe relative names: no '..', no empty or absolute parts). Every object carries
an S3 SHA-256 checksum; files above the part size go up as multipart uploads (S3 then keeps only a
"composite" checksum of the parts' checksums). The model card gets its evaluation table on the way.

Layout and commit. Objects go under a staging prefix VERSION/staging/ID/, where ID is made from the
digests of everything released, so a rerun after a kill finds its own uploads: it aborts the multipart
uploads the killed run left there, skips the objects already complete and uploads the rest. Beside the
model's files go lineage.json, `provenance.intoto.json` (signed in-toto SLSA provenance),
`release.json` (per object: sha256, size and, for multipart objects, each part's sha256) and
`release.sig` (the model-signing signature over every other file's sha256; rain_tasks.audit.signing). The
release is committed by writing VERSION/commit.json, which names the staging ID, last and only if
absent (S3's conditional write, If-None-Match): of two releases of one version exactly one commits;
the other removes its own staging objects only and reports it lost. A committed version is never
overwritten.

Auditing (`S3Files` for rain_tasks.audit.lineage.audit) reads the committed staging prefix. By default every
object is downloaded and hashed (streamed): a stored checksum is the server's claim, and an S3-compatible
server may store one it did not check (the local test server does). With `trust_checksums`, S3's stored
checksums are used instead, and composite ones are resolved through release.json only when the release
signature covers release.json. Shard headers come from ranged reads bounded by the object's size.
Requests retry with exponential backoff on throttling and transient errors (SlowDown, 503) and never on
AccessDenied or NoSuchBucket (botocore's standard retry mode).

Endpoint and credentials come from the standard AWS configuration (environment, ~/.aws,
AWS_ENDPOINT_URL for MinIO or a local server): real S3 is a configuration change.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rain_tasks.audit.card import CARD, REPORT, fill_evaluation, front_matter
from rain_tasks.evaluate.evaluation import format_table
from rain_tasks.io.checkpoint import parse_size
from rain_tasks.io.digest import file_digest, tree_files
from rain_tasks.io.guards import header_length, safe_name
from rain_tasks.audit.lineage import (LINEAGE, PROVENANCE, RECORDS, RELEASE_MANIFEST, RELEASE_SIGNATURE, LineageReport,
                                verify_lineage)
from rain_tasks.audit.signing import (SigningConfig, manifest_digest, provenance_envelope, provenance_statement,
                                sign_manifest)

DEFAULT_PART_SIZE = "64MB"
COMMIT = "commit.json"  # VERSION/commit.json: written last, only if absent; names the committed staging prefix
STAGING = "staging"
RETRIES = 10  # attempts per request under botocore's standard retry mode (backoff on throttling and 5xx)
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
        prefix = prefix.rstrip("/")
        if not bucket or not prefix:
            raise ValueError(f"{uri!r}: give s3://BUCKET/PREFIX/NAME/VERSION (a key prefix under the bucket)")
        return cls(bucket, safe_name(prefix, f"{uri!r}: release path"))

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def child(self, name: str) -> S3Location:
        """The location of a sub-prefix (a staging prefix under a version)."""
        return S3Location(self.bucket, self.key(safe_name(name, "sub-prefix")))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def s3_client(endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client from the standard AWS configuration (AWS_ENDPOINT_URL unless `endpoint_url`, credentials,
    region), retrying throttling and transient errors with backoff (botocore's standard mode)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint_url, config=Config(retries={"mode": "standard", "max_attempts": RETRIES}))


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
    """What a release uploaded (or found already uploaded by the run it resumed), and where it committed."""

    location: S3Location
    staging: S3Location | None = None
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    resumed: list[str] = field(default_factory=list)
    evaluated: bool = False

    def format(self) -> str:
        multipart = sum("parts" in o for o in self.objects.values())
        resumed = f", {len(self.resumed)} already uploaded by an interrupted run" if self.resumed else ""
        return (f"released {len(self.objects) + 1} signed objects to {self.location} (committed {self.staging}; "
                f"{multipart} multipart, SHA-256 checksums{resumed}); "
                + ("model card with the evaluation table" if self.evaluated else
                   "no evaluation report found: the model card keeps its placeholder"))


def release(model_dir: str | Path, uri: str, project: str | Path = ".", part_size: str | int | None = None,
            client: Any = None, signing: SigningConfig | None = None) -> Release:
    """Upload a merged model that passes its audit to `uri`, signed, then commit it (see the module docstring)."""
    model_dir, target = Path(model_dir), S3Location.parse(uri)
    signing = signing or SigningConfig()
    signing.signer()  # a missing or unreadable key is refused before any upload
    report = verify_lineage(model_dir)
    if not report.ok:
        raise ReleaseError(f"{model_dir} fails its lineage audit; not released:\n{report.format()}")
    client = client or s3_client()
    _refuse_committed(client, target)
    result = Release(target)
    size = parse_size(part_size or DEFAULT_PART_SIZE)
    config = _transfer_config(size)
    files = {name: path for name, path in tree_files(model_dir).items() if name not in (*RECORDS, CARD)}
    result.objects = {name: file_record(path, size) for name, path in files.items()}  # each file hashed once
    with tempfile.TemporaryDirectory() as tmp:
        card, result.evaluated = _released_card(model_dir, Path(project))
        generated = _records(Path(tmp), model_dir, card, result.objects, target, size, signing)
        files |= generated
        result.objects |= {n: file_record(p, size) for n, p in generated.items() if n not in (RELEASE_MANIFEST, RELEASE_SIGNATURE)}
        release_id = json.loads(generated[RELEASE_MANIFEST].read_text())["id"]
        result.staging = target.child(f"{STAGING}/{release_id}")
        _abort_uploads(client, result.staging)
        present = _stored_checksums(client, result.staging)
        for name, path in files.items():
            if name in generated or present.get(name) != _expected_checksum(result.objects[name]):
                _upload_file(client, path, result.staging, name, config)
            else:
                result.resumed.append(name)
        _commit(client, target, result.staging, file_digest(generated[RELEASE_MANIFEST]))
    return result


def _records(tmp: Path, model_dir: Path, card: bytes, objects: dict[str, dict[str, Any]], target: S3Location,
             size: int, signing: SigningConfig) -> dict[str, Path]:
    """The released card, lineage.json, the signed provenance, release.json and the signature, written in `tmp`."""
    lineage = (model_dir / LINEAGE).read_bytes()
    (tmp / CARD).write_bytes(card)
    (tmp / LINEAGE).write_bytes(lineage)
    subjects = {n: o["sha256"] for n, o in objects.items()} | {CARD: file_digest(tmp / CARD), LINEAGE: file_digest(tmp / LINEAGE)}
    doc = json.loads(lineage)
    statement = provenance_statement(doc["core"], doc["lineage_digest"], subjects)
    (tmp / PROVENANCE).write_bytes(provenance_envelope(statement, signing))
    listed = objects | {n: file_record(tmp / n, size) for n in (CARD, LINEAGE, PROVENANCE)}
    digests = {n: o["sha256"] for n, o in listed.items()}
    release_id = manifest_digest(subjects)[:16]  # the content, not the (randomised) signatures: a rerun finds it again
    manifest = {"schema": 2, "release": target.prefix, "id": release_id, "objects": listed}
    (tmp / RELEASE_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    digests[RELEASE_MANIFEST] = file_digest(tmp / RELEASE_MANIFEST)
    (tmp / RELEASE_SIGNATURE).write_bytes(sign_manifest(digests, signing, target.prefix))
    return {n: tmp / n for n in (CARD, LINEAGE, PROVENANCE, RELEASE_MANIFEST, RELEASE_SIGNATURE)}


def _get(client: Any, bucket: str, key: str) -> bytes | None:
    """An object's bytes; None when it does not exist."""
    from botocore.exceptions import ClientError

    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise


def committed(client: Any, target: S3Location) -> bool:
    """Whether a release of this version is committed (its commit.json exists)."""
    return _get(client, target.bucket, target.key(COMMIT)) is not None


def _refuse_committed(client: Any, target: S3Location) -> None:
    if committed(client, target):
        raise ReleaseError(f"{target} already exists: a complete release. Released versions are never overwritten; "
                           "release under a new VERSION.")


def evaluation_table(card_text: str, project: Path) -> str | None:
    """The evaluation section a release adds: the model's row of the project's report beside the LRM and ITM
    rows, or None when the project has no report or the report has no row for this model."""
    spec = front_matter(card_text).get("rain_evaluation") or {}
    report_path = project / spec.get("report", REPORT)
    if not report_path.is_file():
        return None
    report = json.loads(report_path.read_text())
    row = spec.get("row")
    if row not in report.get("models", {}):
        return None
    names = [n for n in ("LRM", "ITM") if n in report["models"] and n != row] + [row]
    table = format_table({n: report["models"][n] for n in names}, report.get("labels", {}))
    return (f"From `{spec.get('report', REPORT)}` (sha256 `{file_digest(report_path)[:16]}`), the `evaluate` stage's report "
            f"at release time; row `{row}` is this model, LRM and ITM are the references.\n\n{table}")


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


def _upload_file(client: Any, path: Path, target: S3Location, name: str, config: Any) -> None:
    client.upload_file(str(path), target.bucket, target.key(name), ExtraArgs={"ChecksumAlgorithm": "SHA256"}, Config=config)


def _expected_checksum(record: dict[str, Any]) -> str:
    """The checksum S3 stores for an object uploaded from a file with this record."""
    return composite_checksum(record["parts"]) if "parts" in record else base64.b64encode(bytes.fromhex(record["sha256"])).decode()


def _keys(client: Any, target: S3Location) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=target.bucket, Prefix=target.prefix + "/")
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _stored_checksums(client: Any, staging: S3Location) -> dict[str, str | None]:
    """Name -> stored SHA-256 checksum of the objects a killed run of this release already completed."""
    return {k[len(staging.prefix) + 1:]: stored_checksum(client, staging.bucket, k)[0] for k in _keys(client, staging)}


def _abort_uploads(client: Any, staging: S3Location) -> int:
    """Abort the multipart uploads an interrupted run left under this release's own staging prefix; return how many."""
    pages = client.get_paginator("list_multipart_uploads").paginate(Bucket=staging.bucket, Prefix=staging.prefix + "/")
    uploads = [(u["Key"], u["UploadId"]) for page in pages for u in page.get("Uploads", [])]
    for key, upload_id in uploads:
        client.abort_multipart_upload(Bucket=staging.bucket, Key=key, UploadId=upload_id)
    return len(uploads)


def _commit(client: Any, target: S3Location, staging: S3Location, manifest_sha: str) -> None:
    """The closing write: commit.json, only if absent (S3 conditional write). A release that loses the race
    removes its own staging objects (unless the winner committed the very same ones) and says so."""
    from botocore.exceptions import ClientError

    doc = {"schema": 1, "staging": staging.prefix[len(target.prefix) + 1:], RELEASE_MANIFEST: manifest_sha}
    try:
        client.put_object(Bucket=target.bucket, Key=target.key(COMMIT), Body=json.dumps(doc, sort_keys=True).encode() + b"\n",
                          ChecksumAlgorithm="SHA256", IfNoneMatch="*")
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "ConditionalRequestConflict"):
            raise
        winner = json.loads(_get(client, target.bucket, target.key(COMMIT)) or b"{}").get("staging")
        if winner == doc["staging"]:
            raise ReleaseError(f"{target}: a concurrent release of the same content committed first; nothing to do") from e
        _abort_uploads(client, staging)
        for key in _keys(client, staging):
            client.delete_object(Bucket=staging.bucket, Key=key)
        raise ReleaseError(f"{target}: another release of this version committed first ({winner}); this one's staged "
                           "objects were removed. Release under a new VERSION.") from e


# --- auditing in place --------------------------------------------------------------------------


@dataclass
class S3Files:
    """A committed release read through the S3 API for `rain_tasks.audit.lineage.audit` (see the module docstring)."""

    target: S3Location  # the version
    client: Any
    files: S3Location  # the committed staging prefix (the version itself when nothing is committed)
    trust_checksums: bool = False
    manifest_raw: bytes | None = None

    @classmethod
    def open(cls, uri: str, client: Any = None, trust_checksums: bool = False) -> S3Files:
        target = S3Location.parse(uri)
        client = client or s3_client()
        commit = _get(client, target.bucket, target.key(COMMIT))
        files = target.child(json.loads(commit)["staging"]) if commit is not None else target
        opened = cls(target, client, files, trust_checksums)
        opened.manifest_raw = opened.read_bytes(RELEASE_MANIFEST)
        return opened

    @property
    def location(self) -> str:
        return str(self.target)

    def read_bytes(self, name: str) -> bytes | None:
        return _get(self.client, self.files.bucket, self.files.key(name))

    def digests(self, report: LineageReport, signed: dict[str, str] | None) -> dict[str, str]:
        stray = [k for k in _keys(self.client, self.target)
                 if k != self.target.key(COMMIT) and not k.startswith(self.target.key(STAGING) + "/")]
        report.problems += [f"output: {k} lies outside the committed release (unexpected object)" for k in stray]
        parts = self._signed_parts(signed, report)
        names = [k[len(self.files.prefix) + 1:] for k in _keys(self.client, self.files)]
        found = {name: self._digest(name, parts.get(name), report) for name in names}
        if not self.trust_checksums:
            report.checked.append(f"{len(found)} objects downloaded and hashed (stored checksums are the server's claim; "
                                  "--trust-s3-checksums uses them on an S3 that checks them)")
        return found

    def shard_metadata(self, name: str) -> dict[str, str]:
        """The header of a safetensors object from two ranged reads (its length, bounded by the size, then the JSON)."""
        first = self.client.get_object(Bucket=self.files.bucket, Key=self.files.key(name), Range="bytes=0-7")
        size = int(first["ContentRange"].rpartition("/")[2])
        length = header_length(first["Body"].read(), size, f"{self.files}/{name}")
        header = json.loads(self._range(name, 8, length))
        return dict(header.get("__metadata__") or {})

    def _signed_parts(self, signed: dict[str, str] | None, report: LineageReport) -> dict[str, dict[str, Any]]:
        """release.json's records, only when the verified signature covers release.json's bytes."""
        if not self.trust_checksums or self.manifest_raw is None:
            return {}
        if signed is None or signed.get(RELEASE_MANIFEST) != hashlib.sha256(self.manifest_raw).hexdigest():
            report.checked.append(f"{RELEASE_MANIFEST} is not covered by a verified signature: its part digests are not used")
            return {}
        return json.loads(self.manifest_raw).get("objects", {})

    def _range(self, name: str, start: int, length: int) -> bytes:
        response = self.client.get_object(Bucket=self.files.bucket, Key=self.files.key(name),
                                          Range=f"bytes={start}-{start + length - 1}")
        return response["Body"].read()

    def _digest(self, name: str, recorded: dict[str, Any] | None, report: LineageReport) -> str:
        """The sha256 of an object: downloaded and hashed, or (trust_checksums) from its stored checksum."""
        if self.trust_checksums:
            stored, composite = stored_checksum(self.client, self.files.bucket, self.files.key(name))
            if stored and not composite:
                return base64.b64decode(stored).hex()
            if stored and recorded and "parts" in recorded and composite_checksum(recorded["parts"]) == stored:
                return recorded["sha256"]
            reason = ("no SHA-256 checksum stored with it" if not stored else
                      f"its multipart checksum does not match the signed {RELEASE_MANIFEST}" if recorded else
                      f"multipart, and no signed {RELEASE_MANIFEST} gives its part digests")
            report.checked.append(f"downloaded {name} to hash it ({reason})")
        from botocore.exceptions import FlexibleChecksumError

        body = self.client.get_object(Bucket=self.files.bucket, Key=self.files.key(name))["Body"]
        h = hashlib.sha256()
        try:
            while chunk := body.read(_CHUNK):
                h.update(chunk)
        except FlexibleChecksumError:  # raised once the whole body was read: `h` holds every byte
            report.problems.append(f"output: {name}: its bytes do not match the checksum stored with them (a forged checksum)")
        return h.hexdigest()
