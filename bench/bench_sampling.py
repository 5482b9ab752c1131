"""common.sample_responses against a bare model.generate on the same prompts and settings.

    python bench/bench_sampling.py [--quick]

Both sample at temperature 1 with no top-k / top-p, left-padded prompts, and exactly N new tokens
(stop ids that never occur), so the work is identical. Target (issue 4): ours >= 0.9x generate.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import common  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    config = LlamaConfig(vocab_size=32768, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    batch, new_tokens = (16, 32) if args.quick else (32, 128)
    prompts = [torch.randint(3, 32768, (16 + 4 * (i % 8),)).tolist() for i in range(batch)]
    never = [32767 + 1]  # an id outside the vocabulary: no row stops early
    ids, mask, _ = common.left_pad(prompts, 0, "cpu")

    def ours():
        common.sample_responses(model, prompts, max_new_tokens=new_tokens, temperature=1.0, top_p=1.0,
                                stop_ids=never, pad_id=0, generator=torch.Generator().manual_seed(0),
                                batch_size=batch)

    def bare():
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)

    timings = {"ours": [], "generate": []}
    for _ in range(3):  # interleaved, so drift on a shared machine hits both alike
        for name, fn in (("ours", ours), ("generate", bare)):
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    tokens = batch * new_tokens
    best = {k: min(v) for k, v in timings.items()}
    print(f"{batch} prompts x {new_tokens} new tokens, random Llama (hidden 256, 4 layers, vocab 32768), 2 threads")
    for name, t in best.items():
        print(f"{name:9} {tokens / t:8.0f} tokens/s  ({t:.2f} s, best of 3)")
    print(f"ratio ours / generate: {best['generate'] / best['ours']:.2f}x throughput")


if __name__ == "__main__":
    main()
