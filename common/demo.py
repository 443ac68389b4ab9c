"""The embedded demo (`--data demo`), built once and cached: 10 classes of shapes (disc, square, ...) of random
colour, size, rotation and position on cluttered, noisy backgrounds, where a random-resized crop often misses
the object (so a teacher's region-level soft labels beat the image label), and demo teachers trained on it
(plain cross-entropy on random crops): every method runs end to end on a laptop CPU without downloads."""
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .crops import replay_crops, sample_crops
from .ckpt import save_atomic
from .data import DataError, image_folder, load_rgb
from .dist import on_every_rank
from .models import create, normalize

VERSION = 1  # of the data set; bump when the rendering changes (invalidates caches)
TEACHER_VERSION = 2  # of the demo teachers' training (2: PIL crops)
CLASSES = ("disc", "square", "triangle", "plus", "ring", "star", "diamond", "crescent", "hexagon", "arrow")
IMAGE_SIZE = 64
TRAIN_PER_CLASS, VAL_PER_CLASS = 150, 50
DATA_CONFIG = {"input_size": IMAGE_SIZE, "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
               "std": [0.229, 0.224, 0.225], "crop_pct": 1.0}


def cache_dir():
    """The demo cache folder ($KD_DEMO_CACHE, default ~/.cache/kd_reference), created if needed."""
    path = os.environ.get("KD_DEMO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kd_reference")
    if os.path.exists(path) and not os.path.isdir(path):
        raise DataError(f"the demo cache {path} (KD_DEMO_CACHE) is a file, not a folder; set KD_DEMO_CACHE "
                        f"to a folder (or unset it)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create the demo cache {path} ({error.strerror or error}); set "
                        f"KD_DEMO_CACHE to a writable folder") from None
    return path


def _regular(n, radius, inner=None):
    """(radius, angle) corners of a regular n-gon, or of an n-pointed star with `inner` radius."""
    corners = n * (2 if inner else 1)
    return [(radius if inner is None or i % 2 == 0 else inner, 2 * math.pi * i / corners)
            for i in range(corners)]


def draw_shape(draw, kind, cx, cy, radius, angle, color, background):
    """Draw one class shape; `background` fills the cut-outs of ring and crescent."""
    def disc(x, y, r, fill):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)

    def polygon(corners, turn=angle):  # (distance from the centre, angle) of each corner
        draw.polygon([(cx + r * math.cos(turn + a), cy + r * math.sin(turn + a)) for r, a in corners],
                     fill=color)

    if kind in ("disc", "ring", "crescent"):
        disc(cx, cy, radius, color)
        if kind == "ring":
            disc(cx, cy, radius * 0.55, background)
        elif kind == "crescent":
            shift = 0.45 * radius
            disc(cx + shift * math.cos(angle), cy + shift * math.sin(angle), radius * 0.85, background)
    elif kind == "plus":
        w = radius * 0.33
        h = math.hypot(radius, w)
        bar = [(h, math.atan2(w, radius)), (h, math.atan2(-w, radius)),
               (h, math.pi - math.atan2(-w, radius)), (h, math.pi - math.atan2(w, radius))]
        for turn in (angle, angle + math.pi / 2):
            polygon(bar, turn)
    else:
        polygon({"square": _regular(4, radius), "triangle": _regular(3, radius), "hexagon": _regular(6, radius),
                 "star": _regular(5, radius, inner=radius * 0.42),
                 "diamond": [(radius, 0), (radius * 0.55, math.pi / 2), (radius, math.pi),
                             (radius * 0.55, 3 * math.pi / 2)],
                 "arrow": [(radius, 0), (radius * 0.6, 2.3), (radius * 0.35, 2.6), (radius * 0.9, 2.9),
                           (radius * 0.9, -2.9), (radius * 0.35, -2.6), (radius * 0.6, -2.3)]}[kind])


def _class_color(class_index, rng):
    """Each class has a preferred hue (neighbours overlap), so a crop showing only part of the
    object, or clutter of that hue, is ambiguous: a teacher's soft label says so, the image label cannot."""
    hue = (class_index / len(CLASSES) + rng.normal(0, 0.05)) % 1.0
    rgb = Image.new("HSV", (1, 1), (int(hue * 255), int(rng.uniform(150, 255)), int(rng.uniform(150, 255))))
    return tuple(rgb.convert("RGB").getpixel((0, 0)))


def cluttered_background(rng, size):
    """Noisy gradient with clutter in class hues -> (PIL image, its ImageDraw, base colour for cut-outs)."""
    base = rng.integers(40, 216, 3)
    grad = np.linspace(-30, 30, size)[None, :, None] * rng.choice([-1, 1], 3)
    img = Image.fromarray(np.clip(base + grad + rng.normal(0, 10, (size, size, 3)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    background = tuple(int(v) for v in base)
    for _ in range(rng.integers(6, 14)):  # clutter: strokes and small blobs, no class shapes
        color = _class_color(rng.integers(len(CLASSES)), rng)
        x, y = rng.uniform(0, size, 2)
        if rng.random() < 0.6:
            dx, dy = rng.normal(0, size / 5, 2)
            draw.line([x, y, x + dx, y + dy], fill=color, width=int(rng.integers(1, 4)))
        else:
            r = rng.uniform(1.5, 4)
            draw.rectangle([x - r, y - r * rng.uniform(0.3, 1.5), x + r, y + r], fill=color)
    return img, draw, background


def render(class_index, rng, size=IMAGE_SIZE):
    """One demo image: a shape of class `class_index` on a cluttered background."""
    img, draw, background = cluttered_background(rng, size)
    radius = rng.uniform(0.2, 0.36) * size
    cx, cy = rng.uniform(radius, size - radius, 2)
    color = _class_color(class_index, rng)
    draw_shape(draw, CLASSES[class_index], cx, cy, radius, rng.uniform(0, 2 * math.pi), color, background)
    return img


def build_once(ctx, target, build, what):
    """Run `build()` on the main process when `target` is missing (the others wait for it); a write
    error there (read-only cache, disk full) ends every process with one sentence."""
    def work():
        if not os.path.exists(target):
            try:
                build()
            except OSError as error:
                reason = error.strerror or error
                raise DataError(f"cannot write {what} into the demo cache {cache_dir()} ({reason}); set "
                                f"KD_DEMO_CACHE to a writable folder with free space") from None
    if ctx is None:
        work()
    else:
        on_every_rank(ctx, work, DataError, DataError)


def _render_set(root, write_split):
    """Write a data set into a temp folder, renamed to `root` at the end (atomic)."""
    tmp = f"{root}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_split(tmp)
        os.replace(tmp, root)
    finally:  # nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_data(ctx=None):
    """Build the demo ImageFolder once (atomically: a temp folder renamed at the end)."""
    root = os.path.join(cache_dir(), f"demo-data-v{VERSION}")

    def write(tmp):
        for split, per_class, seed in (("train", TRAIN_PER_CLASS, 0), ("val", VAL_PER_CLASS, 1)):
            for c, name in enumerate(CLASSES):
                folder = os.path.join(tmp, split, name)
                os.makedirs(folder)
                rng = np.random.default_rng([VERSION, seed, c])
                for i in range(per_class):
                    render(c, rng).save(os.path.join(folder, f"{name}_{i:04d}.jpg"), quality=92)
    build_once(ctx, root, lambda: _render_set(root, write), "the demo data set")
    return root


def train_teacher(arch, root, epochs, seed=0, batch_size=64, lr=0.1, log=print):
    """Plain cross-entropy on random-resized crops of the demo train set (in memory, CPU)."""
    train = image_folder(root, "train")
    images = [load_rgb(p) for p, _ in train.samples]
    targets = torch.tensor(train.targets)
    torch.manual_seed(seed)
    model, _ = create(arch, len(train.classes), pretrained_head="none")
    batches = len(images) // batch_size  # per epoch
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * batches, pct_start=0.15)
    model.train()
    for epoch in range(epochs):
        for batch in torch.randperm(len(images))[:batches * batch_size].view(batches, batch_size).tolist():
            boxes = [sample_crops(seed, i, IMAGE_SIZE, IMAGE_SIZE, 1, (0.25, 1), stream=1 + epoch) for i in batch]
            crops = torch.cat([replay_crops(images[i], *box, IMAGE_SIZE) for i, box in zip(batch, boxes)])
            loss = F.cross_entropy(model(normalize(crops, DATA_CONFIG["mean"], DATA_CONFIG["std"])),
                                   targets[batch], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        log(f"  demo teacher {arch}: epoch {epoch + 1}/{epochs} loss {loss.item():.3f}")
    return model


def ensure_teacher(arch, ctx=None, epochs=40, log=print):
    """Path of a demo teacher checkpoint (`arch=PATH` spec), training it once if needed."""
    root = ensure_data(ctx)
    path = os.path.join(cache_dir(), f"demo-teacher-{arch}-v{TEACHER_VERSION}-e{epochs}.pth")
    def build():
        start = time.time()
        log(f"training the demo teacher {arch} once ({epochs} epochs on CPU; cached in {path})")
        model = train_teacher(arch, root, epochs, log=log)
        save_atomic({"model": model.state_dict(), "arch": arch, "num_classes": len(CLASSES),
                     "data_config": DATA_CONFIG, "epoch": epochs}, path)
        log(f"demo teacher {arch} trained in {time.time() - start:.0f}s")
    build_once(ctx, path, build, f"the demo teacher {arch}")
    return f"{arch}={path}"


def resolve_teachers(specs, default, ctx=None, log=print):
    """Demo set: a bare name (no =PATH) is that architecture trained on it once and cached; NAME=PATH passes."""
    return [spec if "=" in spec else ensure_teacher(spec, ctx, log=log) for spec in (specs or default)]


# --- Segmentation demo: the same shapes with pixel masks (class 0 = background, shape k = class k + 1)
SEG_VERSION = 2  # of the segmentation set; bump when its rendering changes
SEG_CLASSES = ("background",) + CLASSES
SEG_IMAGE_SIZE = 64
SEG_TRAIN_IMAGES, SEG_VAL_IMAGES = 480, 160


def render_scene(rng, size=SEG_IMAGE_SIZE, max_shapes=2):
    """(image, mask): 1..max_shapes shapes of random classes and the classification set's sizes, later ones
    over earlier ones, on a cluttered background (background in the mask)."""
    img, draw, background = cluttered_background(rng, size)
    mask = Image.new("L", (size, size), 0)
    mask_draw = ImageDraw.Draw(mask)
    for _ in range(rng.integers(1, max_shapes + 1)):
        class_index = int(rng.integers(len(CLASSES)))
        radius = rng.uniform(0.2, 0.36) * size
        cx, cy = rng.uniform(radius * 0.5, size - radius * 0.5, 2)
        angle, color = rng.uniform(0, 2 * math.pi), _class_color(class_index, rng)
        draw_shape(draw, CLASSES[class_index], cx, cy, radius, angle, color, background)
        # the same shape in the mask; cut-outs (ring, crescent) show the background there
        draw_shape(mask_draw, CLASSES[class_index], cx, cy, radius, angle, class_index + 1, 0)
    return img, mask


def ensure_segmentation_data(ctx=None):
    """Build the segmentation demo set once, in the images/ + masks/ layout of frskd_seg_data
    (train/ and val/; masks are grayscale PNGs of class ids), atomically like ensure_data."""
    root = os.path.join(cache_dir(), f"demo-seg-v{SEG_VERSION}")

    def write(tmp):
        for split, count, seed in (("train", SEG_TRAIN_IMAGES, 0), ("val", SEG_VAL_IMAGES, 1)):
            os.makedirs(os.path.join(tmp, split, "images"))
            os.makedirs(os.path.join(tmp, split, "masks"))
            rng = np.random.default_rng([SEG_VERSION, seed, 1000])
            for i in range(count):
                image, mask = render_scene(rng)
                image.save(os.path.join(tmp, split, "images", f"scene_{i:04d}.jpg"), quality=92)
                mask.save(os.path.join(tmp, split, "masks", f"scene_{i:04d}.png"))
    build_once(ctx, root, lambda: _render_set(root, write), "the segmentation demo set")
    return root
