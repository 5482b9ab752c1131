"""Make the embedded tiny default: a character-level Llama and a synthetic arithmetic task.

Writes, reproducibly (fixed seeds), everything the pipeline needs to run offline on a CPU:

  tiny/train.jsonl   2000 rows {"prompt": "7+5*3-4", "answer": "18"}
  tiny/test.jsonl     200 rows, questions disjoint from train.jsonl and from the SFT problems
  tiny/model/        LlamaForCausalLM (safetensors, float32) + character-level tokenizer with a
                     chat template + generation_config

The task: integer expressions with NUM_OPS operations over +, -, * and operands in
[1, MAX_OPERAND], evaluated with the usual precedence, one step per operation:

  question  7+5*3-4
  solution  5*3=15 7+15=22 22-4=18 \\boxed{18}

The base is trained by supervised fine-tuning on freshly generated problems (never a test.jsonl
question), encoded exactly as the project encodes data (common.encode_prompt: the chat template,
add_special_tokens=False; response = solution ids + EOS), loss on the response tokens only, AdamW,
for a fixed budget of SFT_STEPS steps. Task difficulty and the step budget are tuned so that the
base is imperfect at temperature 1: it leaves room (and reward signal) for RL.

Measured with the defaults (torch 2.13 CPU, transformers 5.24, 1 thread): accuracy on test.jsonl at
temperature 1.0 (pure sampling, 4 samples per prompt, mean over samples) = 0.394; 99.4% of samples
well-formed (end with \\boxed{N} and EOS), mean response 30.7 tokens, 52% of test prompts with mixed
outcomes; 866k parameters, model.safetensors 3.47 MB; 2.5-4 minutes end to end on a shared 2-core
machine. The result is bit-identical on rerun (same machine, same thread count).

Usage:  python tools/make_tiny.py [--out tiny] [--steps N] [--seed S]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# ---- task ------------------------------------------------------------------------------------------
NUM_OPS = (2, 3)          # operations per question (inclusive range)
MAX_OPERAND = 20          # operands drawn from [1, MAX_OPERAND]
MAX_MUL_OPERAND = 12      # a factor of a '*' written in the question is at most this
OPS = "+-*"
N_TRAIN, N_TEST = 2000, 200

# ---- model -----------------------------------------------------------------------------------------
HIDDEN, LAYERS, HEADS, INTERMEDIATE, MAX_POS = 128, 4, 4, 384, 256

# ---- SFT -------------------------------------------------------------------------------------------
SFT_STEPS = 550         # tuned: T=1 accuracy rises steeply here (~16% at 400 steps, ~40% at 550, ~74% at 800)
BATCH = 64
LR = 2e-3
WARMUP = 50
WEIGHT_DECAY = 0.01

# ---- evaluation ------------------------------------------------------------------------------------
EVAL_SAMPLES = 4
MAX_NEW_TOKENS = 64

SPECIALS = ["<s>", "</s>", "<pad>", "<unk>"]
CHARS = ["\n", "\t"] + [chr(c) for c in range(32, 127)]  # printable ASCII: any task string is covered
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
                 "{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}")
BOXED_RE = re.compile(r"\\boxed\{(-?\d+)\}$")


# =================================================================================================
# Task
# =================================================================================================

def make_problem(rng: random.Random) -> tuple[str, str, int]:
    """(question, worked solution, answer): multiplications first, then + and - left to right."""
    n_ops = rng.randint(*NUM_OPS)
    ops = [rng.choice(OPS) for _ in range(n_ops)]
    nums = []
    for i in range(n_ops + 1):
        next_to_mul = (i > 0 and ops[i - 1] == "*") or (i < n_ops and ops[i] == "*")
        nums.append(rng.randint(1, MAX_MUL_OPERAND if next_to_mul else MAX_OPERAND))
    question = str(nums[0]) + "".join(op + str(n) for op, n in zip(ops, nums[1:]))
    vals, ops_left, steps = list(nums), list(ops), []
    for wanted in ("*", "+-"):
        i = 0
        while i < len(ops_left):
            if ops_left[i] not in wanted:
                i += 1
                continue
            a, b, op = vals[i], vals[i + 1], ops_left[i]
            c = a * b if op == "*" else a + b if op == "+" else a - b
            steps.append(f"{a}{op}{b}={c}")
            vals[i:i + 2] = [c]
            del ops_left[i]  # stay at i: a chain (2*3*4, 5-1+2) continues from the new value
    answer = vals[0]
    assert answer == eval(question), question  # noqa: S307 - our own digits and + - * only
    return question, " ".join(steps) + f" \\boxed{{{answer}}}", answer


def make_splits(seed: int):
    """Disjoint train / test question sets (train.jsonl is what stage 1 samples D from)."""
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < N_TRAIN + N_TEST:
        q, _, a = make_problem(rng)
        if q in seen:
            continue
        seen.add(q)
        rows.append({"prompt": q, "answer": str(a)})
    return rows[:N_TRAIN], rows[N_TRAIN:]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


# =================================================================================================
# Tokenizer and model
# =================================================================================================

def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one char = one token
    tk.decoder = decoders.Fuse()  # join with nothing in between
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", clean_up_tokenization_spaces=False,
                                  model_max_length=MAX_POS)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def check_tokenizer(tok, samples: list[str]) -> None:
    for s in samples:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(s), (s, ids)
        assert tok.unk_token_id not in ids, s
        assert tok.decode(ids) == s, (s, tok.decode(ids))
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4


def encode_prompt(tok, question: str) -> list[int]:
    """Exactly common.encode_prompt for a tokenizer with a chat template and no system prompt."""
    text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                   tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def encode_response(tok, solution: str) -> list[int]:
    return tok(solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def build_model(tok):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=MAX_POS,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, attention_dropout=0.0, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    return model


# =================================================================================================
# SFT
# =================================================================================================

def sft_batch(tok, problems: list[tuple[str, str]], prompt_cache: dict) -> tuple[torch.Tensor, torch.Tensor]:
    seqs, labels = [], []
    for q, sol in problems:
        p = prompt_cache.get(q)
        if p is None:
            p = prompt_cache[q] = encode_prompt(tok, q)
        r = encode_response(tok, sol)
        seqs.append(p + r)
        labels.append([-100] * len(p) + r)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (s, lb) in enumerate(zip(seqs, labels)):  # right padding: positions are the natural ones
        ids[i, :len(s)] = torch.tensor(s)
        lab[i, :len(s)] = torch.tensor(lb)
    return ids, lab


def train(model, tok, steps: int, seed: int, exclude: set[str], log_every: int = 100) -> None:
    rng = random.Random(seed + 1)
    torch.manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.98))

    def lr_at(step):  # linear warm-up, then cosine to 10%
        if step < WARMUP:
            return (step + 1) / WARMUP
        t = (step - WARMUP) / max(1, steps - WARMUP)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    cache: dict = {}
    t0, running = time.time(), 0.0
    for step in range(steps):
        batch = []
        while len(batch) < BATCH:
            q, sol, _ = make_problem(rng)
            if q not in exclude:
                batch.append((q, sol))
        ids, lab = sft_batch(tok, batch, cache)
        # right padding and a causal model: real tokens never see the pads, so no mask is needed
        loss = model(input_ids=ids, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = (step % log_every) + 1
            print(f"  sft step {step + 1:5d}/{steps}  loss {running / n:.4f}  "
                  f"lr {sched.get_last_lr()[0]:.2e}  {time.time() - t0:.0f}s", flush=True)
            running = 0.0
    model.eval()


# =================================================================================================
# Evaluation: pure sampling at temperature 1
# =================================================================================================

@torch.no_grad()
def evaluate(model, tok, rows: list[dict], samples: int, seed: int, batch_size: int = 200) -> dict:
    torch.manual_seed(seed)
    prompts = [encode_prompt(tok, r["prompt"]) for r in rows for _ in range(samples)]
    golds = [r["answer"] for r in rows for _ in range(samples)]
    correct = well_formed = 0
    lengths, examples, per_sample = [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):  # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                             top_p=1.0, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        for i, row in enumerate(out[:, width:].tolist()):
            resp = []
            for t in row:
                resp.append(t)
                if t == tok.eos_token_id:
                    break
            ended = resp[-1] == tok.eos_token_id
            text = tok.decode(resp, skip_special_tokens=True)
            boxes = re.findall(r"\\boxed\{([^{}]*)\}", text)
            ok = bool(boxes) and boxes[-1].strip() == golds[start + i]
            correct += ok
            per_sample.append(ok)
            well_formed += ended and bool(BOXED_RE.search(text))
            lengths.append(len(resp))
            if len(examples) < 6 and (start + i) % samples == 0:
                examples.append((tok.decode(chunk[i][1:]).replace("\n", " | "), text, golds[start + i], ok))
    n = len(prompts)
    per_prompt = [sum(per_sample[i:i + samples]) for i in range(0, n, samples)]
    mixed = sum(0 < c < samples for c in per_prompt) / len(per_prompt)
    return {"mixed": mixed, "accuracy": correct / n, "well_formed": well_formed / n, "mean_len": sum(lengths) / n,
            "max_len": max(lengths), "examples": examples}


# =================================================================================================

def portable_tokenizer_config(model_dir: Path) -> None:
    """Let transformers 4.x (requirements: >=4.51) load the tokenizer too: 5.x writes the class name
    "TokenizersBackend", which 4.x does not know, and keeps the chat template only in a .jinja file."""
    path = model_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "tiny"))
    ap.add_argument("--steps", type=int, default=SFT_STEPS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: fastest for this tiny model, and the same result everywhere)")
    args = ap.parse_args()
    t_start = time.time()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    train_rows, test_rows = make_splits(args.seed)
    _, sample_sol, _ = make_problem(random.Random(12345))  # any solution string, for the round-trip check
    tok = build_tokenizer()
    check_tokenizer(tok, [r["prompt"] for r in test_rows[:50]] + [sample_sol, "Q: 1+2\nA: x \\boxed{-3}", " a\n\tb "])
    check_tokenizer(tok, [tok.apply_chat_template([{"role": "user", "content": "7+5*3-4"}],
                                                  add_generation_prompt=True, tokenize=False)[3:]])
    assert tok.decode(encode_prompt(tok, "7+5*3-4")) == "<s>Q: 7+5*3-4\nA: "

    torch.manual_seed(args.seed)  # the initial weights
    model = build_model(tok)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"task: {NUM_OPS[0]}-{NUM_OPS[1]} ops over '{OPS}', operands 1..{MAX_OPERAND} (factors <= "
          f"{MAX_MUL_OPERAND}); model: {n_params:,} params, vocab {len(tok)}; SFT {args.steps} steps x {BATCH}",
          flush=True)
    exclude = {r["prompt"] for r in test_rows}
    train(model, tok, args.steps, args.seed, exclude)
    t_train = time.time() - t_start

    model_dir = out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model.save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    portable_tokenizer_config(model_dir)
    write_jsonl(out / "train.jsonl", train_rows)
    write_jsonl(out / "test.jsonl", test_rows)

    # evaluate the saved artefact, reloaded the way the project loads it
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok2 = AutoTokenizer.from_pretrained(model_dir)
    model2 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert tok2.chat_template == CHAT_TEMPLATE and tok2.pad_token_id != tok2.eos_token_id
    check_tokenizer(tok2, [sample_sol])
    res = evaluate(model2, tok2, test_rows, EVAL_SAMPLES, seed=args.seed)
    for q, text, gold, ok in res["examples"]:
        print(f"  {q!r} -> {text!r}  gold {gold}  {'OK' if ok else 'wrong'}")
    size = (model_dir / "model.safetensors").stat().st_size
    sq, ssol, _ = make_problem(random.Random(12345))
    print(f"sample SFT problem: question {sq!r}  solution {ssol!r}")
    print(f"accuracy (T=1, {EVAL_SAMPLES} samples x {len(test_rows)} test prompts, mean over samples): "
          f"{res['accuracy']:.4f}")
    print(f"prompts with mixed outcomes (some but not all {EVAL_SAMPLES} samples correct): {res['mixed']:.3f}")
    print(f"well-formed (ends with \\boxed{{N}} + EOS): {res['well_formed']:.4f}")
    print(f"mean response length: {res['mean_len']:.1f} tokens (incl. EOS), max {res['max_len']}")
    print(f"model.safetensors: {size:,} bytes; tiny/model/: {dir_bytes(model_dir):,} bytes; "
          f"{n_params:,} params")
    print(f"runtime: {time.time() - t_start:.0f}s (SFT {t_train:.0f}s)")


if __name__ == "__main__":
    main()
