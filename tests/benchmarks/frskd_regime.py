"""FRSKD in and out of its regime: paired runs over seeds, and the gradient share of each term.

Each run is `frskd.py` itself (its main(), in a child process, one thread, no loader workers),
with the classification loss wrapped to measure, about 4 times per epoch, the gradient norm on
the classifier's parameters of each term of Eq. 5: CE(c), CE(t) (the self-teacher's CE reaches the
classifier through its undetached features), the unweighted L_KD and L_F. Nothing else changes:
the wrapper returns the loss it is given, so every run trains exactly as the command does.

Regimes (fixed before any run of them was looked at):
  demo   the demo set (10 classes, 150 images each) and the demo recipe (Tiny-ImageNet's alpha 3)
  c100   100 classes (the demo's 10 shapes x 10 hues), 40 train / 10 val images each, with the
         CIFAR-100 recipe's alpha 2, beta 100 and pad-4 crops: the paper's class count and its
         ratio alpha / sqrt(classes) (CIFAR-100 0.20, Tiny-ImageNet 0.21; demo 0.95), at 16 epochs
         of 62 steps (the demo's budget per class is not affordable on a CPU at 100 classes)

  seg    `--task segmentation --data demo` as it is (its backbone from random initialisation), and
  seg_pretrained  the same with the backbone pretrained on the demo classification set (plain CE,
         cached as the demo teachers are): the paper's route starts from an ImageNet-pretrained
         backbone, and its appendix says distilling from the start hinders an untrained backbone.
         Each seg command trains FRSKD and then its baseline (the demo does both).

Decision rule for `frskd.py --data demo`, fixed with the regimes: the official default in the
c100 regime if it beats its baseline on each of 3 seeds (no departure from the official code);
else the demo regime with the distillation warm-up (alpha = beta = 0 until the first lr drop,
the segmentation code's idea) if that does; else the official default, reported as losing.

  python tests/benchmarks/frskd_regime.py --out runs/frskd_regime            # all runs, 3 seeds
  python tests/benchmarks/frskd_regime.py --out runs/frskd_regime --report   # the tables
Finished runs (summary.json) are skipped, so the command continues where it stopped.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

IMAGENET = ["--mean", "0.485", "0.456", "0.406", "--std", "0.229", "0.224", "0.225"]
SCHEDULE = ["--arch", "wrn16_1", "--epochs", "16", "--milestones", "8", "12", "--batch-size", "64"]
REGIMES = {  # explicit flags: the demo recipe's values, without the demo's second (baseline) run
    "demo": SCHEDULE + IMAGENET + ["--input-size", "32", "--crop-pct", "1.0", "--augment", "rrc",
                                   "--alpha", "3", "--beta", "100"],
    "c100": SCHEDULE + IMAGENET + ["--recipe", "cifar", "--input-size", "32", "--crop-pct", "1.0",
                                   "--augment", "pad_crop", "--alpha", "2", "--beta", "100"],
    "seg": ["--task", "segmentation"],
    "seg_pretrained": ["--task", "segmentation"],
}
SEG_BACKBONE = "test_efficientnet"
RUNS = [  # (regime, name, extra flags), in the order they run
    ("demo", "baseline", ["--baseline"]), ("demo", "alpha3", []), ("demo", "warmup8", ["--warmup-epochs", "8"]),
    ("c100", "baseline", ["--baseline"]), ("c100", "alpha2", []),
    ("demo", "alpha0", ["--alpha", "0"]), ("demo", "alpha1", ["--alpha", "1"]),
    ("demo", "alpha0.5", ["--alpha", "0.5"]), ("c100", "warmup8", ["--warmup-epochs", "8"]),
    ("seg", "frskd", []), ("seg_pretrained", "frskd", []),
]


def many_classes(root, shapes=10, hues=10, train=40, val=10, size=64):
    """The c100 set: class = (shape, hue), rendered by the demo's own generator."""
    from PIL import Image
    from common import demo
    if os.path.isdir(root):
        return root
    tmp = f"{root}.tmp{os.getpid()}"
    for split, count, seed in (("train", train, 0), ("val", val, 1)):
        for c in range(shapes * hues):
            shape, hue = c % shapes, c // shapes
            folder = os.path.join(tmp, split, f"c{c:03d}")
            os.makedirs(folder)
            rng = np.random.default_rng([7, seed, c])
            for i in range(count):
                img, draw, background = demo.cluttered_background(rng, size)
                radius = rng.uniform(0.2, 0.36) * size
                cx, cy = rng.uniform(radius, size - radius, 2)
                h = (hue / hues + rng.normal(0, 0.05)) % 1.0  # the demo's hue spread per class
                rgb = Image.new("HSV", (1, 1), (int(h * 255), int(rng.uniform(150, 255)),
                                                int(rng.uniform(150, 255)))).convert("RGB").getpixel((0, 0))
                demo.draw_shape(draw, demo.CLASSES[shape], cx, cy, radius, rng.uniform(0, 2 * math.pi),
                                tuple(rgb), background)
                img.save(os.path.join(folder, f"{i:04d}.jpg"), quality=92)
    os.replace(tmp, root)
    return root


def one(argv, out):
    """Run frskd.main(argv) with the loss wrapped to log gradient norms to OUT/grad_share.jsonl."""
    import torch
    import frskd
    state = {"net": None, "calls": 0}
    build, loss = frskd.build_net, frskd.frskd_loss

    def build_net(args, num_classes):
        state["net"] = build(args, num_classes)
        return state["net"]

    def measured_loss(logits, self_teacher_logits, features, refined, targets, alpha, beta, temperature):
        total, terms = loss(logits, self_teacher_logits, features, refined, targets, alpha, beta, temperature)
        state["calls"] += 1
        if torch.is_grad_enabled() and state["calls"] % state["every"] == 1:
            params = [p for p in state["net"].classifier.parameters() if p.requires_grad]
            norms = {}
            for name, term in zip(("ce", "ce_self_teacher", "kd", "feature"), terms):
                grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
                norms[name] = math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))
            with open(os.path.join(out, "grad_share.jsonl"), "a") as f:
                f.write(json.dumps({"epoch": (state["calls"] - 1) // state["steps"] + 1, "alpha": alpha, "beta": beta, **norms}) + "\n")
        return total, terms

    data = argv[argv.index("--data") + 1]
    steps = sum(len(files) for _, _, files in os.walk(os.path.join(data, "train"))) // 64
    state["steps"], state["every"] = steps, max(1, steps // 4)
    frskd.build_net, frskd.frskd_loss = build_net, measured_loss
    frskd.main(argv)


def command(args, regime, name, extra, seed):
    out = os.path.join(args.out, regime, name, f"seed{seed}")
    data = {"demo": args.demo_root, "c100": args.c100_root}.get(regime, "demo")
    extra = extra + (["--init", args.seg_init] if regime == "seg_pretrained" else [])
    return out, [sys.executable, os.path.abspath(__file__), "--one", out, "--", "--data", data, "--seed",
                 str(seed), "--out", out, "--overwrite", "--threads", "1", "--workers", "0",
                 *REGIMES[regime], *extra]


def execute(job):
    out, cmd = job
    if os.path.isfile(os.path.join(out, "summary.json")):
        return
    os.makedirs(out, exist_ok=True)
    for stale in ("grad_share.jsonl",):
        if os.path.exists(os.path.join(out, stale)):
            os.remove(os.path.join(out, stale))
    start = time.time()
    with open(out + ".log", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    print(f"{'done' if rc == 0 else f'FAILED rc {rc}'} {out} in {time.time() - start:.0f}s", flush=True)


def final(out, key):
    """`key` of a finished run's last epoch (None while it runs)."""
    if not os.path.isfile(os.path.join(out, "summary.json")):
        return None
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return json.loads(f.read().splitlines()[-1]).get(key)
    except (OSError, IndexError):
        return None


def report(args):
    seeds = range(args.seeds)
    print("| regime | run | classifier top-1 | self-teacher top-1 | vs baseline, per seed |")
    print("|---|---|---|---|---|")
    for regime in ("demo", "c100"):
        base = [final(os.path.join(args.out, regime, "baseline", f"seed{s}"), "val_top1") for s in seeds]
        for r, name, _ in RUNS:
            if r != regime:
                continue
            outs = [os.path.join(args.out, regime, name, f"seed{s}") for s in seeds]
            top1 = [final(o, "val_top1") for o in outs]
            teacher = [final(o, "val_self_teacher_top1") for o in outs]
            done = [i for i, v in enumerate(top1) if v is not None]
            if not done:
                continue
            def stat(values):
                v = [values[i] for i in done if values[i] is not None]
                return f"{np.mean(v):.1f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.1f} (n={len(v)})" if v else "-"
            diffs = ", ".join(f"{top1[i] - base[i]:+.1f}" for i in done if base[i] is not None)
            print(f"| {regime} | {name} | {stat(top1)} | {stat(teacher)} | {diffs if name != 'baseline' else ''} |")
    for regime in ("seg", "seg_pretrained"):
        rows = []
        for seed in seeds:
            try:
                with open(os.path.join(args.out, regime, "frskd", f"seed{seed}", "summary.json")) as f:
                    summary = json.load(f)
            except OSError:
                continue
            rows.append((summary["frskd"]["final"]["val_miou"], summary["frskd"]["final"]["val_self_teacher_miou"],
                         summary["baseline"]["final"]["val_miou"]))
        if rows:
            a = np.array(rows)
            sd = lambda v: np.std(v, ddof=1) if len(v) > 1 else 0.0  # noqa: E731
            print(f"| {regime} | frskd (mIoU) | {a[:, 0].mean():.1f} ± {sd(a[:, 0]):.1f} (n={len(a)}) | "
                  f"{a[:, 1].mean():.1f} ± {sd(a[:, 1]):.1f} | " + ", ".join(f"{d:+.1f}" for d in a[:, 0] - a[:, 2]) + " |")
            print(f"| {regime} | baseline (mIoU) | {a[:, 2].mean():.1f} ± {sd(a[:, 2]):.1f} | | |")
    print("\nGradient norm on the classifier, ratio to its own CE's, mean over seeds and measurements "
          "(alpha L_KD | beta L_F | CE(t)), per epoch:")
    for regime, name, _ in RUNS:
        rows = {}
        for s in seeds:
            path = os.path.join(args.out, regime, name, f"seed{s}", "grad_share.jsonl")
            if not os.path.isfile(path):
                continue
            with open(path) as f:
                records = [json.loads(line) for line in f]
            for r in records:
                rows.setdefault(r["epoch"] - 1, []).append(
                    (r["alpha"] * r["kd"] / r["ce"], r["beta"] * r["feature"] / r["ce"], r["ce_self_teacher"] / r["ce"]))
        if rows:
            cells = " ".join(f"{e + 1}:{np.mean([v[0] for v in rows[e]]):.2f}|{np.mean([v[1] for v in rows[e]]):.2f}|"
                             f"{np.mean([v[2] for v in rows[e]]):.2f}" for e in sorted(rows))
            print(f"  {regime} {name}: {cells}")
            for phase, epochs in (("lr 0.1, epochs 1-8", range(8)), ("epochs 9-16", range(8, 16))):
                values = np.array([v for e in epochs for v in rows.get(e, [])])
                if len(values):
                    print(f"    {phase}: alpha L_KD {values[:, 0].mean():.2f}x, beta L_F {values[:, 1].mean():.2f}x, "
                          f"CE(t) {values[:, 2].mean():.2f}x the classifier CE's gradient norm")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/frskd_regime")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each on one thread)")
    p.add_argument("--runs", nargs="*", help="regime/name of the runs to do (default: all)")
    p.add_argument("--report", action="store_true")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.one:
        return one(rest[1:] if rest[:1] == ["--"] else rest, args.one)
    if args.report:
        return report(args)
    from common import demo
    args.demo_root = demo.ensure_data()
    args.c100_root = many_classes(os.path.join(demo.cache_dir(), "demo-c100-v1"))
    args.seg_init = demo.ensure_teacher(SEG_BACKBONE) if any(r[0] == "seg_pretrained" for r in RUNS if
                                                            not args.runs or f"{r[0]}/{r[1]}" in args.runs) else None
    jobs = [command(args, regime, name, extra, seed) for regime, name, extra in RUNS
            if not args.runs or f"{regime}/{name}" in args.runs for seed in range(args.seeds)]
    jobs.sort(key=lambda job: (RUNS.index(next(r for r in RUNS if job[0].split(os.sep)[-3:-1] == [r[0], r[1]]))
                               // 5, int(job[0][-1])))
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(execute, jobs))


if __name__ == "__main__":
    main()
