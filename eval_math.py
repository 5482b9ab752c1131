"""Evaluate models side by side: accuracy next to KL to the base (the paper's headline table).

For each --model NAME=PATH, k samples per held-out problem at --temperature, then
    accuracy        mean@k: mean reward over all samples
    accuracy_ci     95% bootstrap interval of accuracy, resampling problems (fixed seed)
    accuracy_diff_vs_ref, accuracy_diff_ci
                    accuracy minus the --ref model's on the same problems and seed, and its paired
                    95% bootstrap interval (the ref is evaluated too unless it is one of the --model)
    pass_at_k       fraction of problems with at least one correct sample among the k drawn (n = k)
    kl_to_ref       mean over the model's own samples of sum_t log pi(y_t|s_t) - log pi_ref(y_t|s_t)
                    (a sequence-level estimate of KL(pi || pi_ref))
    token_kl_to_ref exact KL(pi || pi_ref) over the full vocabulary, mean over response tokens
    entropy         token entropy, mean over response tokens
    mean_length     response tokens per sample;  truncated: fraction that hit --max-new-tokens
All log-probs use softmax(logits / temperature), the distribution the samples came from. With
--temperature 0 (greedy: one sample per problem) there is no sampled distribution, so the KL and
entropy columns are null; with --top-p < 1 they describe softmax(logits / T) before the nucleus cut.
The JSON keeps every problem's outcome per model ("outcomes": [[row index, correct of k], ...]), so runs
evaluated on the same problems with the same seed can be compared after the fact, paired (paired_diff).
The prompt format is the one the models' folders record (erpd.json), the same for every model.

    python eval_math.py --model base=tiny/model --model teacher=runs/stage1/teacher \\
        --model student=runs/stage2/student --ref tiny/model --json runs/eval.json
    torchrun --nproc_per_node 8 eval_math.py --model student=runs/r1/stage2/student \\
        --ref Qwen/Qwen2.5-Math-1.5B-Instruct --data HuggingFaceH4/MATH-500 --split test \\
        --samples 16 --max-new-tokens 2048 --dtype bfloat16
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from common import (
    DEFAULT_MODEL, DEFAULT_TEST_DATA, InputError, add_prompt_args, add_system_args, atomic_write_text, check_lineage,
    encode_problems, init_distributed, load_model, load_problems, model_kwargs, my_micro_batches, progress,
    prompt_format, recorded_prompt_format, run_main, sample_and_score, score_rollouts, set_seed)

METRICS = ("accuracy", "pass_at_k", "kl_to_ref", "token_kl_to_ref", "entropy", "mean_length", "truncated")
BOOTSTRAP_RESAMPLES = 2000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=None, metavar="NAME=PATH",
                   help="repeatable; default: base=<embedded tiny model>")
    p.add_argument("--ref", default=DEFAULT_MODEL, help="the base the KL columns are measured against")
    p.add_argument("--json", default=None, help="write {'models': {NAME: {metric: value}}, 'config': ...} here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    data = p.add_argument_group("problems and sampling")
    data.add_argument("--data", default=DEFAULT_TEST_DATA)
    data.add_argument("--split", default="test", help="dataset split")
    data.add_argument("--num-prompts", type=int, default=None, help="seeded subset (default: all)")
    data.add_argument("--samples", type=int, default=8, help="k: samples per problem")
    data.add_argument("--max-new-tokens", type=int, default=32, help="response length limit (real models: ~2048)")
    data.add_argument("--max-prompt-len", type=int, default=1024, help="longer prompts are skipped")
    data.add_argument("--temperature", type=float, default=1.0,
                      help="sampling and scoring temperature (0: greedy, with --samples 1)")
    data.add_argument("--top-p", type=float, default=1.0,
                      help="nucleus sampling (1: off); below 1 the samples come from the truncated distribution, "
                           "while the KL and entropy columns score the untruncated one")
    add_prompt_args(data)
    data.add_argument("--seed", type=int, default=1234, help="problem subset and sampling")
    system = p.add_argument_group("system")
    system.add_argument("--sample-batch-size", type=int, default=128, help="sequences per sampling batch")
    system.add_argument("--micro-batch", type=int, default=32, help="sequences per scoring forward")
    add_system_args(system, training=False)
    return p.parse_args(argv)


def bootstrap_ci(values: list[float], seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES,
                 level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the mean of per-problem values, resampling problems.

    Problems, not samples, are the unit: the k samples of one problem are correlated, so treating
    them as independent would make the interval too narrow.
    """
    x = torch.tensor(values, dtype=torch.float64)
    idx = torch.randint(len(x), (resamples, len(x)), generator=torch.Generator().manual_seed(seed))
    means = x[idx].mean(1)
    tail = (1 - level) / 2
    return [means.quantile(tail).item(), means.quantile(1 - tail).item()]


def paired_diff(outcomes_a: dict, outcomes_b: dict, seed: int = 0) -> tuple[float, list[float]]:
    """Accuracy of a minus b on the problems both were evaluated on, and its paired 95% interval.

    outcomes: {"samples": k, "outcomes": [[problem id, correct of k], ...]} as eval_math writes them.
    """
    a = {i: c / outcomes_a["samples"] for i, c in outcomes_a["outcomes"]}
    b = {i: c / outcomes_b["samples"] for i, c in outcomes_b["outcomes"]}
    shared = sorted(a.keys() & b.keys())
    if not shared:
        raise InputError("paired comparison: the two evaluations share no problem")
    diffs = [a[i] - b[i] for i in shared]
    return sum(diffs) / len(diffs), bootstrap_ci(diffs, seed)


def summarize(rollouts: list[dict], scores: list[dict] | None, samples: int, seed: int) -> dict:
    """The table's columns from the samples (with "prompt_index", "reward", "response_ids", "truncated")
    and their scores against the ref ({"logp", "ref_logp", "kl", "entropy"} per sample; None: greedy)."""
    by_prompt: dict[int, list[float]] = {}
    for r in rollouts:
        by_prompt.setdefault(r["prompt_index"], []).append(r["reward"])
    result = {
        "accuracy": sum(r["reward"] for r in rollouts) / len(rollouts),
        "accuracy_ci": bootstrap_ci([sum(v) / len(v) for v in by_prompt.values()], seed),
        "pass_at_k": sum(max(v) for v in by_prompt.values()) / len(by_prompt),
        "kl_to_ref": None, "token_kl_to_ref": None, "entropy": None,
        "mean_length": sum(len(r["response_ids"]) for r in rollouts) / len(rollouts),
        "truncated": sum(r["truncated"] for r in rollouts) / len(rollouts),
        "samples": samples,
        "outcomes": [[i, int(sum(v))] for i, v in sorted(by_prompt.items())],
    }
    if scores is not None:
        n_tokens = max(1, sum(len(s["logp"]) for s in scores))
        result["kl_to_ref"] = sum((s["logp"] - s["ref_logp"]).sum().item() for s in scores) / len(scores)
        result["token_kl_to_ref"] = sum(s["kl"].sum().item() for s in scores) / n_tokens
        result["entropy"] = sum(s["entropy"].sum().item() for s in scores) / n_tokens
    return result


def evaluate(model, ref, tokenizer, problems, args, ctx) -> dict:
    rollouts = sample_and_score(model, tokenizer, problems, args.samples, ctx=ctx, seed=args.seed,
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, batch_size=args.sample_batch_size)
    scores = None
    if args.temperature > 0:  # greedy samples come from no distribution: nothing to score them under
        micro_batches = my_micro_batches(list(range(len(rollouts))), ctx, args.micro_batch)
        scores = score_rollouts(model, rollouts, micro_batches, pad_id=tokenizer.pad_token_id,
                                temperature=args.temperature, ctx=ctx, ref_model=ref, desc="scoring vs ref")
    return summarize(rollouts, scores, args.samples, args.seed)


def main(argv=None):
    args = parse_args(argv)
    if args.temperature == 0 and args.samples > 1:
        raise InputError(f"--temperature 0 --samples {args.samples}: greedy samples of one problem are all the "
                         "same; use --samples 1 (or a temperature > 0)")
    if args.json and Path(args.json).exists() and not args.overwrite:
        raise InputError(f"{args.json} already holds an evaluation: --overwrite replaces it (once this one is done)")
    ctx = init_distributed()
    set_seed(args.seed)
    specs = args.model or [f"base={DEFAULT_MODEL}"]
    if any("=" not in s for s in specs):
        raise InputError(f"--model expects NAME=PATH, got {[s for s in specs if '=' not in s]}")
    names = [s.split("=", 1) for s in specs]
    given = [n for n, _ in names]
    repeated = sorted({n for n in given if given.count(n) > 1})
    if repeated:
        raise InputError(f"--model: the name {repeated[0]} is given twice; every model needs its own NAME")
    ref_name = next((n for n, path in names if same_model(path, args.ref)), None)
    if ref_name is None:  # the paired differences need the ref's outcomes on the same problems
        ref_name = next(n for n in ("ref", "ref_model", "reference") if n not in given)
        names.append([ref_name, args.ref])
    if args.top_p < 1 and ctx.is_main:
        print(f"warning: --top-p {args.top_p}: samples come from the nucleus-truncated distribution; the KL and "
              "entropy columns score the untruncated softmax(logits / T)", file=sys.stderr)
    load = model_kwargs(args, ctx.device)
    ref, ref_tokenizer = load_model(args.ref, **load)
    ref.requires_grad_(False).eval()
    prompt = prompt_format(ref_tokenizer, args.system_prompt, args.instruction,
                           **shared_prompt_record([args.ref] + [p for _, p in names]))
    problems = load_problems(args.data, args.split, num=args.num_prompts, seed=args.seed)
    problems = encode_problems(ref_tokenizer, problems, args.max_prompt_len, args.data, prompt)
    results = {}
    for name, path in progress(names, enabled=ctx.is_main, desc="models"):
        check_lineage(path)
        model, tokenizer = load_model(path, **load)
        if tokenizer.get_vocab() != ref_tokenizer.get_vocab():
            raise InputError(f"--model {name}={path}: its tokenizer differs from --ref's; KL needs the same vocabulary")
        results[name] = evaluate(model, ref, tokenizer, problems, args, ctx)
        del model
    for r in results.values():
        r["accuracy_diff_vs_ref"], r["accuracy_diff_ci"] = paired_diff(r, results[ref_name], args.seed)
    if ctx.is_main:
        print_table(results, ref_name, args, len(problems))
        if args.json:
            atomic_write_text(Path(args.json), json.dumps(
                {"models": results, "config": {**vars(args), "num_problems": len(problems), "prompt_format": prompt}},
                indent=1))


def shared_prompt_record(paths: list[str]) -> dict:
    """prompt_format's keywords: the prompt format the model folders record (they must agree: paired
    comparisons need the same prompts), else nothing recorded and the defaults apply."""
    records = {p: r for p in paths if (r := recorded_prompt_format(p)) is not None}
    formats = {json.dumps({k: r[k] for k in ("system_prompt", "instruction")}, sort_keys=True) for r in records.values()}
    if len(formats) > 1:
        raise InputError("the models record different prompt formats (erpd.json: "
                         + "; ".join(f"{p}: {r['system_prompt']!r} / {r['instruction']!r}" for p, r in records.items())
                         + "); evaluate them separately")
    if not records:
        return {}
    path, record = next(iter(records.items()))
    return {"bound": (record, f"{path}/erpd.json")}


def same_model(a: str, b: str) -> bool:
    """The same local folder (however written) or the same hub id."""
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def print_table(results: dict, ref_name: str, args, num_problems: int) -> None:
    def number(value, digits=4):
        return "n/a" if value is None else f"{value:.{digits}f}"
    k = args.samples
    columns = [("accuracy [95% CI]", lambda r: f"{r['accuracy']:.3f} [{r['accuracy_ci'][0]:.3f}, {r['accuracy_ci'][1]:.3f}]"),
               (f"vs {ref_name} [95% CI]", lambda r: f"{r['accuracy_diff_vs_ref']:+.3f} "
                                                     f"[{r['accuracy_diff_ci'][0]:+.3f}, {r['accuracy_diff_ci'][1]:+.3f}]"),
               (f"pass@{k}", lambda r: number(r["pass_at_k"], 3))]
    columns += [(m, (lambda m: lambda r: number(r[m]))(m)) for m in METRICS[2:]]
    cells = [[fmt(r) for _, fmt in columns] for r in results.values()]
    widths = [max(len(h), *(len(row[j]) for row in cells)) + 2 for j, (h, _) in enumerate(columns)]
    name_width = max(len(n) for n in results) + 2
    print(f"\n{num_problems} problems x {k} samples, temperature {args.temperature}, KL against {args.ref}")
    print("model".ljust(name_width) + "".join(h.rjust(w) for (h, _), w in zip(columns, widths)))
    for name, row in zip(results, cells):
        print(name.ljust(name_width) + "".join(c.rjust(w) for c, w in zip(row, widths)))


if __name__ == "__main__":
    run_main(main)
