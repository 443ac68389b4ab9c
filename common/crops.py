"""Random-resized-crop sampling that depends only on (seed, image index, stream), and exact replay.

A crop is an integer pixel box of the original image (top, left, height, width) plus a flip bit,
so the label-generation phase and the training phase cut exactly the same region (FKD Sec. 3.1).
"""
import math

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before falling back to a center crop


def sample_crops(seed, index, width, height, num_crops, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 stream=0):
    """Sample `num_crops` RandomResizedCrop boxes and flips for one image.

    The result depends only on (seed, index, stream) and the image size: never on worker count,
    shuffle order or restarts. Same distribution as torchvision.transforms.RandomResizedCrop.
    Returns boxes int64 [num_crops, 4] as (top, left, height, width) and flips bool [num_crops].
    """
    rng = np.random.default_rng([seed, index, stream])
    # All draws have fixed shapes, so crop i's box never depends on how many attempts crop j needed.
    area_frac = rng.uniform(scale[0], scale[1], size=(num_crops, ATTEMPTS))
    log_ratio = rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(num_crops, ATTEMPTS))
    pos = rng.random(size=(num_crops, 2))
    flips = rng.random(num_crops) < 0.5

    area = width * height * area_frac
    aspect = np.exp(log_ratio)
    w = np.rint(np.sqrt(area * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(area / aspect)).astype(np.int64)
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = ok.argmax(axis=1)
    rows = np.arange(num_crops)
    w, h = w[rows, first], h[rows, first]

    # Fallback (no attempt fitted): the largest centered box whose ratio is clamped to `ratio`.
    bad = ~ok.any(axis=1)
    if bad.any():
        in_ratio = width / height
        if in_ratio < ratio[0]:
            fw, fh = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            fw, fh = int(round(height * ratio[1])), height
        else:
            fw, fh = width, height
        w[bad], h[bad] = fw, fh

    top = np.floor(pos[:, 0] * (height - h + 1)).astype(np.int64)
    left = np.floor(pos[:, 1] * (width - w + 1)).astype(np.int64)
    top[bad], left[bad] = (height - h[bad]) // 2, (width - w[bad]) // 2
    boxes = np.stack([top, left, h, w], axis=1)
    return boxes, flips


PIL_RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


def replay_crops(image, boxes, flips, size, interpolation="bilinear"):
    """Cut the recorded boxes out of an image, resize each to size x size, apply its flip.

    `image`: a PIL RGB image (the fast path used by every loader: PIL's SIMD crop-and-resize in one
    call, ~30x faster than resizing uint8 tensors on CPU) or a uint8 CHW tensor on any device.
    Returns uint8 [len(boxes), C, size, size]. The same input always gives the same bytes, so label
    generation and training see identical crops.
    """
    boxes = np.asarray(boxes).tolist()
    if isinstance(image, Image.Image):
        out = torch.empty((len(boxes), 3, size, size), dtype=torch.uint8)
        for i, (top, left, h, w) in enumerate(boxes):
            crop = image.resize((size, size), PIL_RESAMPLE[interpolation], box=(left, top, left + w, top + h))
            if flips[i]:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            out[i] = torch.from_numpy(np.array(crop, dtype=np.uint8)).permute(2, 0, 1)
        return out
    mode = InterpolationMode(interpolation)
    out = torch.empty((len(boxes), image.shape[0], size, size), dtype=image.dtype, device=image.device)
    for i, (top, left, h, w) in enumerate(boxes):
        crop = TF.resized_crop(image, top, left, h, w, [size, size], interpolation=mode, antialias=True)
        out[i] = TF.horizontal_flip(crop) if flips[i] else crop
    return out
