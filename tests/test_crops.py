"""Crop sampling depends only on (seed, image, stream); replay cuts exactly the recorded box."""
import numpy as np
from PIL import Image, ImageFilter
import torch

from common.crops import replay_crops, sample_crops


def test_crops_deterministic_and_independent_of_call_order():
    a = sample_crops(3, 17, 500, 375, 50)
    sample_crops(3, 16, 500, 375, 50)  # other images in between change nothing
    b = sample_crops(3, 17, 500, 375, 50)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    c = sample_crops(4, 17, 500, 375, 50)
    assert not np.array_equal(a[0], c[0])
    e = sample_crops(3, 17, 500, 375, 50, stream=1)
    assert not np.array_equal(a[0], e[0])


def test_crops_follow_random_resized_crop_bounds():
    boxes, flips = sample_crops(0, 1, 500, 375, 2000, scale=(0.08, 1.0))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 375).all() and (left + w <= 500).all()
    area = h * w / (500 * 375)
    assert area.min() >= 0.07 and area.max() <= 1.0
    ratio = w / h
    assert ratio.min() > 0.74 and ratio.max() < 1.35
    assert 0.45 < flips.mean() < 0.55


def test_crops_fallback_on_extreme_aspect():
    boxes, _ = sample_crops(0, 0, 400, 10, 5, scale=(0.9, 1.0))
    top, left, h, w = boxes.T
    assert (w <= 400).all() and (h <= 10).all()


def test_replay_is_exact_crop_and_flip():
    image = torch.arange(3 * 20 * 30, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, 20, 30)
    boxes = np.array([[2, 3, 10, 12], [0, 0, 20, 30]])
    out = replay_crops(image, boxes, np.array([False, True]), size=10, interpolation="nearest")
    assert out.shape == (2, 3, 10, 10)
    big = replay_crops(image, np.array([[2, 3, 10, 10]]), np.array([True]), size=10)
    assert torch.equal(big[0], image[:, 2:12, 3:13].flip(-1))


def test_pil_replay_matches_tensor_replay():
    """The loaders' fast PIL path: exact for an unscaled box, within rounding of the tensor path when resizing."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(pixels).resize((60, 40), Image.BILINEAR).filter(ImageFilter.GaussianBlur(2)))
    image = Image.fromarray(pixels)
    tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()
    same = replay_crops(image, np.array([[5, 7, 16, 16]]), np.array([True]), size=16)
    assert torch.equal(same[0], tensor[:, 5:21, 7:23].flip(-1))
    boxes, flips = sample_crops(3, 0, 60, 40, 6)
    fast = replay_crops(image, boxes, flips, 24).float()
    reference = replay_crops(tensor, boxes, flips, 24).float()
    assert (fast - reference).abs().mean() < 1.0 and (fast - reference).abs().max() <= 8
