"""The real-model path on SmolLM2-135M-Instruct: chat template, BPE tokenizer, pad == EOS, all three scripts."""

import json
from pathlib import Path

import pytest
import torch

from common import (
    DEFAULT_INSTRUCTION, encode_problems, encode_prompt, load_model, load_problems, pack_rollouts, prompt_format,
    recorded_prompt_format, response_logprobs, sample_responses)
from smollm2 import smollm2_folder, smollm2_truncated_folder
from runs import launch, run_ok

DATA = Path(__file__).parent / "data" / "gsm8k_style.jsonl"


@pytest.fixture(scope="module")
def smol():
    folder = smollm2_folder()
    model, tokenizer = load_model(str(folder))
    return folder, model, tokenizer


def test_prompt_is_chat_templated_and_eos_ends_the_response(smol):
    folder, model, tokenizer = smol
    problem = load_problems(str(DATA))[0]
    prompt = prompt_format(tokenizer, default=recorded_prompt_format(str(folder)))  # a hub model records none
    assert prompt["instruction"] == DEFAULT_INSTRUCTION
    ids = encode_problems(tokenizer, [problem], 1024, str(DATA), prompt)[0]["prompt_ids"]
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    # the instruction that asks for a boxed final answer is in the user's turn the model sees
    assert "<|im_start|>user\n" + problem["prompt"] + "\n" + DEFAULT_INSTRUCTION + "<|im_end|>" in text
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the pad == EOS case, for real
    ids = encode_prompt(tokenizer, "What is the capital of France?")  # a short answer (8 tokens), then EOS
    [resp] = sample_responses(model, [ids], max_new_tokens=16, temperature=0.0, top_p=1.0,
                              stop_ids=[tokenizer.eos_token_id], pad_id=tokenizer.pad_token_id,
                              generator=torch.Generator().manual_seed(0))
    assert not resp["truncated"] and resp["response_ids"][-1] == tokenizer.eos_token_id
    packed = pack_rollouts([{"prompt_ids": ids, "response_ids": resp["response_ids"]},
                            {"prompt_ids": ids[:5], "response_ids": resp["response_ids"][:3]}],
                           tokenizer.pad_token_id, "cpu")
    assert packed["mask"][0].sum() == len(resp["response_ids"])  # EOS is a response token
    logp = response_logprobs(model, packed, 1.0)
    assert logp[0, len(resp["response_ids"]) - 1] < 0 and logp[1, 3:].eq(0).all()


def test_batched_greedy_equals_one_at_a_time(smol):
    _, model, tokenizer = smol
    prompts = [encode_prompt(tokenizer, p["prompt"]) for p in load_problems(str(DATA))[:4]]
    assert len({len(p) for p in prompts}) > 1

    def greedy(batch):
        return sample_responses(model, batch, max_new_tokens=16, temperature=0.0, top_p=1.0,
                                stop_ids=[tokenizer.eos_token_id], pad_id=tokenizer.pad_token_id,
                                generator=torch.Generator().manual_seed(0))

    assert greedy(prompts) == [greedy([p])[0] for p in prompts]


@pytest.mark.slow
def test_three_scripts_end_to_end_on_smollm2(tmp_path):
    """Stage 1, stage 2 and evaluation on SmolLM2's real BPE tokenizer, chat template, pad == EOS and tied
    head, with its first 2 of 30 decoder layers (the tests above run the whole model)."""
    folder = smollm2_truncated_folder(2)
    common_args = ["--model", folder, "--max-new-tokens", "24", "--micro-batch", "4", "--kl-rollouts", "4",
                   "--eval-every", "0", "--lr", "1e-5"]
    launch("erpd_stage1.py", *common_args, "--data", DATA, "--num-prompts", "2", "--samples-per-prompt", "2",
        "--epochs", "1", "--batch-size", "4", "--teacher-loss", "ce", "--out", tmp_path / "s1")
    manifest = json.loads((tmp_path / "s1" / "shards" / "manifest.json").read_text())
    assert manifest["num_rows"] == 4
    run_ok("erpd_stage2.py", *common_args, "--teacher", tmp_path / "s1", "--epochs", "1", "--batch-size", "4",
        "--out", tmp_path / "s2")
    run_ok("eval_math.py", "--model", f"student={tmp_path / 's2' / 'student'}", "--ref", folder, "--data", DATA,
        "--num-prompts", "2", "--samples", "2", "--max-new-tokens", "24", "--json", tmp_path / "eval.json")
    metrics = json.loads((tmp_path / "eval.json").read_text())["models"]["student"]
    assert 0 <= metrics["accuracy"] <= 1 and metrics["token_kl_to_ref"] >= 0 and metrics["mean_length"] > 0
