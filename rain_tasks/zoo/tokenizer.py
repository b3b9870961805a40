"""Word-level tokenizer of the tiny family with a Qwen-style chat template."""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rain_tasks.zoo.tasks import EOS, THINK_CLOSE, THINK_OPEN, vocabulary

PAD, UNK, IM_START, IM_END = "<pad>", "<unk>", "<|im_start|>", "<|im_end|>"
SPECIALS: tuple[str, ...] = (PAD, UNK, EOS, IM_START, IM_END, THINK_OPEN, THINK_CLOSE)

# Qwen-style: `<|im_start|>role\ncontent<|im_end|>\n`; the template never writes <think>.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer(max_operand: int) -> PreTrainedTokenizerFast:
    """WordLevel + WhitespaceSplit tokenizer; specials are matched before splitting so offsets are exact."""
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *vocabulary(max_operand)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # <think>/</think> are not "special": they must stay visible when decoding generations.
    core.add_special_tokens([AddedToken(t, normalized=False) for t in (PAD, UNK, EOS, IM_START, IM_END)])
    core.add_tokens([AddedToken(t, normalized=False, special=False) for t in (THINK_OPEN, THINK_CLOSE)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD, unk_token=UNK, eos_token=IM_END, bos_token=None,
        padding_side="left", clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE, model_max_length=4096,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    """Save next to a checkpoint so that AutoTokenizer reloads exactly this fast tokenizer."""
    tokenizer.save_pretrained(directory)
