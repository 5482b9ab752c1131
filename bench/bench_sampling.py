"""common.sample_responses against a bare model.generate on the same prompts and settings.

    python bench/bench_sampling.py            # Llama hidden 512, 8 layers, 32 prompts x 128 new tokens (~1.2 min)
    python bench/bench_sampling.py --quick    # hidden 256, 4 layers, 16 prompts x 64 new tokens

Same random LlamaForCausalLM as bench_train_step (float32, sdpa, 2 threads), the same left-padded
prompts of 16..44 tokens, one batch, temperature 1, no top-k, no top-p, KV cache in both:
  ours      common.sample_responses(..., stop_ids=[V])   (id V is outside the vocabulary: never sampled)
  generate  model.generate(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=N,
            min_new_tokens=N) with the generation config's EOS removed
Both therefore produce exactly N new tokens per row (checked). Time: median of 3 interleaved rounds
after a warm-up round. Target: ours >= 0.9x generate's tokens/s.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_train_step import build_model, sizes  # noqa: E402
from measure import interleaved_median  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--prompts", type=int, default=None, help="batch size (default 32, quick 16)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per row (default 128, quick 64)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    import common

    torch.set_num_threads(2)
    s = sizes(args.quick)
    batch = args.prompts or (16 if args.quick else 32)
    new_tokens = args.new_tokens or (64 if args.quick else 128)
    model = build_model(s).eval()
    model.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, s["vocab"], (16 + 4 * (i % 8),), generator=g).tolist() for i in range(batch)]
    ids, mask, _ = common.left_pad(prompts, 0, "cpu")
    never = [s["vocab"]]
    lengths = {}

    def ours():
        out = common.sample_responses(model, prompts, max_new_tokens=new_tokens, temperature=1.0, top_p=1.0,
                                      stop_ids=never, pad_id=0, generator=torch.Generator().manual_seed(0),
                                      batch_size=batch)
        lengths["ours"] = {len(r["response_ids"]) for r in out}

    def generate():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        lengths["generate"] = {out.shape[1] - ids.shape[1]}

    times = interleaved_median({"ours": ours, "generate": generate}, rounds=args.rounds)
    assert lengths == {"ours": {new_tokens}, "generate": {new_tokens}}, lengths
    tokens = batch * new_tokens
    print(f"random Llama hidden {s['hidden']}, {s['layers']} layers, vocab {s['vocab']}, float32; {batch} left-padded "
          f"prompts (16..44 tokens) x {new_tokens} new tokens, {torch.get_num_threads()} threads")
    for name, t in times.items():
        print(f"{name:9} {tokens / t:8.0f} tokens/s  ({t:.2f} s, median of {args.rounds})")
    print(f"ratio ours / generate: {times['generate'] / times['ours']:.2f}x tokens/s (target >= 0.9)")


if __name__ == "__main__":
    main()
