"""The published RAIN-Merging calibration sets render with a Qwen-style template: Ω and spans are located.

Uses the tiny family's byte-level Qwen2 BPE tokenizer, which encodes any text, so the real
lengths of the published samples (about 1.5k reasoning tokens, up to ~10k per instruction
sample) are exercised offline.
"""

from __future__ import annotations

from collections import Counter

import pytest

from rain_tasks.stage2.attention import map_sample_spans
from rain_tasks.model.calibration import render_sample, think_positions
from rain_tasks.io.schemas import load_records
from rain_tasks.params import ZooParams
from rain_tasks.zoo.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(ZooParams(max_operand=11))


def test_published_reasoning_set_renders_and_omega_is_located(published, tokenizer):
    rows = load_records(published / "reasoning_calibration_set.json", "reasoning")
    for row in rows:
        r = render_sample(tokenizer, row["prompt"], row["reasoning"], row["response"])
        omega = think_positions(r, 5)
        assert r.text[slice(*r.offsets[r.think_open])] == "<think>"
        assert r.text[slice(*r.offsets[r.think_close])] == "</think>"
        assert len(omega) == 12 and omega[0] == r.think_open and omega[-1] == r.think_close
        assert r.think_open < r.think_close < len(r)


def test_published_instruction_set_maps_its_spans(published, tokenizer):
    rows = load_records(published / "instruction_calibration_set.jsonl", "instruction")
    unmapped, usable = Counter(), 0
    for row in rows:
        r = render_sample(tokenizer, row["prompt"], row["reason"], row["response"])
        spans = map_sample_spans(r, row)
        unmapped.update(spans.unmapped)
        usable += bool(spans.pairs)
        # a sample without a usable instruction is one whose instructions constrain no response span
        has_r = any(e["response_spans"] for e in row["related_prompt_list"])
        assert bool(spans.pairs) == has_r, row["id"]
        for i_k, r_k in spans.pairs:
            assert max(i_k) < r.think_open < r.think_close < min(r_k)  # instruction in the prompt, R after </think>
    print(f"published instruction set: {usable}/{len(rows)} samples usable, unmapped spans {dict(unmapped)}")
    assert sum(unmapped.values()) == 0 and usable >= 0.9 * len(rows)
