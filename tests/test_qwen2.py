"""The README recipe's architecture (Qwen2: tied head, q/k/v biases) through every model path, on a
small random Qwen2ForCausalLM built here with the tiny tokenizer: the response-logits slice, the chunked
LM head, and FSDP on 2 gloo processes against 1 plain process."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import common
import erpd_stage1
from runs import PARITY_OPTIMIZER, PARITY_TOL, assert_same_steps, launch, max_weight_diff, run_ok

TINY = Path(common.DEFAULT_MODEL)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """A random 2-layer Qwen2 with the tiny tokenizer, and a D sampled from it whose rewards are set by hand
    (a random model's answers are never right): mixed within every group, so every step has signal."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path_factory.mktemp("qwen2")
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json", "erpd.json"):
        shutil.copy(TINY / name, folder / name)
    model, tokenizer = common.load_model(str(folder))
    problems = [{"prompt": f"{i}+0", "answer": str(i), "index": i} for i in range(12)]
    prompt = common.prompt_format(tokenizer, default=common.recorded_prompt_format(str(folder)))
    problems = common.encode_problems(tokenizer, problems, 64, "qwen2", prompt)
    ctx = common.Context(0, 0, 1, torch.device("cpu"))
    rollouts = common.sample_and_score(model, tokenizer, problems, 8, ctx=ctx, seed=0, max_new_tokens=16,
                                       temperature=1.0)
    for r in rollouts:
        r["reward"] = float(r["sample_index"] % 3 == 0)
    erpd_stage1.write_rollouts(folder / "d" / "rollouts", rollouts, {p["index"]: p for p in problems}, {
        **common.fingerprints(model, tokenizer), "samples_per_prompt": 8, "num_rows": len(rollouts),
        "prompt_format": prompt, "temperature": 1.0, "top_p": 1.0, "data": "synthetic", "model": str(folder)})
    return folder


def test_qwen2_logits_paths(qwen2):
    model, tokenizer = common.load_model(str(qwen2))
    assert type(model).__name__ == "Qwen2ForCausalLM" and common.chunked_lm_head_ok(model)
    rollouts = [{"prompt_ids": list(range(5, 9 + i)), "response_ids": list(range(10, 14 + 2 * i))} for i in range(3)]
    batch = common.pack_rollouts(rollouts, tokenizer.pad_token_id, "cpu")
    width = batch["labels"].shape[1]
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch["position_ids"]).logits
    torch.testing.assert_close(common.response_logits(model, batch), full[:, -width - 1:-1], rtol=0, atol=1e-5)
    torch.testing.assert_close(common.response_logprobs(model, batch, 0.9, chunked_lm_head=True),
                               common.response_logprobs(model, batch, 0.9), rtol=0, atol=1e-5)


def test_qwen2_fsdp_two_processes_match_one(qwen2, tmp_path):
    args = ["--model", qwen2, "--rollouts", qwen2 / "d", "--epochs", "2", "--teacher-loss", "ppo", "--batch-size", "40",
            "--micro-batch", "8", "--eval-every", "0", "--kl-rollouts", "8", *PARITY_OPTIMIZER]
    run_ok("erpd_stage1.py", *args, "--out", tmp_path / "plain")
    launch("erpd_stage1.py", *args, "--fsdp", "--out", tmp_path / "fsdp", nproc=2)
    assert_same_steps(tmp_path / "plain", tmp_path / "fsdp")
    assert max_weight_diff(tmp_path / "plain" / "teacher", tmp_path / "fsdp" / "teacher") <= PARITY_TOL
    assert max_weight_diff(tmp_path / "plain" / "teacher", qwen2) > 1e-2  # it trained
    config = json.loads((tmp_path / "fsdp" / "teacher" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["tie_word_embeddings"]


FSDP_LOAD = '''
import sys
import torch, transformers
sys.path.insert(0, {root!r})
import common
import erpd_stage1


def main():
    load_model = common.load_model

    def load_with_alias(*args, weights=True, **kwargs):  # the meta model as transformers 4.x builds it:
        model, tokenizer = load_model(*args, weights=weights, **kwargs)  # original_inv_freq = inv_freq
        if not weights:
            vars(model.model.rotary_emb)["legacy_alias"] = model.model.rotary_emb.inv_freq  # not a buffer
        return model, tokenizer
    common.load_model = load_with_alias
    ctx = common.init_distributed()
    if ctx.rank != 0:  # under --fsdp only rank 0 may read the weights
        def refuse(*args, **kwargs):
            raise AssertionError(f"rank {{ctx.rank}} read the weights")
        transformers.AutoModelForCausalLM.from_pretrained = refuse
    args = erpd_stage1.parse_args(["--model", {model!r}, "--fsdp", "--fsdp-shard-size", "{shard_size}"])
    model, _ = common.load_policy(args, ctx)
    embedding = model.get_input_embeddings().weight
    assert embedding.to_local().numel() < embedding.numel()  # each rank holds a shard
    assert embedding.device_mesh.ndim == (2 if {shard_size} else 1)  # HSDP: replicate x shard
    assert model.get_output_embeddings().weight is embedding  # still tied
    rotary = model.model.rotary_emb
    assert rotary.legacy_alias is rotary.inv_freq and not rotary.inv_freq.is_meta  # the alias followed its buffer
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with common.full_weights(model):
        logits = model(input_ids=ids).logits
    plain, _ = common.load_model({model!r}) if ctx.rank == 0 else (None, None)
    if plain is not None:  # the same weights and rotary buffers as a plain load: the same logits, bit for bit
        assert torch.equal(plain(input_ids=ids).logits, logits), (plain(input_ids=ids).logits - logits).abs().max()


common.run_main(main)
'''


@pytest.mark.parametrize("nproc,shard_size", [(2, 0), (4, 2)])
def test_fsdp_load_reads_weights_on_rank_0_only(qwen2, tmp_path, nproc, shard_size):
    script = tmp_path / "fsdp_load.py"
    script.write_text(FSDP_LOAD.format(root=str(common.ROOT), model=str(qwen2), shard_size=shard_size))
    launch(script, nproc=nproc)


def test_fsdp_refuses_a_model_with_a_plain_tensor_attribute(qwen2, monkeypatch):
    """A tensor outside the parameters and buffers (not an alias of a buffer) cannot be filled by the
    meta-device load: refused in one line, before any weights are read or a process group is made."""
    from transformers.models.qwen2 import modeling_qwen2

    rotary_init = modeling_qwen2.Qwen2RotaryEmbedding.__init__

    def init_with_cache(self, *args, **kwargs):
        rotary_init(self, *args, **kwargs)
        self.cos_cache = torch.zeros(4)
    monkeypatch.setattr(modeling_qwen2.Qwen2RotaryEmbedding, "__init__", init_with_cache)
    args = erpd_stage1.parse_args(["--model", str(qwen2), "--fsdp"])
    with pytest.raises(common.InputError, match="Qwen2RotaryEmbedding.cos_cache is a tensor outside the parameters"):
        common.load_policy(args, common.Context(0, 0, 1, torch.device("cpu")))
    assert not torch.distributed.is_initialized()
