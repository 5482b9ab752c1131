"""ERPD stage 1: extract an "extreme region" teacher pi_T from a fixed set of rollouts.

ERPD, Extreme Region Policy Distillation (Chen, Wang, Yan, 2026, https://arxiv.org/abs/2605.25582).

    D = {(x, y_1..y_G)}: G samples per prompt from the base pi_0, rewards r in {0, 1} (verifier),
    group advantage A = r - mean_G(r)                                    (optionally / std)
    rho_t = pi_theta(y_t | s_t) / pi_0(y_t | s_t),  log rho clamped to [-20, 20]

    --teacher-loss ppo   -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)   eps_high = 10: weak
                   sapo  -(4 / tau) sigmoid(tau (rho - 1)) A,  tau = 1 (A > 0), 1.05 (A < 0)
                   ce    -A log pi_theta(y_t | s_t)
                   mse   (beta sum_t log rho_t - A)^2                           per sequence
    loss = the global batch's mean over tokens (--aggregation)
           + kl_coef * (rho log rho - rho + 1)      an unbiased KL(pi_theta || pi_0) on pi_0's tokens

Many epochs (default 6 on the tiny task) over the same D with a weak constraint: fast early gains, then drift and
entropy collapse, visible in metrics.jsonl. `--unlearn` also trains pi_U from pi_0 on -A. The teacher's
log-probs of D's tokens, next to pi_0's, are the shards stage 2 distils.

What it leaves out, on purpose: a learning-rate schedule (constant lr), an inference engine for sampling
(the model's own KV-cache loop), an experiment tracker (metrics are JSON lines), reward models (the
verifier is the reward), and dynamic sampling or filtering of D (D is fixed once sampled).

Writes OUT/rollouts/ (D, reusable with --rollouts; not copied when D itself came from --rollouts),
OUT/teacher/ (save_pretrained), OUT/shards/ (safetensors per rank + manifest.json), OUT/checkpoint-teacher/
and OUT/metrics.jsonl.

    python erpd_stage1.py                                  # embedded tiny default, CPU, ~2 min
    torchrun --nproc_per_node 8 erpd_stage1.py --model Qwen/Qwen2.5-Math-1.5B-Instruct \\
        --data openai/gsm8k:main --autocast bfloat16 --num-prompts 1000 --samples-per-prompt 16 \\
        --max-new-tokens 1024 --lr 1e-6 --batch-size 512 --micro-batch 8 --out runs/r1/stage1
"""

import argparse
import gc
import json
from pathlib import Path

import torch

from common import (
    DEFAULT_MODEL, DEFAULT_TRAIN_DATA, InputError, POLICY_LOSSES, add_diagnostic_args, add_prompt_args,
    add_system_args, add_training_args, aggregate, atomic_write_text, check_lineage, checkpoint_finished,
    drift_diagnostics, encode_problems, epoch0_layout, fingerprints, finish_output, group_advantages, kl_penalty,
    lineage, load_policy, load_problems, load_reference, log_ratio, pad_rows, prompt_format,
    recorded_prompt_format, rollout_health, run_main, sample_and_score, save_pretrained_atomic, score_logprobs,
    shards_to_keep, start_run, train_epochs, training_options, use_chunked_lm_head, warn_if_no_signal,
    write_teacher_shards)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF folder or hub id of the base pi_0")
    p.add_argument("--out", default="runs/stage1", help="output folder (rollouts, teacher, shards, metrics)")
    method = p.add_argument_group("method: the teacher's loss and constraint")
    method.add_argument("--teacher-loss", choices=sorted(POLICY_LOSSES), default="sapo")
    method.add_argument("--adv-std-norm", action="store_true", help="A = (r - mean) / (std + 1e-6)")
    method.add_argument("--eps-low", type=float, default=0.2, help="ppo: lower clip")
    method.add_argument("--eps-high", type=float, default=10.0, help="ppo: upper clip (10: weakly constrained)")
    method.add_argument("--sapo-tau-pos", type=float, default=1.0, help="sapo: gate temperature where A > 0")
    method.add_argument("--sapo-tau-neg", type=float, default=1.05, help="sapo: gate temperature where A < 0")
    method.add_argument("--mse-beta", type=float, default=0.1, help="mse: beta in (beta sum log rho - A)^2")
    method.add_argument("--kl-coef", type=float, default=0.0, help="weight of KL(pi_theta || pi_0)")
    method.add_argument("--unlearn", action="store_true", help="also train pi_U from pi_0 on -A")
    method.add_argument("--snapshot-every", type=int, default=0,
                        help="also save the teacher after every k-th epoch as OUT/teacher-epoch<k> (0: off)")
    add_training_args(method, epochs=6, lr=7e-5, batch_size=64)
    data = p.add_argument_group("data and sampling D")
    data.add_argument("--data", default=DEFAULT_TRAIN_DATA, help="jsonl / parquet / hub id[:config]")
    data.add_argument("--split", default="train", help="dataset split (hub / folder datasets)")
    data.add_argument("--rollouts", default=None, help="reuse D from a previous stage-1 OUT (or OUT/rollouts)")
    data.add_argument("--num-prompts", type=int, default=256, help="N: prompts in D (seeded subset)")
    data.add_argument("--data-seed", type=int, default=None,
                      help="seed of D's prompt subset (default: --seed); rounds draw fresh prompts with their own")
    data.add_argument("--samples-per-prompt", type=int, default=8, help="G: rollouts per prompt")
    data.add_argument("--max-new-tokens", type=int, default=32, help="response length limit (real models: ~1024)")
    data.add_argument("--temperature", type=float, default=1.0, help="sampling and scoring temperature")
    data.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    data.add_argument("--sample-batch-size", type=int, default=128, help="sequences per sampling batch")
    add_prompt_args(data)
    data.add_argument("--max-prompt-len", type=int, default=1024, help="longer prompts are skipped or fatal")
    data.add_argument("--long-prompts", choices=["skip", "error"], default="skip",
                      help="what to do with D's prompts over --max-prompt-len (held-out ones are skipped)")
    add_diagnostic_args(p.add_argument_group("diagnostics"), eval_every=1)
    add_system_args(p.add_argument_group("system: precision, parallelism, resume"), training=True)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.temperature <= 0:
        raise InputError(f"--temperature {args.temperature}: D must be sampled (> 0); greedy responses are "
                         "identical within a group, so every advantage would be 0")
    ctx, log, out = start_run(args)
    check_lineage(args.model)
    model, tokenizer = load_policy(args, ctx)
    chunked = use_chunked_lm_head(args, model)
    base = load_reference(args, ctx)  # frozen pi_0 for the exact-KL curves (None with --kl-rollouts 0)
    ids = fingerprints(model, tokenizer)
    pad_id, temperature = tokenizer.pad_token_id, args.temperature
    score = dict(ctx=ctx, pad_id=pad_id, temperature=temperature, chunked_lm_head=chunked)

    # ---- 1. the fixed data D: G samples per prompt from pi_0 (or reused), rewards, group advantages ----
    rollouts, group_size, prompt = sample_d(args, ctx, out, model, tokenizer, ids)
    rewards = torch.tensor([r["reward"] for r in rollouts]).view(-1, group_size)
    for r, a in zip(rollouts, group_advantages(rewards, args.adv_std_norm).view(-1).tolist()):
        r["advantage"] = a
    health = rollout_health(rollouts, group_size)
    if ctx.is_main:
        warn_if_no_signal(health, "stage-1 rollouts")
        print(f"D: {len(rollouts)} rollouts, accuracy {health['accuracy']:.3f}, "
              f"groups with signal {health['groups_with_signal']:.2f}, truncated {health['truncated']:.2f}")
    log.log(event="rollouts", num_rollouts=len(rollouts), num_prompts=len(rollouts) // group_size,
            samples_per_prompt=group_size, **health)

    # ---- 2. log pi_0 of every sampled token, with the training forward in epoch 0's layout -----------
    layout = epoch0_layout(len(rollouts), args, ctx)
    signals = {"logp_base": score_logprobs(model, rollouts, layout, desc="log pi_0", **score)}
    diagnostics = drift_diagnostics(args, ctx, tokenizer, rollouts, base, temperature=temperature, top_p=args.top_p,
                                    prompt=prompt, base_logp=signals["logp_base"])
    tags = ["teacher", "unlearned"] if args.unlearn else ["teacher"]
    keep_shards = shards_to_keep(out / "shards", args.resume and all(
        checkpoint_finished(out / f"checkpoint-{tag}", args.epochs) for tag in tags), ctx)

    # ---- 3. many epochs of weakly constrained off-policy optimisation on D: pi_T (and pi_U on -A) ----
    for tag, sign in zip(tags, (+1.0, -1.0)):
        if tag == "unlearned":  # pi_U starts from pi_0 again
            del model
            gc.collect()  # FSDP's hooks hold the teacher's shards in reference cycles
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            model, _ = load_policy(args, ctx)
        record = {"stage": 1, **ids, "base_model": args.model, "prompt_format": prompt,
                  "lineage": lineage(args.model, ids["base_fingerprint"])}

        def snapshot(policy, epoch, tag=tag, record=record):  # the curve's models: its best epoch can be evaluated
            if args.snapshot_every and epoch % args.snapshot_every == 0:
                save_pretrained_atomic(policy, tokenizer, out / f"{tag}-epoch{epoch}", ctx, {**record, "epoch": epoch})
        train_epochs(model, rollouts, teacher_loss(args, rollouts, signals["logp_base"], sign), ctx=ctx, log=log,
                     tag=tag, checkpoint=out / f"checkpoint-{tag}", diagnostics=diagnostics, summarize=summarize,
                     on_epoch=snapshot, pad_id=pad_id, temperature=temperature, **training_options(args, chunked))
        if not keep_shards:
            signals[f"logp_{tag}"] = score_logprobs(model, rollouts, layout, desc=f"log pi of the {tag}", **score)
        save_pretrained_atomic(model, tokenizer, out / tag, ctx, record)

    # ---- 4. the shards stage 2 reads ------------------------------------------------------------------
    if keep_shards:
        if ctx.is_main:
            print(f"kept the finished shards in {out}/shards")
    else:
        write_teacher_shards(out / "shards", rollouts, signals, {
            **ids, "base_model": args.model, "temperature": temperature, "top_p": args.top_p,
            "prompt_format": prompt, "num_prompts": len(rollouts) // group_size, "samples_per_prompt": group_size,
            "config": vars(args), "world_size": ctx.world}, ctx)
        if ctx.is_main:
            print(f"wrote {args.out}/teacher and the shards of {len(rollouts)} rollouts to {args.out}/shards")
    log.log(event="done")
    finish_output(Path(args.out), out, ctx)


def teacher_loss(args, rollouts, base_logp, sign: float):
    """--teacher-loss (+ --kl-coef) on a micro-batch, aggregated against the global batch's counts.
    sign -1 turns A into -A: the unlearned reference pi_U."""
    policy_loss = POLICY_LOSSES[args.teacher_loss]

    def loss_fn(indices, packed, logp, counts):
        mask = packed["mask"]
        old = pad_rows([base_logp[i] for i in indices], logp.device)
        seq_adv = torch.tensor([sign * rollouts[i]["advantage"] for i in indices], device=logp.device)
        terms = {"logp": logp, "old_logp": old, "adv": seq_adv[:, None].expand_as(logp), "seq_adv": seq_adv,
                 "mask": mask}
        values, clipped = policy_loss(terms, args)
        loss = aggregate(values, mask, counts, args.aggregation)
        if args.kl_coef:
            loss = loss + args.kl_coef * aggregate(kl_penalty(logp, old), mask, counts, args.aggregation)
        stats = {"tokens": mask.sum(), "abs_log_ratio": (log_ratio(logp.detach(), old) * mask).abs().sum()}
        if clipped is not None:
            stats["clipped"] = (clipped & mask).sum()
        return loss, stats
    return loss_fn


def summarize(stats):
    """Per-epoch stats: the mean |log rho| of the trained tokens, and for ppo the fraction clipped."""
    metrics = {"mean_abs_log_ratio": stats["abs_log_ratio"] / stats["tokens"]}
    if "clipped" in stats:
        metrics["clip_fraction"] = stats["clipped"] / stats["tokens"]
    return metrics


def sample_d(args, ctx, out: Path, model, tokenizer, ids):
    """(rollouts, G, prompt format): D sampled from pi_0 and written to OUT/rollouts, or read back
    (--rollouts, or --resume after D was written)."""
    saved = out / "rollouts"
    source = str(saved) if args.resume and (saved / "meta.json").is_file() else args.rollouts
    if source:  # D was sampled before: by an interrupted run of this OUT, or by another run
        rollouts, meta = read_rollouts(source, ids)
        for key in ("temperature", "top_p"):  # log pi_0 and the shards must score the distribution D came from
            if meta.get(key) != getattr(args, key):
                raise InputError(f"--rollouts {source}: D was sampled at {key} {meta.get(key)}, this run has "
                                 f"--{key.replace('_', '-')} {getattr(args, key)}; give the same value")
        if "prompt_format" not in meta:
            raise InputError(f"--rollouts {source}: meta.json records no prompt format (an older version wrote "
                             "it); sample D again")
        prompt = prompt_format(tokenizer, args.system_prompt, args.instruction,
                               bound=(meta["prompt_format"], f"{source}/meta.json"))
        return rollouts, meta["samples_per_prompt"], prompt
    prompt = prompt_format(tokenizer, args.system_prompt, args.instruction, default=recorded_prompt_format(args.model))
    data_seed = args.seed if args.data_seed is None else args.data_seed
    problems = load_problems(args.data, args.split, num=args.num_prompts, seed=data_seed)
    problems = encode_problems(tokenizer, problems, args.max_prompt_len, args.data, prompt, args.long_prompts)
    rollouts = sample_and_score(model, tokenizer, problems, args.samples_per_prompt, ctx=ctx, seed=args.seed,
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, batch_size=args.sample_batch_size, desc="sampling D")
    if ctx.is_main:
        write_rollouts(saved, rollouts, {p["index"]: p for p in problems}, {
            **ids, "samples_per_prompt": args.samples_per_prompt, "num_rows": len(rollouts), "prompt_format": prompt,
            "temperature": args.temperature, "top_p": args.top_p, "data": args.data, "model": args.model})
    if ctx.world > 1:
        torch.distributed.barrier()
    return rollouts, args.samples_per_prompt, prompt


def write_rollouts(directory: Path, rollouts, problems, meta: dict):
    """D as JSON lines (token ids, text, reward) plus meta.json: reusable with --rollouts."""
    lines = [json.dumps({"prompt_index": r["prompt_index"], "sample_index": r["sample_index"],
                         "prompt": problems[r["prompt_index"]]["prompt"],
                         "answer": problems[r["prompt_index"]]["answer"], "response": r["text"],
                         "reward": r["reward"], "truncated": r["truncated"],
                         "prompt_ids": r["prompt_ids"], "response_ids": r["response_ids"]})
             for r in rollouts]
    atomic_write_text(directory / "rollouts.jsonl", "\n".join(lines) + "\n")
    atomic_write_text(directory / "meta.json", json.dumps(meta, indent=1))


def read_rollouts(source: str, ids: dict):
    """(rollouts, meta) of D written by write_rollouts; refused if it came from another base or tokenizer."""
    directory = Path(source)
    if (directory / "rollouts").is_dir():
        directory = directory / "rollouts"
    meta_path, data_path = directory / "meta.json", directory / "rollouts.jsonl"
    if not meta_path.is_file() or not data_path.is_file():
        raise InputError(f"--rollouts {source}: expected meta.json and rollouts.jsonl in {directory}")
    meta = json.loads(meta_path.read_text())
    for key in ("base_fingerprint", "tokenizer_fingerprint"):
        if meta.get(key) != ids[key]:
            raise InputError(f"{meta_path}: {key} {meta.get(key)} does not match --model ({ids[key]}): "
                             "these rollouts were sampled from another model")
    rollouts = []
    with open(data_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                rollouts.append({k: row[k] for k in ("prompt_index", "sample_index", "prompt_ids",
                                                     "response_ids", "reward", "truncated")})
            except (json.JSONDecodeError, KeyError) as err:
                raise InputError(f"{data_path}:{line_no}: malformed rollout ({err})") from None
    group = meta["samples_per_prompt"]
    if len(rollouts) != meta["num_rows"] or len(rollouts) % group:
        raise InputError(f"{data_path}: {len(rollouts)} rows, meta.json says {meta['num_rows']} "
                         f"in groups of {group}")
    rollouts.sort(key=lambda r: (r["prompt_index"], r["sample_index"]))
    return rollouts, meta


if __name__ == "__main__":
    run_main(main)
