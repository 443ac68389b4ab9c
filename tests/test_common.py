"""common/: model loading, data errors, eval sharding, demo data, checkpoints."""
import os

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
