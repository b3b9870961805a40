"""The audit against an adversary: each attack that once passed `rain verify` or `rain release` now fails,
naming the problem. Local models are real merges of the tiny family; releases go to moto's real S3 server."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch
import yaml

from rain_dev.merged_project import make_project, merge_with_lineage
from rain_tasks.audit import lineage
from rain_tasks.io.checkpoint import load_tensors, read_metadata, save_tensors
from rain_tasks.cli import main as rain
from rain_tasks.io.digest import json_digest
from rain_tasks.io.guards import NonFiniteError, require_finite
from rain_tasks.audit.lineage import LINEAGE, RELEASE_MANIFEST
from rain_tasks.audit.release import COMMIT, STAGING, ReleaseError, release
from rain_dev.s3server import DUMMY_CREDENTIALS, local_s3
from rain_tasks.audit.signing import SigningConfig, generate_key_pair

PART_SIZE = "16KB"


@pytest.fixture
def project(tiny_family, tmp_path) -> Path:
    return make_project(tiny_family, tmp_path / "project")


@pytest.fixture
def model(project) -> Path:
    return merge_with_lineage(project, project / "models/merged")


@pytest.fixture(scope="module")
def key_pair(tmp_path_factory) -> tuple[Path, Path]:
    return generate_key_pair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def other_key(tmp_path_factory) -> tuple[Path, Path]:
    return generate_key_pair(tmp_path_factory.mktemp("other-keys"))


def _verify(*args: str, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = rain(["verify", *args])
    return code, capsys.readouterr().out


def _doc(model: Path) -> dict:
    return json.loads((model / LINEAGE).read_text())


def _write_doc(model: Path, doc: dict) -> None:
    (model / LINEAGE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _other_weights(shard: Path) -> None:
    """The shard rewritten with other weights and the very same metadata (what an attacker swaps in)."""
    tensors, meta = load_tensors(shard), read_metadata(shard)
    save_tensors(shard, {k: v + 0.01 if v.is_floating_point() else v for k, v in tensors.items()}, meta)


# --- local model directories --------------------------------------------------------------------------------------


def test_swapped_shard_with_rewritten_outputs_is_caught_by_the_lineage_digest(model, capsys):
    pinned = _doc(model)["lineage_digest"]
    shard = sorted(model.glob("model-*.safetensors"))[1]
    _other_weights(shard)
    doc = _doc(model)
    doc["outputs"][shard.name] = hashlib.sha256(shard.read_bytes()).hexdigest()
    _write_doc(model, doc)
    code, out = _verify(str(model), capsys=capsys)
    assert code == 1 and "lineage_digest does not cover its core_digest and outputs (the record was edited)" in out, out

    doc["lineage_digest"] = lineage.lineage_digest(doc["core_digest"], doc["outputs"])  # the attacker recomputes it too
    _write_doc(model, doc)
    code, out = _verify(str(model), "--lineage-digest", pinned, capsys=capsys)
    assert code == 1 and f"is not the expected {pinned}" in out, out


def test_a_dotfile_in_the_model_directory_is_an_unexpected_file(model, capsys):
    (model / ".hidden").write_bytes(b"payload")
    code, out = _verify(str(model), capsys=capsys)
    assert code == 1 and "MISMATCH: output: .hidden is not in the lineage record (unexpected file)" in out, out


@pytest.mark.parametrize("outputs", [[], {}, "x", {"../up": "0" * 64}])
def test_malformed_lineage_is_a_named_problem(model, capsys, outputs):
    doc = _doc(model)
    doc["outputs"] = outputs
    _write_doc(model, doc)
    code, out = _verify(str(model), capsys=capsys)
    assert code == 1 and f"{LINEAGE}: malformed: outputs" in out, out


@pytest.mark.parametrize("path", ["/", "../..", "models/../../.."])
def test_lineage_paths_outside_the_project_are_not_followed(model, project, capsys, path):
    doc = _doc(model)
    doc["core"]["inputs"]["models.lrm"]["path"] = path
    doc["core_digest"] = json_digest(doc["core"])
    doc["lineage_digest"] = lineage.lineage_digest(doc["core_digest"], doc["outputs"])
    _write_doc(model, doc)
    start = time.monotonic()
    code, out = _verify(str(model), "--project", str(project), capsys=capsys)
    assert code == 1 and f"input models.lrm ({path}): the recorded path leaves the project" in out, out
    assert time.monotonic() - start < 30  # nothing outside was hashed


def test_a_signed_local_model_verifies_with_its_key_only(model, project, key_pair, other_key, capsys, tmp_path, s3):
    """A release downloaded whole verifies with the right key and fails with another key or any changed byte."""
    uri = f"s3://{s3[1]}/models/tiny/v1"
    release(model, uri, project, PART_SIZE, client=s3[0], signing=SigningConfig(key=key_pair[0]))
    local = _download(s3[0], uri, tmp_path / "downloaded")
    assert _verify(str(local), "--key", str(key_pair[1]), capsys=capsys)[0] == 0
    code, out = _verify(str(local), "--key", str(other_key[1]), capsys=capsys)
    assert code == 1 and "signature: the release signature does not verify" in out, out
    (local / "extra.txt").write_text("not signed")
    code, out = _verify(str(local), "--key", str(key_pair[1]), capsys=capsys)
    assert code == 1 and "signature: extra.txt is not covered by the signature (unsigned file)" in out, out


# --- shard headers ------------------------------------------------------------------------------------------------


def _huge_header(data: bytes) -> bytes:
    return (2**62).to_bytes(8, "little") + data[8:]


def test_a_huge_header_length_is_refused_not_allocated(model, capsys):
    shard = sorted(model.glob("model-*.safetensors"))[0]
    shard.write_bytes(_huge_header(shard.read_bytes()))
    code, out = _verify(str(model), capsys=capsys)
    assert code == 1 and f"{shard.name} is not a readable safetensors file" in out and "header length 4611686018427387904 exceeds" in out


# --- derived values -----------------------------------------------------------------------------------------------


def test_non_finite_derived_values_name_the_output():
    require_finite({"gram": torch.ones(2, 2)}, "features layer 0")
    with pytest.raises(NonFiniteError, match=r"features layer 3: NaN or Inf in gram\.q"):
        require_finite({"gram.q": torch.tensor([1.0, float("nan")]), "gram.k": torch.ones(1)}, "features layer 3")
    import pandas as pd

    with pytest.raises(NonFiniteError, match=r"alpha table: NaN or Inf in alpha"):
        require_finite(pd.DataFrame({"layer": [0, 1], "alpha": [0.5, float("inf")]}), "alpha table")


# --- S3 -----------------------------------------------------------------------------------------------------------


@pytest.fixture
def s3(monkeypatch) -> Iterator[tuple[Any, str, str]]:
    """(client, a fresh bucket, endpoint) of a local S3 server, which `rain` reaches through AWS_ENDPOINT_URL."""
    with local_s3("rain-adversary") as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        client = boto3.client("s3")
        bucket = f"rain-adv-{uuid.uuid4().hex[:12]}"
        client.create_bucket(Bucket=bucket)
        yield client, bucket, endpoint


def _staging(client, uri: str) -> tuple[str, str]:
    """(bucket, key prefix of the committed staging directory)."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    commit = json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/{COMMIT}")["Body"].read())
    return bucket, f"{prefix}/{commit['staging']}"


def _objects(client, bucket: str, prefix: str) -> dict[str, str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return {o["Key"][len(prefix) + 1:]: o["Key"] for page in pages for o in page.get("Contents", [])}


def _download(client, uri: str, into: Path) -> Path:
    bucket, prefix = _staging(client, uri)
    for name, key in _objects(client, bucket, prefix).items():
        (into / name).parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(into / name))
    return into


def _released(model, project, s3, key_pair, version="v1") -> str:
    uri = f"s3://{s3[1]}/models/tiny/{version}"
    release(model, uri, project, PART_SIZE, client=s3[0], signing=SigningConfig(key=key_pair[0]))
    return uri


def test_any_changed_byte_of_a_signed_release_fails_on_s3(model, project, s3, key_pair, other_key, capsys):
    client, bucket, _ = s3
    uri = _released(model, project, s3, key_pair)
    assert _verify(uri, "--key", str(key_pair[1]), capsys=capsys)[0] == 0
    code, out = _verify(uri, "--key", str(other_key[1]), capsys=capsys)
    assert code == 1 and "signature: the release signature does not verify" in out
    _, prefix = _staging(client, uri)
    for name, key in _objects(client, bucket, prefix).items():
        data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        changed = bytearray(data)
        changed[len(changed) // 2] ^= 0x01
        client.put_object(Bucket=bucket, Key=key, Body=bytes(changed), ChecksumAlgorithm="SHA256")
        code, out = _verify(uri, "--key", str(key_pair[1]), capsys=capsys)
        assert code == 1 and "MISMATCH: signature" in out, (name, out)
        client.put_object(Bucket=bucket, Key=key, Body=data, ChecksumAlgorithm="SHA256")
    client.put_object(Bucket=bucket, Key=f"{prefix}/unsigned.bin", Body=b"x")
    code, out = _verify(uri, "--key", str(key_pair[1]), capsys=capsys)
    assert code == 1 and "unsigned.bin is not covered by the signature (unsigned file)" in out
    client.delete_object(Bucket=bucket, Key=f"{prefix}/unsigned.bin")
    assert _verify(uri, "--key", str(key_pair[1]), capsys=capsys)[0] == 0


def test_a_multipart_shard_replaced_with_its_part_digests_in_release_json_fails(model, project, s3, key_pair, capsys, tmp_path):
    """The attack that once passed without a byte downloaded: the shard and release.json's record of it replaced."""
    from boto3.s3.transfer import TransferConfig

    from rain_tasks.audit.release import file_record

    client, bucket, _ = s3
    uri = _released(model, project, s3, key_pair)
    _, prefix = _staging(client, uri)
    objects = _objects(client, bucket, prefix)
    manifest = json.loads(client.get_object(Bucket=bucket, Key=objects[RELEASE_MANIFEST])["Body"].read())
    shard = next(n for n, rec in manifest["objects"].items() if "parts" in rec)
    forged = tmp_path / shard
    shutil.copy(model / shard, forged)
    _other_weights(forged)
    client.upload_file(str(forged), bucket, objects[shard], ExtraArgs={"ChecksumAlgorithm": "SHA256"},
                       Config=TransferConfig(multipart_threshold=1))
    manifest["objects"][shard] = file_record(forged, 5 * 2**20)
    client.put_object(Bucket=bucket, Key=objects[RELEASE_MANIFEST], Body=json.dumps(manifest).encode(), ChecksumAlgorithm="SHA256")
    for args in (["--trust-s3-checksums"], []):
        code, out = _verify(uri, "--key", str(key_pair[1]), *args, capsys=capsys)
        assert code == 1, out
        assert f"MISMATCH: signature: {RELEASE_MANIFEST} differs from the signed sha256" in out
        assert f"MISMATCH: output: {shard} differs" in out
    code, out = _verify(uri, "--trust-s3-checksums", capsys=capsys)  # unsigned audit: release.json is not trusted
    assert code == 1 and f"{RELEASE_MANIFEST} is not covered by a verified signature" in out


def test_a_forged_stored_checksum_does_not_pass(model, project, s3, key_pair, capsys):
    """The local server stores a checksum a client claims: by default verify hashes the bytes it downloads."""
    import base64

    client, bucket, _ = s3
    uri = _released(model, project, s3, key_pair)
    _, prefix = _staging(client, uri)
    key = _objects(client, bucket, prefix)["config.json"]
    original = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    claimed = base64.b64encode(hashlib.sha256(original).digest()).decode()
    client.put_object(Bucket=bucket, Key=key, Body=b'{"evil": true}', ChecksumAlgorithm="SHA256", ChecksumSHA256=claimed)
    code, out = _verify(uri, capsys=capsys)
    assert code == 1 and "MISMATCH: output: config.json differs" in out, out


def test_a_huge_header_length_on_s3_is_refused_in_a_bounded_read(model, project, s3, key_pair, capsys):
    client, bucket, _ = s3
    uri = _released(model, project, s3, key_pair)
    _, prefix = _staging(client, uri)
    key = _objects(client, bucket, prefix)[sorted(p.name for p in model.glob("model-*.safetensors"))[0]]
    data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    client.put_object(Bucket=bucket, Key=key, Body=_huge_header(data), ChecksumAlgorithm="SHA256")
    code, out = _verify(uri, capsys=capsys)
    assert code == 1 and "header length 4611686018427387904 exceeds the file" in out, out


@pytest.mark.parametrize("uri", ["s3://b/models/../../x/v1", "s3://b/models/tiny/..", "s3://b//abs/v1", "s3://b/a/./v1"])
def test_release_names_must_be_safe(model, project, key_pair, capsys, uri):
    code = rain(["release", str(model), uri, "--project", str(project), "--key", str(key_pair[0])])
    assert code == 2 and "only relative names inside their directory are allowed" in capsys.readouterr().err


def test_an_unsigned_release_is_refused_before_any_upload(model, project, s3, capsys):
    uri = f"s3://{s3[1]}/models/tiny/v1"
    assert rain(["release", str(model), uri, "--project", str(project)]) == 2
    assert "releases are signed: give --key" in capsys.readouterr().err
    assert not _objects(s3[0], s3[1], "models/tiny/v1")


def test_objects_outside_the_committed_release_are_reported(model, project, s3, key_pair, capsys):
    client, bucket, _ = s3
    uri = _released(model, project, s3, key_pair)
    client.put_object(Bucket=bucket, Key="models/tiny/v1/extra.safetensors", Body=b"x")
    code, out = _verify(uri, "--key", str(key_pair[1]), capsys=capsys)
    assert code == 1 and "models/tiny/v1/extra.safetensors lies outside the committed release" in out


# --- concurrency and crashes of a release ---------------------------------------------------------------------------


def _second_model(project: Path) -> Path:
    """Another merge of the same project (lam 2.0): a different release of the same version."""
    (project / "params.yaml").write_text(yaml.safe_dump({"merge": {"lam": 2.0}}))
    try:
        return merge_with_lineage(project, project / "models/merged-2")
    finally:
        (project / "params.yaml").write_text(yaml.safe_dump({"merge": {"lam": 0.5}}))


def test_of_two_concurrent_releases_of_one_version_exactly_one_wins(model, project, s3, key_pair, capsys):
    client, bucket, endpoint = s3
    other = _second_model(project)
    uri = f"s3://{bucket}/models/tiny/v1"
    clients = [boto3.client("s3", endpoint_url=endpoint) for _ in range(2)]
    outcomes: dict[int, Any] = {}
    barrier = threading.Barrier(2)

    def run(i: int, source: Path) -> None:
        barrier.wait()
        try:
            outcomes[i] = release(source, uri, project, PART_SIZE, client=clients[i], signing=SigningConfig(key=key_pair[0]))
        except ReleaseError as e:
            outcomes[i] = e

    threads = [threading.Thread(target=run, args=(i, m)) for i, m in enumerate((model, other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [o for o in outcomes.values() if isinstance(o, ReleaseError)]
    assert len(errors) == 1 and "committed first" in str(errors[0]), outcomes
    winner = next(o for o in outcomes.values() if not isinstance(o, ReleaseError))
    stagings = {k.split("/")[1] for k in _objects(client, bucket, "models/tiny/v1") if k.startswith(STAGING + "/")}
    assert stagings == {winner.staging.prefix.rsplit("/", 1)[1]}, "the loser removed its own objects, and only them"
    assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")
    assert _verify(uri, "--key", str(key_pair[1]), capsys=capsys)[0] == 0


def test_a_killed_release_resumes_and_aborts_its_stale_multipart_uploads(model, project, s3, key_pair, capsys):
    client, bucket, endpoint = s3
    uri = f"s3://{bucket}/models/tiny/v1"
    env = {**__import__("os").environ, **DUMMY_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
    cmd = [str(Path(sys.executable).parent / "rain"), "release", str(model), uri, "--project", str(project),
           "--part-size", PART_SIZE, "--key", str(key_pair[0])]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not _objects(client, bucket, f"models/tiny/v1/{STAGING}"):
        assert proc.poll() is None and time.monotonic() < deadline, "the release ended before it could be killed"
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    staged = _objects(client, bucket, "models/tiny/v1")
    assert COMMIT not in staged, "a killed release is not committed"
    stage_prefix = "models/tiny/v1/" + next(iter(staged)).rsplit("/", 1)[0]
    # what a kill in the middle of a multipart upload leaves: an upload that is never completed
    client.create_multipart_upload(Bucket=bucket, Key=f"{stage_prefix}/model-00001-of-00005.safetensors", ChecksumAlgorithm="SHA256")
    code = rain(cmd[1:])
    out = capsys.readouterr().out
    assert code == 0 and "already uploaded by an interrupted run" in out, out
    assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")
    assert _verify(uri, "--key", str(key_pair[1]), capsys=capsys)[0] == 0


def test_access_denied_is_not_retried_and_throttling_is(model, project, key_pair, capsys, monkeypatch):
    """Behind a relay that answers 503 SlowDown to every third request, a release completes with botocore's
    backoff; a 403 AccessDenied is answered once, and the release fails at once naming it."""
    from rain_dev.throttle import ThrottlingRelay

    with local_s3("rain-throttled") as endpoint, ThrottlingRelay(endpoint, every=3) as relay:
        monkeypatch.setenv("AWS_ENDPOINT_URL", relay.url)
        uri = "s3://rain-throttled/models/tiny/v1"
        assert rain(["release", str(model), uri, "--project", str(project), "--part-size", PART_SIZE, "--key", str(key_pair[0])]) == 0
        assert relay.throttled > 0, "the relay throttled no request"
        assert _verify(uri, "--key", str(key_pair[1]), capsys=capsys)[0] == 0
        relay.every, relay.deny = 0, True
        before = relay.requests
        assert rain(["verify", uri]) == 4
        assert "AccessDenied" in capsys.readouterr().err
        assert relay.requests - before == 1, "AccessDenied must not be retried"


def test_a_stage_producing_non_finite_values_names_it_and_writes_nothing(tiny_family, tmp_path, monkeypatch, capsys):
    """An LRM with finite but huge norm weights (it passes `rain check`'s NaN/Inf scan) overflows the activations:
    the features stage refuses to write its Grams, naming the file, instead of a linear-algebra traceback later."""
    from rain_dev.tiny import instruction_rows, reasoning_rows, write_jsonl

    root = tmp_path / "project"
    for role in ("base", "itm", "lrm"):
        shutil.copytree(tiny_family[role], root / "ckpt" / role)
    write_jsonl(root / "calib/reasoning.jsonl", reasoning_rows())
    write_jsonl(root / "calib/heldout.jsonl", reasoning_rows(3))
    write_jsonl(root / "calib/instruction.jsonl", instruction_rows())
    (root / "params.yaml").write_text(yaml.safe_dump({
        "models": {"base": "ckpt/base", "itm": "ckpt/itm", "lrm": "ckpt/lrm"},
        "calibration": {"reasoning": "calib/reasoning.jsonl", "instruction": "calib/instruction.jsonl",
                        "reasoning_heldout": "calib/heldout.jsonl"},
        "check": {"min_free_space": "0B"}}))
    from rain_tasks.io.checkpoint import Checkpoint

    lrm = Checkpoint(root / "ckpt/lrm")
    norm = "model.layers.0.input_layernorm.weight"
    shard = root / "ckpt/lrm" / lrm.weight_map[norm]
    tensors, meta = load_tensors(shard), read_metadata(shard)
    tensors[norm] = tensors[norm] * 1e30
    save_tensors(shard, tensors, meta)
    monkeypatch.chdir(root)
    assert rain(["check"]) == 0
    capsys.readouterr()
    assert rain(["stage", "features"]) == 2
    err = capsys.readouterr().err
    assert "rain: error: features " in err and ": NaN or Inf in " in err and "Traceback" not in err, err
    assert not list(root.rglob("artifacts/**/layer_*.safetensors")), "no features file was written"


def test_the_demo_signs_its_release_with_a_key_pair_outside_git(model, project, s3):
    """`make demo`'s release step: a key pair under .rain/keys (git-ignored), a release that verifies with it."""
    from rain_dev.demo import DEMO_KEYS, release_signed

    client, bucket, endpoint = s3
    uri = release_signed(project, endpoint, bucket)
    assert (project / DEMO_KEYS / "release-key.pem").stat().st_mode & 0o077 == 0
    assert COMMIT in _objects(client, bucket, uri.removeprefix(f"s3://{bucket}/"))
    root_gitignore = (Path(__file__).resolve().parents[1] / ".gitignore").read_text().splitlines()
    assert "/.rain/" in root_gitignore


def test_keygen_makes_a_pair_that_signs_and_verifies(model, project, s3, tmp_path, capsys):
    assert rain(["keygen", str(tmp_path / "k")]) == 0
    assert "release-key.pem" in capsys.readouterr().out
    uri = f"s3://{s3[1]}/models/tiny/v9"
    assert rain(["release", str(model), uri, "--project", str(project), "--key", str(tmp_path / "k/release-key.pem")]) == 0
    assert _verify(uri, "--key", str(tmp_path / "k/release-key.pub"), capsys=capsys)[0] == 0
