"""Evidence at equal budget: each method against its fair controls on the demo set, over seeds.

    python tests/benchmarks/evidence.py                      # all four methods, seeds 0 1 2
    python tests/benchmarks/evidence.py --method fkd --seeds 0 1 2
    python tests/benchmarks/evidence.py --method bake --runs bake vanilla_sampler
    python tests/benchmarks/evidence.py --plot-only          # tables and figure from finished runs

Every run is one command of a method file, `SCRIPT --data demo --seed S --out
OUT/METHOD/RUN/seedS --overwrite FLAGS`, so any run can be repeated by hand; the plans below list
the commands and the budget each comparison holds equal. Curves come from each run's
OUT/metrics.jsonl (`val_top1` per epoch; `val_self_teacher_top1` for FRSKD's self-teacher).

Runs go seed by seed (every run of seed 0, then seed 1, ...), so an interrupted benchmark already
holds paired results. A finished run leaves OUT/METHOD/RUN/seedS.done.json (its command and wall
time); called again with the same command, the benchmark skips it and continues where it stopped.
A failed run is reported with the tail of its log (seedS.log next to it) and the others go on.

Writes OUT.json (default runs/benchmarks/evidence.json: every curve, final top-1 per seed, mean
and sample std over seeds, training and wall time, and per comparison the per-seed paired
difference), OUT.png (per method: mean curve and min-max band over seeds for the method and each
control) and OUT.md (the tables). `--data DIR` replaces the demo set and `--script-flags
'fkd.py=--epochs 2 ...'` appends flags to every command of one method file (the plumbing test
runs the benchmark on tiny data that way).
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import plot_metrics  # noqa: E402  (the same curve code plots any run's metrics.jsonl)

SCRIPTS = ("fkd.py", "bake.py", "meal_v2.py", "frskd.py")
TITLES = {"fkd": "FKD (fkd.py)", "bake": "BAKE (bake.py)", "meal_v2": "MEAL V2 (meal_v2.py)",
          "frskd": "FRSKD (frskd.py)"}


class Run:
    """One command per seed.

    flags(env) -> the command's own flags; env holds seed, folder (the method's folder) and
    epochs_of(name) (the last epoch of another run of the same seed: a budget taken from it).
    series: curve label -> (sub-folders of OUT to look in, in order; metric key).
    references: label -> (sub-folders; key of OUT/summary.json), flat lines on the figure.
    A run without series prepares something (a label store); its wall time is reported.
    """

    def __init__(self, name, script, flags, series=None, references=None, note=None):
        self.name, self.script, self.flags = name, script, flags
        self.series, self.references, self.note = series or {}, references or {}, note


class Comparison:
    def __init__(self, run, control, budget):
        self.run, self.control, self.budget = run, control, budget


def store_of(env):
    return os.path.join(env["folder"], "labels", f"seed{env['seed']}", "store")


def fkd_plan():
    fkd, online, ce = "FKD, stored labels", "online KD, teacher every step", "plain CE"
    runs = [
        Run("labels", "fkd.py", lambda env: ["--mode", "label", "--labels", store_of(env)],
            note="labelling, once per store"),
        Run("fkd", "fkd.py", lambda env: ["--mode", "fkd", "--labels", store_of(env)],
            {fkd: (("",), "val_top1")}, {"teacher": (("",), "teacher_top1")}),
        Run("online", "fkd.py", lambda env: ["--mode", "online"], {online: (("",), "val_top1")}),
        Run("ce", "fkd.py", lambda env: ["--mode", "ce"], {ce: (("",), "val_top1")}),
    ]
    same = "student, crops per step, pass plan, epochs, steps, lr schedule"
    return runs, [Comparison(fkd, online, same), Comparison(fkd, ce, same),
                  Comparison(online, ce, same)]


def bake_plan():
    bake, vanilla = "BAKE (lambda 1, M 1)", "vanilla, same sampler (lambda 0, M 1)"
    double, same_epochs = "baseline, 2x epochs", "baseline, same epochs"
    runs = [
        Run("bake", "bake.py", lambda env: [],  # the demo also trains the baseline, same epochs
            {bake: (("bake", ""), "val_top1"), same_epochs: (("baseline",), "val_top1")}),
        Run("vanilla_sampler", "bake.py", lambda env: ["--lam", "0", "--per-class", "1"],
            {vanilla: (("bake", ""), "val_top1")}),
        Run("baseline_2x", "bake.py",
            lambda env: ["--baseline", "--epochs", str(2 * env["epochs_of"]("bake"))],
            {double: (("",), "val_top1")}),
    ]
    return runs, [
        Comparison(bake, vanilla, "sampler, images per step, steps, epochs, schedule: only the "
                                  "ensembled KD term differs"),
        Comparison(bake, double, "images seen (a BAKE epoch = anchors + same-class companions); "
                                 "the baseline takes twice the steps at its half batch"),
        Comparison(bake, same_epochs, "epochs and steps; the baseline's batch is half (the paper's "
                                      "vanilla batch): half the images"),
    ]


def meal_plan():
    online, fast = "MEAL V2, online teachers", "Fast MEAL V2, stored labels"
    online_nd, fast_nd = "online, no discriminator", "Fast, no discriminator"
    ce = "CE fine-tuning, no teachers"
    teachers = ["--teacher", "test_resnet", "--teacher", "test_efficientnet"]
    runs = [
        Run("online", "meal_v2.py", lambda env: [], {online: (("",), "val_top1")},
            {"student init": (("",), "init_top1"), "teacher ensemble": (("",), "ensemble_top1")}),
        Run("ce", "meal_v2.py", lambda env: ["--no-teachers"], {ce: (("",), "val_top1")}),
        Run("online_no_disc", "meal_v2.py", lambda env: ["--no-disc"],
            {online_nd: (("",), "val_top1")}),
        Run("labels", "fkd.py",
            lambda env: ["--mode", "label", "--codec", "full", *teachers, "--labels", store_of(env)],
            note="labelling with the ensemble, once per store"),
        Run("fast", "meal_v2.py", lambda env: ["--labels", store_of(env)],
            {fast: (("",), "val_top1")}),
        Run("fast_no_disc", "meal_v2.py", lambda env: ["--labels", store_of(env), "--no-disc"],
            {fast_nd: (("",), "val_top1")}),
    ]
    same = "init, student, epochs, steps, lr schedule"
    return runs, [Comparison(online, ce, same), Comparison(fast, online, same),
                  Comparison(online, online_nd, same), Comparison(fast, fast_nd, same)]


def frskd_plan():
    classifier, teacher = "FRSKD classifier (demo: warm-up)", "FRSKD self-teacher (demo: warm-up)"
    official, baseline = "FRSKD classifier, official default (no warm-up)", "baseline (plain CE)"
    runs = [Run("frskd", "frskd.py", lambda env: [],  # the demo also trains the baseline
                {classifier: (("frskd",), "val_top1"),
                 teacher: (("frskd",), "val_self_teacher_top1"),
                 baseline: (("baseline",), "val_top1")}),
            Run("frskd_official", "frskd.py", lambda env: ["--warmup-epochs", "0"],
                {official: (("frskd",), "val_top1")})]
    same = "classifier, epochs, steps, lr schedule"
    return runs, [Comparison(classifier, baseline, same), Comparison(official, baseline, same),
                  Comparison(teacher, baseline, "epochs (the self-teacher is an extra network)")]


PLANS = {"fkd": fkd_plan, "bake": bake_plan, "meal_v2": meal_plan, "frskd": frskd_plan}


# ------------------------------------------------------------------------------------- running

def run_paths(out_root, method, run, seed):
    """(the run's OUT, its done marker, its log) for one seed."""
    folder = os.path.join(out_root, method, run.name)
    return tuple(os.path.join(folder, f"seed{seed}{ext}") for ext in ("", ".done.json", ".log"))


def interrupted(run, out, marker):
    """Whether OUT holds a checkpoint of this run that did not finish (continue it, not redo it)."""
    subs = {s for subs, _ in run.series.values() for s in subs} | {""}
    return any(os.path.isfile(os.path.join(out, sub, "last.pth")) for sub in subs) and \
        read_done(marker) is None


def read_done(marker):
    try:
        with open(marker) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def locate(out, subs, name):
    for sub in subs:
        if os.path.isfile(os.path.join(out, sub, name)):
            return os.path.join(out, sub, name)
    return None


def epochs_of(out_root, method, runs, seed):
    def lookup(name):
        run = next(r for r in runs if r.name == name)
        out, marker, _ = run_paths(out_root, method, run, seed)
        subs = next(iter(run.series.values()))[0]
        path = locate(out, subs, "metrics.jsonl") if read_done(marker) else None
        if path is None:
            raise SystemExit(f"error: run '{name}' of {method}, seed {seed} must finish first (this "
                             f"run's budget comes from it); include it in --runs")
        return plot_metrics.read_metrics(path)[-1]["epoch"]
    return lookup


def command(args, method, run, runs, seed):
    """(the full command, the run's own flags) for one seed."""
    out, _, _ = run_paths(args.out, method, run, seed)
    env = {"seed": seed, "folder": os.path.join(args.out, method),
           "epochs_of": epochs_of(args.out, method, runs, seed)}
    flags = run.flags(env) + shlex.split(args.script_flags.get(run.script, ""))
    return [sys.executable, run.script, "--data", args.data, "--seed", str(seed), "--out", out,
            "--overwrite", *flags], flags


def code_version(script):
    """The commit the method file ran from, "+modified" when it or common/ differed from it."""
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", script, "common"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+modified" if changed else "")


def finals_line(run, out):
    finals = []
    for label, (subs, key) in run.series.items():
        path = locate(out, subs, "metrics.jsonl")
        _, values = plot_metrics.curve(plot_metrics.read_metrics(path), key) if path else ([], [])
        finals.append(f"{label} {values[-1]:.2f}%" if values else f"{label}: no {key}")
    return ": " + ", ".join(finals) if finals else ""


def execute(args, method, run, runs, seed):
    """Run one command unless it finished before with the same command; True when it ran fine."""
    out, marker, log = run_paths(args.out, method, run, seed)
    cmd, flags = command(args, method, run, runs, seed)
    tag = f"[{method} seed {seed}] {run.name}"
    done = read_done(marker)
    if done is not None and done.get("command") == cmd[1:]:
        print(f"{tag}: finished earlier, skipped", flush=True)
        return True
    if os.path.exists(marker):
        os.remove(marker)
    started_path = marker.replace(".done.json", ".started.json")
    resume = interrupted(run, out, marker) and read_done(started_path) in (None, {"command": cmd[1:]})
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(started_path, "w") as f:
        json.dump({"command": cmd[1:]}, f)
    for sub in {s for subs, _ in run.series.values() for s in subs} | {""}:
        if os.path.isfile(os.path.join(out, sub, "summary.json")):  # of an earlier command
            os.remove(os.path.join(out, sub, "summary.json"))
    # a run killed before it finished continues from its checkpoint
    launch = [c for c in cmd if c != "--overwrite"] + ["--resume", "auto"] if resume else cmd
    print(f"{tag}: " + " ".join(shlex.quote(c) for c in ["python"] + launch[1:]), flush=True)
    start = time.time()
    with open(log, "a" if resume else "w") as f:
        result = subprocess.run(launch, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    wall = time.time() - start
    if result.returncode != 0:
        with open(log) as f:
            tail = f.read()[-2000:]
        print(f"{tag}: FAILED (exit {result.returncode}) after {wall:.0f}s; {log}:\n{tail}",
              flush=True)
        return False
    with open(marker, "w") as f:
        json.dump({"command": cmd[1:], "flags": flags, "wall": wall, "resumed": resume,
                   "code": code_version(run.script),
                   "finished": datetime.datetime.now().isoformat(timespec="seconds"),
                   "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}, f, indent=1)
    print(f"{tag}: done in {wall:.0f}s{finals_line(run, out)}", flush=True)
    return True


# ----------------------------------------------------------------------------------- collecting

def mean_std(values):
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def short_command(script, data, flags):
    """`python SCRIPT --data DATA FLAGS` (no seed, no out), paths relative to the repository."""
    runs = os.path.realpath(os.path.join(ROOT, "runs"))

    def show(arg):
        if not os.path.isabs(arg):
            return arg
        if arg.startswith(runs + os.sep):  # runs/ may be a link to another checkout's runs/
            return os.path.join("runs", os.path.relpath(arg, runs))
        return os.path.relpath(arg, ROOT)
    return " ".join(shlex.quote(show(c)) for c in ["python", script, "--data", data, *flags])


def total(records, *keys):
    """Sum over epochs of the first of `keys` the records log (None when they log none)."""
    for key in keys:
        if any(key in r for r in records):
            return sum(r.get(key, 0) for r in records)
    return None


def collect(args, method):
    """Curves, finals, times, references and paired differences of one method's finished runs."""
    runs, comparisons = PLANS[method]()
    series, references, steps = {}, {}, {}
    for run in runs:
        for seed in args.seeds:
            out, marker, _ = run_paths(args.out, method, run, seed)
            done = read_done(marker)
            if done is None:
                continue
            short = short_command(run.script, args.data, done.get("flags", []))
            if not run.series:
                step = steps.setdefault(run.note or run.name, {"command": short, "wall": {}})
                step["wall"][str(seed)] = done["wall"]
            for label, (subs, key) in run.series.items():
                path = locate(out, subs, "metrics.jsonl")
                records = plot_metrics.read_metrics(path) if path else []
                epochs, values = plot_metrics.curve(records, key)
                if values:
                    entry = series.setdefault(label, {"run": run.name, "key": key, "seeds": {}})
                    entry["seeds"][str(seed)] = {
                        "epochs": epochs, "top1": values, "final": values[-1], "best": max(values),
                        "train_time": sum(r.get("train_time", 0.0) for r in records),
                        "images": total(records, "train_images", "train_crops"),
                        "steps": total(records, "train_steps"),
                        "wall": done["wall"], "resumed": done.get("resumed", False),
                        "command": short, "code": done.get("code")}
            for label, (subs, key) in run.references.items():
                path = locate(out, subs, "summary.json")
                value = json.load(open(path)).get(key) if path else None
                if value is not None:
                    references.setdefault(label, {})[str(seed)] = value
    for entry in series.values():
        finals = [s["final"] for s in entry["seeds"].values()]
        entry["final_mean"], entry["final_std"] = mean_std(finals)
    results = []
    for c in comparisons:
        if c.run not in series or c.control not in series:
            continue
        a, b = series[c.run]["seeds"], series[c.control]["seeds"]
        diff = {seed: a[seed]["final"] - b[seed]["final"] for seed in a if seed in b}
        if diff:
            mean, std = mean_std(list(diff.values()))
            results.append({"run": c.run, "control": c.control, "budget": c.budget, "diff": diff,
                            "mean": mean, "std": std, "wins": sum(d > 0 for d in diff.values()),
                            "seeds": len(diff)})
    return {"series": series, "references": references, "steps": steps, "comparisons": results}


def fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def mean_pm_std(mean, std, count, sign=""):
    """"m ± s" over seeds; one seed has no spread to show."""
    return f"{mean:{sign}.2f} ± {std:.2f}" if count > 1 else f"{mean:{sign}.2f} (1 seed)"


def tables(method, result, seeds):
    """Markdown: final top-1 per run (mean ± std, per seed, times), then the paired comparisons."""
    per = " / ".join(str(s) for s in seeds)
    codes = sorted({r.get("code") or "?" for e in result["series"].values() for r in e["seeds"].values()})
    lines = [f"### {TITLES[method]}, code at commit {', '.join(codes)}", "",
             f"| run | final top-1, mean ± std | per seed ({per}) | images (steps) | train s | wall s "
             "| command |", "|---|---|---|---|---|---|---|"]
    for label, entry in result["series"].items():
        runs = list(entry["seeds"].values())
        per_seed = " / ".join(fmt(entry["seeds"].get(str(s), {}).get("final"), 1) for s in seeds)
        train = statistics.mean(r["train_time"] for r in runs)
        wall = f"{statistics.mean(r['wall'] for r in runs):.0f}"
        wall += " (resumed: last part)" if any(r.get("resumed") for r in runs) else ""
        images, steps = runs[0].get("images"), runs[0].get("steps")
        budget = "-" if images is None else f"{images:,}" + ("" if steps is None else f" ({steps:,})")
        spread = mean_pm_std(entry["final_mean"], entry["final_std"], len(runs))
        lines.append(f"| {label} | **{spread}** | "
                     f"{per_seed} | {budget} | {train:.0f} | {wall} | `{runs[0]['command']}` |")
    for label, values in result["references"].items():
        mean, std = mean_std(list(values.values()))
        per_seed = " / ".join(fmt(values.get(str(s)), 1) for s in seeds)
        lines.append(f"| ({label}) | {mean_pm_std(mean, std, len(values))} | {per_seed} | | | | |")
    for label, step in result.get("steps", {}).items():
        wall = statistics.mean(step["wall"].values())
        lines.append(f"| ({label}) | | | | | {wall:.0f} | `{step['command']}` |")
    if result["comparisons"]:
        lines += ["", "| comparison | budget held equal | paired difference, mean ± std | "
                      f"per seed ({per}) | ahead on |", "|---|---|---|---|---|"]
        for c in result["comparisons"]:
            per_seed = " / ".join(f"{c['diff'][str(s)]:+.1f}" if str(s) in c["diff"] else "-"
                                  for s in seeds)
            lines.append(f"| {c['run']} vs {c['control']} | {c['budget']} | "
                         f"**{mean_pm_std(c['mean'], c['std'], c['seeds'], '+')}** | {per_seed} | "
                         f"{c['wins']} of {c['seeds']} seeds |")
    return "\n".join(lines)


def figure(evidence, path):
    """One panel per method: mean curve and min-max band over seeds per run; references dashed."""
    methods = [m for m in PLANS if evidence["methods"].get(m, {}).get("series")]
    if not methods:
        return False
    columns = min(2, len(methods))
    rows = (len(methods) + columns - 1) // columns
    fig, axes = plot_metrics.new_figure(columns, width=6.4, height=4.2, rows=rows)
    for ax, method in zip(axes, methods):
        result = evidence["methods"][method]
        for label, entry in result["series"].items():
            curves = [(s["epochs"], s["top1"]) for s in entry["seeds"].values()]
            plot_metrics.draw(ax, curves, label)
        for label, values in result["references"].items():
            level = statistics.mean(values.values())
            ax.axhline(level, ls="--", lw=1, color="gray")
            ax.annotate(f"{label} {level:.1f}", (0.01, level), xycoords=("axes fraction", "data"),
                        fontsize=7, color="gray", va="bottom")
        seeds = sorted({s for e in result["series"].values() for s in e["seeds"]}, key=int)
        ax.set_title(f"{TITLES[method]}, seeds {', '.join(seeds)}", fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("val top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes[len(methods):]:
        ax.set_visible(False)
    plot_metrics.save(fig, path, dpi=80)
    return True


def machine():
    import torch
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "python": platform.python_version(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", nargs="+", choices=list(PLANS), default=list(PLANS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs", nargs="+", help="only these runs of the plans (default: all)")
    p.add_argument("--data", default="demo", help="data set of every run (default: the demo set)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "benchmarks", "evidence"),
                   help="runs go to OUT/METHOD/RUN/seedS; results to OUT.json, OUT.png, OUT.md")
    p.add_argument("--script-flags", action="append", default=[], metavar="SCRIPT=FLAGS",
                   help="extra flags for every command of SCRIPT ('fkd.py=--epochs 2'); repeatable")
    p.add_argument("--plot-only", action="store_true",
                   help="run nothing; tables and figure from the finished runs")
    args = p.parse_args(argv)
    args.out = os.path.realpath(args.out)  # the same runs whichever checkout (or link) runs them
    flags = {}
    for item in args.script_flags:
        script, sep, value = item.partition("=")
        if not sep or script not in SCRIPTS:
            p.error(f"--script-flags {item!r}: expected SCRIPT=FLAGS, SCRIPT one of {', '.join(SCRIPTS)}")
        flags[script] = (flags.get(script, "") + " " + value).strip()
    args.script_flags = flags
    known = {run.name for method in args.method for run in PLANS[method]()[0]}
    if args.runs and not set(args.runs) <= known:
        p.error(f"--runs {' '.join(sorted(set(args.runs) - known))}: not in the plan of "
                f"{' '.join(args.method)} (runs: {', '.join(sorted(known))})")
    return args


def main(argv=None):
    args = parse_args(argv)
    failed = []
    if not args.plot_only:
        for method in args.method:
            runs = PLANS[method]()[0]
            for seed in args.seeds:
                for run in runs:
                    if (not args.runs or run.name in args.runs) and \
                            not execute(args, method, run, runs, seed):
                        failed.append(f"{method}/{run.name}/seed{seed}")

    path = args.out + ".json"
    evidence = {"methods": {}}
    if os.path.isfile(path):
        with open(path) as f:
            evidence = json.load(f)
    evidence.update(updated=datetime.datetime.now().isoformat(timespec="seconds"), machine=machine())
    for method in PLANS:  # every method with finished runs under OUT, not only this call's
        result = collect(args, method)
        if result["series"]:
            evidence["methods"][method] = dict(result, seeds=args.seeds, data=args.data)
    with open(path, "w") as f:
        json.dump(evidence, f, indent=1)
    report = "\n\n".join(tables(m, evidence["methods"][m], evidence["methods"][m]["seeds"])
                         for m in PLANS if m in evidence["methods"])
    with open(args.out + ".md", "w") as f:
        f.write(report + "\n")
    drew = figure(evidence, args.out + ".png")
    print("\n" + report + f"\n\nwrote {path}, {args.out}.md" + (f", {args.out}.png" if drew else ""))
    if failed:
        raise SystemExit(f"error: {len(failed)} run(s) failed: {', '.join(failed)}; see their logs "
                         f"(OUT/METHOD/RUN/seedS.log) and run the same command again to retry them")


if __name__ == "__main__":
    main()
