"""FKD vs online KD vs plain cross-entropy on the demo set, equal epochs, several seeds.

    python tests/benchmarks/fkd_demo_compare.py --seeds 0 1 2

Runs `fkd.py --data demo --mode {fkd,online,ce}` per seed (same student, schedule and crop
pipeline), prints a table of final top-1 (mean +- std) and wall time, and writes JSON.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--modes", nargs="+", default=["fkd", "online", "ce"])
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "fkd_demo_compare"))
    p.add_argument("extra", nargs="*", help="extra fkd.py flags after --")
    args = p.parse_args()
    results = {}
    for mode in args.modes:
        for seed in args.seeds:
            out = os.path.join(args.out, f"{mode}_seed{seed}")
            start = time.time()
            subprocess.run([sys.executable, "fkd.py", "--data", "demo", "--mode", mode, "--seed", str(seed),
                            "--out", out, "--overwrite", *args.extra], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL)
            with open(os.path.join(out, "summary.json")) as f:
                summary = json.load(f)
            results.setdefault(mode, []).append({"seed": seed, "top1": summary["final"]["val_top1"],
                                                 "teacher_top1": summary["teacher_top1"],
                                                 "train_time": summary["train_time"], "wall": time.time() - start})
            print(f"{mode} seed {seed}: top-1 {summary['final']['val_top1']:.2f}%", flush=True)
    print(f"\n{'mode':8} {'top-1 mean':>10} {'std':>6} {'train s':>8}   seeds {args.seeds}")
    for mode, rows in results.items():
        tops = [r["top1"] for r in rows]
        print(f"{mode:8} {statistics.mean(tops):10.2f} {statistics.pstdev(tops):6.2f} "
              f"{statistics.mean(r['train_time'] for r in rows):8.1f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
