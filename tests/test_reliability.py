"""Faults and bad input across the four method files: kill -9 and resume, NaN, a failing rank,
a full disk, hostile files, and the one-sentence errors for bad flags and data."""
import filecmp
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from common.ckpt import save_atomic
from conftest import ROOT, label_store_ready, make_image_folder, make_teacher, run_script, torchrun

FKD = ["--arch", "test_efficientnet", "--input-size", "32", "--batch-size", "8", "--num-crops", "2",
       "--stored-crops", "4", "--k", "2", "--epochs", "2", "--workers", "0", "--label-batch", "4"]
SMALL = ["--arch", "test_efficientnet", "--input-size", "32", "--batch-size", "8", "--workers", "0",
         "--crop-pct", "1.0"]


def method_args(method, data, teacher, out, *extra):
    """A tiny run of any method file (MEAL V2 with a random student init: no download)."""
    flags = {"fkd": FKD + ["--teacher", teacher], "bake": SMALL, "frskd": ["--arch", "test_resnet", "--input-size", "32",
             "--batch-size", "8", "--workers", "0", "--crop-pct", "1.0", "--milestones", "2"],
             "meal_v2": SMALL + ["--teacher", teacher, "--init", "none", "--lr-drop-epoch", "2"]}[method]
    if method == "fkd":  # the store inside OUT (its default is shared under runs/, in the repository)
        flags = flags + ["--labels", os.path.join(str(out), "labels")]
    return [sys.executable, f"{method}.py", "--data", data, "--out", str(out), *flags, *extra]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def one_sentence_error(result, *needles):
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in result.stderr, result.stderr[-2000:]
    for needle in needles:
        assert needle in last, last
    return last


# ---------------------------------------------------------------------------------------------
# kill -9 during training, then --resume auto: same metrics and weights as an uninterrupted run
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fkd", "bake", "frskd", "meal_v2"])
def test_kill9_during_training_then_resume_matches_uninterrupted(method, tiny_data, tiny_teacher, tmp_path):
    epochs = ["--epochs", "4"]
    run_script(method_args(method, tiny_data, tiny_teacher, tmp_path / "whole", *epochs))
    if method == "fkd":  # share the finished label store, so only training is interrupted
        shutil.copytree(tmp_path / "whole" / "labels", tmp_path / "killed" / "labels")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    process = subprocess.Popen(method_args(method, tiny_data, tiny_teacher, tmp_path / "killed", *epochs), cwd=ROOT,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (log.exists() and log.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    run_script(method_args(method, tiny_data, tiny_teacher, tmp_path / "killed", *epochs, "--resume", "auto"))
    whole, resumed = metrics(tmp_path / "whole"), metrics(tmp_path / "killed")
    assert [r["epoch"] for r in resumed] == [r["epoch"] for r in whole]
    for a, b in zip(whole, resumed):
        assert a["val_top1"] == b["val_top1"] and a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    a = torch.load(tmp_path / "whole" / "last.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed" / "last.pth", weights_only=True)["model"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


# ---------------------------------------------------------------------------------------------
# NaN loss, hostile checkpoint, refusal to overwrite
# ---------------------------------------------------------------------------------------------
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path):
    out = tmp_path / "run"
    run_script(method_args("bake", tiny_data, None, out, "--epochs", "2", "--stop-epoch", "1"))
    state = torch.load(out / "last.pth", weights_only=True)
    state["model"] = {k: v.float().fill_(float("nan")) if v.is_floating_point() else v for k, v in state["model"].items()}
    save_atomic(state, str(out / "last.pth"))  # weights that can only produce NaN from here on
    before = (out / "last.pth").read_bytes()
    result = run_script(method_args("bake", tiny_data, None, out, "--epochs", "2", "--resume", "auto"), check=False)
    one_sentence_error(result, "training loss became nan in epoch 2", "last good checkpoint is kept")
    assert (out / "last.pth").read_bytes() == before and len(metrics(out)) == 1


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/kd_reference_pickle_payload_ran"


def test_crafted_pickle_checkpoint_is_refused_without_running(tiny_data, tmp_path):
    if os.path.exists(MARKER):
        os.remove(MARKER)
    out = tmp_path / "run"
    out.mkdir()
    with open(out / "last.pth", "wb") as f:
        pickle.dump({"model": Payload(), "epoch": 1}, f)
    result = run_script(method_args("frskd", tiny_data, None, out, "--epochs", "1", "--resume", "auto"), check=False)
    one_sentence_error(result, "refused")
    assert not os.path.exists(MARKER)


@pytest.mark.parametrize("method", ["bake", "frskd", "meal_v2"])
def test_output_folder_with_a_run_is_not_overwritten(method, tiny_data, tiny_teacher, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pth").write_bytes(b"someone else's checkpoint")
    result = run_script(method_args(method, tiny_data, tiny_teacher, out, "--epochs", "1"), check=False)
    one_sentence_error(result, "already holds a run", "--resume auto", "--overwrite")
    assert (out / "last.pth").read_bytes() == b"someone else's checkpoint"


# ---------------------------------------------------------------------------------------------
# bad input: one sentence naming the problem and the fix
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    data = make_image_folder(root / "data")
    missing_val = shutil.copytree(data, root / "missing_val")
    shutil.rmtree(os.path.join(missing_val, "val", sorted(os.listdir(os.path.join(missing_val, "val")))[0]))
    corrupt = shutil.copytree(data, root / "corrupt")
    victim = os.path.join(corrupt, "train", sorted(os.listdir(os.path.join(corrupt, "train")))[2], "img_002.png")
    with open(victim, "r+b") as f:
        f.truncate(120)
    (root / "empty").mkdir()
    return {"data": data, "missing_val": missing_val, "corrupt": corrupt, "victim": victim,
            "empty": str(root / "empty"), "wrong_classes": make_teacher(root / "t5.pth", classes=5),
            "wrong_arch": f"resnet10t={root / 't5.pth'}"}


BAD_FKD = [  # (what, data key, extra flags, words the error must contain); bad flag values: see
    # test_every_numeric_flag_is_validated_at_parse_time
    ("missing --data", "nowhere", [], ["does not exist", "--data must point"]),
    ("empty --data", "empty", [], ["train does not exist"]),
    ("class folder in train, not in val", "missing_val", [], ["differ from train", "same class folders"]),
    ("corrupt image", "corrupt", [], ["cannot read image", "img_002.png", "remove or replace"]),
    ("teacher of another class count", "data", ["--teacher", "wrong_classes"], ["predicts 5 classes", "3 class folders"]),
    ("weights of another architecture", "data", ["--teacher", "wrong_arch"], ["do not fit architecture resnet10t"]),
    ("num_crops > stored crops", "data", ["--num-crops", "8", "--batch-size", "16"], ["exceeds the 4 crops"]),
    ("batch not divisible by num_crops", "data", ["--batch-size", "7"], ["divisible by --num-crops"]),
    ("batch larger than the data", "data", ["--batch-size", "64"], ["lower --batch-size"]),
]


@pytest.mark.parametrize("what,data_key,extra,needles", BAD_FKD, ids=[case[0] for case in BAD_FKD])
def test_fkd_bad_input_one_sentence(what, data_key, extra, needles, bad_inputs, tiny_teacher, tmp_path):
    data = bad_inputs.get(data_key, str(tmp_path / "nowhere"))
    extra = [bad_inputs.get(x, x) if x in ("wrong_classes", "wrong_arch") else x for x in extra]
    result = run_script(method_args("fkd", data, tiny_teacher, tmp_path / "out", *extra), check=False)
    one_sentence_error(result, *needles)


def test_store_of_other_images_or_codec_is_refused_and_kept(bad_inputs, tiny_teacher, tmp_path):
    run_script(method_args("fkd", bad_inputs["data"], tiny_teacher, tmp_path / "a", "--mode", "label"))
    before = {n: (tmp_path / "a" / "labels" / n).read_bytes() for n in os.listdir(tmp_path / "a" / "labels")}
    other = shutil.copytree(bad_inputs["data"], tmp_path / "other")
    os.remove(os.path.join(other, "train", sorted(os.listdir(os.path.join(other, "train")))[0], "img_000.png"))
    for data, extra, needle in ((str(other), [], "num_images"), (bad_inputs["data"], ["--codec", "mr"], "codec")):
        result = run_script(method_args("fkd", data, tiny_teacher, tmp_path / "b", "--labels",
                                        str(tmp_path / "a" / "labels"), *extra), check=False)
        one_sentence_error(result, needle)
    after = {n: (tmp_path / "a" / "labels" / n).read_bytes() for n in os.listdir(tmp_path / "a" / "labels")}
    assert before == after


# ---------------------------------------------------------------------------------------------
# full disk during label generation; a failing rank under torchrun; a different process count
# ---------------------------------------------------------------------------------------------
def test_full_disk_during_label_generation_then_resume(tiny_data, tiny_teacher, tmp_path):
    label = ["--mode", "label", "--stored-crops", "200"]

    def small_file_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # the store needs more than 20 kB

    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    args = method_args("fkd", tiny_data, tiny_teacher, tmp_path / "full", *label)
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, preexec_fn=small_file_limit,
                            timeout=300)
    one_sentence_error(result, "cannot create the label store", "free disk space", "run the same command again")
    run_script(args)  # space is free again: the same command finishes the store
    run_script(method_args("fkd", tiny_data, tiny_teacher, tmp_path / "clean", *label))
    a, b = tmp_path / "full" / "labels", tmp_path / "clean" / "labels"
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    assert all(filecmp.cmp(a / n, b / n, shallow=False) for n in os.listdir(a))


def test_failing_rank_ends_the_whole_job(bad_inputs, tiny_teacher, tmp_path):
    # the corrupt image sits in rank 1's share of the labels: rank 0 must not hang waiting for it
    start = time.time()
    result = run_script(torchrun(2) + method_args("fkd", bad_inputs["corrupt"], tiny_teacher, tmp_path / "out")[1:],
                        timeout=240, check=False)
    assert result.returncode != 0 and time.time() - start < 180
    assert "cannot read image" in result.stdout + result.stderr


def test_resume_with_another_process_count(tiny_data, tmp_path):
    out = tmp_path / "run"
    run_script(torchrun(2) + method_args("frskd", tiny_data, None, out, "--epochs", "2", "--stop-epoch", "1")[1:])
    run_script(method_args("frskd", tiny_data, None, out, "--epochs", "2", "--resume", "auto"))
    assert [r["epoch"] for r in metrics(out)] == [1, 2] and metrics(out)[1]["val_count"] == 9


def test_images_smaller_than_the_crop_are_accepted(tmp_path):
    data = make_image_folder(tmp_path / "small", size=12)  # 12 px images, 32 px crops
    teacher = make_teacher(tmp_path / "t.pth")
    run_script(method_args("fkd", data, teacher, tmp_path / "out"))
    assert metrics(tmp_path / "out")[-1]["val_count"] == 9


def test_killed_generation_under_torchrun_resumes_byte_identical(tiny_data, tiny_teacher, tmp_path):
    slow = ["--mode", "label", "--stored-crops", "120", "--label-batch", "40", "--flush-every", "1"]
    run_script(method_args("fkd", tiny_data, tiny_teacher, tmp_path / "whole", *slow))
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    job = subprocess.Popen(torchrun(2) + method_args("fkd", tiny_data, tiny_teacher, tmp_path / "killed", *slow)[1:],
                           cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    done_file = tmp_path / "killed" / "labels" / "done.npy"
    deadline = time.time() + 240
    while time.time() < deadline:
        if label_store_ready(done_file.parent) and 0 < np.load(done_file, mmap_mode="r").sum() < 18:
            break
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)  # torchrun and both workers at once
    job.wait()
    assert 0 < np.load(done_file).sum() < 18, "the kill should land in the middle of the generation"
    run_script(torchrun(2) + method_args("fkd", tiny_data, tiny_teacher, tmp_path / "killed", *slow)[1:])
    a, b = tmp_path / "whole" / "labels", tmp_path / "killed" / "labels"
    assert all(filecmp.cmp(a / n, b / n, shallow=False) for n in os.listdir(a))


# ---------------------------------------------------------------------------------------------
# The same classes of bad input in all four scripts, in-process (no subprocess start-up): every
# numeric flag validated at parse time, paths and resumes refused with one sentence before work.
# ---------------------------------------------------------------------------------------------
SCRIPTS = ["fkd", "bake", "meal_v2", "frskd"]


class _Parsed(Exception):
    pass


def script_parser(name):
    """The argparse parser a script builds in parse_args (captured, nothing parsed)."""
    import argparse
    from unittest import mock
    captured = {}

    def capture(self, args=None, namespace=None):
        captured["parser"] = self
        raise _Parsed

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        try:
            __import__(name).parse_args(["--data", "demo"])
        except _Parsed:
            pass
    return captured["parser"]


def bad_values():
    from common import flags
    return {flags.positive_int: ["0", "-2", "1.5", "x"], flags.nonneg_int: ["-1", "nan"],
            flags.positive_float: ["0", "-1", "nan", "inf"], flags.nonneg_float: ["-0.5", "nan"],
            flags.finite_float: ["nan", "-inf"], flags.fraction: ["-0.1", "1.5", "nan"],
            flags.open_fraction: ["0", "1.01"], flags.fraction_below_one: ["1", "-1"],
            flags.interpolation: ["cubic"], getattr(flags, "any_int", None): ["1.5", "nan"]}


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_numeric_flag_is_validated_at_parse_time(name, capsys):
    parser, table, checked = script_parser(name), bad_values(), 0
    for action in parser._actions:
        if not action.option_strings or action.type is None and not action.choices:
            continue
        flag = action.option_strings[0]
        assert action.type not in (int, float), f"{name}.py {flag} uses a plain {action.type.__name__}: use common.flags"
        values = table.get(action.type, []) + (["bogus"] if action.choices else [])
        assert values or action.type is str, f"{name}.py {flag}: type {action.type} is not a common.flags type"
        count = action.nargs if isinstance(action.nargs, int) else 1
        for value in values:
            with pytest.raises(SystemExit) as exit:
                __import__(name).parse_args(["--data", "demo", flag, *[value] * count])
            message = capsys.readouterr().err.strip().splitlines()[-1]
            assert exit.value.code == 2 and f"argument {flag}" in message, (flag, value, message)
            assert ("must be" in message or "invalid choice" in message) and value in message, message
            checked += 1
    assert checked >= 10


def run_main(name, argv):
    """main(argv) in this process; returns what it exited with (0 when it returned)."""
    try:
        __import__(name).main([str(a) for a in argv])
    except SystemExit as exit:
        return exit.code
    except KeyboardInterrupt:
        pytest.fail(f"{name}.main() let KeyboardInterrupt through (expected SystemExit(ckpt.INTERRUPTED))")
    return 0


def assert_one_sentence(code, *needles):
    assert isinstance(code, str) and code.startswith("error: ") and "\n" not in code, code
    for needle in needles:
        assert needle in code, code
    return code


def tiny_argv(name, data, teacher, out, *extra):
    return method_args(name, data, teacher, out, *extra)[2:]


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp("odd")
    one = make_image_folder(root / "one", classes=1)
    loop = make_image_folder(root / "loop")
    first = sorted(os.listdir(os.path.join(loop, "train")))[0]
    os.symlink("..", os.path.join(loop, "train", first, "up"))
    (root / "a_file").write_text("not a folder")
    (root / "weights_dir").mkdir()
    Image.new("RGB", (4, 4)).save(root / "weights_dir" / "x.png")
    return {"one": one, "loop": loop, "file": str(root / "a_file"), "dir": str(root / "weights_dir")}


BAD_PATHS = [  # (case, words of the sentence)
    ("out is a file", ["is a file, not a folder"]),
    ("one class", ["single class folder"]),
    ("symlink loop", ["a loop", "remove the symlink"]),
    ("demo cache is a file", ["KD_DEMO_CACHE", "is a file"]),
    ("resume with overwrite", ["pass only one"]),
]


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("case,needles", BAD_PATHS, ids=[c for c, _ in BAD_PATHS])
def test_bad_paths_are_one_sentence(name, case, needles, odd_data, tiny_data, tiny_teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default folders (runs/...) land here, not in the repository
    data, out, extra = tiny_data, tmp_path / "out", []
    if case == "out is a file":
        out = odd_data["file"]
    elif case in ("one class", "symlink loop"):
        data = odd_data["one" if case == "one class" else "loop"]
    elif case == "demo cache is a file":
        monkeypatch.setenv("KD_DEMO_CACHE", odd_data["file"])
        data = "demo"
    else:
        extra = ["--resume", "auto", "--overwrite"]
    if name == "fkd":  # the label store outside OUT (OUT may be a file here)
        extra += ["--labels", str(tmp_path / "labels")]
    assert_one_sentence(run_main(name, tiny_argv(name, data, tiny_teacher, out, *extra)), *needles)


def fake_checkpoint(path, **fields):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_atomic({"model": {}, "epoch": 1, "best_top1": 0.0, **fields}, str(path))


RESUMES = [  # (case, words of the sentence)
    ("checkpoint of another script", ["is a checkpoint of other.py, not of"]),
    ("changed --epochs", ["differs from the checkpoint's 99", "resume with the checkpoint's flags"]),
    ("damaged checkpoint", ["damaged"]),
    ("folder without last.pth", ["is a folder without a last.pth"]),
    ("another run holds OUT", ["is in use by another run (pid 4242)"]),
]


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("case,needles", RESUMES, ids=[c for c, _ in RESUMES])
def test_resume_problems_are_one_sentence(name, case, needles, tiny_data, tiny_teacher, tmp_path, monkeypatch):
    import fcntl
    monkeypatch.chdir(tmp_path)
    out, resume = tmp_path / "out", "auto"
    if case == "checkpoint of another script":
        fake_checkpoint(out / "last.pth", script="other.py", args={})
    elif case == "changed --epochs":
        fake_checkpoint(out / "last.pth", script=f"{name}.py", args={"epochs": 99})
    elif case == "damaged checkpoint":
        out.mkdir()
        (out / "last.pth").write_bytes(np.random.default_rng(0).bytes(3000))
    elif case == "folder without last.pth":
        resume = out / "sub"
        resume.mkdir(parents=True)
    out.mkdir(exist_ok=True)
    holder = open(out / ".lock", "w")
    if case == "another run holds OUT":
        holder.write("4242\n")
        holder.flush()
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        code = run_main(name, tiny_argv(name, tiny_data, tiny_teacher, out, "--resume", resume))
    finally:
        holder.close()
    message = assert_one_sentence(code, *needles)
    assert "pickled code" not in message and len(message) < 400


@pytest.mark.parametrize("name", SCRIPTS)
def test_ctrl_c_is_one_line(name, monkeypatch):
    from common.ckpt import INTERRUPTED
    module = __import__(name)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "run", interrupted)
    assert run_main(name, ["--data", "demo"]) == INTERRUPTED


@pytest.mark.parametrize("name", ["fkd", "bake", "meal_v2"])
def test_init_of_another_architecture_or_a_folder(name, odd_data, tiny_data, tiny_teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [a for a in tiny_argv(name, tiny_data, tiny_teacher, tmp_path / "out") if a != "none"]
    if "--init" in argv:
        argv.remove("--init")
    code = run_main(name, argv + ["--init", tiny_teacher])  # test_resnet weights, --arch test_efficientnet
    assert_one_sentence(code, "holds test_resnet weights but --arch is test_efficientnet")
    code = run_main(name, argv + ["--init", f"test_efficientnet={odd_data['dir']}"])
    assert_one_sentence(code, "is a folder, not a weights file")


def test_resume_with_changed_epochs_or_lr_is_refused_and_the_run_kept(tiny_data, tmp_path, monkeypatch):
    # the case: `--resume auto --epochs 4` on a 2-epoch run kept timm's t_initial of 2
    # from the scheduler's state (epochs 3-4 at lr 0); now refused before anything is written
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    argv = tiny_argv("bake", tiny_data, None, out, "--epochs", "2")
    assert run_main("bake", argv) == 0
    before = (out / "last.pth").read_bytes(), (out / "metrics.jsonl").read_text()
    for changed, needle in ((["--epochs", "4"], "--epochs 4 differs from the checkpoint's 2"),
                            (["--lr", "0.5"], "--lr 0.5 differs from the checkpoint's")):
        argv = tiny_argv("bake", tiny_data, None, out, "--epochs", "2", *changed, "--resume", "auto")
        assert_one_sentence(run_main("bake", argv), needle)  # argparse: the last --epochs wins
    assert ((out / "last.pth").read_bytes(), (out / "metrics.jsonl").read_text()) == before


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("resume", [[], ["--resume", "auto"]], ids=["start", "resume-auto"])
def test_a_folder_with_any_file_of_a_run_is_never_started_over(name, resume, tiny_data, tiny_teacher, tmp_path,
                                                                monkeypatch):
    """best.pth, metrics.jsonl or summary.json without last.pth (deleted, or killed before the first
    checkpoint) is a run too: refused without --overwrite, and left as it was."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    files = {"best.pth": b"the best model", "metrics.jsonl": b'{"epoch": 3}\n', "summary.json": b"{}"}
    for file, content in files.items():
        (out / file).write_bytes(content)
    code = run_main(name, tiny_argv(name, tiny_data, tiny_teacher, out, "--epochs", "1", *resume))
    assert_one_sentence(code, "holds a run (best.pth, metrics.jsonl, summary.json)", "--overwrite")
    assert all((out / file).read_bytes() == content for file, content in files.items())


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_killed_checkpoint_write_leaves_no_temporary_file(name, tiny_data, tiny_teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "last.pth.tmp4242").write_bytes(b"half a checkpoint")  # what a kill -9 inside save_atomic leaves
    assert run_main(name, tiny_argv(name, tiny_data, tiny_teacher, out, "--epochs", "1")) == 0
    assert not [f for f in os.listdir(out) if ".tmp" in f] and (out / "last.pth").exists()


@pytest.mark.parametrize("name", SCRIPTS)
def test_resume_auto_of_a_finished_run_does_nothing_and_keeps_its_summary(name, tiny_data, tiny_teacher, tmp_path,
                                                                         monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert run_main(name, tiny_argv(name, tiny_data, tiny_teacher, out, "--epochs", "1")) == 0
    summary = (out / "summary.json").read_bytes()
    capsys.readouterr()
    assert run_main(name, tiny_argv(name, tiny_data, tiny_teacher, out, "--epochs", "1", "--resume", "auto")) == 0
    assert (f"{out} already holds a finished run of 1 epochs; nothing to do (its results are in "
            f"{out / 'summary.json'})") in capsys.readouterr().out
    assert (out / "summary.json").read_bytes() == summary


IGNORED = [  # (script, extra flags, words of the sentence): a typed flag is honoured or refused
    ("fkd", ["--stored-crops", "6"], ["--stored-crops 6 differs from the 4 crops stored per image"]),
    ("fkd", ["--mode", "ce", "--verify-images"], ["--verify-images has no effect with --mode ce"]),
    ("fkd", ["--import-from", "released"], ["--import-from has no effect with --mode fkd"]),
    ("bake", ["--baseline", "--per-class", "3", "--lam", "0.5"], ["--lam --per-class has no effect with --baseline"]),
    ("meal_v2", ["--no-disc", "--d-lr", "0.1"], ["--d-lr has no effect with --no-disc"]),
    ("meal_v2", ["--no-teachers", "--disc-rule", "gan"], ["--disc-rule has no effect with --no-teachers"]),
    ("frskd", ["--task", "segmentation", "--epochs", "3"], ["--epochs 3 ends within the distillation warm-up"]),
]


@pytest.mark.parametrize("name,extra,needles", IGNORED, ids=[f"{n}:{e[0]}" for n, e, _ in IGNORED])
def test_no_typed_flag_is_silently_ignored(name, extra, needles, tiny_data, tiny_teacher, tmp_path, monkeypatch,
                                           capsys):
    monkeypatch.chdir(tmp_path)
    if name == "fkd" and extra[0] == "--stored-crops":  # a complete store of 4 crops, then training asks for 6
        assert run_main(name, tiny_argv(name, tiny_data, tiny_teacher, tmp_path / "first", "--mode", "label",
                                        "--labels", tmp_path / "labels")) == 0
        extra = extra + ["--labels", str(tmp_path / "labels")]
    if name == "frskd":  # argparse's error: usage, then the sentence
        with pytest.raises(SystemExit):
            __import__(name).parse_args(["--data", "demo", "--out", str(tmp_path / "out"), *extra])
        assert all(needle in capsys.readouterr().err for needle in needles)
        return
    assert_one_sentence(run_main(name, tiny_argv(name, tiny_data, tiny_teacher, tmp_path / "out", *extra)), *needles)


def test_typed_flags_are_only_the_typed_ones_after_a_recipe_fills_the_parser():
    """frskd.py sets its recipe's values (and its name, no flag) as parser defaults before it asks."""
    from common import flags
    p = flags.build_parser("", [("--epochs", flags.positive_int, ""), ("--lr", flags.positive_float, "")])
    p.set_defaults(lr=0.5, epochs=9, recipe_name="demo")
    assert flags.given(p, ["--epochs", "3"]) == {"epochs"}
    assert vars(p.parse_args([]))["recipe_name"] == "demo"  # the parser is left as it was


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("case", ["corrupt image in a loader worker", "decompression bomb"])
def test_unreadable_images_are_one_sentence_in_every_script(name, case, bad_inputs, tiny_data, tiny_teacher,
                                                             tmp_path, monkeypatch):
    from PIL import Image
    monkeypatch.chdir(tmp_path)
    if case == "decompression bomb":  # any image over twice the pixel limit: PIL refuses to decode it
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
        data, extra = tiny_data, []
    else:  # every image of a class corrupt, so an epoch reads one; the worker's traceback must not show
        data, extra = shutil.copytree(tiny_data, tmp_path / "data"), ["--workers", "1"]
        victims = os.path.join(data, "train", sorted(os.listdir(os.path.join(data, "train")))[1])
        for image in os.listdir(victims):
            with open(os.path.join(victims, image), "wb") as f:
                f.write(b"not an image")
    message = assert_one_sentence(run_main(name, tiny_argv(name, data, tiny_teacher, tmp_path / "out", "--epochs",
                                                           "1", *extra)), "cannot read image", "remove or replace")
    assert "Traceback" not in message and "worker" not in message.lower()


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_class_folder_added_before_resume_is_named_as_the_cause(name, tiny_teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    assert run_main(name, tiny_argv(name, data, tiny_teacher, out, "--epochs", "2", "--stop-epoch", "1")) == 0
    make_image_folder(tmp_path / "more", classes=4)  # the same three classes and a fourth
    for split in ("train", "val"):
        fourth = __import__("common.demo").demo.CLASSES[3]  # the class make_image_folder adds fourth
        shutil.copytree(tmp_path / "more" / split / fourth, os.path.join(data, split, fourth))
    code = run_main(name, tiny_argv(name, data, tiny_teacher, out, "--epochs", "2", "--resume", "auto"))
    if name == "fkd":  # its label store is checked first: made for the three classes' images
        assert_one_sentence(code, "num_classes: store 3, this run 4")
    elif name == "meal_v2":  # its teachers are checked first
        assert_one_sentence(code, "predicts 3 classes but the data has 4 class folders")
    else:
        assert_one_sentence(code, "was trained on 3 classes and the data now has 4", "class folder was added")


@pytest.mark.parametrize("name", SCRIPTS)
def test_sigterm_to_the_process_group_is_one_sentence_and_resumable(name, tiny_data, tiny_teacher, tmp_path):
    """What a cluster scheduler sends before it kills a job: to the main process and its loader workers."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    argv = method_args(name, tiny_data, tiny_teacher, tmp_path / "out", "--epochs", "50", "--workers", "1")
    job = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    log, deadline = tmp_path / "out" / "metrics.jsonl", time.time() + 240
    while not (log.exists() and log.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGTERM)
    _, err = job.communicate(timeout=120)
    assert job.returncode != 0 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("interrupted; run the same command with --resume auto"), err


@pytest.mark.parametrize("name, extra", [("fkd", ["--mode", "online"]), ("meal_v2", [])])
def test_a_teacher_file_changed_before_resume_is_refused(name, extra, tmp_path, monkeypatch):
    """Online distillation reads its teachers every epoch: their weights files are hashed into each
    checkpoint, and a resume with another file behind the same --teacher path is one sentence."""
    from conftest import make_teacher
    monkeypatch.chdir(tmp_path)
    data, out = make_image_folder(tmp_path / "data"), tmp_path / "out"
    teacher = make_teacher(tmp_path / "teacher.pth")
    assert run_main(name, tiny_argv(name, data, teacher, out, *extra, "--epochs", "3", "--stop-epoch", "1")) == 0
    assert run_main(name, tiny_argv(name, data, teacher, out, *extra, "--epochs", "3", "--stop-epoch", "2",
                                    "--resume", "auto")) == 0  # the same file: resumes
    assert [r["epoch"] for r in metrics(out)] == [1, 2]
    make_teacher(tmp_path / "teacher.pth", seed=1)  # other weights, the same path
    code = run_main(name, tiny_argv(name, data, teacher, out, *extra, "--epochs", "3", "--resume", "auto"))
    assert_one_sentence(code, "a weights file changed since", "sha256 differs", "restore the file")


def test_images_swapped_after_labelling_are_refused_by_content(tiny_teacher, tmp_path, monkeypatch):
    """The store records a hash of each image file while labelling: two same-size images whose
    files were swapped since (their names, sizes and the image list unchanged) are refused."""
    from common.labels import LabelStore
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "data")
    assert run_main("fkd", tiny_argv("fkd", data, tiny_teacher, tmp_path / "a", "--epochs", "1")) == 0
    assert int(np.asarray(LabelStore.open(str(tmp_path / "a" / "labels")).arrays["digests"]).min()) > 0
    folder = os.path.join(data, "train", sorted(os.listdir(os.path.join(data, "train")))[0])
    first, second = (os.path.join(folder, name) for name in ("img_000.png", "img_003.png"))  # the same size
    os.rename(first, first + ".x"), os.rename(second, first), os.rename(first + ".x", second)
    code = run_main("fkd", tiny_argv("fkd", data, tiny_teacher, tmp_path / "b", "--epochs", "1", "--labels",
                                     tmp_path / "a" / "labels", "--verify-images"))
    assert_one_sentence(code, "img_000.png changed since its labels", "content hash differs", "--overwrite-labels")
    code = run_main("meal_v2", ["--data", data, "--verify-images", "--teacher", tiny_teacher])
    assert_one_sentence(code, "--verify-images has no effect with online teachers (no --labels)")
