"""ERPD's shared module: the method first, then the machinery that runs it, then infrastructure.

Part I. The method (pure functions of tensors; the tests call them without a model)
    advantages            group_advantages, distill_token_advantages
    policy losses         ppo_clip_loss, sapo_loss, ce_loss, mse_loss, kl_penalty; POLICY_LOSSES
    aggregation           aggregate: the loss contract and how a loss becomes a number
    log-probs / KL        token_logprobs, lm_head_logprobs, token_entropy, token_kl
    the shard format      build_shard, write_teacher_shards, read_teacher_shards, fingerprints
Part II. The machinery
    data and prompts      load_problems, encode_prompt, encode_problems
    models                load_model, load_policy, load_reference
    sampling              sample_responses, sample_and_score, heldout_accuracy
    scoring               pack_rollouts, response_logprobs, score_rollouts, drift_metrics
    training loop         train_step, train_epoch, train_epochs
    what both stages do   start_run, epoch0_layout, score_logprobs, drift_diagnostics
Part III. Infrastructure
    distributed           Context, init_distributed, all_reduce_gradients, run_main
    FSDP                  shard_model, load_sharded, full_weights, full_state_dicts
    files                 checkpoints, save_pretrained_atomic, atomic writes, JsonlLogger, progress
Appendix. Answer checking  extract_answer, verify, math_reward (model output is parsed, never evaluated)

Shapes: B sequences, T response positions (prompt positions never get logits), V vocabulary.
"""

from __future__ import annotations

import cmath
import contextlib
import datetime
import functools
import gc
import hashlib
import inspect
import json
import math
import os
import random
import re
import socket
import sys
import time
from fractions import Fraction
from pathlib import Path

import sympy
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = str(ROOT / "tiny" / "model")
DEFAULT_TRAIN_DATA = str(ROOT / "tiny" / "train.jsonl")
DEFAULT_TEST_DATA = str(ROOT / "tiny" / "test.jsonl")


class InputError(Exception):
    """Bad input from the user (data, shards, flags): reported as one line, never a traceback."""


# #################################################################################################
# Part I. The method
# #################################################################################################
#
# ERPD (Chen, Wang, Yan, 2026, https://arxiv.org/abs/2605.25582). Stage 1 samples a fixed set D of G
# responses per prompt from the base pi_0, rewards them with a verifier, and trains an "extreme region"
# teacher pi_T on D with many weakly constrained off-policy epochs. Stage 2 starts again from pi_0 and
# distils the teacher's token-level signal, log pi_T - log pi_0 on D's tokens, under a tight trust region.
# Notation: rho_t = pi_theta(y_t | s_t) / pi_0(y_t | s_t), s_t = (x, y_<t).

LOG_RATIO_CLAMP = 20.0  # log-ratios are clamped to [-20, 20] before exp: exp never overflows


# ---- advantages ---------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, normalize_std: bool = False) -> torch.Tensor:
    """A = r - mean(r) over each prompt's G rollouts, optionally / (std + 1e-6) (GRPO,
    https://arxiv.org/abs/2402.03300). rewards [N, G] -> [N, G].

    A group whose rewards are all equal gets A = 0: it carries no signal.
    """
    adv = rewards - rewards.mean(-1, keepdim=True)
    if normalize_std:
        adv = adv / (rewards.std(-1, keepdim=True, unbiased=False) + 1e-6)
    # exactly 0 for equal rewards: mean() rounding (e.g. 16 x 0.7) / tiny std must not become signal
    return adv.masked_fill((rewards == rewards[..., :1]).all(-1, keepdim=True), 0.0)


def distill_token_advantages(delta, clip_c: float = 2.0, alpha: float = 0.0, seq_adv=None):
    """Stage 2's token advantage A_t = clip(delta_t, -c, c) + alpha * A_seq.

    delta [B, T]: the teacher's signal, log pi_T - log pi_0 (or - log pi_U); seq_adv [B] -> [B, T].
    """
    adv = delta.clamp(-clip_c, clip_c)
    if alpha and seq_adv is not None:
        adv = adv + alpha * seq_adv[:, None]
    return adv


# ---- policy losses: per token [B, T] (or per sequence [B]), before aggregation -----------------------

def log_ratio(logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    """log rho = log pi_theta - log pi_old, clamped to [-20, 20]. [B, T] -> [B, T]."""
    return (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def ppo_clip_loss(logp, old_logp, adv, eps_low: float, eps_high: float):
    """PPO's clipped surrogate -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)
    (https://arxiv.org/abs/1707.06347; separate low / high clips as in DAPO, https://arxiv.org/abs/2503.14476).

    logp, old_logp [B, T]; adv [B, T] or [B, 1]. Returns (loss [B, T], clipped [B, T] bool: the clipped
    branch was taken, so the token gets no gradient). The clip stops a token's ratio from being pushed
    further out of [1 - eps_low, 1 + eps_high]; it does not bound the ratio itself.
    """
    rho = torch.exp(log_ratio(logp, old_logp))
    unclipped = rho * adv
    clipped = torch.clamp(rho, 1 - eps_low, 1 + eps_high) * adv
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def sapo_loss(logp, old_logp, adv, tau_pos: float = 1.0, tau_neg: float = 1.05):
    """SAPO's soft-gated loss -(4 / tau) sigmoid(tau (rho - 1)) A, tau = tau_pos where A > 0 else tau_neg
    (Soft Adaptive Policy Optimization, https://arxiv.org/abs/2511.20347). [B, T] -> [B, T].

    At rho = 1 its gradient equals the policy gradient -A grad log pi; far from 1 the gate decays
    smoothly instead of cutting off, so there is no clip fraction to report.
    """
    rho = torch.exp(log_ratio(logp, old_logp))
    tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))
    return -(4.0 / tau) * torch.sigmoid(tau * (rho - 1.0)) * adv


def ce_loss(logp, adv):
    """Advantage-weighted cross-entropy -A log pi(y_t | s_t): no ratio, no clip. [B, T] -> [B, T]."""
    return -adv * logp


def mse_loss(logp, old_logp, mask, seq_adv, beta: float = 0.1):
    """(beta * sum_t log rho_t - A)^2 per sequence: regress the sequence log-ratio onto the advantage, so
    the teacher's log-ratio to pi_0 becomes an estimate of A even where sampling from it is degenerate.

    logp, old_logp, mask [B, T], seq_adv [B] -> [B].
    """
    seq_log_ratio = (log_ratio(logp, old_logp) * mask).sum(-1)
    return (beta * seq_log_ratio - seq_adv) ** 2


def kl_penalty(logp, ref_logp):
    """Per-token KL(pi_theta || pi_0) term for tokens sampled from pi_0 (D), not from pi_theta:
    f(rho) = rho log rho - rho + 1. [B, T] -> [B, T], >= 0.

    Its value is an unbiased estimate of KL(pi_theta || pi_0) at the state (E_pi0[rho log rho] =
    E_pi_theta[log rho], E_pi0[rho] = 1), and its gradient, rho log rho grad log pi_theta, is an
    unbiased estimate of grad KL. The usual k2 = (log rho)^2 / 2 has an unbiased gradient only for
    tokens sampled from pi_theta; on pi_0's tokens it follows E_pi0[(log rho)^2 / 2], another
    divergence (Schulman, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html).
    """
    lr = log_ratio(logp, ref_logp)
    rho = torch.exp(lr)
    return rho * lr - rho + 1.0


# ---- the loss contract and aggregation ----------------------------------------------------------------
#
# A policy loss is a pure function of one micro-batch's tensors, registered in POLICY_LOSSES under the name
# --teacher-loss takes. It gets `t` with
#     "logp"      [B, T] log pi_theta of the sampled tokens (differentiable)
#     "old_logp"  [B, T] log pi_0 of the same tokens (fixed, computed before training)
#     "adv"       [B, T] the token advantage;  "seq_adv" [B] the sequence advantage;  "mask" [B, T] bool
# and the parsed flags `args`, and returns (values, clipped): values [B, T] per token or [B] per sequence,
# clipped [B, T] bool where a hard clip cut the gradient (None for a loss without one). `aggregate` then
# turns the values into this micro-batch's share of the global batch's mean, so that gradients summed over
# micro-batches and ranks depend on neither. Adding a loss: write the function above and add one line here
# (plus a flag for any new hyper-parameter).

POLICY_LOSSES = {
    "ppo": lambda t, args: ppo_clip_loss(t["logp"], t["old_logp"], t["adv"], args.eps_low, args.eps_high),
    "sapo": lambda t, args: (sapo_loss(t["logp"], t["old_logp"], t["adv"], args.sapo_tau_pos, args.sapo_tau_neg),
                             None),
    "ce": lambda t, args: (ce_loss(t["logp"], t["adv"]), None),
    "mse": lambda t, args: (mse_loss(t["logp"], t["old_logp"], t["mask"], t["seq_adv"], args.mse_beta), None),
}

AGGREGATIONS = ("token-mean", "seq-mean-token-mean")


def aggregate(values: torch.Tensor, mask: torch.Tensor, counts: dict, mode: str = "token-mean") -> torch.Tensor:
    """This micro-batch's share of the global batch's mean loss: a scalar.

    values [B, T] per token, or [B] per sequence (a sequence's value stands for each of its tokens, so
    sequence- and token-level terms share one scale); mask [B, T]; counts: the global batch's
    {"tokens": ..., "seqs": ...}, so the sum over micro-batches and ranks is the mean over the batch.
        token-mean           sum over the batch's tokens / global token count: every token weighs the same
                             (long responses weigh more; DAPO's choice)
        seq-mean-token-mean  each response's token mean, summed / global response count: every response
                             weighs the same (GRPO's original form)
    """
    if values.dim() == 1:
        values = values[:, None].expand(mask.shape)
    if mode == "token-mean":
        return (values * mask).sum() / counts["tokens"]
    if mode == "seq-mean-token-mean":
        return ((values * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / counts["seqs"]
    raise ValueError(f"unknown aggregation {mode!r}; expected one of {AGGREGATIONS}")


# ---- log-probs, entropy and KL over the vocabulary ----------------------------------------------------
#
# Every function here takes logits [..., V] in any float dtype and works in float32 in row chunks: a
# [B, T, V] float32 copy of 150k-vocabulary logits would be the largest tensor of a training step.

CHUNK_ELEMENTS = 1 << 21  # rows per chunk = CHUNK_ELEMENTS // V: a few MB of float32 working memory
# On a GPU 8 MB chunks would be bound by kernel launches (13 rows at V = 152k: ~600 chunks of ~7 kernels
# for an 8k-token micro-batch); 64 MB chunks take ~75. Chosen by that count, not yet timed on a GPU.
GPU_CHUNK_ELEMENTS = 1 << 24


def _rows_per_chunk(flat: torch.Tensor) -> int:
    """Rows of a [N, V] tensor per chunk of the row-wise loops below."""
    elements = CHUNK_ELEMENTS if flat.device.type == "cpu" else GPU_CHUNK_ELEMENTS
    return max(1, elements // flat.shape[-1])


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 -> fp32; fp32 and fp64 unchanged (float64 keeps gradcheck exact)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _TokenLogprob(torch.autograd.Function):
    """log softmax(logits / T)[label], row chunk by row chunk; backward recomputes the softmax.

    Only the [N] log-sum-exp is saved, so neither pass ever holds a float32 copy of [N, V].
    """

    @staticmethod
    def forward(ctx, logits, labels, temperature):
        flat, lab = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        out_dtype = _upcast(logits[:0]).dtype
        out = torch.empty(lab.shape[0], dtype=out_dtype, device=logits.device)
        lse = torch.empty_like(out)
        step = _rows_per_chunk(flat)
        for s in range(0, flat.shape[0], step):
            x = _upcast(flat[s:s + step]) / temperature
            lse[s:s + step] = torch.logsumexp(x, dim=-1)
            out[s:s + step] = x.gather(1, lab[s:s + step, None]).squeeze(1) - lse[s:s + step]
        ctx.save_for_backward(logits, labels, lse)
        ctx.temperature = temperature
        return out.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels, lse = ctx.saved_tensors
        flat, lab = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        g_out = grad_out.reshape(-1).to(lse.dtype)
        grad = torch.empty_like(flat)
        step = _rows_per_chunk(flat)
        for s in range(0, flat.shape[0], step):
            g = flat[s:s + step].to(lse.dtype, copy=True)  # one working copy, then in place
            if ctx.temperature != 1.0:
                g.div_(ctx.temperature)
            g.sub_(lse[s:s + step, None]).exp_().mul_(-g_out[s:s + step, None])  # -p * g
            g.scatter_add_(1, lab[s:s + step, None], g_out[s:s + step, None])   # + onehot * g
            if ctx.temperature != 1.0:
                g.div_(ctx.temperature)
            grad[s:s + step] = g
        return grad.view(logits.shape), None, None


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(label | state) under softmax(logits / temperature), the distribution the samples came from.

    logits [..., V] (fp32 / bf16 / fp16), labels [...] -> [...] float32 (float64 for float64 input).
    Differentiable; memory beyond the logits is O(rows-per-chunk x V), see _TokenLogprob.
    """
    return _TokenLogprob.apply(logits, labels, float(temperature))


LM_HEAD_CHUNK_ELEMENTS = 1 << 24  # 64 MB of float32 logits per chunk: ~110 rows at V = 152k, GEMMs big enough


class _LMHeadLogprob(torch.autograd.Function):
    """log softmax(h W^T / T)[label] for hidden rows h, chunk by chunk: logits are never whole.

    Forward keeps only the [N] log-sum-exp; backward recomputes each chunk's logits and returns
    the gradients for the hidden states and the LM-head weight (accumulated in float32).
    With with_entropy, forward also returns the entropy per row (no gradient), else an empty tensor.
    The projection runs in float32 in both passes with autocast off, whatever the hidden states' dtype,
    as float32_lm_head makes the model's own head do: bf16 logits would put noise into rho.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, with_entropy):
        out = torch.empty(labels.shape[0], dtype=_upcast(hidden[:0]).dtype, device=hidden.device)
        lse = torch.empty_like(out)
        entropy = torch.empty_like(out) if with_entropy else out[:0].clone()
        step = max(16, LM_HEAD_CHUNK_ELEMENTS // weight.shape[0])
        with torch.autocast(hidden.device.type, enabled=False):
            w = _upcast(weight)
            for s in range(0, hidden.shape[0], step):
                x = (_upcast(hidden[s:s + step]) @ w.T) / temperature
                lse[s:s + step] = torch.logsumexp(x, dim=-1)
                out[s:s + step] = x.gather(1, labels[s:s + step, None]).squeeze(1) - lse[s:s + step]
                if with_entropy:
                    entropy[s:s + step] = token_entropy(x, 1.0)  # x is already divided by the temperature
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.temperature, ctx.step = temperature, step
        ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    def backward(ctx, grad_out, _grad_entropy):
        hidden, weight, labels, lse = ctx.saved_tensors
        step = ctx.step
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = _upcast(weight)
            for s in range(0, hidden.shape[0], step):
                h, g = _upcast(hidden[s:s + step]), grad_out[s:s + step, None].to(lse.dtype)
                d = h @ w.T                                            # the forward's logits, recomputed
                if ctx.temperature != 1.0:
                    d.div_(ctx.temperature)
                d.sub_(lse[s:s + step, None]).exp_().mul_(-g)          # -p * g
                d.scatter_add_(1, labels[s:s + step, None], g)         # + onehot * g
                if ctx.temperature != 1.0:
                    d.div_(ctx.temperature)                            # d logp / d logits
                grad_h[s:s + step] = d @ w
                grad_w.addmm_(d.T, h)
        return grad_h, grad_w.to(weight.dtype), None, None, None


def lm_head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                     temperature: float = 1.0, with_entropy: bool = False):
    """token_logprobs(hidden @ weight.T, labels) without materialising the logits; the projection in float32.

    hidden [..., H], weight [V, H] (a bias-free nn.Linear LM head), labels [...] -> [...] float32;
    with_entropy: (log-probs, token_entropy of the same logits [...], no gradient).
    """
    flat, entropy = _LMHeadLogprob.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                         float(temperature), with_entropy)
    return (flat.view(labels.shape), entropy.view(labels.shape)) if with_entropy else flat.view(labels.shape)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position: [..., V] -> [...] float32.

    A diagnostic (no gradient needed), computed in row chunks under no_grad.
    """
    flat = logits.detach().reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=_upcast(flat[:0]).dtype, device=flat.device)
    step = _rows_per_chunk(flat)
    with torch.no_grad():
        for s in range(0, flat.shape[0], step):
            logp = torch.log_softmax(_upcast(flat[s:s + step]) / temperature, dim=-1)
            out[s:s + step] = -(logp.exp() * logp).sum(-1)
    return out.view(logits.shape[:-1])


def token_kl(logits_p: torch.Tensor, logits_q: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Exact KL(p || q) over the full vocabulary per position: [..., V] x2 -> [...] float32, >= 0.

    Differentiable in both arguments (the chunks are kept for backward, so with gradients the
    memory is that of one float32 copy; as a diagnostic call it under no_grad).
    """
    fp, fq = logits_p.reshape(-1, logits_p.shape[-1]), logits_q.reshape(-1, logits_q.shape[-1])
    step = _rows_per_chunk(fp)
    parts = []
    for s in range(0, fp.shape[0], step):
        logp = torch.log_softmax(_upcast(fp[s:s + step]) / temperature, dim=-1)
        logq = torch.log_softmax(_upcast(fq[s:s + step]) / temperature, dim=-1)
        parts.append((logp.exp() * (logp - logq)).sum(-1).clamp(min=0.0))
    return torch.cat(parts).view(logits_p.shape[:-1])


# ---- the shard format: what stage 1 hands to stage 2 -------------------------------------------------
#
# One safetensors file per stage-1 rank (rollouts[rank::world]) plus manifest.json. A file holds, flat:
#     per rollout [n]          SHARD_ROWS below (prompt_index, sample_index, lengths, reward, advantage, ...)
#     token ids               "token_ids" [sum(P_i + T_i)] with "token_offsets" [n + 1]
#     per response token      one float32 array [sum(T_i)] per signal: "logp_base" (log pi_0), "logp_teacher"
#                             (log pi_T) and, with --unlearn, "logp_unlearned" (log pi_U)
# The manifest records the format version, the base model's and tokenizer's fingerprints, the sampling
# settings, the config, the row counts and every file's sha256. Files are written atomically.

SHARD_FORMAT_VERSION = 2  # 2: the manifest records the prompt format, top_p and D's shape
SHARD_ROWS = {  # per-rollout columns: name -> dtype
    "prompt_index": torch.int64, "sample_index": torch.int64, "prompt_len": torch.int64,
    "response_len": torch.int64, "reward": torch.float32, "advantage": torch.float32, "truncated": torch.uint8,
}


def build_shard(rollouts: list[dict], signals: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The tensors of one shard file: SHARD_ROWS, the token ids with offsets, one array per signal."""
    lengths = [len(r["prompt_ids"]) + len(r["response_ids"]) for r in rollouts]
    offsets = torch.zeros(len(rollouts) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    columns = {"prompt_len": [len(r["prompt_ids"]) for r in rollouts],
               "response_len": [len(r["response_ids"]) for r in rollouts]}
    shard = {name: torch.tensor(columns.get(name) or [r[name] for r in rollouts], dtype=dtype)
             for name, dtype in SHARD_ROWS.items()}
    shard["token_ids"] = torch.tensor([t for r in rollouts for t in r["prompt_ids"] + r["response_ids"]],
                                      dtype=torch.int64)
    shard["token_offsets"] = offsets
    for name, values in signals.items():
        shard[name] = torch.cat(values).float() if values else torch.zeros(0)
    return shard


def shard_to_rollouts(shard: dict[str, torch.Tensor], signal_names: list[str]) -> list[dict]:
    """Inverse of build_shard: rollout dicts with one [T_i] tensor per signal."""
    rows, resp_start = [], 0
    for i in range(shard["prompt_index"].shape[0]):
        start, end = int(shard["token_offsets"][i]), int(shard["token_offsets"][i + 1])
        p_len, t_len = int(shard["prompt_len"][i]), int(shard["response_len"][i])
        ids = shard["token_ids"][start:end].tolist()
        row = {"prompt_index": int(shard["prompt_index"][i]), "sample_index": int(shard["sample_index"][i]),
               "prompt_ids": ids[:p_len], "response_ids": ids[p_len:], "reward": float(shard["reward"][i]),
               "advantage": float(shard["advantage"][i]), "truncated": bool(shard["truncated"][i])}
        for name in signal_names:
            row[name] = shard[name][resp_start:resp_start + t_len]
        resp_start += t_len
        rows.append(row)
    return rows


def shard_file_name(ctx) -> str:
    return f"rank{ctx.rank:05d}-of-{ctx.world:05d}.safetensors"


def write_teacher_shards(directory, rollouts: list[dict], signals: dict[str, list[torch.Tensor]],
                         manifest: dict, ctx) -> None:
    """Every rank writes its rollouts[rank::world] with their signals; rank 0 then writes manifest.json
    (the given fields plus the format version, the signals, the row counts and each file's sha256)."""
    directory = Path(directory)
    mine = list(range(ctx.rank, len(rollouts), ctx.world))
    name = shard_file_name(ctx)
    tensors = build_shard([rollouts[i] for i in mine], {k: [v[i] for i in mine] for k, v in signals.items()})
    digest = write_shard(directory / name, tensors)
    entries = all_gather_objects({"file": name, "rows": len(mine), "sha256": digest}, ctx)
    if ctx.is_main:
        atomic_write_text(directory / "manifest.json", json.dumps(
            {"format_version": SHARD_FORMAT_VERSION, **manifest, "num_rows": len(rollouts),
             "signals": list(signals), "shards": entries}, indent=1))


def shards_to_keep(directory, finished: bool, ctx) -> bool:
    """A resumed run keeps the shards a previous run finished (every rank's file intact, sha256 checked, and
    the manifest rank 0 writes last) when no training is left to do; otherwise they hold a teacher this run
    is about to change, or a kill stopped before the manifest."""
    directory = Path(directory)
    complete = finished and (directory / "manifest.json").is_file() and intact_shard(directory / shard_file_name(ctx))
    return all(all_gather_objects(bool(complete), ctx))


def read_teacher_shards(directory, base_fingerprint: str | None = None,
                        tokenizer_fp: str | None = None) -> tuple[dict, list[dict]]:
    """Validate a stage-1 shard folder against its manifest and return (manifest, rollouts).

    Checks: manifest present and of this format version, base model and tokenizer fingerprints
    (when given), each shard's sha256 and row count. Any mismatch is an InputError naming it.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise InputError(f"{directory}: no manifest.json (not a stage-1 shard folder, or stage 1 did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{manifest_path}: corrupt manifest ({err.msg})") from None
    if manifest.get("format_version") != SHARD_FORMAT_VERSION:
        raise InputError(f"{manifest_path}: format_version {manifest.get('format_version')}, "
                         f"this code reads {SHARD_FORMAT_VERSION}")
    if base_fingerprint and manifest["base_fingerprint"] != base_fingerprint:
        raise InputError(f"{manifest_path}: shards were made from base model {manifest['base_model']} "
                         f"(fingerprint {manifest['base_fingerprint']}), not from --model "
                         f"(fingerprint {base_fingerprint})")
    if tokenizer_fp and manifest["tokenizer_fingerprint"] != tokenizer_fp:
        raise InputError(f"{manifest_path}: tokenizer fingerprint {manifest['tokenizer_fingerprint']} "
                         f"differs from --model's tokenizer ({tokenizer_fp})")
    rollouts = []
    for entry in manifest["shards"]:
        path = directory / entry["file"]
        if not path.is_file():
            raise InputError(f"{path}: listed in the manifest but missing")
        if sha256_file(path) != entry["sha256"]:
            raise InputError(f"{path}: sha256 mismatch (truncated or corrupt shard)")
        try:
            shard = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise InputError(f"{path}: unreadable shard ({err})") from None
        rows = shard_to_rollouts(shard, manifest["signals"])
        if len(rows) != entry["rows"]:
            raise InputError(f"{path}: {len(rows)} rows, manifest says {entry['rows']}")
        rollouts.extend(rows)
    if len(rollouts) != manifest["num_rows"]:
        raise InputError(f"{manifest_path}: {len(rollouts)} rows in shards, manifest says {manifest['num_rows']}")
    rollouts.sort(key=lambda r: (r["prompt_index"], r["sample_index"]))
    return manifest, rollouts


def model_fingerprint(model) -> str:
    """Hash of parameter names, shapes and a strided sample of values rounded to bfloat16.

    Rounding to bf16 makes it the same whether the base was loaded in fp32 or bf16, so a
    bf16 stage 1 and an fp32 stage 2 of the same checkpoint agree, and any other model differs.
    """
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        if hasattr(p, "full_tensor"):  # FSDP shard: every rank calls this together
            p = p.full_tensor()
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(f"{name}:{tuple(p.shape)}:".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    text = json.dumps([vocab, tokenizer.all_special_tokens, tokenizer.chat_template or ""])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprints(model, tokenizer) -> dict:
    """What identifies the base: stage 2, --rollouts and lineage records check it."""
    return {"base_fingerprint": model_fingerprint(model), "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)}


# #################################################################################################
# Part II. The machinery: data, models, sampling, scoring, the training loop
# #################################################################################################

# ---- data and prompts ---------------------------------------------------------------------------

QUESTION_FIELDS = ("prompt", "problem", "question")
ANSWER_FIELDS = ("answer", "solution")  # "answer" first: MATH-500 has both, the short one is gold
# Math RL recipes for instruct models (Qwen2.5-Math's own, DeepSeek-R1-style) ask for the final answer in a box:
# without it a chat model answers in prose, and the reward falls back to "the answer is" and bare numbers.
DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PLAIN_PROMPT_TEMPLATE = "Question: {question}\n{instruction}Answer: "  # for tokenizers without a chat template


def _read_rows(source: str, split: str):
    """Yield (location, row) from a local jsonl/json/parquet file or a hub dataset id."""
    path = Path(source)
    if not path.exists() and (path.suffix in (".jsonl", ".json", ".parquet") or source.startswith((".", "/"))):
        raise InputError(f"{source}: no such data file")
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        if path.stat().st_size == 0:
            raise InputError(f"{source}: the data file is empty")
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise InputError(f"{source}:{line_no}: malformed JSON line ({err.msg})") from None
                if not isinstance(row, dict):
                    raise InputError(f"{source}:{line_no}: expected a JSON object per line")
                yield f"{source}:{line_no}", row
        return
    import datasets  # imported lazily: slow, and only needed for parquet / hub data

    if path.is_file() and path.suffix == ".parquet":
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    elif path.is_dir():
        ds = datasets.load_dataset(str(path), split=split)
    else:
        name, _, config = source.partition(":")  # "openai/gsm8k:main"
        try:
            ds = datasets.load_dataset(name, config or None, split=split)
        except Exception as err:  # noqa: BLE001 - any loader failure is a user-facing data error
            raise InputError(f"{source}: cannot load dataset ({type(err).__name__}: {err})") from None
    for i, row in enumerate(ds):
        yield f"{source}[{split}] row {i}", row


def load_problems(source: str, split: str = "train", num: int | None = None, seed: int = 0) -> list[dict]:
    """Read math problems as [{"prompt", "answer", "index"}], whatever the column convention.

    Recognised: plain {"prompt", "answer"}; GSM8K {"question", "answer": "... #### 72"};
    MATH / MATH-500 {"problem", "solution" (last \\boxed{}) or "answer"}; Polaris / DAPO
    {"problem", "answer"}. With `num`, a seeded random subset (same subset for the same seed).
    """
    problems = []
    for loc, row in _read_rows(source, split):
        q_field = next((f for f in QUESTION_FIELDS if f in row), None)
        a_field = next((f for f in ANSWER_FIELDS if f in row), None)
        if q_field is None or a_field is None:
            missing = "question" if q_field is None else "answer"
            raise InputError(f"{loc}: missing {missing} field (expected one of "
                             f"{QUESTION_FIELDS if q_field is None else ANSWER_FIELDS}; has {sorted(row)})")
        question, raw_answer = row[q_field], row[a_field]
        if not isinstance(question, str) or not question.strip():
            raise InputError(f"{loc}: field '{q_field}' is empty or not a string")
        gold = gold_answer_from_solution(str(raw_answer)) if raw_answer is not None else None
        if not gold:
            raise InputError(f"{loc}: field '{a_field}' has no parsable gold answer: {str(raw_answer)[:80]!r}")
        problems.append({"prompt": question, "answer": gold, "index": len(problems)})
    if not problems:
        raise InputError(f"{source}: no rows")
    if num is not None and num < len(problems):
        problems = sorted(random.Random(seed).sample(problems, num), key=lambda p: p["index"])
    return problems


def encode_prompt(tokenizer, question: str, system_prompt: str | None = None, instruction: str | None = None) -> list[int]:
    """Token ids of the prompt the model sees, identical for training and evaluation.

    The tokenizer's chat template when it has one (the system prompt as a system message, the question
    and the instruction as the user's; its special tokens come from the template, so
    add_special_tokens=False), else PLAIN_PROMPT_TEMPLATE with the tokenizer's own BOS.
    """
    if tokenizer.chat_template:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": f"{question}\n{instruction}" if instruction else question})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = (system_prompt + "\n" if system_prompt else "") + PLAIN_PROMPT_TEMPLATE.format(
        question=question, instruction=instruction + "\n" if instruction else "")
    return tokenizer(text)["input_ids"]


def encode_problems(tokenizer, problems: list[dict], max_prompt_len: int, source: str, prompt: dict,
                    on_long: str = "skip") -> list[dict]:
    """Attach "prompt_ids" in the prompt format `prompt` (prompt_format); prompts over `max_prompt_len`
    tokens are skipped (counted) or fatal."""
    kept, too_long = [], []
    for p in problems:
        ids = encode_prompt(tokenizer, p["prompt"], prompt["system_prompt"], prompt["instruction"])
        if len(ids) > max_prompt_len:
            too_long.append(p["index"])
            continue
        kept.append({**p, "prompt_ids": ids})
    if too_long and on_long == "error":
        raise InputError(f"{source}: {len(too_long)} prompt(s) longer than --max-prompt-len "
                         f"{max_prompt_len} tokens (first: row index {too_long[0]})")
    if too_long:
        print(f"warning: {source}: skipped {len(too_long)} prompt(s) longer than {max_prompt_len} tokens",
              file=sys.stderr)
    if not kept:
        raise InputError(f"{source}: every prompt is longer than --max-prompt-len {max_prompt_len}")
    return kept


def add_prompt_args(group) -> None:
    group.add_argument("--system-prompt", default=None,
                       help="system message for chat templates (default: the recorded prompt format's, else none)")
    group.add_argument("--instruction", default=None,
                       help="appended to every question (default: the recorded prompt format's, else "
                            f"{DEFAULT_INSTRUCTION!r}; '' for none)")


def recorded_prompt_format(model_path: str) -> dict | None:
    """The prompt format a model folder says it was trained with (erpd.json, written by this project's
    stages and by tools/make_tiny.py), or None (a hub model, or any other folder)."""
    record = Path(model_path) / "erpd.json"
    return json.loads(record.read_text()).get("prompt_format") if record.is_file() else None


def prompt_format(tokenizer, system_prompt: str | None = None, instruction: str | None = None, *,
                  default: dict | None = None, bound: tuple[dict, str] | None = None) -> dict:
    """The run's prompt format: {"system_prompt", "instruction", "chat_template"} (a hash of the
    tokenizer's chat template, or "plain"). system_prompt / instruction are the flags (None: not given).

    bound = (format, where): a format this run must use (D was sampled with it: the shards' or the
    rollouts' record); a flag that contradicts it is refused. Otherwise the flags, else `default` (the
    base model folder's record), else no system prompt and DEFAULT_INSTRUCTION.
    """
    flags = {"system_prompt": system_prompt, "instruction": instruction}
    template = hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()[:16] if tokenizer.chat_template else "plain"
    if bound is not None:
        fmt, where = bound
        for key, flag in flags.items():
            if flag is not None and (flag or None) != (fmt[key] or None):
                raise InputError(f"--{key.replace('_', '-')} {flag!r} contradicts the prompt format recorded in "
                                 f"{where} ({fmt[key]!r}): drop the flag")
        return {**fmt, "chat_template": template}
    fmt = dict(default or {"system_prompt": None, "instruction": DEFAULT_INSTRUCTION})
    fmt.update({key: flag or None for key, flag in flags.items() if flag is not None})
    return {"system_prompt": fmt["system_prompt"], "instruction": fmt["instruction"], "chat_template": template}


# ---- models -------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(path: str, dtype: str = "float32", device: str | torch.device = "cpu",
               attn_implementation: str = "sdpa", trust_remote_code: bool = False,
               gradient_checkpointing: bool = False, autocast: str | None = None, weights: bool = True):
    """An AutoModelForCausalLM and its tokenizer, dropout off, ready for training and sampling.
    With weights=False the model is built on the meta device from its config alone (no weights
    read, no memory); load_sharded fills it under --fsdp.

    `dtype` is the weights' (and AdamW states') dtype. For training real models on GPU use
    float32 weights with autocast="bfloat16": pure bf16 weights silently drop updates of
    lr ~1e-6, which bf16's 8-bit mantissa cannot represent.

    Dropout is zeroed in the config and in every nn.Dropout so that train() and eval() compute the
    same function: the pi_0 log-probs and the first training forward then agree exactly (ratio 1).
    A missing pad token is set to EOS; that is safe because every mask here comes from positions.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():  # its loading / saving bars would be cursor-control noise in a log file
        hf_logging.disable_progress_bar()
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype}: expected one of {sorted(DTYPES)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise InputError(f"--model {path}: cannot load ({err})") from None
    for key, value in config.to_dict().items():
        if "dropout" in key and isinstance(value, float):
            setattr(config, key, 0.0)
    if weights:
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=DTYPES[dtype], attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code)
    else:
        from transformers import GenerationConfig

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                                                     attn_implementation=attn_implementation).eval()
        try:  # its EOS ids end responses (stop_token_ids)
            model.generation_config = GenerationConfig.from_pretrained(path)
        except OSError:
            pass
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    float32_lm_head(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if weights:
        model.to(device)
    model.name_or_path = path
    model.erpd_autocast = DTYPES[autocast] if autocast else None
    return model, tokenizer


def float32_lm_head(model) -> None:
    """Make the model's LM head project in float32, whatever the autocast or the weights' dtype; the rest
    of the model keeps its precision. A bf16 GEMM rounds a logit of 30 to a step of 0.125: several percent
    of noise in rho against a trust region of 0.2, and a noise floor under the exact-KL curves. Sampling,
    scoring and training all go through this head (the chunked path projects in float32 too), so the
    sampled, scored and trained distributions stay one distribution."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return

    def forward(hidden):
        with torch.autocast(hidden.device.type, enabled=False):
            return torch.nn.functional.linear(_upcast(hidden), _upcast(head.weight),
                                              None if head.bias is None else _upcast(head.bias))
    head.forward = forward


def model_kwargs(args, device) -> dict:
    """load_model's keyword arguments from add_system_args' flags."""
    return dict(dtype=args.dtype, autocast=args.autocast, device=device,
                attn_implementation=args.attn_implementation, trust_remote_code=args.trust_remote_code)


def load_policy(args, ctx):
    """The model to train, from add_system_args' flags: on ctx.device, or sharded with --fsdp."""
    if args.fsdp and args.chunked_lm_head:
        raise InputError("--chunked-lm-head calls the decoder outside the FSDP root: use one or the other")
    if args.fsdp_shard_size and not args.fsdp:
        raise InputError(f"--fsdp-shard-size {args.fsdp_shard_size}: only with --fsdp")
    if args.fsdp_shard_size < 0 or ctx.world % (args.fsdp_shard_size or ctx.world):
        raise InputError(f"--fsdp-shard-size {args.fsdp_shard_size}: expected a divisor of the world size {ctx.world}")
    if args.dtype != "float32" and ctx.is_main:
        print(f"warning: --dtype {args.dtype}: AdamW updates smaller than ~1/256 of a weight are rounded away "
              "(at lr 1e-6 most weights never move); float32 weights with --autocast bfloat16 train in bf16 "
              "without this", file=sys.stderr)
    if args.fsdp:
        return load_sharded(args, ctx, args.gradient_checkpointing)
    return load_model(args.model, gradient_checkpointing=args.gradient_checkpointing, **model_kwargs(args, ctx.device))


def load_reference(args, ctx):
    """A frozen copy of pi_0 for the exact-KL diagnostics (None with --kl-rollouts 0). Unsharded it stays
    on CPU and visits the GPU only while drift_metrics runs, so training memory is that of the policy
    alone. With --fsdp it is sharded like the policy (1 / world of it per GPU, no host copy) and computes
    in the policy's precision, so the KL at the first step is exactly 0."""
    if not args.kl_rollouts:
        return None
    ref = load_sharded(args, ctx)[0] if args.fsdp else load_model(args.model, **model_kwargs(args, "cpu"))[0]
    return ref.requires_grad_(False).eval()


def chunked_lm_head_ok(model) -> bool:
    """The chunked LM-head path needs a plain bias-free linear head (no logit scaling / soft-capping)."""
    head = model.get_output_embeddings()
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return (type(head) is torch.nn.Linear and head.bias is None
            and not getattr(config, "final_logit_softcapping", None) and getattr(config, "logit_scale", 1.0) == 1.0)


def use_chunked_lm_head(args, model) -> bool:
    """--chunked-lm-head where the model allows it: read alike by scoring (log pi_0, shards) and training,
    so both take the same LM-head path (ratio exactly 1 at the first step)."""
    return args.chunked_lm_head and chunked_lm_head_ok(model)


def autocast_of(model):
    """The bf16 / fp16 autocast load_model was asked for (a no-op context without it)."""
    dtype = getattr(model, "erpd_autocast", None)
    return torch.autocast(next(model.parameters()).device.type, dtype=dtype, enabled=dtype is not None)


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and the generation config's (may be a list)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return sorted(i for i in ids if i is not None)


# ---- sampling -----------------------------------------------------------------------------------

def _cache_kwarg(model) -> str:
    """transformers 5.2x calls the KV cache `cache`; earlier releases `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, P] ids, attention mask and position ids for left-padded prompts (positions count real tokens)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """Sample from softmax(logits / temperature) (top-p nucleus optional); temperature 0 is greedy.

    logits [B, V] -> ids [B]. The same division by temperature is applied when scoring
    (token_logprobs), so sampled and scored distributions are the same distribution.
    """
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keeps the token that crosses top_p
        sorted_probs.masked_fill_(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def sample_responses(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
                     top_p: float, stop_ids: list[int], pad_id: int, generator,
                     batch_size: int = 64, show_progress: bool = False, desc: str = "sampling") -> list[dict]:
    """Sample one response per prompt with the KV cache: [{"response_ids", "truncated"}].

    Prompts are left-padded with an attention mask and explicit position ids, so a row's output
    does not depend on what else is in the batch. A response stops at (and includes) its first
    stop token; "truncated" means it hit max_new_tokens without one.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stop = torch.tensor(stop_ids, device=device)
    cache_kw = _cache_kwarg(model)
    # longest prompts first: similar lengths share a batch, and less padding is computed
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[dict | None] = [None] * len(prompts)
    # one autocast around the whole loop: its cache then keeps the weights' bf16 copies across the
    # per-token forwards (an autocast per forward would re-cast every weight at every token)
    with autocast_of(model):
        for start in progress(range(0, len(order), batch_size), enabled=show_progress, desc=desc):
            batch = order[start:start + batch_size]
            ids, mask, positions = left_pad([prompts[i] for i in batch], pad_id, device)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
            cache = out[cache_kw] if cache_kw in out else out.past_key_values
            position = positions[:, -1]
            done = torch.zeros(len(batch), dtype=torch.bool, device=device)
            tokens = []
            for step in range(max_new_tokens):
                tok = next_token(out.logits[:, -1], temperature, top_p, generator)
                tok = torch.where(done, torch.full_like(tok, pad_id), tok)
                tokens.append(tok)
                done |= torch.isin(tok, stop)
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                position = position + 1
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=position[:, None],
                            use_cache=True, **{cache_kw: cache})
                cache = out[cache_kw] if cache_kw in out else out.past_key_values
            generated = torch.stack(tokens, dim=1).tolist()
            for row, i in enumerate(batch):
                response, truncated = [], True
                for t in generated[row]:
                    response.append(t)
                    if t in stop_ids:
                        truncated = False
                        break
                results[i] = {"response_ids": response, "truncated": truncated}
    model.train(was_training)
    return results


def sample_and_score(model, tokenizer, problems: list[dict], samples_per_prompt: int, *, ctx, seed: int,
                     max_new_tokens: int, temperature: float, top_p: float = 1.0,
                     batch_size: int = 64, desc: str = "sampling") -> list[dict]:
    """Sample G responses for each problem, sharded over ranks, score them; every rank gets all rollouts.

    Problems (which carry "prompt_ids") are split range(rank, N, world); results are gathered and
    sorted by (prompt_index, sample_index), so the list is the same at any world size.
    Rollout: {"prompt_index", "sample_index", "prompt_ids", "response_ids", "truncated", "reward", "text"}.
    """
    mine = problems[ctx.rank::ctx.world]
    prompts = [p["prompt_ids"] for p in mine for _ in range(samples_per_prompt)]
    generator = torch.Generator(device=ctx.device).manual_seed(seed * 1000 + ctx.rank)
    with full_weights(model):  # ranks sample different numbers of tokens: no collective inside
        responses = sample_responses(
            model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            stop_ids=stop_token_ids(model, tokenizer), pad_id=tokenizer.pad_token_id, generator=generator,
            batch_size=batch_size, show_progress=ctx.is_main, desc=desc) if prompts else []
    rollouts = []
    for k, resp in enumerate(responses):
        p = mine[k // samples_per_prompt]
        text = tokenizer.decode(resp["response_ids"], skip_special_tokens=True)
        rollouts.append({"prompt_index": p["index"], "sample_index": k % samples_per_prompt,
                         "prompt_ids": p["prompt_ids"], "response_ids": resp["response_ids"],
                         "truncated": resp["truncated"], "reward": math_reward(text, p["answer"]),
                         "text": text})
    gathered = [r for part in all_gather_objects(rollouts, ctx) for r in part]
    return sorted(gathered, key=lambda r: (r["prompt_index"], r["sample_index"]))


def heldout_accuracy(policy, tokenizer, problems: list[dict], samples: int, *, ctx, seed: int,
                     max_new_tokens: int, temperature: float, top_p: float, batch_size: int) -> float:
    """Mean accuracy over `samples` fresh samples per held-out problem."""
    rollouts = sample_and_score(policy, tokenizer, problems, samples, ctx=ctx, seed=seed,
                                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                batch_size=batch_size, desc="held-out eval")
    return sum(r["reward"] for r in rollouts) / len(rollouts)


def rollout_health(rollouts: list[dict], samples_per_prompt: int) -> dict:
    """Accuracy, truncation, and the fraction of groups with any reward signal: a run whose responses
    all hit the length limit has rewards of 0 everywhere and learns nothing, silently."""
    rewards = torch.tensor([r["reward"] for r in rollouts]).view(-1, samples_per_prompt)
    return {"accuracy": rewards.mean().item(),
            "truncated": sum(r["truncated"] for r in rollouts) / len(rollouts),
            "groups_with_signal": (rewards.std(-1) > 0).float().mean().item(),
            "mean_length": sum(len(r["response_ids"]) for r in rollouts) / len(rollouts)}


def warn_if_no_signal(health: dict, what: str) -> None:
    if health["truncated"] >= 0.5:
        print(f"warning: {what}: {health['truncated']:.0%} of responses hit --max-new-tokens; "
              "rewards are mostly 0 (raise --max-new-tokens)", file=sys.stderr)
    if health["groups_with_signal"] == 0:
        print(f"warning: {what}: every group has identical rewards: there is no learning signal",
              file=sys.stderr)


# ---- scoring: log-probs of given rollouts with the training forward -----------------------------

def pack_rollouts(rollouts: list[dict], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Prompt-aligned batch: prompts left-padded to width P, responses right-padded to width T.

    Every response then starts at column P, so the logits of all responses are the last T + 1
    columns (`logits_to_keep`) and no logit is computed for a prompt position. Masks come from
    lengths, never from token values (pad may equal EOS).
    Returns input_ids / attention_mask / position_ids [B, P + T], labels / mask [B, T].
    """
    ids, attn, _ = left_pad([r["prompt_ids"] for r in rollouts], pad_id, "cpu")
    lengths = torch.tensor([len(r["response_ids"]) for r in rollouts])
    width = int(lengths.max())
    labels = torch.full((len(rollouts), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rollouts):
        labels[i, :len(r["response_ids"])] = torch.tensor(r["response_ids"], dtype=torch.long)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    attention_mask = torch.cat([attn, mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    batch = {"input_ids": torch.cat([ids, labels], dim=1), "attention_mask": attention_mask,
             "position_ids": position_ids, "labels": labels, "mask": mask}
    return {k: v.to(device) for k, v in batch.items()}


def pad_rows(rows: list[torch.Tensor], device) -> torch.Tensor:
    """Right-pad 1-D float tensors with zeros into [B, T] (their dtype)."""
    out = torch.zeros(len(rows), max(len(r) for r in rows), dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out.to(device)


def response_logits(model, batch: dict) -> torch.Tensor:
    """Logits at the positions that predict response tokens only: [B, T, V] in the model's dtype."""
    length, width = batch["input_ids"].shape[1], batch["labels"].shape[1]
    keep = torch.arange(length - width - 1, length - 1, device=batch["input_ids"].device)
    with autocast_of(model):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], use_cache=False, logits_to_keep=keep)
    return out.logits  # exactly the T predicting positions: contiguous, no strided view to copy later


def response_logprobs(model, batch: dict, temperature: float, chunked_lm_head: bool = False,
                      with_entropy: bool = False):
    """log pi(y_t | s_t) of the response tokens with the training forward: [B, T] float32, 0 at padding.

    chunked_lm_head: run the decoder only, slice the response positions' hidden states, and
    compute log-probs and their gradient chunk by chunk (lm_head_logprobs): no [B, T, V] logits.
    with_entropy: return (log-probs, entropy [B, T] float32 without gradient, 0 at padding).
    """
    if not chunked_lm_head:
        logits = response_logits(model, batch)
        logp = token_logprobs(logits, batch["labels"], temperature) * batch["mask"]
        return (logp, token_entropy(logits, temperature) * batch["mask"]) if with_entropy else logp
    width = batch["labels"].shape[1]
    with autocast_of(model):  # the decoder and the LM head in the model's precision, as model(...) would run
        hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     position_ids=batch["position_ids"], use_cache=False).last_hidden_state
        out = lm_head_logprobs(hidden[:, -width - 1:-1], model.get_output_embeddings().weight, batch["labels"],
                               temperature, with_entropy)
    if with_entropy:
        return out[0] * batch["mask"], out[1] * batch["mask"]
    return out * batch["mask"]


@torch.no_grad()
def score_rollouts(model, rollouts: list[dict], micro_batches: list[list[int]], *, pad_id: int,
                   temperature: float, ctx, ref_model=None, chunked_lm_head: bool = False,
                   desc: str = "scoring") -> list[dict]:
    """Score rollouts with the training forward, micro-batch by micro-batch; gather over ranks.

    `micro_batches` are this rank's lists of rollout indices; the micro-batch layout is kept, so
    scoring in the first training step's layout reproduces its log-probs bit for bit (ratio 1).
    Returns a list aligned with `rollouts` (None where no rank scored it) of float32 CPU tensors
    {"logp" [T_i], "entropy" [T_i]} plus, with ref_model, {"ref_logp" [T_i], "kl" [T_i]} where
    "kl" is the exact per-token KL(model || ref_model) over the full vocabulary.
    chunked_lm_head: "logp" only, through training's chunked path (the same kernels: ratio 1 again).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    mine = {}
    with full_weights(model):  # ranks may hold different numbers of micro-batches
        for mb in progress(micro_batches, enabled=ctx.is_main, desc=desc):
            batch = pack_rollouts([rollouts[i] for i in mb], pad_id, device)
            if chunked_lm_head and ref_model is None:
                scores = {"logp": response_logprobs(model, batch, temperature, chunked_lm_head=True)}
            else:
                logits = response_logits(model, batch)
                scores = {"logp": token_logprobs(logits, batch["labels"], temperature),
                          "entropy": token_entropy(logits, temperature)}
            if ref_model is not None:
                ref_logits = response_logits(ref_model, batch)
                scores["ref_logp"] = token_logprobs(ref_logits, batch["labels"], temperature)
                scores["kl"] = token_kl(logits, ref_logits, temperature)
            scores = {k: v.float().cpu() for k, v in scores.items()}  # one device-to-host copy
            for row, i in enumerate(mb):  # rows cloned: a view would carry (and pickle) the whole batch
                n = len(rollouts[i]["response_ids"])
                mine[i] = {k: v[row, :n].clone() for k, v in scores.items()}
    model.train(was_training)
    results: list[dict | None] = [None] * len(rollouts)
    for part in all_gather_objects(mine, ctx):
        for i, r in part.items():
            results[i] = r
    return results


def drift_metrics(policy, rollouts: list[dict], indices: list[int], *, ctx, pad_id: int, temperature: float,
                  micro_batch: int, ref_model=None, base_logp: list | None = None,
                  eps: float | None = None) -> dict[str, float]:
    """The drift curves on rollouts[indices] (D's states): token-mean entropy and log-prob of the sampled
    tokens; with ref_model the exact token KL(policy || ref) over the full vocabulary; with base_logp
    (log pi_0 of D's tokens) the 1%, 50% and 99% quantiles of rho over those tokens, and with eps the
    fraction of them outside [1 - eps, 1 + eps] (what stage 2's clip does not bound)."""
    if not indices:  # the same on every rank: no rank enters a collective alone
        return {}
    micro_batches = my_micro_batches(indices, ctx, micro_batch)
    offload = ref_model is not None and not is_sharded(ref_model)  # load_reference keeps it on CPU
    try:
        if offload:
            ref_model.to(ctx.device)
        with full_weights(ref_model):  # sharded (--fsdp): gathered for the whole pass
            scores = score_rollouts(policy, rollouts, micro_batches, pad_id=pad_id, temperature=temperature,
                                    ctx=ctx, ref_model=ref_model, desc="drift on D")
    finally:
        if offload:
            ref_model.to("cpu")
    scored = [i for i, score in enumerate(scores) if score is not None]  # the subset, in D's order
    n_tokens = sum(len(scores[i]["logp"]) for i in scored)
    if n_tokens == 0:
        return {}
    metrics = {"entropy": sum(scores[i]["entropy"].sum().item() for i in scored) / n_tokens,
               "logp_sampled": sum(scores[i]["logp"].sum().item() for i in scored) / n_tokens}
    if ref_model is not None:
        metrics["kl_to_base"] = sum(scores[i]["kl"].sum().item() for i in scored) / n_tokens
    if base_logp is not None:
        rho = torch.cat([log_ratio(scores[i]["logp"], base_logp[i]) for i in scored]).double().exp()
        q = torch.quantile(rho, torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64)).tolist()
        metrics.update(ratio_q01=q[0], ratio_q50=q[1], ratio_q99=q[2])
        if eps is not None:
            metrics["outside_trust_region"] = ((rho < 1 - eps) | (rho > 1 + eps)).double().mean().item()
    return metrics


# ---- the training loop --------------------------------------------------------------------------

def global_batches(num_items: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """This epoch's optimizer steps: a seeded permutation of all items cut into global batches.

    The same at any world size; rank r then takes batch[r::world].
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_items, generator=g).tolist()
    return [order[s:s + batch_size] for s in range(0, num_items, batch_size)]


def my_micro_batches(batch: list[int], ctx, micro_batch: int) -> list[list[int]]:
    """This rank's share of a global batch, batch[rank::world], cut into micro-batches."""
    mine = batch[ctx.rank::ctx.world]
    return [mine[s:s + micro_batch] for s in range(0, len(mine), micro_batch)]


def equal_work_micro_batches(batch: list[int], ctx, micro_batch: int, sharded: bool) -> list[tuple[list[int], bool]]:
    """(indices, is_padding) for this rank's micro-batches. Under FSDP every forward and backward gathers
    weights with all ranks, so a rank with fewer micro-batches than the busiest one adds padding ones
    (one rollout, run at zero weight) until all ranks run as many."""
    mine = [(mb, False) for mb in my_micro_batches(batch, ctx, micro_batch)]
    if sharded:
        most = -(-len(batch[0::ctx.world]) // micro_batch)
        mine += [(batch[:1], True)] * (most - len(mine))
    return mine


def train_step(model, optimizer, rollouts: list[dict], batch: list[int], loss_fn, *, ctx, pad_id: int,
               temperature: float, micro_batch: int, max_grad_norm: float, chunked_lm_head: bool,
               what: str) -> tuple[dict, dict]:
    """One optimizer step on one global batch (a list of rollout indices). Returns (metrics: the step's
    loss, gradient norm, token-mean entropy of the trained tokens, token count; this rank's stat sums)."""
    counts = {"tokens": sum(len(rollouts[i]["response_ids"]) for i in batch), "seqs": len(batch)}
    device = next(model.parameters()).device
    optimizer.zero_grad(set_to_none=True)
    step_loss, step_entropy, stats = 0.0, 0.0, {}  # on the device: read once per step
    for indices, is_padding in equal_work_micro_batches(batch, ctx, micro_batch, is_sharded(model)):
        packed = pack_rollouts([rollouts[i] for i in indices], pad_id, device)
        logp, entropy = response_logprobs(model, packed, temperature, chunked_lm_head, with_entropy=True)
        loss, mb_stats = loss_fn(indices, packed, logp, counts)
        if is_padding:  # no gradient, but the backward's collectives keep every rank in step
            (loss * 0.0).backward()
            continue
        loss.backward()
        step_loss, step_entropy = step_loss + loss.detach(), step_entropy + entropy.sum()
        for k, v in mb_stats.items():
            stats[k] = stats.get(k, 0) + v  # counts stay int64
    all_reduce_gradients(model, ctx)
    step_loss, step_entropy = all_reduce_sum([float(step_loss), float(step_entropy)], ctx)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor over the ranks' shards
        grad_norm = grad_norm.full_tensor()
    check_finite(torch.tensor(step_loss), f"loss at {what}")
    check_finite(grad_norm, f"gradient norm at {what}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # no gradients held through diagnostics and sampling
    return ({"loss": step_loss, "grad_norm": grad_norm.item(), "tokens": counts["tokens"],
             "entropy": step_entropy / max(1, counts["tokens"])}, stats)


def train_epoch(model, optimizer, rollouts: list[dict], loss_fn, *, epoch: int, ctx, pad_id: int,
                temperature: float, batch_size: int, micro_batch: int, seed: int,
                max_grad_norm: float, desc: str = "train", start_step: int = 0, chunked_lm_head: bool = False,
                on_step=None, totals: dict[str, float] | None = None) -> dict[str, float]:
    """One pass over the fixed rollouts: global batches, one train_step each.

    loss_fn(indices, packed, logp, counts) -> (loss, stats) gets the micro-batch's rollout indices,
    its packed batch and log-probs [B, T], and the global batch's {"tokens", "seqs"}; it returns the
    micro-batch's loss already aggregated against those global counts (`aggregate`), and stats as plain
    sums. Returns the epoch's stats summed over ranks, plus "loss" and "grad_norm" averaged over steps.
    Resuming: steps up to `start_step` are skipped and `totals` holds their running stats.
    on_step(step, totals, metrics, step_stats) runs after each optimizer step (checkpointing, the per-step
    log); step_stats are the step's stats summed over ranks.
    """
    model.train()
    totals = dict(totals or {})
    batches = global_batches(len(rollouts), batch_size, seed, epoch)
    for step, batch in enumerate(progress(batches, enabled=ctx.is_main, desc=desc, initial=start_step), 1):
        if step <= start_step:  # resumed: these steps are in the checkpoint
            continue
        metrics, stats = train_step(model, optimizer, rollouts, batch, loss_fn, ctx=ctx, pad_id=pad_id,
                                    temperature=temperature, micro_batch=micro_batch, max_grad_norm=max_grad_norm,
                                    chunked_lm_head=chunked_lm_head, what=f"epoch {epoch}")
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + float(v)
        totals["loss"] = totals.get("loss", 0.0) + metrics["loss"] / len(batches)
        totals["grad_norm"] = totals.get("grad_norm", 0.0) + metrics["grad_norm"] / len(batches)
        if on_step is not None:
            on_step(step, totals, {**metrics, "lr": optimizer.param_groups[0]["lr"]}, sum_over_ranks(stats, ctx))
    return global_totals(totals, ctx)


def sum_over_ranks(stats: dict, ctx) -> dict:
    """Per-rank stat sums added over ranks. Keys are united first: a rank that had no micro-batch has
    none of the loss function's keys."""
    keys = sorted({k for part in all_gather_objects(sorted(stats), ctx) for k in part})
    return dict(zip(keys, all_reduce_sum([float(stats.get(k, 0.0)) for k in keys], ctx)))


def global_totals(totals: dict, ctx) -> dict:
    """train_epoch's running stat sums over ranks ("loss" and "grad_norm" are global already)."""
    summed = sum_over_ranks({k: v for k, v in totals.items() if k not in ("loss", "grad_norm")}, ctx)
    return {**summed, "loss": totals.get("loss", 0.0), "grad_norm": totals.get("grad_norm", 0.0)}


def train_epochs(policy, rollouts: list[dict], loss_fn, *, ctx, log, tag: str, checkpoint, diagnostics, summarize,
                 pad_id: int, temperature: float, epochs: int, batch_size: int, micro_batch: int, lr: float,
                 weight_decay: float, adam_eps: float, max_grad_norm: float, seed: int, save_every: int,
                 resume: bool, chunked_lm_head: bool, on_epoch=None) -> None:
    """AdamW over `epochs` passes of train_epoch, with checkpoints, resume and per-epoch logs.

    diagnostics(policy, epoch) -> metrics measured after each epoch (and before the first);
    summarize(stats) -> the stage's own metrics from train_epoch's summed stats;
    on_epoch(policy, epoch), if given, runs after each epoch's log (before its checkpoint).
    A checkpoint is written every `save_every` steps and at each epoch end; with `resume` training
    continues from it at the exact step, so no batch is replayed or skipped.
    """
    steps = -(-len(rollouts) // batch_size)
    if ctx.is_main:
        print(f"[{tag}] {len(rollouts)} rollouts in global batches of {batch_size}: {steps} optimizer step(s) per "
              f"epoch, {epochs} epochs", flush=True)
        if steps < 4:
            print(f"warning: [{tag}] only {steps} optimizer step(s) per epoch: lower --batch-size for more updates "
                  "per pass over D", file=sys.stderr)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=weight_decay, eps=adam_eps)
    state = load_checkpoint(checkpoint, policy, optimizer) if resume else None
    state = state or {"epoch": 1, "step": 0, "totals": {}}
    if state["epoch"] == 1 and state["step"] == 0:
        log.log(event="epoch", model=tag, epoch=0, **diagnostics(policy, 0))
    for epoch in range(state["epoch"], epochs + 1):
        def on_step(step, totals, metrics, step_stats):
            log.log(event="step", model=tag, epoch=epoch, step=step, **metrics, **summarize(step_stats))
            if save_every and step % save_every == 0:  # the epoch's running sums, over all ranks
                save_checkpoint(checkpoint, policy, optimizer,
                                {"epoch": epoch, "step": step, "totals": global_totals(totals, ctx)}, ctx)
        resumed = epoch == state["epoch"]
        if resumed and not ctx.is_main:  # rank 0 carries the saved sums; the others add from zero
            state["totals"] = {k: v for k, v in state["totals"].items() if k in ("loss", "grad_norm")}
        stats = train_epoch(policy, optimizer, rollouts, loss_fn, epoch=epoch - 1, ctx=ctx, pad_id=pad_id,
                            temperature=temperature, batch_size=batch_size, micro_batch=micro_batch, seed=seed,
                            max_grad_norm=max_grad_norm, desc=f"{tag} epoch {epoch}/{epochs}", on_step=on_step,
                            start_step=state["step"] if resumed else 0, chunked_lm_head=chunked_lm_head,
                            totals=state["totals"] if resumed else None)
        metrics = {"loss": stats["loss"], "grad_norm": stats["grad_norm"], **summarize(stats),
                   **diagnostics(policy, epoch)}
        log.log(event="epoch", model=tag, epoch=epoch, **metrics)
        if ctx.is_main:
            print(f"[{tag}] epoch {epoch}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
        if on_epoch is not None:
            on_epoch(policy, epoch)
        save_checkpoint(checkpoint, policy, optimizer, {"epoch": epoch + 1, "step": 0, "totals": {}}, ctx)


def checkpoint_finished(checkpoint, epochs: int) -> bool:
    """The checkpoint says training ran all `epochs` (a resumed run then has nothing left to train)."""
    state = Path(checkpoint) / "state.json"
    return state.is_file() and json.loads(state.read_text())["epoch"] > epochs


# ---- what both stages do ------------------------------------------------------------------------

def add_training_args(group, *, epochs: int, lr: float, batch_size: int, micro_batch: int = 64) -> None:
    """The optimisation flags both stages share (their defaults differ)."""
    group.add_argument("--epochs", type=int, default=epochs, help="passes over D")
    group.add_argument("--batch-size", type=int, default=batch_size, help="rollouts per optimizer step (global)")
    group.add_argument("--lr", type=float, default=lr, help="AdamW learning rate (real models: ~1e-6)")
    group.add_argument("--aggregation", choices=AGGREGATIONS, default="token-mean",
                       help="how per-token losses become one number (see common.aggregate)")
    group.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    group.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon (added to sqrt(v))")
    group.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    group.add_argument("--micro-batch", type=int, default=micro_batch, help="rollouts per forward (per rank)")


def add_diagnostic_args(group, *, eval_every: int) -> None:
    """The per-epoch drift curves and held-out accuracy both stages log."""
    group.add_argument("--kl-rollouts", type=int, default=256,
                       help="rollouts of D for the per-epoch exact KL to pi_0 and entropy; loads a frozen pi_0, "
                            "kept on CPU between diagnostics (sharded on the GPUs under --fsdp); 0: off")
    group.add_argument("--eval-every", type=int, default=eval_every, help="held-out accuracy every k epochs (0: off)")
    group.add_argument("--eval-prompts", type=int, default=200, help="held-out problems per accuracy point")
    group.add_argument("--eval-samples", type=int, default=4, help="samples per held-out problem")
    group.add_argument("--eval-data", default=DEFAULT_TEST_DATA, help="held-out problems for accuracy curves")
    group.add_argument("--eval-split", default="test", help="split of --eval-data")


def add_system_args(group, training: bool = True) -> None:
    """The flags every script shares: weights, precision, attention; for training also resume and ranks."""
    # Training: float32 weights (AdamW's lr ~1e-6 updates vanish in bf16 weights) computing in bf16 under
    # --autocast; float16 is for inference only (training it would need loss scaling).
    group.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"] if training else sorted(DTYPES),
                       help="weights' dtype" + ("; bfloat16 weights round away updates below ~1/256 of a weight "
                                                "(lr 1e-6): for bf16 compute use --autocast" if training else ""))
    group.add_argument("--autocast", default=None, choices=["bfloat16"] if training else ["bfloat16", "float16"],
                       help="mixed precision over float32 weights" + (" (GPU training)" if training else ""))
    group.add_argument("--attn-implementation", default="sdpa", help="sdpa / eager / flash_attention_2")
    group.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    if training:
        group.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
        group.add_argument("--dist-timeout-minutes", type=float, default=30.0,
                           help="a failed rank stops the others within this")
        group.add_argument("--seed", type=int, default=0, help="data subset, sampling and batch order")
        group.add_argument("--save-every", type=int, default=0, help="checkpoint every k steps (and every epoch end)")
        group.add_argument("--resume", action="store_true", help="continue from OUT's rollouts and checkpoints")
        group.add_argument("--overwrite", action="store_true",
                           help="replace OUT's finished run, once this run has finished (until then it stays)")
        group.add_argument("--chunked-lm-head", action="store_true",
                           help="training log-probs from hidden states chunk by chunk: no [B, T, V] logits")
        group.add_argument("--fsdp", action="store_true",
                           help="FSDP2: shard weights, gradients and AdamW state over ranks (models too big for one GPU)")
        group.add_argument("--fsdp-shard-size", type=int, default=0,
                           help="with --fsdp: shard within groups of this many ranks (one node: its GPU count) and "
                                "replicate across groups (HSDP); 0: shard over all ranks")


def training_options(args, chunked_lm_head: bool) -> dict:
    """train_epochs' schedule and optimiser keywords from add_training_args' and add_system_args' flags."""
    return dict(epochs=args.epochs, batch_size=args.batch_size, micro_batch=args.micro_batch, lr=args.lr,
                weight_decay=args.weight_decay, adam_eps=args.adam_eps, max_grad_norm=args.max_grad_norm,
                seed=args.seed, save_every=args.save_every, resume=args.resume, chunked_lm_head=chunked_lm_head)


def start_run(args):
    """(ctx, log, out): the process group when launched by torchrun, the seed, the folder this run writes
    in (claim_output: --out itself, or a staging folder under --overwrite), and its metrics.jsonl opened
    with the run's config as its first line (appended to on --resume)."""
    ctx = init_distributed(args.dist_timeout_minutes)
    set_seed(args.seed)
    out = claim_output(Path(args.out), resume=args.resume, overwrite=args.overwrite, ctx=ctx)
    log = JsonlLogger(out / "metrics.jsonl", enabled=ctx.is_main, append=args.resume)
    log.log(event="config", world_size=ctx.world, **vars(args))
    return ctx, log, out


def epoch0_layout(num_rollouts: int, args, ctx) -> list[list[int]]:
    """This rank's micro-batches of the first epoch, in order: scoring D in this layout reproduces the
    first training step's log-probs bit for bit, so rho is exactly 1 at the first step."""
    return [mb for b in global_batches(num_rollouts, args.batch_size, args.seed, 0)
            for mb in my_micro_batches(b, ctx, args.micro_batch)]


def score_logprobs(model, rollouts, layout, *, ctx, pad_id: int, temperature: float, chunked_lm_head: bool,
                   desc: str) -> list[torch.Tensor]:
    """log pi(y_t | s_t) of every sampled token of D with the training forward: one [T_i] tensor per rollout."""
    return [s["logp"] for s in score_rollouts(model, rollouts, layout, pad_id=pad_id, temperature=temperature,
                                              ctx=ctx, chunked_lm_head=chunked_lm_head, desc=desc)]


def drift_diagnostics(args, ctx, tokenizer, rollouts, ref, *, temperature: float, top_p: float, prompt: dict,
                      base_logp: list, eps: float | None = None):
    """The per-epoch diagnostics of either stage: diagnostics(policy, epoch) -> metrics.

    On a seeded subset of --kl-rollouts rollouts of D (none with --kl-rollouts 0): drift_metrics (the exact
    token KL(policy || pi_0), entropy, log-prob of the sampled tokens, quantiles of rho); every --eval-every
    epochs (and at the last), held-out accuracy from fresh samples.
    """
    kl_subset = torch.randperm(len(rollouts), generator=torch.Generator().manual_seed(args.seed))
    kl_subset = kl_subset[:args.kl_rollouts].tolist()
    eval_problems = None
    if args.eval_every:
        eval_problems = encode_problems(tokenizer, load_problems(args.eval_data, args.eval_split,
                                                                 num=args.eval_prompts, seed=args.seed),
                                        args.max_prompt_len, args.eval_data, prompt)

    def diagnostics(policy, epoch):
        metrics = drift_metrics(policy, rollouts, kl_subset, ctx=ctx, pad_id=tokenizer.pad_token_id,
                                temperature=temperature, micro_batch=args.micro_batch, ref_model=ref,
                                base_logp=base_logp, eps=eps)
        if eval_problems and (epoch % args.eval_every == 0 or epoch == args.epochs):
            metrics["heldout_accuracy"] = heldout_accuracy(
                policy, tokenizer, eval_problems, args.eval_samples, ctx=ctx, seed=args.seed + 1,
                max_new_tokens=args.max_new_tokens, temperature=temperature, top_p=top_p,
                batch_size=args.sample_batch_size)
        return metrics
    return diagnostics


# #################################################################################################
# Part III. Infrastructure: processes, FSDP, files
# #################################################################################################

# ---- distributed --------------------------------------------------------------------------------

def run_main(main) -> None:
    """Run a script's main(); turn InputError into a one-line message and exit code 2.

    Under torch.distributed the process then leaves with os._exit, skipping interpreter finalisation:
    gloo's worker threads drop their finished work (and the Python tensors it holds) asynchronously,
    and a thread that does so while the interpreter finalises cannot take the GIL, is unwound inside a
    noexcept destructor, and aborts the rank ("terminate called without an active exception" after all
    output was written; a core dump shows ~AsyncBarrierWork -> decref -> take_gil -> pthread_exit).
    """
    code = 0
    try:
        main()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        code = 2
    finally:
        release_locks()
    if dist.is_available() and dist.is_initialized():
        if code == 0:
            dist.barrier()  # no rank leaves while another still talks to it
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


class Context:
    """Who this process is: rank, world size, device. Made by init_distributed()."""

    def __init__(self, rank: int, local_rank: int, world: int, device: torch.device):
        self.rank, self.local_rank, self.world, self.device = rank, local_rank, world, device
        self.is_main = rank == 0


def init_distributed(timeout_minutes: float = 30.0, device: str | None = None) -> Context:
    """CPU, one GPU, or torchrun (RANK / LOCAL_RANK / WORLD_SIZE set): nccl on CUDA, gloo on CPU.

    The process-group timeout bounds how long the other ranks wait when one rank fails.
    """
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        cuda = device.type == "cuda"  # device_id binds NCCL to this rank's GPU (barriers included)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device if cuda else None)
    return Context(rank, local_rank, world, device)


def all_gather_objects(obj, ctx: Context) -> list:
    """Every rank's `obj` (JSON-like data this process made itself), in rank order."""
    if ctx.world == 1:
        return [obj]
    out = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def all_reduce_gradients(model, ctx: Context) -> None:
    """Sum gradients over ranks (each rank's loss is already divided by the global count).

    A parameter without a gradient on this rank (no micro-batch here) contributes zeros, so every
    rank makes the same collective calls whatever its share of the batch: no hang.
    """
    if ctx.world == 1 or is_sharded(model):  # FSDP reduce-scatters (sums) in backward itself
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    size = 0
    for i, p in enumerate(params):
        bucket.append(p.grad)
        size += p.grad.numel()
        if size >= (1 << 25) or i == len(params) - 1:  # 32M elements per all_reduce
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
            bucket, size = [], 0


def all_reduce_sum(values: list[float], ctx: Context) -> list[float]:
    """Sum a few scalars over ranks (metrics)."""
    if ctx.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()



# ---- FSDP ---------------------------------------------------------------------------------------

def load_sharded(args, ctx, gradient_checkpointing: bool = False):
    """args.model under FSDP2 (shard_model) on ctx.device. Rank 0 alone reads the weights (one host
    copy in the whole job, not one per rank); every rank builds the model on the meta device, shards
    it, and receives its shard from rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model, tokenizer = load_model(args.model, gradient_checkpointing=gradient_checkpointing, weights=False,
                                  **model_kwargs(args, ctx.device))
    # A plain tensor attribute that aliases a buffer (transformers 4.x rotary: original_inv_freq = inv_freq)
    # follows it after loading; any other (a cache, say) stays on meta, so such a model is refused here.
    aliases = []
    for module in model.modules():
        buffers = {id(b): n for n, b in module._buffers.items() if b is not None}
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor):
                if id(value) not in buffers:
                    raise InputError(f"--fsdp: {type(module).__name__}.{name} is a tensor outside the parameters "
                                     "and buffers, which sharded loading cannot fill; run this model without --fsdp")
                aliases.append((module, name, buffers[id(value)]))
    source = load_model(args.model, **model_kwargs(args, "cpu"))[0] if ctx.rank == 0 else None
    shard_model(model, ctx, model.erpd_autocast, args.fsdp_shard_size)
    model.to_empty(device=ctx.device)
    set_model_state_dict(model, source.state_dict() if source else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # buffers outside the state dict (rotary inv_freq): rank 0's values, to every rank
    source_buffers = dict(source.named_buffers()) if source else {}
    for name, buffer in model.named_buffers():
        if source:
            buffer.copy_(source_buffers[name])
        if ctx.world > 1:
            dist.broadcast(buffer, src=0)
    for module, name, buffer_name in aliases:
        setattr(module, name, module._buffers[buffer_name])
    del source, source_buffers
    gc.collect()  # the model's reference cycles: free rank 0's full copy now, not at the next collection
    return model, tokenizer


def shard_model(model, ctx: Context, compute_dtype: torch.dtype | None = None, shard_size: int = 0):
    """FSDP2: `fully_shard` every decoder layer, then the root; each rank keeps 1 / world of the
    weights, gradients and AdamW state, on ctx.device. With 0 < shard_size < world: HSDP, shards
    over groups of shard_size ranks (all-gathers stay inside a node) and gradient all-reduce across
    the world / shard_size groups.

    Gradients are summed over ranks, not averaged: losses are already divided by the global token
    count (divide factor 1; SUM collectives, which gloo supports too). compute_dtype (--autocast):
    float32 master weights, layers run in bf16 / fp16, gradients reduced in float32.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():  # one process without torchrun: FSDP still wants a process group
        dist.init_process_group("nccl" if ctx.device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)
    mesh = _fsdp_mesh(ctx.device.type, ctx.world, shard_size or ctx.world)
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise InputError(f"--fsdp: {type(model).__name__} does not name its decoder layers (_no_split_modules)")
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


@functools.cache
def _fsdp_mesh(device_type: str, world: int, shard_size: int):
    """One device mesh per layout (the policy and the frozen pi_0 share its process groups)."""
    from torch.distributed.device_mesh import init_device_mesh

    if shard_size == world:
        return init_device_mesh(device_type, (world,))
    return init_device_mesh(device_type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def full_weights(model):
    """Under FSDP, gather the whole model once (all ranks together); inside, every rank may run any
    number of forwards with no collective (sampling and scoring do unequal work per rank).
    Resharded on exit. A no-op for an unsharded model (or None)."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.unshard()
    model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # FSDP's default: root stays whole


def full_state_dicts(model, optimizer=None) -> tuple[dict, dict | None]:
    """The whole model's (and optimizer's) state on CPU, keyed by parameter name; under FSDP every
    rank must call this and only rank 0 receives the tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    return model_state, get_optimizer_state_dict(model, optimizer, options=options) if optimizer else None



# ---- files: checkpoints, saved models, atomic writes, logs ---------------------------------------

LOCK_FILE = ".erpd-lock.json"
_held_locks: list[Path] = []


def claim_output(out: Path, *, resume: bool, overwrite: bool, ctx) -> Path:
    """Take the output folder OUT for this run and return the folder to write in.

    OUT already holding a run's output is refused in one line, unless --resume (continue it: write in OUT)
    or --overwrite (replace it: write in a staging folder beside OUT, swapped in by finish_output once this
    run has finished, so that until then, and after an interrupted overwrite, the old run stays whole).
    A lock file in OUT, held by rank 0 until it exits, refuses a second run on OUT while the first lives.
    """
    if resume and overwrite:
        raise InputError("--resume continues a run, --overwrite replaces it: choose one")
    staging = out.with_name(f".{out.name}.overwrite") if overwrite else out
    problem = None
    if ctx.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            take_lock(out)
            held = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
            if held and not (resume or overwrite):
                raise InputError(f"{out} already holds a run's output ({', '.join(held[:4])}"
                                 f"{', ...' if len(held) > 4 else ''}): --resume continues it, --overwrite "
                                 "replaces it once the new run has finished")
            if overwrite:
                import shutil

                shutil.rmtree(staging, ignore_errors=True)  # what an interrupted overwrite left
                staging.mkdir(parents=True)
        except InputError as err:
            problem = str(err)
    problem = all_gather_objects(problem, ctx)[0]  # every rank stops, not rank 0 alone
    if problem:
        raise InputError(problem)
    return staging


def finish_output(out: Path, written: Path, ctx) -> None:
    """Under --overwrite, put the finished run (`written`, the staging folder) in place of OUT."""
    if ctx.world > 1:
        dist.barrier()  # every rank has written its part
    if written != out and ctx.is_main:
        replace_dir(written, out)


def take_lock(out: Path) -> None:
    """Create OUT's lock file (host, pid), or refuse naming the run that holds it. A lock whose process is
    gone (killed with -9, say) on this host is stale: said so, and taken over."""
    lock = out / LOCK_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            with open(lock, "x", encoding="utf-8") as f:
                json.dump(me, f)
            _held_locks.append(lock)
            return
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, json.JSONDecodeError):  # being written, or just removed: look again
                time.sleep(0.1)
                continue
            if holder.get("host") == me["host"] and not process_alive(holder.get("pid", -1)):
                print(f"note: {lock}: its run (process {holder.get('pid')} on this host) is gone; taking the lock",
                      file=sys.stderr)
                lock.unlink(missing_ok=True)
                continue
            raise InputError(f"{out} is in use by another run: process {holder.get('pid')} on {holder.get('host')}, "
                             f"since {holder.get('since')} (if that run is gone, delete {lock})") from None
    raise InputError(f"{lock}: could not take the lock")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def release_locks() -> None:
    while _held_locks:
        _held_locks.pop().unlink(missing_ok=True)


def shard_folder(teacher_dir) -> Path:
    """A stage-1 --out folder's shards/, or the folder itself when it is the shard folder."""
    directory = Path(teacher_dir)
    return directory / "shards" if (directory / "shards").is_dir() else directory


def manifest_sha256(teacher_dir) -> str | None:
    """sha256 of a stage-1 folder's shard manifest (None when it has none): what a student's lineage record
    holds to know that the folder still holds the shards it was distilled from."""
    manifest = shard_folder(teacher_dir) / "manifest.json"
    return sha256_file(manifest) if manifest.is_file() else None


def lineage(base_model: str, base_fingerprint: str) -> list[dict]:
    """The chain of bases that led to a model trained from `base_model`: the base's own recorded lineage
    (a student of an earlier round records its bases) followed by the base itself. Its first entry is
    the original base, the one round k's KL is measured against."""
    record = Path(base_model) / "erpd.json"
    earlier = json.loads(record.read_text()).get("lineage", []) if record.is_file() else []
    return [*earlier, {"model": str(Path(base_model).resolve()) if Path(base_model).exists() else base_model,
                       "base_fingerprint": base_fingerprint}]


def check_lineage(model_path: str) -> list[str]:
    """Warnings for a model folder whose recorded teachers (erpd.json) no longer hold the shards it was
    distilled from: a teacher folder overwritten, moved or deleted since. Printed, and returned."""
    record = Path(model_path) / "erpd.json"
    if not record.is_file():
        return []
    warnings = []
    for teacher in json.loads(record.read_text()).get("teachers", []):
        if manifest_sha256(teacher["path"]) != teacher["manifest_sha256"]:
            warnings.append(f"warning: {record}: teacher folder {teacher['path']} no longer holds the shards this "
                            "model was distilled from (its manifest changed or is gone)")
    for line in warnings:
        print(line, file=sys.stderr)
    return warnings


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_text(path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_shard(path, tensors: dict[str, torch.Tensor]) -> str:
    """Write safetensors atomically (temp file, then rename); return the file's sha256."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    atomic_write_text(path.with_name(path.name + ".sha256"), digest)  # written last: the shard is complete
    return digest


def intact_shard(path) -> str | None:
    """The sha256 of a shard that write_shard finished and nothing has altered since, else None."""
    path = Path(path)
    record = path.with_name(path.name + ".sha256")
    if not path.is_file() or not record.is_file():
        return None
    digest = record.read_text().strip()
    return digest if sha256_file(path) == digest else None


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def progress(iterable, enabled: bool = True, desc: str = "", **kwargs):
    """A tqdm bar on rank 0 when stderr is a terminal; when it is a file (a job's log), a plain line every
    30 s instead (a bar redrawn in a file is cursor-control noise); the bare iterable on other ranks."""
    if not enabled:
        return iterable
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, dynamic_ncols=True, leave=False, desc=desc, **kwargs)
    return _progress_lines(iterable, desc)


def _progress_lines(iterable, desc: str, every: float = 30.0):
    total = len(iterable) if hasattr(iterable, "__len__") else "?"
    start = last = time.monotonic()
    for done, item in enumerate(iterable, 1):
        yield item
        if time.monotonic() - last >= every:
            last = time.monotonic()
            print(f"{desc}: {done}/{total} ({last - start:.0f} s)", file=sys.stderr, flush=True)


class JsonlLogger:
    """Metrics as JSON lines (rank 0 only), one flushed line per record."""

    def __init__(self, path, enabled: bool = True, append: bool = False):
        self.file = None
        if enabled:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a" if append else "w", encoding="utf-8")

    def log(self, **record) -> None:
        if self.file is None:
            return
        record = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}
        self.file.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        self.file.flush()


def check_finite(value: torch.Tensor, what: str) -> None:
    if not torch.isfinite(value).all():
        raise InputError(f"non-finite {what} ({value.item() if value.numel() == 1 else 'tensor'}); "
                         "stopping before the update (lower --lr, or check the data)")


def replace_dir(tmp: Path, directory: Path) -> None:
    """Put the finished folder `tmp` in place of `directory` with renames: a crash at any moment leaves
    the new folder or the old one whole (the old one is deleted only after the swap; a crash between the
    two renames leaves it as .NAME.old<pid>, next to the finished tmp folder)."""
    import shutil

    old = directory.with_name(f".{directory.name}.old{os.getpid()}")
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old.exists():
        shutil.rmtree(old)


def save_pretrained_atomic(model, tokenizer, out_dir, ctx: Context, extra_json: dict | None = None) -> None:
    """Rank 0 writes save_pretrained into a temp folder, then renames it over `out_dir`: a crash
    leaves the old one. Every rank calls it (an FSDP model is gathered first) and waits for the write."""
    sharded = is_sharded(model)
    state = full_state_dicts(model)[0] if sharded else None
    if state is not None:  # gathered tied weights are separate copies: keep the first name only, as HF does
        names: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        for tied in names.values():
            for name in tied[1:]:
                state.pop(name, None)
    if ctx.is_main:
        _save_pretrained_atomic(model, tokenizer, Path(out_dir), state, extra_json)
    if ctx.world > 1:
        dist.barrier()


def _save_pretrained_atomic(model, tokenizer, out_dir: Path, state, extra_json) -> None:
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
    if state is not None:  # FSDP subclasses the model: record the Hugging Face class, not FSDP's
        from torch.distributed.fsdp import FSDPModule

        model.config.architectures = [c.__name__ for c in type(model).__bases__ if not issubclass(c, FSDPModule)]
        model.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if extra_json:
        (tmp / "erpd.json").write_text(json.dumps(extra_json, indent=1))
    replace_dir(tmp, out_dir)


def save_checkpoint(directory, model, optimizer, state: dict, ctx: Context) -> None:
    """Model weights (safetensors), optimizer state and the data position, written atomically.

    Whole (unsharded) states keyed by parameter name, so a checkpoint resumes with or without
    --fsdp. `state` is JSON (epoch, step, running stats); every rank waits for rank 0 to finish,
    so a kill at any moment leaves either the previous checkpoint or this one, complete.
    """
    from safetensors.torch import save_file

    model_state, optim_state = full_state_dicts(model, optimizer)
    if ctx.is_main:
        directory = Path(directory)
        tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        seen = set()  # tied weights (embedding = LM head) share storage, which safetensors refuses
        for name, tensor in model_state.items():
            if tensor.data_ptr() in seen:
                model_state[name] = tensor.clone()
            seen.add(tensor.data_ptr())
        save_file({k: v.contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
        torch.save(optim_state, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "rng": torch.get_rng_state().tolist()}))
        replace_dir(tmp, directory)
    if ctx.world > 1:
        dist.barrier()


def load_checkpoint(directory, model, optimizer) -> dict | None:
    """Restore what save_checkpoint wrote; None when there is no checkpoint to resume from.

    Unsharded, every rank reads it; under FSDP only rank 0 does and broadcasts tensor by tensor,
    each rank keeping its shard (host memory: one copy of the model, on rank 0, not one per rank).
    """
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    directory = Path(directory)
    if not (directory / "state.json").is_file():
        return None
    state = json.loads((directory / "state.json").read_text())
    sharded = is_sharded(model)
    model_state, optim_state = {}, {}
    if not sharded or dist.get_rank() == 0:
        model_state = load_file(str(directory / "model.safetensors"))
        optim_state = torch.load(directory / "optimizer.pt", weights_only=True, mmap=True)
        missing = sorted(set(model.state_dict()) - set(model_state))
        if missing or not all(isinstance(k, str) for k in optim_state.get("state", {})):
            raise InputError(f"{directory}: not a checkpoint of this model and version "
                             f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}); remove it or drop --resume")
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=sharded)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)
    torch.set_rng_state(torch.tensor(state.pop("rng"), dtype=torch.uint8))
    return state


# #################################################################################################
# Appendix. Answer checking (model output is untrusted input: parsed, never evaluated)
# #################################################################################################
#
# Math answer verifier: extract the final answer from model text, normalise it, compare it to gold.
#
# Model output is untrusted input. It is never evaluated: a small tokenizer and recursive-descent
# parser turn a whitelisted LaTeX subset into inert sympy trees (Rational, Symbol, Add, Mul, Pow, a
# few functions, all with evaluate=False; only rational arithmetic is folded). Every size that could
# blow up (digits, powers, roots, factorials, binomials, nesting, list lengths) is bounded before
# anything is computed, so a check takes milliseconds by construction, from any thread, with no
# signals; a time budget is also checked between stages. Comparison runs cheapest first:
# normalised strings, plain numbers (exact fractions), structures, then expressions, evaluated
# numerically (complex floats) at fixed points; sympy's simplify is never called (unbounded time).
#
# Extraction, first that applies: the final group of \boxed{}; `#### N`; "the answer is X" (its first
# clause, or the math expression that starts in it); the final group of math-mode expressions
# (`$..$`, `$$..$$`, `\(..\)`, `\[..\]`; one that only names a variable, `where $x$ is ...`, is
# skipped); a short prediction with no delimiters, whole (`\frac{1}{3}`, `[0, 1)`); the last number,
# only if it stands alone (never the 2 of `\frac{1+\sqrt5}{2}` or of `x^2`). A gold may be the raw
# dataset string (`$[0,1)$`), a GSM8K solution or a MATH solution (its final box group).
#
# Conventions (math-verify's where it has one):
#   * Several boxes (or math expressions) are one answer when only connectives stand between them
#     (`,` `;` and, or, `\quad`, `\text{ and }`, enumerators `(2)`, the names assigned, `x =`); any
#     other word ends the group, so `\boxed{5}, but on reflection \boxed{6}` answers 6. The group is
#     a list: unordered against a list or set (`\boxed{1} and \boxed{2}` is {1, 2}), in order against
#     a tuple (`x = \boxed{2}, y = \boxed{3}` is (2, 3)); a group repeating one answer is that answer.
#   * `50\%` equals 50 and 0.5; plain 50 does not equal 0.5.
#   * A decimal equals an exact value only if it is that value correctly rounded and has at least 4
#     significant digits (0.3333 = 1/3, 0.33 != 1/3), or within float noise (relative 1e-9).
#   * Thousands separators group exactly three digits: `1,234`, `1 234`, `1\,234`, `1{,}234`,
#     `11,\! 111`. A decimal comma (`2,74`, `0,5`, `3{,}14`) is read only against a single value, as
#     the list 2, 74 otherwise; never with a space after the comma (`1, 5` is a list) nor before
#     exactly three digits (`3,500` is 3500), unless the integer part is 0 (`0,125`).
#   * Tuples `(a, b)` are ordered; sets `\{..\}`, bare lists `x=1, x=2` and `\pm` are unordered; a
#     tuple never equals a set; an open interval and a point are both written `(a, b)` and compare
#     equal; `[a, b)` is an interval, and closedness matters.
#   * Relations of one variable are intervals: `x \ge 5`, `5 \le x`, `x >= 5`, `-x > -1` (x < 1),
#     `-2 < x \le 5`, `x \in [a, b)`, `\{x \mid x > 2\}`; `x \ne 3` is (-oo, 3) u (3, oo);
#     `... \text{ or } ...` is their union. `x \approx 11` is `x = 11`: the approximation is the answer.
#   * `x = 3`, `f(x) = 2x + 3`, `(p, q) = (3, 2)`, `\angle A = 30^\circ` compare by their right-hand
#     side, and so does `x + y = 5` (a constant right side) against a value; two equations compare as
#     lhs - rhs up to a constant factor (`y = x + 1` is `x - y + 1 = 0`). A chain `a = b = 7` is 7.
#     `2\frac{1}{2}` is the mixed number 5/2.
#   * Matrices (`pmatrix`, `bmatrix`, `\left[\begin{array}..\right]`) compare element-wise; a vector
#     equals a tuple; `\begin{cases} x = 2 \\ y = 1 \end{cases}` is the list x = 2, y = 1.
#   * Multiple choice compares letters only, as a set: `\text{(C)}` = C, `BD` = `B, D` != D.
#   * Words after a value are units (`5 \text{ cm}`, `12 km/h`, `5 m`); `\text{odd}` = `odd`.
#   * `e` and `i` are Euler's number and the imaginary unit; `\log` is the natural log.

_MAX_TEXT = 5000        # only the tail of a response is searched for its answer
_MAX_ANSWER = 500       # longer extracted answers are rejected (never equal)
_MAX_DIGITS = 1000      # integer literals, and estimated digits of a numeric power
_MAX_DEPTH = 50         # nesting of brackets / groups / unary operators
_MAX_FACTORIAL = 1000
_MAX_ITEMS = 32         # elements of a tuple, set, list or matrix
_TIME_BUDGET = 0.9      # seconds; checked between stages (each stage is bounded by construction)
_REL_TOL = 1e-9         # exact answers compared numerically (irrationals, symbolic identities)
_DEC_REL_TOL = Fraction(1, 10 ** 9)  # a decimal literal against anything: float noise only (see _decimal_close);
#                                    exact, so a 400-digit integer is compared without a float overflow
_DEC_MIN_SIG = 4        # ... or the correctly rounded value, if it has at least this many digits


class _Unsupported(Exception):
    """Not in the parsed subset: the answer is compared as text instead."""


class _TooBig(Exception):
    """Outside the safe size bounds: never equal (unless the strings are identical)."""


class _Timeout(Exception):
    pass


# ------------------------------------------------------------------------------------------------
# Extraction: final \boxed{} group, then "#### N", then "the answer is X", then the last math-mode
# expression, then the last stand-alone number
# ------------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_HASH_RE = re.compile(r"####[ \t]*(?=[-+$\\\d.(])([^\n]*)")  # not a markdown "#### Step 1" header
_ANSWER_IS_RE = re.compile(r"(?=answer\**\s*(?:is\b|:)\s*:?\**[ \t]*([^\n]*))", re.I)  # overlapping
_NOT_AN_ANSWER_RE = re.compile(    # "check that the answer is correct" names no answer
    r"(?:correct|incorrect|right|wrong|reasonable|valid|invalid|consistent|indeed|likely|probably|"
    r"clearly|not|that|the|to|as|of|still|also|given|found|obtained|below|above)\b", re.I)
_LHS_VAR = r"(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?(?:\^\{?-1\}?)?(?:\([a-z]\))?"   # x, a_1, \theta, f^{-1}(x)
# Between two boxes (or math spans) of one answer only connectives may stand: math delimiters,
# punctuation, and/or, enumerators `(2)`, `\quad`, `\text{ and }`, the names being assigned
# (`$x = \boxed{1}$ or ...`, `(p, q) = ...`).
_GAP_RE = re.compile(r"\s+|[,;.:&$]|\\[()\[\],;:! ]|\\q?quad(?![a-zA-Z])|\\text\s*\{\s*(?:and|or|,)?\s*\}"
                     r"|(?<![a-zA-Z])(?:and|or)(?![a-zA-Z])|\(\w{1,3}\)"
                     r"|(?:" + _LHS_VAR + r"|\([\w\s,]{1,20}\))\s*=")
_MAX_GAP = 80
_MATH_DELIM_RE = re.compile(r"\\\\|\\\$|\$\$|\$|\\\[|\\\]|\\\(|\\\)")   # `\\` and `\$` are not delimiters
_MATH_CLOSE = {"$$": "$$", "$": "$", "\\[": "\\]", "\\(": "\\)"}
_PROSE_RE = re.compile(r"(?<![a-zA-Z])[a-zA-Z]{2,}\s+[a-zA-Z]{2}")   # tried at word starts only: linear
_COMMAND_RE = re.compile(r"\\[a-zA-Z]+\s*\{[^{}]*\}|\\[a-zA-Z]+")     # \text{ cm}, \frac: not prose
_CLAUSE_END_RE = re.compile(r"\.(?=\s|$)|;|(?:,|\s(?:and|but|because|since|which|as|so))\s+(?=[a-zA-Z]{2})")
_MAX_BARE = 200
# A number: 1,234,567 or 1 234 567 (groups of three), 12, 3.5, .5, 2,74 (a decimal comma: decided
# against the gold, see _comma_decimal), a/b; an optional minus sign that is not a binary minus.
_LAST_NUM_RE = re.compile(r"(?:(?<![\w)\]}])-)?(?<![\w.,])(?:\d{1,3}(?:,\d{3}|[ ]\d{3})+(?![\d,])(?:\.\d+)?"
                          r"|\d+(?:[.,]\d+|/\d+)?|\.\d+)")
# A number is an operand, not an answer, after `^ _ { ( [ | + - * /`, an operator command or a binary
# minus (x - 5, 3 -5; but `is -5`), or before an operator, a bracket, a command or one letter (2x, 2\pi, 5};
# but `5 cm`, `5cm`).
_OPERAND_BEFORE_RE = re.compile(r"(?:[-+*/^_{(\[|]|\\(?:cdot|times|div|pm|mp|sqrt|[dtc]?frac|binom|log|ln|"
                                r"sin|cos|tan|exp))\s*$")
_BINARY_MINUS_RE = re.compile(r"(?:[\d)\]}]|(?<![a-zA-Z])[a-zA-Z])\s*$")
_OPERAND_AFTER_RE = re.compile(r"\s?[-+*/^_]|[(\\{}\])|]|[a-zA-Z](?![a-zA-Z])")


def _brace_pairs(text: str) -> dict:
    """{index of '{': index of its matching '}'} in one pass; escaped \\{ \\} are not braces."""
    pairs, stack, i, n = {}, [], 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            pairs[stack.pop()] = i
        i += 1
    return pairs


def _boxes(text: str) -> list:
    """(start, end, content) of every \\boxed{...} / \\fbox{...} (nested braces) and `\\boxed 5`."""
    starts = list(_BOX_RE.finditer(text))
    if not starts:
        return []
    pairs, out = _brace_pairs(text), []
    for m in starts:
        i = j = m.end()
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            if j in pairs:                       # unbalanced boxes are skipped
                out.append((m.start(), pairs[j] + 1, text[j + 1:pairs[j]]))
        elif j > i:                              # `\boxed 5`
            n = re.match(r"[^\s$]+", text[j:])
            if n:
                out.append((m.start(), j + n.end(), n.group(0)))
    return out


def _final_group(items: list, text: str) -> list:
    """Contents of the final group of `items` ((start, end, content) in order, in `text`). Several
    form one answer when only connectives stand between them (`\\boxed{(2, 2)} and \\boxed{(6, 2)}`,
    `$x = 1$ or $x = 2$`); any other word ends the group (`\\boxed{5}, but on reflection \\boxed{6}`
    answers 6). A group that repeats one answer is that answer."""
    if not items:
        return []
    group = [items[-1]]
    for item in reversed(items[:-1]):
        gap = text[item[1]:group[0][0]]
        if len(gap) > _MAX_GAP or _GAP_RE.sub("", gap) or len(group) >= _MAX_ITEMS:
            break
        group.insert(0, item)
    contents = [item[2] for item in group]
    return contents[:1] if len(set(contents)) == 1 else contents


def _final_boxes(text: str) -> list:
    """The final group of boxes; a box that holds another gives way to it, empty ones are skipped."""
    boxes = [(i, j, b.strip()) for i, j, b in _boxes(text) if b.strip()]
    innermost = [b for b, after in zip(boxes, boxes[1:] + [None]) if not (after and after[0] < b[1])]
    return _final_group(innermost, text)


def _prose(s: str) -> bool:
    """Two words in a row, outside commands: a sentence, not an answer."""
    return bool(_PROSE_RE.search(_COMMAND_RE.sub(" ", s)))


def _math_spans(text: str) -> list:
    """(start, end, content) of the `$..$`, `$$..$$`, `\\(..\\)` and `\\[..\\]` in `text`, content
    stripped, without spans of prose (two words: `$5 for apples and $` between two prices).
    Delimiters pair left to right, as TeX pairs them, in one linear scan."""
    spans, closer, start = [], None, 0
    for m in _MATH_DELIM_RE.finditer(text):
        tok = m.group()
        if closer is None and tok in _MATH_CLOSE:
            closer, start = _MATH_CLOSE[tok], m.start()
        elif tok == closer:
            span = text[start + len(tok):m.start()].strip()
            if span and not _prose(span):
                spans.append((start, m.end(), span))
            closer = None
    return spans


def _last_math(text: str) -> list:
    """The final group of math-mode expressions; one that only names a variable (`..., where $x$ is
    the count`) gives way to the one before it."""
    spans = _math_spans(text)
    while len(spans) > 1 and _LONE_VAR_RE.fullmatch(spans[-1][2]):
        spans.pop()
    return _final_group(spans, text)


def _bare(text: str):
    """A short prediction that is all answer, with no delimiters: `\\frac{1}{3}`, `[0, 1)`, `x \\ge 5`,
    `**42**` (markdown bold)."""
    s = text.strip().strip("*").strip()
    if len(s) <= _MAX_BARE and "\n" not in s and not _prose(s):
        return s
    return None


def _last_number(text: str):
    """The last number, if it stands alone: never one read out of a larger expression (the 2 of
    `\\frac{1+\\sqrt5}{2}` or `x^2`, the 3 of `2\\sqrt3`), which would make any answer ending in a
    common digit look right."""
    last = None
    for last in _LAST_NUM_RE.finditer(text):
        pass
    if last is None:
        return None
    before, after = text[max(0, last.start() - 30):last.start()], text[last.end():last.end() + 2]
    binary_minus = last.group()[0] == "-" and _BINARY_MINUS_RE.search(before)
    if binary_minus or _OPERAND_BEFORE_RE.search(before) or _OPERAND_AFTER_RE.match(after):
        return None
    return last.group()


def _clean_phrase(x: str) -> str:
    """The answer part of 'the answer is X. Because...': the first clause, or the math expression
    that starts in it ('the answer is therefore $5$, ...')."""
    x = x.strip().strip("*").strip()
    spans = _math_spans(x)
    end = _CLAUSE_END_RE.search(x)
    if spans and (end is None or spans[0][0] < end.start()):
        return spans[0][2]
    x = x[:end.start()] if end else x
    return x.strip().rstrip(".!,:").strip()


def _extract(text: str):
    """(answer, how) or (None, why)."""
    if not isinstance(text, str):
        return None, "prediction is not a string"
    text = text[-_MAX_TEXT:]
    boxes = _final_boxes(text)
    if boxes:
        return ", ".join(boxes), "boxed" if len(boxes) == 1 else f"{len(boxes)} boxes"
    for pattern, how in ((_HASH_RE, "####"), (_ANSWER_IS_RE, "answer is")):
        for m in reversed(list(pattern.finditer(text))):
            phrase = _clean_phrase(m.group(1)[:2 * _MAX_ANSWER])   # an answer is never longer
            if phrase and not _NOT_AN_ANSWER_RE.match(phrase):
                return phrase, how
    spans = _last_math(text)
    if spans:
        return ", ".join(spans), "math mode"
    for find, how in ((_bare, "bare"), (_last_number, "last number")):
        answer = find(text)
        if answer:
            return answer, how
    return None, "no answer found"


def extract_answer(text: str) -> str | None:
    """The final answer in a model response, as written (not normalised); None if there is none.
    Several final boxes come back joined by ', '."""
    try:
        return _extract(text)[0]
    except Exception:
        return None


def gold_answer_from_solution(solution: str) -> str | None:
    """Gold answer from a plain answer, a GSM8K solution (`#### 72`) or a MATH solution (final box
    group, as for predictions)."""
    if solution is None:
        return None
    s = str(solution).strip()
    if "####" in s:
        ans = s.rsplit("####", 1)[1].strip().replace(",", "").rstrip(".").strip()
        return ans or None
    if _BOX_RE.search(s):
        return ", ".join(_final_boxes(s)) or None
    return s if 0 < len(s) <= _MAX_ANSWER else None


# ------------------------------------------------------------------------------------------------
# Normalisation (string level): delimiters, spacing, units, percent, thousands separators
# ------------------------------------------------------------------------------------------------

_UNICODE = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2014": "-", "\u00d7": "\\times ",
                          "\u00f7": "\\div ", "\u00b7": "\\cdot ", "\u03c0": "\\pi ", "\u221e": "\\infty ",
                          "\u221a": "\\sqrt", "\u2264": "\\le ", "\u2265": "\\ge ", "\u00b0": "",
                          "\u222a": "\\cup ", "\u00b1": "\\pm ", "\u2009": " ", "\u00a0": " ",
                          "\u2260": "\\ne ", "\u2248": "\\approx "})
_REWRITES = [(re.compile(p), r) for p, r in (
    (r"\\(?:left|right)\.|\\(?:left|right|[bB]igg?[lr]?|middle)(?![a-zA-Z])", ""),
    (r"\\(?:displaystyle|textstyle|scriptstyle|limits|therefore|because)(?![a-zA-Z])", ""),
    (r"^.*\\(?:Rightarrow|Longrightarrow|implies)(?![a-zA-Z])", ""),   # x^2 = 4 \Rightarrow x = 2
    (r"(?<=\d),\s*\\!\s*(?=\d{3}(?!\d))", ","),     # MATH's thousands: 11,\! 111,\! 100
    (r"(?<=\d)\{,\}(?!\d{3}(?!\d))", ","),         # `3{,}14`: a decimal comma (see _comma_decimal)
    (r"(?<!\\)\\[,;:!>]|\{,\}", ""),              # thin spaces; `1\,000` and `1{,}000` are numbers
    (r"(?<!\\)\\ |\\q?quad(?![a-zA-Z])|~", " "),
    (r"\\\$|\$|(?<!\\)\\[()\[\]]", " "),           # currency and math delimiters
    (r"\\[dtc]frac(?![a-zA-Z])", r"\\frac"), (r"\\[dt]binom(?![a-zA-Z])", r"\\binom"),
    (r"\\leq?(?:slant)?(?![a-zA-Z])|<=", r"\\le "), (r"\\geq?(?:slant)?(?![a-zA-Z])|>=", r"\\ge "),
    (r"\\neq?(?![a-zA-Z])|!=", r"\\ne "),
    (r"\\lt(?![a-zA-Z])", "<"), (r"\\gt(?![a-zA-Z])", ">"), (r"\\approx(?![a-zA-Z])", "="),
    (r"\^\s*\{?\s*\\circ\s*\}?|\\circ(?![a-zA-Z])|\\degree(?![a-zA-Z])", ""),
    (r"\\(?:emptyset|varnothing)(?![a-zA-Z])", r"\\{\\}"),
    (r"\\mathbb\s*\{?R\}?", r"(-\\infty,\\infty)"),
    (r"(?<![\\a-zA-Z])(?:infinity|inf)(?![a-zA-Z])", r"\\infty"),
    (r"(?<![\\a-zA-Z])(sqrt|frac|pi|sin|cos|tan|ln|log|exp)(?![a-zA-Z])", r"\\\1"),
)]
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|textsf|mbox|mathrm|mathbf|mathit|"
                          r"mathsf|mathbb|operatorname|boldsymbol)\s*\{([^{}]*)\}(\s*\^\s*\{?\d\}?)?")
_UNIT_WORD_RE = re.compile(r"(?:[a-zA-Z]{2,}|[mgsLhK]|[a-zA-Z]+/[a-zA-Z]+)\.?(?:\^\{?\d\}?)?")  # 5 m, 3 cm^2, km/h
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?|[+-]?\d{1,3}(?: \d{3})+")
_SET_BUILDER_RE = re.compile(r"^\\\{\s*" + _LHS_VAR + r"\s*(?:\\mid(?![a-zA-Z])|\||:)(.+)\\\}$")
_MEMBER_RE = re.compile(r"^(?:" + _LHS_VAR + r"\s*\\in(?![a-zA-Z])\s*|=\s*)")   # x \in [2, 5); \approx 3.14


def _text_cmd(m: re.Match) -> str:
    """\\text{...}: ' and '/' or ' separate answers; words after a value are units; else unwrap."""
    word = m.group(1).strip()
    if word.lower() in ("and", "or", ","):
        return ","
    before = m.string[:m.start()].strip()
    if before and before[-1] not in "(,=" and re.fullmatch(r"[a-zA-Z][a-zA-Z .\-/]*", word):
        return " "
    return m.group(1) + (m.group(2) or "")


def _strip_units(s: str) -> str:
    """'12 dollars', '3 square units', '5 km/h' -> the value (only after something number-like)."""
    words = s.split()
    k = len(words)
    while k > 1 and _UNIT_WORD_RE.fullmatch(words[k - 1]) and not words[k - 1].startswith("\\"):
        k -= 1
    head = " ".join(words[:k])
    if k < len(words) and re.search(r"[\d}]|\\pi", head) and re.search(r"[\d})\]]$|\\[a-zA-Z]+$", head):
        return head
    return s


@functools.lru_cache(maxsize=8192)
def _normalize(s: str) -> tuple:
    """(normalised string, is_percent). Pure string rewriting; cheap and total."""
    s = s.translate(_UNICODE)
    for pattern, repl in _REWRITES:
        s = pattern.sub(repl, s)
    for _ in range(4):                                     # nested \textbf{\text{..}}
        s, n = _TEXT_CMD_RE.subn(_text_cmd, s)
        if not n:
            break
    s = " ".join(s.split()).rstrip(" .,;:").lstrip(" ,;:")
    percent = False
    m = re.search(r"\s*(?:\\%|%|\s+percent|\s+per\s*cent)$", s)
    if m:
        percent, s = True, s[:m.start()]
    s = s.replace("\\%", "").replace("%", "").rstrip(" .,;:")
    s = re.sub(r"\s+(?:and|or)\s+", ", ", s)
    s = _strip_units(s)
    s = _MEMBER_RE.sub("", _SET_BUILDER_RE.sub(r"\1", s))       # \{x \mid x > 2\}: the condition
    s = re.sub(r"^(\d+)_\{?\d+\}?$", r"\1", s)                  # 1011_2: the base is implied
    name = re.match(r"^" + _LHS_VAR + r"\s*=\s*", s)
    value = s[name.end():] if name else s                       # `x = 1,000`: the value's separators
    if _THOUSANDS_RE.fullmatch(value):
        s = s[:len(s) - len(value)] + value.replace(",", "").replace(" ", "")
    s = re.sub(r"\s*([^\w\s\\])\s*", r"\1", s)                  # spaces around symbols carry nothing
    return s, percent


# ------------------------------------------------------------------------------------------------
# Plain numbers: exact fractions, without sympy
# ------------------------------------------------------------------------------------------------

_NUM_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_FRAC_RE = re.compile(r"([+-]?)(?:\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}|(\d+)/(\d+))")
_COMMA_DECIMAL_RE = re.compile(r"([+-]?\d+),(\d+)")


def _decimal(literal: str):
    """Fraction value and (ulp, significant digits) of a number literal; dec is None for integers."""
    mant, _, exp = literal.lower().partition("e")
    exp = int(exp) if exp else 0
    if len(mant) > _MAX_DIGITS or abs(exp) > _MAX_DIGITS:
        raise _TooBig("number literal too long")
    value = Fraction(mant.rstrip(".")) * Fraction(10) ** exp
    if "." not in mant:
        return value, None
    frac_digits = len(mant.split(".")[1])
    sig = len(re.sub(r"\D", "", mant).lstrip("0")) or 1
    return value, (Fraction(1, 10 ** frac_digits) * Fraction(10) ** exp, sig)


def _plain_number(s: str):
    """(Fraction, dec) for an int / decimal / sci / a/b / \\frac{a}{b} string, else None."""
    if _NUM_RE.fullmatch(s):
        return _decimal(s)
    m = _FRAC_RE.fullmatch(s)
    if m:
        num, den = int(m.group(2) or m.group(4)), int(m.group(3) or m.group(5))
        if den != 0:
            return Fraction(-num if m.group(1) == "-" else num, den), None
    return None


def _comma_decimal(norm: str, raw: str) -> str:
    """`2,74` spelt with a decimal point, or ''. The caller reads it so only against a single value
    (see _single_value). A comma followed by a space separates items (`1, 5`), and
    one followed by exactly three digits groups thousands (`3,500`), unless the integer part is 0."""
    m = _COMMA_DECIMAL_RE.fullmatch(norm)
    if not m or re.search(r",\s", raw) or (len(m.group(2)) == 3 and m.group(1).lstrip("+-") != "0"):
        return ""
    return f"{m.group(1)}.{m.group(2)}"


def _decimal_close(x, dx, y, dy) -> bool:
    """Equality when a decimal literal is involved. It equals a value within float noise, or when
    it is that value correctly rounded to the digits written AND has at least 4 significant
    digits: 0.3333 and 0.1429 count as 1/3 and 1/7, a coarse 0.33 does not. (A flat relative
    tolerance such as 1e-6 would make 1000000.5 equal 1000000, wrong for GSM8K-sized amounts.)"""
    diff, scale = abs(x - y), max(abs(x), abs(y))
    if diff <= _DEC_REL_TOL * scale:
        return True
    return any(d is not None and d[1] >= _DEC_MIN_SIG and diff <= float(d[0]) / 2 * (1 + 1e-9)
               for d in (dx, dy))


def _with_percent(alts: tuple, percent: bool) -> tuple:
    """`50\\%` equals 50 and 0.5 (math-verify's convention); plain 50 does not equal 0.5."""
    if not percent:
        return alts
    scale = (lambda v: v / 100) if isinstance(alts[0][0], Fraction) else (lambda v: _div(v, sympy.Integer(100)))
    return alts + tuple((scale(v), None if d is None else (d[0] / 100, d[1])) for v, d in alts)


def _numbers_equal(pa: tuple, ga: tuple) -> bool:
    for x, dx in pa:
        for y, dy in ga:
            if x == y or ((dx or dy) and _decimal_close(x, dx, y, dy)):
                return True
    return False


# ------------------------------------------------------------------------------------------------
# Expressions: whitelisted tokens -> sympy objects, sizes bounded before anything is computed
# ------------------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"\s*(?:(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)"
                       r"|(\\[a-zA-Z]+|\\[{}|])|([a-zA-Z](?:_\{[a-zA-Z0-9]{1,10}\}|_[a-zA-Z0-9])?)"  # x, x_1, a_{10}
                       r"|([-+*/^_()\[\]{}|!,]))")
_GREEK = frozenset("alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda "
                   "mu nu xi rho sigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi "
                   "Sigma Phi Psi Omega".split())
_FUNCS = {"sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "cot": sympy.cot, "sec": sympy.sec,
          "csc": sympy.csc, "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan,
          "sinh": sympy.sinh, "cosh": sympy.cosh, "tanh": sympy.tanh, "ln": sympy.log,
          "log": sympy.log, "exp": sympy.exp}
_CONSTS = {"pi": sympy.pi, "infty": sympy.oo}
_IMPLICIT_CMDS = frozenset(["frac", "sqrt", "binom", "lfloor", "lceil"]) | _GREEK | set(_FUNCS) | set(_CONSTS)


def _tokenize(s: str) -> list:
    toks, i = [], 0
    while i < len(s):
        m = _TOKEN_RE.match(s, i)
        if not m:
            if s[i:].strip():
                raise _Unsupported(f"unexpected character {s[i]!r}")
            break
        kind = m.lastindex
        toks.append((("num", "cmd", "letter", "op")[kind - 1], m.group(kind)))
        i = m.end()
    return toks


# The tree is built inert (evaluate=False): sympy's automatic simplification is unbounded (it
# factors bases of roots, expands binomials, calls evalf at growing precision from assumption
# queries). Only rational arithmetic is folded, exactly and within the size bounds.

def _add(a, b):
    return a + b if a.is_Rational and b.is_Rational else sympy.Add(a, b, evaluate=False)


def _neg(a):
    return -a if a.is_Number else sympy.Mul(sympy.S.NegativeOne, a, evaluate=False)


def _mul(a, b):
    return a * b if a.is_Rational and b.is_Rational else sympy.Mul(a, b, evaluate=False)


def _div(a, b):
    if a.is_Rational and b.is_Rational:
        if b == 0:
            raise _Unsupported("division by zero")
        return a / b
    return sympy.Mul(a, sympy.Pow(b, sympy.S.NegativeOne, evaluate=False), evaluate=False)


def _log10_size(value) -> float:
    """Rough |log10| of a constant (digits of a rational), to bound powers before computing them."""
    if value.is_Rational:
        return sum(math.log10(abs(int(k))) for k in (value.p, value.q) if k)
    try:
        return abs(math.log10(abs(_ev(value, {})) or 1.0))
    except (ArithmeticError, ValueError, _Unsupported):
        raise _TooBig("power of an unbounded base") from None


def _pow(base, exp):
    if exp.is_Rational:
        if exp.q > _MAX_DIGITS:
            raise _TooBig("root index too large")
        if base.free_symbols:
            if abs(exp) > _MAX_DIGITS:
                raise _TooBig("exponent of a symbolic base")
        elif base not in (sympy.S.Zero, sympy.S.One, sympy.S.NegativeOne):
            if float(abs(exp)) * _log10_size(base) > 2 * _MAX_DIGITS:
                raise _TooBig("power too large")
        if base.is_Rational and exp.is_Integer:
            if base == 0 and exp < 0:
                raise _Unsupported("division by zero")
            return base ** exp                    # exact, and bounded by the check above
    return sympy.Pow(base, exp, evaluate=False)


def _factorial(n):
    if n.is_Number and not (n.is_Integer and n >= 0):
        raise _Unsupported("factorial of a non-natural number")
    if n.is_Integer and n > _MAX_FACTORIAL:
        raise _TooBig("factorial too large")
    return sympy.factorial(n) if n.is_Integer else sympy.factorial(n, evaluate=False)


def _binomial(n, k):
    if n.is_Integer and k.is_Integer:
        if abs(n) > 10 ** 4 or (n < 0 and abs(k) > _MAX_FACTORIAL):
            raise _TooBig("binomial too large")
        return sympy.binomial(n, k)
    return sympy.binomial(n, k, evaluate=False)


class _Parser:
    """Recursive descent over the tokens: expr := term (+|- term)*; term := unary (op unary)*."""

    def __init__(self, s: str):
        self.toks, self.i, self.depth = _tokenize(s), 0, 0

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else (None, None)

    def take(self):
        tok = self.peek()
        self.i += 1
        return tok

    def at(self, kind, *values) -> bool:
        k, v = self.peek()
        return k == kind and (not values or v in values)

    def expect(self, value):
        if not self.at("op", value):
            raise _Unsupported(f"expected {value!r}")
        self.i += 1

    def enter(self):
        self.depth += 1
        if self.depth > 2 * _MAX_DEPTH:       # about two grammar levels per bracket
            raise _TooBig("nesting too deep")

    def parse(self):
        e = self.expr()
        if self.i != len(self.toks):
            raise _Unsupported(f"unexpected {self.peek()[1]!r}")
        return e

    def expr(self):
        self.enter()
        e = self.term()
        while self.at("op", "+", "-"):
            op = self.take()[1]
            t = self.term()
            e = _add(e, t if op == "+" else _neg(t))
        self.depth -= 1
        return e

    def term(self):
        e = self.unary()
        while True:
            k, v = self.peek()
            if (k, v) in (("op", "*"), ("cmd", "\\cdot"), ("cmd", "\\times")):
                self.take()
                e = _mul(e, self.unary())
            elif (k, v) in (("op", "/"), ("cmd", "\\div")):
                self.take()
                e = _div(e, self.unary())
            elif k == "letter" or (k == "op" and v in "({") or (k == "cmd" and v[1:] in _IMPLICIT_CMDS):
                e = _mul(e, self.power())         # implicit product: 2x, 2\sqrt{3}, (a)(b)
            else:
                return e

    def unary(self):
        self.enter()
        if self.at("op", "-", "+"):
            sign = self.take()[1]
            e = self.unary()
            e = _neg(e) if sign == "-" else e
        else:
            e = self.power()
        self.depth -= 1
        return e

    def power(self):
        e = self.primary()
        while self.at("op", "!"):
            self.take()
            e = _factorial(e)
        if self.at("op", "^"):
            self.take()
            e = _pow(e, self.exponent())
        return e

    def exponent(self):
        self.enter()
        if self.at("op", "-", "+"):
            sign = self.take()[1]
            e = self.exponent()
            e = _neg(e) if sign == "-" else e
        elif self.at("op", "{", "("):
            e = self.group()
        else:
            e = self.primary()
        self.depth -= 1
        return e

    def group(self):
        """A macro argument: {expr}, (expr), or a single token (`\\frac12`, `\\sqrt3`)."""
        k, v = self.peek()
        if k == "op" and v in "{(":
            self.take()
            e = self.expr()
            self.expect("}" if v == "{" else ")")
            return e
        if k == "num" and len(v) > 1 and v[:2].isdigit():     # `\frac12`: one digit per argument
            self.toks[self.i] = ("num", v[1:])
            return sympy.Integer(int(v[0]))
        return self.primary()

    def primary(self):
        k, v = self.take()
        if k == "num":
            value, _ = _decimal(v)
            return sympy.Rational(value.numerator, value.denominator)
        if k == "letter":                        # single letters (subscripted) only: words are text
            return {"e": sympy.E, "i": sympy.I}.get(v) or sympy.Symbol(v.replace("{", "").replace("}", ""))
        if k == "op" and v in "({[":
            e = self.expr()
            self.expect({"(": ")", "{": "}", "[": "]"}[v])
            return e
        if k == "op" and v == "|":
            e = self.expr()
            self.expect("|")
            return sympy.Abs(e, evaluate=False)
        if k == "cmd":
            return self.command(v[1:])
        raise _Unsupported(f"unexpected {v!r}")

    def command(self, name: str):
        if name in _CONSTS:
            return _CONSTS[name]
        if name in _GREEK:
            return sympy.Symbol(name)
        if name == "frac":
            num = self.group()
            return _div(num, self.group())
        if name == "binom":
            n = self.group()
            return _binomial(n, self.group())
        if name == "sqrt":
            if self.at("op", "["):
                self.take()
                index = self.expr()
                self.expect("]")
                return _pow(self.group(), _div(sympy.S.One, index))
            return _pow(self.group(), sympy.Rational(1, 2))
        if name in ("lfloor", "lceil"):
            e = self.expr()
            self.expect_cmd("rfloor" if name == "lfloor" else "rceil")
            return (sympy.floor if name == "lfloor" else sympy.ceiling)(e, evaluate=False)
        if name in _FUNCS:
            return self.function(name)
        raise _Unsupported(f"unknown command \\{name}")

    def expect_cmd(self, name):
        if not self.at("cmd", "\\" + name):
            raise _Unsupported(f"expected \\{name}")
        self.take()

    def function(self, name: str):
        """\\sin x, \\sin(x), \\sin^2 x, \\log_2 8, \\ln x."""
        base = power = None
        if name == "log" and self.at("op", "_"):
            self.take()
            base = self.group()
        if self.at("op", "^"):
            self.take()
            power = self.exponent()
        if self.at("op", "(", "{"):
            arg = self.group()
        else:                                    # \sin 2x: the implicit product that follows
            arg = self.power()
            while self.at("letter") or (self.at("cmd") and self.peek()[1][1:] in _IMPLICIT_CMDS - set(_FUNCS)):
                arg = _mul(arg, self.power())
        # unevaluated: sympy's own simplification of f(arg) is unbounded; numeric evaluation decides
        e = _FUNCS[name](arg, evaluate=False)
        if base is not None:
            e = _div(e, sympy.log(base, evaluate=False))
        return _pow(e, power) if power is not None else e


def _parse_expr(s: str):
    """sympy expression for `s`; mixed numbers like `2\\frac{1}{2}` mean 2 + 1/2 (GSM8K style)."""
    s = re.sub(r"(?<![\w.}^_])(\d+)\s*\\frac(?:\{(\d+)\}\{(\d+)\}|(\d)(\d))", r"(\1+\2\4/\3\5)", s)
    return _Parser(s).parse()


# ------------------------------------------------------------------------------------------------
# Numeric evaluation of the sympy objects we build (complex floats; no lambdify, no eval)
# ------------------------------------------------------------------------------------------------

def _real_fn(f):
    def g(z):
        if abs(z.imag) > 1e-12:
            raise ValueError("complex argument")
        return complex(f(z.real))
    return g


_EVAL_FUNCS = {
    sympy.sin: cmath.sin, sympy.cos: cmath.cos, sympy.tan: cmath.tan, sympy.asin: cmath.asin,
    sympy.acos: cmath.acos, sympy.atan: cmath.atan, sympy.sinh: cmath.sinh, sympy.cosh: cmath.cosh,
    sympy.tanh: cmath.tanh, sympy.exp: cmath.exp, sympy.log: cmath.log,
    sympy.cot: lambda z: 1 / cmath.tan(z), sympy.sec: lambda z: 1 / cmath.cos(z),
    sympy.csc: lambda z: 1 / cmath.sin(z), sympy.Abs: lambda z: complex(abs(z)),
    sympy.floor: _real_fn(math.floor), sympy.ceiling: _real_fn(math.ceil),
    sympy.factorial: _real_fn(lambda x: math.gamma(x + 1)),
}
_EVAL_CONSTS = {sympy.pi: complex(math.pi), sympy.E: complex(math.e), sympy.I: 1j}


def _ev(e, env: dict) -> complex:
    """Value of a sympy expression at env {Symbol: complex}; raises on anything unknown or infinite."""
    if e.is_Rational:
        v = complex(float(Fraction(int(e.p), int(e.q))))
    elif e.is_Symbol:
        v = env[e]
    elif e.is_Atom and e in _EVAL_CONSTS:
        v = _EVAL_CONSTS[e]
    elif e.is_Add:
        v = sum(_ev(a, env) for a in e.args)
    elif e.is_Mul:
        v = 1 + 0j
        for a in e.args:
            v *= _ev(a, env)
    elif e.is_Pow:
        b, x = _ev(e.args[0], env), e.args[1]
        if x.is_Rational and b.imag == 0 and b.real < 0 and x.q % 2:    # real odd root: cbrt(-8) = -2
            v = complex((-1) ** int(x.p) * (-b.real) ** float(x))
        else:
            v = b ** (int(x) if x.is_Integer else _ev(x, env))
    elif e.func is sympy.binomial:
        n, k = (_ev(a, env).real for a in e.args)
        v = complex(math.gamma(n + 1) / (math.gamma(k + 1) * math.gamma(n - k + 1)))
    elif e.func in _EVAL_FUNCS and len(e.args) == 1:
        v = _EVAL_FUNCS[e.func](_ev(e.args[0], env))
    else:
        raise _Unsupported(f"cannot evaluate {type(e).__name__}")
    if not cmath.isfinite(v):
        raise OverflowError("not finite")
    return v


def _close(x: complex, y: complex, rel: float) -> bool:
    return abs(x - y) <= rel * max(abs(x), abs(y)) + 1e-12


def _fixed_points(count: int = 6, dims: int = 12, seed: int = 1234) -> list:
    """Evaluation points for expressions in symbols: fixed, so every verdict is deterministic;
    positive, so roots and logs stay on their principal real branch."""
    rng = random.Random(seed)
    return [[rng.uniform(0.3, 2.7) for _ in range(dims)] for _ in range(count)]


_POINTS = _fixed_points()


def _values_equal(x, dx, y, dy) -> bool:
    """Exact rationals exactly; constants numerically; expressions in symbols at 6 fixed points."""
    if x == y:
        return True
    if x.is_Rational and y.is_Rational:
        return bool(dx or dy) and _decimal_close(Fraction(int(x.p), int(x.q)), dx,
                                                 Fraction(int(y.p), int(y.q)), dy)
    syms = sorted(x.free_symbols | y.free_symbols, key=str)
    if not syms:
        try:
            vx, vy = _ev(x, {}), _ev(y, {})
        except (_Unsupported, ArithmeticError, ValueError):
            return False
        return _decimal_close(vx, dx, vy, dy) if (dx or dy) else _close(vx, vy, _REL_TOL)
    return _same_function(x, y, syms, ratio=False)


def _same_function(x, y, syms, ratio: bool) -> bool:
    """x == y at >= 3 of 6 fixed points and never different there. With ratio=True (equations,
    as lhs - rhs) x / y must instead be the same non-zero constant at every point."""
    if len(syms) > len(_POINTS[0]):
        return False
    agree, c = 0, None
    for point in _POINTS:
        env = {s: complex(point[j]) for j, s in enumerate(syms)}
        try:
            vx, vy = _ev(x, env), _ev(y, env)
        except (_Unsupported, ArithmeticError, ValueError, KeyError):
            continue
        if ratio:
            if abs(vy) < 1e-9:
                continue
            vx, vy = vx / vy, (c if c is not None else vx / vy)
            c = vy
        if not _close(vx, vy, 1e-8):
            return False
        agree += 1
    return agree >= 3 and (c is None or abs(c) > 1e-12)


# ------------------------------------------------------------------------------------------------
# Structures: tuples, sets, lists, intervals, matrices, equations, inequalities, text
# ------------------------------------------------------------------------------------------------

_MATRIX_RE = re.compile(r"\\begin\{(\w*matrix|array|cases)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}", re.S)
_INEQ_RE = re.compile(r"\\[lgn]e(?![a-zA-Z])|<|>")
_VAR_NAME = r"(?:[a-zA-Z]|\\(?:" + "|".join(sorted(_GREEK)) + r"))(?:_\{?\w{1,4}\}?)?"   # x, a_1, \theta
_VAR = r"(-?)" + _VAR_NAME                                  # the variable of an inequality, maybe negated
# a math span that only names a variable (not e, i: constants; not capitals: choices, points)
_LONE_VAR_RE = re.compile(r"(?=[a-df-hj-z\\])" + _VAR_NAME)
_NAME_RE = re.compile(_LHS_VAR + r"|[a-zA-Z ]+|\(\s*" + _LHS_VAR + r"(?:\s*,\s*" + _LHS_VAR + r")*\s*\)")


def _split_top(s: str, sep: str) -> list:
    """Split at `sep` outside any (), [], {} (bracket kinds are not matched: `[1, 2)` is fine)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        c = s[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            start = i = i + len(sep)
            continue
        i += 1
    parts.append(s[start:])
    if len(parts) > _MAX_ITEMS:
        raise _TooBig("too many elements")
    return [p.strip() for p in parts]


def _wrapped(s: str) -> bool:
    """True when the first bracket of `s` closes at its last character."""
    depth = 0
    for i, c in enumerate(s):
        depth += (c in "([{") - (c in ")]}")
        if depth == 0:
            return i == len(s) - 1
    return False


def _text_key(s: str) -> str:
    return re.sub(r"[\s{}\\]", "", s).lower()


def _element(s: str):
    """One value: ('expr', ((sympy, dec),)) or ('text', key)."""
    if not s or re.search(r"[a-zA-Z]{3,}", re.sub(r"\\[a-zA-Z]+", " ", s)):
        return ("text", _text_key(s))            # words are text, not products of letters
    try:
        value = _parse_expr(s)
    except _Unsupported:
        return ("text", _text_key(s))
    m = _NUM_RE.fullmatch(s)
    return ("expr", ((value, _decimal(s)[1] if m else None),))


def _equation(parts: list, depth: int):
    """`a = b` as ('eq', a - b, value, named), or the right-hand side alone where `a` is no expression
    (`(p, q) = (3, 2)`, `\\angle A = 30`) or a constant (`6/8 = 3/4`); a chain's last member. Against
    a gold that is not an equation the value counts: the rhs of `x = 3`, `f(x) = 2x + 3`, `y = 2x + 3`
    (named: the lhs is a name) and of `x + y = 5` (a constant rhs); against an equation both the
    value (two named ones) and lhs - rhs up to a factor (`y = x + 1` is `x - y + 1 = 0`)."""
    lhs, rhs = parts[-2], parts[-1]
    if len(parts) > 2:
        return _structure(rhs, depth + 1)
    if re.fullmatch(_LHS_VAR, rhs) and not re.fullmatch(_LHS_VAR, lhs):
        lhs, rhs = rhs, lhs                      # 3 = x
    right = _structure(rhs, depth + 1)
    try:
        left = _parse_expr(lhs)
    except _Unsupported:
        return right
    if right[0] != "expr" or not left.free_symbols:
        return right
    value = right[1][0][0]
    named = bool(_NAME_RE.fullmatch(lhs))
    return ("eq", _add(left, _neg(value)), right if named or not value.free_symbols else None, named)


def _interval(lo, hi, left_closed: bool, right_closed: bool):
    # an infinite end is open whatever bracket was written
    inf = lambda item: item[0] == "expr" and item[1][0][0] in (sympy.oo, -sympy.oo)  # noqa: E731
    return ("interval", left_closed and not inf(lo), lo, hi, right_closed and not inf(hi))


def _inequality(s: str):
    """x > 3, x \\le 5, -2 < x \\le 5 (one variable) -> an interval; x \\ne 3 -> two; None if not of
    that shape. `-x > -1` is x < 1: a negated variable flips the relation and negates the bounds."""
    ops = _INEQ_RE.findall(s)
    if not 1 <= len(ops) <= 2:
        return None
    parts = [p.strip() for p in _INEQ_RE.split(s)]
    var = [re.fullmatch(_VAR, p) for p in parts]
    if sum(map(bool, var)) != 1 or (len(ops) == 2 and not var[1]) or ("\\ne" in ops and len(ops) == 2):
        return None
    k = next(i for i, v in enumerate(var) if v)
    negate = bool(var[k].group(1))
    bounds = [_structure(f"-({p})" if negate else p, 1) for i, p in enumerate(parts) if i != k]
    inf, ninf = ("expr", ((sympy.oo, None),)), ("expr", ((-sympy.oo, None),))
    if ops == ["\\ne"]:
        return ("set", (_interval(ninf, bounds[0], False, False), _interval(bounds[0], inf, False, False)))
    less = [(op in ("<", "\\le")) != negate for op in ops]
    closed = [op in ("\\le", "\\ge") for op in ops]
    if len(ops) == 2:
        if less[0] != less[1]:
            return None
        a, b = bounds
        return _interval(a, b, closed[0], closed[1]) if less[0] else _interval(b, a, closed[1], closed[0])
    upper = less[0] == (k == 0)                  # x < b or b > x
    return _interval(ninf, bounds[0], False, closed[0]) if upper else _interval(bounds[0], inf, closed[0], False)


def _structure(s: str, depth: int = 0):
    """Parse a normalised answer into nested ('kind', ...) tuples (see _element for leaves)."""
    s = s.strip()
    if depth > 4:
        raise _TooBig("structure too deep")
    bracketed = len(s) > 2 and s[0] in "([" and s[-1] in ")]"   # \left[\begin{array}{cc}..\end{array}\right]
    m = _MATRIX_RE.fullmatch(s) or (bracketed and _MATRIX_RE.fullmatch(s[1:-1]))
    if m:
        rows = [r for r in _split_top(m.group(2), "\\\\") if r]
        if m.group(1) == "cases":                 # a system's solution: x = 2 \\ y = 1 is the list
            return ("list", _items([r.replace("&", " ") for r in rows], depth))
        return ("matrix", tuple(tuple(_element(c) for c in _split_top(r, "&")) for r in rows))
    if s.startswith("{") and s.endswith("}") and _wrapped(s):
        return _structure(s[1:-1], depth + 1)     # {1, 2}: TeX grouping braces carry nothing
    parts = _split_top(s, "\\cup")
    if len(parts) > 1:
        return ("set", _items(parts, depth))
    if s.startswith("\\{") and s.endswith("\\}") and _wrapped(s[1:]):
        inner = s[2:-2].strip()
        return ("set", _items(_split_top(inner, ","), depth) if inner else ())
    if len(s) > 1 and s[0] in "([" and s[-1] in ")]" and _wrapped(s):
        items = _split_top(s[1:-1], ",")
        if len(items) == 2 and (s[0] == "[" or s[-1] == "]"):
            lo, hi = (_structure(p, depth + 1) for p in items)
            return _interval(lo, hi, s[0] == "[", s[-1] == "]")
        if len(items) >= 2:
            return ("tuple", tuple(_structure(p, depth + 1) for p in items))
    items = _split_top(s, ",")
    if len(items) > 1:
        return ("list", _items(items, depth))
    pm = [m.start() for m in re.finditer(r"\\(?:pm|mp)(?![a-zA-Z])", s)]
    if 0 < len(pm) <= 3:                          # 1 \pm \sqrt{2}: the two-element list
        k = pm[0]
        return ("list", _items([s[:k] + "+" + s[k + 3:], s[:k] + "-" + s[k + 3:]], depth))
    parts = _split_top(s, "=")
    if len(parts) > 1:
        return _equation(parts, depth)
    return _inequality(s) or _element(s)


def _items(parts, depth) -> tuple:
    """Elements of an unordered collection; a nested \\pm list is flattened into it."""
    out = []
    for p in parts:
        item = _structure(p, depth + 1)
        out.extend(item[1] if item[0] == "list" else (item,))
    if len(out) > _MAX_ITEMS:
        raise _TooBig("too many elements")
    return tuple(out)


@functools.lru_cache(maxsize=8192)
def _parsed(norm: str, percent: bool):
    """Cached structure of a normalised answer; ('reject', why) when it is out of bounds."""
    try:
        item = _structure(norm)
    except (_TooBig, RecursionError, OverflowError) as err:
        return ("reject", str(err) or type(err).__name__)
    except Exception:  # noqa: BLE001  (outside the parsed subset: compare as text)
        return ("text", _text_key(norm))
    if percent and item[0] == "expr":
        item = ("expr", _with_percent(item[1], True))
    return item


# ------------------------------------------------------------------------------------------------
# Comparison
# ------------------------------------------------------------------------------------------------

_SEQ = ("tuple", "list", "set")


def _match(a, b, deadline: float) -> bool:
    if time.perf_counter() > deadline:
        raise _Timeout()
    ka, kb = a[0], b[0]
    if "reject" in (ka, kb):
        return False
    if ka == "text" or kb == "text":
        return ka == kb and a[1] == b[1]
    for x, y in ((a, b), (b, a)):
        if x[0] in ("list", "set") and len(x[1]) == 1 and y[0] not in ("list", "set"):
            return _match(x[1][0], y, deadline)   # {3} against 3, {(1, 2)} against (1, 2)
        if x[0] == "eq" and y[0] != "eq":
            return x[2] is not None and _match(x[2], y, deadline)   # x = 3 or x + y = 5 against 5
    if ka == kb == "expr":
        return any(_values_equal(x, dx, y, dy) for x, dx in a[1] for y, dy in b[1])
    if ka == kb == "eq":
        if a[3] and b[3] and _match(a[2], b[2], deadline):
            return True                           # f(x) = 2x + 3 against y = 2x + 3
        syms = sorted(a[1].free_symbols | b[1].free_symbols, key=str)
        return bool(syms) and _same_function(a[1], b[1], syms, ratio=True)
    if ka == kb == "interval":
        return a[1] == b[1] and a[4] == b[4] and _match(a[2], b[2], deadline) and _match(a[3], b[3], deadline)
    for x, y in ((a, b), (b, a)):                 # an open interval is written like a point
        if x[0] == "interval" and y[0] == "tuple" and not x[1] and not x[4] and len(y[1]) == 2:
            return _match(x[2], y[1][0], deadline) and _match(x[3], y[1][1], deadline)
        if x[0] == "matrix" and y[0] == "tuple" and x[1] and 1 in (len(x[1]), len(x[1][0])):  # a vector
            return _ordered([c for r in x[1] for c in r], y[1], deadline)
    if ka == kb == "matrix":
        return len(a[1]) == len(b[1]) and all(_ordered(r, s, deadline) for r, s in zip(a[1], b[1]))
    if ka in _SEQ and kb in _SEQ:
        if {ka, kb} == {"tuple", "set"}:
            return False                          # (2, 3) is a pair or an interval, not {2, 3}
        if "set" in (ka, kb) or ka == kb == "list":
            return _unordered(a[1], b[1], deadline)
        return _ordered(a[1], b[1], deadline)    # a list against a tuple: x = 2, y = 3 is (2, 3)
    return False


def _ordered(xs, ys, deadline) -> bool:
    return len(xs) == len(ys) and all(_match(x, y, deadline) for x, y in zip(xs, ys))


def _unordered(xs, ys, deadline) -> bool:
    if len(xs) != len(ys):
        return False
    used = [False] * len(ys)
    for x in xs:
        for j, y in enumerate(ys):
            if not used[j] and _match(x, y, deadline):
                used[j] = True
                break
        else:
            return False
    return True


_WORDS_RE = re.compile(r"[A-Za-z][A-Za-z .,'\-]*")
_CHOICE_RE = re.compile(r"(?:\(?[A-E]\)?(?:,\s*|\s+|\s*(?:and|or)\s*)?){1,5}")   # C, (C), ABD, A, C
_CHOICE_PRED_RE = re.compile(r"\(([A-Ea-e])\).*|([A-Ea-e])(?:[).:].*)?", re.S)     # (B) 14, b: ...


@functools.lru_cache(maxsize=8192)
def _gold(gold: str):
    """(normalised, percent, plain number alternatives or None, choice letters or '')."""
    if "####" in gold or _BOX_RE.search(gold):
        gold = gold_answer_from_solution(gold) or ""
    norm, percent = _normalize(gold.strip())
    return norm, percent, _number_alts(norm, percent), _choices(norm)


def _choices(norm: str) -> str:
    """The sorted letters of a multiple-choice answer (`(C)` -> C, `A, D` -> AD), or ''."""
    return "".join(sorted(set(re.findall(r"[A-E]", norm)))) if _CHOICE_RE.fullmatch(norm) else ""


def _number_alts(norm: str, percent: bool):
    num = _plain_number(norm)
    return None if num is None else _with_percent((num,), percent)


def _single_value(num, norm: str, percent: bool) -> bool:
    """Context for a decimal comma: `2,74` is 2.74 against one value, the list 2, 74 otherwise."""
    return num is not None or _parsed(norm, percent)[0] in ("expr", "eq")


def verify_with_reason(prediction_text: str, gold_answer: str) -> tuple:
    """(is_correct, reason). Never raises; anything unexpected is (False, 'error: ...')."""
    deadline = time.perf_counter() + _TIME_BUDGET
    try:
        raw, how = _extract(prediction_text)
        if raw is None:
            return False, how
        if len(raw) > _MAX_ANSWER:
            return False, f"answer longer than {_MAX_ANSWER} characters"
        if not isinstance(gold_answer, str) or not gold_answer.strip():
            return False, "empty gold answer"
        g_norm, g_pct, g_num, g_choice = _gold(gold_answer)
        p_norm, p_pct = _normalize(raw)
        if not p_norm or not g_norm:
            return False, "empty answer after normalisation"
        if p_norm == g_norm and p_pct == g_pct:
            return True, f"string match ({how})"
        if _WORDS_RE.fullmatch(p_norm) and _text_key(p_norm) == _text_key(g_norm):
            return True, f"text match ({how})"         # `No` vs `no`: too short to be seen as text
        if g_choice:                                   # multiple choice: compare the letters only
            m = _CHOICE_PRED_RE.fullmatch(p_norm)
            letters = _choices(p_norm) or (m and (m.group(1) or m.group(2)).upper())
            return letters == g_choice, f"choice {letters} vs {g_choice}"
        p_num = _number_alts(p_norm, p_pct)
        p_dec, g_dec = _comma_decimal(p_norm, raw), _comma_decimal(g_norm, gold_answer)
        if p_dec and not g_dec and _single_value(g_num, g_norm, g_pct):
            p_norm, p_num = p_dec, _number_alts(p_dec, p_pct)
        elif g_dec and not p_dec and _single_value(p_num, p_norm, p_pct):
            g_norm, g_num = g_dec, _number_alts(g_dec, g_pct)
        if p_num is not None and g_num is not None:
            return _numbers_equal(p_num, g_num), f"numbers ({how})"
        g_item, p_item = _parsed(g_norm, g_pct), _parsed(p_norm, p_pct)
        if time.perf_counter() > deadline:
            raise _Timeout()
        if "reject" in (g_item[0], p_item[0]):
            return False, f"rejected: {(g_item if g_item[0] == 'reject' else p_item)[1]}"
        return _match(p_item, g_item, deadline), f"structural {p_item[0]} vs {g_item[0]} ({how})"
    except _Timeout:
        return False, "time budget exceeded"
    except _TooBig as err:
        return False, f"rejected: {err}"
    except Exception as err:  # noqa: BLE001  (untrusted input: any failure is a wrong answer)
        return False, f"error: {type(err).__name__}: {err}"


def verify(prediction_text: str, gold_answer: str) -> bool:
    """True when the final answer in `prediction_text` is equivalent to `gold_answer`."""
    return verify_with_reason(prediction_text, gold_answer)[0]


def math_reward(text: str, gold: str) -> float:
    """Verifier reward: 1.0 for a correct final answer, else 0.0."""
    return 1.0 if verify(text, gold) else 0.0
