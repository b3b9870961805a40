"""Faults for real: a SIGKILLed merge, a write that runs out of space, an S3 remote that is down or drops mid-push.

The merge runs as the real `rain stage merge` subprocess on a project whose earlier stages
ran for real (an 8-layer, hidden-256 family, ~25 MB per model, small shards so the merge
writes ~100 files). Out-of-space is a kernel-enforced file-size limit (RLIMIT_FSIZE, EFBIG)
on that subprocess: the same failed write() a full disk gives, without root. The S3 remote
is moto's server behind a TCP relay that the test slows down, cuts and restores.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest
import yaml

from rain_tasks.io.artifacts import atomic_path
from rain_tasks.io.digest import tree_digests
from rain_tasks.params import load_params
from rain_tasks.io.remote import PushFailed, push
from rain_dev.s3server import DUMMY_CREDENTIALS, free_port
from rain_tasks.pipeline.stages import MERGED, PROJ
from rain_tasks.io.artifacts import MANIFEST
from rain_dev.tiny import instruction_rows, make_family, reasoning_rows, write_jsonl

RAIN = str(Path(sys.executable).parent / "rain")
UPSTREAM = ("task_vectors", "features", "projection", "attention_stats", "alpha")
LAYERS = 8


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", **DUMMY_CREDENTIALS}


#: the S3 SDK's own per-request retries off, so the test exercises push()'s retries and stays fast (with its
#: default five attempts and backoff, a push of 100 objects to a dead link takes minutes before failing)
NO_SDK_RETRIES = {"AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"}


@pytest.fixture(scope="module")
def merge_project(tmp_path_factory) -> Path:
    """A project with every stage before the merge done."""
    root = tmp_path_factory.mktemp("faults") / "project"
    make_family(root / "ckpt", hidden=256, ffn=1024, layers=LAYERS)
    write_jsonl(root / "calib/reasoning.jsonl", reasoning_rows())
    write_jsonl(root / "calib/heldout.jsonl", reasoning_rows(3))
    write_jsonl(root / "calib/instruction.jsonl", instruction_rows())
    params = {
        "models": {"base": "ckpt/base", "itm": "ckpt/itm", "lrm": "ckpt/lrm"},
        "calibration": {"reasoning": "calib/reasoning.jsonl", "instruction": "calib/instruction.jsonl",
                        "reasoning_heldout": "calib/heldout.jsonl"},
        "merge": {"max_shard_size": "64KB"},
        "check": {"min_free_space": "0B"},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    # one subprocess configured as `rain stage` is (runtime.configure: thread count, deterministic kernels), so
    # its artifacts are the bytes a `rain stage projection` rerun makes
    script = ("from rain_tasks.params import load_params; from rain_tasks.model.runtime import configure; "
              "from rain_tasks.pipeline.runner import run_stage; configure(); "
              f"[run_stage(s, load_params('params.yaml')) for s in {UPSTREAM!r}]")
    subprocess.run([sys.executable, "-c", script], cwd=root, env=_env(), check=True, capture_output=True)
    return root


def _artifact(model_dir: Path) -> dict:
    """What must be identical between runs: every file's sha256, and of lineage.json its `core` (its
    `provenance` is volatile by design, see lineage.py)."""
    files = tree_digests(model_dir)
    files.pop("lineage.json", None)
    lineage = model_dir / "lineage.json"
    return {"files": files, "core": json.loads(lineage.read_text())["core"] if lineage.is_file() else None}


@pytest.fixture(scope="module")
def reference(merge_project) -> dict:
    """The merged model of an uninterrupted `rain stage merge`."""
    subprocess.run([RAIN, "stage", "merge"], cwd=merge_project, env=_env(), check=True, capture_output=True)
    ref = _artifact(merge_project / MERGED)
    assert len([f for f in ref["files"] if f.endswith(".safetensors")]) > 20
    return ref


def _temporaries(root: Path) -> list[Path]:
    return sorted((root / MERGED).parent.glob(".merged.tmp-*"))


def _kill_when(root: Path, stage: str, ready: Callable[[], bool], timeout_s: float = 120) -> None:
    """Start `rain stage STAGE` and SIGKILL it the moment `ready()` (polled every millisecond) holds."""
    proc = subprocess.Popen([RAIN, "stage", stage], cwd=root, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"rain stage {stage} ended (rc {proc.returncode}) before the moment to kill it")
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def test_sigkilled_merge_leaves_nothing_and_rerun_is_bit_identical(merge_project, reference):
    root = merge_project
    shutil.rmtree(root / MERGED)
    _kill_when(root, "merge", lambda: any(tmp.glob("*/part-*.safetensors") for tmp in _temporaries(root)))
    [tmp] = _temporaries(root)
    assert not (root / MERGED).exists(), "a killed merge must leave no model directory"
    assert tmp.exists()  # what the killed writer left: hidden, beside the final path, never at it
    rerun = subprocess.run([RAIN, "stage", "merge"], cwd=root, env=_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert _temporaries(root) == [], "the rerun removes the killed run's temporary"
    assert _artifact(root / MERGED) == reference


def test_sigkilled_projection_is_refused_downstream_and_resumes_to_identical_output(merge_project, reference):
    """A projection killed after some layers: the merge refuses the incomplete Δ⊥; the rerun keeps the finished
    layers and ends with the same bytes as an uninterrupted run."""
    root, proj = merge_project, merge_project / PROJ
    expected = tree_digests(proj)
    shutil.rmtree(proj)
    _kill_when(root, "projection", lambda: any(proj.glob("layer_*.safetensors")))
    finished = {p.name: p.stat().st_mtime_ns for p in proj.glob("layer_*.safetensors")}
    assert not (proj / MANIFEST).exists() and 0 < len(finished) < LAYERS
    refused = subprocess.run([RAIN, "stage", "merge"], cwd=root, env=_env(), capture_output=True, text=True)
    assert refused.returncode == 2
    assert "artifacts/projected: incomplete: no manifest.json, so stage projection was interrupted" in refused.stderr
    assert _artifact(root / MERGED) == reference, "the refused merge must not touch the merged model"
    subprocess.run([RAIN, "stage", "projection"], cwd=root, env=_env(), check=True, capture_output=True)
    assert tree_digests(proj) == expected
    assert {n: (proj / n).stat().st_mtime_ns for n in finished} == finished, "finished layers are reused, not redone"


def _limit_file_size(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_out_of_space_mid_merge_fails_cleanly_and_rerun_completes(merge_project, reference):
    """A write refused by the kernel half-way (shards up to 64 KB fit, the 1 MB MLP shards do not)."""
    root = merge_project
    shutil.rmtree(root / MERGED)
    proc = subprocess.run([RAIN, "stage", "merge"], cwd=root, env=_env(), capture_output=True, text=True,
                          preexec_fn=_limit_file_size(500_000))
    assert proc.returncode == 3, proc.stderr
    assert "rain: error: out of space while writing" in proc.stderr and "models/merged (File too large)" in proc.stderr
    assert "free disk space" in proc.stderr and "Traceback" not in proc.stderr
    assert not (root / MERGED).exists() and _temporaries(root) == []
    subprocess.run([RAIN, "stage", "merge"], cwd=root, env=_env(), check=True, capture_output=True)
    assert _artifact(root / MERGED) == reference


def test_free_space_is_checked_against_the_merged_model_size(merge_project, reference):
    """The up-front estimate of the merged model is its real size (so `rain check` refuses a disk that is too small)."""
    from rain_tasks.io.checkpoint import Checkpoint
    from rain_tasks.pipeline.validation import output_estimates

    params = load_params(merge_project / "params.yaml")
    lrm = Checkpoint(merge_project / "ckpt/lrm")
    merged = Checkpoint(merge_project / MERGED)
    real = sum(merged.get(n).numel() * merged.get(n).element_size() for n in merged.names())
    assert output_estimates(params, lrm, lrm)[MERGED] == real


def test_stale_temporary_of_a_dead_writer_is_removed_and_a_live_ones_kept(tmp_path):
    final = tmp_path / "out.bin"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".out.bin.tmp-{dead.pid}-abc"
    live = tmp_path / f".out.bin.tmp-{os.getppid()}-def"
    stale.mkdir()
    live.mkdir()
    with atomic_path(final) as tmp:
        tmp.write_bytes(b"x")
    assert final.read_bytes() == b"x"
    assert not stale.exists() and live.exists()


# --- S3: a remote that is down, or drops the connection mid-push ----------------------------------


class Relay:
    """A TCP relay to the S3 server that delays each chunk (a slow link) and can be cut and restored."""

    def __init__(self, target_port: int, delay_s: float = 0.02):
        self.port, self.target, self.delay_s = free_port(), target_port, delay_s
        self._socks: list[socket.socket] = []
        self._listener: socket.socket | None = None

    def start(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port), reuse_port=True)
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def cut(self) -> None:
        """Close the listener and every open connection: in-flight requests fail, new ones are refused."""
        for s in [self._listener, *self._socks]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._socks.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(16384):
                time.sleep(self.delay_s)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()


def _objects(endpoint: str, bucket: str) -> int:
    return boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket).get("KeyCount", 0)


@pytest.fixture
def s3(monkeypatch):
    """moto's S3 server with a bucket; yields (endpoint, bucket)."""
    from moto.server import ThreadedMotoServer

    for k, v in DUMMY_CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="rain-faults")
    yield endpoint, "rain-faults"
    server.stop()


def _dvc_repo(root: Path, endpoint: str, n_files: int = 100) -> Path:
    """A git+DVC repository tracking `n_files` random files, its default remote at `endpoint`."""
    env = _env()
    root.mkdir(parents=True)
    data = root / "artifacts"
    data.mkdir()
    for i in range(n_files):
        (data / f"part_{i:03d}.bin").write_bytes(os.urandom(20_000))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "add", "-q", "artifacts"],
                ["dvc", "remote", "add", "-d", "storage", "s3://rain-faults/dvc"],
                ["dvc", "remote", "modify", "storage", "endpointurl", endpoint]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    return root


def test_s3_down_or_dropping_mid_push_retries_then_fails_clearly_and_a_later_push_completes(s3, tmp_path, monkeypatch):
    endpoint, bucket = s3
    relay = Relay(int(endpoint.rsplit(":", 1)[1]))
    root = _dvc_repo(tmp_path / "repo", f"http://127.0.0.1:{relay.port}")
    monkeypatch.setenv("PATH", _env()["PATH"])
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "site"))
    for k, v in NO_SDK_RETRIES.items():
        monkeypatch.setenv(k, v)

    # 1. remote down: every attempt fails, then one clear error; nothing reaches the bucket
    with pytest.raises(PushFailed, match=r"failed 2 time\(s\); last error: .*Could not connect to the endpoint URL.*rerun `dvc push --run-cache`"):
        push(root, attempts=2, backoff_s=0.1)
    assert _objects(endpoint, bucket) == 0

    # 2. the link drops mid-push (after some objects arrived): fails clearly, some but not all objects pushed
    relay.start()
    total = len(list((root / "artifacts").iterdir())) + 1  # + the directory listing object

    def cut_when_some_arrived() -> None:
        while _objects(endpoint, bucket) < 10:
            time.sleep(0.01)
        relay.cut()

    cutter = threading.Thread(target=cut_when_some_arrived, daemon=True)
    cutter.start()
    with pytest.raises(PushFailed, match="last error: ERROR"):
        push(root, attempts=1)
    cutter.join()
    assert 10 <= _objects(endpoint, bucket) < total

    # 3. link back: a later push uploads what is missing; a fresh clone pulls byte-identical files
    relay.start()
    push(root, attempts=1)
    assert _objects(endpoint, bucket) == total
    clone = tmp_path / "clone"
    env = {**_env(), "DVC_SITE_CACHE_DIR": str(tmp_path / "site")}
    subprocess.run(["git", "add", "-A"], cwd=root, env=env, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"], cwd=root, env=env, check=True)
    subprocess.run(["git", "clone", "-q", str(root), str(clone)], env=env, check=True)
    subprocess.run(["dvc", "pull", "-q"], cwd=clone, env=env, check=True, capture_output=True)
    assert tree_digests(clone / "artifacts") == tree_digests(root / "artifacts")


def test_sigkilled_merge_replacing_a_model_keeps_the_old_one(merge_project, reference):
    """A merge that replaces an existing model, killed mid-write: the old model stays in place, whole."""
    root = merge_project
    subprocess.run([RAIN, "stage", "merge"], cwd=root, env=_env(), check=True, capture_output=True)
    assert _artifact(root / MERGED) == reference
    (root / MERGED / "lineage.json").touch()  # DVC would rerun it; the stage rewrites the whole directory
    _kill_when(root, "merge", lambda: any(tmp.glob("*/part-*.safetensors") for tmp in _temporaries(root)))
    assert _artifact(root / MERGED) == reference, "the old model is kept until the new one is in place"
    subprocess.run([RAIN, "stage", "merge"], cwd=root, env=_env(), check=True, capture_output=True)
    assert _artifact(root / MERGED) == reference and _temporaries(root) == []


def test_a_writer_killed_between_the_two_renames_gets_the_old_directory_back(tmp_path):
    """The state a kill between 'rename the old directory aside' and 'rename the new one in' leaves (the old
    directory inside a dead writer's temporary, nothing at the final path): the next write restores it first."""
    final = tmp_path / "model"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".model.tmp-{dead.pid}-abc"
    (stale / ".replaced").mkdir(parents=True)
    (stale / ".replaced" / "weights.bin").write_bytes(b"old")
    (stale / "model").mkdir()
    (stale / "model" / "weights.bin").write_bytes(b"half-written")
    from rain_tasks.io.artifacts import remove_stale_temporaries

    remove_stale_temporaries(final)
    assert (final / "weights.bin").read_bytes() == b"old" and not stale.exists()
    with pytest.raises(RuntimeError):  # a failed write leaves the restored directory alone
        with atomic_path(final) as tmp:
            tmp.mkdir()
            raise RuntimeError("killed")
    assert (final / "weights.bin").read_bytes() == b"old"
    with atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "weights.bin").write_bytes(b"new")
    assert (final / "weights.bin").read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_two_runners_on_one_output_do_not_interleave(merge_project, reference):
    """`rain stage merge` while another one writes the same model (paused mid-write with SIGSTOP, as a slow disk
    would hold it): the second stops at once naming the holder; the first, resumed, completes the model."""
    root = merge_project
    first = subprocess.Popen([RAIN, "stage", "merge"], cwd=root, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not _temporaries(root):
        assert first.poll() is None and time.monotonic() < deadline, "the first merge ended before it could be paused"
        time.sleep(0.001)
    first.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.run([RAIN, "stage", "merge"], cwd=root, env=_env(), capture_output=True, text=True)
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait() == 0
    assert second.returncode == 2, second.stderr
    assert f"is being written by another runner (pid {first.pid}) in {root}" in second.stderr
    assert "Traceback" not in second.stderr
    assert _artifact(root / MERGED) == reference and _temporaries(root) == []


def test_a_push_to_a_bucket_that_does_not_exist_is_not_retried(s3, tmp_path, monkeypatch, caplog):
    """NoSuchBucket (a real answer of the S3 server) is permanent: one attempt, then a clear error."""
    endpoint, _ = s3
    root = _dvc_repo(tmp_path / "repo", endpoint, n_files=3)
    monkeypatch.setenv("PATH", _env()["PATH"])
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "site"))
    subprocess.run(["dvc", "remote", "modify", "storage", "url", "s3://no-such-bucket-here/dvc"], cwd=root, check=True)
    with pytest.raises(PushFailed, match=r"was refused: .*NoSuchBucket.*Retrying cannot fix this"):
        push(root, attempts=3, backoff_s=30)
    assert len([r for r in caplog.records if "dvc push attempt" in r.message]) == 1
