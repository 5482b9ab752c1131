"""Stage 2's peak memory during training against training the model alone on the same tokens.

    python bench/bench_stage2_memory.py            # Llama hidden 512, 8 layers, vocab 32768 (~1 min)
    python bench/bench_stage2_memory.py --quick    # hidden 256, 4 layers

Same random Llama and the same 8 rollouts of 64 prompt + 192 response tokens as bench_train_step;
one optimizer step per case (AdamW, float32, 2 threads):

  alone          model(ids, mask, logits_to_keep=193) -> token-mean cross-entropy on the responses ->
                 backward -> clip -> AdamW: the same forward / backward / optimizer as stage 2,
                 with nothing else in memory.
  alone-full     the same with logits for all 256 positions (a plain model(...).logits).
  stage2         common.train_epoch with erpd_stage2's loss: log pi_0 and delta are float32 CPU
                 tensors held per rollout of D (here D = 1024 rollouts x 192 tokens, as the shards
                 give them), the PPO-clip loss on A = clip(delta, -2, 2), stats, no teacher model.
  stage2+ref     the same plus the frozen copy of pi_0 that erpd_stage2 loads for the exact-KL
                 diagnostics (--kl-rollouts 256). It lives in host memory and visits the GPU only during
                 the per-epoch diagnostics, so on a GPU the device memory is stage2's; on this CPU bench
                 host and device are one memory, and it shows what the copy costs there.
  stage2-chunk   stage2 with --chunked-lm-head (common.lm_head_logprobs).

Memory (each case in a fresh process; method in bench/measure.py):
  step extra   peak added by one step on top of weights + AdamW state + data (gradients freed)
  train total  peak minus the RSS right after the imports (weights, AdamW state, gradients,
               activations, D's signals, the reference model if any)
Target: stage 2 <= 1.1x training the model alone.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import erpd_stage2  # noqa: E402

from bench_train_step import build_model, build_rollouts, sizes  # noqa: E402
from measure import extra_peak, rss_mb, run_memory_case  # noqa: E402

CASES = ("alone", "alone-full", "stage2", "stage2+ref", "stage2-chunk")
D_SIZE = 1024
TEMPERATURE = 1.0


def setup(name: str, quick: bool):
    import common

    s = sizes(quick)
    model = build_model(s)
    rollouts = build_rollouts(s)  # the batch the step trains on: D's first 8 rollouts
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0)
    packed = common.pack_rollouts(rollouts, 0, "cpu")
    ids, attn, labels, mask = packed["input_ids"], packed["attention_mask"], packed["labels"], packed["mask"]
    width = labels.shape[1]

    if name.startswith("alone"):
        targets = labels.masked_fill(~mask, -100)
        full = name == "alone-full"
        tgt = torch.full(ids.shape if full else (ids.shape[0], width + 1), -100, dtype=torch.long)
        tgt[:, -width - 1:-1] = targets

        def step():
            optimizer.zero_grad(set_to_none=True)
            logits = model(input_ids=ids, attention_mask=attn, position_ids=packed["position_ids"],
                           logits_to_keep=0 if full else width + 1).logits
            loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), tgt.view(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        return model, optimizer, step

    # stage 2: D's per-token signals as CPU tensors (what read_teacher_shards returns), pi_0 recomputed
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        logp0 = common.response_logprobs(model, packed, TEMPERATURE)
    base_logp = [logp0[i, :len(r["response_ids"])].clone() for i, r in enumerate(rollouts)]
    base_logp += [torch.randn(s["response"], generator=g) - 3 for _ in range(D_SIZE - len(rollouts))]
    delta = [torch.randn(s["response"], generator=g) for _ in range(D_SIZE)]
    for r in rollouts:  # the shard fields every rollout of D carries
        r["logp_base"], r["logp_teacher"] = torch.randn(s["response"], generator=g), torch.randn(s["response"], generator=g)
    ref = None
    if name == "stage2+ref":
        ref = build_model(s).requires_grad_(False).eval()  # erpd_stage2: common.load_reference (host memory)
    ctx = common.Context(0, 0, 1, torch.device("cpu"))
    ctx.is_main = False

    loss_fn = erpd_stage2.distill_loss(erpd_stage2.parse_args([]), rollouts, base_logp, delta)  # its defaults

    def step():
        common.train_epoch(model, optimizer, rollouts, loss_fn, epoch=0, ctx=ctx, pad_id=0, temperature=TEMPERATURE,
                           batch_size=len(rollouts), micro_batch=len(rollouts), seed=0, max_grad_norm=1.0,
                           chunked_lm_head=name == "stage2-chunk")
    step.ref = ref  # keep it alive
    return model, optimizer, step


def memory_case(name: str, quick: bool):
    torch.set_num_threads(2)
    start = rss_mb()
    model, optimizer, step = setup(name, quick)
    result = extra_peak(step, before=lambda: optimizer.zero_grad(set_to_none=True))
    result["train_total_mb"] = result["peak_mb"] - start
    print(json.dumps(result))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="hidden 256, 4 layers")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        return memory_case(args.case, args.quick)
    s = sizes(args.quick)
    extra = ["--quick"] if args.quick else []
    memory = {name: run_memory_case(__file__, name, *extra) for name in CASES}
    params = build_model(s).num_parameters()
    print(f"random Llama hidden {s['hidden']}, {s['layers']} layers, vocab {s['vocab']} ({params / 1e6:.1f}M params = "
          f"{params * 4 / 2**20:.0f} MiB float32), batch {s['batch']} x ({s['prompt']} + {s['response']}), "
          f"D = {D_SIZE} rollouts of signals")
    ref = memory["alone"]
    print(f"{'case':13} {'step extra MiB':>14} {'x alone':>8} {'train total MiB':>15} {'x alone':>8} {'step s*':>8}")
    for name in CASES:
        m = memory[name]
        print(f"{name:13} {m['extra_mb']:14.0f} {m['extra_mb'] / ref['extra_mb']:8.2f} {m['train_total_mb']:15.0f} "
              f"{m['train_total_mb'] / ref['train_total_mb']:8.2f} {m['seconds']:8.2f}")
    print("* one step, timed in the memory process (fixed mmap threshold): indicative only.")
    print(f"stage 2 / alone: train total {memory['stage2']['train_total_mb'] / ref['train_total_mb']:.2f}x, "
          f"step extra {memory['stage2']['extra_mb'] / ref['extra_mb']:.2f}x (target <= 1.1); with pi_0's "
          f"host copy counted too: {memory['stage2+ref']['train_total_mb'] / ref['train_total_mb']:.2f}x")


if __name__ == "__main__":
    main()
