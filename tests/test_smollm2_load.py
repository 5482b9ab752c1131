"""The offline SmolLM2-135M-Instruct test model loads, chats and generates greedily."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2 import smollm2_folder  # noqa: E402  (sets HF_HUB_OFFLINE before transformers loads)

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

QUESTION = "What is 12 + 7? Answer with the number."
PROMPTS = [
    "What is 3 * 4?",
    "A train travels 60 km in 1.5 hours. What is its average speed in km per hour? Show the steps.",
]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    folder = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model, tok


def _chat(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)


def test_folder_is_plain_hf_checkpoint():
    folder = smollm2_folder()
    assert smollm2_folder() == folder  # cached
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    assert not list(folder.glob("*.gguf"))


def test_chat_template_and_special_tokens(model_and_tokenizer):
    model, tok = model_and_tokenizer
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>"
    assert tok.eos_token_id == model.config.eos_token_id
    assert getattr(model.config, "quantization_config", None) is None
    assert next(model.parameters()).dtype == torch.float32


def test_greedy_generation(model_and_tokenizer):
    model, tok = model_and_tokenizer
    text = _chat(tok, QUESTION)
    assert text.endswith("<|im_start|>assistant\n")
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = model(**enc).logits
        out = model.generate(**enc, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.isfinite(logits).all()
    new = out[0, enc["input_ids"].shape[1] :]
    assert 0 < new.numel() <= 20
    answer = tok.decode(new, skip_special_tokens=True)
    assert answer.strip(), f"empty answer: {tok.decode(new)!r}"


def test_left_padded_batch_matches_one_at_a_time(model_and_tokenizer):
    model, tok = model_and_tokenizer
    tok.padding_side = "left"
    texts = [_chat(tok, p) for p in PROMPTS]
    gen = dict(max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)

    singles = []
    for text in texts:
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, **gen)
        singles.append(out[0, enc["input_ids"].shape[1] :].tolist())

    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    lengths = enc["attention_mask"].sum(1).tolist()
    assert lengths[0] != lengths[1]
    assert (enc["attention_mask"][:, -1] == 1).all()  # left padded
    with torch.no_grad():
        out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **gen)
    width = enc["input_ids"].shape[1]
    for row, single in zip(out, singles):
        batched = row[width:].tolist()
        # The shorter continuation (if it hit eos) is padded on the right with pad == eos.
        assert batched[: len(single)] == single
        assert all(t == tok.pad_token_id for t in batched[len(single) :])
