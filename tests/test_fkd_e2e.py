"""fkd.py end to end on a tiny ImageFolder with tiny timm models (CPU, subprocesses)."""
import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, label_store_ready, make_image_folder, make_teacher, run_script, torchrun
from common.crops import replay_crops
from common.data import load_rgb, image_folder
from common.labels import LabelStore, encode, label_identity
from common.models import create, normalize

TINY = ["--recipe", "resnet50-plain", "--arch", "test_efficientnet", "--input-size", "32", "--batch-size", "8",
        "--num-crops", "2", "--stored-crops", "6", "--k", "2", "--epochs", "4", "--workers", "0",
        "--label-batch", "4"]


def fkd_args(data, teacher, out, *extra):
    labels = [] if "--labels" in extra else ["--labels", str(out / "labels")]
    return [sys.executable, "fkd.py", "--data", data, "--teacher", teacher, "--out", str(out), *labels, *TINY, *extra]


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
        if label_store_ready(done_file.parent):
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
    summary = (tmp_path / "r" / "summary.json").read_text()
    again = run_script(fkd_args(tiny_data, tiny_teacher, tmp_path / "r", *labels, "--resume", "auto"))
    assert "already holds a finished run" in again.stdout  # a finished run: nothing to do, no crash
    assert (tmp_path / "r" / "summary.json").read_text() == summary
    a, b = metrics(out), metrics(tmp_path / "r")
    assert [r["epoch"] for r in b] == [2, 3, 4]
    for x, y in zip(a, b):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5) and x["val_top1"] == y["val_top1"]
    wa = torch.load(out / "last.pth", weights_only=True)["model"]
    wb = torch.load(tmp_path / "r" / "last.pth", weights_only=True)["model"]
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6) for k in wa)


def test_ssl_logits_variant_and_visualizer(tiny_data, tmp_path):
    """Sec. 3.4: the teacher's raw 8-d outputs (a projection head, not the 3 classes) are stored, and
    the temperature is chosen at training time, not pinned by the store."""
    teacher = make_teacher(tmp_path / "proj.pth", classes=8)
    ssl = ["--stores", "logits", "--codec", "full", "--label-dim", "8", "--epochs", "2"]
    result = run_script(fkd_args(tiny_data, teacher, tmp_path, *ssl, "--temperature", "4"))
    store = LabelStore.open(str(tmp_path / "labels"))
    assert store.meta["stores"] == "logits" and store.meta["temperature"] is None
    assert store.arrays["values"].shape == (18, 6, 8) and store.meta["num_classes"] == 3
    assert (np.asarray(store.arrays["values"]) < 0).any()  # raw outputs, not probabilities
    assert "no val accuracy" in result.stdout and "generating labels" in result.stdout
    again = run_script(fkd_args(tiny_data, teacher, tmp_path / "t2", "--labels", str(tmp_path / "labels"), *ssl,
                                "--temperature", "2", "--mode", "show"))
    assert "generating labels" not in again.stdout  # the same store, another T
    from PIL import Image
    assert Image.open(next((tmp_path / "t2").glob("labels.png"))).size[0] > 0


def test_torchrun_two_processes(base_run, tiny_data, tiny_teacher, tmp_path):
    out, _ = base_run
    result = run_script(torchrun(2) + fkd_args(tiny_data, tiny_teacher, tmp_path)[1:])
    assert same_store(out / "labels", tmp_path / "labels")  # ranks split the work, same bytes
    records = metrics(tmp_path)
    assert [r["epoch"] for r in records] == [2, 3, 4]
    assert all(r["val_count"] == 9 for r in records)  # 9 val images over 2 ranks, none twice
    assert result.stdout.count("FKD summary") == 1  # rank 0 alone prints


def test_torchrun_rank_without_eval_images_does_not_hang(tmp_path):
    """2 val images (and a --val-data set of 2) over 3 ranks: rank 0's evaluation shard is empty.
    Evaluating through the DDP wrapper would hang it (its forward broadcasts buffers)."""
    data = make_image_folder(tmp_path / "two", per_class=(4, 1), classes=2)
    flags = ["--mode", "ce", "--recipe", "resnet50-plain", "--arch", "test_efficientnet", "--input-size", "32",
             "--batch-size", "6", "--num-crops", "2", "--epochs", "1", "--workers", "0"]
    result = run_script(torchrun(3) + ["fkd.py", "--data", data, "--val-data", os.path.join(data, "val"),
                                       "--out", str(tmp_path / "out"), *flags], timeout=400)
    record = metrics(tmp_path / "out")[-1]
    assert record["val_count"] == 2 and record["extra0_count"] == 2 and "FKD summary" in result.stdout


# ---------------------------------------------------------------------------------------------
# In this process (no interpreter start-up): the README's commands, store identity on every path,
# changed images, a failed first run, inputs checked before labelling, imported stores
# ---------------------------------------------------------------------------------------------
SMALL = ["--recipe", "resnet50-plain", "--arch", "test_efficientnet", "--input-size", "32", "--batch-size", "8",
         "--num-crops", "2", "--stored-crops", "6", "--k", "2", "--epochs", "3", "--workers", "0",
         "--label-batch", "4"]


def fkd_main(*argv):
    """Run fkd.main in this process; returns its error sentence, or None when it succeeded."""
    import fkd
    try:
        fkd.main([str(a) for a in argv])
    except SystemExit as stop:
        return str(stop.code)
    return None


@pytest.fixture
def data_copy(tiny_data, tmp_path):
    return shutil.copytree(tiny_data, tmp_path / "data")


def test_readme_fkd_commands_work_in_order_and_again(tiny_data, tiny_teacher, tmp_path, monkeypatch, capsys):
    """README: `fkd.py --data demo`, then --mode online, --mode ce, --mode show; twice, no --out."""
    monkeypatch.chdir(tmp_path)
    base = ["--data", tiny_data, "--teacher", tiny_teacher, *SMALL, "--epochs", "1"]
    for round in range(2):
        for mode in ("fkd", "online", "ce", "show"):
            assert fkd_main(*base, "--mode", mode) is None, mode
            out = capsys.readouterr().out
            assert ("generating labels" in out) == (round == 0 and mode == "fkd")
    stores = [name for name in os.listdir(tmp_path / "runs" / "fkd_labels") if not name.endswith(".lock")]
    assert len(stores) == 1  # one store, shared by fkd and show
    for mode in ("fkd", "online", "ce", "show"):
        assert len(os.listdir(tmp_path / "runs" / f"fkd_{os.path.basename(tiny_data)}_{mode}")) == 2


def test_store_identity_is_checked_by_training_show_and_generation(tiny_data, tiny_teacher, tmp_path):
    labels = ["--labels", tmp_path / "labels"]
    assert fkd_main("--data", tiny_data, "--teacher", tiny_teacher, *SMALL, *labels, "--mode", "label") is None
    other_teacher = make_teacher(tmp_path / "other.pth", seed=1)
    cases = [(["--teacher", other_teacher], "fkd", "teachers: store [test_resnet (sha256"),
             (["--teacher", tiny_teacher, "--seed", "1"], "fkd", "seed: store 0, this run 1"),
             (["--teacher", tiny_teacher, "--temperature", "2"], "show", "temperature: store 1.0, this run 2.0"),
             (["--teacher", tiny_teacher, "--crop-scale", "0.5", "1"], "label", "crop_scale: store (0.08, 0.936)")]
    for flags, mode, needle in cases:
        error = fkd_main("--data", tiny_data, *flags, *SMALL, *labels, "--out", tmp_path / mode, "--mode", mode)
        assert error.startswith("error: label store") and needle in error and "\n" not in error, error


def test_image_changed_after_labelling_is_refused(data_copy, tiny_teacher, tmp_path):
    args = ["--data", data_copy, "--teacher", tiny_teacher, *SMALL, "--labels", tmp_path / "labels"]
    assert fkd_main(*args, "--mode", "label") is None
    victim = os.path.join(data_copy, "train", sorted(os.listdir(os.path.join(data_copy, "train")))[1], "img_004.png")
    Image.open(victim).resize((50, 50)).save(victim)  # same path, other size
    error = fkd_main(*args, "--out", tmp_path / "out")
    assert "img_004.png is 50x50 px but was 47x40" in error and "--overwrite-labels" in error


def test_failed_first_run_says_what_changed_and_what_to_do(data_copy, tiny_teacher, tmp_path):
    args = ["--data", data_copy, "--teacher", tiny_teacher, *SMALL, "--labels", tmp_path / "labels", "--mode", "label"]
    victim = os.path.join(data_copy, "train", sorted(os.listdir(os.path.join(data_copy, "train")))[2], "img_002.png")
    with open(victim, "r+b") as f:
        f.truncate(100)
    assert "cannot read image" in fkd_main(*args)
    os.remove(victim)  # the user removes the bad image and runs the same command again
    error = fkd_main(*args)
    assert "incomplete (0 of 18 images labelled)" in error and "num_images: store 18, this run 17" in error
    assert "rerun with --overwrite-labels" in error
    assert fkd_main(*args, "--overwrite-labels") is None
    assert LabelStore.open(str(tmp_path / "labels")).complete


def test_labels_folder_holding_other_files_is_refused_and_kept(tiny_data, tiny_teacher, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "values.npy").write_bytes(b"precious")
    error = fkd_main("--data", tiny_data, "--teacher", tiny_teacher, *SMALL, "--labels", tmp_path / "mine",
                     "--mode", "label")
    assert "holds other files (values.npy) and no label store" in error
    assert os.listdir(tmp_path / "mine") == ["values.npy"] and (tmp_path / "mine" / "values.npy").read_bytes() == b"precious"


def test_inputs_are_checked_before_label_generation(data_copy, tiny_data, tiny_teacher, tmp_path):
    args = ["--teacher", tiny_teacher, *SMALL, "--labels", tmp_path / "labels", "--out", tmp_path / "out"]
    no_val = shutil.copytree(data_copy, tmp_path / "no_val")
    shutil.rmtree(no_val / "val")
    assert "val does not exist" in fkd_main("--data", no_val, *args)
    assert "does not exist" in fkd_main("--data", tiny_data, *args, "--val-data", tmp_path / "nowhere")
    assert "does not exist" in fkd_main("--data", tiny_data, *args, "--init", f"test_efficientnet={tmp_path}/x.pth")
    assert not os.path.exists(tmp_path / "labels")  # nothing was labelled


def test_ctrl_c_is_one_sentence(tiny_data, tiny_teacher, tmp_path, monkeypatch):
    import fkd
    from common import ckpt

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(fkd, "train", interrupted)
    assert fkd_main("--data", tiny_data, "--mode", "ce", *SMALL, "--out", tmp_path / "out") == ckpt.INTERRUPTED


def test_stores_with_more_crops_share_their_first_crops(tiny_data, tiny_teacher, tmp_path):
    for m in (6, 9):
        assert fkd_main("--data", tiny_data, "--teacher", tiny_teacher, *SMALL, "--stored-crops", m,
                        "--labels", tmp_path / str(m), "--mode", "label") is None
    six, nine = LabelStore.open(str(tmp_path / "6")), LabelStore.open(str(tmp_path / "9"))
    assert np.array_equal(np.asarray(six.arrays["boxes"]), np.asarray(nine.arrays["boxes"])[:, :6])
    assert np.array_equal(np.asarray(six.arrays["flips"]), np.asarray(nine.arrays["flips"])[:, :6])


def test_training_step_reads_nothing_back_from_the_device(tiny_data, tiny_teacher, tmp_path, monkeypatch):
    """Loss and accuracy are summed on the device and read once per pass, not per step."""
    labels = ["--labels", tmp_path / "labels"]
    assert fkd_main("--data", tiny_data, "--teacher", tiny_teacher, *SMALL, *labels, "--mode", "label") is None
    calls = []
    item = torch.Tensor.item

    def counting_item(self):
        caller = sys._getframe(1).f_code.co_filename
        if caller in (os.path.join(ROOT, "fkd.py"), *(os.path.join(ROOT, "common", f) for f in ("data.py", "dist.py"))):  # not torch's
            calls.append(sys._getframe(1).f_lineno)
        return item(self)
    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    assert fkd_main("--data", tiny_data, "--teacher", tiny_teacher, *SMALL, *labels, "--batch-size", "4",
                    "--out", tmp_path / "out") is None
    steps = sum(r["train_crops"] // 4 for r in metrics(tmp_path / "out"))
    assert steps >= 12 and len(calls) == 2 * 2, (steps, calls)  # 2 passes: loss and accuracy, once each


def test_training_from_an_imported_store(tiny_data, tmp_path, capsys):
    """A store written by fkd_released.py: images and classes are checked, codec and K come from
    the store, an explicit conflicting --codec is refused."""
    train = image_folder(tiny_data, "train")
    meta = label_identity(train, [{"name": "released", "sha256": None}], "ms", 2, 4, (0.08, 1), (0.75, 4 / 3),
                          1.0, "probs", 0)
    meta.update(crop_scale=None, crop_ratio=None, seed=None, imported={
        "source": "/released", "label_type": "marginal_smoothing_k2", "layout": "fkd", "num_files": 18,
        "dtype": "float32"})
    store = LabelStore.create(str(tmp_path / "imported"), meta)
    probs = torch.softmax(torch.randn(4, 3), 1)
    for n, (path, _) in enumerate(train.samples):
        size = Image.open(path).size
        indices, values = encode(probs, "ms", 2)
        store.write(n, slice(0, 4), np.array([[0, 0, size[1], size[0]]] * 4), np.zeros(4), indices.numpy(),
                    values.numpy(), size)
    store.mark_done(range(18))
    args = ["--data", tiny_data, *SMALL, "--labels", tmp_path / "imported", "--out", tmp_path / "out"]
    assert "--codec mr differs from the imported store's ms" in fkd_main(*args, "--codec", "mr")
    assert "--k 5 differs from the imported store's 2" in fkd_main(*args, "--k", "5")
    capsys.readouterr()
    assert fkd_main(*args, "--epochs", "2") is None
    assert "training on imported labels from /released (marginal_smoothing_k2, 4 crops" in capsys.readouterr().out


def test_a_store_being_labelled_by_another_run_is_refused(tiny_data, tiny_teacher, tmp_path):
    """Two runs sharing a store (the default one) never create or write it at the same time: the
    second is told who holds it, before it writes anything."""
    import fcntl
    labels = tmp_path / "labels"
    with open(tmp_path / ".labels.lock", "w") as holder:  # another run labelling into the same store
        holder.write("4242\n")
        holder.flush()
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        error = fkd_main("--data", tiny_data, *SMALL, "--mode", "label", "--teacher", tiny_teacher,
                         "--labels", labels)
    assert error.startswith(f"error: label store {labels} is in use by another run (pid 4242)")
    assert not labels.exists()
    assert fkd_main("--data", tiny_data, *SMALL, "--mode", "label", "--teacher", tiny_teacher,
                    "--labels", labels) is None  # free again: the same command labels the store


def two_nodes(tmp_path, argv, timeout=240, preexec_fn=None):
    """Two torchrun agents on localhost (c10d rendezvous), one process each, each running from its own
    copy of the code in its own folder, as two nodes with local disks; returns both results."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for node in range(2):
        copy = tmp_path / f"node{node}"
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv*", "runs", "tests", "docs",
                                                                  "__pycache__", ".demo_cache*"))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=fkd-two-nodes",
               "fkd.py", *argv]
        env = dict(os.environ, PYTHONPATH=str(copy), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(cmd, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, preexec_fn=preexec_fn))
    return [(p.wait(timeout=timeout), *p.communicate()) for p in procs]


def test_two_nodes_with_node_local_default_store_stop_in_one_sentence(tiny_data, tiny_teacher, tmp_path):
    """Rank 0 decides where the store is; a node that cannot see it stops every rank with the cause."""
    results = two_nodes(tmp_path, ["--data", tiny_data, "--teacher", tiny_teacher, *TINY, "--mode", "label",
                                   "--device", "cpu"])
    for code, out, err in results:
        assert code != 0, out + err
        assert "must be a folder that every node sees (a shared filesystem)" in out + err, out + err
        assert "is missing on 1 of 2 processes" in out + err


def test_two_nodes_a_rank_that_fails_while_labelling_stops_the_waiting_ranks(tiny_teacher, tmp_path):
    data = make_image_folder(tmp_path / "data")
    last = sorted((tmp_path / "data" / "train").rglob("*.png"))[-1]  # in the second rank's share
    last.write_bytes(b"not an image")
    results = two_nodes(tmp_path, ["--data", data, "--teacher", tiny_teacher, *TINY, "--mode", "label",
                                   "--device", "cpu", "--labels", str(tmp_path / "shared_labels")])
    text = [out + err for _, out, err in results]
    assert all(code != 0 for code, _, _ in results), text
    assert any("another process stopped while labelling: cannot read image" in t for t in text), text
    assert all("cannot read image" in t for t in text), text


def test_two_nodes_a_checkpoint_write_error_on_rank_0_stops_every_rank(tiny_data, tmp_path):
    """Rank 0 alone writes last.pth; a full disk there reaches the other node's rank as the same sentence."""
    import resource

    def small_files():  # checkpoints exceed it; Python ignores SIGXFSZ, so the write fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    results = two_nodes(tmp_path, ["--data", tiny_data, *TINY, "--mode", "ce", "--device", "cpu",
                                   "--out", str(tmp_path / "out")], preexec_fn=small_files)
    for code, out, err in results:
        assert code != 0 and "error: cannot write" in out + err and "--resume auto" in out + err, out + err
