"""Import of the released FKD / Fast MEAL V2 soft labels (fkd_released.py) and released ResNet-50
checkpoints, checked against the official behaviour rebuilt here from its description:

- files written as the official generator writes them (torch.save([coords, flips, labels]) of numpy
  arrays, one per image, FKD or MEAL-V2 path layout, fp32 or fp16);
- soft labels compared with a rebuild of the official Recover_soft_label;
- crops compared with the official replay: torchvision resized_crop on the PIL image with the float
  box c * (H, W), which PIL's Image.crop rounds.
"""
import os
import re
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

import fkd_released as released
from common.crops import replay_crops
from common.labels import LabelStore, StoreError, decode
from conftest import ROOT, run_script, torchrun
from fkd_released import boxes_from_coords, import_labels, load_released_file

CLASSES = 12  # > K + 1 for the top-10 label type
CROPS = 20


def make_data(root, classes=CLASSES, per_class=1, name="imagenet"):
    """DIR/<name>/{train,val}/<class>/<image>.JPEG of odd sizes (names with two dots on purpose:
    the official loaders cut a name at its first dot)."""
    data = os.path.join(root, name)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = os.path.join(data, split, f"n{c:08d}")
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                w, h = 31 + 6 * c + 2 * i, 23 + 4 * ((c + i) % 5)
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"n{c:08d}_{i}.v1.png"))
    return data


def official_labels(probs, label_type):
    """The label array the official generator stores for one image (its label_quantization)."""
    if label_type == "hard":
        return probs.argmax(1).numpy()  # int64 indices
    if label_type == "smoothing":
        top = probs.max(1)
        return torch.stack([top.indices.float(), top.values], 1).numpy()
    k = 10 if label_type.endswith("k10") else 5
    order = probs.argsort(1, descending=True)[:, :k]
    return torch.stack([order.float(), probs.gather(1, order)], 1).numpy()  # [N, 2, K]


def write_release(source, data, label_type, fp16=False, layout="fkd", crops=CROPS, seed=0):
    """One file per training image at the official path; {image path: (coords, flips, labels)}."""
    train = ImageFolder(os.path.join(data, "train"))
    rng = np.random.default_rng(seed)
    content = {}
    for path, _ in train.samples:
        with Image.open(path) as image:
            width, height = image.size
        # integer boxes as torchvision's get_params draws them, stored as i/H, j/W, h/H, w/W
        h = rng.integers(1, height + 1, crops)
        w = rng.integers(1, width + 1, crops)
        i, j = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        coords = np.stack([i / height, j / width, h / height, w / width], 1).astype(np.float32)
        flips = rng.random(crops) < 0.5
        logits = rng.normal(size=(crops, CLASSES)) * 3
        logits[0] *= 10  # a peaked crop: its fp16 top-K values can sum above 1
        probs = torch.softmax(torch.from_numpy(logits).float(), 1)
        labels = official_labels(probs, label_type)
        if fp16:
            coords, labels = np.float16(coords), np.float16(labels)
        parts = os.path.abspath(path).split(os.sep)[-3 if layout == "fkd" else -4:]
        file = os.path.join(source, "/".join(parts).split(".")[0] + ".tar")
        os.makedirs(os.path.dirname(file), exist_ok=True)
        torch.save([coords, flips, labels], file)
        content[path] = (coords, flips, labels)
    return content


def official_soft_label(labels, label_type, num_classes):
    """Rebuild of the official Recover_soft_label. The fp16 release's values are cast to float32 first:
    the official scatter_ of fp16 values into a float32 tensor raises (tested below)."""
    t = torch.from_numpy(np.asarray(labels))
    if label_type == "hard":
        return torch.zeros(len(t), num_classes).scatter_(1, t.long().view(-1, 1), 1)
    index, value = t[:, 0].long(), t[:, 1].float()
    if label_type == "smoothing":
        rest = ((1 - value) / (num_classes - 1)).view(-1, 1) * torch.ones(len(t), num_classes)
        return rest.scatter_(1, index.view(-1, 1), value.view(-1, 1))
    if label_type == "marginal_renorm":
        return F.normalize(torch.zeros(len(t), num_classes).scatter_(1, index, value), p=1.0, dim=1)
    k = int(label_type.rsplit("k", 1)[1])
    rest = (1 - value.sum(1, keepdim=True)) / (num_classes - k) * torch.ones(len(t), num_classes)
    return rest.scatter_(1, index, value)


def official_crop(image, coords, flip, size=224):
    """The official training replay of one crop (torchvision resized_crop on PIL, float box)."""
    h, w = image.height, image.width
    out = TF.resized_crop(image, coords[0].item() * h, coords[1].item() * w, coords[2].item() * h,
                          coords[3].item() * w, [size, size], InterpolationMode.BILINEAR)
    return TF.hflip(out) if flip else out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("released_data"))


def train_set_of(data):
    return ImageFolder(os.path.join(data, "train"))


def store_arrays(path):
    return {name: np.load(os.path.join(path, name))
            for name in sorted(os.listdir(path)) if name.endswith(".npy")}


# -------------------------------------------------------------------------------------------------
# Decoding imported labels = the official Recover_soft_label
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("label_type", ["hard", "smoothing", "marginal_smoothing_k5",
                                        "marginal_smoothing_k10", "marginal_renorm"])
@pytest.mark.parametrize("fp16", [False, True])
def test_decoded_labels_match_official_recover(tmp_path, data, label_type, fp16):
    written = "marginal_smoothing_k5" if label_type == "marginal_renorm" else label_type
    content = write_release(tmp_path / "release", data, written, fp16)
    train_set = train_set_of(data)
    store = import_labels(str(tmp_path / "release"), train_set, str(tmp_path / "store"),
                          label_type="marginal_renorm" if label_type == "marginal_renorm" else None)
    meta = store.meta
    assert meta["imported"]["label_type"] == label_type and meta["num_crops"] == CROPS
    overshoot = 0
    for n, (path, _) in enumerate(train_set.samples):
        coords, flips, labels = content[path]
        _, stored_flips, indices, values = store.read(n, np.arange(CROPS))
        ours = decode(torch.from_numpy(indices), None if values is None else torch.from_numpy(values),
                      meta["codec"], CLASSES)
        official = official_soft_label(labels, label_type, CLASSES)
        assert np.array_equal(stored_flips, flips)
        # exact for every label type and both releases (an fp32 release is stored as float32);
        # where top-K values sum above 1 the official rest mass is negative and ours is clamped at
        # 0 (README, FKD codecs)
        assert torch.equal(ours, official.clamp_min(0))
        overshoot += int((official < 0).any(1).sum())
    if fp16 and label_type.startswith("marginal_smoothing"):
        assert overshoot > 0, "the test data should hold fp16 top-K values summing above 1"


def test_official_recover_raises_on_fp16_values():
    """Why the rebuild casts fp16 values to float32: the official scatter_ refuses them."""
    index, value = torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.25]], dtype=torch.float16)
    with pytest.raises(RuntimeError):
        torch.zeros(1, 4).scatter_(1, index, value)


# -------------------------------------------------------------------------------------------------
# Crop boxes = the pixels the official replay cuts
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fp16", [False, True])
def test_boxes_cut_the_official_pixels(tmp_path, data, fp16):
    content = write_release(tmp_path / "release", data, "hard", fp16, crops=8)
    train_set = train_set_of(data)
    store = import_labels(str(tmp_path / "release"), train_set, str(tmp_path / "store"))
    for n in range(0, len(train_set), 3):
        path = train_set.samples[n][0]
        coords, flips, _ = content[path]
        boxes, stored_flips, _, _ = store.read(n, np.arange(8))
        image = Image.open(path).convert("RGB")
        ours = replay_crops(image, boxes, stored_flips, 224, "bilinear")
        for c in range(8):
            top, left, height, width = boxes[c].tolist()
            h, w = image.height, image.width
            float_box = (coords[c, 1].item() * w, coords[c, 0].item() * h,
                         coords[c, 1].item() * w + coords[c, 3].item() * w,
                         coords[c, 0].item() * h + coords[c, 2].item() * h)
            assert np.array_equal(np.asarray(image.crop(float_box)),
                                  np.asarray(image.crop((left, top, left + width, top + height))))
            assert torch.equal(ours[c], TF.pil_to_tensor(official_crop(image, coords[c], flips[c])))


def test_box_rounding_is_half_to_even_and_fp16_overshoot_is_clipped():
    # PIL rounds each float edge with round(): 2.5 -> 2, 3.5 -> 4 (half to even)
    coords = np.array([[2.5 / 16, 3.5 / 16, 5.0 / 16, 4.0 / 16]])  # exact binary fractions
    boxes, clipped = boxes_from_coords(coords, 16, 16)
    top, left, bottom, right = round(2.5), round(3.5), round(2.5 + 5.0), round(3.5 + 4.0)  # 2, 4, 8, 8
    assert boxes.tolist() == [[top, left, bottom - top, right - left]] == [[2, 4, 6, 4]] and clipped == 0
    # fp16 coordinates of a crop touching the right edge of a 4099 px wide image can round one
    # pixel past it; the official PIL crop pads that column with black, the import clips it
    width, height = 4099, 7
    found = None
    for left in range(1, 3000):
        c = np.float16(np.array([[0.0, left / width, 1.0, (width - left) / width]]))
        right = np.rint(c[0, 1].astype(np.float64) * width + c[0, 3].astype(np.float64) * width)
        if right > width:
            found = c
            break
    assert found is not None
    boxes, clipped = boxes_from_coords(found, width, height)
    assert clipped == 1 and boxes[0, 1] + boxes[0, 3] == width
    pixels = np.random.default_rng(0).integers(1, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    j, w = found[0, 1].item() * width, found[0, 3].item() * width  # as the official loader computes
    official = np.asarray(image.crop((j, 0, j + w, height)))
    top, left, bh, bw = boxes[0].tolist()
    ours = np.asarray(image.crop((left, top, left + bw, top + bh)))
    assert official.shape[1] == ours.shape[1] + 1 and (official[:, -1] == 0).all()
    assert np.array_equal(official[:, :-1], ours)


# -------------------------------------------------------------------------------------------------
# Safe loading
# -------------------------------------------------------------------------------------------------
class Payload:
    """A pickle whose loading would run code (writes a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_pickle_is_refused_and_does_not_run(tmp_path, data):
    marker = str(tmp_path / "payload_ran")
    torch.save([np.zeros((2, 4), np.float32), np.zeros(2, bool), Payload(marker)], tmp_path / "evil.tar")
    with pytest.raises(released.ReleasedFileError, match="would build by running pickled code") as error:
        load_released_file(str(tmp_path / "evil.tar"))
    assert error.value.kind == "unsafe" and not os.path.exists(marker)
    # inside an import: one sentence naming the count and the file, nothing run
    write_release(tmp_path / "release", data, "hard", crops=4)
    train_set = train_set_of(data)
    victim = os.path.join(tmp_path / "release", released.label_file_key(train_set.samples[5][0], "fkd"))
    torch.save([np.zeros((4, 4), np.float32), np.zeros(4, bool), Payload(marker)], victim)
    with pytest.raises(StoreError, match=r"^1 released label files are refused, the first: "
                       + re.escape(victim) + " holds objects other than numeric arrays"):
        import_labels(str(tmp_path / "release"), train_set, str(tmp_path / "store"))
    assert not os.path.exists(marker)


def test_numpy1_pickles_and_legacy_format_load(tmp_path):
    """The released files were written with NumPy 1.x (numpy.core.multiarray) and may use torch's
    pre-1.6 (non-zip) format."""
    arrays = [np.random.rand(3, 4).astype(np.float16), np.array([True, False, True]),
              np.random.rand(3, 2, 5).astype(np.float32)]
    torch.save(arrays, tmp_path / "legacy.tar", _use_new_zipfile_serialization=False)
    raw = (tmp_path / "legacy.tar").read_bytes()
    assert b"numpy._core.multiarray" in raw or b"numpy.core.multiarray" in raw
    (tmp_path / "np1.tar").write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    for name in ("legacy.tar", "np1.tar"):
        loaded = load_released_file(str(tmp_path / name))
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(loaded, arrays))
    (tmp_path / "junk.tar").write_bytes(os.urandom(500))
    with pytest.raises(released.ReleasedFileError, match="damaged"):
        load_released_file(str(tmp_path / "junk.tar"))


# -------------------------------------------------------------------------------------------------
# Tree checks, identity, resume, layouts
# -------------------------------------------------------------------------------------------------
def test_missing_extra_and_mismatched_files_are_one_sentence(tmp_path, data):
    source, store_path = tmp_path / "release", str(tmp_path / "store")
    write_release(source, data, "marginal_smoothing_k5", crops=6)
    train_set = train_set_of(data)
    files = [os.path.join(source, released.label_file_key(p, "fkd")) for p, _ in train_set.samples]
    os.rename(files[3], files[3] + ".away")
    with pytest.raises(StoreError, match=r"^1 training images have no released label file, the first: "
                       + re.escape(files[3])):
        import_labels(str(source), train_set, store_path)
    os.rename(files[3] + ".away", files[3])
    stray = os.path.join(source, "train", "n00000001", "not_in_data.tar")
    torch.save([], stray)
    with pytest.raises(StoreError, match=r"^1 label files belong to no image of --data, the first: "
                       + re.escape(stray)):
        import_labels(str(source), train_set, store_path)
    os.remove(stray)
    assert not os.path.exists(store_path)  # nothing written before the tree checks pass
    # files 4 and 7 hold another crop count / another K than the first file
    coords, flips, labels = load_released_file(files[4])
    torch.save([coords[:3], flips[:3], labels[:3]], files[4])
    coords, flips, labels = load_released_file(files[7])
    torch.save([coords, flips, labels[:, :, :3]], files[7])
    with pytest.raises(StoreError, match=r"^2 released label files differ in crop count, label kind, "
                       r"K or dtype from the first image's file.*the first: "
                       + re.escape(files[4]) + " holds 3 crops"):
        import_labels(str(source), train_set, store_path)
    store = LabelStore.open(store_path)
    done = np.asarray(store.done).astype(bool)
    assert done.sum() == len(files) - 2 and not done[4] and not done[7]  # the others are imported
    # the user replaces the two files; the same command imports the rest
    write_release(tmp_path / "fresh", data, "marginal_smoothing_k5", crops=6)
    for n in (4, 7):
        key = released.label_file_key(train_set.samples[n][0], "fkd")
        os.replace(os.path.join(tmp_path / "fresh", key), files[n])
    assert import_labels(str(source), train_set, store_path).complete
    assert all(np.array_equal(a, b) for a, b in zip(store_arrays(store_path).values(), store_arrays(
        import_labels(str(source), train_set, str(tmp_path / "clean")).path).values()))


def test_images_sharing_a_label_file_are_refused(tmp_path):
    """The official loaders cut a name at its first dot: a.1.png and a.2.png read the same file."""
    for c, name in (("n0", "a.1.png"), ("n0", "a.2.png"), ("n1", "b.png")):
        os.makedirs(tmp_path / "data" / "train" / c, exist_ok=True)
        Image.new("RGB", (9, 7)).save(tmp_path / "data" / "train" / c / name)
    os.makedirs(tmp_path / "release" / "train")
    with pytest.raises(StoreError, match=r"^1 training images map to a label file another image also "
                       r"maps to .*, the first: .*train/n0/a\.tar; rename those images"):
        import_labels(str(tmp_path / "release"), train_set_of(str(tmp_path / "data")),
                      str(tmp_path / "store"))


def test_identity_meta_and_folder_rules(tmp_path, data):
    source = tmp_path / "release"
    write_release(source, data, "smoothing", fp16=True, crops=5)
    train_set = train_set_of(data)
    store = import_labels(str(source), train_set, str(tmp_path / "store"))
    meta = store.meta
    assert meta["imported"] == {"source": str(source), "label_type": "smoothing", "layout": "fkd",
                                "num_files": len(train_set), "dtype": "float16"}
    assert meta["teachers"] == [{"name": "released", "sha256": None}]
    assert (meta["crop_scale"], meta["crop_ratio"], meta["seed"]) == (None, None, None)
    assert (meta["temperature"], meta["stores"], meta["codec"], meta["k"]) == (1.0, "probs", "smooth", 1)
    sizes = np.asarray(store.arrays["sizes"])
    assert [tuple(s) for s in sizes] == [Image.open(p).size for p, _ in train_set.samples]
    # a store is created only in a new or empty folder: a user's file is never touched
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="holds other files"):
        import_labels(str(source), train_set, str(busy))
    assert os.listdir(busy) == ["notes.txt"]
    # another release into an existing store is refused, naming what differs
    write_release(tmp_path / "other", data, "hard", crops=5)
    with pytest.raises(StoreError, match="holds other labels than an import of"):
        import_labels(str(tmp_path / "other"), train_set, str(tmp_path / "store"))
    with pytest.raises(StoreError, match="--import-label-type marginal_renorm does not fit"):
        import_labels(str(source), train_set, str(tmp_path / "store2"), label_type="marginal_renorm")


def test_meal_layout_and_wrong_folder_hint(tmp_path, data):
    source = tmp_path / "release"
    write_release(source, data, "marginal_smoothing_k5", layout="meal", crops=4)
    train_set = train_set_of(data)
    assert os.path.isdir(source / "imagenet" / "train")  # <data folder>/train/<class>/<name>
    hint = f"has no train/; it holds imagenet/train, so pass --import-from {source / 'imagenet'} with"
    with pytest.raises(StoreError, match=re.escape(hint)):
        import_labels(str(source), train_set, str(tmp_path / "s1"), layout="fkd")
    meal = import_labels(str(source), train_set, str(tmp_path / "s2"), layout="meal")
    fkd = import_labels(str(source / "imagenet"), train_set, str(tmp_path / "s3"), layout="fkd")
    assert meal.complete and fkd.complete
    a, b = store_arrays(meal.path), store_arrays(fkd.path)
    assert all(np.array_equal(a[name], b[name]) for name in a)


def test_killed_import_resumes_to_the_same_bytes(tmp_path, data, monkeypatch):
    source = tmp_path / "release"
    write_release(source, data, "marginal_smoothing_k10", crops=6)
    train_set = train_set_of(data)
    clean = store_arrays(import_labels(str(source), train_set, str(tmp_path / "clean")).path)
    original, calls = released.ReleasedFiles.__getitem__, []

    def killed_after_five(self, i):
        calls.append(i)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return original(self, i)

    monkeypatch.setattr(released, "FLUSH_EVERY", 2)
    monkeypatch.setattr(released.ReleasedFiles, "__getitem__", killed_after_five)
    with pytest.raises(KeyboardInterrupt):
        import_labels(str(source), train_set, str(tmp_path / "store"))
    assert 0 < np.load(tmp_path / "store" / "done.npy").sum() < len(train_set)
    monkeypatch.setattr(released.ReleasedFiles, "__getitem__", original)
    calls.clear()
    assert import_labels(str(source), train_set, str(tmp_path / "store")).complete
    resumed = store_arrays(str(tmp_path / "store"))
    assert resumed.keys() == clean.keys() and all(np.array_equal(resumed[k], clean[k]) for k in clean)


def test_torchrun_ranks_split_the_import(tmp_path, data):
    source = tmp_path / "release"
    write_release(source, data, "marginal_smoothing_k5", crops=6)
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        from torchvision.datasets import ImageFolder
        from common.dist import setup, cleanup
        from fkd_released import import_labels
        ctx = setup("cpu")
        store = import_labels({str(source)!r}, ImageFolder({os.path.join(data, 'train')!r}),
                              {str(tmp_path / 'store')!r}, ctx=ctx)
        print("rank", ctx.rank, "complete", store.complete)
        cleanup()
    """))
    result = run_script(torchrun(2) + [str(driver)])
    assert "rank 0 complete True" in result.stdout
    assert "imported 12 label files (72 crops)" in result.stdout
    single = store_arrays(import_labels(str(source), train_set_of(data), str(tmp_path / "single")).path)
    both = store_arrays(str(tmp_path / "store"))
    assert not [name for name in os.listdir(tmp_path / "store") if name.startswith(".import")]
    assert all(np.array_equal(both[k], single[k]) for k in single)


# -------------------------------------------------------------------------------------------------
# Disk: our store against the released files
# -------------------------------------------------------------------------------------------------
IMAGENET_TRAIN = 1_281_167


@pytest.mark.parametrize("fp16", [False, True])
def test_store_bytes_per_crop_against_released_files(tmp_path, fp16):
    """ms K = 5, 500 crops, 1000 classes (the recommended release): prints the ImageNet totals
    (`pytest tests/test_released.py -k bytes -s`)."""
    data = make_data(tmp_path / "d", classes=6, per_class=1)
    train_set = train_set_of(data)
    source = tmp_path / "release"
    rng = np.random.default_rng(0)
    for path, _ in train_set.samples:
        probs = torch.softmax(torch.from_numpy(rng.normal(size=(500, 1000)) * 4).float(), 1)
        order = probs.argsort(1, descending=True)[:, :5]
        labels = torch.stack([(order % 6).float(), probs.gather(1, order)], 1).numpy()  # 6 classes here
        h, w = rng.integers(100, 376, 500), rng.integers(100, 501, 500)  # crops of a 500 x 375 image
        i, j = rng.integers(0, 376 - h), rng.integers(0, 501 - w)
        coords = np.stack([i / 375, j / 500, h / 375, w / 500], 1).astype(np.float32)
        flips = rng.random(500) < 0.5
        if fp16:
            coords, labels = np.float16(coords), np.float16(labels)
        file = os.path.join(source, released.label_file_key(path, "fkd"))
        os.makedirs(os.path.dirname(file), exist_ok=True)
        torch.save([coords, flips, labels], file)
    released_bytes = sum(os.path.getsize(os.path.join(source, released.label_file_key(p, "fkd")))
                         for p, _ in train_set.samples) / (6 * 500)
    store = import_labels(str(source), train_set, str(tmp_path / "store"))
    # box 4 x uint16, flip, 5 x uint16 indices, 5 values: float16 for the fp16 release, float32 for
    # the fp32 one (kept exact)
    record = 8 + 1 + 5 * 2 + 5 * (2 if fp16 else 4)
    per_image = 2 * 2 + 1  # sizes, done flag
    headers = len(LabelStore.array_specs(store.meta)) * 128
    assert store.bytes_on_disk() == 6 * 500 * record + 6 * per_image + headers
    assert released_bytes > record
    ours = (record * 500 + per_image) * IMAGENET_TRAIN / 1e9
    print(f"\nms K=5, 500 crops, {'fp16' if fp16 else 'fp32'} release: released files "
          f"{released_bytes:.1f} B/crop -> {released_bytes * IMAGENET_TRAIN * 500 / 1e9:.1f} GB for "
          f"ImageNet; imported store {record} B/crop + {per_image} B/image -> {ours:.1f} GB")


# -------------------------------------------------------------------------------------------------
# Released checkpoints: torchvision key names, under state_dict or not, with module. or not
# -------------------------------------------------------------------------------------------------
def test_released_resnet50_checkpoints_load_and_evaluate(tmp_path, data, capsys, monkeypatch):
    import fkd
    from common.models import create
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(num_classes=CLASSES).eval()
    with torch.no_grad():  # BN statistics that make the random network's predictions vary
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 2.0)
                module.running_mean.normal_(0, 0.1)
    state = reference.state_dict()
    module_state = {f"module.{k}": v for k, v in state.items()}
    layouts = {  # MEAL V2 hub files: DataParallel state_dict; FKD train_FKD.py: a dict with state_dict
        "meal_v2.pth": module_state,
        "fkd.pth.tar": {"epoch": 300, "arch": "resnet50", "state_dict": module_state,
                        "best_acc1": torch.tensor(80.1), "optimizer": {"state": {}, "param_groups": []}},
        "torchvision.pth": state,
    }
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference(images)
    for name, content in layouts.items():
        torch.save(content, tmp_path / name)
        model, _ = create(f"resnet50={tmp_path / name}", CLASSES, pretrained_head="reset")
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(images), expected, rtol=1e-4, atol=1e-4)
    # fkd.py --init resnet50=PATH --eval-only reports the same top-1/top-5 as torchvision's model
    val = ImageFolder(os.path.join(data, "val"), torchvision.transforms.Compose([
        torchvision.transforms.Resize(73), torchvision.transforms.CenterCrop(64),
        torchvision.transforms.PILToTensor()]))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    batch = torch.stack([x for x, _ in val])
    targets = torch.tensor([y for _, y in val])
    with torch.no_grad():
        top5 = reference((batch.float() - mean) / std).topk(5, 1).indices
    top1_ref = 100 * (top5[:, 0] == targets).float().mean().item()
    top5_ref = 100 * (top5 == targets[:, None]).any(1).float().mean().item()
    assert 0 < top5_ref < 100  # the check can tell a loaded model from a random one
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    fkd.main(["--data", data, "--init", f"resnet50={tmp_path / 'fkd.pth.tar'}", "--eval-only",
              "--input-size", "64", "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert f"top-1 {top1_ref:.2f}% top-5 {top5_ref:.2f}% on {len(val)} images" in out, out


def test_fkd_cli_imports_as_marginal_renorm(tmp_path, data):
    """`fkd.py --mode import --import-label-type marginal_renorm`: the CLI hook reaches the import
    with the label type asked for, and a second run finds the store complete."""
    import fkd
    write_release(tmp_path / "release", data, "marginal_smoothing_k5")
    argv = ["--data", data, "--mode", "import", "--import-from", str(tmp_path / "release"),
            "--labels", str(tmp_path / "store"), "--import-label-type", "marginal_renorm",
            "--out", str(tmp_path / "out"), "--workers", "0"]
    fkd.main(argv)
    meta = LabelStore.open(str(tmp_path / "store")).meta
    assert meta["codec"] == "mr" and meta["imported"]["label_type"] == "marginal_renorm"
    assert LabelStore.open(str(tmp_path / "store")).done.all()
