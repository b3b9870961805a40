"""Stage 1 features: the rows x with "Δ x = 0 keeps the module's output at Ω_think", reduced per layer.

One teacher-forced LRM forward per reasoning sample; per layer and row set (see `row_sets`):
  q        attn_in at Ω                     (q_proj)
  k.g<g>   attn_in of the keys that Ω rows of KV group g's heads attend to (key_mass)  (k_proj rows of group g)
  v.g<g>   S_t^h = Σ_s A^h[t,s] attn_in_s for t ∈ Ω and the query heads h of group g   (v_proj rows of group g)
  o.h<h>   head h's slice of attn_out at Ω   (o_proj columns of head h: Stage 2 scales them by α_h, so each
           head's block is protected on its own slice; a whole-vector constraint would hold only by
           cancellation between heads, which any non-uniform α breaks)
  mlp_in   post-attention-layernorm output at Ω (gate_proj and up_proj share it)
  down     act(gate)·up at Ω                (down_proj)
A module with a bias gets a constant-1 column ([W|b] acts on [x; 1]); o_proj's bias, an output-side term
that Stage 2 scales by the layer mean, is protected against that constant on its own (see projection).

Layout of the output directory:
  layer_000.safetensors …  per row set either `gram.<set>` = Σ x xᵀ [d, d] (float64), or, when the
                           set has fewer rows than its width d, `rows.<set>` = the rows [n, d]
                           (float64; the low-rank path never forms d × d). Metadata: inputs'
                           digests, params, sample counts, `rows` and `dims` per set (JSON).
  manifest.json            written last (its presence means complete): digests, params, the ModelShape.
Layers are processed in chunks that fit a memory budget (a chunk's accumulators live across
all samples); a rerun skips layer files made from the same inputs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from rain_tasks.io.arch import MODULES, ModelShape, read_shape
from rain_tasks.model.calibration import load_tokenizer, render_sample, think_positions, think_token_ids
from rain_tasks.model.capture import LayerCapture, attention_probs, forward_batch_with_hooks, token_batches
from rain_tasks.io.checkpoint import Checkpoint, is_current, save_tensors
from rain_tasks.io.artifacts import MANIFEST, layer_file, write_json
from rain_tasks.model.runtime import CPU, forward_dtype, load_causal_lm
from rain_tasks.io.guards import require_finite
from rain_tasks.io.digest import json_digest, path_digest
from rain_tasks.params import FeaturesParams, RuntimeParams
from rain_tasks.io.schemas import load_records

log = logging.getLogger(__name__)

GRAM, ROWS = "gram", "rows"
_SHARED_SETS = {"q_proj": "q", "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down"}
_BYTES = 8  # float64


def row_sets(module: str, shape: ModelShape) -> list[tuple[int, str]]:
    """(block, row-set name) pairs that constrain `module`: a block per KV group for k/v (rows), per query
    head for o_proj (columns), else one block (-1). Each block is projected on its own set's basis."""
    if module in ("k_proj", "v_proj"):
        return [(g, f"{module[0]}.g{g}") for g in range(shape.num_kv_heads)]
    if module == "o_proj":
        return [(h, f"o.h{h}") for h in range(shape.num_heads)]
    return [(-1, _SHARED_SETS[module])]


def feature_key(kind: str, set_name: str) -> str:
    """Tensor key of one row set's statistics in a features layer file (`gram.q`, `rows.down`, ...)."""
    return f"{kind}.{set_name}"


def row_set_modules(shape: ModelShape) -> dict[str, str]:
    """Row-set name -> the module whose input width (and bias) defines it."""
    return {name: module for module in MODULES for _, name in row_sets(module, shape)}


def row_set_dims(shape: ModelShape, biases: dict[str, bool]) -> dict[str, int]:
    """Row width per set: the module's input width (one head's for o_proj), plus 1 for a bias column."""
    width = {"q": shape.hidden_size, "mlp_in": shape.hidden_size, "down": shape.intermediate_size}
    return {name: (shape.head_dim if name.startswith("o.") else width.get(name, shape.hidden_size)) + int(biases[name])
            for name in row_set_modules(shape)}


def row_set_biases(ckpt: Checkpoint, shape: ModelShape, layer: int) -> dict[str, bool]:
    """Whether each row set carries a bias column (gate and up must agree; o_proj's per-head sets never do)."""
    names = set(ckpt.layer_names(layer))
    has = {m: shape.spec.param_name(layer, m, "bias") in names for m in MODULES}
    if has["gate_proj"] != has["up_proj"]:
        raise ValueError(f"layer {layer}: gate_proj and up_proj disagree on having a bias; they share one row set")
    return {name: has[module] and module != "o_proj" for name, module in row_set_modules(shape).items()}


class RowAccumulator:
    """Σ x xᵀ in float64, kept as the rows themselves while they are fewer than their width."""

    def __init__(self, dim: int, low_rank: bool = True):
        self.dim, self.low_rank, self.n = dim, low_rank, 0
        self._rows: list[torch.Tensor] = []
        self._gram: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        """Add rows [m, dim]; switch to a Gram once the row count reaches the width."""
        rows = rows.to("cpu", torch.float64)  # captures may live on an accelerator; sums live here
        self.n += rows.shape[0]
        if self._gram is None and self.low_rank and self.n < self.dim:
            self._rows.append(rows)
            return
        if self._gram is None:
            self._gram = torch.zeros(self.dim, self.dim, dtype=torch.float64)
            for block in self._rows:
                self._gram.addmm_(block.T, block)
            self._rows = []
        self._gram.addmm_(rows.T, rows)

    def result(self) -> tuple[str, torch.Tensor]:
        """(`gram`, G) or (`rows`, X) with G = XᵀX."""
        if self._gram is not None:
            return GRAM, self._gram
        return ROWS, torch.cat(self._rows) if self._rows else torch.zeros(0, self.dim, dtype=torch.float64)


def key_positions(probs: torch.Tensor, key_mass: float) -> torch.Tensor:
    """Positions in the smallest per-row key sets holding `key_mass` of each row's attention, united.

    probs: [heads, rows, T] attention rows; returns sorted positions (long).
    """
    p, order = probs.sort(dim=-1, descending=True)
    before = p.cumsum(-1) - p  # mass of the strictly larger keys
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, before < key_mass)
    return keep.reshape(-1, probs.shape[-1]).any(0).nonzero().flatten()


def _augment(x: torch.Tensor, bias: bool) -> torch.Tensor:
    """Rows in float64, with a constant-1 column appended when the module has a bias."""
    x = x.to(torch.float64)
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1) if bias else x


def layer_rows(
    model: torch.nn.Module, cap: LayerCapture, omega: Sequence[int], shape: ModelShape, key_mass: float, biases: dict[str, bool]
) -> dict[str, torch.Tensor]:
    """One sample's constraint rows of one layer, per row set (see the module docstring)."""
    idx = torch.as_tensor(list(omega), dtype=torch.long)
    x = cap.attn_in.to(torch.float64)
    probs = attention_probs(model, cap.layer, cap.attn_in, omega)  # [H, |Ω|, T]
    weighted = probs.to(torch.float64) @ x  # [H, |Ω|, hidden]: S_t^h
    rows = {"q": x[idx], "mlp_in": cap.mlp_in[idx], "down": cap.mlp_act[idx]}
    heads_out = cap.attn_out[idx].reshape(len(idx), shape.num_heads, shape.head_dim)
    rows |= {f"o.h{h}": heads_out[:, h] for h in range(shape.num_heads)}
    for g in range(shape.num_kv_heads):
        heads = slice(g * shape.n_rep, (g + 1) * shape.n_rep)
        rows[f"v.g{g}"] = weighted[heads].reshape(-1, x.shape[1])
        rows[f"k.g{g}"] = x[key_positions(probs[heads], key_mass)]
    return {name: _augment(r, biases[name]) for name, r in rows.items()}


@dataclass(frozen=True)
class ReasoningSample:
    """A rendered calibration sample: token ids and its Ω_think positions."""

    input_ids: torch.Tensor
    omega: list[int]


def prepare_reasoning_samples(records: list[dict], tokenizer, params: FeaturesParams) -> tuple[list[ReasoningSample], int]:
    """Render every record, locate Ω_think, and drop those over `max_tokens`; return (samples, skipped)."""
    open_id, close_id = think_token_ids(tokenizer)
    samples, skipped = [], 0
    for i, rec in enumerate(records):
        try:
            r = render_sample(tokenizer, rec["prompt"], rec["reasoning"], rec["response"])
        except ValueError as e:
            raise ValueError(f"reasoning sample {i}: {e}") from None
        if r.input_ids.count(open_id) != 1 or r.input_ids.count(close_id) != 1:
            raise ValueError(
                f"reasoning sample {i}: the rendered text must hold exactly one <think> and one </think> "
                f"(found {r.input_ids.count(open_id)} and {r.input_ids.count(close_id)}); its text carries its own tags"
            )
        if len(r) > params.max_tokens:
            skipped += 1
            continue
        samples.append(ReasoningSample(torch.tensor(r.input_ids), think_positions(r, params.neighbour_radius)))
    return samples, skipped


def row_set_rows(dims: dict[str, int], samples: list[ReasoningSample], shape: ModelShape) -> dict[str, int]:
    """Upper bound on the rows each set of `dims` accumulates over `samples` (see `layer_rows`).

    Exact for every set but the keys: |Ω| per sample (n_rep·|Ω| for `v.` sets, one row per query head of
    the group); a `k.` set gets the keys holding `key_mass` of the Ω rows' attention, at most every token.
    """
    omega = sum(len(s.omega) for s in samples)
    keys = sum(len(s.input_ids) for s in samples)
    return {name: keys if name.startswith("k.") else shape.n_rep * omega if name.startswith("v.") else omega for name in dims}


def layer_bytes(dims: dict[str, int], samples: list[ReasoningSample], shape: ModelShape, low_rank: bool) -> int:
    """Upper bound on one layer's accumulator memory over all samples (rows [n, d] while n < d, else a Gram [d, d])."""
    rows = row_set_rows(dims, samples, shape)
    return sum((min(rows[name], d) if low_rank else d) * d * _BYTES for name, d in dims.items())


def layer_chunks(layers: list[int], per_layer: int, budget: int) -> list[list[int]]:
    """Consecutive groups of layers whose accumulators fit `budget` bytes (at least one layer each)."""
    size = max(1, budget // max(per_layer, 1))
    return [layers[i : i + size] for i in range(0, len(layers), size)]


def accumulate_features(
    lrm_dir: str | Path,
    reasoning_path: str | Path,
    params: FeaturesParams,
    out_dir: str | Path,
    *,
    low_rank: bool = True,
    memory_budget_bytes: int = 8 * 2**30,
    load_model: Callable[[], torch.nn.Module] | None = None,
    runtime: RuntimeParams | None = None,
) -> Path:
    """Collect Stage 1 constraint statistics of the LRM at Ω_think into `out_dir`; return the manifest path.

    `low_rank=False` forces Grams for every set (used to check both paths agree). `load_model` returns
    the LRM when there is work to do (pass a cached loader to share one load between calibration sets);
    `runtime` places it (device, dtype, device_map) and sets the tokens per batched forward pass.
    """
    runtime = runtime or CPU
    lrm_dir, out_dir = Path(lrm_dir), Path(out_dir)
    shape = read_shape(lrm_dir)
    tokenizer = load_tokenizer(lrm_dir)
    records = load_records(reasoning_path, "reasoning")[: params.max_samples]
    samples, skipped = prepare_reasoning_samples(records, tokenizer, params)
    if not samples:
        raise ValueError(f"{reasoning_path}: no sample fits max_tokens={params.max_tokens} ({skipped} skipped)")
    if skipped:
        log.warning("features: skipped %d of %d samples longer than %d tokens", skipped, len(records), params.max_tokens)
    meta = {
        "kind": "features",
        "lrm": path_digest(lrm_dir, remembered=True),
        "calibration": path_digest(reasoning_path, remembered=True),
        "params": json_digest(params.model_dump()),
        "forward_dtype": str(forward_dtype(lrm_dir, runtime)).removeprefix("torch."),
        "low_rank": str(low_rank),
        "samples": str(len(samples)),
        "skipped": str(skipped),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    todo = [layer for layer in range(shape.num_layers) if not is_current(layer_file(out_dir, layer), meta)]
    if todo:
        ckpt = Checkpoint(lrm_dir)
        biases = {layer: row_set_biases(ckpt, shape, layer) for layer in todo}
        per_layer = max(layer_bytes(row_set_dims(shape, b), samples, shape, low_rank) for b in biases.values())
        model = load_model() if load_model is not None else load_causal_lm(lrm_dir, runtime)
        for chunk in layer_chunks(todo, per_layer, memory_budget_bytes):
            _accumulate_chunk(model, samples, shape, params, chunk, biases, low_rank, out_dir, meta, runtime.batch_tokens)
    manifest = {**meta, "num_layers": shape.num_layers, "shape": asdict(shape), "params_json": params.model_dump()}
    write_json(out_dir / MANIFEST, manifest)
    return out_dir / MANIFEST


def _accumulate_chunk(
    model: torch.nn.Module,
    samples: list[ReasoningSample],
    shape: ModelShape,
    params: FeaturesParams,
    chunk: list[int],
    biases: dict[int, dict[str, bool]],
    low_rank: bool,
    out_dir: Path,
    meta: dict[str, str],
    batch_tokens: int,
) -> None:
    """Stream every sample through the layers of `chunk` (batches of `batch_tokens` padded tokens) and write their feature files."""
    dims = {layer: row_set_dims(shape, biases[layer]) for layer in chunk}
    accs = {layer: {name: RowAccumulator(d, low_rank) for name, d in dims[layer].items()} for layer in chunk}

    def reduce(cap: LayerCapture, omega: list[int]) -> None:
        for name, rows in layer_rows(model, cap, omega, shape, params.key_mass, biases[cap.layer]).items():
            accs[cap.layer][name].add(rows)

    batches = token_batches([len(s.input_ids) for s in samples], batch_tokens)
    for batch in tqdm(batches, desc=f"features layers {chunk[0]}-{chunk[-1]}", unit="batch"):
        group = [samples[i] for i in batch]
        forward_batch_with_hooks(model, [s.input_ids for s in group], lambda b, cap: reduce(cap, group[b].omega), layers=chunk)
    for layer in chunk:
        layer_accs = accs.pop(layer)
        rows = {name: acc.n for name, acc in layer_accs.items()}
        tensors = {feature_key(kind, name): t for name, (kind, t) in ((n, a.result()) for n, a in layer_accs.items())}
        extra = {"layer": str(layer), "rows": json.dumps(rows, sort_keys=True), "dims": json.dumps(dims[layer], sort_keys=True)}
        save_tensors(layer_file(out_dir, layer), require_finite(tensors, f"features {layer_file(out_dir, layer)}"), {**meta, **extra})
