"""The Python side of tests/gpu/smoke.sh: one subcommand per job, each a single command line.

    python tests/gpu/smoke_table.py env           # the GPU(s), torch, CUDA; fails without CUDA
    python tests/gpu/smoke_table.py cache         # build the demo cache on the CPU (KD_DEMO_CACHE)
    python tests/gpu/smoke_table.py verify OUT EPOCHS LOG [--world N] [--backend nccl] [--sync-bn]
    python tests/gpu/smoke_table.py table WORK    # every figure as one table (+ WORK/smoke_table.md)

verify: every OUT/**/metrics.jsonl holds epochs up to EPOCHS with finite losses and a validation
score, OUT/summary.json exists, and LOG shows each run DDP-wrapped in a process group of N over
the backend (torch's DDP construction log, printed with TORCH_DISTRIBUTED_DEBUG=INFO and
TORCH_CPP_LOG_LEVEL=INFO: "DDP Initialized with:", then world_size, backend_name, has_sync_bn).
table: reads WORK/checks.txt (smoke.sh's status lines), WORK/runs/NAME (the method runs'
metrics.jsonl and summary.json), WORK/bench/NAME.json (the benchmarks) and WORK/logs/NAME.log.
"""
import argparse
import glob
import json
import math
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def env():
    import torch
    assert torch.cuda.is_available(), "no CUDA GPU visible"
    count = torch.cuda.device_count()
    try:
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:  # a build without NCCL: the dist check says so
        nccl = "none"
    print(f"{torch.cuda.get_device_name(0)}, {count} GPU(s), {os.cpu_count()} CPU cores; torch "
          f"{torch.__version__}, CUDA {torch.version.cuda}, NCCL {nccl}, "
          f"bf16 {torch.cuda.is_bf16_supported()}")
    print(f"gpu_count={count}")


def cache():
    """Everything the smoke's demo runs read from the demo cache, made once on the CPU."""
    sys.path.insert(0, ROOT)
    import fkd
    import meal_v2
    from common import demo
    start = time.time()
    demo.ensure_data()
    demo.ensure_segmentation_data()
    for arch in dict.fromkeys([fkd.DEMO_TEACHER, *meal_v2.DEMO_TEACHERS]):  # FKD's, MEAL V2's teachers
        demo.ensure_teacher(arch)
    demo.ensure_teacher(meal_v2.PRESETS["demo"]["arch"], epochs=meal_v2.DEMO_STUDENT_INIT_EPOCHS)  # student
    size = sum(os.path.getsize(os.path.join(folder, name))
               for folder, _, names in os.walk(demo.cache_dir()) for name in names)
    print(f"demo cache {demo.cache_dir()}: {size / 2**20:.1f} MiB, ready after {time.time() - start:.0f} s")


def records_of(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def score_of(record):
    """(name, value) of a record's validation score: top-1, or mIoU for segmentation."""
    for key, name in (("val_top1", "top-1"), ("val_miou", "mIoU")):
        if key in record:
            return name, record[key]
    return None, None


def verify(out, epochs, log, world, backend, sync_bn):
    paths = sorted(glob.glob(os.path.join(out, "**", "metrics.jsonl"), recursive=True))
    assert paths, f"no metrics.jsonl under {out}"
    for path in paths:
        records = records_of(path)
        done = [r["epoch"] for r in records]
        assert done and done[-1] == epochs and done == sorted(set(done)), \
            f"{path}: epochs {done}, not up to {epochs}"
        assert all(math.isfinite(r["train_loss"]) for r in records), f"{path}: a non-finite train_loss"
        name, value = score_of(records[-1])
        assert name and math.isfinite(value), f"{path}: no finite validation score in the last record"
        print(f"{path}: epochs {done}, val {name} {value:.2f}")
    assert os.path.isfile(os.path.join(out, "summary.json")), f"no summary.json in {out}"
    with open(log, errors="replace") as f:
        text = f.read()
    models = text.count("DDP Initialized with:")
    worlds = set(re.findall(r"^world_size: (\d+)\s*$", text, re.M))
    backends = set(re.findall(r"^backend_name: (\S+)\s*$", text, re.M))
    sync = set(re.findall(r"^has_sync_bn: (\d+)\s*$", text, re.M))
    assert models >= len(paths), (f"{log}: {models} DDP model(s) logged for {len(paths)} run(s): not "
                                  f"wrapped in DDP (KD_DDP=1 under torchrun, TORCH_DISTRIBUTED_DEBUG=INFO,"
                                  f" TORCH_CPP_LOG_LEVEL=INFO?)")
    assert worlds == {str(world)}, f"{log}: DDP world sizes {sorted(worlds)}, expected {world}"
    assert backends == {backend}, f"{log}: DDP backends {sorted(backends)}, expected {backend}"
    assert not sync_bn or "1" in sync, f"{log}: no DDP model holds SyncBatchNorm ({sorted(sync)})"
    print(f"{models} DDP model(s), world size {world}, backend {backend}"
          + (", SyncBatchNorm converted" if sync_bn else ""))


# --- The table ---------------------------------------------------------------------------------
def fmt(value):
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "/".join(fmt(v) for v in value)
    return str(value)


def flat(prefix, value):
    """[(dotted key, value)] of the numbers in a nested benchmark result."""
    if isinstance(value, dict):
        return [item for key, inner in value.items()
                for item in flat(f"{prefix}.{key}" if prefix else key, inner)]
    numbers = value if isinstance(value, list) and value else [value]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
        return [(prefix, value)]
    return []


def batch_of(folder):
    """The global batch a run trained with (its last.pth's flags), or None."""
    try:
        import torch
        state = torch.load(os.path.join(folder, "last.pth"), map_location="cpu", weights_only=True)
        return state["args"]["batch_size"]
    except Exception:
        return None


def run_rows(run):
    """[(sub-run, figures)] of a method run folder: one per metrics.jsonl (the demo's BAKE and
    FRSKD also train their baseline, in OUT/<method> and OUT/baseline)."""
    summary = {}
    if os.path.isfile(os.path.join(run, "summary.json")):
        with open(os.path.join(run, "summary.json")) as f:
            summary = json.load(f)
    rows = []
    for path in sorted(glob.glob(os.path.join(run, "**", "metrics.jsonl"), recursive=True)):
        folder = os.path.dirname(path)
        sub = os.path.relpath(folder, run) if folder != os.path.normpath(run) else "-"
        records, part = records_of(path), summary.get(sub, summary)
        if not records:
            rows.append((sub, "no epochs logged"))
            continue
        first, last = records[0], records[-1]
        name, value = score_of(last)
        best = part.get("best_top1", part.get("best_miou")) if isinstance(part, dict) else None
        figures = [f"val {name} {value:.2f}%" + (f" (best {best:.2f}%)" if best is not None else "")]
        figures += [f"self-teacher {last[key]:.2f}%" for key in ("val_self_teacher_top1",
                                                                 "val_self_teacher_miou") if key in last]
        for key, label in (("teacher_top1", "teacher"), ("ensemble_top1", "teacher ensemble"),
                           ("init_top1", "init")):
            if isinstance(part, dict) and part.get(key) is not None:
                figures.append(f"{label} {part[key]:.2f}%")
        if "crops_per_image" in last:  # FKD, MEAL V2: one record per pass of m crops per image
            ends = [r["epoch"] for r in records]
            spans = [f"{end}" if start + 1 == end else f"{start + 1}-{end}"
                     for start, end in zip([0] + ends, ends)]
            figures.append("epochs " + ", ".join(f"{span} ({r['crops_per_image']} crops/image)"
                                                 for span, r in zip(spans, records)))
        else:
            figures.append(f"epochs {last['epoch']}")
        figures.append(f"epoch s first {first['train_time']:.1f}, last {last['train_time']:.1f}")
        step = last.get("step_time_median")
        if step is None and last.get("train_steps"):
            step = last["train_time"] / last["train_steps"]
        if step is None and last.get("train_crops"):
            batch = batch_of(folder)
            step = last["train_time"] * batch / last["train_crops"] if batch else None
        unit = "crops" if "train_crops" in last else "images"
        count = last.get(f"train_{unit}")
        if count:
            figures.append(f"{count / last['train_time']:.0f} {unit}/s")
        if step is not None:
            figures.append(f"step {1000 * step:.1f} ms (last epoch)")
        rows.append((sub, "; ".join(figures)))
    return rows


def bench_rows(path):
    with open(path) as f:
        results = json.load(f)
    rows = []
    for key, value in results.items():
        if key in ("args", "device", "threads"):
            continue
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, dict) for v in value):
            times, ratios = value  # train_steps.py: (step -> seconds, ratio -> value)
            rows.append((key, ", ".join([f"{step} {1000 * s:.2f} ms" for step, s in times.items()]
                                        + [f"{name} {fmt(v)}" for name, v in ratios.items()])))
        else:
            rows.append((key, ", ".join(f"{k} {fmt(v)}" for k, v in flat("", value))))
    return rows


def log_rows(name, log):
    """Figures a check prints itself: the env line, dist_check.py's one line per check, a label
    generation's rate."""
    if not os.path.isfile(log):
        return []
    with open(log, errors="replace") as f:
        lines = [line.rstrip() for line in f if line.strip()]
    if name == "env":
        return [("-", lines[0])] if lines else []
    checks = [(line[5:].split(":")[0], line[5:].split(":", 1)[-1].strip()) for line in lines
              if re.match(r"(ok  |FAIL) ", line)]
    return checks or [("-", line) for line in lines if "crops/s" in line][-1:]


def table(work):
    checks = []
    if os.path.isfile(os.path.join(work, "checks.txt")):
        with open(os.path.join(work, "checks.txt")) as f:
            for line in f:
                match = re.match(r"(ok|FAIL)\s+(\S+) \((\d+) s[^)]*\)(?:: (.*) \[)?", line)
                if match:
                    checks.append(match.groups())
    out = ["| check | result | s | part | figures |", "|---|---|---|---|---|"]
    for result, name, seconds, why in checks:
        run, bench = os.path.join(work, "runs", name), os.path.join(work, "bench", f"{name}.json")
        rows = run_rows(run) if os.path.isdir(run) else bench_rows(bench) if os.path.isfile(bench) else \
            log_rows(name, os.path.join(work, "logs", f"{name}.log"))
        rows = ([("failed", why)] if why else []) + rows
        for n, (part, figures) in enumerate(rows or [("-", "")]):
            cells = [name, result, seconds] if n == 0 else ["", "", ""]
            out.append("| " + " | ".join(cells + [part, figures.replace("|", "/")]) + " |")
    failed = sum(result == "FAIL" for result, *_ in checks)
    text = "\n".join([f"GPU smoke, {len(checks)} checks, {failed} failed ({work})", ""] + out) + "\n"
    with open(os.path.join(work, "smoke_table.md"), "w") as f:
        f.write(text)
    print(text, end="")
    print(f"(also in {os.path.join(work, 'smoke_table.md')})")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="job", required=True)
    sub.add_parser("env")
    sub.add_parser("cache")
    v = sub.add_parser("verify")
    v.add_argument("out")
    v.add_argument("epochs", type=int)
    v.add_argument("log")
    v.add_argument("--world", type=int, default=1)
    v.add_argument("--backend", default="nccl")
    v.add_argument("--sync-bn", action="store_true", help="at least one DDP model holds SyncBatchNorm")
    t = sub.add_parser("table")
    t.add_argument("work")
    args = p.parse_args()
    if args.job == "verify":
        try:
            verify(args.out, args.epochs, args.log, args.world, args.backend, args.sync_bn)
        except AssertionError as error:
            raise SystemExit(f"verify failed: {error}") from None
    elif args.job == "table":
        table(args.work)
    else:
        {"env": env, "cache": cache}[args.job]()


if __name__ == "__main__":
    main()
