"""Up-front validation of a run's inputs: every problem at once, before any heavy work starts.

`validate` (the `rain check` command and the Prefect flow's first step) checks that
- params.yaml parses and every value is in range (the pydantic models in params.py),
- the base, ITM and LRM checkpoints open (config, index, every shard header), share one
  architecture, the same tensor names, shapes and dtypes, and hold no NaN/Inf (streamed one
  tensor at a time, never a whole model; shards found finite are remembered by path, size, mtime
  and inode in the user's cache (`FINITE_SHARDS`), so reruns on unchanged checkpoints skip the scan),
- the LRM's tokenizer has `<think>`/`</think>` as single tokens and a chat template,
- the calibration sets pass their schemas (schemas.py) and, rendered with the LRM's template and
  tokenizer, fit max_tokens (no more than check.max_skipped_share of them would be skipped),
- the output locations are writable directories with room for the outputs still to write.
`preflight` runs the same checks except the value scan (which reads every weight) before each
stage that reads inputs, so `dvc repro` refuses bad inputs too. Checks only read inputs: the
writes are an empty temporary file that probes writability (removed at once) and the scan record
in the user's cache, outside the project.
"""

from __future__ import annotations

import errno
import json
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from rain_tasks.io.arch import arch_for, module_of
from rain_tasks.model.calibration import load_tokenizer, render_sample, think_token_ids
from rain_tasks.io.checkpoint import FLOAT_CODES, INDEX_NAME, Checkpoint, checkpoint_differences, parse_size
from rain_tasks.io.digest import file_identity, load_memo, save_memo
from rain_tasks.params import Params, ParamsError, load_params
from rain_tasks.io.schemas import load_records
from rain_tasks.pipeline.stages import (ABLATIONS, ABLATIONS_BY_NAME, BASELINES, FEAT, FEAT_HELDOUT, MERGED, NEIGHBOURS, PROJ, STAGES, TV, Stage,
                               neighbour_names, resolve)
from rain_tasks.io.artifacts import MANIFEST

ROLES = ("base", "itm", "lrm")
#: config.json keys that must agree across the three checkpoints (one architecture, one size)
ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "intermediate_size", "vocab_size", "head_dim")
MAX_LISTED = 5
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_SAME_MODELS = "use a base, ITM and LRM of the same model family and size (RAIN adds ITM − base to the LRM tensor by tensor)"


@dataclass(frozen=True)
class Problem:
    """One refused input: where (file, field or tensor), what is wrong, and what to do about it."""

    where: str
    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what.rstrip('.')}. Fix: {self.fix}"


class InputProblems(ValueError):
    """All problems found by one validation pass, reported together."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) found before any work started:\n{lines}")


def _listed(items: list[str]) -> str:
    """The first few items, and how many more: difference lists stay readable for 32B models."""
    more = f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


# --- params ---------------------------------------------------------------------------------


def params_problems(path: Path) -> tuple[Params | None, list[Problem]]:
    """Load params.yaml; each out-of-range or unknown key becomes one problem naming it."""
    try:
        return load_params(path), []
    except FileNotFoundError:
        return None, [Problem(str(path), "params file not found", "run from the project root or pass --params PATH")]
    except ParamsError as e:
        return None, [Problem(f"{path}: {key}", msg.removeprefix("Value error, "), f"edit {key} in {path.name}") for key, msg in e.errors]


# --- checkpoints ----------------------------------------------------------------------------


def _read_config(role: str, model_dir: Path) -> tuple[dict | None, list[Problem]]:
    """config.json of one checkpoint, refusing a missing file, bad JSON or an unsupported architecture."""
    path = model_dir / "config.json"
    if not path.is_file():
        return None, [Problem(str(path), "missing", f"models.{role} must be a Hugging Face model directory with its config.json")]
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        return None, [Problem(str(path), f"not valid JSON ({e})", "restore the file from the model's source")]
    try:
        arch_for(config.get("model_type", ""))
    except ValueError as e:
        return config, [Problem(f"{path}: model_type", str(e), f"point models.{role} at a supported checkpoint")]
    return config, []


def _shard_problems(ckpt: Checkpoint) -> list[Problem]:
    """Every shard's header must parse and hold the tensors the index assigns to it."""
    problems = []
    for shard in ckpt.shards:
        try:
            with safe_open(ckpt.path / shard, framework="pt") as f:
                present = set(f.keys())
        except (SafetensorError, OSError) as e:
            problems.append(Problem(str(ckpt.path / shard), f"unreadable safetensors file ({e})",
                                    "the file is truncated or corrupt: copy or download it again"))
            continue
        absent = sorted(n for n, s in ckpt.weight_map.items() if s == shard and n not in present)
        if absent:
            problems.append(Problem(str(ckpt.path / INDEX_NAME), f"places {len(absent)} tensor(s) in {shard} that it lacks: "
                                    f"{_listed(absent)}", "the index and shards come from different saves: copy the whole checkpoint again"))
    return problems


def open_checkpoint(role: str, model_dir: Path) -> tuple[Checkpoint | None, dict | None, list[Problem]]:
    """Open one checkpoint for checking; the Checkpoint is None unless every shard is readable."""
    if not model_dir.is_dir():
        return None, None, [Problem(f"models.{role} ({model_dir})", "no such directory",
                                    f"set models.{role} in params.yaml to a local Hugging Face model directory")]
    config, problems = _read_config(role, model_dir)
    try:
        ckpt = Checkpoint(model_dir)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        return None, config, [*problems, Problem(f"models.{role} ({model_dir})", f"cannot be opened ({e})",
                                                 "copy the complete checkpoint (index and every shard) again")]
    shard_problems = _shard_problems(ckpt)
    return (None if shard_problems else ckpt), config, problems + shard_problems


def config_problems(configs: dict[str, dict]) -> list[Problem]:
    """Base and ITM configs against the LRM's: same architecture family and sizes."""
    ref = configs["lrm"]
    return [
        Problem(f"models.{role} config.json: {key}", f"{cfg.get(key)!r} here but {ref.get(key)!r} in the LRM", _SAME_MODELS)
        for role, cfg in configs.items() if role != "lrm"
        for key in ARCH_KEYS if cfg.get(key) != ref.get(key)
    ]


def neighbour_problems(params: Params, lrm_config: dict) -> list[Problem]:
    """Neighbouring-method params the checkpoints cannot run: an AIM block longer than the model's positions."""
    positions = lrm_config.get("max_position_embeddings")
    block = params.aim.block_tokens
    if positions is None or block is None or block <= positions:
        return []
    return [Problem("params.yaml aim.block_tokens", f"{block} tokens per block, but the models have {positions} positions",
                    f"set aim.block_tokens to at most {positions}, or null for one block per calibration text")]


def tensor_problems(role: str, ckpt: Checkpoint, ref: Checkpoint) -> list[Problem]:
    """Tensor names, shapes and dtypes of one checkpoint against the LRM's, with the differences listed."""
    where = f"models.{role} ({ckpt.path})"
    diff = checkpoint_differences(ckpt, ref)
    problems = []
    if missing := diff["only_b"]:
        problems.append(Problem(where, f"lacks {len(missing)} tensor(s) the LRM has: {_listed(missing)}", _SAME_MODELS))
    if extra := diff["only_a"]:
        problems.append(Problem(where, f"has {len(extra)} tensor(s) the LRM lacks: {_listed(extra)}", _SAME_MODELS))
    if shapes := diff["shapes"]:
        problems.append(Problem(where, f"{len(shapes)} tensor shape(s) differ from the LRM's: {_listed(shapes)}", _SAME_MODELS))
    if dtypes := diff["dtypes"]:
        problems.append(Problem(where, f"{len(dtypes)} tensor dtype(s) differ from the LRM's: {_listed(dtypes)}",
                                "save the three checkpoints in one dtype (e.g. all bfloat16)"))
    return problems


def nonfinite_problems(role: str, ckpt: Checkpoint, scanned: dict[str, list] | None = None) -> list[Problem]:
    """NaN/Inf weights, read one tensor at a time (peak memory: the largest tensor).

    `scanned` maps resolved shard paths to the `file_identity` they had when found finite: those shards are
    skipped while unchanged, and the shards found finite now are added, so a rerun reads no weights.
    """
    bad = []
    for shard in ckpt.shards:
        path = ckpt.path / shard
        key, identity = str(path.resolve()), file_identity(path)
        if scanned is not None and scanned.get(key) == identity:
            continue
        names = [n for n, s in ckpt.weight_map.items() if s == shard and ckpt.dtype_name(n) in FLOAT_CODES]
        found = [n for n in names if not torch.isfinite(ckpt.get(n)).all()]
        bad += found
        if scanned is not None and not found:
            scanned[key] = identity
    if not bad:
        return []
    return [Problem(f"models.{role} ({ckpt.path})", f"{len(bad)} tensor(s) hold NaN or Inf values: {_listed(sorted(bad))}",
                    "the checkpoint is corrupt or diverged in training: use a healthy copy")]


#: memo (rain_tasks.io.digest.load_memo) of the shards found free of NaN/Inf: per user, as checkpoints are shared
FINITE_SHARDS = "finite_shards"


def scan_checkpoint_values(ckpts: dict[str, Checkpoint]) -> list[Problem]:
    """The NaN/Inf scan of every checkpoint, skipping shards unchanged since they were last found finite."""
    scanned = load_memo(FINITE_SHARDS)
    before = dict(scanned)
    problems = [p for role, ckpt in ckpts.items() for p in nonfinite_problems(role, ckpt, scanned)]
    if scanned != before:
        save_memo(FINITE_SHARDS, scanned)
    return problems


# --- tokenizer and calibration ----------------------------------------------------------------


def tokenizer_problems(lrm_dir: Path) -> list[Problem]:
    """The LRM tokenizer must load offline, have `<think>`/`</think>` as single tokens and a chat template."""
    where = f"tokenizer of models.lrm ({lrm_dir})"
    try:
        tokenizer = load_tokenizer(lrm_dir)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, the user's fix is the same
        return [Problem(where, f"cannot be loaded ({type(e).__name__}: {e})",
                        "copy the LRM's tokenizer files (tokenizer.json, tokenizer_config.json) into the model directory")]
    problems = []
    try:
        think_token_ids(tokenizer)
    except ValueError as e:
        problems.append(Problem(where, str(e), "point models.lrm at a reasoning model whose tokenizer defines them"))
    if not tokenizer.chat_template:
        problems.append(Problem(where, "has no chat template",
                                "add the LRM's chat_template.jinja (calibration samples are rendered with it)"))
    return problems


#: params.calibration field -> the schema its file must pass
CALIBRATION_KINDS = {"reasoning": "reasoning", "instruction": "instruction", "reasoning_heldout": "reasoning"}


def calibration_problems(params: Params, root: Path) -> list[Problem]:
    """Every calibration set against its schema; messages name the file, row and field."""
    problems = []
    for field, kind in CALIBRATION_KINDS.items():
        path = root / getattr(params.calibration, field)
        if _made_by_run(path, root):
            continue
        try:
            load_records(path, kind)
        except FileNotFoundError:
            problems.append(Problem(f"calibration.{field} ({path})", "file not found",
                                    f"set calibration.{field} in params.yaml to a {kind} set (JSON or JSON lines)"))
        except ValueError as e:  # SchemaViolation, or a JSON array file that does not parse
            problems.append(Problem(f"calibration.{field}", str(e), f"correct the file (rain_tasks/io/schemas.py lists the required "
                                    f"fields and types) or point calibration.{field} at a valid set"))
    return problems


#: calibration field -> (schema kind, field holding the chain of thought, params section whose max_tokens/max_samples apply)
LENGTH_LIMITS = {"reasoning": ("reasoning", "reasoning", "features"), "reasoning_heldout": ("reasoning", "reasoning", "features"),
                 "instruction": ("instruction", "reason", "attention")}


def _sample_name(record: dict, index: int) -> str:
    """How a sample is named in messages: its id (instruction sets), sample_id (reasoning sets) or row number."""
    return str(record.get("id", record.get("sample_id", f"row {index}")))


def length_problems(params: Params, root: Path, tokenizer) -> list[Problem]:
    """Each calibration set rendered and tokenized as its stage will: refuse when more than
    check.max_skipped_share of the samples used would be skipped for exceeding max_tokens, naming them."""
    problems = []
    for field, (kind, thought, section) in LENGTH_LIMITS.items():
        path, limit = root / getattr(params.calibration, field), getattr(params, section)
        try:
            records = load_records(path, kind)[: limit.max_samples]
            lengths = [len(render_sample(tokenizer, r["prompt"], r[thought], r["response"])) for r in records]
        except (OSError, ValueError):  # missing or malformed: calibration_problems reports it, the stage names the row
            continue
        over = [(_sample_name(r, i), n) for i, (r, n) in enumerate(zip(records, lengths)) if n > limit.max_tokens]
        share = len(over) / max(len(records), 1)
        if over and share > params.check.max_skipped_share:
            problems.append(Problem(
                f"calibration.{field} ({path})",
                f"{len(over)} of {len(records)} samples are longer than {section}.max_tokens={limit.max_tokens} and would "
                f"be skipped: {_listed([f'{name} ({n} tokens)' for name, n in over])}",
                f"raise {section}.max_tokens to at least {max(n for _, n in over)} (Stage 1 and 2 memory grows linearly "
                f"with it), or accept skipping them with check.max_skipped_share >= {share:.3f}"))
    return problems


# --- outputs: writable, and room for what is still to write -----------------------------------


def _nbytes(ckpt: Checkpoint, name: str, itemsize: int | None = None) -> int:
    """Bytes of one tensor from its header (`itemsize` overrides the stored dtype, e.g. 4 for fp32 artifacts)."""
    numel = 1
    for d in ckpt.shape(name):
        numel *= d
    return numel * (itemsize or _ITEMSIZE.get(ckpt.dtype_name(name), 4))


def output_estimates(params: Params, lrm: Checkpoint | None, base: Checkpoint | None) -> dict[str, int]:
    """Estimated bytes of the model-sized outputs: Δ and Δ⊥ (fp32), the merged model, ablations, baselines and the
    neighbouring methods' models."""
    estimates = {}
    if base is not None:
        estimates[TV] = sum(_nbytes(base, n, 4) for n in base.names())
        estimates[PROJ] = sum(_nbytes(base, n, 4) for n in base.names() if module_of(n) is not None)
    if lrm is not None:
        model = sum(_nbytes(lrm, n) for n in lrm.names())
        estimates[MERGED] = model
        estimates[ABLATIONS] = model * len(ABLATIONS_BY_NAME)
        estimates[BASELINES] = model * len(params.baselines.runs)
        estimates[NEIGHBOURS] = model * len(neighbour_names(params))
    return estimates


def _existing_ancestor(path: Path) -> Path:
    """The nearest existing directory (or file) at or above `path`: where an output would be created."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def output_problems(params: Params, root: Path, outputs: Iterable[str], estimates: dict[str, int]) -> list[Problem]:
    """Each output's parent must be (or be creatable in) a writable directory with room for the outputs.

    Room needed per filesystem: the outputs not yet written, plus the largest one that is
    (outputs are replaced atomically, so old and new copies coexist for a moment), plus
    check.min_free_space.
    """
    problems, probed, need = [], {}, {}
    for out in outputs:
        anchor = _existing_ancestor((root / out).parent)
        if anchor not in probed:
            probed[anchor] = _write_probe(anchor)
            if probed[anchor]:
                problems.append(Problem(out, probed[anchor], f"make {anchor} a writable directory, or run the project elsewhere"))
        if not probed[anchor]:
            need.setdefault(anchor.stat().st_dev, (anchor, []))[1].append(out)
    headroom = parse_size(params.check.min_free_space)
    for anchor, outs in need.values():
        todo = [estimates.get(o, 0) for o in outs if not (root / o).exists()]
        done = [estimates.get(o, 0) for o in outs if (root / o).exists()]
        required = sum(todo) + max(done, default=0) + headroom
        free = shutil.disk_usage(anchor).free
        if free < required:
            problems.append(Problem(
                str(anchor), f"{_gb(free)} free, but the outputs ({_listed(outs)}) need about {_gb(required)} "
                f"including check.min_free_space={params.check.min_free_space}",
                "free disk space or move the project to a larger disk, then rerun"))
    return problems


def _write_probe(directory: Path) -> str:
    """'' if an empty file can be created (and is removed) in `directory`, else what went wrong."""
    if not directory.is_dir():
        return f"{directory} is a file, not a directory"
    try:
        with tempfile.TemporaryFile(dir=directory):
            return ""
    except OSError as e:
        return f"{directory} is not writable ({e.strerror})"


# --- entry points ------------------------------------------------------------------------------


def _made_by_run(path: Path, root: Path) -> bool:
    """True if `path` does not exist yet and a stage without deps (the zoo) makes it: checked once it exists."""
    made = [root / o for s in STAGES if not s.deps for o in s.outputs]
    return not path.exists() and any(path == m or m in path.parents for m in made)


def input_problems(params: Params, root: Path, outputs: Iterable[str], *, scan_values: bool) -> list[Problem]:
    """Every check on a run's inputs and outputs (see the module docstring), problems collected, not raised."""
    ckpts, configs, problems = {}, {}, []
    for role in ROLES:
        if _made_by_run(root / getattr(params.models, role), root):
            continue
        ckpt, config, found = open_checkpoint(role, root / getattr(params.models, role))
        problems += found
        if ckpt is not None:
            ckpts[role] = ckpt
        if config is not None:
            configs[role] = config
    if len(configs) == len(ROLES):
        problems += config_problems(configs)
    if "lrm" in configs:
        problems += neighbour_problems(params, configs["lrm"])
    if "lrm" in ckpts:
        problems += [p for role in ("base", "itm") if role in ckpts for p in tensor_problems(role, ckpts[role], ckpts["lrm"])]
    if scan_values:
        problems += scan_checkpoint_values(ckpts)
    if (root / params.models.lrm).is_dir():
        found = tokenizer_problems(root / params.models.lrm)
        problems += found or length_problems(params, root, load_tokenizer(root / params.models.lrm))
    problems += calibration_problems(params, root)
    estimates = output_estimates(params, ckpts.get("lrm"), ckpts.get("base"))
    problems += output_problems(params, root, [resolve(o, params) for o in outputs], estimates)
    return problems


def run_outputs() -> list[str]:
    """Outputs of every stage that reads inputs (the zoo makes the inputs themselves)."""
    return [o for s in STAGES if s.deps for o in s.outputs]


def validate(root: str | Path = ".", params_file: str | Path = "params.yaml", *, scan_values: bool = True) -> Params:
    """Check everything a whole run needs; return the params, or raise InputProblems listing every problem."""
    root = Path(root)
    params, problems = params_problems(root / params_file)
    if params is not None:
        problems = input_problems(params, root, run_outputs(), scan_values=scan_values)
    if problems:
        raise InputProblems(problems)
    return params


def check_inputs(params: Params, root: str | Path) -> None:
    """`validate` on params already parsed: every check on the run's inputs, InputProblems listing every problem."""
    problems = input_problems(params, Path(root), run_outputs(), scan_values=True)
    if problems:
        raise InputProblems(problems)


def deferred_inputs(params: Params, root: str | Path) -> bool:
    """True when some input checkpoint does not exist yet because the zoo stage makes it (checked once it exists)."""
    return any(_made_by_run(Path(root) / getattr(params.models, role), Path(root)) for role in ROLES)


#: per-layer stage directories whose manifest.json is written last: without it the stage was interrupted
LAYERED = (TV, FEAT, FEAT_HELDOUT, PROJ)


def upstream_problems(stage: Stage, params: Params, root: Path) -> list[Problem]:
    """A stage's inputs made by earlier stages must exist and be complete (a killed per-layer stage has no manifest)."""
    producers = {resolve(o, params): s.name for s in STAGES for o in s.outputs}
    problems = []
    for dep in (resolve(d, params) for d in stage.deps):
        producer = producers.get(dep)
        if producer is None:
            continue
        if not (root / dep).exists():
            problems.append(Problem(dep, f"missing (stage {producer} makes it)", f"run `rain stage {producer}` first, or `dvc repro`"))
        elif dep in LAYERED and not (root / dep / MANIFEST).is_file():
            problems.append(Problem(dep, f"incomplete: no {MANIFEST}, so stage {producer} was interrupted",
                                    f"rerun `rain stage {producer}` (or `dvc repro`); it keeps the layers already finished"))
    return problems


def preflight(stage: Stage, params: Params, root: Path, *, inputs_checked: bool = False) -> None:
    """Before one stage: its upstream artifacts, then (unless this run's inputs were checked already) the cheap input
    checks (all but the value scan); raise InputProblems."""
    problems = upstream_problems(stage, params, root)
    if not inputs_checked:
        problems += input_problems(params, root, stage.outputs, scan_values=False)
    if problems:
        raise InputProblems(problems)


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def out_of_space_message(e: OSError) -> str | None:
    """A user-facing message for a write that failed for lack of space (None for other OS errors)."""
    if e.errno not in _NO_SPACE:
        return None
    return (f"out of space while writing {e.filename or 'an output'} ({e.strerror}). Outputs are written to a temporary "
            "sibling and renamed when complete, so nothing partial was left in place; free disk space "
            "(`rain check` estimates what the run needs) and rerun: finished stages are reused.")
