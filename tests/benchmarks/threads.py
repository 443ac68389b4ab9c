"""Thread policy on a shared machine: label generation and a training epoch, idle and beside busy cores.

    python tests/benchmarks/threads.py                 # CPU, about 6 minutes on 2 cores
    python tests/benchmarks/threads.py --busy 0 1 --policies default omp1

For each number of busy cores beside the run (pure-Python spin loops started a second before and
stopped after) and each thread policy, runs `fkd.py --data demo --mode label` on a fresh store
(--stored-crops crops per image) and one `--mode ce` training epoch, interleaved, and reads the
crops/s each prints. Policies: `default` (the project's: idle cores at start), `omp1`
(OMP_NUM_THREADS=1), `all` (OMP_NUM_THREADS = every core: torch's own default). Prints a table of
crops/s and of each cell's ratio to the same policy idle (a fair share of one busy core beside a
2-core run is 0.5), and writes JSON to --json. Uses the demo cache (KD_DEMO_CACHE): data and
teacher are built first if missing.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def policy_env(policy):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if policy == "omp1":
        env["OMP_NUM_THREADS"] = "1"
    elif policy == "all":
        env["OMP_NUM_THREADS"] = str(len(os.sched_getaffinity(0)))
    return dict(env, PYTHONPATH=ROOT)


def fkd(args, env):
    result = subprocess.run([sys.executable, "fkd.py", "--data", "demo", "--device", "cpu", *args], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode:
        raise SystemExit(f"fkd.py {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return result.stdout


def measure(kind, policy, work, crops):
    env = policy_env(policy)
    if kind == "label":
        out = fkd(["--mode", "label", "--labels", os.path.join(work, f"labels-{time.time_ns()}"),
                   "--stored-crops", str(crops)], env)
        return float(re.search(r"\(([\d.]+) crops/s\)", out).group(1)), out
    run = os.path.join(work, f"ce-{time.time_ns()}")
    out = fkd(["--mode", "ce", "--epochs", "1", "--num-crops", "1", "--out", run], env)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        record = json.loads(f.readline())
    return record["train_crops"] / record["train_time"], out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2], help="busy cores beside the run")
    p.add_argument("--policies", nargs="+", default=["default", "omp1", "all"])
    p.add_argument("--kinds", nargs="+", default=["label", "train"])
    p.add_argument("--stored-crops", type=int, default=4, help="crops per image of the label runs")
    p.add_argument("--json", default=os.path.join(ROOT, "runs", "benchmarks", "threads.json"))
    args = p.parse_args()
    fkd(["--mode", "label", "--stored-crops", "1", "--num-crops", "1", "--labels", tempfile.mkdtemp() + "/warm"],
        policy_env("default"))  # builds the demo set and teacher once
    results, lines = {}, {}
    with tempfile.TemporaryDirectory() as work:
        for busy in args.busy:
            spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
            time.sleep(1.0)
            try:
                for kind in args.kinds:
                    for policy in args.policies:
                        rate, out = measure(kind, policy, work, args.stored_crops)
                        results[f"{kind}/{policy}/{busy}"] = rate
                        lines[policy] = next((l for l in out.splitlines() if l.startswith("threads:")), "")
                        print(f"{kind:5s} {policy:7s} busy {busy}: {rate:7.1f} crops/s", flush=True)
            finally:
                for s in spinners:
                    s.kill()
    cores = len(os.sched_getaffinity(0))
    print(f"\n{cores} cores; crops/s, and (ratio to the same policy idle)")
    print("| kind | policy | " + " | ".join(f"{b} busy" for b in args.busy) + " |")
    print("|---|---|" + "---|" * len(args.busy))
    for kind in args.kinds:
        for policy in args.policies:
            idle = results.get(f"{kind}/{policy}/0")
            cells = [f"{results[f'{kind}/{policy}/{b}']:.0f}" + (f" ({results[f'{kind}/{policy}/{b}'] / idle:.2f})"
                                                                 if idle and b else "") for b in args.busy]
            print(f"| {kind} | {policy} | " + " | ".join(cells) + " |")
    for policy, line in lines.items():
        print(f"{policy}: {line}")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"cores": cores, "results": results, "thread_lines": lines}, f, indent=1)


if __name__ == "__main__":
    main()
