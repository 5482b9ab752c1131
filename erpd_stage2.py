"""ERPD stage 2: distil the teacher's token-level signal into pi_0 under a tight trust region.

    signal   delta_t = log pi_T(y_t | s_t) - log pi_0(y_t | s_t)     --signal base      (default)
             delta_t = log pi_T(y_t | s_t) - log pi_U(y_t | s_t)     --signal unlearned (weak teachers)
             several --teacher dirs: delta_t = sum_k w_k delta_t^k / sum_k w_k
    advantage A_t = clip(delta_t, -c, c) + alpha * A_seq             (c = 2, alpha = 0)
    loss     -min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)       (eps = 0.2: tight)
             + kl_coef * KL(pi_theta || pi_0)                        (value k3, gradient k2)
    rho_t = pi_theta(y_t | s_t) / pi_0(y_t | s_t), summed over the global batch's tokens / their count.

The student starts again from pi_0 and sees the same fixed rollouts D as the teacher. Only the
student is trained: log pi_T and log pi_0 of D's tokens come from stage 1's shards (no teacher in
memory), which must have been made from this --model (fingerprint check). log pi_0 used in rho is
recomputed with this run's own forward, so rho is exactly 1 at the first step whatever dtype
stage 1 ran in. Drift that the teacher accumulated off D's tokens cannot be copied: the student
only moves on D's sampled tokens, and only within 1 +- eps of pi_0.

    python erpd_stage2.py --teacher runs/stage1                        # embedded tiny default
    torchrun --nproc_per_node 8 erpd_stage2.py --model Qwen/Qwen2.5-Math-1.5B-Instruct \\
        --teacher runs/r1/stage1 --autocast bfloat16 --lr 1e-6 --batch-size 512 --micro-batch 8 \\
        --out runs/r1/stage2
"""

import argparse
from pathlib import Path

import torch

from common import (
    add_system_args, load_policy, load_reference,
    DEFAULT_MODEL, DEFAULT_TEST_DATA, InputError, JsonlLogger, distill_token_advantages, drift_metrics,
    encode_problems, global_batches, heldout_accuracy, init_distributed, kl_penalty,
    load_problems, log_ratio, model_fingerprint, my_micro_batches, pad_rows, ppo_clip_loss,
    read_teacher_shards, run_main, save_pretrained_atomic, score_rollouts, set_seed,
    tokenizer_fingerprint, train_epochs)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="the base pi_0 the shards were made from")
    p.add_argument("--teacher", nargs="+", default=["runs/stage1"], help="stage-1 --out folder(s)")
    p.add_argument("--teacher-weights", type=float, nargs="+", default=None, help="one per --teacher")
    p.add_argument("--signal", choices=["base", "unlearned"], default="base")
    p.add_argument("--out", default="runs/stage2", help="output folder (student, checkpoint, metrics)")
    p.add_argument("--eval-data", default=DEFAULT_TEST_DATA, help="held-out problems for accuracy curves")
    p.add_argument("--eval-split", default="test", help="split of --eval-data")
    p.add_argument("--system-prompt", default=None, help="must match stage 1's")
    # distillation
    p.add_argument("--epochs", type=int, default=4, help="passes over D")
    p.add_argument("--batch-size", type=int, default=256, help="rollouts per optimizer step (global)")
    p.add_argument("--micro-batch", type=int, default=64, help="rollouts per forward (per rank)")
    p.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (real models: ~1e-6)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    p.add_argument("--eps", type=float, default=0.2, help="trust region: clip rho to [1 - eps, 1 + eps]")
    p.add_argument("--clip-c", type=float, default=2.0, help="A_t = clip(delta_t, -c, c)")
    p.add_argument("--alpha", type=float, default=0.0, help="weight of the sequence advantage in A_t")
    p.add_argument("--kl-coef", type=float, default=0.0, help="weight of KL(pi_theta || pi_0)")
    # diagnostics
    p.add_argument("--kl-rollouts", type=int, default=256,
                   help="rollouts of D for the exact-KL curve; loads a frozen pi_0, kept on CPU between diagnostics "
                        "(sharded on the GPUs under --fsdp; 0: off)")
    p.add_argument("--eval-every", type=int, default=2, help="held-out accuracy every k epochs (0: off)")
    p.add_argument("--eval-prompts", type=int, default=200, help="held-out problems per accuracy point")
    p.add_argument("--eval-samples", type=int, default=4, help="samples per held-out problem")
    p.add_argument("--max-new-tokens", type=int, default=64, help="response length limit")
    p.add_argument("--max-prompt-len", type=int, default=1024, help="longer prompts are skipped or fatal")
    p.add_argument("--sample-batch-size", type=int, default=128, help="sequences per sampling batch")
    # system
    add_system_args(p, training=True)
    return p.parse_args(argv)


def load_signal(args, base_fp: str, tok_fp: str):
    """Read every teacher's shards; return (D, delta per rollout, sampling temperature)."""
    weights = args.teacher_weights or [1.0] * len(args.teacher)
    if len(weights) != len(args.teacher):
        raise InputError(f"--teacher-weights has {len(weights)} values for {len(args.teacher)} --teacher dirs")
    other = {"base": "logp_base", "unlearned": "logp_unlearned"}[args.signal]
    rollouts, delta, temperature = None, None, None
    for directory, w in zip(args.teacher, weights):
        shard_dir = Path(directory) / "shards" if (Path(directory) / "shards").is_dir() else Path(directory)
        manifest, rows = read_teacher_shards(shard_dir, base_fp, tok_fp)
        if other not in manifest["signals"]:
            raise InputError(f"{shard_dir}: --signal {args.signal} needs {other}, which these shards lack "
                             "(run stage 1 with --unlearn)")
        if rollouts is None:
            rollouts, temperature = rows, manifest["temperature"]
            delta = [torch.zeros(len(r["response_ids"])) for r in rows]
        elif [(r["prompt_ids"], r["response_ids"]) for r in rows] != \
                [(r["prompt_ids"], r["response_ids"]) for r in rollouts]:
            raise InputError(f"{shard_dir}: its rollouts differ from {args.teacher[0]}'s; several teachers "
                             "must share D (make them with --rollouts)")
        elif manifest["temperature"] != temperature:
            raise InputError(f"{shard_dir}: temperature {manifest['temperature']} differs from {temperature}")
        for d, r in zip(delta, rows):
            d += (w / sum(weights)) * (r["logp_teacher"] - r[other])
    return rollouts, delta, temperature


def main(argv=None):
    args = parse_args(argv)
    ctx = init_distributed(args.dist_timeout_minutes)
    set_seed(args.seed)
    out = Path(args.out)
    log = JsonlLogger(out / "metrics.jsonl", enabled=ctx.is_main, append=args.resume)
    log.log(event="config", world_size=ctx.world, **vars(args))
    student, tokenizer = load_policy(args, ctx)
    base_fp = model_fingerprint(student)
    rollouts, delta, temperature = load_signal(args, base_fp, tokenizer_fingerprint(tokenizer))
    pad_id = tokenizer.pad_token_id

    # ---- log pi_0 with this run's forward, in epoch 0's layout: rho is exactly 1 at step 0 ------
    layout = [mb for b in global_batches(len(rollouts), args.batch_size, args.seed, 0)
              for mb in my_micro_batches(b, ctx, args.micro_batch)]
    base_logp = [s["logp"] for s in score_rollouts(student, rollouts, layout, pad_id=pad_id, temperature=temperature,
                                                   ctx=ctx, chunked_lm_head=args.chunked_lm_head, desc="log pi_0")]
    disk_gap = max((b - r["logp_base"]).abs().max().item() for b, r in zip(base_logp, rollouts))
    if ctx.is_main and disk_gap > 0.1:
        print(f"warning: log pi_0 recomputed here differs from stage 1's by up to {disk_gap:.3f} "
              "(different dtype or kernels?)")
    log.log(event="signal", num_rollouts=len(rollouts), teachers=args.teacher, base_logp_max_gap=disk_gap,
            delta_mean=torch.cat(delta).mean().item(), delta_abs_mean=torch.cat(delta).abs().mean().item(),
            delta_positive=(torch.cat(delta) > 0).float().mean().item())

    ref = load_reference(args, ctx) if args.kl_rollouts else None  # frozen pi_0 for the exact-KL curves
    kl_subset = torch.randperm(len(rollouts), generator=torch.Generator().manual_seed(args.seed))
    kl_subset = kl_subset[:max(args.kl_rollouts, 64)].tolist()
    eval_problems = None
    if args.eval_every:
        eval_problems = encode_problems(tokenizer, load_problems(args.eval_data, args.eval_split,
                                                                 num=args.eval_prompts, seed=args.seed),
                                        args.max_prompt_len, args.eval_data, args.system_prompt)

    def loss_fn(indices, packed, logp, counts):
        mask = packed["mask"]
        old = pad_rows([base_logp[i] for i in indices], logp.device)
        d = pad_rows([delta[i] for i in indices], logp.device)
        seq_adv = torch.tensor([rollouts[i]["advantage"] for i in indices], device=logp.device)
        adv = distill_token_advantages(d, args.clip_c, args.alpha, seq_adv)
        per_token, clipped = ppo_clip_loss(logp, old, adv, args.eps, args.eps)
        if args.kl_coef:
            per_token = per_token + args.kl_coef * kl_penalty(logp, old)
        loss = (per_token * mask).sum() / counts["tokens"]
        moved = log_ratio(logp.detach(), old)
        agree = (torch.sign(moved) == torch.sign(d)) & (moved != 0) & mask
        return loss, {"tokens": mask.sum(), "clipped": (clipped & mask).sum(), "agree": agree.sum(),
                      "moved": ((moved != 0) & mask).sum()}

    def diagnostics(policy, epoch):
        metrics = drift_metrics(policy, rollouts, kl_subset, ctx=ctx, pad_id=pad_id, temperature=temperature,
                                micro_batch=args.micro_batch, ref_model=ref)
        if eval_problems and (epoch % args.eval_every == 0 or epoch == args.epochs):
            metrics["heldout_accuracy"] = heldout_accuracy(
                policy, tokenizer, eval_problems, args.eval_samples, ctx=ctx, seed=args.seed + 1,
                max_new_tokens=args.max_new_tokens, temperature=temperature, top_p=1.0,
                batch_size=args.sample_batch_size)
        return metrics

    # ---- trust-region distillation epochs ----------------------------------------------------
    def summarize(stats):
        return {"clip_fraction": stats["clipped"] / stats["tokens"],
                "sign_agreement": stats["agree"] / max(stats["moved"], 1.0)}
    train_epochs(student, rollouts, loss_fn, args=args, ctx=ctx, pad_id=pad_id, temperature=temperature,
                 checkpoint=out / "checkpoint", log=log, diagnostics=diagnostics, summarize=summarize, tag="student")
    save_pretrained_atomic(student, tokenizer, out / "student", ctx,
                           {"stage": 2, "base_fingerprint": base_fp, "teachers": args.teacher})
    if ctx.is_main:
        print(f"wrote {out}/student")
    log.log(event="done")


if __name__ == "__main__":
    run_main(main)
