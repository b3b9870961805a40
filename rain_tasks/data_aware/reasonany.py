"""ReasonAny (Yang et al., arXiv 2601.05560): contrastive gradient masks decide which weights take which task vector.

Scores (one sweep per model and data set, batch 1, next-token cross-entropy L averaged over a sample's tokens):
  S_M^D = (1/N) Σ_x |∇_θ L_M(x)|   (saliency snip: |θ| ⊙ that), accumulated in float32 by a hook that adds each
  parameter's |grad| the moment it is complete and frees the grad, so a sweep holds the weights, one fp32 score per
  weight and the activations; written per decoder layer (task_vectors' layout, one tensor per parameter name).
Masks, with global thresholds over every parameter in scope (all tensors, or the seven Linear modules):
  Top_p(S) = {S ≥ k-th largest}, Bot_p(S) = {S ≤ k-th smallest}, k = ⌊p·N_all⌋ (k = 0: empty)
  M_X = Top_pX(S_X^DX) ∧ Top_pX(S_B^DX),  M_R = Bot_pR(S_R^DR) ∧ Bot_pR(S_B^DR)   (base intersection optional)
  M_X' = M_X ∧ ¬M_R,  M_R' = M_R ∧ ¬M_X   (disjoint)
  granularity tensor (the code's): each of the four sets takes a whole tensor if any element passes its threshold.
Thresholds are exact order statistics found in passes over the score files (`kth_smallest`), never all scores at once.
Merge (the rules: rain_tasks.methods.reasonany): native θ = θ_B + λ_X M_X' ⊙ Δ_X + λ_R M_R' ⊙ Δ_R (unselected weights
stay θ_B); ours (ITM's skill into the LRM) θ = θ_R + λ_X M_X' ⊙ Δ_I, where M_R only excludes (weights in M_R stay θ_R).

Deviations and inferences (METHODS-MORE §3): the code pads to 512 and keeps the pads in the labels, runs bf16 grads;
here a sample is not padded (batch 1) and scores sum in fp32. A sample's text is prompt + EOS + response; a reasoning
record's response is written as the LRM's `<think>` block followed by its answer (our choice for D_R).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from rain_tasks.io.arch import layer_of, module_of
from rain_tasks.io.artifacts import MANIFEST, NON_LAYER, layer_file, read_manifest, write_json
from rain_tasks.io.checkpoint import TensorFile, save_tensors
from rain_tasks.io.digest import file_digest, json_digest, path_digest
from rain_tasks.io.guards import require_finite
from rain_tasks.merge.engine import TensorDir
from rain_tasks.methods.reasonany import merge_into_lrm, merge_native
from rain_tasks.methods.registry import Method, build_method
from rain_tasks.model.calibration import THINK_CLOSE, THINK_OPEN
from rain_tasks.model.runtime import CPU, forward_dtype, input_device, load_causal_lm
from rain_tasks.params import ReasonAnyParams, RuntimeParams

#: the four score sweeps: set name -> (model, calibration set)
SWEEPS = {"domain": ("itm", "instruction"), "domain_base": ("base", "instruction"),
          "reasoning": ("lrm", "reasoning"), "reasoning_base": ("base", "reasoning")}
DOMAIN, REASONING = "domain", "reasoning"


# --- scores ----------------------------------------------------------------------------------------------------


def sample_ids(tokenizer, record: dict, max_tokens: int) -> torch.Tensor:
    """Token ids of prompt + EOS + response (a reasoning record's response led by its think block), cut at max_tokens."""
    response = record["response"]
    if "reasoning" in record:
        response = f"{THINK_OPEN}\n{record['reasoning']}\n{THINK_CLOSE}\n\n{response}"
    if tokenizer.eos_token is None:
        raise ValueError("ReasonAny's sample text is prompt + EOS + response: the tokenizer defines no eos_token")
    ids = tokenizer(record["prompt"] + tokenizer.eos_token + response, add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"a ReasonAny sample needs at least 2 tokens for a next-token loss (got {len(ids)})")
    return torch.tensor(ids, dtype=torch.long)


def sweep_sequences(tokenizer, records: Sequence[dict], params: ReasonAnyParams) -> list[torch.Tensor]:
    """The samples a sweep runs on: the first `max_samples` records as `sample_ids` (the code's first 100 rows)."""
    return [sample_ids(tokenizer, r, params.max_tokens) for r in records[: params.max_samples]]


def accumulate_gradient_scores(model: torch.nn.Module, sequences: Sequence[torch.Tensor],
                               accumulate_on: Literal["device", "cpu"] = "device") -> dict[str, torch.Tensor]:
    """(1/N) Σ_x |∇θ L(x)| per parameter in float32 (batch 1); each grad is added and freed as soon as it is complete."""
    if not sequences:
        raise ValueError("gradient scores need at least one sample")
    params = dict(model.named_parameters())
    meta = sorted(name for name, p in params.items() if p.device.type == "meta")
    if meta:
        raise ValueError(f"gradient scores need every weight in memory; {len(meta)} are offloaded (e.g. {meta[0]}): "
                         "give the model GPUs or CPU memory without an offload folder")
    where = {name: torch.device("cpu") if accumulate_on == "cpu" else p.device for name, p in params.items()}
    scores = {name: torch.zeros(p.shape, dtype=torch.float32, device=where[name]) for name, p in params.items()}

    def add(name: str) -> Callable[[torch.nn.Parameter], None]:
        def hook(p: torch.nn.Parameter) -> None:
            scores[name].add_(p.grad.abs().to(where[name], torch.float32))
            p.grad = None

        return hook

    handles = []
    try:
        for name, p in params.items():
            p.requires_grad_(True)
            handles.append(p.register_post_accumulate_grad_hook(add(name)))
        for ids in sequences:
            ids = ids.reshape(1, -1).to(input_device(model))
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    finally:
        for h in handles:
            h.remove()
    return {name: (s / len(sequences)).cpu() for name, s in scores.items()}


def snip(scores: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """|θ| ⊙ S: SNIP saliency from mean |grad| scores (the mean of |θ ⊙ g| over samples)."""
    params = dict(model.named_parameters())
    return {name: s * params[name].detach().abs().to("cpu", torch.float32) for name, s in scores.items()}


def file_groups(names: Iterable[str]) -> dict[str, list[str]]:
    """File name in task_vectors' layout (layer_000.safetensors …, non_layer.safetensors) -> its tensor names, sorted."""
    groups: dict[str, list[str]] = {}
    for name in sorted(names):
        layer = layer_of(name)
        groups.setdefault(NON_LAYER if layer is None else layer_file(".", layer).name, []).append(name)
    return groups


def write_manifest(out_dir: str | Path, names: Iterable[str], meta: dict[str, str | int | dict]) -> Path:
    """The manifest of a tensor directory, written last (its presence means complete)."""
    layers = [layer for layer in map(layer_of, names) if layer is not None]
    return write_json(Path(out_dir) / MANIFEST, {**meta, "num_layers": max(layers, default=-1) + 1})


def write_tensor_dir(tensors: dict[str, torch.Tensor], out_dir: str | Path, meta: dict[str, str]) -> Path:
    """Tensors by checkpoint name into task_vectors' layout (a file per layer plus non-layer tensors), manifest last."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for fname, group in file_groups(tensors).items():
        save_tensors(out_dir / fname, {n: tensors[n] for n in group}, meta)
    return write_manifest(out_dir, tensors, meta)


def score_sweep(
    model_dir: str | Path,
    sequences: Sequence[torch.Tensor],
    params: ReasonAnyParams,
    out_dir: str | Path,
    runtime: RuntimeParams | None = None,
    calibration_digest: str = "",
) -> Path:
    """One sweep: the model at `model_dir` on `sequences` (see `sweep_sequences`), its scores written to `out_dir`."""
    runtime = runtime or CPU
    model = load_causal_lm(model_dir, runtime)
    scores = accumulate_gradient_scores(model, sequences, params.accumulate_on)
    if params.saliency == "snip":
        scores = snip(scores, model)
    meta = {"kind": "grad_scores", "model": path_digest(model_dir, remembered=True), "calibration": calibration_digest,
            "saliency": params.saliency, "samples": str(len(sequences)), "max_tokens": str(params.max_tokens),
            "forward_dtype": str(forward_dtype(model_dir, runtime)).removeprefix("torch.")}
    return write_tensor_dir(require_finite(scores, f"gradient scores {out_dir}"), out_dir, meta)


# --- global thresholds ---------------------------------------------------------------------------------------------


def _in_bracket(v: torch.Tensor, lo: float, hi: float, hi_open: bool) -> torch.Tensor:
    """The values of v (float64) inside [lo, hi) or [lo, hi]."""
    return v[(v >= lo) & ((v < hi) if hi_open else (v <= hi))]


def kth_smallest(tensors: Callable[[], Iterable[torch.Tensor]], k: int, bins: int = 4096, max_exact: int = 2**24) -> float:
    """The exact k-th smallest value (1-based) over every tensor `tensors()` yields, holding one tensor plus at most
    `max_exact` values: a pass for count/min/max, histogram passes narrowing a bracket to the bin holding rank k,
    then one pass collecting the bracket. Each histogram pass divides the bracket by `bins`."""
    count, lo, hi = 0, math.inf, -math.inf
    for t in tensors():
        if t.numel():
            count += t.numel()
            lo, hi = min(lo, float(t.min())), max(hi, float(t.max()))
    if not 1 <= k <= count:
        raise ValueError(f"rank {k} is outside 1..{count} (the number of scores)")
    rank, inside, hi_open = k, count, False
    while inside > max_exact:
        edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
        counts = torch.zeros(bins, dtype=torch.int64)
        seen_lo, seen_hi = math.inf, -math.inf
        for t in tensors():
            v = _in_bracket(t.reshape(-1).to(torch.float64), lo, hi, hi_open)
            if v.numel():
                counts += torch.bincount(torch.bucketize(v, edges[1:-1], right=True), minlength=bins)
                seen_lo, seen_hi = min(seen_lo, float(v.min())), max(seen_hi, float(v.max()))
        if seen_lo == seen_hi:
            return seen_lo  # every value left in the bracket is the same
        cum = counts.cumsum(0)
        b = int(torch.searchsorted(cum, torch.tensor(rank)))
        rank -= int(cum[b - 1]) if b else 0
        inside = int(counts[b])
        lo, (hi, hi_open) = float(edges[b]), ((hi, hi_open) if b == bins - 1 else (float(edges[b + 1]), True))
    values = torch.cat([_in_bracket(t.reshape(-1).to(torch.float64), lo, hi, hi_open) for t in tensors()])
    return float(values.kthvalue(rank).values)


def top_threshold(tensors: Callable[[], Iterable[torch.Tensor]], count: int, p: float, bins: int, max_exact: int) -> float:
    """τ with Top_p = {S ≥ τ}: the k-th largest of `count` scores, k = ⌊p·count⌋ (+inf, an empty set, when k = 0)."""
    k = math.floor(p * count)
    return kth_smallest(tensors, count - k + 1, bins, max_exact) if k else math.inf


def bottom_threshold(tensors: Callable[[], Iterable[torch.Tensor]], count: int, p: float, bins: int, max_exact: int) -> float:
    """τ' with Bot_p = {S ≤ τ'}: the k-th smallest of `count` scores, k = ⌊p·count⌋ (−inf, an empty set, when k = 0)."""
    k = math.floor(p * count)
    return kth_smallest(tensors, k, bins, max_exact) if k else -math.inf


# --- masks ---------------------------------------------------------------------------------------------------------


class ScoreDir:
    """One sweep's score files, read a tensor at a time."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        read_manifest(self.directory, "gradient scores")  # an interrupted sweep fails here, naming its directory
        files = sorted(self.directory.glob("*.safetensors"))
        self._files = {name: f for f in map(TensorFile, files) for name in f.keys()}

    def names(self) -> list[str]:
        return sorted(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._files[name].shape(name)

    def get(self, name: str) -> torch.Tensor:
        return self._files[name].get_tensor(name)

    def stream(self, names: Sequence[str]) -> Callable[[], Iterator[torch.Tensor]]:
        """A factory of passes over the scores of `names` (what kth_smallest reads)."""
        return lambda: (self.get(n) for n in names)


def in_scope(names: Iterable[str], scope: Literal["all", "linear"]) -> list[str]:
    """The tensor names whose scores enter the thresholds: all of them, or the seven Linear modules' weights and biases."""
    return sorted(n for n in names if scope == "all" or module_of(n) is not None)


def check_sweeps(sweeps: dict[str, ScoreDir]) -> None:
    """Refuse sweeps that miss one of the four or disagree on tensor names or shapes, before any threshold pass."""
    missing = sorted(set(SWEEPS) - set(sweeps))
    if missing:
        raise ValueError(f"ReasonAny masks need the score sweeps {sorted(SWEEPS)}; missing {missing}")
    ref = sweeps[DOMAIN]
    for key, other in sweeps.items():
        if other.names() != ref.names() or any(other.shape(n) != ref.shape(n) for n in ref.names()):
            raise ValueError(f"score sweep {key!r} ({other.directory}) has other tensors or shapes than {DOMAIN!r} ({ref.directory})")


def select(score: torch.Tensor, threshold: float, side: Literal["top", "bottom"], granularity: Literal["element", "tensor"]) -> torch.Tensor:
    """{S ≥ τ} (top) or {S ≤ τ} (bottom) per element, or one bool for the whole tensor (any element passes)."""
    passed = score >= threshold if side == "top" else score <= threshold
    return passed.any() if granularity == "tensor" else passed


def tensor_masks(scores: dict[str, torch.Tensor], thresholds: dict[str, float], params: ReasonAnyParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(M_X', M_R') of one tensor from its four scores: disjoint bool masks (0-d for tensor granularity)."""
    g = params.granularity
    m_x = select(scores[DOMAIN], thresholds[DOMAIN], "top", g)
    m_r = select(scores[REASONING], thresholds[REASONING], "bottom", g)
    if params.base_intersect:
        m_x = m_x & select(scores["domain_base"], thresholds["domain_base"], "top", g)
        m_r = m_r & select(scores["reasoning_base"], thresholds["reasoning_base"], "bottom", g)
    return m_x & ~m_r, m_r & ~m_x


def global_thresholds(sweeps: dict[str, ScoreDir], names: Sequence[str], params: ReasonAnyParams) -> dict[str, float]:
    """τ per sweep over the scores of `names`: top-p_domain for the domain sweeps, bottom-p_reasoning for the reasoning ones."""
    count = sum(math.prod(sweeps[DOMAIN].shape(n)) for n in names)
    out = {}
    for key, sweep in sweeps.items():
        stream = sweep.stream(names)
        if key.startswith(DOMAIN):
            out[key] = top_threshold(stream, count, params.p_domain, params.bins, params.max_exact)
        else:
            out[key] = bottom_threshold(stream, count, params.p_reasoning, params.bins, params.max_exact)
    return out


def compute_masks(score_dirs: dict[str, str | Path], params: ReasonAnyParams, out_dir: str | Path) -> Path:
    """Write M_X' (out_dir/domain) and M_R' (out_dir/reasoning) per tensor in scope, one layer's masks in memory at a
    time; the thresholds and mask sizes go in the manifests."""
    sweeps = {key: ScoreDir(path) for key, path in score_dirs.items()}
    check_sweeps(sweeps)
    names = in_scope(sweeps[DOMAIN].names(), params.scope)
    if not names:
        raise ValueError(f"no score tensor is in ReasonAny's scope {params.scope!r}")
    thresholds = global_thresholds(sweeps, names, params)
    meta = {"kind": "reasonany_masks", "params": json_digest(params.model_dump()),
            "scores": json_digest({k: file_digest(Path(p) / MANIFEST) for k, p in sorted(score_dirs.items())}),
            "thresholds": json.dumps(thresholds, sort_keys=True)}
    out_dir = Path(out_dir)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    sizes = {DOMAIN: 0, REASONING: 0}
    for fname, group in file_groups(names).items():
        masks: dict[str, dict[str, torch.Tensor]] = {DOMAIN: {}, REASONING: {}}
        for name in group:
            m_x, m_r = tensor_masks({key: s.get(name) for key, s in sweeps.items()}, thresholds, params)
            masks[DOMAIN][name], masks[REASONING][name] = m_x, m_r
            sizes[DOMAIN] += int(m_x.expand(sweeps[DOMAIN].shape(name)).sum())
            sizes[REASONING] += int(m_r.expand(sweeps[DOMAIN].shape(name)).sum())
        for key, group_masks in masks.items():
            save_tensors(out_dir / key / fname, group_masks, meta)
    for key in sizes:
        write_manifest(out_dir / key, names, meta)
    return write_manifest(out_dir, names, {**meta, "selected": sizes, "params_json": params.model_dump()})


# --- merge (the rules: rain_tasks.methods.reasonany) ----------------------------------------------------------------


def reasonany_method(masks_dir: str | Path, direction: Literal["native", "lrm"]) -> Method:
    """A merge-engine method (params: lam_domain, lam_reasoning) reading the masks that `compute_masks` wrote.

    Native reads θ_B (Δ_R = θ_R − θ_B, Δ_X = the plan's Δ_I) and gives θ_B where no mask is stored; ours gives θ_R there.
    """
    domain, reasoning = TensorDir(Path(masks_dir) / DOMAIN), TensorDir(Path(masks_dir) / REASONING)

    def native(name: str, lrm: Tensor, delta: Tensor, base: Tensor, *, lam_domain: float = 1.0,
               lam_reasoning: float = 1.0) -> Tensor:
        """θ_B + λ_X M_X' ⊙ Δ_I + λ_R M_R' ⊙ (θ_R − θ_B): ReasonAny on the base (θ_B where no mask is stored)."""
        m_x, m_r = domain.get(name), reasoning.get(name)
        if m_x is None:
            return base
        return merge_native(base, delta, lrm - base, m_x > 0, m_r > 0, lam_domain, lam_reasoning)

    def into_lrm(name: str, lrm: Tensor, delta: Tensor, *, lam_domain: float = 1.0, lam_reasoning: float = 1.0) -> Tensor:
        """θ_R + λ_X M_X' ⊙ Δ_I: ITM's skill into the LRM (θ_R where no mask is stored; M_R only excludes, λ_R unused)."""
        m_x = domain.get(name)
        return lrm if m_x is None else merge_into_lrm(lrm, delta, m_x > 0, lam_domain)

    if direction == "native":
        return build_method("reasonany", native, baseline=False, untouched="base")
    return build_method("reasonany", into_lrm, baseline=False)
