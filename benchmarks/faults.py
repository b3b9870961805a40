"""Fault figures: kill -9 at several points of a merge and of a release, each followed by a rerun; concurrent
runners on one output and concurrent releases of one version; a release through injected throttling.

Merges run as the real `rain stage merge` subprocess on an 8-layer hidden-256 family (the tests/test_faults.py
project); releases go to moto's S3 server on 127.0.0.1 (throttling from rain_dev/throttle.py's HTTP relay).

    python benchmarks/faults.py [--trials 10]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

RAIN = str(Path(sys.executable).parent / "rain")
MERGED = "models/merged"


def _env(**extra: str) -> dict[str, str]:
    from rain_dev.s3server import DUMMY_CREDENTIALS

    return {**os.environ, **DUMMY_CREDENTIALS, "DVC_NO_ANALYTICS": "1", **extra}


def _merge_project(root: Path) -> Path:
    """The test_faults project: every stage before the merge done."""
    import yaml

    from rain_dev.tiny import instruction_rows, make_family, reasoning_rows, write_jsonl

    make_family(root / "ckpt", hidden=256, ffn=1024, layers=8)
    write_jsonl(root / "calib/reasoning.jsonl", reasoning_rows())
    write_jsonl(root / "calib/heldout.jsonl", reasoning_rows(3))
    write_jsonl(root / "calib/instruction.jsonl", instruction_rows())
    (root / "params.yaml").write_text(yaml.safe_dump({
        "models": {"base": "ckpt/base", "itm": "ckpt/itm", "lrm": "ckpt/lrm"},
        "calibration": {"reasoning": "calib/reasoning.jsonl", "instruction": "calib/instruction.jsonl",
                        "reasoning_heldout": "calib/heldout.jsonl"},
        "merge": {"max_shard_size": "64KB"}, "check": {"min_free_space": "0B"}}))
    script = ("from rain_tasks.params import load_params; from rain_tasks.model.runtime import configure; "
              "from rain_tasks.pipeline.runner import run_stage; configure(); "
              "[run_stage(s, load_params('params.yaml')) for s in "
              "('task_vectors', 'features', 'projection', 'attention_stats', 'alpha')]")
    subprocess.run([sys.executable, "-c", script], cwd=root, env=_env(), check=True, capture_output=True)
    return root


def _model(root: Path) -> dict[str, str] | None:
    from rain_tasks.io.digest import tree_digests

    if not (root / MERGED).is_dir():
        return None
    files = tree_digests(root / MERGED)
    files.pop("lineage.json", None)
    return files


def merge_kills(root: Path, delays_ms: list[int]) -> list[dict]:
    """Kill `rain stage merge`, replacing an existing model, `delay` ms after its temporary directory appeared (-1:
    the moment lineage.json is in it, just before the rename); rerun."""
    subprocess.run([RAIN, "stage", "merge"], cwd=root, env=_env(), check=True, capture_output=True)
    reference = _model(root)
    rows = []
    for delay in delays_ms:
        (root / MERGED / "lineage.json").touch()
        proc = subprocess.Popen([RAIN, "stage", "merge"], cwd=root, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ready = ((lambda: any((root / "models").glob(".merged.tmp-*/merged/lineage.json"))) if delay < 0 else
                 (lambda: any((root / "models").glob(".merged.tmp-*"))))
        while not ready() and proc.poll() is None:
            time.sleep(0.0005)
        time.sleep(max(delay, 0) / 1000)
        finished = proc.poll() is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        after_kill = _model(root)
        temporaries = len(list((root / "models").glob(".merged.tmp-*")))
        t = time.monotonic()
        rerun = subprocess.run([RAIN, "stage", "merge"], cwd=root, env=_env(), capture_output=True)
        rows.append({"kill": "lineage.json written" if delay < 0 else f"{delay} ms into the write", "had finished": finished,
                     "model after kill": "old, intact" if after_kill == reference else "MISSING/CHANGED",
                     "temporaries left": temporaries, "rerun rc": rerun.returncode, "rerun s": round(time.monotonic() - t, 1),
                     "rerun identical": _model(root) == reference,
                     "temporaries after rerun": len(list((root / "models").glob(".merged.tmp-*")))})
    return rows


def concurrent_runners(root: Path, trials: int) -> list[dict]:
    """Two `rain stage merge` started together: how many were refused, and whether the model stayed right."""
    reference = _model(root)
    rows = []
    for _ in range(trials):
        procs = [subprocess.Popen([RAIN, "stage", "merge"], cwd=root, env=_env(), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [(p.wait(), p.stderr.read()) for p in procs]
        refused = sum(rc == 2 and "is being written by another runner" in err for rc, err in outs)
        rows.append({"completed": sum(rc == 0 for rc, _ in outs), "refused (lock)": refused,
                     "tracebacks": sum("Traceback" in err for _, err in outs), "model identical": _model(root) == reference})
    return rows


def _released_model(tmp: Path) -> tuple[Path, Path, Path]:
    """(project, merged model, second merged model with other params) on the tiny family."""
    import yaml

    from rain_dev.merged_project import make_project, merge_with_lineage
    from rain_dev.tiny import make_family, reasoning_rows, write_jsonl

    family = make_family(tmp / "family")
    family["reasoning"] = write_jsonl(tmp / "family/reasoning.jsonl", reasoning_rows())
    root = make_project(family, tmp / "project")
    first = merge_with_lineage(root, root / "models/merged")
    (root / "params.yaml").write_text(yaml.safe_dump({"merge": {"lam": 2.0}}))
    second = merge_with_lineage(root, root / "models/merged-2")
    return root, first, second


def _objects(client, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def release_kills(project: Path, model: Path, key: Path, public: Path, endpoint: str, client, thresholds: list[int]) -> list[dict]:
    """Kill `rain release` once k objects are staged; rerun; verify with the key."""
    rows = []
    for i, k in enumerate(thresholds):
        bucket = f"rain-kill-{i}"
        client.create_bucket(Bucket=bucket)
        uri = f"s3://{bucket}/models/tiny/v1"
        cmd = [RAIN, "release", str(model), uri, "--project", str(project), "--part-size", "16KB", "--key", str(key)]
        proc = subprocess.Popen(cmd, env=_env(AWS_ENDPOINT_URL=endpoint), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while len(_objects(client, bucket, "models/tiny/v1/staging/")) < k and proc.poll() is None:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        staged = len(_objects(client, bucket, "models/tiny/v1/staging/"))
        uploads = len(client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))
        committed = any(key_.endswith("commit.json") for key_ in _objects(client, bucket, "models/tiny/v1/"))
        rerun = subprocess.run(cmd, env=_env(AWS_ENDPOINT_URL=endpoint), capture_output=True, text=True)
        reused = re.search(r"(\d+) already uploaded by an interrupted run", rerun.stdout)
        verify = subprocess.run([RAIN, "verify", uri, "--key", str(public)], env=_env(AWS_ENDPOINT_URL=endpoint), capture_output=True)
        rows.append({"kill after staged objects": k, "staged at kill": staged, "open multipart uploads": uploads,
                     "committed at kill": committed, "rerun rc": rerun.returncode,
                     "objects reused by the rerun": int(reused.group(1)) if reused else 0,
                     "multipart uploads after": len(client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])),
                     "verify rc": verify.returncode})
    return rows


def concurrent_releases(project: Path, models: tuple[Path, Path], key: Path, endpoint: str, client, trials: int) -> list[dict]:
    """Two releases of different content to one version at once, `trials` times."""
    from rain_tasks.audit.lineage import audit
    from rain_tasks.audit.release import ReleaseError, S3Files, release, s3_client
    from rain_tasks.audit.signing import SigningConfig, TrustConfig

    rows = []
    for i in range(trials):
        bucket = f"rain-race-{i}"
        client.create_bucket(Bucket=bucket)
        uri = f"s3://{bucket}/models/tiny/v1"
        clients = [s3_client(endpoint) for _ in models]
        barrier, outcomes = threading.Barrier(len(models)), {}

        def run(j: int) -> None:
            barrier.wait()
            try:
                outcomes[j] = release(models[j], uri, project, "16KB", client=clients[j], signing=SigningConfig(key=key))
            except ReleaseError as e:
                outcomes[j] = e

        threads = [threading.Thread(target=run, args=(j,)) for j in range(len(models))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [o for o in outcomes.values() if not isinstance(o, ReleaseError)]
        stagings = {k.split("/")[4] for k in _objects(client, bucket, "models/tiny/v1/staging/")}
        report = audit(S3Files.open(uri, client), trust=TrustConfig(key=key.with_suffix(".pub")))
        rows.append({"winners": len(winners), "staging prefixes left": len(stagings),
                     "open multipart uploads": len(client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])),
                     "winner verifies": report.ok})
    return rows


def throttled_releases(project: Path, model: Path, key: Path, endpoint: str, client, every: list[int]) -> list[dict]:
    """A release through a relay answering 503 SlowDown to every n-th request (0: none), and one AccessDenied."""
    from rain_dev.throttle import ThrottlingRelay

    rows = []
    for i, n in enumerate(every):
        bucket = f"rain-throttle-{i}"
        client.create_bucket(Bucket=bucket)
        with ThrottlingRelay(endpoint, every=n) as relay:
            t = time.monotonic()
            proc = subprocess.run([RAIN, "release", str(model), f"s3://{bucket}/models/tiny/v1", "--project", str(project),
                                   "--part-size", "16KB", "--key", str(key)], env=_env(AWS_ENDPOINT_URL=relay.url), capture_output=True)
            rows.append({"503 SlowDown every": n or "never", "requests": relay.requests, "throttled": relay.throttled,
                         "rc": proc.returncode, "wall s": round(time.monotonic() - t, 1)})
    with ThrottlingRelay(endpoint) as relay:
        relay.deny = True
        proc = subprocess.run([RAIN, "verify", f"s3://{bucket}/models/tiny/v1"], env=_env(AWS_ENDPOINT_URL=relay.url),
                              capture_output=True, text=True)
        rows.append({"503 SlowDown every": "403 AccessDenied", "requests": relay.requests, "throttled": 0,
                     "rc": proc.returncode, "wall s": "-"})
    return rows


def _table(rows: list[dict]) -> str:
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--parts", nargs="+", default=["release", "merge"], choices=["release", "merge"])
    args = parser.parse_args()
    from rain_dev.s3server import local_s3
    from rain_tasks.audit.release import s3_client
    from rain_tasks.audit.signing import generate_key_pair

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        os.environ.update(_env())
        if "release" in args.parts:
            key, public = generate_key_pair(tmp / "keys")
            project, first, second = _released_model(tmp / "release")
            with local_s3("rain-faults-bench") as endpoint:
                client = s3_client(endpoint)
                print("## kill -9 during rain release, then rerun\n")
                print(_table(release_kills(project, first, key, public, endpoint, client, [1, 4, 8, 12])) + "\n")
                print(f"## two concurrent releases of one version ({args.trials} trials)\n")
                print(_table(concurrent_releases(project, (first, second), key, endpoint, client, args.trials)) + "\n")
                print("## release through injected throttling\n")
                print(_table(throttled_releases(project, first, key, endpoint, client, [0, 5, 3, 2])) + "\n")
        if "merge" in args.parts:
            root = _merge_project(tmp / "merge")
            print("## kill -9 during rain stage merge (replacing an existing model), then rerun\n")
            print(_table(merge_kills(root, [0, 50, 150, 300, -1])) + "\n")
            print(f"## two rain stage merge started together ({min(args.trials, 3)} trials)\n")
            print(_table(concurrent_runners(root, min(args.trials, 3))) + "\n")


if __name__ == "__main__":
    main()
