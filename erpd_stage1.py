"""ERPD stage 1: extract an "extreme region" teacher pi_T from a fixed set of rollouts.

    D = {(x, y_1..y_G)}: G samples per prompt from the base pi_0, rewards r in {0, 1} (verifier),
    group advantage A = r - mean_G(r)                                    (optionally / std)
    rho_t = pi_theta(y_t | s_t) / pi_0(y_t | s_t),  log rho clamped to [-20, 20]

    --teacher-loss ppo   -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)   eps_high = 10: weak
                   sapo  -(4 / tau) sigmoid(tau (rho - 1)) A,  tau = 1 (A > 0), 1.05 (A < 0)
                   ce    -A log pi_theta(y_t | s_t)
                   mse   (beta sum_t log rho_t - A)^2                           per sequence
    loss = sum over the global batch's tokens / its token count (mse: over sequences)
           + kl_coef * KL(pi_theta || pi_0)   (value k3, gradient k2: unbiased)

Many epochs (default 20) over the same D with a weak constraint: fast early gains, then drift
and entropy collapse: the curves in metrics.jsonl. `--unlearn` also trains pi_U from pi_0 on -A.
Writes OUT/rollouts/ (D, reusable with --rollouts), OUT/teacher/ (save_pretrained),
OUT/shards/ (per rank: token ids, rewards, advantages, log pi_0, log pi_T [, log pi_U] of every
sampled token [, the teacher's top-k ids and log-probs] + manifest.json) and OUT/metrics.jsonl.

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
    add_system_args, load_policy, load_reference,
    DEFAULT_MODEL, DEFAULT_TEST_DATA, DEFAULT_TRAIN_DATA, InputError, JsonlLogger, all_gather_objects,
    atomic_write_text, ce_loss, encode_problems, group_advantages, init_distributed, kl_penalty,
    load_problems, model_fingerprint, drift_metrics, heldout_accuracy, intact_shard, mse_loss, my_micro_batches, global_batches, pad_rows,
    ppo_clip_loss, rollout_health, rollouts_to_shard, run_main, sample_and_score, sapo_loss,
    score_rollouts, set_seed, tokenizer_fingerprint, train_epochs, warn_if_no_signal, write_shard,
    save_pretrained_atomic, SHARD_FORMAT_VERSION, log_ratio)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # model and data
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF folder or hub id of the base pi_0")
    p.add_argument("--data", default=DEFAULT_TRAIN_DATA, help="jsonl / parquet / hub id[:config]")
    p.add_argument("--split", default="train", help="dataset split (hub / folder datasets)")
    p.add_argument("--eval-data", default=DEFAULT_TEST_DATA, help="held-out problems for accuracy curves")
    p.add_argument("--eval-split", default="test", help="split of --eval-data")
    p.add_argument("--rollouts", default=None, help="reuse D from a previous stage-1 OUT (or OUT/rollouts)")
    p.add_argument("--out", default="runs/stage1", help="output folder (rollouts, teacher, shards, metrics)")
    p.add_argument("--system-prompt", default=None, help="system message for chat templates")
    p.add_argument("--max-prompt-len", type=int, default=1024, help="longer prompts are skipped or fatal")
    p.add_argument("--long-prompts", choices=["skip", "error"], default="skip", help="what to do with prompts over --max-prompt-len")
    # sampling D
    p.add_argument("--num-prompts", type=int, default=256, help="N: prompts in D (seeded subset)")
    p.add_argument("--samples-per-prompt", type=int, default=8, help="G: rollouts per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="response length limit")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling and scoring temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    p.add_argument("--sample-batch-size", type=int, default=128, help="sequences per sampling batch")
    # teacher optimisation
    p.add_argument("--teacher-loss", choices=["ppo", "sapo", "ce", "mse"], default="sapo")
    p.add_argument("--epochs", type=int, default=12, help="passes over D")
    p.add_argument("--batch-size", type=int, default=256, help="rollouts per optimizer step (global)")
    p.add_argument("--micro-batch", type=int, default=64, help="rollouts per forward (per rank)")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (real models: ~1e-6)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    p.add_argument("--adv-std-norm", action="store_true", help="A = (r - mean) / (std + 1e-6)")
    p.add_argument("--eps-low", type=float, default=0.2, help="ppo: lower clip")
    p.add_argument("--eps-high", type=float, default=10.0, help="ppo: upper clip (10: weakly constrained)")
    p.add_argument("--sapo-tau-pos", type=float, default=1.0, help="sapo: gate temperature where A > 0")
    p.add_argument("--sapo-tau-neg", type=float, default=1.05, help="sapo: gate temperature where A < 0")
    p.add_argument("--mse-beta", type=float, default=0.1, help="mse: beta in (beta sum log rho - A)^2")
    p.add_argument("--kl-coef", type=float, default=0.0, help="weight of KL(pi_theta || pi_0)")
    p.add_argument("--unlearn", action="store_true", help="also train pi_U from pi_0 on -A")
    p.add_argument("--teacher-topk", type=int, default=0,
                   help="also write the teacher's k most likely tokens and log-probs per position (0: off)")
    # diagnostics
    p.add_argument("--eval-every", type=int, default=4, help="held-out accuracy every k epochs (0: off)")
    p.add_argument("--eval-prompts", type=int, default=200, help="held-out problems per accuracy point")
    p.add_argument("--eval-samples", type=int, default=4, help="samples per held-out problem")
    p.add_argument("--kl-rollouts", type=int, default=256, help="rollouts of D for the exact-KL curve")
    # system
    add_system_args(p, training=True)
    return p.parse_args(argv)


def teacher_loss_fn(args, rollouts, base_logp, sign):
    """The chosen stage-1 loss on a micro-batch, normalised by the global batch's counts."""
    def loss_fn(indices, packed, logp, counts):
        mask = packed["mask"]
        old = pad_rows([base_logp[i] for i in indices], logp.device)
        seq_adv = torch.tensor([sign * rollouts[i]["advantage"] for i in indices], device=logp.device)
        adv = seq_adv[:, None].expand_as(logp)
        clipped = torch.zeros_like(mask)
        if args.teacher_loss == "mse":
            loss = mse_loss(logp, old, mask, seq_adv, args.mse_beta).sum() / counts["seqs"]
        else:
            if args.teacher_loss == "ppo":
                per_token, clipped = ppo_clip_loss(logp, old, adv, args.eps_low, args.eps_high)
            elif args.teacher_loss == "sapo":
                per_token = sapo_loss(logp, old, adv, args.sapo_tau_pos, args.sapo_tau_neg)
            else:
                per_token = ce_loss(logp, adv)
            loss = (per_token * mask).sum() / counts["tokens"]
        if args.kl_coef:
            loss = loss + args.kl_coef * (kl_penalty(logp, old) * mask).sum() / counts["tokens"]
        lr = log_ratio(logp.detach(), old) * mask
        return loss, {"tokens": mask.sum(), "clipped": (clipped & mask).sum(),
                      "abs_log_ratio": lr.abs().sum()}
    return loss_fn


def main(argv=None):
    args = parse_args(argv)
    ctx = init_distributed(args.dist_timeout_minutes)
    set_seed(args.seed)
    out = Path(args.out)
    log = JsonlLogger(out / "metrics.jsonl", enabled=ctx.is_main, append=args.resume)
    log.log(event="config", world_size=ctx.world, **vars(args))
    model, tokenizer = load_policy(args, ctx)
    base = load_reference(args, ctx) if args.kl_rollouts else None  # frozen pi_0 for the exact-KL curves on D
    fingerprints = {"base_fingerprint": model_fingerprint(model), "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)}
    vocab = model.get_output_embeddings().weight.shape[0]
    if not 0 <= args.teacher_topk <= vocab:
        raise InputError(f"--teacher-topk {args.teacher_topk}: expected 0 to the vocabulary size {vocab}")
    temperature = args.temperature if args.temperature > 0 else 1.0
    pad_id = tokenizer.pad_token_id

    # ---- 1. the fixed data D: sample from pi_0 (or reuse), score, group advantages --------------
    if args.resume and (out / "rollouts" / "meta.json").is_file():
        args.rollouts = str(out / "rollouts")  # D was sampled before the interruption
    if args.rollouts:
        rollouts, group_size = read_rollouts(args.rollouts, fingerprints)
    else:
        problems = load_problems(args.data, args.split, num=args.num_prompts, seed=args.seed)
        problems = encode_problems(tokenizer, problems, args.max_prompt_len, args.data,
                                   args.system_prompt, args.long_prompts)
        rollouts = sample_and_score(model, tokenizer, problems, args.samples_per_prompt, ctx=ctx,
                                    seed=args.seed, max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, top_p=args.top_p,
                                    batch_size=args.sample_batch_size, desc="sampling D")
        group_size = args.samples_per_prompt
        answers = {p["index"]: p for p in problems}
        if ctx.is_main:
            write_rollouts(out / "rollouts", rollouts, answers, fingerprints, args)
        if ctx.world > 1:
            torch.distributed.barrier()
    rewards = torch.tensor([r["reward"] for r in rollouts]).view(-1, group_size)
    for r, a in zip(rollouts, group_advantages(rewards, args.adv_std_norm).view(-1).tolist()):
        r["advantage"] = a
    health = rollout_health(rollouts, group_size)
    if ctx.is_main:
        warn_if_no_signal(health, "stage-1 rollouts")
        print(f"D: {len(rollouts)} rollouts, accuracy {health['accuracy']:.3f}, "
              f"groups with signal {health['groups_with_signal']:.2f}, truncated {health['truncated']:.2f}")
    log.log(event="rollouts", num_rollouts=len(rollouts), **health)

    # ---- 2. log pi_0 of every sampled token, with the training forward in epoch 0's layout -----
    layout = [mb for b in global_batches(len(rollouts), args.batch_size, args.seed, 0)
              for mb in my_micro_batches(b, ctx, args.micro_batch)]
    base_logp = [s["logp"] for s in score_rollouts(model, rollouts, layout, pad_id=pad_id, temperature=temperature,
                                                   ctx=ctx, chunked_lm_head=args.chunked_lm_head, desc="log pi_0")]
    eval_problems = None
    if args.eval_every:
        eval_problems = encode_problems(tokenizer, load_problems(args.eval_data, args.eval_split,
                                                                 num=args.eval_prompts, seed=args.seed),
                                        args.max_prompt_len, args.eval_data, args.system_prompt)
    kl_subset = torch.randperm(len(rollouts), generator=torch.Generator().manual_seed(args.seed))
    kl_subset = kl_subset[:args.kl_rollouts].tolist()

    def diagnostics(policy, epoch):
        """Exact token KL(policy || pi_0) and entropy on D's states; held-out accuracy every k epochs."""
        metrics = drift_metrics(policy, rollouts, kl_subset, ctx=ctx, pad_id=pad_id, temperature=temperature,
                                micro_batch=args.micro_batch, ref_model=base)
        if eval_problems and (epoch % args.eval_every == 0 or epoch == args.epochs):
            metrics["heldout_accuracy"] = heldout_accuracy(
                policy, tokenizer, eval_problems, args.eval_samples, ctx=ctx, seed=args.seed + 1,
                max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                batch_size=args.sample_batch_size)
        return metrics

    # ---- 3. many epochs of weakly constrained off-policy optimisation on D ---------------------
    def train(policy, sign, tag):
        def summarize(stats):
            return {"clip_fraction": stats["clipped"] / stats["tokens"],
                    "mean_abs_log_ratio": stats["abs_log_ratio"] / stats["tokens"]}
        train_epochs(policy, rollouts, teacher_loss_fn(args, rollouts, base_logp, sign), args=args, ctx=ctx,
                     pad_id=pad_id, temperature=temperature, checkpoint=out / f"checkpoint-{tag}", log=log,
                     diagnostics=diagnostics, summarize=summarize, tag=tag)

    # a resumed run keeps the shards a previous run finished (sha256 checked) if every rank has its own
    # and no training is left to do (else they hold a teacher this run is about to change)
    def trained_to_the_end(tag):
        state = out / f"checkpoint-{tag}" / "state.json"
        return state.is_file() and json.loads(state.read_text())["epoch"] > args.epochs
    shard_name = f"rank{ctx.rank:05d}-of-{ctx.world:05d}.safetensors"
    finished = args.resume and all(trained_to_the_end(t) for t in ["teacher"] + (["unlearned"] if args.unlearn else []))
    keep_shards = all(all_gather_objects(bool(finished and intact_shard(out / "shards" / shard_name)), ctx))
    signal_names = (["logp_base", "logp_teacher"] + (["logp_unlearned"] if args.unlearn else [])
                    + (["topk_logp_teacher", "topk_ids_teacher"] if args.teacher_topk else []))
    signals = {"logp_base": base_logp}

    def score(policy, name, top_k=0):
        if not keep_shards:
            scores = score_rollouts(policy, rollouts, layout, pad_id=pad_id, temperature=temperature, ctx=ctx,
                                    chunked_lm_head=args.chunked_lm_head, top_k=top_k, desc=name)
            signals[name] = [s["logp"] for s in scores]
            if top_k:
                signals["topk_logp_teacher"] = [s["topk_logp"] for s in scores]
                signals["topk_ids_teacher"] = [s["topk_ids"] for s in scores]

    train(model, +1.0, "teacher")
    score(model, "logp_teacher", args.teacher_topk)
    save_pretrained_atomic(model, tokenizer, out / "teacher", ctx, {"stage": 1, **fingerprints})
    if args.unlearn:
        del model
        gc.collect()  # FSDP's hooks hold the teacher's shards in reference cycles
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        unlearned, _ = load_policy(args, ctx)
        train(unlearned, -1.0, "unlearned")
        score(unlearned, "logp_unlearned")
        save_pretrained_atomic(unlearned, tokenizer, out / "unlearned", ctx, {"stage": 1, **fingerprints})

    # ---- 4. shards: this rank writes rollouts[rank::world]; rank 0 writes the manifest ----------
    mine = list(range(ctx.rank, len(rollouts), ctx.world))
    if keep_shards:
        digest = intact_shard(out / "shards" / shard_name)
        if ctx.is_main:
            print(f"kept the finished shards in {out}/shards")
    else:
        tensors = rollouts_to_shard([rollouts[i] for i in mine], {k: [signals[k][i] for i in mine] for k in signal_names})
        digest = write_shard(out / "shards" / shard_name, tensors)
    entries = all_gather_objects({"file": shard_name, "rows": len(mine), "sha256": digest}, ctx)
    if ctx.is_main:
        manifest = {"format_version": SHARD_FORMAT_VERSION, **fingerprints, "base_model": args.model,
                    "temperature": temperature, "samples_per_prompt": group_size, "teacher_topk": args.teacher_topk,
                    "num_rows": len(rollouts), "signals": signal_names, "shards": entries,
                    "config": vars(args), "world_size": ctx.world}
        atomic_write_text(out / "shards" / "manifest.json", json.dumps(manifest, indent=1))
        print(f"wrote {out}/teacher and {len(entries)} shard(s) with {len(rollouts)} rollouts to {out}/shards")
    log.log(event="done")


def write_rollouts(directory: Path, rollouts, problems, fingerprints, args):
    """D as JSON lines (token ids, text, reward) plus meta.json: reusable with --rollouts."""
    lines = [json.dumps({"prompt_index": r["prompt_index"], "sample_index": r["sample_index"],
                         "prompt": problems[r["prompt_index"]]["prompt"],
                         "answer": problems[r["prompt_index"]]["answer"], "response": r["text"],
                         "reward": r["reward"], "truncated": r["truncated"],
                         "prompt_ids": r["prompt_ids"], "response_ids": r["response_ids"]})
             for r in rollouts]
    atomic_write_text(directory / "rollouts.jsonl", "\n".join(lines) + "\n")
    meta = {**fingerprints, "samples_per_prompt": args.samples_per_prompt, "num_rows": len(rollouts),
            "temperature": args.temperature, "data": args.data, "model": args.model}
    atomic_write_text(directory / "meta.json", json.dumps(meta, indent=1))


def read_rollouts(source: str, fingerprints: dict):
    """Read D written by write_rollouts; refuse it if it came from another base or tokenizer."""
    directory = Path(source)
    if (directory / "rollouts").is_dir():
        directory = directory / "rollouts"
    meta_path, data_path = directory / "meta.json", directory / "rollouts.jsonl"
    if not meta_path.is_file() or not data_path.is_file():
        raise InputError(f"--rollouts {source}: expected meta.json and rollouts.jsonl in {directory}")
    meta = json.loads(meta_path.read_text())
    for key in ("base_fingerprint", "tokenizer_fingerprint"):
        if meta.get(key) != fingerprints[key]:
            raise InputError(f"{meta_path}: {key} {meta.get(key)} does not match --model ({fingerprints[key]}): "
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
    return rollouts, group


if __name__ == "__main__":
    run_main(main)
