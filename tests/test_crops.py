"""Crop sampling depends only on (seed, image, stream, crop index); replay cuts exactly the
recorded box, as torchvision's resized_crop on a PIL image (the official replay)."""
import numpy as np
import pytest
from PIL import Image, ImageFilter
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

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


def test_crop_i_does_not_depend_on_the_number_of_crops():
    """Stores with M = 200 and M = 500 share their first 200 boxes and flips."""
    few = sample_crops(3, 17, 500, 375, 200, scale=(0.08, 0.936))
    many = sample_crops(3, 17, 500, 375, 500, scale=(0.08, 0.936))
    assert np.array_equal(few[0], many[0][:200]) and np.array_equal(few[1], many[1][:200])
    assert np.array_equal(sample_crops(3, 17, 500, 375, 1, scale=(0.08, 0.936))[0], many[0][:1])


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


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_pil_replay_is_torchvision_resized_crop_on_odd_sizes(interpolation):
    """The official code replays a crop with torchvision resized_crop on the PIL image (crop, then
    resize); ours must give the same bytes, also at the borders of the box, on odd image sizes."""
    rng = np.random.default_rng(1)
    for width, height in ((61, 37), (37, 61), (101, 75)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        boxes, flips = sample_crops(0, width, width, height, 12)
        out = replay_crops(image, boxes, flips, 24, interpolation)
        for i, (top, left, h, w) in enumerate(boxes.tolist()):
            reference = F.resized_crop(image, top, left, h, w, [24, 24], InterpolationMode(interpolation))
            reference = F.hflip(reference) if flips[i] else reference
            assert torch.equal(out[i], torch.from_numpy(np.array(reference)).permute(2, 0, 1))
