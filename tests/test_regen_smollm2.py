"""The real SmolLM2-135M-Instruct: batched, left-padded decoding stops each reply at <|im_end|>
(eos id 2, left out of the text) and matches transformers' own greedy ``generate``."""

from __future__ import annotations

import pytest
import torch

from spec_core.data.generators import LENGTH, STOP, HFGenerator, SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTIONS = [
    "What is the capital of France?",
    "hi",
    "Write one short sentence about cats.",
    "Tell me a long story about a dragon who learns to cook.",
]


@pytest.mark.slow
def test_smollm2_batched_replies_stop_at_end_of_turn(smollm2_dir, smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompts = [
        tok(
            tok.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
            ),
            add_special_tokens=False,
        )["input_ids"]
        for q in QUESTIONS
    ]
    gen = HFGenerator(smollm2_dir, tok, [2], batch_size=len(prompts))
    params = SamplingParams(max_new_tokens=32)
    outs = gen.generate(prompts, params, 0)
    assert outs[0].text == "The capital of France is Paris."
    assert outs[0].finish_reason == STOP
    assert outs[-1].finish_reason == LENGTH and outs[-1].num_tokens == 32  # a long story
    for prompt, out in zip(prompts, outs, strict=True):
        assert "<|im_end|>" not in out.text
        with torch.inference_mode():
            ref = gen.model.generate(
                input_ids=torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=32,
                do_sample=False,
            )[0, len(prompt) :].tolist()
        assert out.num_tokens == len(ref)
        assert (out.finish_reason == STOP) == (ref[-1] == 2)
        body = ref[:-1] if ref[-1] == 2 else ref
        assert out.text == tok.decode(body, skip_special_tokens=False)
