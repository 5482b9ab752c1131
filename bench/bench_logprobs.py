"""common.token_logprobs / token_entropy / token_kl against naive float32 implementations.

    python bench/bench_logprobs.py            # B x T x V = 4 x 1024 x 32768, fp32 and bf16 logits (~2.7 min)
    python bench/bench_logprobs.py --quick    # 2 x 512 x 32768 (~1.2 min)

Naive = what a user writes: torch.log_softmax(logits.float() / T, -1).gather(...), entropy and KL
from full float32 log_softmax tensors. Rows:
  logprobs_fwd       token_logprobs forward (no grad)
  logprobs_fwd_bwd   token_logprobs forward + backward (the gradient of the logits is an output of
                     the size of the logits: it is in "extra" for both; "-grad" subtracts it)
  logprobs_view      the same on logits[:, :-1] of a [B, T + 1, V] tensor, which is what
                     common.response_logits hands to token_logprobs in training (a strided view)
  entropy            token_entropy (no grad)
  kl                 token_kl(p, q) (no grad, as the drift diagnostics call it)
Memory: extra peak beyond the input logits, each case in a fresh process, VmHWM reset just before
the call (method in bench/measure.py). Time: median of 3 interleaved rounds after a warm-up, one
process, default allocator. Targets: extra <= 1/8 of the naive float32 path's, time no worse than
naive. Also shown: ours against ONE float32 copy of the logits (stricter: naive log_softmax(x / T)
makes two).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from measure import extra_peak, interleaved_median, run_memory_case  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FUNCTIONS = ("logprobs_fwd", "logprobs_fwd_bwd", "logprobs_view", "entropy", "kl")
TEMPERATURE = 0.9  # not 1, so the division by the temperature is part of the work


def make_logits(shape, dtype, seed):
    """Random logits, filled row by row (no transient float32 copy of the whole tensor)."""
    x = torch.empty(shape, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    for i in range(shape[0]):
        x[i].normal_(generator=g).mul_(3)
    return x


def naive_logprobs(x, labels):
    return torch.log_softmax(x.float() / TEMPERATURE, -1).gather(-1, labels[..., None]).squeeze(-1)


def naive_entropy(x):
    lp = torch.log_softmax(x.float() / TEMPERATURE, -1)
    return -(lp.exp() * lp).sum(-1)


def naive_kl(x, y):
    lp, lq = torch.log_softmax(x.float() / TEMPERATURE, -1), torch.log_softmax(y.float() / TEMPERATURE, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def build(fn_name: str, impl: str, dtype: str, shape, cache: dict):
    """(run, before): run() does the work once; before() clears what a previous run left (the
    logits' .grad). Input tensors are shared through `cache` (one set per dtype)."""
    import common

    b, t, v = shape

    def tensor(key, make):
        if (key, dtype) not in cache:
            cache[key, dtype] = make()
        return cache[key, dtype]

    if fn_name == "logprobs_view":
        leaf = tensor("full", lambda: make_logits((b, t + 1, v), DTYPES[dtype], 0).requires_grad_(True))
        x = leaf[:, :-1]
    else:
        leaf = x = tensor("x", lambda: make_logits(shape, DTYPES[dtype], 0).requires_grad_(True))
    labels = tensor("labels", lambda: torch.randint(0, v, (b, t), generator=torch.Generator().manual_seed(1)))
    ours = impl == "ours"
    if fn_name in ("logprobs_fwd_bwd", "logprobs_view"):
        def run():
            lp = common.token_logprobs(x, labels, TEMPERATURE) if ours else naive_logprobs(x, labels)
            lp.sum().backward()
    elif fn_name == "logprobs_fwd":
        def run():
            with torch.no_grad():
                common.token_logprobs(x, labels, TEMPERATURE) if ours else naive_logprobs(x, labels)
    elif fn_name == "entropy":
        def run():
            with torch.no_grad():
                common.token_entropy(x, TEMPERATURE) if ours else naive_entropy(x)
    else:
        y = tensor("y", lambda: make_logits(shape, DTYPES[dtype], 2))

        def run():
            with torch.no_grad():
                common.token_kl(x, y, TEMPERATURE) if ours else naive_kl(x, y)

    def before():
        leaf.grad = None
    return run, before


def memory_case(fn_name, impl, dtype, shape):
    torch.set_num_threads(2)
    run, before = build(fn_name, impl, dtype, shape, {})
    warm_run, warm_before = build(fn_name, impl, dtype, [1, 16, shape[2]], {})  # same ops, tiny inputs

    def warmup():
        warm_run()
        warm_before()
    print(json.dumps(extra_peak(run, warmup=warmup, before=before)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 x 512 x 32768")
    p.add_argument("--shape", type=int, nargs=3, default=None, metavar=("B", "T", "V"))
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (median)")
    p.add_argument("--case", nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    shape = args.shape or ([2, 512, 32768] if args.quick else [4, 1024, 32768])
    if args.case:
        return memory_case(*args.case, shape)
    torch.set_num_threads(2)
    b, t, v = shape
    fp32_copy_mb = b * t * v * 4 / 2**20
    print(f"B x T x V = {b} x {t} x {v}, temperature {TEMPERATURE}, {torch.get_num_threads()} threads; "
          f"one float32 copy of the logits = {fp32_copy_mb:.0f} MiB", flush=True)

    # memory: one fresh process per case
    memory = {}
    for fn_name in FUNCTIONS:
        for dtype in DTYPES:
            for impl in ("ours", "naive"):
                memory[fn_name, dtype, impl] = run_memory_case(__file__, fn_name, impl, dtype,
                                                               "--shape", *map(str, shape))["extra_mb"]
    # time: one process, interleaved rounds
    cases, befores, cache = {}, {}, {}
    for fn_name in FUNCTIONS:
        for dtype in DTYPES:
            for impl in ("ours", "naive"):
                cases[fn_name, dtype, impl], befores[fn_name, dtype, impl] = build(fn_name, impl, dtype, shape, cache)
    times = interleaved_median(cases, rounds=args.rounds, before=lambda k: befores[k]())

    print(f"{'function':17} {'dtype':5} {'ours ms':>8} {'naive ms':>9} {'t ours/naive':>12} {'ours MiB':>9} "
          f"{'naive MiB':>10} {'m ours/naive':>12} {'ours/fp32 copy':>15} {'ours-grad /fp32':>16}")
    for fn_name in FUNCTIONS:
        for dtype in DTYPES:
            o, n = memory[fn_name, dtype, "ours"], memory[fn_name, dtype, "naive"]
            to, tn = times[fn_name, dtype, "ours"], times[fn_name, dtype, "naive"]
            grad_mb = b * t * v * DTYPES[dtype].itemsize / 2**20 if fn_name in ("logprobs_fwd_bwd", "logprobs_view") else 0
            if fn_name == "logprobs_view":
                grad_mb = b * (t + 1) * v * DTYPES[dtype].itemsize / 2**20  # the leaf is [B, T + 1, V]
            print(f"{fn_name:17} {dtype:5} {to * 1e3:8.0f} {tn * 1e3:9.0f} {to / tn:12.2f} {o:9.0f} {n:10.0f} "
                  f"{o / n:12.3f} {o / fp32_copy_mb:15.3f} {(o - grad_mb) / fp32_copy_mb:16.3f}")
    print("MiB = extra peak beyond the input logits (fresh process per case, VmHWM reset before the call).\n"
          "Target: m ours/naive <= 0.125 and t ours/naive <= 1. ours/fp32 copy is stricter: ours against ONE\n"
          "float32 copy of the logits (naive log_softmax(x / T) makes two).\n"
          "ours-grad: the same without the logits' gradient, which backward must return in either case.")


if __name__ == "__main__":
    main()
