"""FKD label codecs (Sec. 3.5, Eq. 3-7) against hand-computed values, and the label store."""
import errno
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from common import labels
from common.data import TaggedSampler
from common.labels import (IDENTITY, LabelStore, StoreError, StoredCrops, decode, decode_stored_batch, encode,
                           open_for_generation, teacher_identity)

P = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05],
                  [0.05, 0.05, 0.1, 0.6, 0.2]])


def roundtrip(codec, k=2, probs=P):
    indices, values = encode(probs, codec, k)
    return decode(indices, values, codec, probs.shape[1])


def test_full_is_exact():
    probs = torch.softmax(torch.randn(7, 11), dim=1)
    assert torch.equal(roundtrip("full", probs=probs), probs)


def test_hard_eq3_is_one_hot_argmax():
    expected = torch.tensor([[1.0, 0, 0, 0, 0], [0, 0, 0, 1.0, 0]])
    assert torch.equal(roundtrip("hard"), expected)


def test_smooth_eq4_hand_computed():
    # row 0: argmax 0 with p=0.5, others (1 - 0.5) / (5 - 1) = 0.125
    out = roundtrip("smooth")
    torch.testing.assert_close(out[0], torch.tensor([0.5, 0.125, 0.125, 0.125, 0.125]), atol=1e-3, rtol=0)
    torch.testing.assert_close(out[1], torch.tensor([0.1, 0.1, 0.1, 0.6, 0.1]), atol=1e-3, rtol=0)


def test_marginal_smoothing_eq5_hand_computed():
    # row 0, K=2: keep 0.5 and 0.2; the others share (1 - 0.7) / (5 - 2) = 0.1
    out = roundtrip("ms", k=2)
    torch.testing.assert_close(out[0], torch.tensor([0.5, 0.2, 0.1, 0.1, 0.1]), atol=1e-3, rtol=0)
    # row 1: keep 0.6 (class 3) and 0.2 (class 4); others (1 - 0.8) / 3
    torch.testing.assert_close(out[1], torch.tensor([0.2 / 3, 0.2 / 3, 0.2 / 3, 0.6, 0.2]), atol=1e-3, rtol=0)
    torch.testing.assert_close(out.sum(1), torch.ones(2), atol=2e-3, rtol=0)


def test_marginal_renorm_eq6_eq7_hand_computed():
    # row 0, K=2: 0.5 / 0.7 and 0.2 / 0.7, zeros elsewhere
    out = roundtrip("mr", k=2)
    torch.testing.assert_close(out[0], torch.tensor([0.5 / 0.7, 0.2 / 0.7, 0, 0, 0]), atol=1e-3, rtol=0)
    assert (out[1, :3] == 0).all()


def test_marginal_mass_never_negative_with_fp16_overshoot():
    # fp16 top-K values that sum above 1 must not give negative probabilities
    indices = torch.tensor([[0, 1]])
    values = torch.tensor([[0.7, 0.3008]], dtype=torch.float16)
    assert values.float().sum() > 1
    out = decode(indices, values, "ms", 4)
    assert (out >= 0).all()
    assert out[0, 2] == 0 and out[0, 3] == 0


def test_logits_store_applies_temperature_at_decode():
    logits = torch.tensor([[2.0, 0.0, -2.0]])
    _, values = encode(logits, "full")
    out = decode(None, values, "full", 3, logits_temperature=4.0)
    torch.testing.assert_close(out, torch.softmax(logits / 4.0, dim=1))


META = {"codec": "ms", "k": 2, "num_crops": 3, "num_classes": 5, "num_images": 4, "label_dim": 5,
        "image_list_sha256": "a" * 64, "classes_sha256": "c" * 64, "stores": "probs", "temperature": 1.0,
        "teachers": [{"name": "test_resnet", "sha256": "f" * 64, "input_size": 32}],
        "crop_scale": [0.08, 0.936], "crop_ratio": [0.75, 4 / 3], "seed": 0}


def test_store_roundtrip_and_layout(tmp_path):
    store = LabelStore.create(str(tmp_path / "s"), META)
    boxes = np.array([[1, 2, 30, 40], [0, 0, 10, 10], [5, 6, 7, 8]])
    flips = np.array([1, 0, 1])
    indices, values = encode(P[[0, 1, 0]], "ms", 2)
    store.write(2, slice(0, 3), boxes, flips, indices.numpy(), values.numpy(), size=(41, 33))
    store.mark_done([2])
    again = LabelStore.open(str(tmp_path / "s"))
    b, f, i, v = again.read(2, np.array([2, 0]))
    assert b.tolist() == [[5, 6, 7, 8], [1, 2, 30, 40]] and f.tolist() == [True, True]
    assert i.tolist() == [[0, 1], [0, 1]]
    assert np.asarray(again.done).tolist() == [0, 0, 1, 0]
    # ~29 bytes/crop for ms K=5 at scale; here K=2: 8 (box) + 1 (flip) + 4 (idx) + 4 (val) = 17 + headers
    assert again.arrays["boxes"].dtype == np.uint16 and again.arrays["values"].dtype == np.float16
    assert again.arrays["sizes"][2].tolist() == [41, 33] and again.arrays["sizes"].dtype == np.uint16
    names = sorted(os.listdir(tmp_path / "s"))
    assert names == ["boxes.npy", "done.npy", "flips.npy", "indices.npy", "meta.json", "sizes.npy", "values.npy"]


def test_store_bytes_per_crop_ms_k5(tmp_path):
    meta = dict(META, k=5, num_crops=100, num_classes=1000, num_images=200)
    store = LabelStore.create(str(tmp_path / "s"), meta)
    # 8 + 1 + 10 + 10 = 29 bytes per crop, plus 4 + 1 bytes per image (size, done) and .npy headers
    assert 29 <= store.bytes_per_crop() < 29.1
    assert store.bytes_on_disk() == LabelStore.planned_bytes(store.meta)


OTHER = {"num_images": 5, "image_list_sha256": "b" * 64, "num_classes": 6, "classes_sha256": "d" * 64,
         "label_dim": 6, "teachers": [{"name": "test_resnet", "sha256": "e" * 64, "input_size": 32}],
         "crop_scale": [0.08, 1.0], "crop_ratio": [0.5, 2.0], "seed": 1, "num_crops": 4, "codec": "mr",
         "k": 3, "temperature": 4.0, "stores": "logits"}


@pytest.mark.parametrize("field", IDENTITY)
def test_store_identity_refuses_each_field(field, tmp_path):
    """Every identity field is compared, and the sentence names the one that differs."""
    assert set(OTHER) == set(IDENTITY)
    store = LabelStore.create(str(tmp_path / "s"), META)
    store.check_matches(dict(META))  # the same identity passes
    with pytest.raises(StoreError, match=f"^label store .* made with other settings \\({field}: store") as error:
        store.check_matches(dict(META, **{field: OTHER[field]}))
    assert str(error.value).count(": store ") == 1 and "\n" not in str(error.value)


def test_teachers_compared_by_name_and_file_hash_not_data_config(tmp_path):
    weights = tmp_path / "t.pth"
    weights.write_bytes(b"teacher weights")
    identity = teacher_identity([f"test_resnet={weights}", "resnet50.a1_in1k"])
    assert identity == [{"name": "test_resnet", "sha256": hashlib.sha256(b"teacher weights").hexdigest()},
                        {"name": "resnet50.a1_in1k", "sha256": None}]
    store = LabelStore.create(str(tmp_path / "s"), dict(META, teachers=[dict(identity[0], input_size=32)]))
    store.check_matches({"teachers": identity[:1]})  # data configs are not part of the comparison
    weights.write_bytes(b"other weights")  # same name, another file
    with pytest.raises(StoreError, match="teachers: store \\[test_resnet \\(sha256"):
        store.check_matches({"teachers": teacher_identity([f"test_resnet={weights}"])})


def test_store_refuses_other_images_codec_classes(tmp_path):
    store = LabelStore.create(str(tmp_path / "s"), META)
    with pytest.raises(StoreError, match="image_list_sha256.*codec"):
        store.check_matches(dict(META, image_list_sha256="other", codec="mr"))
    with pytest.raises(StoreError, match="num_classes"):
        store.check_matches(dict(META, num_classes=6))


def test_store_is_made_only_in_a_new_or_empty_folder_or_over_a_store(tmp_path):
    users = tmp_path / "users"
    users.mkdir()
    (users / "values.npy").write_bytes(b"the user's own data")
    with pytest.raises(StoreError, match="holds other files \\(values.npy\\) and no label store"):
        LabelStore.create(str(users), META)
    with pytest.raises(StoreError, match="holds other files"):
        LabelStore.create(str(users), META, replace=True)
    assert os.listdir(users) == ["values.npy"] and (users / "values.npy").read_bytes() == b"the user's own data"
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file, not a folder"):
        LabelStore.create(str(tmp_path / "file"), META)
    (tmp_path / "empty").mkdir()
    LabelStore.create(str(tmp_path / "empty"), META)
    with pytest.raises(StoreError, match="already holds a label store; pass --overwrite-labels"):
        LabelStore.create(str(tmp_path / "empty"), META)
    (tmp_path / "empty" / "notes.txt").write_text("kept")  # a file of the user's beside a store
    LabelStore.create(str(tmp_path / "empty"), dict(META, k=3), replace=True)
    assert (tmp_path / "empty" / "notes.txt").read_text() == "kept"
    assert LabelStore.open(str(tmp_path / "empty")).meta["k"] == 3


def test_generation_resumes_same_store_and_explains_a_changed_image_list(tmp_path):
    path = str(tmp_path / "s")
    store = open_for_generation(path, META)
    store.write(0, slice(0, 3), np.zeros((3, 4)), np.zeros(3), np.zeros((3, 2)), np.zeros((3, 2)), size=(9, 9))
    store.mark_done([0])
    assert open_for_generation(path, META).done_count() == 1  # same identity: resumed
    # a bad image was removed after the first run stopped on it: say so, and what to do
    with pytest.raises(StoreError, match="incomplete \\(1 of 4 images labelled\\).*num_images: store 4, this run 3.*"
                                         "--overwrite-labels"):
        open_for_generation(path, dict(META, num_images=3, image_list_sha256="b" * 64))
    with pytest.raises(StoreError, match="other settings \\(codec"):
        open_for_generation(path, dict(META, codec="mr"))
    assert open_for_generation(path, dict(META, num_images=3), overwrite=True).done_count() == 0


def test_interrupted_creation_is_made_again(tmp_path, monkeypatch):
    path = str(tmp_path / "s")

    def full_disk(fd, offset, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "posix_fallocate", full_disk, raising=False)
    with pytest.raises(StoreError, match="No space left on device.*free disk space.*run the same command again"):
        open_for_generation(path, META)
    with pytest.raises(StoreError, match="not fully created"):
        LabelStore.open(path).done
    monkeypatch.undo()
    assert open_for_generation(path, META).ready


@pytest.mark.parametrize("fallocate", ["missing", "unsupported"])
def test_without_posix_fallocate_the_store_is_created_sparse(fallocate, tmp_path, monkeypatch):
    """macOS has no os.posix_fallocate; some filesystems answer EOPNOTSUPP: fall back, no error."""
    if fallocate == "missing":
        monkeypatch.delattr(os, "posix_fallocate", raising=False)
    else:
        def unsupported(fd, offset, size):
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        monkeypatch.setattr(os, "posix_fallocate", unsupported, raising=False)
    store = LabelStore.create(str(tmp_path / "s"), META)
    assert store.bytes_on_disk() == LabelStore.planned_bytes(store.meta)


def test_free_disk_checked_before_allocating(tmp_path, monkeypatch):
    monkeypatch.setattr(labels, "free_bytes", lambda path: 1000)
    with pytest.raises(StoreError, match="the label store needs .* but .* has 1.0 kB free; free disk space"):
        LabelStore.create(str(tmp_path / "s"), dict(META, num_images=100))
    assert not os.path.exists(tmp_path / "s")


@pytest.mark.parametrize("meta,needle", [({}, "lacks format_version, codec"),
                                         (dict(META, format_version=2, codec="zip"), "unknown codec 'zip'"),
                                         ([1, 2], "lacks format_version")])
def test_damaged_meta_is_one_sentence(meta, needle, tmp_path):
    path = tmp_path / "s"
    LabelStore.create(str(path), META)
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=needle) as error:
        LabelStore.open(str(path))
    assert "--overwrite-labels" in str(error.value)


def make_labelled_store(tmp_path, size=(30, 20)):
    image = tmp_path / "img.png"
    Image.new("RGB", size, (200, 10, 10)).save(image)
    store = LabelStore.create(str(tmp_path / "s"), dict(META, num_images=1))
    indices, values = encode(P[[0, 1, 0]], "ms", 2)
    store.write(0, slice(0, 3), np.array([[0, 0, 10, 10]] * 3), np.zeros(3), indices.numpy(), values.numpy(), size)
    store.mark_done([0])
    return LabelStore.open(store.path), [(str(image), 0)]


def test_changed_image_is_refused_by_the_size_check_and_by_the_dataset(tmp_path):
    store, samples = make_labelled_store(tmp_path)
    assert store.check_image_sizes(samples)
    dataset = StoredCrops(samples, store, 2, 8, "bilinear", seed=0)
    crops, indices, values, label = dataset[(0, 0)]
    assert crops.shape == (2, 3, 8, 8) and indices.shape == (2, 2)
    Image.new("RGB", (60, 40)).save(samples[0][0])  # enlarged after labelling
    with pytest.raises(StoreError, match="img.png is 60x40 px but was 30x20 when its labels .* were made"):
        store.check_image_sizes(samples)
    assert not store.check_image_sizes(samples, limit=0)  # too many images to read now: lazily...
    with pytest.raises(StoreError, match="img.png is 60x40"):
        dataset[(0, 0)]  # ... by the dataset


def test_stored_crops_with_a_plain_sampler_says_what_to_pass(tmp_path):
    store, samples = make_labelled_store(tmp_path)
    dataset = StoredCrops(samples, store, 2, 8, "bilinear", seed=0)
    with pytest.raises(TypeError, match="wrap the sampler in common.data.TaggedSampler"):
        dataset[0]
    sampler = TaggedSampler(range(1))
    sampler.set_epoch(0, 2)
    assert [dataset[item][0].shape[0] for item in sampler] == [2]


def test_logits_store_width_is_decoupled_from_the_class_count(tmp_path):
    """SSL variant (Sec. 3.4): 8-d projection outputs of a 5-class data set, T chosen at training."""
    meta = dict(META, codec="full", k=1, stores="logits", temperature=None, label_dim=8)
    store = LabelStore.create(str(tmp_path / "s"), meta)
    assert store.arrays["values"].shape == (4, 3, 8) and "indices" not in store.arrays
    logits = torch.randn(1, 2, 8)
    for t in (1.0, 4.0):  # any temperature at training time
        out = decode_stored_batch(torch.zeros(0), logits, store.meta, "cpu", logits_temperature=t)
        torch.testing.assert_close(out, torch.softmax(logits[0] / t, dim=1))


def test_store_refuses_newer_format_and_truncated_arrays(tmp_path):
    path = tmp_path / "s"
    LabelStore.create(str(path), META)
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps(dict(meta, format_version=99)))
    with pytest.raises(StoreError, match="newer"):
        LabelStore.open(str(path))
    (path / "meta.json").write_text(json.dumps(dict(meta, format_version=1)))
    with pytest.raises(StoreError, match="format version 1 .*--overwrite-labels"):
        LabelStore.open(str(path))
    (path / "meta.json").write_text(json.dumps(dict(meta, format_version=99)))
    with pytest.raises(StoreError, match="newer"):
        LabelStore.open(str(path))
    (path / "meta.json").write_text(json.dumps(meta))
    with open(path / "values.npy", "r+b") as f:
        f.truncate(100)
    with pytest.raises(StoreError, match="truncated"):
        LabelStore.open(str(path))


def test_store_refuses_pickled_array(tmp_path):
    path = tmp_path / "s"
    LabelStore.create(str(path), META)
    marker = tmp_path / "pwned"
    payload = np.array([Exploit(str(marker))], dtype=object)
    np.save(path / "indices.npy", payload, allow_pickle=True)
    with pytest.raises(StoreError):
        LabelStore.open(str(path))
    assert not marker.exists()


class Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_teacher_precision_is_part_of_a_generation_and_fp32_by_default(tmp_path):
    """The official labels come from fp32 teachers: --amp alone keeps them fp32; --teacher-amp runs
    them in the AMP dtype, which the store records (fp32 stores keep the meta they always had)."""
    from argparse import Namespace
    from common.dist import Context
    cuda = Context(device=torch.device("cuda", 0))
    assert cuda.teacher_autocast(Namespace(amp=True, amp_dtype="bfloat16"))[1] == "float32"
    assert cuda.teacher_autocast(Namespace(amp=True, amp_dtype="bfloat16", teacher_amp=True))[1] == "bfloat16"
    assert Context().teacher_autocast(Namespace(amp=True, teacher_amp=True))[1] == "float32"  # CPU: no AMP
    path = str(tmp_path / "s")
    assert "teacher_precision" not in open_for_generation(path, META).meta
    with pytest.raises(StoreError, match="started with the teachers in float32, this run has them in float16"):
        open_for_generation(path, dict(META, teacher_precision="float16"))
