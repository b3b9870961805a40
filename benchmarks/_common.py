"""What the benchmark scripts share: peak RSS from /proc, one measurement in its own process, the machine stamp
printed with the figures, and the random family's command-line options and builder (rain_dev/tiny.py).

Scripts import it as `from _common import ...`: `python benchmarks/X.py` puts benchmarks/ first on sys.path.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

#: Qwen2-7B's layer widths, the default of the scripts that measure at 7B scale
WIDTHS_7B = {"hidden": 3584, "ffn": 18944, "heads": 28, "kv_heads": 4}


def workdir(given: Path | None, prefix: str) -> Path:
    """`given` (kept for inspection), or a fresh temporary directory removed when the script exits (a 7B-width
    family is gigabytes per model)."""
    if given is not None:
        return given
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def status_gib(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak since exec) of this process, from /proc (Linux).

    Not wait4's ru_maxrss: that keeps the forking parent's RSS from before the exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def run_child(script: str, args: list[str], what: str) -> dict:
    """Run `script` with `args` in a fresh interpreter (so its peak RSS is its own); the JSON of its last stdout line.

    A failure stops the benchmark with `what` and the child's exit status (its stderr is left on the terminal)."""
    proc = subprocess.run([sys.executable, script, *args], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (status {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine(*settings: str) -> str:
    """The machine stamp printed with the figures: CPU, cores, any `settings` (e.g. "RAIN_THREADS=2"), load average."""
    cpu = platform.processor() or platform.machine()
    return ", ".join([cpu, f"{os.cpu_count()} cores", *settings, f"load average {os.getloadavg()[0]:.1f}"])


def model_parser(doc: str, *, layers: int | list[int], widths: dict[str, int] | None = None,
                 dtype: str | None = "bfloat16", dtypes: tuple[str, ...] = ("float32", "bfloat16"),
                 samples: int | list[int] | None = None, overrides: bool = False) -> argparse.ArgumentParser:
    """A parser with --workdir and the random family's options, defaults as given (a list: the option takes several).

    --hidden/--ffn/--heads/--kv-heads from `widths` (Qwen2-7B's by default), --layers, --samples (when given),
    --dtype (one of `dtypes`; none when `dtype` is None) and, with `overrides`, --set section.key=value for params.yaml."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--workdir", type=Path)
    for name, default in (WIDTHS_7B if widths is None else widths).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    for name, default in (("layers", layers), ("samples", samples)):
        if default is not None:
            p.add_argument(f"--{name}", type=int, default=default, **({"nargs": "+"} if isinstance(default, list) else {}))
    if dtype is not None:
        p.add_argument("--dtype", default=dtype, choices=dtypes)
    if overrides:
        p.add_argument("--set", nargs="*", default=[],
                       help="params.yaml overrides section.key=value (a YAML value), e.g. projection.precision=float32")
    return p


def build_family(work: Path, args: argparse.Namespace) -> None:
    """The random base/ITM/LRM family (rain_dev/tiny.py) at the widths, layers and dtype of `args`, under work/ckpt."""
    import torch
    from rain_dev.tiny import make_family

    make_family(work / "ckpt", hidden=args.hidden, ffn=args.ffn, layers=args.layers, heads=args.heads,
                kv_heads=args.kv_heads, dtype=getattr(torch, args.dtype))


def build_project(work: Path, args: argparse.Namespace) -> None:
    """The random family, calibration sets of `args.samples` rows and a params.yaml pointing at them (with `args.set`)."""
    import yaml
    from rain_dev.tiny import instruction_rows, reasoning_rows, write_jsonl

    build_family(work, args)
    write_jsonl(work / "calib/reasoning.jsonl", reasoning_rows(args.samples))
    write_jsonl(work / "calib/heldout.jsonl", reasoning_rows(max(1, args.samples // 4)))
    write_jsonl(work / "calib/instruction.jsonl", instruction_rows(args.samples))
    params = {
        "models": {"base": "ckpt/base", "itm": "ckpt/itm", "lrm": "ckpt/lrm"},
        "calibration": {"reasoning": "calib/reasoning.jsonl", "instruction": "calib/instruction.jsonl",
                        "reasoning_heldout": "calib/heldout.jsonl"},
        "merge": {"max_shard_size": "2GB"},
        "baselines": {"runs": [{"name": "ta", "method": "task_arithmetic", "lam": 1.0, "scope": "all"}]},
    }
    for item in getattr(args, "set", None) or []:  # section.key=value (YAML value), e.g. projection.precision=float32
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        params.setdefault(section, {})[name] = yaml.safe_load(value)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
