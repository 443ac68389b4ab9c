"""Demo results over several seeds for bake.py, frskd.py or meal_v2.py (method vs its baseline).

    python tests/benchmarks/demo_seeds.py --method bake --seeds 0 1 2
    python tests/benchmarks/demo_seeds.py --method frskd
    python tests/benchmarks/demo_seeds.py --method meal_v2 -- --labels runs/meal_v2_demo_labels

Runs `METHOD.py --data demo --seed S` per seed (the demo trains the method and its baseline with
the same epochs; MEAL V2 reports its student before and after and the teachers' ensemble), then
prints final top-1 mean +- std per run and writes JSON next to the runs.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def top1_of(method, summary):
    if method == "meal_v2":
        return {"student init": summary["init_top1"], "meal_v2": summary["final"]["val_top1"],
                "teacher ensemble": summary["ensemble_top1"]}, {"meal_v2": summary["train_time"]}
    tops = {name: run["final"]["val_top1"] for name, run in summary.items()}
    if "val_self_teacher_top1" in summary.get("frskd", {}).get("final", {}):
        tops["frskd self-teacher"] = summary["frskd"]["final"]["val_self_teacher_top1"]
    return (tops,
            {name: run["train_time"] for name, run in summary.items()})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--method", required=True, choices=["bake", "frskd", "meal_v2"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", help="default runs/demo_seeds/METHOD")
    p.add_argument("extra", nargs="*", help="extra flags for the method file, after --")
    args = p.parse_args()
    out_root = args.out or os.path.join(ROOT, "runs", "demo_seeds", args.method)
    tops, times = {}, {}
    for seed in args.seeds:
        out = os.path.join(out_root, f"seed{seed}")
        subprocess.run([sys.executable, f"{args.method}.py", "--data", "demo", "--seed", str(seed), "--out", out,
                        "--overwrite", *args.extra], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(out, "summary.json")) as f:
            seed_tops, seed_times = top1_of(args.method, json.load(f))
        for name, value in seed_tops.items():
            tops.setdefault(name, []).append(value)
        for name, value in seed_times.items():
            times.setdefault(name, []).append(value)
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.2f}%" for k, v in seed_tops.items()), flush=True)
    print(f"\n{args.method} demo, seeds {args.seeds}, flags {args.extra}")
    print(f"{'run':18} {'top-1 mean':>10} {'std':>6} {'train s':>8}")
    for name, values in tops.items():
        seconds = f"{statistics.mean(times[name]):8.0f}" if name in times else f"{'':8}"
        print(f"{name:18} {statistics.mean(values):10.2f} {statistics.pstdev(values):6.2f} {seconds}")
    os.makedirs(out_root, exist_ok=True)
    with open(os.path.join(out_root, "results.json"), "w") as f:
        json.dump({"seeds": args.seeds, "extra": args.extra, "top1": tops, "train_time": times}, f, indent=1)


if __name__ == "__main__":
    main()
