"""ImageFolder loading (DIR/train/<class>/<image>, DIR/val/...) with one-sentence errors, transforms, mixing,
sharded evaluation. Images travel as uint8 CHW tensors, normalized on the training device."""
import math
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from .crops import replay_crops, sample_crops
from .dist import derive_seed, quiet_worker, seeded
from .models import normalize


class DataError(ValueError):
    """Input data that cannot be used: missing folders, empty classes, unreadable images."""


def load_rgb(path):
    """Any PIL-readable image (grayscale, CMYK, palette, alpha, 16-bit) as an RGB PIL image."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16/32-bit grayscale: scale to 8 bits instead of clipping at 255
                array = np.asarray(img, dtype=np.float64)
                peak = 65535.0 if img.mode.startswith("I;16") else max(array.max(), 1.0)
                img = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8))
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, img)
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {path} ({error}); remove or replace the file") from None


def check_symlinks(folder):
    """Refuse directory symlinks that make ImageFolder (which follows them) read images twice: a loop
    (`class/up -> ..`) or a folder the walk reaches anyway; class folders linked from elsewhere are fine."""
    seen = {os.path.realpath(folder): folder}  # real folder -> the path that reached it first
    for current, dirs, _ in os.walk(folder, followlinks=True):
        real_current = os.path.realpath(current)
        for name in dirs:
            path = os.path.join(current, name)
            target = os.path.realpath(path)
            if os.path.islink(path) and (target == real_current or real_current.startswith(target + os.sep)):
                raise DataError(f"{path} is a symlink to {target}, a folder that contains it: a loop "
                                f"that would read the same images again and again; remove the symlink")
            if target in seen:
                raise DataError(f"{path} and {seen[target]} are the same folder {target} (through a "
                                f"symlink), so its images would count twice; remove the symlink")
            seen[target] = path


def image_folder(root, split, transform=None, classes=None):
    """torchvision ImageFolder of root/split with RGB loading and one-sentence errors. `classes`: the
    training classes, which the split must hold exactly; a training split (no `classes`) needs two."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise DataError(f"{folder} does not exist; --data must point to a folder holding "
                        f"train/<class>/<image> and val/<class>/<image>")
    found = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not found:
        raise DataError(f"{folder} has no class folders; put each class's images in {folder}/<class>/")
    if classes is None and len(found) < 2:
        raise DataError(f"{folder} has a single class folder ({found[0]}); classification needs at "
                        f"least two classes, each in its own folder")
    if classes is not None and found != list(classes):
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise DataError(f"class folders of {folder} differ from train's (missing {missing[:5]}, "
                        f"extra {extra[:5]}); both splits need the same class folders")
    check_symlinks(folder)
    try:
        return datasets.ImageFolder(folder, transform=transform, loader=load_rgb)
    except FileNotFoundError as error:
        raise DataError(f"{error}; every class folder of {folder} needs at least one image "
                        f"(.jpg, .png, ...)") from None


def eval_transform(size, crop_pct=0.875, interpolation="bilinear"):
    """Resize the short side to size / crop_pct, center crop size x size, uint8 tensor."""
    resize = transforms.Resize(int(size / crop_pct), interpolation=InterpolationMode(interpolation))
    return transforms.Compose([resize, transforms.CenterCrop(size), transforms.PILToTensor()])


def ShardSampler(n, rank=0, world=1):  # a range is a sampler
    """This rank's contiguous, unpadded shard of range(n): each sample once (DistributedSampler pads)."""
    return range(n * rank // world, n * (rank + 1) // world)


class TaggedSampler(Sampler):
    """Wrap a sampler (or batch sampler) so each index comes with a tag (e.g. the pass number), set in the main
    process by set_epoch, reaching persistent workers. All scripts seed a draw by (seed, rank, tag, index)."""

    def __init__(self, sampler):
        self.sampler, self.tag = sampler, 0

    def set_epoch(self, epoch, tag):
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        self.tag = tag

    def __iter__(self):
        tag = self.tag
        return ([(i, tag) for i in index] if isinstance(index, list) else (index, tag) for index in self.sampler)

    def __len__(self):
        return len(self.sampler)


def item_and_tag(item, dataset):
    """(index, tag) items from TaggedSampler; a plain index is refused with what to pass."""
    if not isinstance(item, tuple):
        raise TypeError(f"{dataset} takes (image index, pass tag) items so that every pass draws other "
                        f"crops: wrap the sampler in common.data.TaggedSampler and call "
                        f"sampler.set_epoch(epoch, tag) before each pass")
    return item


class SeededItems(Dataset):
    """Item (index, epoch) -> dataset[index] run `seeded` by (seed, rank, epoch, index): random transforms
    draw the same in a resumed run, whatever the workers, and differ between ranks. Use with TaggedSampler,
    `set_epoch(epoch, epoch)`."""

    def __init__(self, dataset, seed, rank=0):
        self.dataset, self.seed, self.rank = dataset, seed, rank

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, epoch = item_and_tag(item, "SeededItems")
        with seeded(derive_seed(self.seed, self.rank, epoch, index)):
            return self.dataset[index]


def loader(dataset, batch_size, workers, sampler=None, device=None, drop_last=False, persistent=True):
    count = len(sampler if sampler is not None else dataset)
    if drop_last and count < batch_size:
        raise DataError(f"each process gets {count} training images per epoch, fewer than its batch of "
                        f"{batch_size}; lower --batch-size")
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       pin_memory=device is not None and device.type == "cuda",
                                       drop_last=drop_last, persistent_workers=persistent and workers > 0,
                                       worker_init_fn=quiet_worker)


def eval_loader(dataset, batch_size, workers, ctx, persistent=True):
    return loader(dataset, batch_size, workers, ShardSampler(len(dataset), ctx.rank, ctx.world), ctx.device,
                  persistent=persistent)


@torch.no_grad()
def sum_over_split(model, data_loader, ctx, mean, std, amp, desc, heads, score, shape):
    """[heads, *shape] float64 sums of score(logits, targets) (int64 [*shape]) over the split, each image once
    across ranks (`eval_loader`); heads > 1: `model` returns a tuple of logits, scored in one pass. Sums stay
    on the device until one all-reduce at the end. `amp`: True/False or the run's args (--amp, --amp-dtype)."""
    model.eval()
    if ctx.distributed:  # rank 0's BN statistics everywhere: the ones its checkpoint holds
        for buffer in model.buffers():  # (a DDP forward broadcasts them only at its start)
            torch.distributed.broadcast(buffer, 0)
    sums = torch.zeros(heads, *shape, dtype=torch.int64, device=ctx.device)
    autocast = ctx.autocast(amp) if not isinstance(amp, bool) else \
        torch.autocast(ctx.device.type, enabled=amp and ctx.device.type == "cuda")
    for images, targets in ctx.bar(data_loader, desc=desc):
        images = normalize(images.to(ctx.device, non_blocking=True), mean, std)
        targets = targets.to(ctx.device, non_blocking=True)
        with autocast:
            outputs = model(images)
        for head, logits in enumerate(outputs if heads > 1 else (outputs,)):
            sums[head] += score(logits, targets)
    return torch.tensor(ctx.all_reduce_sum(sums.flatten().tolist()), dtype=torch.float64).reshape(sums.shape)


def evaluate(model, data_loader, ctx, mean, std, amp=False, desc="eval", heads=1):
    """Top-1 / top-5 (%) and image count over the split (sum_over_split); heads > 1: a list, one per head."""

    def hits(logits, targets):  # top-1 hits, top-5 hits, images
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
        images = torch.full((), len(targets), dtype=torch.int64, device=top.device)
        return torch.stack([top[:, 0].sum(), top.any(dim=1).sum(), images])
    sums = sum_over_split(model, data_loader, ctx, mean, std, amp, desc, heads, hits, (3,))
    results = [{"top1": 100.0 * top1 / max(n, 1), "top5": 100.0 * top5 / max(n, 1), "count": int(n)}
               for top1, top5, n in sums.tolist()]
    return results if heads > 1 else results[0]


def eval_sets(root, extra_roots, transform, classes, batch_size, workers, ctx):
    """{"val": ROOT/val, "extra0": the first --val-data folder, ...}: sharded loaders, batch_size / world."""
    folders = [("val", root, "val")] + [(f"extra{i}", path, "") for i, path in enumerate(extra_roots)]
    batch = max(1, batch_size // ctx.world)
    return {name: eval_loader(image_folder(folder, split, transform, classes), batch, workers, ctx)
            for name, folder, split in folders}


def evaluate_sets(model, val_sets, ctx, mean, std, amp=False):
    """evaluate() on each named loader -> {NAME_top1, NAME_top5, NAME_count} (the per-epoch log's keys)."""
    return {f"{name}_{key}": value for name, data_loader in val_sets.items()
            for key, value in evaluate(model, data_loader, ctx, mean, std, amp, desc=name).items()}


def train_transform(size, scale=(0.08, 1.0), interpolation="bilinear"):
    """RandomResizedCrop + horizontal flip, uint8 tensor (normalized later on the device)."""
    crop = transforms.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode(interpolation))
    return transforms.Compose([crop, transforms.RandomHorizontalFlip(), transforms.PILToTensor()])


def cutmix_box(height, width, lam, rng):
    """CutMix's box (timm's rand_bbox): side sqrt(1 - lam) x the image's, centred uniformly at random, clipped;
    and lambda corrected to 1 - its area. `rng`: a numpy Generator (no global RNG)."""
    ratio = math.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = min(max(cy - cut_h // 2, 0), height), min(max(cy + (cut_h + 1) // 2, 0), height)
    x0, x1 = min(max(cx - cut_w // 2, 0), width), min(max(cx + (cut_w + 1) // 2, 0), width)
    return (y0, y1, x0, x1), 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)


def to_device(tensor, device):
    """A CPU tensor on `device`, pinned then copied async (a pageable one's .to(cuda) blocks the host)."""
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor.to(device)


def mix_batch(images, targets, mixup_alpha, cutmix_alpha, generator):
    """Mixup or cutmix (50/50 when both are on) of inputs and soft labels with one lambda (cutmix's: corrected
    to the pasted area). Every draw (choice, lambda, pairing, box) comes from `generator`."""
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or torch.rand(1, generator=generator).item() < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    lam = float(rng.beta(alpha, alpha)) if alpha > 0 else 1.0
    perm = to_device(torch.randperm(images.shape[0], generator=generator), images.device)
    if use_cutmix:
        (y0, y1, x0, x1), lam = cutmix_box(images.shape[-2], images.shape[-1], lam, rng)
        images = images.clone()
        images[:, :, y0:y1, x0:x1] = images[perm][:, :, y0:y1, x0:x1]
    else:
        images = lam * images + (1 - lam) * images[perm]
    return images, lam * targets + (1 - lam) * targets[perm]


class FreshCrops(Dataset):
    """Item (image n, epoch) -> m new random crops at the student's size and each teacher's (`views`, online
    KD); baselines: the same without stored labels. Use with TaggedSampler and `set_epoch(epoch, epoch)`: the
    crops depend on (seed, n, epoch) alone. `augment(crops, generator)`: an optional random op on the uint8
    crops (e.g. colour jitter), with the same draws for the student's crops and every teacher view."""

    def __init__(self, samples, m, size, interpolation, views, scale, ratio, seed, augment=None):
        self.samples, self.m, self.size, self.interp = samples, m, size, interpolation
        self.views, self.scale, self.ratio, self.seed, self.augment = views, scale, ratio, seed, augment

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, item):
        n, epoch = item_and_tag(item, "FreshCrops")
        image = load_rgb(self.samples[n][0])
        boxes, flips = sample_crops(self.seed, n, image.width, image.height, self.m,
                                    self.scale, self.ratio, stream=1 + epoch)
        crops = replay_crops(image, boxes, flips, self.size, self.interp)
        views = [replay_crops(image, boxes, flips, s, i) for s, i in self.views]
        if self.augment is not None:
            seed = derive_seed(self.seed, n, 3, epoch)
            crops = self.augment(crops, torch.Generator().manual_seed(seed))
            views = [self.augment(v, torch.Generator().manual_seed(seed)) for v in views]
        return crops, views, self.samples[n][1]
