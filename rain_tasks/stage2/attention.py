"""Stage 2 statistics: how much response tokens attend to their instructions along the merge's update.

Attention is read in the causal direction: rows are response queries, columns are instruction
keys. Per sample x, layer l and query head h (A = that head's softmax attention):
  alignment a(x) = mean over usable instructions k of mean_{i∈R_k} Σ_{j∈I_k} A[i, j]
  leakage   u(x) = mean_{i∈U} Σ_{j∈I} A[i, j]        (I = union of all I_k; u = 0 where U is empty)
An instruction is usable when both its prompt spans (I_k) and its response spans (R_k) map to
tokens; a sample without a usable instruction is skipped (counted in the report).

The passes run at θ_R + t·D for t = 0, p and (with `curvature_pass`) 2p, where D is exactly what the
merge adds at α = 1: λ·Δ⊥ on the Linear modules and, under merge scope 'all', λ·Δ_I on embeddings
and norms (added in place: one model in memory). The third pass measures the curvature along D,
which gives α its units (alpha.py).

Output table (STATS_SCHEMA): one row per (sample, layer, head) with a0, a1, a2, u0, u1, u2 (pass
2's columns NaN without the curvature pass), so α can be solved from means with per-sample
standard errors and checked for split-half reliability.

Two paths give the same numbers: "eager" reads `output_attentions` (holds layers × heads × T²,
for short texts); "recompute" captures each layer's attention input during a forward without
attention weights and recomputes only the R ∪ U query rows (memory heads × |R ∪ U| × T).
"auto" uses eager while the full attention tensors fit in EAGER_BUDGET_BYTES and the model runs in
fp32; in bf16/fp16 the model's attention weights are rounded to its dtype, so "auto" recomputes (the
softmax in fp32 from the captured inputs) and "eager" is refused.

Samples are the first `max_samples` rows; rows longer than `max_tokens` are skipped (counted).
The JSON report counts unmapped span strings per kind over every row read (per sample too).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from rain_tasks.io.arch import ModelShape, module_of, read_shape
from rain_tasks.model.calibration import Rendered, load_tokenizer, render_sample, span_positions
from rain_tasks.model.capture import attention_probs, forward_batch_with_hooks, pad_right, token_batches
from rain_tasks.io.checkpoint import load_tensors
from rain_tasks.io.artifacts import atomic_path, layer_file, read_manifest, write_json
from rain_tasks.model.runtime import CPU, add_to_parameter, forward_dtype, input_device, load_causal_lm
from rain_tasks.io.guards import require_finite
from rain_tasks.params import AttentionParams, RuntimeParams
from rain_tasks.io.schemas import STATS_SCHEMA, load_records
from rain_tasks.merge.engine import TensorDir

#: "auto" uses the eager path while layers × heads × T² fp32 attention weights stay below this.
EAGER_BUDGET_BYTES = 256 * 2**20

#: Span kinds of the published instruction format, as counted in the report.
SPAN_KINDS = ("prompt_spans", "response_spans", "unrelated_response_spans")


@dataclass(frozen=True)
class SampleSpans:
    """Token positions of one sample: usable (I_k, R_k) pairs, the instruction union I, unrelated U."""

    pairs: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]
    instruction: tuple[int, ...]
    unrelated: tuple[int, ...]
    unmapped: dict[str, int]  # span kind -> number of span strings that matched no token
    unusable_instructions: int  # instructions without mapped I_k or without mapped R_k

    @property
    def query_rows(self) -> list[int]:
        """Response positions whose attention rows the statistics read (R ∪ U), sorted."""
        return sorted({i for _, r in self.pairs for i in r} | set(self.unrelated))


@dataclass(frozen=True)
class InstructionSample:
    """One usable calibration sample: token ids and span positions."""

    sample_id: str
    input_ids: tuple[int, ...]
    spans: SampleSpans


def _map_spans(r: Rendered, spans: Sequence[str], region: str) -> tuple[tuple[int, ...], int]:
    """Union of the positions of every occurrence of every span, and how many spans matched nothing."""
    found = [span_positions(r, s, region) for s in spans]
    return tuple(sorted({p for pos in found for p in pos})), sum(1 for pos in found if not pos)


def map_sample_spans(r: Rendered, row: dict) -> SampleSpans:
    """Map an instruction-set row's text spans to token positions of its rendering (every occurrence)."""
    unmapped = Counter({kind: 0 for kind in SPAN_KINDS})
    pairs, union, unusable = [], set(), 0
    for entry in row["related_prompt_list"]:
        i_k, miss_i = _map_spans(r, entry["prompt_spans"], "prompt")
        r_k, miss_r = _map_spans(r, entry["response_spans"], "response")
        unmapped["prompt_spans"] += miss_i
        unmapped["response_spans"] += miss_r
        union.update(i_k)
        if i_k and r_k:
            pairs.append((i_k, r_k))
        else:
            unusable += 1
    u, miss_u = _map_spans(r, row["unrelated_response_spans"], "response")
    unmapped["unrelated_response_spans"] += miss_u
    return SampleSpans(tuple(pairs), tuple(sorted(union)), u, dict(unmapped), unusable)


def span_stats(probs: torch.Tensor, rows: Sequence[int], spans: SampleSpans) -> tuple[torch.Tensor, torch.Tensor]:
    """Alignment a[h] and leakage u[h] of one layer from attention rows probs[h, n, T] of positions `rows`."""
    index = {p: n for n, p in enumerate(rows)}

    def mass(queries: Sequence[int], keys: Sequence[int]) -> torch.Tensor:
        block = probs[:, [index[q] for q in queries]][:, :, list(keys)].to(torch.float64)
        return block.sum(-1).mean(-1)

    a = torch.stack([mass(r_k, i_k) for i_k, r_k in spans.pairs]).mean(0)
    u = mass(spans.unrelated, spans.instruction) if spans.unrelated else torch.zeros(probs.shape[0], dtype=torch.float64)
    return a, u


def eager_bytes(shape: ModelShape, n_tokens: int, batch: int = 1) -> int:
    """Bytes of the fp32 attention weights of all layers and heads that `output_attentions` returns."""
    return batch * shape.num_layers * shape.num_heads * n_tokens * n_tokens * 4


#: dtypes whose eager attention weights are exact enough for the statistics: in bf16/fp16 the model rounds
#: each softmax probability to its own dtype (2⁻⁹ relative in bf16) before the spans are summed, so a row's mass
#: exceeds 1 by more than the schema allows; the recompute path takes the softmax in fp32 from any forward dtype.
EAGER_DTYPES = (torch.float32, torch.float64)


def check_mode(mode: str, dtype: torch.dtype) -> None:
    """Refuse `mode: eager` for a model that runs in a dtype whose attention weights are rounded (bf16/fp16)."""
    if mode == "eager" and dtype not in EAGER_DTYPES:
        raise ValueError(f"attention.mode 'eager' reads attention weights rounded to {str(dtype).removeprefix('torch.')}, "
                         "too coarse for the statistics; use mode 'auto' or 'recompute' (fp32 softmax from the "
                         "captured layer inputs), or runtime.dtype float32")


def pick_mode(mode: str, shape: ModelShape, n_tokens: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> str:
    """Resolve "auto" to eager for fp32 batches whose full attention fits the budget, recompute otherwise."""
    check_mode(mode, dtype)
    if mode != "auto":
        return mode
    if dtype not in EAGER_DTYPES:
        return "recompute"
    return "eager" if eager_bytes(shape, n_tokens, batch) <= EAGER_BUDGET_BYTES else "recompute"


PerSample = list[tuple[torch.Tensor, torch.Tensor]]


def eager_batch_stats(model, sequences: Sequence[Sequence[int]], spans: Sequence[SampleSpans]) -> PerSample:
    """Per sequence, per-layer a, u [layers, heads] from full eager attention weights of one padded forward (short texts)."""
    model.set_attn_implementation("eager")
    ids = pad_right([torch.as_tensor(s) for s in sequences]).to(input_device(model))
    out = model.base_model(input_ids=ids, output_attentions=True)
    if not out.attentions or any(att is None for att in out.attentions):
        raise RuntimeError("the model returned no attention weights; it must run with attn_implementation='eager'")
    results = []
    for b, (seq, sp) in enumerate(zip(sequences, spans, strict=True)):
        rows = sp.query_rows
        stats = [span_stats(att[b][:, rows, : len(seq)], rows, sp) for att in out.attentions]
        results.append((torch.stack([a for a, _ in stats]).cpu(), torch.stack([u for _, u in stats]).cpu()))
    return results


def recompute_batch_stats(model, sequences: Sequence[Sequence[int]], spans: Sequence[SampleSpans]) -> PerSample:
    """Per sequence, per-layer a, u [layers, heads] recomputing only its R ∪ U attention rows from captured layer inputs."""
    results: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in sequences]

    def on_layer(b: int, cap) -> None:
        rows = spans[b].query_rows
        results[b][cap.layer] = span_stats(attention_probs(model, cap.layer, cap.attn_in, rows), rows, spans[b])

    model.set_attn_implementation("sdpa")  # the forward itself materialises no attention weights
    forward_batch_with_hooks(model, [torch.as_tensor(s) for s in sequences], on_layer)
    layers = list(range(model.config.num_hidden_layers))
    out = []
    for found in results:
        if sorted(found) != layers:
            raise RuntimeError(f"capture reported layers {sorted(found)}, expected {layers}")
        out.append((torch.stack([found[l][0] for l in layers]).cpu(), torch.stack([found[l][1] for l in layers]).cpu()))
    return out


def eager_sample_stats(model, input_ids: torch.Tensor, spans: SampleSpans) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer a, u [layers, heads] of one sample from full eager attention weights."""
    return eager_batch_stats(model, [input_ids.reshape(-1).tolist()], [spans])[0]


def recompute_sample_stats(model, input_ids: torch.Tensor, spans: SampleSpans) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer a, u [layers, heads] of one sample, recomputing only its R ∪ U attention rows."""
    return recompute_batch_stats(model, [input_ids.reshape(-1).tolist()], [spans])[0]


_PATHS = {"eager": eager_batch_stats, "recompute": recompute_batch_stats}


@torch.no_grad()
def run_pass(
    model, samples: Sequence[InstructionSample], shape: ModelShape, mode: str, desc: str, batch_tokens: int = 1
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """a and u per sample, each [samples, layers, heads] float64, plus how many samples each path served.

    Samples go through in order, in batches of at most `batch_tokens` padded tokens (one sample per
    forward when a sample alone exceeds it); a batch takes the eager path only if its whole
    attention tensor fits EAGER_BUDGET_BYTES.
    """
    a_all = np.zeros((len(samples), shape.num_layers, shape.num_heads))
    u_all = np.zeros_like(a_all)
    used, dtype = Counter(), next(model.parameters()).dtype
    for batch in tqdm(token_batches([len(s.input_ids) for s in samples], batch_tokens), desc=desc, unit="batch"):
        group = [samples[i] for i in batch]
        path = pick_mode(mode, shape, max(len(s.input_ids) for s in group), len(group), dtype)
        for i, (a, u) in zip(batch, _PATHS[path](model, [s.input_ids for s in group], [s.spans for s in group])):
            a_all[i], u_all[i] = a.numpy(), u.numpy()
        used[path] += len(group)
    return a_all, u_all, dict(used)


def load_lrm(lrm_dir: str | Path, runtime: RuntimeParams | None = None):
    """The LRM on `runtime`'s device and dtype with eager attention (the only implementation that returns weights)."""
    return load_causal_lm(lrm_dir, runtime)


@torch.no_grad()
def add_update(model, projected_dir: str | Path, shape: ModelShape, step: float, other_dir: str | Path | None = None) -> list[str]:
    """Add step·D in place, D = Δ⊥ on every merged Linear parameter and, with `other_dir` (the task vectors,
    merge scope 'all'), Δ_I on every other parameter; return the Δ⊥ file's ignored non-module tensor names.

    The Δ⊥ directory must be complete (its manifest written last) and hold a Δ⊥ of the same shape
    for every q/k/v/o/gate/up/down weight and bias of the model; `other_dir` one for every other parameter.
    """
    read_manifest(projected_dir, "Δ⊥ (Stage 1's projected task vectors)")
    params = dict(model.named_parameters())
    expected = {n for n in params if module_of(n) is not None}
    seen, ignored = set(), []
    for layer in range(shape.num_layers):
        path = layer_file(projected_dir, layer)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing Stage 1 output for layer {layer}")
        for name, delta in load_tensors(path).items():
            if name not in expected:
                ignored.append(name)
                continue
            _add(model, name, params[name], delta, step, path)
            seen.add(name)
    missing = sorted(expected - seen)
    if missing:
        raise ValueError(f"{projected_dir}: no Δ⊥ for {len(missing)} merged tensor(s), e.g. {missing[:3]}")
    if other_dir is not None:
        others = TensorDir(other_dir)
        for name in sorted(set(params) - expected):
            delta = others.get(name)
            if delta is None:
                raise ValueError(f"{other_dir}: no Δ_I for {name}, which merge scope 'all' updates")
            _add(model, name, params[name], delta, step, Path(other_dir))
    return sorted(ignored)


def _add(model, name: str, param: torch.Tensor, delta: torch.Tensor, step: float, source: Path) -> None:
    """param += step·delta (where accelerate holds it, offloaded or not), refusing a shape mismatch."""
    if tuple(delta.shape) != tuple(param.shape):
        raise ValueError(f"{source}: {name} has shape {tuple(delta.shape)}, the model has {tuple(param.shape)}")
    add_to_parameter(model, name, delta, step)


def prepare_instruction_samples(rows: Sequence[dict], tokenizer, max_tokens: int) -> tuple[list[InstructionSample], dict]:
    """Render and span-map every row; keep those within max_tokens with a usable instruction; report the rest."""
    samples, per_sample_unmapped = [], []
    totals = Counter({kind: 0 for kind in SPAN_KINDS})
    too_long = no_pair = unusable = 0
    for row in rows:
        r = render_sample(tokenizer, row["prompt"], row["reason"], row["response"])
        spans = map_sample_spans(r, row)
        totals.update(spans.unmapped)
        unusable += spans.unusable_instructions
        if any(spans.unmapped.values()):
            per_sample_unmapped.append({"id": str(row["id"]), **spans.unmapped})
        if len(r) > max_tokens:
            too_long += 1
        elif not spans.pairs:
            no_pair += 1
        else:
            samples.append(InstructionSample(str(row["id"]), tuple(r.input_ids), spans))
    lengths = [len(s.input_ids) for s in samples]
    report = {
        "samples_read": len(rows),
        "samples_used": len(samples),
        "skipped_too_long": too_long,
        "skipped_no_usable_instruction": no_pair,
        "unusable_instructions": unusable,
        "unmapped_spans": dict(totals),
        "unmapped_per_sample": per_sample_unmapped,
        "tokens": {"total": sum(lengths), "max": max(lengths, default=0), "max_allowed": max_tokens},
    }
    return samples, report


def stats_table(a: list[np.ndarray], u: list[np.ndarray]) -> pd.DataFrame:
    """Long table, one row per (sample, layer, head), of a and u per pass (pass 2's NaN where it did not run)."""
    n, layers, heads = a[0].shape
    sample, layer, head = np.indices((n, layers, heads))
    table = {"sample": sample.ravel().astype(np.int64), "layer": layer.ravel().astype(np.int64), "head": head.ravel().astype(np.int64)}
    for kind, passes in (("a", a), ("u", u)):
        for k in range(3):
            table[f"{kind}{k}"] = passes[k].ravel() if k < len(passes) else np.full(n * layers * heads, np.nan)
    return pd.DataFrame(table)


def attention_stats(
    lrm_dir: str | Path,
    projected_dir: str | Path,
    instruction_path: str | Path,
    params: AttentionParams,
    out_path: str | Path,
    report_path: str | Path,
    *,
    lam: float = 1.0,
    other_dir: str | Path | None = None,
    runtime: RuntimeParams | None = None,
) -> Path:
    """Run the passes at θ_R + t·D, t = 0, p(, 2p), D = λ·(Δ⊥ and, with `other_dir`, Δ_I elsewhere): exactly the
    merge's update at α = 1; write the per-sample table and a JSON report.

    `runtime` places the LRM (device, dtype, device_map) and sets the padded tokens per forward pass.
    """
    runtime = runtime or CPU
    check_mode(params.mode, forward_dtype(lrm_dir, runtime))
    shape = read_shape(lrm_dir)
    rows = load_records(instruction_path, "instruction")[: params.max_samples]
    samples, report = prepare_instruction_samples(rows, load_tokenizer(lrm_dir), params.max_tokens)
    if not samples:
        raise ValueError(f"{instruction_path}: no usable sample (too long: {report['skipped_too_long']}, no usable instruction: {report['skipped_no_usable_instruction']})")
    model = load_lrm(lrm_dir, runtime)
    step = lam * params.prior
    a, u, modes = [], [], []
    ignored: list[str] = []
    for k in range(3 if params.curvature_pass else 2):
        if k:  # θ_R + k·p·D, one more step of the merge's update per pass
            ignored = add_update(model, projected_dir, shape, step, other_dir)
        a_k, u_k, used = run_pass(model, samples, shape, params.mode, f"attention pass {k} (θ_R + {k}·p·D)", runtime.batch_tokens)
        a.append(a_k), u.append(u_k), modes.append(used)
    table = stats_table(a, u)
    require_finite(table.dropna(axis=1, how="all"), f"attention statistics {out_path}")  # pass 2's columns: NaN if not run
    table = STATS_SCHEMA.validate(table)
    with atomic_path(out_path) as tmp:
        table.to_parquet(tmp, index=False)
    report.update(mode=params.mode, paths=modes, prior=params.prior, lam=lam, step=step, scope="all" if other_dir else "linear",
                  ignored_projected_tensors=ignored)
    write_json(report_path, report)
    return Path(out_path)
