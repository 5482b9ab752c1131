"""token_logprobs / token_entropy / token_kl against naive float32 log_softmax: time and extra peak memory.

    python bench/bench_logprobs.py            # B x T x V = 4 x 1024 x 32768, fp32 and bf16 logits
    python bench/bench_logprobs.py --quick    # 2 x 512 x 32768

Target (issue 4): extra peak memory <= 1/8 of a naive float32 log_softmax of the same logits, time no
worse than naive. Each case runs in its own process (see measure.py).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from measure import measure, run_case  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def logits(shape, dtype, seed):
    x = torch.empty(shape, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    for i in range(shape[0]):  # row by row: no transient float32 copy inflates the baseline
        x[i].normal_(generator=g).mul_(3)
    return x


def case(fn_name: str, impl: str, dtype: str, shape):
    import common

    torch.set_num_threads(2)
    x = logits(shape, DTYPES[dtype], 0)
    labels = torch.randint(0, shape[-1], shape[:-1])
    if fn_name == "logprobs_fwd":
        f = {"ours": lambda: common.token_logprobs(x, labels),
             "naive": lambda: torch.log_softmax(x.float(), -1).gather(-1, labels[..., None]).squeeze(-1)}[impl]
        run = lambda: f()  # noqa: E731
    elif fn_name == "logprobs_fwd_bwd":
        x.requires_grad_(True)

        def run():
            x.grad = None
            lp = common.token_logprobs(x, labels) if impl == "ours" else \
                torch.log_softmax(x.float(), -1).gather(-1, labels[..., None]).squeeze(-1)
            lp.sum().backward()
    elif fn_name == "entropy":
        def naive():
            lp = torch.log_softmax(x.float(), -1)
            return -(lp.exp() * lp).sum(-1)
        run = (lambda: common.token_entropy(x)) if impl == "ours" else naive
    else:  # kl
        y = logits(shape, DTYPES[dtype], 1)

        def naive():
            lp, lq = torch.log_softmax(x.float(), -1), torch.log_softmax(y.float(), -1)
            return (lp.exp() * (lp - lq)).sum(-1)
        run = (lambda: common.token_kl(x, y)) if impl == "ours" else naive
    with torch.no_grad() if fn_name != "logprobs_fwd_bwd" else torch.enable_grad():
        print(json.dumps(measure(run)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--case", nargs=3, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--shape", type=int, nargs=3, default=None)
    args = p.parse_args()
    shape = args.shape or ([2, 512, 32768] if args.quick else [4, 1024, 32768])
    if args.case:
        return case(*args.case, shape)
    naive_fp32_mb = shape[0] * shape[1] * shape[2] * 4 / 2**20
    print(f"B x T x V = {' x '.join(map(str, shape))}; a float32 copy of the logits is {naive_fp32_mb:.0f} MB")
    print(f"{'function':18} {'dtype':5} {'ours ms':>9} {'naive ms':>9} {'time ratio':>10} "
          f"{'ours MB':>8} {'naive MB':>9} {'ours / fp32 copy':>17}")
    for fn_name in ("logprobs_fwd", "logprobs_fwd_bwd", "entropy", "kl"):
        for dtype in ("fp32", "bf16"):
            shape_args = ["--shape", *map(str, shape)]
            ours = run_case(__file__, fn_name, "ours", dtype, *shape_args)
            naive = run_case(__file__, fn_name, "naive", dtype, *shape_args)
            print(f"{fn_name:18} {dtype:5} {ours['time_s'] * 1e3:9.0f} {naive['time_s'] * 1e3:9.0f} "
                  f"{ours['time_s'] / naive['time_s']:10.2f} {ours['extra_mb']:8.0f} {naive['extra_mb']:9.0f} "
                  f"{ours['extra_mb'] / naive_fp32_mb:17.3f}", flush=True)
    print("fwd_bwd includes the gradient of the logits (same size as the logits) in both columns.")


if __name__ == "__main__":
    main()
