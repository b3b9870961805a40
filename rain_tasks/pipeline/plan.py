"""`rain plan`: what a run will cost before any heavy work: parameters, tokens, peak memory, disk and time per stage.

Tokens come from really rendering and tokenizing the configured calibration sets with the LRM's
template and tokenizer. Memory is a per-stage model (weights at the forward dtype, one batch of
activations, the stage's own buffers; see `stage_plans`); disk is `validation.output_estimates`.
Time is work (floating-point operations of the forward passes and reductions) divided by
throughput constants measured on a machine of the same kind (`THROUGHPUT`, written by
`benchmarks/plan_check.py --calibrate`, the projection's by `benchmarks/projection_rate.py` at widths where its
work, not its file I/O, dominates), whose source is printed; where no constant was measured
for the device and dtype, the time is not estimated rather than guessed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from rain_tasks.io.arch import MODULES, ModelShape, read_shape
from rain_tasks.stage2.attention import prepare_instruction_samples
from rain_tasks.model.calibration import load_tokenizer
from rain_tasks.io.checkpoint import Checkpoint, parse_size
from rain_tasks.model.runtime import forward_dtype, resolve_device
from rain_tasks.stage1.features import layer_bytes, prepare_reasoning_samples, row_set_biases, row_set_dims, row_set_rows
from rain_tasks.stage1.projection import PRECISIONS, module_blocks
from rain_tasks.params import Params
from rain_tasks.io.schemas import load_records
from rain_tasks.pipeline.stages import MERGED, PROJ, TV
from rain_tasks.pipeline.validation import output_estimates

#: measured throughput constants per "<device type>/<dtype>" (see the module docstring)
THROUGHPUT = Path(__file__).with_name("throughput.json")
#: features' accumulator budget (accumulate_features' default memory_budget_bytes)
FEATURES_BUDGET = 8 * 2**30


@dataclass(frozen=True)
class StagePlan:
    """One stage's estimated cost."""

    stage: str
    tokens: int  # tokens through the model (all passes)
    flops: float  # estimated work
    peak_bytes: int  # estimated peak process memory
    seconds: float | None  # None: no measured constant for this device and dtype


def parameter_count(ckpt: Checkpoint) -> int:
    """Parameters in a checkpoint, from its headers (no weight is read)."""
    return sum(math.prod(ckpt.shape(n)) for n in ckpt.names())


def layer_parameters(shape: ModelShape) -> int:
    """Weights of one decoder layer's seven merged Linear modules (what every token multiplies through)."""
    q = shape.num_heads * shape.head_dim
    kv = shape.num_kv_heads * shape.head_dim
    return shape.hidden_size * (q + 2 * kv) + q * shape.hidden_size + 3 * shape.hidden_size * shape.intermediate_size


def forward_flops(shape: ModelShape, lengths: list[int]) -> float:
    """Decoder forward work over samples of these lengths: 2·P·T for the matmuls plus 2·L·H·hd·T² for causal attention."""
    linear = 2 * shape.num_layers * layer_parameters(shape)
    attn = 2 * shape.num_layers * shape.num_heads * shape.head_dim
    return float(sum(linear * t + attn * t * t for t in lengths))


def row_set_outputs(ckpt: Checkpoint, shape: ModelShape, layer: int) -> dict[str, list[int]]:
    """Per row set, the output rows of each block of Δ projected on its basis (`module_blocks` on the checkpoint's shapes)."""
    outs: dict[str, list[int]] = {}
    for module in MODULES:
        size = tuple(ckpt.shape(shape.spec.param_name(layer, module, "weight")))
        for _, name, (rows, _) in module_blocks(module, shape, layer, size):
            outs.setdefault(name, []).append(len(range(size[0])[rows]))
    return outs


def projection_set_flops(n: int, d: int, outs: list[int], heldout: int) -> float:
    """One row set's projection work with m = min(n, d), on the path the pipeline takes (stage1/projection.py).

    Basis: while n < d the features hold the rows and the projection forms X Xᵀ (float32) or the QR of Xᵀ
    (float64), ~4·n·d·m with the basis recovered from the eigenvectors, then the m × m eigh (~10·m³); from
    n ≥ d the Gram is already formed and only its d × d eigh remains. Per block of `outs` rows: Δ U and
    (Δ U) Uᵀ (4·out·d·m) and the residual diagnostics on the calibration, inlier and held-out statistics
    (k = their rows or d: M Xᵀ or M G, Uᵀ Xᵀ or Uᵀ G U, and A against it, 2·k·(out·d + m·d + out·m) each).
    """
    m = min(n, d)
    work = 10.0 * m**3 + (4.0 * n * d * m if n < d else 0.0)
    for out in outs:
        work += 4.0 * out * d * m
        work += sum(2.0 * k * (out * d + m * d + out * m) for k in (m, m, min(heldout, d)))
    return work


def projection_layer_bytes(dims: dict[str, int], rows: dict[str, int], heldout: dict[str, int], itemsize: int) -> int:
    """One layer's projection statistics in memory, the working precision taking `itemsize` bytes.

    The features as stored (float64 rows [n, d] or Grams; the calibration set's are dropped once cast, the held-out
    set's are kept by the caller), their copies in the working precision (the cast where it is not float64, the
    outlier-free copy), every set's basis (eigenvectors and the kept U, [d, m] each), and the largest set's
    eigenproblem (m × m twice and [d, m]).
    """
    stored = sum(min(rows[s], d) * d for s, d in dims.items())
    held = sum(min(heldout[s], d) * d for s, d in dims.items())
    copies = stored + (stored + held if itemsize != 8 else 0)
    bases = sum(2 * d * min(rows[s], d) for s, d in dims.items())
    eigen = max(2 * min(rows[s], d) ** 2 + d * min(rows[s], d) for s, d in dims.items())
    return 8 * ((stored if itemsize == 8 else 0) + held) + itemsize * (copies + bases + eigen)


def projection_key(precision: str) -> str:
    """The throughput key of the projection's constant in this working precision (float64 and float32 run at different rates)."""
    return f"projection_{precision}_flops_per_s"


def _throughput(device: str, dtype: str) -> tuple[dict | None, str]:
    """The measured constants for this device kind and dtype, and where they came from."""
    table = json.loads(THROUGHPUT.read_text()) if THROUGHPUT.is_file() else {}
    key = f"{device}/{dtype}"
    if key not in table:
        return None, f"no throughput measured for {key} in {THROUGHPUT.name} (run benchmarks/plan_check.py --calibrate there)"
    projection = "; ".join(f"{k.removesuffix('_source').replace('_', ' ')}: {v}" for k, v in sorted(table[key].items())
                           if k.startswith("projection_") and k.endswith("_source")) or "projection: none measured"
    return table[key], f"{THROUGHPUT.name}[{key}]: {table[key]['source']}; {projection}"


def stage_plans(params: Params, root: Path) -> tuple[dict, list[StagePlan]]:
    """The run's facts (parameters, tokens, disk, constants' source) and one StagePlan per model-running stage."""
    lrm_dir = root / params.models.lrm
    shape, ckpt, tok = read_shape(lrm_dir), Checkpoint(lrm_dir), load_tokenizer(lrm_dir)
    device = resolve_device(params.runtime.device).type
    dtype = forward_dtype(lrm_dir, params.runtime)
    itemsize = dtype.itemsize
    n_params = parameter_count(ckpt)
    calib, heldout = (prepare_reasoning_samples(load_records(root / path, "reasoning")[: params.features.max_samples], tok,
                                                params.features)[0]
                      for path in (params.calibration.reasoning, params.calibration.reasoning_heldout))
    reasoning = calib + heldout
    instruction, _ = prepare_instruction_samples(load_records(root / params.calibration.instruction, "instruction")[: params.attention.max_samples],
                                       tok, params.attention.max_tokens)
    r_len = [len(s.input_ids) for s in reasoning]
    i_len = [len(s.input_ids) for s in instruction]
    constants, source = _throughput(device, str(dtype).removeprefix("torch."))
    baseline = int(constants["baseline_rss_bytes"]) if constants else 0
    weights = n_params * itemsize
    width = 4 * shape.hidden_size + 3 * shape.intermediate_size + 3 * shape.num_heads * shape.head_dim

    def activations(lengths: list[int]) -> int:
        padded = max(params.runtime.batch_tokens, max(lengths, default=0))
        return padded * width * itemsize * 2

    def seconds(kind: str, flops: float, tokenizer_loads: int = 1) -> float | None:
        """Work over the measured throughput, plus the fixed start: loading the weights and the tokenizer."""
        if constants is None:
            return None
        start = weights / constants["load_bytes_per_s"] + tokenizer_loads * constants["tokenizer_load_s"]
        return flops / constants[f"{kind}_flops_per_s"] + start

    # Stage 1: forward + per-sample rows at Ω (S_t = A·X in float64, key rows) + accumulation (≤ FEATURES_BUDGET)
    biases = row_set_biases(ckpt, shape, 0)
    accumulators = min(FEATURES_BUDGET, shape.num_layers * layer_bytes(row_set_dims(shape, biases), reasoning, shape, True))
    omega = max((len(s.omega) for s in reasoning), default=0)
    rows_work = sum(2 * shape.num_layers * shape.num_heads * len(s.omega) * len(s.input_ids) * shape.hidden_size
                    + 2 * shape.num_layers * len(s.input_ids) * shape.hidden_size ** 2 for s in reasoning)
    f_flops = forward_flops(shape, r_len) + rows_work
    longest = max(r_len, default=0)
    eager = (max(params.runtime.batch_tokens, longest) // max(longest, 1)) * shape.num_heads * longest**2 * itemsize  # one layer's weights
    f_peak = baseline + weights + activations(r_len) + accumulators + eager + shape.num_heads * omega * longest * 8 * 3
    # Stage 2: two passes, three with the curvature pass; per layer the R ∪ U attention rows [H, |R ∪ U|, T] in fp32
    # with their temporaries
    passes = 3 if params.attention.curvature_pass else 2
    query = max((len(s.spans.query_rows) * len(s.input_ids) for s in instruction), default=0)
    a_flops = passes * (forward_flops(shape, i_len) + sum(
        2 * shape.num_layers * shape.num_heads * shape.head_dim * len(s.spans.query_rows) * len(s.input_ids) for s in instruction))
    a_peak = baseline + weights + activations(i_len) + shape.num_heads * query * 4 * 4
    # Stage 1 projection: per layer and row set the basis on the path the features took (rows while n < d, else
    # the Gram), Δ's products with it and the residual diagnostics; memory: one layer's statistics and bases, its Δ
    # (float32) and Δ⊥, and the largest module's [W | b] and its projection in the working precision and in float32
    # (in float32 those are Δ's and Δ⊥'s own tensors, but for the cast to a 16-bit Δ⊥)
    dims = row_set_dims(shape, biases)
    rows, held_rows, outs = row_set_rows(dims, calib, shape), row_set_rows(dims, heldout, shape), row_set_outputs(ckpt, shape, 0)
    p_flops = shape.num_layers * sum(projection_set_flops(rows[s], d, outs[s], held_rows[s]) for s, d in dims.items())
    work_itemsize = PRECISIONS[params.projection.precision].itemsize
    largest = max(math.prod(ckpt.shape(shape.spec.param_name(0, m, "weight"))) for m in MODULES)
    out_itemsize = getattr(torch, params.projection.dtype).itemsize
    transient = 2 * work_itemsize + 4 if work_itemsize != 4 else 4 if out_itemsize != 4 else 0
    delta = layer_parameters(shape) * (4 + out_itemsize) + largest * transient
    p_peak = baseline + projection_layer_bytes(dims, rows, held_rows, work_itemsize) + delta
    plans = [
        StagePlan("features", sum(r_len), f_flops, f_peak, seconds("features", f_flops, tokenizer_loads=2)),  # two sets
        StagePlan("projection", 0, p_flops, p_peak,
                  p_flops / constants[rate] if constants and (rate := projection_key(params.projection.precision)) in constants
                  else None),
        StagePlan("attention_stats", passes * sum(i_len), a_flops, a_peak, seconds("attention", a_flops)),
        StagePlan("merge", 0, 0.0, baseline + parse_size(params.merge.max_shard_size)
                  + 4 * max(math.prod(ckpt.shape(n)) for n in ckpt.names()) * 4, None),
    ]
    disk = output_estimates(params, ckpt, Checkpoint(root / params.models.base))
    facts = {
        "parameters": n_params,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "tokens": {"reasoning": sum(r_len), "instruction": sum(i_len), "longest": max(r_len + i_len, default=0),
                   "samples": {"reasoning": len(r_len), "instruction": len(i_len)}},
        "disk_bytes": {"Δ (task vectors)": disk.get(TV, 0), "Δ⊥ (projected)": disk.get(PROJ, 0), "merged model": disk.get(MERGED, 0)},
        "throughput_source": source,
    }
    return facts, plans


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_plan(facts: dict, plans: list[StagePlan]) -> str:
    """The plan as a short text report."""
    t = facts["tokens"]
    lines = [
        f"parameters: {facts['parameters']:,} (forward in {facts['dtype']} on {facts['device']})",
        f"calibration: {t['samples']['reasoning']} reasoning samples, {t['reasoning']:,} tokens; "
        f"{t['samples']['instruction']} instruction samples, {t['instruction']:,} tokens; longest {t['longest']:,}",
        "disk: " + ", ".join(f"{k} {_gb(v)}" for k, v in facts["disk_bytes"].items()),
        "",
        "| stage | tokens | work (TFLOP) | peak memory | time |",
        "|---|---:|---:|---:|---:|",
        *(f"| {p.stage} | {p.tokens:,} | {p.flops / 1e12:.3f} | {_gb(p.peak_bytes)} | "
          f"{'n/a' if p.seconds is None else f'{p.seconds:.0f} s'} |" for p in plans),
        "",
        f"throughput constants: {facts['throughput_source']}",
    ]
    return "\n".join(lines)
