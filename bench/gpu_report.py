"""The real-model numbers the README's GPU recipe needs: sampling and training tokens per second and peak
GPU memory, for one model under bf16 autocast. Run it on a GPU machine and copy its last line to the README.

    python bench/gpu_report.py --model Qwen/Qwen2.5-Math-1.5B-Instruct          # hub id or local folder
    python bench/gpu_report.py --model "$(python -c 'import sys; sys.path.insert(0, "tests"); \\
        from smollm2 import smollm2_folder; print(smollm2_folder())')"          # the offline test model
    python bench/gpu_report.py --device cpu --prompts 4 --samples 2 --max-new-tokens 16   # a CPU smoke run

What it times, with the code the stages run (common.sample_and_score, common.train_epoch):
  sampling   --prompts problems x --samples samples, --max-new-tokens each, temperature 1, through the
             model's chat template: generated tokens / s (EOS included; finished rows stop counting)
  training   one epoch of stage 1's SAPO loss over those rollouts (global batch = all of them,
             --micro-batch per forward), float32 weights + AdamW: (prompt + response) tokens / s
  memory     torch.cuda.max_memory_allocated over each phase (CUDA only)
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import common  # noqa: E402
import erpd_stage1  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "gsm8k_style.jsonl"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=common.DEFAULT_MODEL)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--autocast", default="bfloat16", choices=["bfloat16", "none"])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--sample-batch-size", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--gradient-checkpointing", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:  # the memory counters and synchronize() below act on the current device
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    autocast = None if args.autocast == "none" or not cuda else args.autocast
    model, tokenizer = common.load_model(args.model, device=device, autocast=autocast,
                                         gradient_checkpointing=args.gradient_checkpointing)
    ctx = common.Context(0, 0, 1, device)
    problems = common.load_problems(args.data, num=args.prompts, seed=0)
    problems = common.encode_problems(tokenizer, problems, 1024, args.data,
                                      common.prompt_format(tokenizer, default=common.recorded_prompt_format(args.model)))

    # warm-up (kernel selection, cuBLAS and allocator set-up) outside the timed phases
    common.sample_and_score(model, tokenizer, problems[:2], 2, ctx=ctx, seed=1, max_new_tokens=8, temperature=1.0)

    def phase(fn):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30 if cuda else None

    rollouts, sample_s, sample_gb = phase(lambda: common.sample_and_score(
        model, tokenizer, problems, args.samples, ctx=ctx, seed=0, max_new_tokens=args.max_new_tokens,
        temperature=1.0, batch_size=args.sample_batch_size))
    generated = sum(len(r["response_ids"]) for r in rollouts)
    rewards = torch.tensor([r["reward"] for r in rollouts]).view(-1, args.samples)
    for r, a in zip(rollouts, common.group_advantages(rewards).view(-1).tolist()):
        r["advantage"] = a
    layout = [list(range(s, min(s + args.micro_batch, len(rollouts)))) for s in range(0, len(rollouts), args.micro_batch)]
    base_logp = [s["logp"] for s in common.score_rollouts(model, rollouts, layout, pad_id=tokenizer.pad_token_id,
                                                          temperature=1.0, ctx=ctx)]
    stage1_args = erpd_stage1.parse_args([])
    loss_fn = erpd_stage1.teacher_loss(stage1_args, rollouts, base_logp, +1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    _, train_s, train_gb = phase(lambda: common.train_epoch(
        model, optimizer, rollouts, loss_fn, epoch=0, ctx=ctx, pad_id=tokenizer.pad_token_id, temperature=1.0,
        batch_size=len(rollouts), micro_batch=args.micro_batch, seed=0, max_grad_norm=1.0))
    trained = sum(len(r["prompt_ids"]) + len(r["response_ids"]) for r in rollouts)
    result = {"model": args.model, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
              "autocast": autocast, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
              "rollouts": len(rollouts), "mean_response_tokens": round(generated / len(rollouts), 1),
              "accuracy": round(rewards.mean().item(), 3),
              "sampling_tokens_per_s": round(generated / sample_s, 1), "sampling_peak_gb": sample_gb and round(sample_gb, 2),
              "training_tokens_per_s": round(trained / train_s, 1), "training_peak_gb": train_gb and round(train_gb, 2),
              "sampling_s": round(sample_s, 2), "training_s": round(train_s, 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
