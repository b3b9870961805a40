"""Calibration texts rendered as the LRM sees them, and the token positions RAIN reads from them.

A sample becomes `chat_template([user: prompt], add_generation_prompt=True)` + (`<think>\\n`
unless the template already ends with it) + reasoning + `\\n</think>\\n\\n` + response,
tokenized once with offsets and no extra special tokens. Positions are located through
character offsets, so there is no off-by-one from BOS or template tokens.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from pathlib import Path

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class Rendered:
    """One rendered calibration text with its tokens and the landmarks RAIN needs."""

    text: str
    input_ids: list[int]
    offsets: list[tuple[int, int]]
    prompt_chars: tuple[int, int]  # the user prompt inside `text`
    response_chars: tuple[int, int]  # the final answer inside `text`
    think_open: int  # token index of <think>
    think_close: int  # token index of </think>

    def __len__(self) -> int:
        return len(self.input_ids)


def think_token_ids(tokenizer) -> tuple[int, int]:
    """Ids of `<think>` and `</think>`; refuse a tokenizer that does not have them as single tokens."""
    ids = []
    for tok in (THINK_OPEN, THINK_CLOSE):
        enc = tokenizer.encode(tok, add_special_tokens=False)
        if len(enc) != 1 or enc[0] == tokenizer.unk_token_id:
            raise ValueError(
                f"tokenizer has no single token for {tok!r} (encodes as {enc}); RAIN-Merging needs a reasoning "
                "model's tokenizer with <think> and </think> as special tokens"
            )
        ids.append(enc[0])
    return ids[0], ids[1]


def _token_at(offsets: list[tuple[int, int]], char: int, what: str) -> int:
    for i, (s, e) in enumerate(offsets):
        if s == char and e > s:
            return i
    raise ValueError(f"no token starts at the {what} tag (char {char}); the tokenizer split it")


def render_sample(tokenizer, prompt: str, reasoning: str, response: str) -> Rendered:
    """Render and tokenize one sample as the LRM would see it (see module docstring)."""
    open_id, close_id = think_token_ids(tokenizer)
    head = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    prompt_start = head.rfind(prompt)
    if prompt_start < 0:
        raise ValueError("the chat template does not contain the prompt verbatim; cannot locate instruction spans")
    stripped = head.rstrip()
    if stripped.endswith(THINK_OPEN):
        open_char = len(stripped) - len(THINK_OPEN)
        text = head if head.endswith("\n") else head + "\n"
    else:
        open_char = len(head)
        text = head + THINK_OPEN + "\n"
    text += reasoning
    close_char = len(text) + 1
    text += "\n" + THINK_CLOSE + "\n\n"
    response_start = len(text)
    text += response
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    t_open, t_close = _token_at(offsets, open_char, THINK_OPEN), _token_at(offsets, close_char, THINK_CLOSE)
    if ids[t_open] != open_id or ids[t_close] != close_id:
        raise ValueError("think tags did not tokenize to the <think>/</think> special tokens")
    return Rendered(
        text=text,
        input_ids=ids,
        offsets=offsets,
        prompt_chars=(prompt_start, prompt_start + len(prompt)),
        response_chars=(response_start, len(text)),
        think_open=t_open,
        think_close=t_close,
    )


def think_positions(r: Rendered, radius: int) -> list[int]:
    """Ω_think: `<think>`, `</think>` and up to `radius` reasoning tokens after / before each."""
    inner = range(r.think_open + 1, r.think_close)
    after = [p for p in range(r.think_open + 1, r.think_open + 1 + radius) if p in inner]
    before = [p for p in range(r.think_close - radius, r.think_close) if p in inner]
    return sorted({r.think_open, r.think_close, *after, *before})


def span_positions(r: Rendered, span: str, region: str) -> list[int]:
    """Token indices covering every occurrence of `span` inside the prompt or response region.

    Returns [] when the span does not occur there (callers count it as unmapped).
    """
    lo, hi = r.prompt_chars if region == "prompt" else r.response_chars
    if not span:
        return []
    ends = [b for _, b in r.offsets]  # non-decreasing: tokens come in text order
    positions: set[int] = set()
    for m in re.finditer(re.escape(span), r.text[lo:hi]):
        s, e = lo + m.start(), lo + m.end()
        i = bisect.bisect_right(ends, s)  # first token ending after the span starts
        while i < len(r.offsets) and r.offsets[i][0] < e:
            if r.offsets[i][1] > r.offsets[i][0]:
                positions.add(i)
            i += 1
    return sorted(positions)


def load_tokenizer(model_dir: str | Path):
    """A checkpoint's tokenizer, offline, with its `tokenizer.json` as the source of truth.

    transformers 5 forces model_type qwen2 onto Qwen2Tokenizer, which rebuilds a byte-level BPE
    from the vocabulary and so mangles any other tokenizer.json (the tiny family's word-level
    one); loading tokenizer.json as it is gives the exact tokenizer for real and tiny models.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (Path(model_dir) / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(model_dir), local_files_only=True)
    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
