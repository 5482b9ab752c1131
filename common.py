"""Shared pieces of ERPD, in the order data flows through them.

    1. data and prompts        load_problems, encode_prompt
    2. models and sampling     load_model, sample_responses, sample_and_score
    3. answer checking         extract_answer, verify, math_reward
    4. log-probs / KL / entropy  token_logprobs, token_entropy, token_kl, kl_estimators, response_logprobs
    5. losses                  group_advantages, ppo_clip_loss, sapo_loss, ce_loss, mse_loss, ...
    6. shards                  write_shard, read_teacher_shards, fingerprints
    7. distributed and logging init_distributed, all_reduce_gradients, JsonlLogger, progress

Shapes: B sequences, T response positions (prompt positions never get logits), V vocabulary.
Pure functions (sections 3-5) take tensors and return tensors; tests call them without a model.
"""

from __future__ import annotations

import datetime
import hashlib
import inspect
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = str(ROOT / "tiny" / "model")
DEFAULT_TRAIN_DATA = str(ROOT / "tiny" / "train.jsonl")
DEFAULT_TEST_DATA = str(ROOT / "tiny" / "test.jsonl")

LOG_RATIO_CLAMP = 20.0  # log-ratios are clamped to [-20, 20] before exp (METHOD.md)


class InputError(Exception):
    """Bad input from the user (data, shards, flags): reported as one line, never a traceback."""


def run_main(main) -> None:
    """Run a script's main(); turn InputError into a one-line message and exit code 2."""
    try:
        main()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(2)


# =================================================================================================
# 1. Data and prompts
# =================================================================================================

QUESTION_FIELDS = ("prompt", "problem", "question")
ANSWER_FIELDS = ("answer", "solution")  # "answer" first: MATH-500 has both, the short one is gold
PLAIN_PROMPT_TEMPLATE = (
    "Question: {question}\n"
    "Please reason step by step, and put your final answer within \\boxed{{}}.\nAnswer: "
)


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


def encode_prompt(tokenizer, question: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of the prompt the model sees, identical for training and evaluation.

    The tokenizer's chat template when it has one (its special tokens come from the template,
    so add_special_tokens=False), else PLAIN_PROMPT_TEMPLATE with the tokenizer's own BOS.
    """
    if tokenizer.chat_template:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": question})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = (system_prompt + "\n" if system_prompt else "") + PLAIN_PROMPT_TEMPLATE.format(question=question)
    return tokenizer(text)["input_ids"]


def encode_problems(tokenizer, problems: list[dict], max_prompt_len: int, source: str,
                    system_prompt: str | None = None, on_long: str = "skip") -> list[dict]:
    """Attach "prompt_ids"; prompts over `max_prompt_len` tokens are skipped (counted) or fatal."""
    kept, too_long = [], []
    for p in problems:
        ids = encode_prompt(tokenizer, p["prompt"], system_prompt)
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


# =================================================================================================
# 2. Models and sampling
# =================================================================================================

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(path: str, dtype: str = "float32", device: str | torch.device = "cpu",
               attn_implementation: str = "sdpa", trust_remote_code: bool = False,
               gradient_checkpointing: bool = False):
    """An AutoModelForCausalLM and its tokenizer, dropout off, ready for training and sampling.

    Dropout is zeroed in the config and in every nn.Dropout so that train() and eval() compute the
    same function: the pi_0 log-probs and the first training forward then agree exactly (ratio 1).
    A missing pad token is set to EOS; that is safe because every mask here comes from positions.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

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
    model = AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=DTYPES[dtype], attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    model.name_or_path = path
    return model, tokenizer


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and the generation config's (may be a list)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return sorted(i for i in ids if i is not None)


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
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def sample_responses(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
                     top_p: float, stop_ids: list[int], pad_id: int, generator,
                     batch_size: int = 64, show_progress: bool = False) -> list[dict]:
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
    for start in progress(range(0, len(order), batch_size), enabled=show_progress, desc="sampling"):
        batch = order[start:start + batch_size]
        ids, mask, positions = left_pad([prompts[i] for i in batch], pad_id, device)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1)
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
    responses = sample_responses(
        model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        stop_ids=stop_token_ids(model, tokenizer), pad_id=tokenizer.pad_token_id, generator=generator,
        batch_size=batch_size, show_progress=ctx.is_main) if prompts else []
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
    """Accuracy, truncation and the fraction of groups with any reward signal (pitfall 11)."""
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


# =================================================================================================
# 3. Answer checking (model output is untrusted input: parsed, never evaluated)
# =================================================================================================

from _verifier import (  # noqa: E402  (merged into this section once the verifier lands)
    extract_answer, gold_answer_from_solution, math_reward, verify, verify_with_reason)


# =================================================================================================
# 4. Log-probs, entropy and KL
# =================================================================================================

CHUNK_ELEMENTS = 1 << 21  # rows per chunk = CHUNK_ELEMENTS // V: a few MB of float32 working memory


def _rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


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
        step = _rows_per_chunk(flat.shape[-1])
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
        step = _rows_per_chunk(flat.shape[-1])
        for s in range(0, flat.shape[0], step):
            x = _upcast(flat[s:s + step]) / ctx.temperature
            g = torch.exp(x - lse[s:s + step, None]).mul_(-g_out[s:s + step, None])  # -p * g
            g.scatter_add_(1, lab[s:s + step, None], g_out[s:s + step, None])      # + onehot * g
            grad[s:s + step] = (g / ctx.temperature).to(flat.dtype)
        return grad.view(logits.shape), None, None


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(label | state) under softmax(logits / temperature).

    logits [..., V] (fp32 / bf16 / fp16), labels [...] -> [...] float32 (float64 for float64 input).
    Differentiable; memory beyond the logits is O(rows-per-chunk x V), see _TokenLogprob.
    """
    return _TokenLogprob.apply(logits, labels, float(temperature))


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position: [..., V] -> [...] float32.

    A diagnostic (no gradient needed), computed in row chunks under no_grad.
    """
    flat = logits.detach().reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=_upcast(flat[:0]).dtype, device=flat.device)
    step = _rows_per_chunk(flat.shape[-1])
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
    step = _rows_per_chunk(fp.shape[-1])
    parts = []
    for s in range(0, fp.shape[0], step):
        logp = torch.log_softmax(_upcast(fp[s:s + step]) / temperature, dim=-1)
        logq = torch.log_softmax(_upcast(fq[s:s + step]) / temperature, dim=-1)
        parts.append((logp.exp() * (logp - logq)).sum(-1).clamp(min=0.0))
    return torch.cat(parts).view(logits_p.shape[:-1])


def kl_estimators(logp: torch.Tensor, ref_logp: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sample estimators of KL(pi || ref) from tokens sampled from pi (Schulman's k1, k2, k3).

    logp, ref_logp [B, T] -> each [B, T]. log-ratio clamped to [-20, 20] so exp never overflows.
    k1 = log r (unbiased, high variance), k2 = (log r)^2 / 2, k3 = exp(-log r) - 1 + log r (>= 0).
    """
    log_ratio = (logp - ref_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return {"k1": log_ratio, "k2": 0.5 * log_ratio ** 2, "k3": torch.expm1(-log_ratio) + log_ratio}


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL term for a loss: value of k3, gradient of k2 (pitfall 4).

    grad k2 = log r * grad log pi, whose expectation is the gradient of KL(pi || ref);
    differentiating k3 directly would give a biased gradient. [B, T] -> [B, T].
    """
    est = kl_estimators(logp, ref_logp)
    return est["k2"] - est["k2"].detach() + est["k3"].detach()


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


def response_logits(model, batch: dict) -> torch.Tensor:
    """Logits at the positions that predict response tokens only: [B, T, V] in the model's dtype."""
    width = batch["labels"].shape[1]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False, logits_to_keep=width + 1)
    return out.logits[:, :-1]


def response_logprobs(model, batch: dict, temperature: float) -> torch.Tensor:
    """log pi(y_t | s_t) of the response tokens with the training forward: [B, T] float32, 0 at padding."""
    logp = token_logprobs(response_logits(model, batch), batch["labels"], temperature)
    return logp * batch["mask"]


def my_micro_batches(batch: list[int], ctx, micro_batch: int) -> list[list[int]]:
    """This rank's share of a global batch, batch[rank::world], cut into micro-batches."""
    mine = batch[ctx.rank::ctx.world]
    return [mine[s:s + micro_batch] for s in range(0, len(mine), micro_batch)]


@torch.no_grad()
def score_rollouts(model, rollouts: list[dict], micro_batches: list[list[int]], *, pad_id: int,
                   temperature: float, ctx, ref_model=None, desc: str = "scoring") -> list[dict]:
    """Score rollouts with the training forward, micro-batch by micro-batch; gather over ranks.

    `micro_batches` are this rank's lists of rollout indices; the micro-batch layout is kept, so
    scoring in the first training step's layout reproduces its log-probs bit for bit (ratio 1).
    Returns a list aligned with `rollouts` (None where no rank scored it) of float32 CPU tensors
    {"logp" [T_i], "entropy" [T_i]} plus, with ref_model, {"ref_logp" [T_i], "kl" [T_i]} where
    "kl" is the exact per-token KL(model || ref_model) over the full vocabulary.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    mine = {}
    for mb in progress(micro_batches, enabled=ctx.is_main, desc=desc):
        chunk = [rollouts[i] for i in mb]
        batch = pack_rollouts(chunk, pad_id, device)
        logits = response_logits(model, batch)
        scores = {"logp": token_logprobs(logits, batch["labels"], temperature),
                  "entropy": token_entropy(logits, temperature)}
        if ref_model is not None:
            ref_logits = response_logits(ref_model, batch)
            scores["ref_logp"] = token_logprobs(ref_logits, batch["labels"], temperature)
            scores["kl"] = token_kl(logits, ref_logits, temperature)
        for row, i in enumerate(mb):
            n = len(rollouts[i]["response_ids"])
            mine[i] = {k: v[row, :n].float().cpu() for k, v in scores.items()}
    model.train(was_training)
    results: list[dict | None] = [None] * len(rollouts)
    for part in all_gather_objects(mine, ctx):
        for i, r in part.items():
            results[i] = r
    return results


def drift_metrics(policy, rollouts: list[dict], indices: list[int], *, ctx, pad_id: int, temperature: float,
                  micro_batch: int, ref_model=None) -> dict[str, float]:
    """Token-mean entropy and log-prob of the sampled tokens on rollouts[indices] (D's states), and
    with ref_model the exact token KL(policy || ref) over the full vocabulary: the drift curves."""
    mine = indices[ctx.rank::ctx.world]
    micro_batches = [mine[s:s + micro_batch] for s in range(0, len(mine), micro_batch)]
    scores = [s for s in score_rollouts(policy, rollouts, micro_batches, pad_id=pad_id, temperature=temperature,
                                        ctx=ctx, ref_model=ref_model, desc="drift on D") if s is not None]
    n_tokens = sum(len(s["logp"]) for s in scores)
    metrics = {"entropy": sum(s["entropy"].sum().item() for s in scores) / n_tokens,
               "logp_sampled": sum(s["logp"].sum().item() for s in scores) / n_tokens}
    if ref_model is not None:
        metrics["kl_to_base"] = sum(s["kl"].sum().item() for s in scores) / n_tokens
    return metrics


def pad_rows(rows: list[torch.Tensor], device) -> torch.Tensor:
    """Right-pad 1-D float tensors with zeros into [B, T]."""
    out = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out.to(device)


# =================================================================================================
# 5. Losses (per token [B, T] or per sequence [B]; the caller sums and divides by the global count)
# =================================================================================================


def group_advantages(rewards: torch.Tensor, normalize_std: bool = False) -> torch.Tensor:
    """A = r - mean(r) over each prompt's G rollouts, optionally / (std + 1e-6). [N, G] -> [N, G].

    A group whose rewards are all equal gets A = 0: it carries no signal.
    """
    adv = rewards - rewards.mean(-1, keepdim=True)
    if normalize_std:
        adv = adv / (rewards.std(-1, keepdim=True, unbiased=False) + 1e-6)
    # exactly 0 for equal rewards: mean() rounding (e.g. 16 x 0.7) / tiny std must not become signal
    return adv.masked_fill((rewards == rewards[..., :1]).all(-1, keepdim=True), 0.0)


def log_ratio(logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    return (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def ppo_clip_loss(logp, old_logp, adv, eps_low: float, eps_high: float):
    """-min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A). Tensors [B, T] (adv may be [B, 1]).

    Returns (loss [B, T], clipped [B, T] bool: the clipped branch was taken, so no gradient).
    """
    rho = torch.exp(log_ratio(logp, old_logp))
    unclipped = rho * adv
    clipped = torch.clamp(rho, 1 - eps_low, 1 + eps_high) * adv
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def sapo_loss(logp, old_logp, adv, tau_pos: float = 1.0, tau_neg: float = 1.05):
    """Soft-gated policy loss -(4 / tau) sigmoid(tau (rho - 1)) A, tau = tau_pos where A > 0 else tau_neg.

    At rho = 1 its gradient equals the policy gradient -A grad log pi; far from 1 the gate
    decays smoothly instead of cutting off. [B, T] -> [B, T].
    """
    rho = torch.exp(log_ratio(logp, old_logp))
    tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))
    return -(4.0 / tau) * torch.sigmoid(tau * (rho - 1.0)) * adv


def ce_loss(logp, adv):
    """Advantage-weighted cross-entropy -A log pi(y_t | s_t): no ratio, no clip. [B, T] -> [B, T]."""
    return -adv * logp


def mse_loss(logp, old_logp, mask, seq_adv, beta: float = 0.1):
    """(beta * sum_t log rho_t - A)^2 per sequence: regress the log-ratio onto the advantage.

    logp, old_logp, mask [B, T], seq_adv [B] -> [B].
    """
    seq_log_ratio = (log_ratio(logp, old_logp) * mask).sum(-1)
    return (beta * seq_log_ratio - seq_adv) ** 2


def distill_token_advantages(delta, clip_c: float = 2.0, alpha: float = 0.0, seq_adv=None):
    """Stage 2's token advantage A_t = clip(delta_t, -c, c) + alpha * A_seq. [B, T] (seq_adv [B])."""
    adv = delta.clamp(-clip_c, clip_c)
    if alpha and seq_adv is not None:
        adv = adv + alpha * seq_adv[:, None]
    return adv


def train_epoch(model, optimizer, rollouts: list[dict], loss_fn, *, epoch: int, ctx, pad_id: int,
                temperature: float, batch_size: int, micro_batch: int, seed: int,
                max_grad_norm: float, desc: str = "train", start_step: int = 0,
                on_step=None, totals: dict[str, float] | None = None) -> dict[str, float]:
    """One pass over the fixed rollouts: global batches, this rank's micro-batches, one step each.

    loss_fn(indices, packed, logp, counts) -> (loss, stats) gets the micro-batch's rollout indices,
    its packed batch and log-probs [B, T], and the global batch's {"tokens", "seqs"}; it returns the
    micro-batch's loss already divided by those global counts (so gradients, summed over
    micro-batches and ranks, do not depend on either), and stats as plain sums.
    Returns the epoch's stats summed over ranks, plus "loss" and "grad_norm" averaged over steps.
    Resuming: steps before `start_step` are skipped and `totals` holds their running stats;
    on_step(step, totals) runs after each optimizer step (checkpointing).
    """
    model.train()
    device = next(model.parameters()).device
    totals = dict(totals or {})
    batches = global_batches(len(rollouts), batch_size, seed, epoch)
    for step, batch in enumerate(progress(batches, enabled=ctx.is_main, desc=desc, initial=start_step), 1):
        if step <= start_step:
            continue
        counts = {"tokens": sum(len(rollouts[i]["response_ids"]) for i in batch), "seqs": len(batch)}
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for mb in my_micro_batches(batch, ctx, micro_batch):
            packed = pack_rollouts([rollouts[i] for i in mb], pad_id, device)
            loss, stats = loss_fn(mb, packed, response_logprobs(model, packed, temperature), counts)
            loss.backward()
            step_loss += loss.item()
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        all_reduce_gradients(model, ctx)
        step_loss = all_reduce_sum([step_loss], ctx)[0]
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        check_finite(torch.tensor(step_loss), f"loss at epoch {epoch}")
        check_finite(grad_norm, f"gradient norm at epoch {epoch}")
        optimizer.step()
        totals["loss"] = totals.get("loss", 0.0) + step_loss / len(batches)
        totals["grad_norm"] = totals.get("grad_norm", 0.0) + grad_norm.item() / len(batches)
        if on_step is not None:
            on_step(step, totals)
    keys = sorted(k for k in totals if k not in ("loss", "grad_norm"))
    summed = dict(zip(keys, all_reduce_sum([totals[k] for k in keys], ctx)))
    return {**summed, "loss": totals.get("loss", 0.0), "grad_norm": totals.get("grad_norm", 0.0)}


# =================================================================================================
# 6. Shards: what stage 1 hands to stage 2
# =================================================================================================

SHARD_FORMAT_VERSION = 1


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


def model_fingerprint(model) -> str:
    """Hash of parameter names, shapes and a strided sample of values rounded to bfloat16.

    Rounding to bf16 makes it the same whether the base was loaded in fp32 or bf16, so a
    bf16 stage 1 and an fp32 stage 2 of the same checkpoint agree, and any other model differs.
    """
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(f"{name}:{tuple(p.shape)}:".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    text = json.dumps([vocab, tokenizer.all_special_tokens, tokenizer.chat_template or ""])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_shard(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write safetensors atomically (temp file, then rename); return the file's sha256."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    return digest


def rollouts_to_shard(rollouts: list[dict], signals: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Flatten rollouts into shard tensors: per-row scalars [n], token ids [sum(P_i + T_i)] with
    offsets [n + 1], and one float32 array [sum(T_i)] per signal (e.g. "logp_base")."""
    lengths = [len(r["prompt_ids"]) + len(r["response_ids"]) for r in rollouts]
    offsets = torch.zeros(len(rollouts) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    tokens = [t for r in rollouts for t in r["prompt_ids"] + r["response_ids"]]
    shard = {
        "prompt_index": torch.tensor([r["prompt_index"] for r in rollouts], dtype=torch.int64),
        "sample_index": torch.tensor([r["sample_index"] for r in rollouts], dtype=torch.int64),
        "prompt_len": torch.tensor([len(r["prompt_ids"]) for r in rollouts], dtype=torch.int64),
        "response_len": torch.tensor([len(r["response_ids"]) for r in rollouts], dtype=torch.int64),
        "reward": torch.tensor([r["reward"] for r in rollouts], dtype=torch.float32),
        "advantage": torch.tensor([r["advantage"] for r in rollouts], dtype=torch.float32),
        "truncated": torch.tensor([r["truncated"] for r in rollouts], dtype=torch.uint8),
        "token_ids": torch.tensor(tokens, dtype=torch.int64),
        "token_offsets": offsets,
    }
    for name, values in signals.items():
        shard[name] = torch.cat(values).float() if values else torch.zeros(0)
    return shard


def shard_to_rollouts(shard: dict[str, torch.Tensor], signal_names: list[str]) -> list[dict]:
    """Inverse of rollouts_to_shard: rollout dicts with one [T_i] tensor per signal."""
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


# =================================================================================================
# 7. Distributed and logging
# =================================================================================================


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
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
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
    if ctx.world == 1:
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


def global_batches(num_items: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """This epoch's optimizer steps: a seeded permutation of all items cut into global batches.

    The same at any world size; rank r then takes batch[r::world].
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_items, generator=g).tolist()
    return [order[s:s + batch_size] for s in range(0, num_items, batch_size)]


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def progress(iterable, enabled: bool = True, **kwargs):
    """tqdm on rank 0, the bare iterable elsewhere."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, dynamic_ncols=True, leave=False, **kwargs)


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


def save_pretrained_atomic(model, tokenizer, out_dir, extra_json: dict | None = None) -> None:
    """save_pretrained into a temp folder, then rename over `out_dir`: a crash leaves the old one."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if extra_json:
        (tmp / "erpd.json").write_text(json.dumps(extra_json, indent=1))
    old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old.exists():
        import shutil

        shutil.rmtree(old)


def save_checkpoint(directory, model, optimizer, state: dict, ctx: Context) -> None:
    """Model weights (safetensors), optimizer state and the data position, written atomically.

    `state` is JSON (epoch, step, phase, running stats); every rank waits for rank 0 to finish,
    so a kill at any moment leaves either the previous checkpoint or this one, complete.
    """
    from safetensors.torch import save_model

    if ctx.is_main:
        directory = Path(directory)
        tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "rng": torch.get_rng_state().tolist()}))
        old = directory.with_name(f".{directory.name}.old{os.getpid()}")
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old.exists():
            import shutil

            shutil.rmtree(old)
    if ctx.world > 1:
        dist.barrier()


def load_checkpoint(directory, model, optimizer) -> dict | None:
    """Restore what save_checkpoint wrote; None when there is no checkpoint to resume from."""
    from safetensors.torch import load_model as load_weights

    directory = Path(directory)
    if not (directory / "state.json").is_file():
        return None
    state = json.loads((directory / "state.json").read_text())
    load_weights(model, str(directory / "model.safetensors"), device=str(next(model.parameters()).device))
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True,
                                         map_location=next(model.parameters()).device))
    torch.set_rng_state(torch.tensor(state.pop("rng"), dtype=torch.uint8))
    return state
