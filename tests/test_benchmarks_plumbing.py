"""The plumbing of tests/benchmarks/evidence.py and plot_metrics.py, on tiny settings.

The full benchmark (hours of CPU) is not part of the suite; these tests keep its commands, run
skipping, curve reading, statistics, tables and figures from rotting.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def load(name):
    path = os.path.join(ROOT, "tests", "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


evidence = load("evidence")
plot_metrics = load("plot_metrics")


def write_run(folder, method, run, seed, curves, summary=None, flags=()):
    """A finished run as evidence.py leaves it: {sub-folder: [(epoch, val_top1)]}, a done marker."""
    out = os.path.join(folder, method, run, f"seed{seed}")
    for sub, points in curves.items():
        os.makedirs(os.path.join(out, sub), exist_ok=True)
        with open(os.path.join(out, sub, "metrics.jsonl"), "w") as f:
            for epoch, top1 in points:
                f.write(json.dumps({"epoch": epoch, "val_top1": top1, "train_time": 1.5}) + "\n")
    if summary:
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f)
    with open(os.path.join(out + ".done.json"), "w") as f:
        json.dump({"command": ["x.py"], "flags": list(flags), "wall": 10.0}, f)


def test_statistics_tables_and_figure_from_finished_runs(tmp_path, capsys):
    out = tmp_path / "ev"
    for seed, (bake, vanilla) in enumerate([(60.0, 55.0), (70.0, 71.0)]):
        write_run(out, "bake", "bake", seed,
                  {"bake": [(1, 40.0), (2, bake)], "baseline": [(1, 30.0), (2, 50.0)]})
        write_run(out, "bake", "vanilla_sampler", seed, {"bake": [(1, 35.0), (2, vanilla)]})
    # a resumed run appends the epoch again: the later line counts
    with open(out / "bake" / "bake" / "seed1" / "bake" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "val_top1": 72.0}) + "\n")
    evidence.main(["--method", "bake", "--seeds", "0", "1", "--out", str(out), "--plot-only"])
    result = json.load(open(str(out) + ".json"))["methods"]["bake"]
    bake = result["series"]["BAKE (lambda 1, M 1)"]
    assert bake["seeds"]["1"]["epochs"] == [1, 2] and bake["seeds"]["1"]["final"] == 72.0
    assert bake["final_mean"] == pytest.approx(66.0)
    assert bake["final_std"] == pytest.approx(8.485, abs=1e-3)  # sample std
    assert bake["seeds"]["0"]["train_time"] == 3.0 and bake["seeds"]["0"]["wall"] == 10.0
    vs_vanilla = next(c for c in result["comparisons"] if c["control"].startswith("vanilla"))
    assert vs_vanilla["diff"] == {"0": 5.0, "1": 1.0} and vs_vanilla["wins"] == 2
    assert vs_vanilla["mean"] == pytest.approx(3.0)
    assert "baseline, 2x epochs (same images)" not in result["series"]  # not run: absent, not zero
    report = open(str(out) + ".md").read()
    assert "| BAKE (lambda 1, M 1) | **66.00 ± 8.49** | 60.0 / 72.0 | - |" in report
    assert "**+3.00 ± 2.83** | +5.0 / +1.0 | 2 of 2 seeds |" in report
    assert os.path.getsize(str(out) + ".png") > 1000
    # the 2x-epochs baseline takes its budget from the finished BAKE run
    runs = evidence.PLANS["bake"]()[0]
    assert evidence.epochs_of(str(out), "bake", runs, 0)("bake") == 2
    assert evidence.epochs_of(str(out), "bake", runs, 1)("bake") == 2


def test_band_over_seeds():
    curves = [([1, 2, 3], [10.0, 20.0, 30.0]), ([1, 2], [14.0, 16.0])]
    epochs, mean, low, high = plot_metrics.band(curves)
    assert (epochs, mean, low, high) == ([1, 2], [12.0, 18.0], [10.0, 16.0], [14.0, 20.0])


def test_benchmark_runs_skips_and_plots_on_tiny_data(tiny_data, tiny_teacher, tmp_path, capsys,
                                                       monkeypatch):
    """Two real runs of the FKD plan (1 seed, 2 epochs, tiny data), then a rerun that skips both."""
    out = tmp_path / "ev"
    tiny = (f"fkd.py=--teacher {tiny_teacher} --arch test_efficientnet --input-size 32 "
            "--batch-size 8 --num-crops 2 --k 2 --epochs 2 --workers 0")
    argv = ["--method", "fkd", "--runs", "online", "ce", "--seeds", "0", "--data", tiny_data,
            "--out", str(out), "--script-flags", tiny]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    evidence.main(argv)
    result = json.load(open(str(out) + ".json"))["methods"]["fkd"]
    assert set(result["series"]) == {"online KD, teacher every step", "plain CE"}
    for entry in result["series"].values():
        assert entry["seeds"]["0"]["epochs"][-1] == 2 and 0 <= entry["final_mean"] <= 100
    (comparison,) = result["comparisons"]
    assert comparison["control"] == "plain CE" and comparison["seeds"] == 1
    capsys.readouterr()
    evidence.main(argv)  # finished runs with the same command are not run again
    assert capsys.readouterr().out.count("finished earlier, skipped") == 2
    png = tmp_path / "runs.png"
    plot_metrics.main([f"online={out}/fkd/online/seed0", f"ce={out}/fkd/ce/seed0/metrics.jsonl",
                       "--key", "val_top1", "--key", "train_loss", "-o", str(png)])
    assert png.stat().st_size > 1000
    with pytest.raises(SystemExit, match="does not exist"):
        plot_metrics.main([str(tmp_path / "nothing"), "-o", str(png)])


def test_a_killed_run_continues_from_its_checkpoint(tmp_path, monkeypatch):
    args = evidence.parse_args(["--method", "frskd", "--seeds", "0", "--out", str(tmp_path / "ev")])
    runs = evidence.PLANS["frskd"]()[0]
    out, marker, _ = evidence.run_paths(args.out, "frskd", runs[0], 0)
    os.makedirs(os.path.join(out, "frskd"))
    open(os.path.join(out, "frskd", "last.pth"), "w").close()  # killed mid-run: no done marker
    launched, real_run = [], subprocess.run

    def fake_run(cmd, **kwargs):  # the method file's command is recorded, not run
        if cmd[0] != sys.executable:
            return real_run(cmd, **kwargs)
        launched.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)
    monkeypatch.setattr(evidence.subprocess, "run", fake_run)
    assert evidence.execute(args, "frskd", runs[0], runs, 0)
    assert launched[-1][-2:] == ["--resume", "auto"] and "--overwrite" not in launched[-1]
    done = json.load(open(marker))
    assert done["resumed"] is True and "--overwrite" in done["command"]  # the command it stands for
    assert evidence.execute(args, "frskd", runs[0], runs, 0) and len(launched) == 1  # finished: skipped
    os.remove(marker)  # a checkpoint left by another command is started over, not continued
    with open(marker.replace(".done.json", ".started.json"), "w") as f:
        json.dump({"command": ["frskd.py", "--epochs", "3"]}, f)
    assert evidence.execute(args, "frskd", runs[0], runs, 0)
    assert "--overwrite" in launched[-1] and "--resume" not in launched[-1]


def test_unknown_run_name_is_one_sentence(capsys):
    with pytest.raises(SystemExit):
        evidence.main(["--method", "fkd", "--runs", "fkdd", "--plot-only"])
    assert "--runs fkdd: not in the plan of fkd" in capsys.readouterr().err
