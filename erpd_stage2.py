"""ERPD stage 2: distil the teacher's token-level signal into pi_0 under a tight trust region.

ERPD, Extreme Region Policy Distillation (Chen, Wang, Yan, 2026, https://arxiv.org/abs/2605.25582).

    signal   delta_t = log pi_T(y_t | s_t) - log pi_0(y_t | s_t)     --signal base      (default)
             delta_t = log pi_T(y_t | s_t) - log pi_U(y_t | s_t)     --signal unlearned (weak teachers)
             several --teacher dirs: delta_t = sum_k w_k delta_t^k / sum_k w_k
    advantage A_t = clip(delta_t, -c, c) + alpha * A_seq             (c = 2, alpha = 0)
    loss     -min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)       (eps = 0.2: tight)
             + kl_coef * (rho log rho - rho + 1)                     an unbiased KL(pi_theta || pi_0)
    rho_t = pi_theta(y_t | s_t) / pi_0(y_t | s_t), the global batch's mean over tokens (--aggregation).

The student starts again from pi_0 and sees the same fixed rollouts D as the teacher. Only the
student is trained: log pi_T and log pi_0 of D's tokens come from stage 1's shards (no teacher in
memory), which must have been made from this --model (fingerprint check). log pi_0 used in rho is
recomputed with this run's own forward, so rho is exactly 1 at the first step whatever dtype
stage 1 ran in. The student learns only on D's sampled tokens, where the clip stops the gradient
from pushing a token's ratio further out of [1 - eps, 1 + eps]; it does not bound the ratios
themselves (other tokens and states move through shared weights): metrics.jsonl logs how far they go.

What it leaves out, on purpose: the teacher's full next-token distribution (only the sampled tokens'
log-probs are distilled), a learning-rate schedule, an inference engine and an experiment tracker.

    python erpd_stage2.py --teacher runs/stage1                        # embedded tiny default
    torchrun --nproc_per_node 8 erpd_stage2.py --model Qwen/Qwen2.5-Math-1.5B-Instruct \\
        --teacher runs/r1/stage1 --autocast bfloat16 --lr 1e-6 --batch-size 512 --micro-batch 8 \\
        --out runs/r1/stage2
"""

import argparse
import math
from pathlib import Path

import torch

from common import (
    DEFAULT_MODEL, InputError, add_diagnostic_args, add_prompt_args, add_system_args, add_training_args, aggregate,
    check_lineage, distill_token_advantages, drift_diagnostics, epoch0_layout, fingerprints, finish_output,
    kl_penalty, lineage, load_policy, load_reference, log_ratio, manifest_sha256, pad_rows, ppo_clip_loss,
    prompt_format, read_teacher_shards, run_main, save_pretrained_atomic, score_logprobs, shard_folder, start_run,
    train_epochs, training_options, use_chunked_lm_head)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="the base pi_0 the shards were made from")
    p.add_argument("--teacher", nargs="+", default=["runs/stage1"], help="stage-1 --out folder(s)")
    p.add_argument("--out", default="runs/stage2", help="output folder (student, checkpoint, metrics)")
    method = p.add_argument_group("method: the signal and the trust region")
    method.add_argument("--signal", choices=["base", "unlearned", "none"], default="base",
                        help="delta = log pi_T - log pi_0 (base) or - log pi_U (unlearned); none: delta = 0, so with "
                             "--alpha 1 the token advantage is A_seq (conservative off-policy RL on D, a baseline)")
    method.add_argument("--teacher-weights", type=float, nargs="+", default=None, help="one per --teacher")
    method.add_argument("--eps", type=float, default=0.2, help="trust region: clip rho to [1 - eps, 1 + eps]")
    method.add_argument("--clip-c", type=float, default=2.0, help="A_t = clip(delta_t, -c, c)")
    method.add_argument("--alpha", type=float, default=0.0, help="weight of the sequence advantage in A_t")
    method.add_argument("--kl-coef", type=float, default=0.0, help="weight of KL(pi_theta || pi_0)")
    add_training_args(method, epochs=2, lr=2e-5, batch_size=64)
    data = p.add_argument_group("held-out sampling")
    data.add_argument("--max-new-tokens", type=int, default=32, help="response length limit (real models: ~1024)")
    data.add_argument("--sample-batch-size", type=int, default=128, help="sequences per sampling batch")
    add_prompt_args(data)
    data.add_argument("--max-prompt-len", type=int, default=1024, help="longer held-out prompts are skipped")
    add_diagnostic_args(p.add_argument_group("diagnostics"), eval_every=1)
    add_system_args(p.add_argument_group("system: precision, parallelism, resume"), training=True)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    ctx, log, out = start_run(args)
    check_lineage(args.model)
    student, tokenizer = load_policy(args, ctx)
    chunked = use_chunked_lm_head(args, student)
    ids = fingerprints(student, tokenizer)
    rollouts, delta, manifest = load_signal(args, ids)  # D and the teachers' token signal, from disk
    pad_id, temperature = tokenizer.pad_token_id, manifest["temperature"]
    prompt = prompt_format(tokenizer, args.system_prompt, args.instruction,
                           bound=(manifest["prompt_format"], f"{args.teacher[0]}'s shard manifest"))

    # ---- log pi_0 with this run's forward, in epoch 0's layout: rho is exactly 1 at the first step -----
    base_logp = score_logprobs(student, rollouts, epoch0_layout(len(rollouts), args, ctx), ctx=ctx, pad_id=pad_id,
                               temperature=temperature, chunked_lm_head=chunked, desc="log pi_0")
    disk_gap = max((b - r["logp_base"]).abs().max().item() for b, r in zip(base_logp, rollouts))
    if ctx.is_main and disk_gap > 0.1:
        print(f"warning: log pi_0 recomputed here differs from stage 1's by up to {disk_gap:.3f} "
              "(different dtype or kernels?)")
    all_delta = torch.cat(delta)
    log.log(event="signal", num_rollouts=len(rollouts), teachers=args.teacher, base_logp_max_gap=disk_gap,
            delta_mean=all_delta.mean().item(), delta_abs_mean=all_delta.abs().mean().item(),
            delta_positive=(all_delta > 0).float().mean().item())

    # ---- trust-region distillation epochs --------------------------------------------------------------
    ref = load_reference(args, ctx)  # frozen pi_0 for the exact-KL curves (None with --kl-rollouts 0)
    diagnostics = drift_diagnostics(args, ctx, tokenizer, rollouts, ref, temperature=temperature,
                                    top_p=manifest["top_p"], prompt=prompt, base_logp=base_logp, eps=args.eps)
    train_epochs(student, rollouts, distill_loss(args, rollouts, base_logp, delta), ctx=ctx, log=log, tag="student",
                 checkpoint=out / "checkpoint", diagnostics=diagnostics, summarize=summarize, pad_id=pad_id,
                 temperature=temperature, **training_options(args, chunked))
    teachers = [{"path": str(Path(t).resolve()), "manifest_sha256": manifest_sha256(t)} for t in args.teacher]
    save_pretrained_atomic(student, tokenizer, out / "student", ctx, {
        "stage": 2, **ids, "base_model": args.model, "teachers": teachers, "prompt_format": prompt,
        "lineage": lineage(args.model, ids["base_fingerprint"])})
    if ctx.is_main:
        print(f"wrote {args.out}/student")
    log.log(event="done")
    finish_output(Path(args.out), out, ctx)


def distill_loss(args, rollouts, base_logp, delta):
    """PPO's clip on the token advantage A_t = clip(delta_t, -c, c) + alpha A_seq (+ --kl-coef), aggregated
    against the global batch's counts."""
    def loss_fn(indices, packed, logp, counts):
        mask = packed["mask"]
        old = pad_rows([base_logp[i] for i in indices], logp.device)
        d = pad_rows([delta[i] for i in indices], logp.device)
        seq_adv = torch.tensor([rollouts[i]["advantage"] for i in indices], device=logp.device)
        adv = distill_token_advantages(d, args.clip_c, args.alpha, seq_adv)
        per_token, clipped = ppo_clip_loss(logp, old, adv, args.eps, args.eps)
        if args.kl_coef:
            per_token = per_token + args.kl_coef * kl_penalty(logp, old)
        moved = log_ratio(logp.detach(), old)
        agree = (torch.sign(moved) == torch.sign(d)) & (moved != 0) & mask
        return aggregate(per_token, mask, counts, args.aggregation), {
            "tokens": mask.sum(), "clipped": (clipped & mask).sum(), "agree": agree.sum(),
            "moved": ((moved != 0) & mask).sum()}
    return loss_fn


def summarize(stats):
    """Per-epoch stats: the fraction of trained tokens clipped, and how often the student's move on a
    token (the sign of log rho) follows the teacher's signal (the sign of delta)."""
    return {"clip_fraction": stats["clipped"] / stats["tokens"],
            "sign_agreement": stats["agree"] / max(stats["moved"], 1.0)}


def load_signal(args, ids: dict):
    """Read every teacher's shards; return (D, delta per rollout, the first teacher's manifest)."""
    weights = args.teacher_weights or [1.0] * len(args.teacher)
    if len(weights) != len(args.teacher):
        raise InputError(f"--teacher-weights has {len(weights)} values for {len(args.teacher)} --teacher dirs")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise InputError(f"--teacher-weights {' '.join(map(str, weights))}: expected non-negative finite weights "
                         "with a positive sum")
    if args.signal == "none" and not args.alpha:
        raise InputError("--signal none leaves A_t = alpha A_seq: give --alpha (1 for the conservative baseline)")
    signal = {"base": lambda r: r["logp_teacher"] - r["logp_base"],
              "unlearned": lambda r: r["logp_teacher"] - r["logp_unlearned"],
              "none": lambda r: torch.zeros_like(r["logp_base"])}[args.signal]
    rollouts, delta, first = None, None, None
    for directory, w in zip(args.teacher, weights):
        shard_dir = shard_folder(directory)
        manifest, rows = read_teacher_shards(shard_dir, ids["base_fingerprint"], ids["tokenizer_fingerprint"])
        if args.signal == "unlearned" and "logp_unlearned" not in manifest["signals"]:
            raise InputError(f"{shard_dir}: --signal unlearned needs log pi_U, which these shards lack "
                             "(run stage 1 with --unlearn)")
        if rollouts is None:
            rollouts, first = rows, manifest
            delta = [torch.zeros(len(r["response_ids"])) for r in rows]
        elif [(r["prompt_ids"], r["response_ids"]) for r in rows] != \
                [(r["prompt_ids"], r["response_ids"]) for r in rollouts]:
            raise InputError(f"{shard_dir}: its rollouts differ from {args.teacher[0]}'s; several teachers "
                             "must share D (make them with --rollouts)")
        else:
            for key in ("temperature", "top_p", "prompt_format"):
                if manifest[key] != first[key]:
                    raise InputError(f"{shard_dir}: {key} {manifest[key]} differs from {args.teacher[0]}'s {first[key]}")
        for d, r in zip(delta, rows):
            d += (w / sum(weights)) * signal(r)
    return rollouts, delta, first


if __name__ == "__main__":
    run_main(main)
