"""`rain release` and `rain verify s3://…` against a real local S3 server (moto): a signed upload with SHA-256
checksums (multipart above a low part size) committed last, refusal to overwrite a version, and an in-place
audit that tells a replaced object and whether it had to download anything."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from boto3.s3.transfer import TransferConfig

from rain_dev.merged_project import make_project, merge_with_lineage
from rain_tasks.audit import card
from rain_tasks.audit import lineage
from rain_tasks.cli import main as rain
from rain_tasks.io.digest import tree_digests
from rain_tasks.evaluate.evaluation import write_outputs
from rain_tasks.audit.lineage import PROVENANCE, RELEASE_SIGNATURE
from rain_tasks.audit.lineage import RELEASE_MANIFEST as MANIFEST
from rain_tasks.audit.release import COMMIT, composite_checksum, file_record, stored_checksum
from rain_dev.s3server import local_s3
from rain_tasks.audit.signing import generate_key_pair

PART_SIZE = "16KB"  # below the shards' size: they go as multipart uploads (one 5 MiB part: S3's floor)


@pytest.fixture
def s3(monkeypatch) -> Iterator[Any]:
    """A client of a local S3 server, which `rain` reaches through AWS_ENDPOINT_URL."""
    with local_s3("rain-releases") as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        yield boto3.client("s3")


@pytest.fixture
def bucket(s3) -> str:
    """A new bucket for this test (moto keeps its buckets for the whole process)."""
    name = f"rain-releases-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def merged(tiny_family, tmp_path) -> tuple[Path, Path]:
    """(project root, its merged model) with an evaluation report in the project."""
    root = make_project(tiny_family, tmp_path / "project")
    results = {name: {"comply_rate": rate, "correct_rate": 0.9} for name, rate in (("LRM", 0.25), ("ITM", 0.75), ("RAIN", 0.5))}
    context = {"merged": "models/merged", "labels": {"RAIN": "RAIN: θ_R + λ·α⊙Δ⊥"}, "contamination": {}, "params": {}}
    (root / "reports").mkdir()
    write_outputs(results, root / "metrics.json", root / "eval.csv", root / "reports/report.md", context)
    return root, merge_with_lineage(root, root / "models/merged")


@pytest.fixture(scope="module")
def key_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(private, public) PEM key pair that signs the releases of these tests."""
    return generate_key_pair(tmp_path_factory.mktemp("keys"))


def _keys(client, uri: str) -> dict[str, str]:
    """Object name in the committed release -> its key ({} when nothing is committed)."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    try:
        commit = json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/{COMMIT}")["Body"].read())
    except client.exceptions.NoSuchKey:
        return {}
    prefix = f"{prefix}/{commit['staging']}/"
    listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {o["Key"].removeprefix(prefix): o["Key"] for o in listing.get("Contents", [])}


def _release(model: Path, root: Path, uri: str, key: Path) -> int:
    return rain(["release", str(model), uri, "--project", str(root), "--part-size", PART_SIZE, "--key", str(key)])


def test_release_round_trip(merged, s3, bucket, key_pair, capsys, tmp_path):
    root, model = merged
    uri = f"s3://{bucket}/models/tiny-rain/v1"
    assert _release(model, root, uri, key_pair[0]) == 0, capsys.readouterr().err
    assert "model card with the evaluation table" in capsys.readouterr().out

    keys = _keys(s3, uri)
    assert set(keys) == set(tree_digests(model)) | {MANIFEST, RELEASE_SIGNATURE, PROVENANCE}
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=keys[MANIFEST])["Body"].read())["objects"]
    multipart = sorted(n for n, rec in manifest.items() if "parts" in rec)
    assert multipart == sorted(n for n in manifest if (model / n).is_file() and (model / n).stat().st_size >= 16_000 and n != card.CARD)
    for name, rec in manifest.items():
        stored, composite = stored_checksum(s3, bucket, keys[name])
        assert composite == (name in multipart), name  # multipart: S3 keeps a checksum of the parts' checksums
        assert stored == (composite_checksum(rec["parts"]) if composite else base64.b64encode(bytes.fromhex(rec["sha256"])).decode())
    assert all(stored_checksum(s3, bucket, keys[name])[0] for name in (lineage.LINEAGE, MANIFEST, RELEASE_SIGNATURE))
    released_card = s3.get_object(Bucket=bucket, Key=keys[card.CARD])["Body"].read().decode()
    assert "| RAIN | RAIN: θ_R + λ·α⊙Δ⊥ | 0.500 |" in released_card and card.PLACEHOLDER not in released_card

    assert rain(["verify", uri, "--project", str(root), "--key", str(key_pair[1]), "--trust-s3-checksums"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{uri}: lineage verified") and "downloaded" not in out, out
    assert "input models.lrm (models/lrm) re-hashed" in out and "signature and signer verified" in out

    assert _release(model, root, uri, key_pair[0]) == 2
    assert f"{uri} already exists: a complete release" in capsys.readouterr().err

    local = tmp_path / "downloaded"  # a released model fetched whole also verifies (its card filled)
    local.mkdir()
    for name, key in keys.items():
        s3.download_file(bucket, key, str(local / name))
    assert rain(["verify", str(local), "--key", str(key_pair[1])]) == 0, capsys.readouterr().out


def _flipped(model: Path, name: str) -> bytes:
    data = bytearray((model / name).read_bytes())
    data[-1] ^= 0x01
    return bytes(data)


@pytest.mark.parametrize("how, downloaded", [
    ("put with a SHA-256 checksum", None),
    ("put without one", "no SHA-256 checksum stored with it"),
    ("multipart upload", f"its multipart checksum does not match the signed {MANIFEST}"),
])
def test_a_replaced_object_fails_the_audit_precisely(merged, s3, bucket, key_pair, capsys, tmp_path, how, downloaded):
    """With S3's checksums trusted (as on real S3, which checks them on upload), a replaced object is found from
    its checksum, and downloaded only when the checksum cannot tell."""
    root, model = merged
    uri = f"s3://{bucket}/models/tiny-rain/v1"
    assert _release(model, root, uri, key_pair[0]) == 0
    shard = sorted(p.name for p in model.glob("model-*.safetensors"))[1]
    data = _flipped(model, shard)
    key = _keys(s3, uri)[shard]
    if how == "multipart upload":
        (tmp_path / shard).write_bytes(data)
        config = TransferConfig(multipart_threshold=1)
        s3.upload_file(str(tmp_path / shard), bucket, key, ExtraArgs={"ChecksumAlgorithm": "SHA256"}, Config=config)
    else:
        s3.put_object(Bucket=bucket, Key=key, Body=data, **({"ChecksumAlgorithm": "SHA256"} if downloaded is None else {}))
    capsys.readouterr()

    assert rain(["verify", uri, "--trust-s3-checksums", "--key", str(key_pair[1])]) == 1
    out = capsys.readouterr().out
    was, now = hashlib.sha256((model / shard).read_bytes()).hexdigest(), hashlib.sha256(data).hexdigest()
    assert out.count("MISMATCH: output") == 1 and out.count("MISMATCH") == 2, out
    assert f"MISMATCH: signature: {shard} differs from the signed sha256 {was[:12]}…" in out
    assert f"MISMATCH: output: {shard} differs: recorded sha256 {was[:12]}…, now {now[:12]}…" in out
    assert (f"downloaded {shard} to hash it ({downloaded})" in out) if downloaded else "downloaded" not in out, out
    assert rain(["verify", uri]) == 1  # by default every object is downloaded and hashed
    assert f"MISMATCH: output: {shard} differs" in capsys.readouterr().out


def test_composite_checksum_matches_s3_for_several_parts(s3, bucket, tmp_path):
    """The part digests release.json keeps give S3's own composite checksum of a three-part upload."""
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(11 * 2**20))
    part = 5 * 2**20
    config = TransferConfig(multipart_threshold=part, multipart_chunksize=part)
    s3.upload_file(str(path), bucket, "blob", ExtraArgs={"ChecksumAlgorithm": "SHA256"}, Config=config)
    record = file_record(path, part)
    assert len(record["parts"]) == 3
    assert stored_checksum(s3, bucket, "blob") == (composite_checksum(record["parts"]), True)
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_model_failing_its_audit_is_not_released(merged, s3, bucket, key_pair, capsys):
    root, model = merged
    (model / "config.json").write_text("{}")
    assert _release(model, root, f"s3://{bucket}/models/tiny-rain/v2", key_pair[0]) == 2
    assert "fails its lineage audit; not released" in capsys.readouterr().err
    assert not _keys(s3, f"s3://{bucket}/models/tiny-rain/v2")


def test_s3_failures_are_one_clear_error(merged, s3, key_pair, capsys):
    """A bucket that does not exist (a real S3 API answer, not a mock) is reported by name, not as a traceback."""
    root, model = merged
    missing = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    assert rain(["verify", f"s3://{missing}/models/tiny-rain/v1", "--project", str(root)]) == 4
    err = capsys.readouterr().err
    assert err.startswith("rain: error: S3 request failed:") and "NoSuchBucket" in err and "AWS_ENDPOINT_URL" in err
    assert _release(model, root, f"s3://{missing}/models/tiny-rain/v1", key_pair[0]) == 4
    assert "S3 request failed" in capsys.readouterr().err
