"""Build the tiny family (base, ITM, LRM) and its calibration/eval data, deterministically."""

from __future__ import annotations

import contextlib
import copy
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Iterator

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rain_tasks.params import ZooParams
from rain_tasks.zoo.tasks import (Split, base_document, itm_example, lrm_example, split_problems,
                                  write_datasets)
from rain_tasks.zoo.tokenizer import build_tokenizer, save_tokenizer
from rain_tasks.zoo.train import ExampleFn, new_model, train

log = logging.getLogger(__name__)
MODEL_NAMES = ("base", "itm", "lrm")
PHASES: tuple[tuple[str, str | None], ...] = (("base", None), ("lrm", "base"), ("itm", "base"))
DATA_NAMES = ("calibration", "eval")


@contextlib.contextmanager
def deterministic(threads: int) -> Iterator[None]:
    """Fixed thread count and deterministic kernels for the duration of a build."""
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def _staging(final: Path) -> Path:
    """Empty temporary sibling of `final` to build into."""
    tmp = final.parent / f".{final.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(staged: dict[Path, Path]) -> None:
    """Replace each final directory by its staged build (rename, so no half-written result is visible)."""
    for final, tmp in staged.items():
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path,
          params: ZooParams) -> None:
    """Sharded safetensors + config + generation config + tokenizer."""
    model.save_pretrained(directory, max_shard_size=params.max_shard_size)
    save_tokenizer(tokenizer, directory)
    if not (directory / "model.safetensors.index.json").exists():
        raise ValueError(f"max_shard_size={params.max_shard_size} gave a single shard in {directory}")


def flat_parameters(model: PreTrainedModel) -> torch.Tensor:
    """All parameters as one float64 vector (fixed order; tied embeddings once)."""
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def task_vector_geometry(base: PreTrainedModel, itm: PreTrainedModel, lrm: PreTrainedModel) -> dict[str, float]:
    """‖θ_base‖, ‖Δ_ITM‖, ‖Δ_LRM‖ and cos(Δ_ITM, Δ_LRM) over all parameters (float64)."""
    b, i, r = flat_parameters(base), flat_parameters(itm), flat_parameters(lrm)
    d_itm, d_lrm = i - b, r - b
    return {
        "norm_base": b.norm().item(),
        "norm_delta_itm": d_itm.norm().item(),
        "norm_delta_lrm": d_lrm.norm().item(),
        "cosine_delta_itm_lrm": (d_itm @ d_lrm / (d_itm.norm() * d_lrm.norm())).item(),
    }


def _examples(name: str, split: Split, tokenizer: PreTrainedTokenizerBase,
              params: ZooParams) -> ExampleFn:
    """(context, target) maker of one training phase; the fine-tunes use the chat template."""
    def chat_prompt(prompt: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)

    if name == "base":
        return lambda rng: ("", base_document(rng, rng.choice(split.train), params, chat_prompt))
    make_pair = {"lrm": lrm_example, "itm": itm_example}[name]

    def make(rng: random.Random) -> tuple[str, str]:
        prompt, reply = make_pair(rng, rng.choice(split.train), params)
        return chat_prompt(prompt), reply
    return make


def build_zoo(params: ZooParams, models_dir: Path, data_dir: Path) -> dict:
    """Train base -> {LRM, ITM}, write models_dir/{base,itm,lrm} and data_dir/{calibration,eval}."""
    models_dir, data_dir = Path(models_dir), Path(data_dir)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    staged = {**{models_dir / n: _staging(models_dir / n) for n in MODEL_NAMES},
              **{data_dir / n: _staging(data_dir / n) for n in DATA_NAMES}}
    models: dict[str, PreTrainedModel] = {}
    losses: dict[str, float] = {}
    try:
        with deterministic(params.threads):
            tokenizer = build_tokenizer(params)
            split = split_problems(params)
            sizes = write_datasets(split, tokenizer, staged[data_dir / "calibration"],
                                   staged[data_dir / "eval"], params)
            seconds["data"] = time.perf_counter() - clock
            for name, parent in PHASES:
                clock = time.perf_counter()
                model = (new_model(params, tokenizer) if parent is None
                         else copy.deepcopy(models[parent]))
                losses[name] = train(
                    model, tokenizer, _examples(name, split, tokenizer, params),
                    steps=getattr(params, f"{name}_steps"), lr=getattr(params, f"{name}_lr"),
                    params=params, rng=random.Random(f"zoo-{name}-{params.seed}"), name=name,
                    seen_rows_only=parent is not None)
                _save(model, tokenizer, staged[models_dir / name], params)
                models[name] = model
                seconds[name] = time.perf_counter() - clock
    except BaseException:
        for tmp in staged.values():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(staged)
    summary = {"sizes": sizes, "train_problems": len(split.train), "final_loss": losses,
               "num_parameters": sum(p.numel() for p in models["base"].parameters()),
               **task_vector_geometry(models["base"], models["itm"], models["lrm"]), "seconds": seconds}
    log.info("zoo built: %s", summary)
    return summary
