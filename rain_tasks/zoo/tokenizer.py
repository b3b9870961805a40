"""Tokenizer of the tiny family: a small Qwen2 byte-level BPE with a Qwen-style chat template.

A checkpoint with model_type qwen2 always reloads its tokenizer through AutoTokenizer as
`Qwen2Tokenizer`, which rebuilds the backend from vocab + merges with Qwen2's fixed
pre-tokenizer (regex split + byte level). So the family's tokenizer IS a Qwen2Tokenizer:
its vocabulary holds every byte plus every word of the family as one token (" plus" ->
"Ġplus"; digits are single tokens, as in Qwen2), and reload gives identical ids and offsets.
Offsets are exact character spans of the rendered text; a word token's span includes the
space in front of it, as with real Qwen tokenizers.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, pre_tokenizers
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

from rain_tasks.params import ZooParams
from rain_tasks.model.calibration import THINK_CLOSE, THINK_OPEN
from rain_tasks.zoo.tasks import EOS, IM_END, line_start_words, vocabulary

PAD, UNK, IM_START = "<pad>", "<unk>", "<|im_start|>"
SPECIALS: tuple[str, ...] = (EOS, PAD, UNK, IM_START, IM_END, THINK_OPEN, THINK_CLOSE)
ROLES: tuple[str, ...] = ("system", "user", "assistant")

# Qwen-style: `<|im_start|>role\ncontent<|im_end|>\n`; the template never writes <think>.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_PRE_TOKENIZER = pre_tokenizers.Sequence([
    pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
])


def _pieces(params: ZooParams) -> dict[str, str]:
    """Every pre-token (byte-level form -> text) of the family's words in the contexts they occur in."""
    contexts = [context for word in vocabulary(params)
                for context in (f" {word}", f" {word}\n", f" {word}\n\n")]
    contexts += [f"{word}\n" for word in (*ROLES, *line_start_words(params))]
    pieces: dict[str, str] = {}
    for context in contexts:
        for piece, (start, end) in _PRE_TOKENIZER.pre_tokenize_str(context):
            pieces.setdefault(piece, context[start:end])
    return pieces


def _vocab_and_merges(params: ZooParams) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Bytes + one token per piece, built by left-to-right merges.

    Space-led pieces rank first (their merges never collide: every left side starts with Ġ);
    among the others longer pieces rank first, so a shorter piece's first merge cannot cut
    a longer piece apart.
    """
    pieces = sorted(_pieces(params),
                    key=lambda p: (not p.startswith("Ġ"), -len(p), p))
    tokens = [*SPECIALS, *sorted(pre_tokenizers.ByteLevel.alphabet())]
    merges: list[tuple[str, str]] = []
    for piece in pieces:
        for end in range(2, len(piece) + 1):
            merge = (piece[: end - 1], piece[end - 1])
            if merge not in merges:
                merges.append(merge)
                tokens.append(piece[:end])
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}, merges


def build_tokenizer(params: ZooParams) -> Qwen2Tokenizer:
    """The family's tokenizer (numbers and words of `params`' family); raises if some family word would not be one token."""
    vocab, merges = _vocab_and_merges(params)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=UNK, eos_token=IM_END, pad_token=PAD,
        padding_side="left", clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE, model_max_length=4096,
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in (EOS, IM_START)],
                         special_tokens=True)
    # <think>/</think> stay non-special so that decoding generations keeps them visible.
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK_OPEN, THINK_CLOSE)])
    for piece, text in _pieces(params).items():
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) != 1:
            raise ValueError(f"family piece {piece!r} is not a single token")
    return tokenizer


def save_tokenizer(tokenizer: Qwen2Tokenizer, directory: Path) -> None:
    """Save next to a checkpoint (tokenizer.json, tokenizer_config.json, chat_template.jinja)."""
    tokenizer.save_pretrained(directory)
