"""One stage-1 training step against a bare forward + backward + AdamW step on the same tokens.

    python bench/bench_train_step.py            # Llama hidden 512, 8 layers, vocab 32768 (~2 min)
    python bench/bench_train_step.py --quick    # hidden 256, 4 layers (~1 min)

Random LlamaForCausalLM (untied head, sdpa attention, float32, 2 threads); one global batch of 8
rollouts of 64 prompt + 192 response tokens (the same token ids in every case):

  bare          model(input_ids, attention_mask).logits -> cross-entropy on the 192 response
                positions -> backward -> AdamW step. What a user writes: logits for all 256 positions.
  bare-keep     the same with logits_to_keep = 193 (logits for the response positions only).
  stage1        common.train_epoch with one global batch and erpd_stage1's SAPO loss: pack_rollouts,
                response_logprobs (logits_to_keep + token_logprobs), token-mean loss, backward,
                all_reduce_gradients (no-op, world 1), clip_grad_norm_, AdamW step.
  stage1-chunk  the same with chunked_lm_head=True (common.lm_head_logprobs: no [B, T, V] logits).

Time: median of 3 interleaved rounds after a warm-up round (one process, default allocator).
Memory (each case in a fresh process, method in bench/measure.py):
  step extra    peak added by one step on top of weights + AdamW state + data (gradients freed)
  train total   peak minus the RSS right after the imports: weights, AdamW state, gradients,
                activations and data together.
Target: stage1 time <= 1.15x bare.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from measure import extra_peak, interleaved_median, rss_mb, run_memory_case  # noqa: E402

CASES = ("bare", "bare-keep", "stage1", "stage1-chunk")
TEMPERATURE = 1.0


def sizes(quick: bool) -> dict:
    if quick:
        return dict(hidden=256, layers=4, heads=4, prompt=64, response=192, batch=8, vocab=32768)
    return dict(hidden=512, layers=8, heads=8, prompt=64, response=192, batch=8, vocab=32768)


def build_model(s: dict, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["hidden"] * 8 // 3,
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                         num_key_value_heads=s["heads"], max_position_embeddings=1024, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.erpd_autocast = None
    return model


def build_rollouts(s: dict, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_ids": torch.randint(3, s["vocab"], (s["prompt"],), generator=g).tolist(),
             "response_ids": torch.randint(3, s["vocab"], (s["response"],), generator=g).tolist(),
             "reward": float(i % 2), "advantage": 0.5 if i % 2 else -0.5}
            for i in range(s["batch"])]


def setup(quick: bool):
    """Model, AdamW, rollouts with log pi_0 (from the model itself: ratio 1 at the first step), and
    one step function per case."""
    import common
    import erpd_stage1

    s = sizes(quick)
    model = build_model(s)
    rollouts = build_rollouts(s)
    ctx = common.Context(0, 0, 1, torch.device("cpu"))
    ctx.is_main = False  # no progress bar
    packed = common.pack_rollouts(rollouts, 0, "cpu")
    with torch.no_grad():
        base = common.response_logprobs(model, packed, TEMPERATURE)
    base_logp = [base[i, :len(r["response_ids"])].clone() for i, r in enumerate(rollouts)]
    args = erpd_stage1.parse_args([])  # stage 1's defaults: SAPO, tau 1.0 / 1.05, no KL term
    loss_fn = erpd_stage1.teacher_loss(args, rollouts, base_logp, +1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    ids, attn, labels, mask = packed["input_ids"], packed["attention_mask"], packed["labels"], packed["mask"]
    width = labels.shape[1]

    # cross-entropy targets aligned with the logits (-100: no loss), as HF's causal-LM loss does it:
    # the logits stay one contiguous [B * L, V] view, no copy
    response_targets = labels.masked_fill(~mask, -100)
    targets_full = torch.full(ids.shape, -100, dtype=torch.long)
    targets_full[:, -width - 1:-1] = response_targets
    targets_keep = torch.full((ids.shape[0], width + 1), -100, dtype=torch.long)
    targets_keep[:, :-1] = response_targets

    def bare(keep: bool):
        def step():
            optimizer.zero_grad(set_to_none=True)
            logits = model(input_ids=ids, attention_mask=attn, logits_to_keep=width + 1 if keep else 0).logits
            targets = targets_keep if keep else targets_full
            loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
            loss.backward()
            optimizer.step()
        return step

    def stage1(chunked: bool):
        return lambda: common.train_epoch(model, optimizer, rollouts, loss_fn, epoch=0, ctx=ctx, pad_id=0,
                                          temperature=TEMPERATURE, batch_size=len(rollouts),
                                          micro_batch=len(rollouts), seed=0, max_grad_norm=args.max_grad_norm,
                                          chunked_lm_head=chunked)

    steps = {"bare": bare(False), "bare-keep": bare(True), "stage1": stage1(False), "stage1-chunk": stage1(True)}
    return model, optimizer, steps, s


def memory_case(name: str, quick: bool):
    torch.set_num_threads(2)
    start = rss_mb()  # after the imports (torch, transformers, common): the runtime, not the training
    model, optimizer, steps, _ = setup(quick)
    result = extra_peak(steps[name], before=lambda: optimizer.zero_grad(set_to_none=True))
    result["train_total_mb"] = result["peak_mb"] - start
    print(json.dumps(result))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="hidden 256, 4 layers")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (median)")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        return memory_case(args.case, args.quick)
    torch.set_num_threads(2)
    extra = ["--quick"] if args.quick else []
    memory = {name: run_memory_case(__file__, name, *extra) for name in CASES}
    model, optimizer, steps, s = setup(args.quick)
    params = sum(p.numel() for p in model.parameters())
    print(f"random Llama hidden {s['hidden']}, {s['layers']} layers, vocab {s['vocab']} ({params / 1e6:.1f}M params, "
          f"float32), batch {s['batch']} x ({s['prompt']} prompt + {s['response']} response), "
          f"{torch.get_num_threads()} threads", flush=True)
    times = interleaved_median(steps, rounds=args.rounds)
    ref_t, ref_m = times["bare"], memory["bare"]
    print(f"{'step':14} {'time s':>7} {'x bare':>7} {'x bare-keep':>11} {'step extra MiB':>14} {'x bare':>7} "
          f"{'train total MiB':>15} {'x bare':>7}")
    for name in CASES:
        m = memory[name]
        print(f"{name:14} {times[name]:7.2f} {times[name] / ref_t:7.2f} {times[name] / times['bare-keep']:11.2f} "
              f"{m['extra_mb']:14.0f} {m['extra_mb'] / ref_m['extra_mb']:7.2f} {m['train_total_mb']:15.0f} "
              f"{m['train_total_mb'] / ref_m['train_total_mb']:7.2f}")
    print(f"stage-1 step overhead: {times['stage1'] / ref_t:.2f}x bare (target <= 1.15), "
          f"{times['stage1'] / times['bare-keep']:.2f}x bare-keep")
    print(f"--chunked-lm-head: step extra peak {memory['stage1-chunk']['extra_mb']:.0f} MiB vs "
          f"{memory['stage1']['extra_mb']:.0f} MiB ({memory['stage1-chunk']['extra_mb'] / memory['stage1']['extra_mb']:.2f}x), "
          f"time {times['stage1-chunk'] / times['stage1']:.2f}x")

if __name__ == "__main__":
    main()
