"""Bad inputs are refused up front: `rain check` names the file, field or tensor and what to do, and writes nothing.

Each case copies the tiny family and calibration sets into a fresh project, breaks one thing
for real (rewritten safetensors, truncated or deleted shards, edited tokenizer and config
files, malformed calibration rows, out-of-range params), runs the real `rain check`, and
compares the project tree before and after.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from rain_tasks.io.checkpoint import INDEX_NAME, Checkpoint, TensorFile, load_tensors, read_metadata, save_tensors
from rain_tasks.cli import main
from rain_tasks.io.digest import load_memo, save_memo
from rain_tasks.pipeline.validation import FINITE_SHARDS
from rain_dev.projects import project_env
from rain_dev.tiny import instruction_rows, make_family, reasoning_rows, write_jsonl

Q0 = "model.layers.0.self_attn.q_proj.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"


def _params(models: dict[str, str] | None = None, **sections: dict) -> dict:
    """params.yaml of a test project: checkpoints under ckpt/, calibration under calib/, no disk headroom."""
    params = {
        "models": models or {"base": "ckpt/base", "itm": "ckpt/itm", "lrm": "ckpt/lrm"},
        "calibration": {"reasoning": "calib/reasoning.jsonl", "instruction": "calib/instruction.jsonl",
                        "reasoning_heldout": "calib/heldout.jsonl"},
        "merge": {"max_shard_size": "20KB"},
        "check": {"min_free_space": "0B"},
        "attention": {"max_tokens": 48},
    }
    for section, values in sections.items():
        params[section] = {**params.get(section, {}), **values}
    return params


def _write_params(root: Path, params: dict) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def project(tiny_family, tmp_path) -> Path:
    """A valid project: `rain check` passes on it as it is."""
    root = tmp_path / "project"
    for role in ("base", "itm", "lrm"):
        shutil.copytree(tiny_family[role], root / "ckpt" / role)
    write_jsonl(root / "calib/reasoning.jsonl", reasoning_rows())
    write_jsonl(root / "calib/heldout.jsonl", reasoning_rows(3))
    write_jsonl(root / "calib/instruction.jsonl", instruction_rows())
    _write_params(root, _params())
    return root


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under `root` with its size and mtime: any write shows up."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _check(root: Path, capsys) -> tuple[int, str]:
    """Run `rain check` on the project; return its exit code and stderr."""
    capsys.readouterr()
    code = main(["check", "--project", str(root)])
    return code, capsys.readouterr().err


def _edit_tensors(model_dir: Path, name: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Rewrite the shard holding `name` after `edit` changed its tensors (a real, valid safetensors file)."""
    shard = model_dir / Checkpoint(model_dir).weight_map[name]
    tensors, meta = load_tensors(shard), read_metadata(shard)
    edit(tensors)
    save_tensors(shard, tensors, meta)  # a new file renamed in: the loaded tensors may map the old one


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _set(tensors: dict, name: str, value: torch.Tensor) -> None:
    tensors[name] = value


def _nan(tensors: dict) -> None:
    tensors[Q0] = tensors[Q0].clone()
    tensors[Q0][0, 0] = float("nan")


def _drop_tensor(model_dir: Path, name: str) -> None:
    _edit_tensors(model_dir, name, lambda t: t.pop(name))
    _edit_json(model_dir / INDEX_NAME, lambda idx: idx["weight_map"].pop(name))


def _add_tensor(model_dir: Path, name: str) -> None:
    _edit_tensors(model_dir, UP1, lambda t: _set(t, name, torch.zeros(2)))
    _edit_json(model_dir / INDEX_NAME, lambda idx: idx["weight_map"].update({name: idx["weight_map"][UP1]}))


def _drop_think_tokens(model_dir: Path) -> None:
    def edit(tok: dict) -> None:
        tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] not in ("<think>", "</think>")]
        for t in ("<think>", "</think>"):
            tok["model"]["vocab"].pop(t)

    _edit_json(model_dir / "tokenizer.json", edit)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _first_shard(model_dir: Path) -> Path:
    return model_dir / Checkpoint(model_dir).shards[0]


def _misplace_in_index(model_dir: Path) -> None:
    """The index claims a tensor lives in a shard that does not hold it."""
    def edit(idx: dict) -> None:
        wm = idx["weight_map"]
        wm[Q0] = next(s for s in sorted(set(wm.values())) if s != wm[Q0])

    _edit_json(model_dir / INDEX_NAME, edit)


def _rows_with(kind: str, row: int, **changes) -> list[dict]:
    rows = reasoning_rows() if kind == "reasoning" else instruction_rows()
    rows[row].update(changes)
    return rows


def _write_calib(root: Path, kind: str, rows: list[dict]) -> None:
    write_jsonl(root / f"calib/{kind}.jsonl", rows)


def _other_size_itm(root: Path) -> None:
    """An ITM of a different size (hidden 48 instead of 32): a wrong checkpoint, not a broken one."""
    other = make_family(root / "other", hidden=48)
    shutil.rmtree(root / "ckpt/itm")
    shutil.move(other["itm"], root / "ckpt/itm")
    shutil.rmtree(root / "other")


def _index_names_outside(model_dir: Path, shard: str) -> None:
    """The index sends a tensor to a shard outside the checkpoint directory (a copy of a real shard is there)."""
    first = _first_shard(model_dir)
    target = (model_dir / shard)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(first, target)
    _edit_json(model_dir / INDEX_NAME, lambda idx: idx["weight_map"].update({k: shard for k, v in idx["weight_map"].items()
                                                                             if v == first.name}))


def _header_length(path: Path, n: int) -> None:
    """A shard whose first 8 bytes state a header of `n` bytes."""
    data = bytearray(path.read_bytes())
    data[:8] = n.to_bytes(8, "little")
    path.write_bytes(bytes(data))


def _single_file(model_dir: Path) -> None:
    """The checkpoint as one model.safetensors (no index): opened through its header alone."""
    tensors = {k: v for shard in Checkpoint(model_dir).shards for k, v in load_tensors(model_dir / shard).items()}
    for shard in Checkpoint(model_dir).shards:
        (model_dir / shard).unlink()
    (model_dir / INDEX_NAME).unlink()
    save_tensors(model_dir / "model.safetensors", tensors, {"format": "pt"})


# (id, how to break the project, message expected in the report)
CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("baseline_run_name_leaves_the_project", lambda r: _write_params(r, _params(baselines={"runs": [
        {"name": "../../x", "method": "task_arithmetic"}]})),
     r"params\.yaml: baselines\.runs\.0\.task_arithmetic\.name: run name '\.\./\.\./x' contains '\.\.'"),
    ("baseline_run_name_absolute", lambda r: _write_params(r, _params(baselines={"runs": [
        {"name": "/abs/dir", "method": "task_arithmetic"}]})),
     r"baselines\.runs\.0\.task_arithmetic\.name: run name '/abs/dir' is an absolute path"),
    ("index_names_a_shard_outside", lambda r: _index_names_outside(r / "ckpt/lrm", "../outside.safetensors"),
     r"models\.lrm .*cannot be opened .*shard '\.\./outside\.safetensors' contains '\.\.'"),
    ("index_names_an_absolute_shard", lambda r: _index_names_outside(r / "ckpt/lrm", str(r / "abs.safetensors")),
     r"models\.lrm .*cannot be opened .*abs\.safetensors' is an absolute path"),
    ("header_length_2_62", lambda r: (_single_file(r / "ckpt/lrm"), _header_length(r / "ckpt/lrm/model.safetensors", 2**62)),
     r"models\.lrm .*cannot be opened .*header length 4611686018427387904 exceeds the file"),
    ("shape_mismatch", lambda r: _edit_tensors(r / "ckpt/itm", UP1, lambda t: _set(t, UP1, torch.zeros(49, 32))),
     r"models\.itm .*1 tensor shape\(s\) differ from the LRM's: model\.layers\.1\.mlp\.up_proj\.weight \[49, 32\] vs \[48, 32\]"),
    ("dtype_mismatch", lambda r: _edit_tensors(r / "ckpt/itm", UP1, lambda t: _set(t, UP1, t[UP1].half())),
     r"models\.itm .*1 tensor dtype\(s\) differ from the LRM's: model\.layers\.1\.mlp\.up_proj\.weight F16 vs F32"),
    ("missing_tensor", lambda r: _drop_tensor(r / "ckpt/base", UP1),
     r"models\.base .*lacks 1 tensor\(s\) the LRM has: model\.layers\.1\.mlp\.up_proj\.weight"),
    ("extra_tensor", lambda r: _add_tensor(r / "ckpt/itm", "model.layers.1.mlp.extra.weight"),
     r"models\.itm .*has 1 tensor\(s\) the LRM lacks: model\.layers\.1\.mlp\.extra\.weight"),
    ("nan_weights", lambda r: _edit_tensors(r / "ckpt/lrm", Q0, _nan),
     r"models\.lrm .*1 tensor\(s\) hold NaN or Inf values: model\.layers\.0\.self_attn\.q_proj\.weight"),
    ("inf_weights", lambda r: _edit_tensors(r / "ckpt/base", Q0, lambda t: _set(t, Q0, t[Q0] / 0)),
     r"models\.base .*1 tensor\(s\) hold NaN or Inf values: model\.layers\.0\.self_attn\.q_proj\.weight"),
    ("missing_shard", lambda r: (r / "ckpt/lrm/model-00002-of-00003.safetensors").unlink(),
     r"models\.lrm .*cannot be opened .*shard\(s\) named in the index are missing: \['model-00002-of-00003\.safetensors'\]"),
    ("truncated_shard", lambda r: _truncate(_first_shard(r / "ckpt/base")),
     r"base/model-00001-of-00003\.safetensors: unreadable safetensors file .*truncated or corrupt"),
    ("index_points_to_wrong_shard", lambda r: _misplace_in_index(r / "ckpt/lrm"),
     r"lrm/model\.safetensors\.index\.json: places 1 tensor\(s\) in model-0000\d-of-00003\.safetensors that it lacks: "
     r"model\.layers\.0\.self_attn\.q_proj\.weight"),
    ("missing_model_dir", lambda r: shutil.rmtree(r / "ckpt/itm"), r"models\.itm \(.*ckpt/itm\): no such directory"),
    ("missing_config", lambda r: (r / "ckpt/base/config.json").unlink(), r"base/config\.json: missing"),
    ("unknown_architecture", lambda r: _edit_json(r / "ckpt/lrm/config.json", lambda c: c.update(model_type="gpt2")),
     r"lrm/config\.json: model_type: unsupported architecture model_type='gpt2'"),
    ("other_size_checkpoint", _other_size_itm, r"models\.itm config\.json: hidden_size: 48 here but 32 in the LRM"),
    ("tokenizer_without_think_tokens", lambda r: _drop_think_tokens(r / "ckpt/lrm"),
     r"tokenizer of models\.lrm .*no single token for '<think>'"),
    ("missing_chat_template", lambda r: (r / "ckpt/lrm/chat_template.jinja").unlink(),
     r"tokenizer of models\.lrm .*has no chat template"),
    ("span_missing", lambda r: _write_calib(r, "instruction", _rows_with("instruction", 2, related_prompt_list=[
        {"instruction_id": "startend:end_checker", "prompt_spans": [], "response_spans": ["DONE"]}])),
     r"calibration\.instruction: .*instruction\.jsonl: row 2 field 'related_prompt_list'"),
    ("wrong_type", lambda r: _write_calib(r, "reasoning", _rows_with("reasoning", 1, reasoning=7)),
     r"calibration\.reasoning: .*reasoning\.jsonl: row 1 field 'reasoning': must be a non-empty string"),
    ("missing_field", lambda r: _write_calib(r, "instruction", [{k: v for k, v in row.items() if k != "reason"} for row in instruction_rows()]),
     r"instruction\.jsonl: instruction calibration set lacks required field\(s\) \['reason'\]"),
    ("empty_calibration_set", lambda r: (r / "calib/reasoning.jsonl").write_text(""),
     r"reasoning\.jsonl: the reasoning calibration set is empty"),
    ("calibration_not_json", lambda r: (r / "calib/reasoning.jsonl").write_text('{"prompt": "a"}\n{oops\n'),
     r"reasoning\.jsonl: line 2 is not valid JSON"),
    ("calibration_file_missing", lambda r: (r / "calib/instruction.jsonl").unlink(),
     r"calibration\.instruction \(.*instruction\.jsonl\): file not found"),
    ("instruction_samples_too_long", lambda r: _write_calib(r, "instruction", _rows_with("instruction", 4, reason=" ".join(["step"] * 40))),
     r"calibration\.instruction \(.*\): 1 of 6 samples are longer than attention\.max_tokens=48 and would be skipped: 5 \(\d+ tokens\)"
     r".*raise attention\.max_tokens to at least \d+ .*check\.max_skipped_share >= 0\.167"),
    ("reasoning_samples_too_long", lambda r: _write_params(r, _params(features={"max_tokens": 20})),
     r"calibration\.reasoning \(.*\): 6 of 6 samples are longer than features\.max_tokens=20 and would be skipped: r1 \(30 tokens\)"),
    ("energy_out_of_range", lambda r: _write_params(r, _params(projection={"energy": 1.5})),
     r"params\.yaml: projection\.energy: Input should be less than or equal to 1"),
    ("box_lo_above_hi", lambda r: _write_params(r, _params(alpha={"box_lo": 2.0, "box_hi": 1.0})),
     r"params\.yaml: alpha: .*box_lo <= box_hi \(got \[2\.0, 1\.0\]\)"),
    ("lambda_not_finite", lambda r: _write_params(r, _params(merge={"lam": float("nan")})),
     r"params\.yaml: merge\.lam: Input should be a finite number"),
    ("unknown_param", lambda r: _write_params(r, _params(merge={"lamda": 1.0})),
     r"params\.yaml: merge\.lamda: Extra inputs are not permitted"),
    ("bad_shard_size", lambda r: _write_params(r, _params(merge={"max_shard_size": "5 GiB"})),
     r"params\.yaml: merge\.max_shard_size: .*'5 GiB' is not a size"),
    ("output_parent_is_a_file", lambda r: (r / "models").write_text("not a directory"),
     r"models/merged: .*models is a file, not a directory"),
    ("not_enough_disk_space", lambda r: _write_params(r, _params(check={"min_free_space": "1000000GB"})),
     r"GB free, but the outputs \(artifacts/task_vectors, .* more\) need about .* including check\.min_free_space=1000000GB"),
]


def test_valid_project_passes(project, capsys):
    before = _snapshot(project)
    assert _check(project, capsys) == (0, "")
    assert _snapshot(project) == before


@pytest.mark.parametrize(("case", "breaks", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_naming_it_and_nothing_is_written(project, capsys, case, breaks, message):
    breaks(project)
    before = _snapshot(project)
    code, err = _check(project, capsys)
    assert code == 2, err
    assert "problem(s) found before any work started" in err
    assert re.search(message, err), f"{case}: expected /{message}/ in:\n{err}"
    assert "Fix: " in err
    assert _snapshot(project) == before


def test_skipping_within_max_skipped_share_is_allowed(project, capsys):
    _write_calib(project, "instruction", _rows_with("instruction", 4, reason=" ".join(["step"] * 40)))
    assert _check(project, capsys)[0] != 0
    _write_params(project, _params(check={"max_skipped_share": 0.2}))
    assert _check(project, capsys) == (0, "")


def test_all_problems_are_reported_together(project, capsys):
    _edit_tensors(project / "ckpt/lrm", Q0, _nan)
    _drop_think_tokens(project / "ckpt/lrm")
    (project / "calib/reasoning.jsonl").write_text("")
    code, err = _check(project, capsys)
    assert code == 2
    assert err.startswith("rain: error: 3 problem(s) found before any work started")
    for expected in ("hold NaN or Inf", "no single token for '<think>'", "reasoning calibration set is empty"):
        assert expected in err


def test_stage_refuses_bad_inputs_before_writing(project, capsys, monkeypatch):
    """`rain stage task_vectors` (what dvc.yaml runs) runs the same checks first: nothing is written."""
    (project / "ckpt/itm/model-00003-of-00003.safetensors").unlink()
    before = _snapshot(project)
    monkeypatch.chdir(project)
    capsys.readouterr()
    assert main(["stage", "task_vectors"]) == 2
    assert "models.itm" in capsys.readouterr().err
    assert _snapshot(project) == before and not (project / "artifacts").exists()


def test_stage_refuses_missing_upstream_artifacts(project, capsys, monkeypatch):
    """`rain stage merge` before projection and alpha ran: named, with the stage to run first; nothing written."""
    before = _snapshot(project)
    monkeypatch.chdir(project)
    capsys.readouterr()
    assert main(["stage", "merge"]) == 2
    err = capsys.readouterr().err
    assert "artifacts/projected: missing (stage projection makes it). Fix: run `rain stage projection` first" in err
    assert "artifacts/alpha: missing (stage alpha makes it)" in err
    assert _snapshot(project) == before


def test_flow_validates_before_any_stage(project, tmp_path):
    """`rain flow` (the Prefect flow, a real subprocess) refuses a bad input as its first step: no stage runs."""
    (project / "calib/reasoning.jsonl").write_text("")
    before = _snapshot(project)
    env = {**project_env(tmp_path), "PREFECT_LOGGING_LEVEL": "ERROR"}
    proc = subprocess.run(["rain", "flow", "--project", str(project)], cwd=project, env=env, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "reasoning calibration set is empty" in proc.stderr
    assert _snapshot(project) == before


def test_rain_check_command_end_to_end(project, tmp_path):
    """The installed `rain` entry point in a real subprocess: exit status 2 and the problem on stderr."""
    _edit_json(project / "ckpt/lrm/config.json", lambda c: c.update(model_type="gpt2"))
    proc = subprocess.run(["rain", "check", "--no-scan"], cwd=project, env=project_env(tmp_path), capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unsupported architecture model_type='gpt2'" in proc.stderr


def test_value_scan_is_remembered_per_shard_until_the_shard_changes(project, capsys):
    """A second check skips shards found finite while their size, mtime and inode are unchanged; any change rescans."""
    save_memo(FINITE_SHARDS, {})
    assert _check(project, capsys) == (0, "")
    shards = {str((project / "ckpt" / r / s).resolve()) for r in ("base", "itm", "lrm") for s in Checkpoint(project / "ckpt" / r).shards}
    assert set(load_memo(FINITE_SHARDS)) == shards
    shard = project / "ckpt/lrm" / Checkpoint(project / "ckpt/lrm").weight_map[Q0]
    stat, entry = shard.stat(), TensorFile(shard).entries[Q0]
    assert entry["dtype"] == "F32"
    with open(shard, "r+b") as f:  # a NaN written in place: same size and inode
        f.seek(8 + int.from_bytes(f.read(8), "little") + entry["data_offsets"][0])
        f.write(struct.pack("<f", float("nan")))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the recorded mtime: the scan trusts the memo
    assert _check(project, capsys) == (0, "")
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a changed mtime: scanned again
    code, err = _check(project, capsys)
    assert code == 2 and "hold NaN or Inf" in err
