"""One training step of stage 1 / stage 2 against a bare forward + backward + AdamW step.

    python bench/bench_train_step.py [--quick]

Same random Llama, same tokens (8 rollouts of 64 prompt + 192 response tokens, vocab 32768):
  bare        model(ids, mask).logits -> cross-entropy on the response positions -> backward -> AdamW
  stage1      common.train_epoch, one global batch: pack, log-probs (logits_to_keep), SAPO, clip, AdamW
  stage1-chunk  the same with --chunked-lm-head (no [B, T, V] logits)
  stage2      common.train_epoch with stage 2's loss: log pi_0 and delta are CPU tensors, no teacher model
Targets (issue 4): stage-1 step time <= 1.15x bare; stage-2 peak memory <= 1.1x bare.
Each case runs in its own process; memory is the peak added on top of the model and data (measure.py).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from measure import measure, run_case  # noqa: E402


def case(kind: str, quick: bool):
    import common
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(2)
    hidden, layers = (128, 2) if quick else (256, 4)
    config = LlamaConfig(vocab_size=32768, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, pad_token_id=0)
    model = LlamaForCausalLM(config)
    model.erpd_autocast = None
    prompt_len, response_len = (32, 96) if quick else (64, 192)
    rollouts = [{"prompt_ids": torch.randint(3, 32768, (prompt_len,)).tolist(),
                 "response_ids": torch.randint(3, 32768, (response_len,)).tolist(), "advantage": (-1.0) ** i}
                for i in range(8)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ctx = common.Context(0, 0, 1, torch.device("cpu"))
    base_logp = [torch.randn(response_len) - 3 for _ in rollouts]
    delta = [torch.randn(response_len) for _ in rollouts]
    packed = common.pack_rollouts(rollouts, 0, "cpu")
    ids, mask = packed["input_ids"], packed["attention_mask"]

    def bare():
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, prompt_len - 1:-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), packed["labels"].reshape(-1))
        loss.backward()
        optimizer.step()

    def stage1_loss(indices, batch, logp, counts):
        old = common.pad_rows([base_logp[i] for i in indices], "cpu")
        adv = torch.tensor([rollouts[i]["advantage"] for i in indices])[:, None]
        return (common.sapo_loss(logp, old, adv) * batch["mask"]).sum() / counts["tokens"], {}

    def stage2_loss(indices, batch, logp, counts):
        old = common.pad_rows([base_logp[i] for i in indices], "cpu")
        adv = common.distill_token_advantages(common.pad_rows([delta[i] for i in indices], "cpu"))
        per_token, _ = common.ppo_clip_loss(logp, old, adv, 0.2, 0.2)
        return (per_token * batch["mask"]).sum() / counts["tokens"], {}

    def ours(loss_fn, chunked=False):
        return lambda: common.train_epoch(model, optimizer, rollouts, loss_fn, epoch=0, ctx=ctx, pad_id=0,
                                          temperature=1.0, batch_size=8, micro_batch=8, seed=0, max_grad_norm=1e9,
                                          chunked_lm_head=chunked)

    run = {"bare": bare, "stage1": ours(stage1_loss), "stage1-chunk": ours(stage1_loss, True),
           "stage2": ours(stage2_loss)}[kind]
    print(json.dumps(measure(run)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--case", default=None)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.case:
        return case(args.case, args.quick)
    extra = ["--quick"] if args.quick else []
    results = {k: run_case(__file__, k, *extra) for k in ("bare", "stage1", "stage1-chunk", "stage2")}
    bare = results["bare"]
    print(f"{'step':13} {'time s':>7} {'x bare':>7} {'peak MB':>8} {'x bare':>7}")
    for name, r in results.items():
        print(f"{name:13} {r['time_s']:7.2f} {r['time_s'] / bare['time_s']:7.2f} {r['extra_mb']:8.0f} "
              f"{r['extra_mb'] / bare['extra_mb']:7.2f}")


if __name__ == "__main__":
    main()
