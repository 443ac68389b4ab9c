"""FKD label codecs (Sec. 3.5, Eq. 3-7) against hand-computed values, and the label store."""
import json
import os

import numpy as np
import pytest
import torch

from common.labels import LabelStore, StoreError, decode, encode

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


META = {"codec": "ms", "k": 2, "num_crops": 3, "num_classes": 5, "num_images": 4,
        "image_list_sha256": "abc", "stores": "probs", "temperature": 1.0}


def test_store_roundtrip_and_layout(tmp_path):
    store = LabelStore.create(str(tmp_path / "s"), META)
    boxes = np.array([[1, 2, 30, 40], [0, 0, 10, 10], [5, 6, 7, 8]])
    flips = np.array([1, 0, 1])
    indices, values = encode(P[[0, 1, 0]], "ms", 2)
    store.write(2, slice(0, 3), boxes, flips, indices.numpy(), values.numpy())
    store.mark_done([2])
    again = LabelStore.open(str(tmp_path / "s"))
    b, f, i, v = again.read(2, np.array([2, 0]))
    assert b.tolist() == [[5, 6, 7, 8], [1, 2, 30, 40]] and f.tolist() == [True, True]
    assert i.tolist() == [[0, 1], [0, 1]]
    assert np.asarray(again.done).tolist() == [0, 0, 1, 0]
    # ~29 bytes/crop for ms K=5 at scale; here K=2: 8 (box) + 1 (flip) + 4 (idx) + 4 (val) = 17 + headers
    assert again.arrays["boxes"].dtype == np.uint16 and again.arrays["values"].dtype == np.float16
    names = sorted(os.listdir(tmp_path / "s"))
    assert names == ["boxes.npy", "done.npy", "flips.npy", "indices.npy", "meta.json", "values.npy"]


def test_store_bytes_per_crop_ms_k5(tmp_path):
    meta = dict(META, k=5, num_crops=100, num_classes=1000, num_images=200)
    store = LabelStore.create(str(tmp_path / "s"), meta)
    # 8 + 1 + 10 + 10 = 29 bytes per crop, plus the done flag and .npy headers
    assert 29 <= store.bytes_per_crop() < 29.1


def test_store_refuses_other_images_codec_classes(tmp_path):
    store = LabelStore.create(str(tmp_path / "s"), META)
    with pytest.raises(StoreError, match="image_list_sha256.*codec"):
        store.check_matches(dict(META, image_list_sha256="other", codec="mr"))
    with pytest.raises(StoreError, match="num_classes"):
        store.check_matches(dict(META, num_classes=6))


def test_store_refuses_newer_format_and_truncated_arrays(tmp_path):
    path = tmp_path / "s"
    LabelStore.create(str(path), META)
    meta = json.loads((path / "meta.json").read_text())
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
