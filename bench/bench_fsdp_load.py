"""Host memory of loading a model under --fsdp: rank 0 alone reads the weights (common.load_policy)
against every rank reading them and then sharding (what stage 1 / 2 did before).

    python bench/bench_fsdp_load.py              # random Qwen2, hidden 1024, 8 layers, vocab 32768: 163.6 M params
    python bench/bench_fsdp_load.py --nproc 4

Each case is one `torchrun --nproc_per_node N` job on gloo; every rank reports the peak RSS its
load added on top of its RSS after the imports (bench/measure.py: VmHWM, mmap threshold 1 MiB).
The checkpoint is saved in bf16 (as released models are) and loaded as fp32 for training, so every
full load converts it into new host memory. The target is one full host copy in the whole job (rank 0)
instead of one per rank. On CPU the other ranks still hold their shard (and one tensor in flight) in
host memory; on GPUs their shard lands in GPU memory, so their host cost is only the Python process.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def worker(model_dir: str, case: str) -> None:
    import common
    import erpd_stage1
    from measure import peak_mb, reset_peak, rss_mb

    ctx = common.init_distributed()
    base = rss_mb()
    reset_peak()
    args = erpd_stage1.parse_args(["--model", model_dir, "--fsdp"])
    if case == "rank0-reads":
        model, _ = common.load_policy(args, ctx)
    else:  # every rank reads the whole model on CPU, then shards it
        model, _ = common.load_model(model_dir)
        common.shard_model(model, ctx)
    report = {"case": case, "rank": ctx.rank, "extra_mb": round(peak_mb() - base, 1),
              "kept_mb": round(rss_mb() - base, 1)}
    for line in common.all_gather_objects(report, ctx):
        if ctx.is_main:
            print(json.dumps(line), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--worker", nargs=2, metavar=("MODEL_DIR", "CASE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        import common

        return common.run_main(lambda: worker(*args.worker))


    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    import common
    from measure import MMAP_THRESHOLD

    with tempfile.TemporaryDirectory() as folder:
        config = Qwen2Config(vocab_size=32768, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                             num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4,
                             tie_word_embeddings=False)
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)  # released checkpoints are bf16; training loads fp32
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(common.DEFAULT_MODEL).save_pretrained(folder)
        del model
        print(json.dumps({"params_M": round(params / 1e6, 1), "fp32_weights_mb": round(params * 4 / 2**20, 1),
                          "nproc": args.nproc}), flush=True)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "OMP_NUM_THREADS": "1"}
        totals = {}
        for case in ("every-rank-reads", "rank0-reads"):
            out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc_per_node={args.nproc}", __file__, "--worker", folder, case],
                                 capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise RuntimeError(out.stderr[-4000:])
            print(out.stdout.strip(), flush=True)
            reports = [json.loads(line) for line in out.stdout.strip().splitlines()]
            totals[case] = round(sum(r["extra_mb"] for r in reports), 1)
            totals[case + " (ranks > 0)"] = max(r["extra_mb"] for r in reports if r["rank"] > 0)
        print(json.dumps({"job_peak_mb": totals, "job_ratio": round(totals["rank0-reads"] / totals["every-rank-reads"], 2)}))



if __name__ == "__main__":
    main()
