"""The ERPD study on the embedded task, in one command: every experiment behind the paper's claims, each run as
a user would run it, cached, and a report with a verdict per claim.

    python experiments/run.py                        # the full study (make experiments), experiments/REPORT.md
    python experiments/run.py --preset quick         # E1 and E3 at 3 seeds, smaller D (make experiments-quick)
    python experiments/run.py --only E2,E7 --jobs 2  # some experiments, two runs at a time
    python experiments/run.py --dry-run              # the steps, which are finished, and their commands
    python experiments/run.py report                 # rewrite the report from the finished runs only
    python experiments/run.py compare runs/a/eval.json:student B=runs/b/eval.json:student --baseline B

Every run is its own process (erpd_stage1.py, erpd_stage2.py, erpd_rounds.py, eval_math.py; under torchrun
with --nproc > 1) with --seed. Runs live under OUT/<preset>/seed<k>/ (OUT = runs/experiments), one folder per
step; a step whose final artefact exists (stage 1's shards/manifest.json, student/, the last round's model,
the eval json) is skipped, a stage run whose folder holds a partial run is continued with --resume, so a
rerun skips finished runs and an interrupted study resumes. Each step's wall time, command and commit go
to OUT/<preset>/steps/<step>.json, its output to OUT/<preset>/logs/<step>.log.

Sharing, to fit the budget: per seed, one D (sampled by the sapo teacher's run) for every teacher of E1, E2,
E4 and E5 (--rollouts); the sapo teacher is E1's curve, E2's --kl-coef 0, E3's teacher and round 1 of E6
(erpd_rounds.py continues it); its student is E3's, E5's sapo-alone and E7's eps 0.2 / c 2; E3's GRPO rounds
are the first rounds of E6's. Every held-out evaluation of a seed uses the same problems and eval seed, so
models pair by problem across eval files.

The sizes are in PRESETS below, in one place. The method's settings are the stage scripts' defaults for every
experiment (the presets change only sizes): no experiment is tuned to rescue its verdict.
"""

import argparse
import concurrent.futures
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments import analysis, report  # noqa: E402

EXPERIMENTS = ("E1", "E2", "E3", "E4", "E5", "E6", "E7")
NO_CLIP = 1e6  # "no clip" for --eps / --clip-c: far beyond any ratio or delta the runs see (|log rho| <= 20)

# Every size the study chooses, per preset. stage1 / stage2 / eval: flags added to every run of that script
# ([] = the scripts' defaults: D = --num-prompts x --samples-per-prompt, stage 2's epochs and lr, ...).
# Wall times are measured and written into the report (per experiment), not estimated here.
PRESETS = {
    "full": dict(
        seeds=[0, 1, 2],
        stage1=[], stage2=[], eval=[],
        curve_epochs=6,         # stage-1 epochs of every teacher: stage 1's default (the demo's teacher)
        eval_every=1,           # curve points (held-out accuracy, teacher snapshots) every k epochs: the default
        curve_eval_prompts=200, curve_eval_samples=4,   # each curve point: problems x samples, T = 1 (defaults)
        eval_prompts=None,      # eval_math problems (None: the whole held-out set, 400)
        eval_samples=8,         # eval_math samples per problem (mean@k), T = 1
        kl_coefs=[0.01, 0.1, 1.0],   # E2, besides 0
        grpo_rounds=4,          # on-policy GRPO: D's rollouts in this many rounds (num-prompts / k prompts each)
        erpd_rounds=3,          # E6
        eps=[0.05, 0.5, NO_CLIP], clip_c=[0.5, NO_CLIP],  # E7, besides the defaults (eps 0.2, c 2)
        experiments=list(EXPERIMENTS)),
    "quick": dict(  # D a quarter of the default, batches too: the same 32 optimizer steps per epoch as full
        seeds=[0, 1, 2],
        stage1=["--num-prompts", "64", "--batch-size", "16"], stage2=["--batch-size", "16"], eval=[],
        curve_epochs=6, eval_every=1, curve_eval_prompts=100, curve_eval_samples=4,
        eval_prompts=200, eval_samples=8,
        kl_coefs=[0.01, 0.1, 1.0], grpo_rounds=4, erpd_rounds=3, eps=[0.05, 0.5, NO_CLIP], clip_c=[0.5, NO_CLIP],
        experiments=["E1", "E3"]),
    "smoke": dict(  # the test's: micro sizes, one seed (only here), checks the path, not the claims
        seeds=[0],
        stage1=["--num-prompts", "4", "--samples-per-prompt", "2", "--batch-size", "4", "--micro-batch", "4",
                "--kl-rollouts", "4"],
        stage2=["--batch-size", "4", "--micro-batch", "4", "--kl-rollouts", "4"], eval=[],
        curve_epochs=2, eval_every=1, curve_eval_prompts=3, curve_eval_samples=1,
        eval_prompts=4, eval_samples=2,
        kl_coefs=[0.1], grpo_rounds=2, erpd_rounds=2, eps=[NO_CLIP], clip_c=[NO_CLIP],
        experiments=list(EXPERIMENTS)),
}


# ---- the study: its steps and where they write ---------------------------------------------------------


def stage1_defaults(flags: list[str]):
    """erpd_stage1.py's arguments with the preset's flags: the base model and D's size come from here."""
    import erpd_stage1

    return erpd_stage1.parse_args([str(f) for f in flags])


def words(flags) -> list[str]:
    """Command-line words; floats as %g (1e+06, not 1000000.0)."""
    return [f"{f:g}" if isinstance(f, float) else str(f) for f in flags]


def without(flags: list, *names: str) -> list:
    """flags less the given options and their values (a step that sets them itself)."""
    out, skip = [], False
    for f in flags:
        if skip:
            skip = False
        elif f in names:
            skip = True
        else:
            out.append(f)
    return out


def script(name: str, *flags, nproc: int = 1) -> list[str]:
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, str(ROOT / name), *words(flags)]


def finished(stage1_out: Path) -> Path:
    """A stage-1 run's last artefact: the shards' manifest (its teacher/ is saved before the shards are
    written, and --unlearn trains pi_U in between)."""
    return stage1_out / "shards" / "manifest.json"


def setting_name(flag: str, value: float) -> str:
    """eval model name of an E7 setting: eps0.05, c1e+06."""
    return f"{flag}{value:g}"


def study(p: dict, out: Path, nproc: int = 1) -> tuple[list[dict], dict]:
    """(steps, layout). A step: name, owners (the experiments that need it), kind (stage1 / stage2 / rounds /
    eval),
    out (its folder), done (its final artefact), deps (step names), argv (a list, or a function called once
    the deps are done, for commands that depend on their results). layout: where each seed's results are."""
    s1 = stage1_defaults(p["stage1"])
    base, rounds = s1.model, p["grpo_rounds"]
    if s1.num_prompts % rounds:
        raise SystemExit(f"grpo_rounds {rounds} must divide --num-prompts {s1.num_prompts}")
    unlearn = "E4" in p["experiments"]
    steps, layout = [], {"preset": p, "experiments": p["experiments"], "base": base, "seeds": {}, "e7": [],
                         "grpo_rounds": rounds, "erpd_rounds": p["erpd_rounds"],
                         "rollouts": s1.num_prompts * s1.samples_per_prompt, "batch_size": s1.batch_size}
    layout["e7"] = [(f"eps {v:g}" + (" (no clip)" if v == NO_CLIP else ""), setting_name("eps", v), ["--eps", v])
                    for v in p["eps"]] + \
                   [(f"c {v:g}" + (" (no clip)" if v == NO_CLIP else ""), setting_name("c", v), ["--clip-c", v])
                    for v in p["clip_c"]]

    def add(name, owners, kind, argv, out_dir, done, deps=()):
        steps.append(dict(name=name, owners=set(owners), kind=kind, argv=argv, out=out_dir, done=done,
                          deps=list(deps)))
        return name

    for seed in p["seeds"]:
        d, tag = out / f"seed{seed}", f"seed{seed}"
        first_data_seed = 100 * seed + 1  # erpd_rounds.py: round k draws its prompts with this + k - 1
        curve = [*p["stage1"], "--seed", seed, "--epochs", p["curve_epochs"], "--eval-every", p["eval_every"],
                 "--eval-prompts", p["curve_eval_prompts"], "--eval-samples", p["curve_eval_samples"]]
        erpd_stage1 = [*curve, "--teacher-loss", "sapo", "--snapshot-every", p["eval_every"]]
        student_flags = [*p["stage2"], "--seed", seed, "--eval-every", 0]  # eval_math measures the students
        # on-policy GRPO: |D| / rounds rollouts per round, sampled from the current policy, one epoch, clip 0.2
        grpo_flags = [*without(p["stage1"], "--num-prompts", "--kl-rollouts"), "--seed", seed,
                      "--num-prompts", s1.num_prompts // rounds, "--teacher-loss", "ppo", "--eps-high", 0.2,
                      "--epochs", 1, "--eval-every", 0, "--kl-rollouts", 0]
        sapo, student = d / "erpd/round1/stage1", d / "erpd/round1/stage2"
        teachers = {"sapo": sapo, **{loss: d / "teachers" / loss for loss in ("ppo", "ce", "mse")}}
        grpo = d / "grpo"
        seed_layout = {"curves": teachers, "kl": {0.0: sapo}, "evals": {}, "snapshot_every": p["eval_every"]}
        layout["seeds"][seed] = seed_layout

        # The sapo teacher, launched exactly as erpd_rounds.py launches round 1, so that E6 continues it.
        s_sapo = add(f"{tag}/teacher-sapo", EXPERIMENTS, "stage1",
                     script("erpd_stage1.py", "--model", base, "--data-seed", first_data_seed, "--out", sapo,
                            *erpd_stage1, nproc=nproc), sapo, finished(sapo))
        losses = {"ppo": ["--teacher-loss", "ppo", "--eps-high", 10],
                  "ce": ["--teacher-loss", "ce"],
                  "mse": ["--teacher-loss", "mse", *(["--unlearn"] if unlearn else [])]}
        owners = {"ppo": ["E1"], "ce": ["E1", "E5"], "mse": ["E1", "E4", "E5"]}
        s_teacher = {"sapo": s_sapo}
        for loss, flags in losses.items():
            s_teacher[loss] = add(f"{tag}/teacher-{loss}", owners[loss], "stage1",
                                  script("erpd_stage1.py", "--rollouts", sapo, "--out", teachers[loss], *curve, *flags,
                                         nproc=nproc), teachers[loss], finished(teachers[loss]), [s_sapo])
        for coef in p["kl_coefs"]:
            folder = seed_layout["kl"][coef] = d / "kl" / f"{coef:g}"
            add(f"{tag}/kl-{coef:g}", ["E2"], "stage1",
                script("erpd_stage1.py", "--rollouts", sapo, "--out", folder, *curve, "--teacher-loss", "sapo",
                       "--kl-coef", coef, nproc=nproc), folder, finished(folder), [s_sapo])

        def stage2(name, owners, folder, teacher_names, *flags):
            """A student of the named teachers of this seed (they share D); its model is folder/student."""
            model[name] = folder / "student"
            return add(f"{tag}/{name}", owners, "stage2",
                       script("erpd_stage2.py", "--model", base, "--teacher", *[teachers[t] for t in teacher_names],
                              "--out", folder, *student_flags, *flags, nproc=nproc),
                       folder, folder / "student", [s_teacher[t] for t in teacher_names])
        model = {}  # eval name -> model folder
        students = d / "students"
        # E3's student, launched exactly as erpd_rounds.py launches round 1's stage 2
        s_student = stage2("student", ["E3", "E5", "E6", "E7"], student, ["sapo"])
        s_conservative = stage2("conservative", ["E3"], students / "conservative", ["sapo"], "--signal", "none",
                                "--alpha", 1)
        s_grpo = add(f"{tag}/grpo", ["E3", "E6"], "rounds",
                     script("erpd_rounds.py", "--stage1-only", "--rounds", rounds, "--model", base, "--out", grpo,
                            "--first-data-seed", first_data_seed, "--nproc", nproc,
                            "--stage1", shlex.join(words(grpo_flags))),
                     grpo, grpo / f"round{rounds}/stage1/teacher")
        e45 = [stage2("student_mse", ["E4", "E5"], students / "mse", ["mse"])]  # --signal base
        if unlearn:
            e45.append(stage2("student_mse_unlearned", ["E4"], students / "mse-unlearned", ["mse"],
                              "--signal", "unlearned"))
        e45 += [stage2("student_ce", ["E5"], students / "ce", ["ce"]),
                stage2("student_sapo_ce", ["E5"], students / "sapo+ce", ["sapo", "ce"]),  # equal weights (default)
                stage2("student_sapo_ce_mse", ["E5"], students / "sapo+ce+mse", ["sapo", "ce", "mse"])]
        e45_models = [step.split("/", 1)[1] for step in e45]
        e7 = [stage2(name, ["E7"], students / name, ["sapo"], *flags) for _, name, flags in layout["e7"]]
        last = p["erpd_rounds"]
        s_erpd_rounds = add(f"{tag}/erpd_rounds", ["E6"], "rounds",
                            script("erpd_rounds.py", "--rounds", last, "--model", base, "--out", d / "erpd",
                                   "--first-data-seed", first_data_seed, "--nproc", nproc,
                                   "--stage1", shlex.join(words(erpd_stage1)),
                                   "--stage2", shlex.join(words(student_flags))),
                            d / "erpd", d / f"erpd/round{last}/stage2/student", [s_sapo, s_student])
        s_grpo_rounds = add(f"{tag}/grpo_rounds", ["E6"], "rounds",
                            script("erpd_rounds.py", "--stage1-only", "--rounds", rounds * last, "--model", base,
                                   "--out", grpo, "--first-data-seed", first_data_seed, "--nproc", nproc,
                                   "--stage1", shlex.join(words(grpo_flags))),
                            grpo, grpo / f"round{rounds * last}/stage1/teacher", [s_grpo])

        def evaluation(name, owners, models, deps):
            """One eval_math.py call on this seed's held-out problems; models: [(name, path)], or a function
            returning them once the deps are done."""
            folder = d / "eval" / name
            seed_layout["evals"][name] = folder / "eval.json"
            flags = ["--ref", base, "--samples", p["eval_samples"], "--seed", 1000 + seed, *p["eval"],
                     *(["--num-prompts", p["eval_prompts"]] if p["eval_prompts"] else []),
                     "--json", folder / "eval.json"]

            def argv():
                named = models() if callable(models) else models
                return script("eval_math.py", *[f"--model={n}={m}" for n, m in named], *flags, nproc=nproc)
            return add(f"{tag}/eval-{name}", owners, "eval", argv if callable(models) else argv(), folder,
                       folder / "eval.json", deps)

        def e3_models(sapo=sapo, model=model, grpo=grpo):
            best = analysis.best_epoch(analysis.read_epochs(sapo), p["eval_every"])
            return [("base", base), ("teacher_best", sapo / f"teacher-epoch{best}" if best else sapo / "teacher"),
                    ("teacher_end", sapo / "teacher"), ("student", model["student"]),
                    ("grpo", grpo / f"round{rounds}/stage1/teacher"), ("conservative", model["conservative"])]
        evaluation("e3", ["E3", "E5", "E6", "E7"], e3_models, [s_sapo, s_student, s_conservative, s_grpo])
        evaluation("e4e5", ["E4", "E5"], [("base", base), ("teacher_mse", teachers["mse"] / "teacher")] +
                   [(n, model[n]) for n in e45_models], [s_teacher["mse"], *e45])
        evaluation("e6", ["E6"], [("base", base)] +
                   [(f"erpd_round{k}", d / f"erpd/round{k}/stage2/student") for k in range(2, last + 1)] +
                   [(f"grpo_round{k}", grpo / f"round{rounds * k}/stage1/teacher") for k in range(2, last + 1)],
                   [s_erpd_rounds, s_grpo_rounds])
        evaluation("e7", ["E7"], [("base", base)] + [(name, model[name]) for _, name, _ in layout["e7"]], e7)
    return steps, layout


# ---- running the steps: cache, resume, a few at a time ----------------------------------------------------


def select(steps: list[dict], experiments) -> list[dict]:
    """The steps the chosen experiments need, with every step those depend on."""
    by_name = {s["name"]: s for s in steps}
    chosen = {s["name"] for s in steps if s["owners"] & set(experiments)}
    todo = list(chosen)
    while todo:
        for dep in by_name[todo.pop()]["deps"]:
            if dep not in chosen:
                chosen.add(dep)
                todo.append(dep)
    return [s for s in steps if s["name"] in chosen]


def status(step: dict) -> str:
    """done (its final artefact exists), partial (its folder holds a started run) or new."""
    if step["done"].exists():
        return "done"
    if step["kind"] in ("stage1", "stage2") and step["out"].is_dir() and any(step["out"].iterdir()):
        return "partial"
    return "new"


def command(step: dict) -> list[str]:
    """The step's argv; a stage run that started before continues with --resume (erpd_rounds.py resumes
    its own rounds, and eval_math.py writes its json only at the end, so both simply run again)."""
    argv = step["argv"]() if callable(step["argv"]) else step["argv"]
    return argv + ["--resume"] if status(step) == "partial" else argv


def display(argv: list[str]) -> str:
    """A command as a user would type it in the repo root."""
    return shlex.join("python" if a == sys.executable else a.replace(str(ROOT) + os.sep, "") for a in map(str, argv))


def shown(step: dict, steps: list[dict]) -> str:
    """The step's command as first run (without --resume); an evaluation whose model list depends on its
    inputs (the teacher's best epoch) is shown once they have finished."""
    if callable(step["argv"]) and not all(s["done"].exists() for s in steps if s["name"] in step["deps"]):
        return f"python eval_math.py ... (the models of {step['name']} are known once its inputs finish)"
    return display(step["argv"]() if callable(step["argv"]) else step["argv"])


def timing_file(home: Path, step: dict) -> Path:
    return home / "steps" / f"{step['name']}.json"


def run_step(step: dict, env: dict, home: Path, jobs: int) -> float:
    """Run one step as a subprocess, its output to OUT/<preset>/logs/; record its wall time."""
    argv = command(step)
    resumed = argv[-1] == "--resume"
    log = home / "logs" / f"{step['name']}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {display(argv)}\n")
        f.flush()
        proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.time() - start
    if proc.returncode or not step["done"].exists():
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(True)[-15:])
        raise RuntimeError(f"{step['name']} failed (exit {proc.returncode}); {log}:\n{tail}")
    path = timing_file(home, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"step": step["name"], "wall_s": round(wall, 1), "resumed": resumed,
                                "command": display(argv), "commit": git_commit(), "jobs": jobs,
                                "threads": int(env["OMP_NUM_THREADS"]),
                                "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
    return wall


# Which ready step starts first: the long sequential chains (erpd_rounds.py) early, so that they do not run
# alone at the end; then stage 1, which every student waits for; the evaluations last.
PRIORITY = {"rounds": 0, "stage1": 1, "stage2": 2, "eval": 3}


def execute(steps: list[dict], jobs: int, env: dict, home: Path) -> list[str]:
    """Run every unfinished step once the steps it depends on are finished, up to `jobs` at a time (by
    PRIORITY, then in list order); after a failure start nothing new. Returns the failures."""
    by_name = {s["name"]: s for s in steps}
    todo = [s for s in steps if status(s) != "done"]
    total, finished = len(todo), 0
    print(f"{len(steps) - total} of {len(steps)} steps finished before (cached), {total} to run", flush=True)
    failures, running = [], {}
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        while True:
            ready = sorted((s for s in todo if all(by_name[d]["done"].exists() for d in s["deps"])),
                           key=lambda s: PRIORITY[s["kind"]])
            for s in ready[:max(0, jobs - len(running))] if not failures else []:
                todo.remove(s)
                print(f"start  {s['name']}" + (" (resuming)" if status(s) == "partial" else ""), flush=True)
                running[pool.submit(run_step, s, env, home, jobs)] = s
            if not running:
                break
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                s = running.pop(future)
                finished += 1
                try:
                    wall = future.result()
                    print(f"done   {s['name']} in {wall / 60:.1f} min [{finished}/{total}]", flush=True)
                except RuntimeError as err:
                    failures.append(str(err))
                    print(f"FAILED {err}", file=sys.stderr, flush=True)
    if todo and not failures:
        failures.append("not run, their inputs never finished: " + ", ".join(s["name"] for s in todo))
    return failures


def git_commit() -> str:
    """HEAD's short hash, marked when tracked files differ from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    rev = git("rev-parse", "--short=12", "HEAD") or "unknown"
    return rev + (" (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python " \
           f"{platform.python_version()}, torch {torch.__version__}"


# ---- compare: one table across any finished evaluations -----------------------------------------------------


def load_run(spec: str) -> list[tuple]:
    """[(label, entries, configs, path)] of one command-line run: [LABEL=]PATH[:MODEL][,PATH[:MODEL]...]. PATH is
    an eval_math.py --json file or a folder holding eval.json; without :MODEL every model in it; several
    comma-separated PATHs are seeds of one run, pooled."""
    label = None
    if "=" in spec and not Path(spec).exists():
        label, spec = spec.split("=", 1)
    parts = []
    for item in spec.split(","):
        path, model = Path(item), None
        if not path.exists() and ":" in item:
            path, model = Path(item.rsplit(":", 1)[0]), item.rsplit(":", 1)[1]
        if path.is_dir():
            path = path / "eval.json"
        if not path.is_file():
            raise SystemExit(f"compare: {item}: no eval json there (eval_math.py --json writes one)")
        data = json.loads(path.read_text(encoding="utf-8"))
        models = data["models"] if model is None else {model: data["models"].get(model)}
        if None in models.values():
            raise SystemExit(f"compare: {path} has no model {model!r} (it has {', '.join(data['models'])})")
        if any("outcomes" not in e for e in models.values()):
            raise SystemExit(f"compare: {path} keeps no per-problem outcomes (an older eval_math.py wrote it): "
                             "evaluate again to pair by problem")
        parts.append((path, models, data.get("config", {})))
    configs = [config for _, _, config in parts]
    if all(len(models) == 1 for _, models, _ in parts) and (len(parts) > 1 or label):  # one model per part: one row
        entries = [next(iter(models.values())) for _, models, _ in parts]
        return [(label or next(iter(parts[0][1])), entries, configs, parts[0][0])]
    names = [n for n in parts[0][1] if all(n in models for _, models, _ in parts)]  # whole files: a row per model
    return [((f"{label}/{name}" if label else name), [models[name] for _, models, _ in parts], configs, parts[0][0])
            for name in names]


def compare(argv=None) -> None:
    """Print accuracy [95% CI], the paired difference to a baseline [95% CI] and the KL columns of any
    finished evaluations (the study's, or a user's own ablations)."""
    p = argparse.ArgumentParser(prog="experiments/run.py compare", description=compare.__doc__ + """

A run is [LABEL=]PATH[:MODEL]: an eval_math.py --json file, or a folder holding eval.json, and a model name
in it (all its models if none). Runs of several seeds: join their PATH[:MODEL] with commas; they are pooled
(mean over seeds, two-level bootstrap over seeds and problems, seeds paired in order with the baseline's).
Differences are paired by problem id (eval_math.paired_diff): evaluate the runs on the same problems with
the same --seed (and --num-prompts) so that they share them.""", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="[LABEL=]PATH[:MODEL][,PATH[:MODEL]...]")
    p.add_argument("--baseline", default=None, help="label of the run to pair against (default: the first)")
    args = p.parse_args(argv)
    rows = [row for spec in args.runs for row in load_run(spec)]
    labels = [r[0] for r in rows]
    for i, (label, entries, configs, path) in enumerate(rows):  # the same model name in several files
        if labels.count(label) > 1:
            rows[i] = (f"{path.parent.name}:{label}", entries, configs, path)
    labels = [r[0] for r in rows]
    if len(set(labels)) < len(labels):
        raise SystemExit(f"compare: several runs are labelled alike ({labels}): name them with LABEL=PATH")
    baseline = args.baseline or labels[0]
    if baseline not in labels:
        raise SystemExit(f"compare: --baseline {baseline}: not one of {', '.join(labels)}")
    print(compare_table(rows, baseline))


def compare_table(rows, baseline: str) -> str:
    """The table compare prints (rows: (label, entries, configs, path)), with notes on what does not match.
    One entry per row: eval_math's own accuracy interval and eval_math.paired_diff; several (seeds): pooled
    as in the study's report (analysis.accuracy_over_seeds, paired_over_seeds)."""
    from eval_math import paired_diff

    base = next(r for r in rows if r[0] == baseline)[1]
    base_configs = next(r for r in rows if r[0] == baseline)[2]

    def interval(mean, ci, signed=False):
        f = "{:+.3f}" if signed else "{:.3f}"
        return "n/a" if mean is None else f.format(mean) + (f" [{f.format(ci[0])}, {f.format(ci[1])}]" if ci else "")

    def number(stat):
        return "n/a" if stat["mean"] is None else f"{stat['mean']:.4f}" + (
            f" ±{(stat['ci'][1] - stat['ci'][0]) / 2:.4f}" if stat["ci"] else "")
    header = ["run", "accuracy [95% CI]", f"vs {baseline} [95% CI]", "pass@k", "kl_to_ref", "token_kl_to_ref",
              "entropy", "problems x k", "seeds"]
    lines, notes = [], set()
    for label, entries, configs, _ in rows:
        if len(entries) == 1:
            acc = interval(entries[0]["accuracy"], entries[0]["accuracy_ci"])
        else:
            s = analysis.accuracy_over_seeds(entries)
            acc = interval(s["mean"], s["ci"])
        if len(entries) == 1 and len(base) == 1:
            vs = interval(*paired_diff(entries[0], base[0]), signed=True)
        elif len(entries) == len(base):
            s = analysis.paired_over_seeds(entries, base)
            vs = interval(s["mean"], s["ci"], signed=True)
        else:
            vs = f"n/a ({len(entries)} seeds, the baseline {len(base)})"
        lines.append([label, acc, vs, number(analysis.metric_over_seeds(entries, "pass_at_k")),
                      *[number(analysis.metric_over_seeds(entries, k))
                        for k in ("kl_to_ref", "token_kl_to_ref", "entropy")],
                      f"{len(entries[0]['outcomes'])} x {entries[0]['samples']}", str(len(entries))])
        for config, base_config in zip(configs, base_configs):
            for key in ("data", "split", "temperature", "samples", "max_new_tokens", "seed", "num_prompts", "ref"):
                if config.get(key) != base_config.get(key):
                    why = "its KL columns are to another model" if key == "ref" else "only shared problems are paired"
                    notes.add(f"note: {label} differs from {baseline} in {key} ({config.get(key)} vs "
                              f"{base_config.get(key)}): {why}")
    widths = [max(len(h), *(len(c[j]) for c in lines)) for j, h in enumerate(header)]

    def row(cells):
        return "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([row(header), *map(row, lines), *sorted(notes)])


# ---- the report ---------------------------------------------------------------------------------------------


def write_report(preset_name: str, every_step: list[dict], layout: dict, home: Path, report_dir: Path, *,
                 nproc: int = 1) -> Path:
    """REPORT.md and figures/ for the whole preset from whatever has finished (report.write)."""
    for s in every_step:
        s["shown"] = shown(s, every_step)
    elapsed = home / "elapsed.jsonl"
    meta = {"preset": preset_name, "experiments": layout["experiments"], "commit": git_commit(), "machine": machine(),
            "nproc": nproc, "invocations": [json.loads(line) for line in elapsed.read_text().splitlines()]
            if elapsed.is_file() else [],
            "command": "python experiments/run.py" + (f" --preset {preset_name}" if preset_name != "full" else "")}
    return report.write(layout["preset"], layout, every_step, meta, report_dir, timings=lambda s: timing_file(home, s))


# ---- the command line ------------------------------------------------------------------------------------


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compare"]:
        compare(argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", nargs="?", choices=["run", "report"], default="run",
                   help="run: the unfinished steps, then the report (default); report: the report from the "
                        "finished runs only; (compare: see `run.py compare -h`)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="full", help="the sizes (PRESETS in this file)")
    p.add_argument("--only", default=None, help="comma-separated experiments of the preset (default: all of them)")
    p.add_argument("--out", default="runs/experiments", help="runs are cached in OUT/<preset>/")
    p.add_argument("--report-dir", default=None,
                   help="REPORT.md and figures/ (default: experiments/ for the full preset, OUT/<preset>/report "
                        "for the others, so that they never replace the committed report)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun when > 1)")
    p.add_argument("--dry-run", action="store_true", help="list the steps, their state and commands; run nothing")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    experiments = args.only.upper().split(",") if args.only else preset["experiments"]
    if not set(experiments) <= set(preset["experiments"]):
        p.error(f"--only {args.only}: the {args.preset} preset covers {', '.join(preset['experiments'])}")
    home = Path(args.out).resolve() / args.preset
    report_dir = Path(args.report_dir) if args.report_dir else \
        ROOT / "experiments" if args.preset == "full" else home / "report"
    every_step, layout = study(preset, home, args.nproc)
    steps = select(every_step, experiments)
    if args.dry_run:
        for s in steps:
            print(f"{status(s):8} {s['name']}\n         {shown(s, every_step)}")
        return 0
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    failures = []
    if args.action == "run":
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
            env.setdefault(key, value)
        start = time.time()
        failures = execute(steps, args.jobs, env, home)
        elapsed = time.time() - start
        print(f"study: {elapsed / 60:.1f} min this time", flush=True)
        with open(home / "elapsed.jsonl", "a", encoding="utf-8") as f:  # the report sums these: wall-clock time
            f.write(json.dumps({"started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)),
                                "elapsed_s": round(elapsed, 1), "experiments": experiments, "jobs": args.jobs,
                                "threads": threads, "failures": len(failures)}) + "\n")
    path = write_report(args.preset, every_step, layout, home, report_dir, nproc=args.nproc)
    print(f"wrote {path}")
    for failure in failures:
        print(f"failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
