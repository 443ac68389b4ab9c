"""fkd.py end to end on a tiny ImageFolder with tiny timm models (CPU, subprocesses)."""
import filecmp
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, make_image_folder, run_script, torchrun
from common.crops import replay_crops
from common.data import load_rgb, image_folder
from common.labels import LabelStore, encode
from common.models import create, normalize

TINY = ["--arch", "test_efficientnet", "--input-size", "32", "--batch-size", "8", "--num-crops", "2",
        "--stored-crops", "6", "--k", "2", "--epochs", "4", "--workers", "0", "--label-batch", "4"]


def fkd_args(data, teacher, out, *extra):
    return [sys.executable, "fkd.py", "--data", data, "--teacher", teacher, "--out", str(out), *TINY, *extra]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def same_store(a, b):
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    return all(filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False) for n in names)


@pytest.fixture(scope="module")
def base_run(tiny_data, tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("fkd_base")
    result = run_script(fkd_args(tiny_data, tiny_teacher, out))
    return out, result


def test_label_train_eval(base_run):
    out, result = base_run
    records = metrics(out)
    # serrated plan for 4 epochs, m = 2: one 2-crop pass, then the last 2 epochs one crop each
    assert [(r["epoch"], r["crops_per_image"]) for r in records] == [(2, 2), (3, 1), (4, 1)]
    assert all(r["val_count"] == 9 for r in records)  # every val image counted once
    assert "FKD summary" in result.stdout
    store = LabelStore.open(str(out / "labels"))
    assert np.asarray(store.done).all()
    assert json.load(open(out / "summary.json"))["final"]["epoch"] == 4


def test_replayed_crops_give_back_stored_labels(base_run, tiny_data, tiny_teacher):
    """The paper's "no information loss": the teacher on a replayed stored crop reproduces its label."""
    out, _ = base_run
    store = LabelStore.open(str(out / "labels"))
    train = image_folder(tiny_data, "train")
    teacher, extra = create(tiny_teacher, 3)
    teacher.eval()
    cfg = extra["data_config"]
    for n in (0, 7, 17):
        boxes, flips, indices, values = store.read(n, np.arange(6))
        image = load_rgb(train.samples[n][0])
        crops = replay_crops(image, boxes, flips, cfg["input_size"], cfg["interpolation"])
        with torch.no_grad():
            probs = torch.softmax(teacher(normalize(crops, cfg["mean"], cfg["std"])), 1)
        idx, val = encode(probs, "ms", 2)
        assert np.array_equal(idx.numpy(), indices)
        np.testing.assert_allclose(val.float().numpy(), values.astype(np.float32), atol=1e-3)


def test_store_independent_of_worker_count(tiny_data, tiny_teacher, tmp_path):
    for workers in ("0", "2"):
        run_script(fkd_args(tiny_data, tiny_teacher, tmp_path / workers, "--mode", "label", "--workers", workers))
    assert same_store(tmp_path / "0" / "labels", tmp_path / "2" / "labels")


def test_killed_generation_resumes_byte_identical(tiny_data, tiny_teacher, tmp_path):
    slow = ["--mode", "label", "--stored-crops", "120", "--label-batch", "40", "--flush-every", "1"]
    run_script(fkd_args(tiny_data, tiny_teacher, tmp_path / "whole", *slow))
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(fkd_args(tiny_data, tiny_teacher, tmp_path / "killed", *slow), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done_file = tmp_path / "killed" / "labels" / "done.npy"
    deadline = time.time() + 120
    while time.time() < deadline:
        if done_file.exists() and (tmp_path / "killed" / "labels" / "meta.json").exists():
            done = np.load(done_file, mmap_mode="r")
            if 0 < done.sum() < len(done):
                break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = np.load(done_file).sum()
    assert 0 < partial < 18, "the kill should land in the middle of the generation"
    result = run_script(fkd_args(tiny_data, tiny_teacher, tmp_path / "killed", *slow))
    assert f"generating labels: {18 - partial} images" in result.stdout
    assert same_store(tmp_path / "whole" / "labels", tmp_path / "killed" / "labels")


def test_training_refuses_store_of_other_data_or_codec(base_run, tiny_teacher, tmp_path):
    out, _ = base_run
    other = make_image_folder(tmp_path / "other", per_class=(5, 3))
    result = run_script(fkd_args(other, tiny_teacher, tmp_path / "o", "--labels", str(out / "labels")), check=False)
    assert result.returncode != 0 and "error: label store" in result.stderr and "num_images" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_script(fkd_args(str(tmp_path / "other"), tiny_teacher, tmp_path / "o2", "--codec", "mr",
                                 "--labels", str(out / "labels")), check=False)
    assert result.returncode != 0 and "codec" in result.stderr


def test_online_and_ce_baselines_run(tiny_data, tiny_teacher, tmp_path):
    for mode in ("online", "ce"):
        run_script(fkd_args(tiny_data, tiny_teacher, tmp_path / mode, "--mode", mode))
        assert [r["epoch"] for r in metrics(tmp_path / mode)] == [2, 3, 4]
    assert not os.path.exists(tmp_path / "online" / "labels")  # online KD stores nothing


def test_resume_continues_the_same_run(base_run, tiny_data, tiny_teacher, tmp_path):
    out, _ = base_run
    labels = ["--labels", str(out / "labels")]
    run_script(fkd_args(tiny_data, tiny_teacher, tmp_path / "r", *labels, "--stop-epoch", "2"))
    assert [r["epoch"] for r in metrics(tmp_path / "r")] == [2]
    refused = run_script(fkd_args(tiny_data, tiny_teacher, tmp_path / "r", *labels), check=False)
    assert refused.returncode != 0 and "--resume auto" in refused.stderr  # never overwrite silently
    run_script(fkd_args(tiny_data, tiny_teacher, tmp_path / "r", *labels, "--resume", "auto"))
    a, b = metrics(out), metrics(tmp_path / "r")
    assert [r["epoch"] for r in b] == [2, 3, 4]
    for x, y in zip(a, b):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5) and x["val_top1"] == y["val_top1"]
    wa = torch.load(out / "last.pth", weights_only=True)["model"]
    wb = torch.load(tmp_path / "r" / "last.pth", weights_only=True)["model"]
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6) for k in wa)


def test_ssl_logits_variant_and_visualizer(tiny_data, tiny_teacher, tmp_path):
    run_script(fkd_args(tiny_data, tiny_teacher, tmp_path, "--stores", "logits", "--codec", "full",
                        "--temperature", "4"))
    store = LabelStore.open(str(tmp_path / "labels"))
    assert store.meta["stores"] == "logits" and store.arrays["values"].shape == (18, 6, 3)
    assert (np.asarray(store.arrays["values"]) < 0).any()  # raw logits, not probabilities
    run_script(fkd_args(tiny_data, tiny_teacher, tmp_path, "--stores", "logits", "--codec", "full",
                        "--temperature", "4", "--mode", "show"))
    from PIL import Image
    assert Image.open(tmp_path / "labels.png").size[0] > 0


def test_torchrun_two_processes(base_run, tiny_data, tiny_teacher, tmp_path):
    out, _ = base_run
    result = run_script(torchrun(2) + ["fkd.py", "--data", tiny_data, "--teacher", tiny_teacher,
                                       "--out", str(tmp_path), *TINY])
    assert same_store(out / "labels", tmp_path / "labels")  # ranks split the work, same bytes
    records = metrics(tmp_path)
    assert [r["epoch"] for r in records] == [2, 3, 4]
    assert all(r["val_count"] == 9 for r in records)  # 9 val images over 2 ranks, none twice
    assert result.stdout.count("FKD summary") == 1  # rank 0 alone prints
