"""Make the embedded tiny default: a character-level Llama and a synthetic arithmetic task on which
RL's gains reach held-out problems.

Writes, reproducibly (fixed seeds), everything the pipeline needs to run offline on a CPU:

  tiny/train.jsonl   2000 rows {"prompt": "7+5*3-4", "answer": "8"}
  tiny/test.jsonl     400 rows, questions disjoint from train.jsonl and from every SFT problem
  tiny/model/        LlamaForCausalLM (safetensors, float32) + character-level tokenizer with a
                     chat template + generation_config

The task: expressions of 3 or 4 operations over +, -, * with one-digit operands, evaluated with the
usual precedence, every operation's result reduced modulo 10 (so every value is one digit and the
arithmetic itself is a lookup the tiny model masters). A solution is a chain of equalities that
reduces one operation per link; the last link's value is boxed:

  question  7+5*3-4
  careful   7+5-4=2-4=\boxed{8}          (5*3 = 15 -> 5, 7+5 = 12 -> 2, 2-4 = -2 -> 8)
  sloppy    2*3-4=6-4=\boxed{2}          (strictly left to right: 7+5 first)

Both procedures work from the left. A *decision point* is a link where the leftmost operation is a
+ or - whose right operand is also the left factor of a '*' (7+5*3): the careful procedure reduces
the '*' first, the sloppy one the + or -, which changes the answer. The choice is visible in the
link's first character (7 vs 2 above), one token. Questions have 0-3 decision points (DECISION_MIX:
mostly 2; with 0, the minority where the two procedures agree); with k > 0 the question is redrawn
until the strictly-left-to-right answer differs from the right one.

The base is trained by supervised fine-tuning on freshly generated problems (never a train.jsonl or
test.jsonl question) whose worked solutions mix the two procedures *step by step*: at every decision
point the solution takes the careful step with probability P_CAREFUL (0.6), else the sloppy one. The
base therefore computes reliably but picks the right procedure only about 60% of the time at each
decision, independently: a question with k decision points is solved with probability ~0.6^k, so
accuracy at temperature 1 is low while pass@k is high. This stands for the way RL with verifiable
rewards helps real LLMs: it mostly shifts probability toward behaviours the base already produces but
not reliably (pass@k of the base at large k matches the RL model's, pass@1 rises), rather than
teaching new capabilities. Several independent decisions per solution make the signal token-level:
stage 2's trust region bounds each token's ratio to pi_0 by 1 +- eps, and the gains of several
decisions compound.

Encoding is exactly the project's (common.encode_prompt: the chat template, add_special_tokens=False;
response = solution ids + EOS), loss on the response tokens only, AdamW, SFT_STEPS steps.

Measured with the defaults (torch 2.13 CPU, transformers 5.24, 1 thread), on test.jsonl at temperature
1 with 16 samples per question (eval_math.py): accuracy 0.351 [95% CI 0.326, 0.379], pass@16 0.945;
by decision points k = 0/1/2/3: 0.96 / 0.39 / 0.27 / 0.19. From this script's own check (4 samples):
the base takes the careful step at 56% of decision points; samples careful throughout are right 94% of
the time, samples with a sloppy step 4% (mod-10 coincidences); 99.6% well-formed; mean response 26.9
tokens (max 28 for a well-formed one); 866k parameters, tiny/ 3.57 MB; about 5 minutes on a shared
2-core machine. The result is bit-identical on rerun (same machine, same thread count).

Usage:  python tools/make_tiny.py [--out tiny] [--steps N] [--seed S] [--p-careful P]
"""
from __future__ import annotations

import argparse
import itertools
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

import sys  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import encode_prompt  # noqa: E402  (the project's own prompt encoding: the base learns exactly it)

ROOT = Path(__file__).resolve().parent.parent

# ---- task ------------------------------------------------------------------------------------------
OPS = "+-*"
MAX_OPERAND = 9           # operands drawn from [1, MAX_OPERAND]
MOD = 10                  # every operation's result is reduced modulo MOD: one-digit values throughout
DECISION_MIX = {0: 0.10, 1: 0.25, 2: 0.45, 3: 0.20}  # share of questions with k decision points
OP_PATTERNS_LEN = (3, 4)                             # operations per question
P_CAREFUL = 0.6           # SFT: probability of the careful step at each decision point
N_TRAIN, N_TEST = 2000, 400

# ---- model -----------------------------------------------------------------------------------------
HIDDEN, LAYERS, HEADS, INTERMEDIATE, MAX_POS = 128, 4, 4, 384, 256

# ---- SFT -------------------------------------------------------------------------------------------
SFT_STEPS = 1000        # enough for reliable one-digit arithmetic and copying (~95% of careful-only samples right)
BATCH = 64
LR = 2e-3
WARMUP = 50
WEIGHT_DECAY = 0.01

# ---- evaluation ------------------------------------------------------------------------------------
EVAL_SAMPLES = 4
MAX_NEW_TOKENS = 32       # the longest solution is 28 tokens with EOS

SPECIALS = ["<s>", "</s>", "<pad>", "<unk>"]
CHARS = ["\n", "\t"] + [chr(c) for c in range(32, 127)]  # printable ASCII: any task string is covered
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
                 "{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}")
BOXED_RE = re.compile(r"\\boxed\{(\d)\}$")


# =================================================================================================
# Task
# =================================================================================================

def _apply(a: int, op: str, b: int) -> int:
    return (a * b if op == "*" else a + b if op == "+" else a - b) % MOD


def careful_index(ops: list[str]) -> int:
    """The operation the careful procedure does next. Both procedures work from the left; where the
    leftmost operation is a + or - whose right operand is also the left factor of a '*' (7+5*3),
    the careful one does that '*' first. The sloppy one always does the leftmost operation."""
    return 1 if ops[0] in "+-" and len(ops) > 1 and ops[1] == "*" else 0


def decision_points(ops) -> int:
    """How many steps of the careful solution are decisions: steps where the sloppy procedure would do
    another operation (the + or - before the '*'), which changes the answer."""
    ops, k = list(ops), 0
    while ops:
        i = careful_index(ops)
        k += i != 0
        del ops[i]
    return k


OP_PATTERNS = {}  # decision points -> every operator pattern with that many (depends on the operators only)
for _n in OP_PATTERNS_LEN:
    for _p in itertools.product(OPS, repeat=_n):
        OP_PATTERNS.setdefault(decision_points(_p), []).append("".join(_p))


def expression(vals: list[int], ops: list[str]) -> str:
    return str(vals[0]) + "".join(o + str(v) for o, v in zip(ops, vals[1:]))


def solve(nums: list[int], ops: list[str], choose=None) -> tuple[int, list[str], list[str]]:
    """Step-by-step evaluation, one operation per step. At each decision point choose() -> True takes
    the careful step (the '*'), False the sloppy one (the leftmost + or -); choose=None: always careful.
    Returns (value, the expression after each step, decisions as "C"/"S")."""
    vals, ops, steps, decisions = list(nums), list(ops), [], []
    while ops:
        i = careful_index(ops)
        if i != 0:
            careful = True if choose is None else choose()
            decisions.append("C" if careful else "S")
            i = i if careful else 0
        vals[i:i + 2] = [_apply(vals[i], ops[i], vals[i + 1])]
        del ops[i]
        steps.append(expression(vals, ops))
    return vals[0], steps, decisions


def write_solution(steps: list[str], value: int) -> str:
    """A chain of equalities, one operation reduced per link, the last link's value boxed:
    7+5*3-4 -> "7+5-4=2-4=\\boxed{8}" (5*3 = 15 = 5 mod 10, 7+5 = 12 = 2, 2-4 = -2 = 8)."""
    return "=".join(steps[:-1] + [f"\\boxed{{{value}}}"])


def make_question(rng: random.Random) -> tuple[str, list[int], list[str], int]:
    """(question, operands, operators, decision points): the number of decision points is drawn from
    DECISION_MIX, then an operator pattern with that many, then operands (with decision points: until
    the strictly-left-to-right answer differs from the right one)."""
    k = rng.choices(list(DECISION_MIX), weights=list(DECISION_MIX.values()))[0]
    ops = list(rng.choice(OP_PATTERNS[k]))
    while True:
        nums = [rng.randint(1, MAX_OPERAND) for _ in range(len(ops) + 1)]
        value, steps, _ = solve(nums, ops)
        if k and solve(nums, ops, choose=lambda: False)[0] == value:
            continue  # careful and strictly-left-to-right agree by coincidence (a+b*1, mod-10 zeros)
        return str(nums[0]) + "".join(o + str(n) for o, n in zip(ops, nums[1:])), nums, ops, k


def make_problem(rng: random.Random, p_careful: float | None = None) -> tuple[str, str, int]:
    """(question, worked solution, answer). p_careful=None: the careful solution; else each decision
    point takes the careful step with probability p_careful (the SFT mixture)."""
    question, nums, ops, _ = make_question(rng)
    answer, _, _ = solve(nums, ops)
    assert answer == eval(question) % MOD, question  # noqa: S307 - our own digits and + - * only
    choose = None if p_careful is None else (lambda: rng.random() < p_careful)
    value, steps, _ = solve(nums, ops, choose)
    return question, write_solution(steps, value), answer


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


def train(model, tok, steps: int, seed: int, exclude: set[str], p_careful: float, log_every: int = 100) -> None:
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
            q, sol, _ = make_problem(rng, p_careful)
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

def read_procedure(question: str, text: str) -> dict:
    """Replay a response's chain on the question: which operation each link reduced, hence the step
    taken at each decision point ("C" careful, "S" sloppy, "?" another operation), and how many
    reductions had an arithmetic slip (right operation, wrong digit); the boxed value reduces the last
    operation. A link that no single reduction of the previous expression explains ends the replay
    (ok=False)."""
    def parse(s):
        if not re.fullmatch(r"\d([+*-]\d)*", s):
            return None
        return [int(c) for c in s[0::2]], list(s[1::2])
    vals, ops = parse(question)
    m = re.fullmatch(r"(?:(.*)=)?\\boxed\{(\d+)\}", text)
    if not m:
        return {"decisions": [], "slips": 0, "ok": False}
    decisions, slips = [], 0
    for link in m.group(1).split("=") if m.group(1) else []:
        new = parse(link)
        if new is None:
            return {"decisions": decisions, "slips": slips, "ok": False}
        # every i whose reduction leaves this link's shape (any digit in the reduced place)
        fits = [i for i in range(len(ops)) if new[1] == ops[:i] + ops[i + 1:]
                and new[0][:i] == vals[:i] and new[0][i + 1:] == vals[i + 2:]]
        if not fits:
            return {"decisions": decisions, "slips": slips, "ok": False}
        ci = careful_index(ops)
        exact = [i for i in fits if new[0][i] == _apply(vals[i], ops[i], vals[i + 1])]
        pool = exact or fits
        i = ci if ci in pool else 0 if 0 in pool else pool[0]
        if ci != 0:
            decisions.append("C" if i == ci else "S" if i == 0 else "?")
        slips += not exact
        vals, ops = new
    if len(ops) != 1:
        return {"decisions": decisions, "slips": slips, "ok": False}
    slips += int(m.group(2)) != _apply(vals[0], ops[0], vals[1])
    return {"decisions": decisions, "slips": slips, "ok": True}


@torch.no_grad()
def evaluate(model, tok, rows: list[dict], samples: int, seed: int, batch_size: int = 200) -> dict:
    torch.manual_seed(seed)
    prompts = [encode_prompt(tok, r["prompt"]) for r in rows for _ in range(samples)]
    golds = [r["answer"] for r in rows for _ in range(samples)]
    questions = [r["prompt"] for r in rows for _ in range(samples)]
    correct = well_formed = 0
    lengths, examples, per_sample, procs = [], [], [], []
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
            procs.append(read_procedure(questions[start + i], text))
            well_formed += ended and bool(BOXED_RE.search(text))
            lengths.append(len(resp))
            if len(examples) < 6 and (start + i) % samples == 0:
                examples.append((tok.decode(chunk[i][1:]).replace("\n", " | "), text, golds[start + i], ok))
    n = len(prompts)
    per_prompt = [sum(per_sample[i:i + samples]) for i in range(0, n, samples)]
    mixed = sum(0 < c < samples for c in per_prompt) / len(per_prompt)
    decisions = [d for p in procs for d in p["decisions"]]
    first = [(p["decisions"][0], ok) for p, ok in zip(procs, per_sample) if p["decisions"]]

    def acc(pairs):
        return (sum(ok for _, ok in pairs) / len(pairs), len(pairs)) if pairs else (float("nan"), 0)
    by_k = {}
    for p, ok in zip(procs, per_sample):
        by_k.setdefault(len(p["decisions"]) if p["ok"] else -1, []).append(ok)
    procedure = {
        "careful_share_of_decisions": decisions.count("C") / max(1, len(decisions)),
        "first_decision_careful": sum(d == "C" for d, _ in first) / max(1, len(first)),
        "acc_first_careful": acc([f for f in first if f[0] == "C"]),
        "acc_first_sloppy": acc([f for f in first if f[0] == "S"]),
        "acc_all_careful": acc([(None, ok) for p, ok in zip(procs, per_sample)
                                if p["ok"] and all(d == "C" for d in p["decisions"])]),
        "acc_some_sloppy": acc([(None, ok) for p, ok in zip(procs, per_sample) if "S" in p["decisions"]]),
        "steps_with_slip": sum(p["slips"] > 0 for p in procs) / n,
        "unreadable": sum(not p["ok"] for p in procs) / n,
    }
    return {"mixed": mixed, "accuracy": correct / n, "well_formed": well_formed / n, "mean_len": sum(lengths) / n,
            "max_len": max(lengths), "examples": examples, "procedure": procedure,
            "pass_at_k": sum(c > 0 for c in per_prompt) / len(per_prompt)}


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
    ap.add_argument("--p-careful", type=float, default=P_CAREFUL,
                    help="SFT: probability of the careful step at each decision point")
    ap.add_argument("--eval-samples", type=int, default=EVAL_SAMPLES, help="samples per test problem")
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
    print(f"task: {'/'.join(map(str, OP_PATTERNS_LEN))} ops over '{OPS}', operands 1..{MAX_OPERAND}, "
          f"decision points {DECISION_MIX}; model: {n_params:,} params, vocab {len(tok)}; "
          f"SFT {args.steps} steps x {BATCH}, careful step at a decision with p = {args.p_careful}", flush=True)
    exclude = {r["prompt"] for r in train_rows + test_rows}  # SFT never sees a train.jsonl or test.jsonl question
    train(model, tok, args.steps, args.seed, exclude, args.p_careful)
    t_train = time.time() - t_start

    model_dir = out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model.save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    portable_tokenizer_config(model_dir)
    # the prompt format the base was fine-tuned on (bare questions): the stages' default for this model
    (model_dir / "erpd.json").write_text(json.dumps({"prompt_format": {"system_prompt": None, "instruction": None},
                                                     "made_by": "tools/make_tiny.py"}, indent=1) + "\n")
    write_jsonl(out / "train.jsonl", train_rows)
    write_jsonl(out / "test.jsonl", test_rows)

    # evaluate the saved artefact, reloaded the way the project loads it
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok2 = AutoTokenizer.from_pretrained(model_dir)
    model2 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert tok2.chat_template == CHAT_TEMPLATE and tok2.pad_token_id != tok2.eos_token_id
    check_tokenizer(tok2, [sample_sol])
    res = evaluate(model2, tok2, test_rows, args.eval_samples, seed=args.seed)
    for q, text, gold, ok in res["examples"]:
        print(f"  {q!r} -> {text!r}  gold {gold}  {'OK' if ok else 'wrong'}")
    size = (model_dir / "model.safetensors").stat().st_size
    sq, ssol, _ = make_problem(random.Random(12345))
    _, mixed_sol, _ = make_problem(random.Random(12345), args.p_careful)
    print(f"sample problem: question {sq!r}  careful solution {ssol!r}  an SFT solution {mixed_sol!r}")
    ks = [decision_points(re.findall(r"[+*-]", r["prompt"])) for r in test_rows]
    print("test.jsonl questions by decision points: "
          + ", ".join(f"{k}: {ks.count(k)}" for k in sorted(set(ks))))
    k = args.eval_samples
    print(f"accuracy (T=1, {k} samples x {len(test_rows)} test prompts, mean over samples): "
          f"{res['accuracy']:.4f}; pass@{k} {res['pass_at_k']:.3f}")
    print(f"prompts with mixed outcomes (some but not all {k} samples correct): {res['mixed']:.3f}")
    for key, v in res["procedure"].items():
        print(f"  {key}: " + (f"{v[0]:.3f} (n={v[1]})" if isinstance(v, tuple) else f"{v:.3f}"))
    print(f"well-formed (ends with \\boxed{{N}} + EOS): {res['well_formed']:.4f}")
    print(f"mean response length: {res['mean_len']:.1f} tokens (incl. EOS), max {res['max_len']}")
    print(f"model.safetensors: {size:,} bytes; tiny/model/: {dir_bytes(model_dir):,} bytes; "
          f"{n_params:,} params")
    print(f"runtime: {time.time() - t_start:.0f}s (SFT {t_train:.0f}s)")


if __name__ == "__main__":
    main()
