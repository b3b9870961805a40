"""Model construction and the (deterministic) training loop of the tiny family."""

from __future__ import annotations

import logging
import math
import random
from typing import Callable

import torch
from tqdm import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from rain_tasks.params import ZooParams
from rain_tasks.zoo.tasks import EOS, IM_END

log = logging.getLogger(__name__)

# An example is (context, target): the loss covers only the target's tokens.
ExampleFn = Callable[[random.Random], tuple[str, str]]


def new_model(params: ZooParams, tokenizer: PreTrainedTokenizerBase) -> Qwen2ForCausalLM:
    """A freshly initialised Qwen2 (tied embeddings, eager attention), seeded by params.seed."""
    stop_ids = tokenizer.convert_tokens_to_ids([IM_END, EOS])
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=params.hidden_size,
        intermediate_size=params.intermediate_size,
        num_hidden_layers=params.num_layers,
        num_attention_heads=params.num_heads,
        num_key_value_heads=params.num_kv_heads,
        max_position_embeddings=params.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=stop_ids,
        dtype=params.dtype,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(params.seed)
    model = Qwen2ForCausalLM(config).to(getattr(torch, params.dtype))
    model.generation_config = GenerationConfig(
        do_sample=False, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    return model


def _batch(tokenizer: PreTrainedTokenizerBase, examples: list[tuple[str, str]]
           ) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 outside each example's target)."""
    texts = [context + target for context, target in examples]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    width = max(len(ids) for ids in enc["input_ids"])
    input_ids = torch.full((len(texts), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(texts), width), dtype=torch.long)
    labels = torch.full((len(texts), width), -100, dtype=torch.long)
    for row, ((context, _), ids, offsets) in enumerate(
            zip(examples, enc["input_ids"], enc["offset_mapping"])):
        n = len(ids)
        input_ids[row, :n] = torch.tensor(ids)
        attention[row, :n] = 1
        target = torch.tensor([start >= len(context) for start, _ in offsets])
        labels[row, :n] = torch.where(target, torch.tensor(ids), torch.tensor(-100))
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def _schedule(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero (multiplier of the peak lr)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _keep_rows(weight: torch.nn.Parameter, input_ids: torch.Tensor) -> None:
    """Zero the gradient of every embedding row whose token is not in `input_ids`."""
    unseen = torch.ones(weight.shape[0], dtype=torch.bool)
    unseen[input_ids.unique()] = False
    weight.grad[unseen] = 0.0


def train(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase, example: ExampleFn,
          *, steps: int, lr: float, params: ZooParams, rng: random.Random, name: str,
          seen_rows_only: bool = False) -> float:
    """Train in place with AdamW on freshly sampled batches; returns the mean loss of the last 10 %.

    `seen_rows_only` (the fine-tunes): each step updates only the (tied) embedding rows of tokens in the batch.
    Otherwise the softmax's tiny gradient on the hundreds of tokens a fine-tune never writes (bytes, BPE
    fragments) moves each of their rows a full Adam step per update, the same way in both fine-tunes: that
    shared drift dominated both task vectors (cos 0.7, ‖Δ‖ 2–3× the transformer's) and blocked transfer.
    """
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98),
                                  weight_decay=params.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _schedule(s, steps, min(params.warmup_steps, steps)))
    tail: list[float] = []
    bar = tqdm(range(steps), desc=f"zoo {name}", leave=False, mininterval=2.0)
    for step in bar:
        batch = _batch(tokenizer, [example(rng) for _ in range(params.batch_size)])
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if seen_rows_only:
            _keep_rows(model.get_input_embeddings().weight, batch["input_ids"])
        torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
        optimizer.step()
        scheduler.step()
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    final = sum(tail) / len(tail) if tail else float("nan")
    log.info("zoo %s: %d steps, final loss %.4f", name, steps, final)
    return final
