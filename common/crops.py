"""Random-resized-crop sampling that depends only on (seed, image index, stream, crop index), and exact replay:
a crop is an integer pixel box of the original image (top, left, height, width) plus a flip bit, so label
generation and training cut exactly the same region (FKD Sec. 3.1). Replay is crop-then-resize, the pixels of
torchvision's `resized_crop` on a PIL image, which the official code runs in both phases."""
import math

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before falling back to a center crop
CHUNK = 64  # crops drawn per random stream: crop i comes from chunk i // CHUNK, row i % CHUNK


def sample_crops(seed, index, width, height, num_crops, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), stream=0):
    """Boxes int64 [num_crops, 4] (top, left, height, width) and flips bool [num_crops] of one image, drawn as
    torchvision's RandomResizedCrop + RandomHorizontalFlip; crop i depends only on (seed, index, stream, i)
    and the image size, never on num_crops, worker count, shuffle order or restarts."""
    # Each crop has its own fixed draws (in chunk i // CHUNK): stores with M = 200 and M = 500 share 200 crops.
    draws = 2 * ATTEMPTS + 3  # area and ratio per attempt, top and left, flip
    u = np.concatenate([np.random.default_rng([seed, index, stream, chunk]).random((CHUNK, draws))
                        for chunk in range(math.ceil(num_crops / CHUNK))])[:num_crops]
    area_frac = scale[0] + (scale[1] - scale[0]) * u[:, :ATTEMPTS]
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, ATTEMPTS:2 * ATTEMPTS]
    pos, flips = u[:, 2 * ATTEMPTS:2 * ATTEMPTS + 2], u[:, -1] < 0.5
    area, aspect = width * height * area_frac, np.exp(log_ratio)
    w = np.rint(np.sqrt(area * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(area / aspect)).astype(np.int64)
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = ok.argmax(axis=1)  # the first attempt that fits
    w, h = w[np.arange(num_crops), first], h[np.arange(num_crops), first]

    # Fallback (no attempt fitted): the largest centered box whose ratio is clamped to `ratio`.
    bad, in_ratio = ~ok.any(axis=1), width / height
    w[bad], h[bad] = ((width, int(round(width / ratio[0]))) if in_ratio < ratio[0] else
                      (int(round(height * ratio[1])), height) if in_ratio > ratio[1] else (width, height))
    top = np.floor(pos[:, 0] * (height - h + 1)).astype(np.int64)
    left = np.floor(pos[:, 1] * (width - w + 1)).astype(np.int64)
    top[bad], left[bad] = (height - h[bad]) // 2, (width - w[bad]) // 2
    return np.stack([top, left, h, w], axis=1), flips


def replay_crops(image, boxes, flips, size, interpolation="bilinear"):
    """The boxes cut from `image`, resized to size x size and flipped -> uint8 [len(boxes), C, size, size], the
    same bytes for the same input. `image`: PIL RGB (every loader: crop, then PIL's resize; `resize(box=...)`
    would let the filter read pixels outside the box) or uint8 CHW on any device (antialiased tensor resize)."""
    boxes = np.asarray(boxes).tolist()
    if isinstance(image, Image.Image):
        resample = getattr(Image, interpolation.upper())  # Image.BILINEAR, Image.BICUBIC, ...
        out = torch.empty((len(boxes), 3, size, size), dtype=torch.uint8)
        for i, (top, left, h, w) in enumerate(boxes):
            crop = image.crop((left, top, left + w, top + h)).resize((size, size), resample)
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
