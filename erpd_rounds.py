"""ERPD rounds: each round's distilled student is the next round's base, with a fresh D sampled from it.

    round k = 1..R:  stage 1 from base_k on prompts drawn with --data-seed k   ->  teacher_k, shards_k
                     stage 2 from base_k on shards_k                            ->  student_k = base_{k+1}
    --stage1-only:   stage 1 alone, teacher_k = base_{k+1}. With one epoch of PPO at clip 0.2
                     (--stage1 "--teacher-loss ppo --eps-high 0.2 --epochs 1") that is on-policy GRPO:
                     every round samples from the current policy and trains against its sampler.

Each stage runs as its own process, as a user would run it (under torchrun with --nproc > 1); flags in
--stage1 / --stage2 go to every round. Writes OUT/round<k>/stage1, OUT/round<k>/stage2 and, with --eval,
OUT/eval.json: every round's model next to the original base, with the KL to the original base. Every
model folder records its lineage (erpd.json: each round's base and fingerprint, the original first).
A rerun skips finished rounds and resumes an interrupted one.

    python erpd_rounds.py --rounds 3 --out runs/rounds --eval          # embedded tiny default
    python erpd_rounds.py --rounds 3 --nproc 8 --model Qwen/Qwen2.5-Math-1.5B-Instruct --out runs/qwen-rounds \\
        --stage1 "--data openai/gsm8k:main --autocast bfloat16 --lr 1e-6 ..." --stage2 "--autocast bfloat16 --lr 1e-6"
"""

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from common import DEFAULT_MODEL, InputError, atomic_write_text, run_main

ROOT = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="R")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the original base")
    p.add_argument("--out", default="runs/rounds", help="output folder: OUT/round<k>/stage1, stage2")
    p.add_argument("--stage1", default="", help="flags for every round's erpd_stage1.py (one quoted string)")
    p.add_argument("--stage2", default="", help="flags for every round's erpd_stage2.py (one quoted string)")
    p.add_argument("--stage1-only", action="store_true", help="no stage 2: each round's teacher is the next base")
    p.add_argument("--first-data-seed", type=int, default=1, help="round k draws its prompts with this + k - 1")
    p.add_argument("--nproc", type=int, default=1, help="processes per stage (torchrun when > 1)")
    p.add_argument("--eval", action="store_true", help="evaluate every round's model against the original base")
    p.add_argument("--eval-args", default="--samples 16", help="flags for eval_math.py (one quoted string)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    if args.rounds < 1:
        raise InputError(f"--rounds {args.rounds}: give at least 1")
    given = {token.split("=", 1)[0] for token in shlex.split(args.stage1) + shlex.split(args.stage2)}
    for flag in ("--model", "--out", "--teacher", "--data-seed"):
        if flag in given:
            raise InputError(f"{flag} in --stage1 / --stage2: the rounds set it for every round")
    base, models = args.model, {"base": args.model}
    for k in range(1, args.rounds + 1):
        stage1, stage2 = out / f"round{k}" / "stage1", out / f"round{k}" / "stage2"
        run("erpd_stage1.py", ["--model", base, "--data-seed", str(args.first_data_seed + k - 1), "--out", stage1,
                               *shlex.split(args.stage1)], stage1 / "shards" / "manifest.json", args.nproc)
        if args.stage1_only:
            base = str(stage1 / "teacher")
        else:
            run("erpd_stage2.py", ["--model", base, "--teacher", stage1, "--out", stage2, *shlex.split(args.stage2)],
                stage2 / "student", args.nproc)
            base = str(stage2 / "student")
        models[f"round{k}"] = base
        print(f"round {k}: {base}", flush=True)
    record = {"original_base": args.model, "models": models,
              "lineage": json.loads((Path(base) / "erpd.json").read_text())["lineage"]}
    atomic_write_text(out / "rounds.json", json.dumps(record, indent=1))
    if args.eval:
        evaluation = out / "eval.json"
        subprocess.run([sys.executable, str(ROOT / "eval_math.py"), *[f"--model={n}={m}" for n, m in models.items()],
                        "--ref", args.model, "--json", str(evaluation), "--overwrite", *shlex.split(args.eval_args)],
                       check=True)


def run(script: str, flags: list, finished: Path, nproc: int) -> None:
    """One stage as its own process; skipped when its last output (stage 1's shard manifest, written after
    the teacher and pi_U; stage 2's student) is there, resumed when it started before."""
    out = Path(flags[flags.index("--out") + 1])
    if finished.exists():
        print(f"{finished} exists: skipped", flush=True)
        return
    resume = ["--resume"] if out.is_dir() and any(out.iterdir()) else []
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    proc = subprocess.run([*launcher, str(ROOT / script), *map(str, flags), *resume])
    if proc.returncode:
        raise InputError(f"{script} --out {out} failed (exit {proc.returncode}); its output is above")


if __name__ == "__main__":
    run_main(main)
