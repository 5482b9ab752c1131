"""Evaluate models side by side: accuracy next to KL to the base (the paper's headline table).

For each --model NAME=PATH, k samples per held-out problem at --temperature, then
    accuracy        mean@k: mean reward over all samples
    pass_at_k       fraction of problems with at least one correct sample
    kl_to_ref       mean over the model's own samples of sum_t log pi(y_t|s_t) - log pi_ref(y_t|s_t)
                    (a sequence-level estimate of KL(pi || pi_ref))
    token_kl_to_ref exact KL(pi || pi_ref) over the full vocabulary, mean over response tokens
    entropy         token entropy, mean over response tokens
    mean_length     response tokens per sample;  truncated: fraction that hit --max-new-tokens
All log-probs use softmax(logits / temperature), the distribution the samples came from.

    python eval_math.py --model base=tiny/model --model teacher=runs/stage1/teacher \\
        --model student=runs/stage2/student --ref tiny/model --json runs/eval.json
    torchrun --nproc_per_node 8 eval_math.py --model student=runs/r1/stage2/student \\
        --ref Qwen/Qwen2.5-Math-1.5B-Instruct --data HuggingFaceH4/MATH-500 --split test \\
        --samples 16 --max-new-tokens 2048 --dtype bfloat16
"""

import argparse
import json
from pathlib import Path

from common import (
    add_system_args, model_kwargs,
    DEFAULT_MODEL, DEFAULT_TEST_DATA, InputError, atomic_write_text, encode_problems, init_distributed,
    load_model, load_problems, progress, run_main, sample_and_score, score_rollouts, set_seed)

METRICS = ("accuracy", "pass_at_k", "kl_to_ref", "token_kl_to_ref", "entropy", "mean_length", "truncated")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=None, metavar="NAME=PATH",
                   help="repeatable; default: base=<embedded tiny model>")
    p.add_argument("--ref", default=DEFAULT_MODEL, help="the base the KL columns are measured against")
    p.add_argument("--data", default=DEFAULT_TEST_DATA)
    p.add_argument("--split", default="test", help="dataset split")
    p.add_argument("--num-prompts", type=int, default=None, help="seeded subset (default: all)")
    p.add_argument("--samples", type=int, default=8, help="k: samples per problem")
    p.add_argument("--max-new-tokens", type=int, default=64, help="response length limit")
    p.add_argument("--max-prompt-len", type=int, default=1024, help="longer prompts are skipped")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling and scoring temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    p.add_argument("--system-prompt", default=None, help="system message for chat templates")
    p.add_argument("--sample-batch-size", type=int, default=128, help="sequences per sampling batch")
    p.add_argument("--micro-batch", type=int, default=32, help="sequences per scoring forward")
    p.add_argument("--json", default=None, help="write {'models': {NAME: {metric: value}}} here")
    p.add_argument("--seed", type=int, default=1234, help="problem subset and sampling")
    add_system_args(p, training=False)
    return p.parse_args(argv)


def evaluate(model, ref, tokenizer, problems, args, ctx) -> dict[str, float]:
    rollouts = sample_and_score(model, tokenizer, problems, args.samples, ctx=ctx, seed=args.seed,
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, batch_size=args.sample_batch_size)
    mine = list(range(ctx.rank, len(rollouts), ctx.world))
    micro_batches = [mine[s:s + args.micro_batch] for s in range(0, len(mine), args.micro_batch)]
    scores = score_rollouts(model, rollouts, micro_batches, pad_id=tokenizer.pad_token_id,
                            temperature=args.temperature if args.temperature > 0 else 1.0, ctx=ctx,
                            ref_model=ref, desc="scoring vs ref")
    n_tokens = max(1, sum(len(s["logp"]) for s in scores))
    by_prompt: dict[int, list[float]] = {}
    for r in rollouts:
        by_prompt.setdefault(r["prompt_index"], []).append(r["reward"])
    return {
        "accuracy": sum(r["reward"] for r in rollouts) / len(rollouts),
        "pass_at_k": sum(max(v) for v in by_prompt.values()) / len(by_prompt),
        "kl_to_ref": sum((s["logp"] - s["ref_logp"]).sum().item() for s in scores) / len(scores),
        "token_kl_to_ref": sum(s["kl"].sum().item() for s in scores) / n_tokens,
        "entropy": sum(s["entropy"].sum().item() for s in scores) / n_tokens,
        "mean_length": sum(len(r["response_ids"]) for r in rollouts) / len(rollouts),
        "truncated": sum(r["truncated"] for r in rollouts) / len(rollouts),
    }


def main(argv=None):
    args = parse_args(argv)
    ctx = init_distributed()
    set_seed(args.seed)
    specs = args.model or [f"base={DEFAULT_MODEL}"]
    if any("=" not in s for s in specs):
        raise InputError(f"--model expects NAME=PATH, got {[s for s in specs if '=' not in s]}")
    names = [s.split("=", 1) for s in specs]
    load = model_kwargs(args, ctx.device)
    ref, ref_tokenizer = load_model(args.ref, **load)
    ref.requires_grad_(False).eval()
    problems = load_problems(args.data, args.split, num=args.num_prompts, seed=args.seed)
    problems = encode_problems(ref_tokenizer, problems, args.max_prompt_len, args.data, args.system_prompt)
    results = {}
    for name, path in progress(names, enabled=ctx.is_main, desc="models"):
        model, tokenizer = load_model(path, **load)
        if tokenizer.get_vocab() != ref_tokenizer.get_vocab():
            raise InputError(f"--model {name}={path}: its tokenizer differs from --ref's; KL needs the same vocabulary")
        results[name] = evaluate(model, ref, tokenizer, problems, args, ctx)
        del model
    if ctx.is_main:
        width = max(len(n) for n in results) + 2
        print(f"\n{len(problems)} problems x {args.samples} samples, temperature {args.temperature}, "
              f"KL against {args.ref}")
        print("model".ljust(width) + "".join(m.rjust(16) for m in METRICS))
        for name, r in results.items():
            print(name.ljust(width) + "".join(f"{r[m]:16.4f}" for m in METRICS))
        if args.json:
            atomic_write_text(Path(args.json), json.dumps(
                {"models": results, "config": {**vars(args), "num_problems": len(problems)}}, indent=1))


if __name__ == "__main__":
    run_main(main)
