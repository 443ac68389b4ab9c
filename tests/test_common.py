"""common/: model loading, data errors, eval sharding, demo data, checkpoints."""
import os
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from conftest import TINY_CFG, make_teacher
from common import demo
from common.ckpt import MetricsLog, prepare_out, save_atomic
from common.data import DataError, ShardSampler, image_folder, load_rgb
from common.models import ModelError, create


def test_local_weights_with_module_prefix_and_data_config(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    loaded, extra = create(f"test_resnet={tmp_path / 'w.pth'}", 4)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert extra["sha256"] and extra["data_config"]["input_size"] == 160  # timm's config for a plain file
    spec = make_teacher(tmp_path / "ours.pth", classes=4)
    _, extra = create(spec, 4)
    assert extra["data_config"] == TINY_CFG  # our checkpoints carry the config they were trained with


def test_weights_errors_are_one_sentence(tmp_path):
    spec = make_teacher(tmp_path / "t.pth", classes=3)
    with pytest.raises(ModelError, match="predicts 3 classes but the data has 5"):
        create(spec, 5)
    with pytest.raises(ModelError, match="do not fit architecture resnet10t"):
        create(f"resnet10t={tmp_path / 't.pth'}", 3)
    with pytest.raises(ModelError, match="does not exist"):
        create("test_resnet=/nonexistent.pth", 3)
    with pytest.raises(ModelError, match="unknown timm model"):
        create("no_such_net", 3, pretrained_head="none")


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"model": Payload(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(ModelError, match="pickled code"):
        create(f"test_resnet={tmp_path / 'evil.pth'}", 3)
    assert not marker.exists()


def test_shard_sampler_counts_every_image_once():
    for n in (9, 10, 1):
        for world in (1, 2, 3):
            seen = [i for rank in range(world) for i in ShardSampler(n, rank, world)]
            assert sorted(seen) == list(range(n))


def test_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        image_folder(str(tmp_path / "nope"), "train")
    os.makedirs(tmp_path / "d" / "train" / "a")
    os.makedirs(tmp_path / "d" / "train" / "b")
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "train" / "a" / "x.png")
    with pytest.raises(DataError, match="at least one image"):
        image_folder(str(tmp_path / "d"), "train")
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "train" / "b" / "x.png")
    os.makedirs(tmp_path / "d" / "val" / "a")
    with pytest.raises(DataError, match="differ from train"):
        image_folder(str(tmp_path / "d"), "val", classes=["a", "b"])
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.jpg"):
        load_rgb(str(tmp_path / "bad.jpg"))


def test_unusual_image_modes_become_rgb(tmp_path):
    images = {"gray": Image.new("L", (5, 4), 128), "cmyk": Image.new("CMYK", (5, 4), (0, 0, 0, 0)),
              "rgba": Image.new("RGBA", (5, 4), (10, 20, 30, 0)), "p": Image.new("P", (5, 4)),
              "i16": Image.fromarray(np.full((4, 5), 65535, dtype=np.uint16))}
    for name, img in images.items():
        img.save(tmp_path / f"{name}.{'jpg' if name == 'cmyk' else 'png'}")
        rgb = load_rgb(str(tmp_path / f"{name}.{'jpg' if name == 'cmyk' else 'png'}"))
        assert rgb.mode == "RGB" and rgb.size == (5, 4)
    assert load_rgb(str(tmp_path / "i16.png")).getpixel((0, 0)) == (255, 255, 255)  # scaled, not clipped
    assert load_rgb(str(tmp_path / "rgba.png")).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white


def test_demo_render_is_deterministic_and_learnable_shape():
    a = np.asarray(demo.render(3, np.random.default_rng(1)))
    b = np.asarray(demo.render(3, np.random.default_rng(1)))
    assert a.shape == (64, 64, 3) and np.array_equal(a, b)
    assert len(demo.CLASSES) == 10


def test_demo_teacher_training_learns(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "TRAIN_PER_CLASS", 8)
    monkeypatch.setattr(demo, "VAL_PER_CLASS", 2)
    monkeypatch.setenv("KD_DEMO_CACHE", str(tmp_path))
    root = demo.ensure_data()
    assert len(image_folder(root, "train")) == 80 and len(image_folder(root, "val")) == 20
    losses = []
    demo.train_teacher("test_resnet", root, epochs=3, batch_size=16, log=lambda m: losses.append(float(m.split()[-1])))
    assert len(losses) == 3 and all(np.isfinite(losses))


def test_checkpoint_write_is_atomic_and_out_guard(tmp_path):
    save_atomic({"epoch": 1}, tmp_path / "last.pth")
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temp file left behind
    with pytest.raises(ModelError, match="--resume auto"):
        prepare_out(str(tmp_path), None, False)
    assert prepare_out(str(tmp_path), "auto", False) == str(tmp_path / "last.pth")
    assert prepare_out(str(tmp_path), str(tmp_path), False) == str(tmp_path / "last.pth")  # a run's folder
    log = MetricsLog(str(tmp_path))
    for e in (1, 2, 3):
        log.append({"epoch": e})
    log.truncate_after(2)
    assert (tmp_path / "metrics.jsonl").read_text().count("epoch") == 2


def test_evaluate_scores_every_head_in_one_pass():
    from common.data import evaluate
    from common.dist import Context
    images = torch.zeros(6, 3, 4, 4, dtype=torch.uint8)
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    first = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 0, 0]), 3).float()   # 4 of 6 right
    second = torch.nn.functional.one_hot(torch.tensor([1, 1, 1, 1, 1, 1]), 3).float()  # 2 of 6 right
    calls = []

    class TwoHeads(torch.nn.Module):
        def forward(self, x):
            calls.append(len(x))
            rows = slice(sum(calls) - len(x), sum(calls))
            return first[rows], second[rows]

    data = torch.utils.data.DataLoader(list(zip(images, targets)), batch_size=4)
    both = evaluate(TwoHeads(), data, Context(), [0.0] * 3, [1.0] * 3, heads=2)
    assert calls == [4, 2]  # one pass over the data for both heads
    assert both[0]["top1"] == pytest.approx(400 / 6) and both[1]["top1"] == pytest.approx(200 / 6)
    assert both[0]["count"] == both[1]["count"] == 6 and both[0]["top5"] == 100.0


# ---------------------------------------------------------------------------------------------
# AMP, compile and progress output (common/dist.py)
# ---------------------------------------------------------------------------------------------
def test_autocast_and_grad_scaler_follow_amp_flags(monkeypatch):
    from argparse import Namespace
    from common.dist import Context, amp_dtype, amp_enabled, maybe_compile, scaler_enabled
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    bf16, fp16 = Namespace(amp=True, amp_dtype="bfloat16"), Namespace(amp=True)  # no amp_dtype: float16
    assert amp_enabled(bf16, cuda) and amp_dtype(bf16) == "bfloat16" and amp_dtype(fp16) == "float16"
    assert not amp_enabled(bf16, cpu) and not amp_enabled(Namespace(amp=False), cuda)
    assert not amp_enabled(Namespace(), cuda)  # an args without the flags works
    assert scaler_enabled(fp16, cuda) and not scaler_enabled(bf16, cuda)  # bf16 needs no loss scaling
    assert not scaler_enabled(fp16, cpu)
    autocast = Context().autocast(bf16)
    assert autocast.fast_dtype == torch.bfloat16 and not autocast._enabled
    with autocast:
        assert torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.float32
    assert not Context().grad_scaler(fp16).is_enabled()
    model = torch.nn.Linear(2, 2)
    assert maybe_compile(model, Namespace()) is model and maybe_compile(model, Namespace(compile=False)) is model
    monkeypatch.setattr(torch, "compile", lambda m: ("compiled", m))  # dynamo takes seconds to import
    assert maybe_compile(model, Namespace(compile=True)) == ("compiled", model)


def test_plain_progress_lines_every_5_percent_or_30_seconds():
    from common.dist import PlainProgress
    lines, now = [], [0.0]
    bar = PlainProgress(range(100), desc="epoch 1/2", write=lines.append, clock=lambda: now[0])
    for _ in bar:
        now[0] += 0.5  # 50 s in all: a 5% step every 2.5 s
    assert len(lines) == 20 and lines[0] == "epoch 1/2: 5/100 (5%), 2.0 it/s, 2s elapsed, ETA 48s"
    assert lines[-1].startswith("epoch 1/2: 100/100 (100%)")
    lines.clear()
    with PlainProgress(total=1000, desc="labels", unit="img", write=lines.append, clock=lambda: now[0]) as bar:
        for _ in range(10):
            now[0] += 10.0  # 10 s per image: only the 30 s rule fires
            bar.update(1)
    assert len(lines) == 3 and "img/s" in lines[0] and "ETA" in lines[0]


def test_bar_is_tqdm_on_a_terminal_and_plain_lines_otherwise(monkeypatch):
    from tqdm import tqdm
    from common import dist
    monkeypatch.setattr(dist, "_is_terminal", lambda stream: True)
    assert isinstance(dist.Context().bar(range(3)), tqdm)
    monkeypatch.setattr(dist, "_is_terminal", lambda stream: False)
    assert isinstance(dist.Context().bar(range(3)), dist.PlainProgress)
    assert list(dist.Context().bar(range(3))) == [0, 1, 2]
    assert isinstance(dist.Context(rank=1, world=2).bar(range(3)), tqdm)  # disabled off rank 0


def test_cpu_threads_policy_uses_idle_cores_and_respects_explicit_choices():
    from common.dist import cpu_threads, idle_cores
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert cpu_threads(cpu, 2, {"OMP_NUM_THREADS": "1"}, requested=3)[0] == 3  # --threads wins
    assert cpu_threads(cpu, 2, {"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "2"})[0] is None  # respected
    assert cpu_threads(cuda, 1, {})[0] is None
    # idle cores at start, shared between the node's processes; a busy core is not counted
    assert cpu_threads(cpu, 1, {}, measure=lambda: (4, 3.7))[0] == 4
    assert cpu_threads(cpu, 1, {}, measure=lambda: (2, 1.1))[0] == 1
    assert cpu_threads(cpu, 2, {}, measure=lambda: (4, 3.9))[0] == 2
    assert cpu_threads(cpu, 1, {}, measure=lambda: (2, 0.0))[0] == 1
    assert "1.1 idle" in cpu_threads(cpu, 1, {}, measure=lambda: (2, 1.1))[1]
    cores, idle = idle_cores(0.05)
    assert cores == len(os.sched_getaffinity(0)) and 0.0 <= idle <= cores


# ---------------------------------------------------------------------------------------------
# Output folders, the lock, resume policy, checkpoint writes (common/ckpt.py)
# ---------------------------------------------------------------------------------------------
def run_args(**changes):
    from argparse import Namespace
    values = dict(arch="test_resnet", epochs=2, lr=0.1, workers=0, amp=False, resume=None,
                  overwrite=False, stop_epoch=None, data="demo", labels=None, out="x")
    return Namespace(**{**values, **changes})


def saved_run(out, args=None, scaler=None):
    from common.ckpt import Checkpointer, release_out
    from common.dist import Context
    model = torch.nn.Linear(2, 2)
    objects = dict(model=model) if scaler is None else dict(model=model, scaler=scaler)
    checkpointer = Checkpointer(str(out), Context(), args=args or run_args(), **objects)
    checkpointer.restore()
    checkpointer.end_epoch({"epoch": 1, "val_top1": 50.0}, 50.0, args or run_args())
    release_out(str(out))
    return model


def test_resume_refuses_changed_training_flags_and_allows_infrastructure(tmp_path):
    from common.ckpt import Checkpointer, CheckpointError, release_out
    from common.dist import Context
    saved_run(tmp_path)
    for changed, needle in ((dict(epochs=4), "--epochs 4 differs from the checkpoint's 2: resume with the "
                                             "checkpoint's flags, or start a new run (another --out, or --overwrite)"),
                            (dict(lr=0.2, epochs=3), "--epochs 3 differs from the checkpoint's 2 (also --lr)"),
                            (dict(overwrite=True), "pass only one")):
        with pytest.raises(CheckpointError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            Checkpointer(str(tmp_path), Context(), "auto", run_args(**changed).overwrite,
                         args=run_args(**changed), model=torch.nn.Linear(2, 2))
        release_out(str(tmp_path))
    moved = run_args(workers=4, amp=True, stop_epoch=2, labels=None)
    model = torch.nn.Linear(2, 2)
    checkpointer = Checkpointer(str(tmp_path), Context(), "auto", False, args=moved, model=model)
    assert checkpointer.restore() == (1, 50.0)
    release_out(str(tmp_path))


def test_resume_of_another_script_or_architecture_is_one_sentence(tmp_path):
    from common.ckpt import Checkpointer, CheckpointError, release_out
    from common.dist import Context
    saved_run(tmp_path)
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    assert state["script"] == "test_common.py" and "rng" not in state
    save_atomic({**state, "script": "bake.py"}, tmp_path / "last.pth")
    with pytest.raises(CheckpointError, match="is a checkpoint of bake.py, not of test_common.py"):
        Checkpointer(str(tmp_path), Context(), "auto", args=run_args(), model=torch.nn.Linear(2, 2))
    release_out(str(tmp_path))
    save_atomic({**state, "args": None, "rng": {"torch": torch.get_rng_state()}}, tmp_path / "last.pth")
    checkpointer = Checkpointer(str(tmp_path), Context(), "auto", args=run_args(), model=torch.nn.Linear(3, 2))
    with pytest.raises(CheckpointError, match="does not fit this run's model") as error:
        checkpointer.restore()
    assert len(str(error.value)) < 400  # not a state_dict dump
    release_out(str(tmp_path))


def test_empty_grad_scaler_state_resumes_with_amp(tmp_path):
    from common.ckpt import Checkpointer, release_out
    from common.dist import Context
    saved_run(tmp_path, scaler=torch.amp.GradScaler("cpu", enabled=False))  # saved without --amp: {}
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    checkpointer = Checkpointer(str(tmp_path), Context(), "auto", args=run_args(amp=True),
                                model=torch.nn.Linear(2, 2), scaler=scaler)
    assert checkpointer.restore()[0] == 1 and scaler.get_scale() == 65536.0
    release_out(str(tmp_path))


def test_a_second_run_on_the_same_out_is_refused(tmp_path):
    import fcntl
    from common.ckpt import CheckpointError, lock_out, release_out
    with open(tmp_path / ".lock", "w") as other:  # another open file = another run holding OUT
        other.write("4242\n")
        other.flush()
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(CheckpointError, match=r"is in use by another run \(pid 4242\); wait for it"):
            lock_out(str(tmp_path))
    assert lock_out(str(tmp_path)) is None and lock_out(str(tmp_path)) is None  # free, then re-entrant
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    release_out(str(tmp_path))
    lock_out(str(tmp_path))
    from common.dist import cleanup
    cleanup()  # the end of every script's main(): the next run may use OUT
    with open(tmp_path / ".lock") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_resume_on_a_rank_without_the_checkpoint_names_the_shared_filesystem(tmp_path):
    from common.ckpt import Checkpointer, CheckpointError, release_out
    from common.dist import Context
    saved_run(tmp_path)

    class OtherNodeMissesIt(Context):
        def all_reduce_sum(self, values):
            return [v + 1 for v in values]  # one more process reports the file missing

    checkpointer = Checkpointer(str(tmp_path), OtherNodeMissesIt(), "auto", args=run_args(),
                                model=torch.nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match="missing on 1 of 1 processes: --out must be on a filesystem shared"):
        checkpointer.restore()
    release_out(str(tmp_path))


def test_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    import resource
    from common.ckpt import CheckpointError
    save_atomic({"epoch": 1}, tmp_path / "last.pth")
    before = (tmp_path / "last.pth").read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
    try:
        with pytest.raises(CheckpointError, match=r"cannot write .*last.pth \(the write failed: quota, file-size "
                                                  r"limit or I/O error\); the previous last.pth is intact"):
            save_atomic({"epoch": 2, "weights": torch.zeros(100_000)}, tmp_path / "last.pth")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert os.listdir(tmp_path) == ["last.pth"] and (tmp_path / "last.pth").read_bytes() == before


def test_resolve_out_fresh_folder_per_run_newest_on_resume(tmp_path):
    from common.ckpt import CheckpointError, release_out, resolve_out
    from common.dist import Context
    base = tmp_path / "runs" / "fkd_demo_online"
    first = resolve_out(None, str(base), Context())
    second = resolve_out(None, str(base), Context())
    assert first != second and os.path.dirname(first) == str(base)  # same second: a -2 suffix
    assert resolve_out(None, str(base), Context(), "auto") == max(first, second, key=len)
    assert resolve_out(str(tmp_path / "mine"), str(base), Context()) == str(tmp_path / "mine")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        resolve_out(str(tmp_path / "file"), str(base), Context())
    with pytest.raises(CheckpointError, match="cannot create output folder"):
        resolve_out(str(tmp_path / "file" / "sub"), str(base), Context())
    for path in (first, second, str(tmp_path / "mine")):
        release_out(path)


def test_damaged_checkpoint_is_not_called_pickled_code(tmp_path):
    import pickle
    (tmp_path / "random.pth").write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(ModelError, match="damaged") as error:
        create(f"test_resnet={tmp_path / 'random.pth'}", 3)
    assert "pickled code" not in str(error.value)
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"model": Payload(str(tmp_path / "ran"))}, f, protocol=4)
    with pytest.raises(ModelError, match="would execute pickled code"):
        create(f"test_resnet={tmp_path / 'evil.pkl'}", 3)
    with pytest.raises(ModelError, match="is a folder, not a weights file"):
        create(f"test_resnet={tmp_path}", 3)
    assert not (tmp_path / "ran").exists()


# ---------------------------------------------------------------------------------------------
# Model specs: --init against --arch, data configs in specs (common/models.py)
# ---------------------------------------------------------------------------------------------
def test_init_spec_checks_the_architecture(tmp_path):
    from common.models import init_spec
    assert init_spec(None, "resnet50") == "resnet50" and init_spec("resnet50.a1_in1k", "resnet50") == "resnet50.a1_in1k"
    assert init_spec("resnet50=w.pth", "resnet50") == "resnet50=w.pth"
    assert init_spec("w.pth", "resnet50") == "resnet50=w.pth"
    with pytest.raises(ModelError, match="--init resnet18=w.pth holds resnet18 weights but --arch is resnet50"):
        init_spec("resnet18=w.pth", "resnet50")


def test_data_config_from_spec_checkpoint_or_timm(tmp_path):
    from common.models import describe_data_config
    spec = make_teacher(tmp_path / "t.pth")
    _, extra = create(spec, 3)
    assert extra["data_config_source"] == f"the checkpoint {tmp_path / 't.pth'}"
    _, extra = create(spec + "?input_size=48&interpolation=bicubic&mean=0.5,0.5,0.5&std=0.25,0.25,0.25", 3)
    assert extra["data_config"] == {"input_size": 48, "interpolation": "bicubic", "mean": [0.5] * 3,
                                    "std": [0.25] * 3, "crop_pct": 1.0}
    assert extra["source"] == str(tmp_path / "t.pth") and extra["name"] == "test_resnet"
    assert describe_data_config(extra) == (
        "test_resnet: 48 px bicubic, mean (0.5, 0.5, 0.5), std (0.25, 0.25, 0.25), crop 1, from the spec "
        f"(input_size, interpolation, mean, std) over the checkpoint {tmp_path / 't.pth'}")
    _, extra = create("test_resnet", 3, pretrained_head="none")
    assert extra["data_config_source"] == "timm's default for test_resnet"
    for query, needle in (("input_size=0", "whole number of pixels"), ("interpolation=cubic", "must be one of"),
                          ("mean=1,2", "3 comma-separated numbers"), ("std=1,0,1", "positive numbers"),
                          ("size=3", "unknown data-config key 'size'"), ("crop_pct=2", r"in \(0, 1\]")):
        with pytest.raises(ModelError, match=needle):
            create(f"{spec}?{query}", 3)


def test_normalize_takes_uint8_only():
    from common.models import normalize
    images = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize(images, [0.5] * 3, [0.5] * 3)
    assert out.dtype == torch.float32 and torch.allclose(out, torch.ones_like(out))
    with pytest.raises(TypeError, match="uint8 images"):
        normalize(images.float() / 255, [0.5] * 3, [0.5] * 3)


# ---------------------------------------------------------------------------------------------
# Data: symlink loops, one class, CutMix from the generator (common/data.py)
# ---------------------------------------------------------------------------------------------
def test_symlink_loops_and_single_class_are_refused(tmp_path):
    for name in ("a", "b"):
        os.makedirs(tmp_path / "d" / "train" / name)
        Image.new("RGB", (8, 8)).save(tmp_path / "d" / "train" / name / "x.png")
    assert len(image_folder(str(tmp_path / "d"), "train")) == 2
    os.symlink("..", tmp_path / "d" / "train" / "a" / "up")
    with pytest.raises(DataError, match="a folder that contains it: a loop"):
        image_folder(str(tmp_path / "d"), "train")
    os.remove(tmp_path / "d" / "train" / "a" / "up")
    os.symlink(tmp_path / "d" / "train" / "b", tmp_path / "d" / "train" / "a" / "also_b")
    with pytest.raises(DataError, match="would count twice"):
        image_folder(str(tmp_path / "d"), "train")
    os.makedirs(tmp_path / "one" / "train" / "a")
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "train" / "a" / "x.png")
    with pytest.raises(DataError, match="single class folder"):
        image_folder(str(tmp_path / "one"), "train")


def test_cutmix_box_comes_from_the_generator_alone():
    from common.data import cutmix_box, mix_batch
    x = torch.arange(4 * 3 * 16 * 16, dtype=torch.float32).view(4, 3, 16, 16)
    y = torch.eye(4)
    numpy_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state()
    runs = [mix_batch(x, y, 0.0, 1.0, torch.Generator().manual_seed(seed)) for seed in (5, 5, 6)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0])
    assert np.array_equal(np.random.get_state()[1], numpy_state) and torch.equal(torch.get_rng_state(), torch_state)
    # timm's semantics: side sqrt(1 - lam), clipped at the border, lambda = 1 - pasted area
    (y0, y1, x0, x1), lam = cutmix_box(10, 20, 0.75, np.random.default_rng(0))
    assert lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 200)
    assert y1 - y0 <= 5 and x1 - x0 <= 10 and (y1 - y0 == 5 or y0 == 0 or y1 == 10)


def test_demo_cache_that_is_a_file_is_one_sentence(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("x")
    monkeypatch.setenv("KD_DEMO_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="KD_DEMO_CACHE.* is a file, not a folder"):
        demo.ensure_data()
    monkeypatch.setenv("KD_DEMO_CACHE", str(tmp_path / "cache" / "sub"))
    with pytest.raises(DataError, match="cannot create the demo cache"):
        demo.ensure_data()


# ---------------------------------------------------------------------------------------------
# tests/gpu: the smoke script parses; the process-group checks run on CPU (gloo, one process)
# ---------------------------------------------------------------------------------------------
def test_gpu_smoke_script_parses_and_dist_checks_pass_on_cpu():
    import importlib.util
    import subprocess
    import torch.distributed as dist
    from conftest import ROOT
    from common.dist import Context
    assert subprocess.run(["bash", "-n", os.path.join(ROOT, "tests", "gpu", "smoke.sh")]).returncode == 0
    spec = importlib.util.spec_from_file_location("dist_check", os.path.join(ROOT, "tests", "gpu", "dist_check.py"))
    dist_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dist_check)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        lines, failed = dist_check.run_checks(Context())
    finally:
        dist.destroy_process_group()
    assert failed == 0, lines
    assert [line.split(":")[0] for line in lines] == [
        "ok   collectives", "ok   evaluate", "ok   eval buffers", "ok   ddp step float16", "ok   ddp step bfloat16"]


def test_dist_checks_pass_with_two_gloo_processes():
    """Two ranks: the empty eval shard, evaluation with rank 0's BN statistics, DDP steps."""
    from conftest import run_script, torchrun
    result = run_script(torchrun(2) + ["tests/gpu/dist_check.py", "--device", "cpu"], timeout=300)
    assert result.stdout.count("ok   ") == 5 and "eval buffers: 2 rank(s)" in result.stdout, result.stdout


def test_the_minimum_torch_is_stated_once_and_checked():
    import common
    assert common.torch_too_old("2.14.1+cu130") is None and common.torch_too_old("2.5.0") is None
    assert "needs torch >= 2.5, found 2.4.1" in common.torch_too_old("2.4.1+cpu")
    with open(os.path.join(os.path.dirname(common.__file__), "..", "requirements.txt")) as f:
        assert "torch>=2.5\n" in f.read()  # the same minimum as the check


# ---------------------------------------------------------------------------------------------
# tests/gpu/smoke.sh without a GPU: its commands (SMOKE_DRY=1) parse with each method file's own
# parser and cover every method and precision; KD_DDP=1 starts a process group of one on CPU
# ---------------------------------------------------------------------------------------------
def smoke_helper():
    import importlib.util
    from conftest import ROOT
    path = os.path.join(ROOT, "tests", "gpu", "smoke_table.py")
    spec = importlib.util.spec_from_file_location("smoke_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_smoke_dry_run_commands_parse_and_cover_every_method_and_precision(tmp_path):
    import importlib
    import shlex
    import subprocess
    from conftest import ROOT
    smoke = os.path.join(ROOT, "tests", "gpu", "smoke.sh")
    assert subprocess.run(["bash", "-n", smoke]).returncode == 0
    done = subprocess.run(["bash", smoke, str(tmp_path / "out")], env=dict(os.environ, SMOKE_DRY="1"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not os.path.exists(tmp_path / "out")  # a dry run writes nothing
    commands = [shlex.split(line[len("cmd: "):]) for line in done.stdout.splitlines()
                if line.startswith("cmd: ")]
    joined = [" ".join(argv) for argv in commands]
    assert any("tests/gpu/dist_check.py --device cuda" in c and "--nproc_per_node=1" in c for c in joined)
    for benchmark in ("train_steps.py", "fkd_pipeline.py"):
        assert any(f"tests/benchmarks/{benchmark} --device cuda" in c for c in joined), benchmark
    modules = {f"{name}.py": importlib.import_module(name) for name in ("fkd", "bake", "meal_v2", "frskd")}
    covered = {}
    for argv in commands:
        files = [arg for arg in argv if arg in modules]
        if not files:
            continue
        file, flags = files[0], argv[argv.index(files[0]) + 1:]
        try:
            parsed = modules[file].parse_args(flags)
        except SystemExit as error:  # argparse has printed which flag it refused
            raise AssertionError(f"{file}'s parser refuses the smoke's command {shlex.join(argv)} ({error})")
        args = parsed[0] if isinstance(parsed, tuple) else parsed  # fkd.py: (args, flags given)
        assert "KD_DDP=1" in argv and "torch.distributed.run" in argv, f"no process group: {shlex.join(argv)}"
        route = file[:-3] + (" --labels" if file == "meal_v2.py" and args.labels else "") \
            + (" --task segmentation" if file == "frskd.py" and args.task == "segmentation" else "") \
            + (f" --mode {args.mode}" if file == "fkd.py" and args.mode != "fkd" else "")
        assert args.data == "demo" and (args.epochs <= 3 or route == "fkd --mode label"), shlex.join(argv)
        if route == "fkd":  # multi-crop passes: pass_plan gives a pass of num_crops > 1
            plan = list(modules[file].pass_plan(args.epochs, args.num_crops, args.warmup_epochs))
            assert any(m > 1 for _, m, _ in plan), f"{shlex.join(argv)}: passes {plan}"
        if route == "meal_v2 --labels":
            plan = list(modules[file].pass_plan(args.epochs, args.num_crops, args.lr_drop_epoch))
            assert any(m > 1 for _, m in plan), f"{shlex.join(argv)}: passes {plan}"
        variants = {"fp16": args.amp and args.amp_dtype == "float16", "compile": args.compile,
                    "bf16": args.amp and args.amp_dtype == "bfloat16"}
        covered.setdefault(route, set()).update(name for name, used in variants.items() if used)
    routes = ["fkd", "bake", "meal_v2", "meal_v2 --labels", "frskd", "frskd --task segmentation"]
    for route in routes:
        assert {"fp16", "bf16", "compile"} <= covered.get(route, set()), (route, covered)
    assert covered.get("fkd --mode label") is not None  # Fast MEAL V2's store, made by fkd.py


def test_kd_ddp_starts_a_process_group_of_one(tiny_data, tiny_teacher, tmp_path):
    """KD_DDP=1 under torchrun with one process: common.dist.setup() starts a process group (gloo on
    CPU), fkd.py labels and trains its student wrapped in DDP: the smoke's path on one GPU."""
    from conftest import run_script, torchrun
    out = tmp_path / "out"
    flags = ["--recipe", "resnet50-plain", "--arch", "test_efficientnet", "--input-size", "32",
             "--batch-size", "8", "--num-crops", "2", "--stored-crops", "4", "--k", "2", "--epochs", "3",
             "--workers", "0", "--label-batch", "4", "--device", "cpu"]
    command = torchrun(1) + ["fkd.py", "--data", tiny_data, "--teacher", tiny_teacher, "--out", str(out),
                             "--labels", str(tmp_path / "labels"), *flags]
    result = run_script(command, timeout=300,
                        env={"KD_DDP": "1", "TORCH_DISTRIBUTED_DEBUG": "INFO", "TORCH_CPP_LOG_LEVEL": "INFO"})
    assert "FKD summary" in result.stdout
    (tmp_path / "run.log").write_text(result.stdout + result.stderr)
    smoke_helper().verify(str(out), 3, str(tmp_path / "run.log"), world=1, backend="gloo", sync_bn=False)


def test_a_signal_during_a_checkpoint_write_waits_for_the_write(monkeypatch):
    """SIGTERM arriving inside torch.save made the zip writer fail and was reported as a disk error."""
    import signal as signals
    from common import dist
    monkeypatch.setitem(dist._signals, "received", False)
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with dist.uninterrupted():
            dist._interrupt(signals.SIGTERM, None)  # what the handler does when the signal arrives
            done.append("the write finished")
    assert done == ["the write finished"]
    with pytest.raises(KeyboardInterrupt):
        dist._interrupt(signals.SIGTERM, None)  # outside a write: stop at once


@pytest.mark.parametrize("after", ["swallowed", "worker lost"])
def test_a_signal_is_never_lost_and_what_it_breaks_is_the_interruption(monkeypatch, after):
    """A SIGTERM landing inside a finaliser or an at-fork hook (both swallow the KeyboardInterrupt) still
    stops the run at its next step; what the same signal to the process group broke meanwhile (a loader
    worker killed, a broken pipe) ends as the interruption, not as that error's traceback."""
    import argparse
    import signal as signals
    from common import ckpt, dist
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    steps = []

    def work(ctx):
        try:
            dist._interrupt(signals.SIGTERM, None)
        except KeyboardInterrupt:
            if after == "worker lost":
                raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.") from None
        for step in ctx.bar(range(100), desc="train"):
            steps.append(step)

    with pytest.raises(SystemExit) as stop:
        dist.run_main(work, argparse.Namespace(device="cpu", threads=1), (ValueError,))
    assert str(stop.value) == ckpt.INTERRUPTED and steps == []
    assert not dist._signals["received"]  # the next run in this process starts clean


def test_a_loader_worker_is_quiet_about_a_main_process_gone_mid_handover(monkeypatch, capsys):
    from common import dist
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    dist.quiet_worker(0)
    sys.excepthook(BrokenPipeError, BrokenPipeError(32, "Broken pipe"), None)
    assert capsys.readouterr().err == ""
    sys.excepthook(ValueError, ValueError("a real bug"), None)
    assert "a real bug" in capsys.readouterr().err


@pytest.mark.parametrize("build", ["data", "teacher", "segmentation"])
def test_a_demo_cache_that_cannot_be_written_is_one_sentence(tmp_path, monkeypatch, build):
    """A read-only or full KD_DEMO_CACHE: one sentence naming the cache and the fix, no traceback and
    no half-written set left behind (root bypasses permissions, so the write error is injected)."""
    from common import demo
    monkeypatch.setenv("KD_DEMO_CACHE", str(tmp_path))
    monkeypatch.setattr(demo, "TRAIN_PER_CLASS", 2)
    monkeypatch.setattr(demo, "VAL_PER_CLASS", 1)
    if build == "teacher":
        demo.ensure_data()
        monkeypatch.setattr(demo, "train_teacher", lambda *a, **k: (_ for _ in ()).throw(
            PermissionError(13, "Permission denied")))
    else:
        real_replace = os.replace
        monkeypatch.setattr(demo.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(demo.DataError, match=r"cannot write the .* into the demo cache .*(Permission denied|"
                       r"No space left).*set KD_DEMO_CACHE to a writable folder"):
        {"data": demo.ensure_data, "segmentation": demo.ensure_segmentation_data,
         "teacher": lambda: demo.ensure_teacher("test_resnet", epochs=1)}[build]()
    if build != "teacher":
        monkeypatch.setattr(demo.os, "replace", real_replace)
        assert not any(p.name.startswith(("demo-data", "demo-seg")) for p in tmp_path.iterdir())
