"""Serves frskd.py alone (its segmentation route), hence beside it: image/mask readers, paired transforms, mIoU.

`--data DIR` for segmentation takes either layout:
  VOCdevkit  DIR/VOC2007 and DIR/VOC2012, each with JPEGImages/<id>.jpg, SegmentationClass/<id>.png
             (palette PNGs of class ids 0..20, 255 = ignore) and ImageSets/Segmentation/*.txt.
             Train = VOC2007 trainval + VOC2012 trainval, val = VOC2007 test (the FRSKD paper's and
             the official code's split).
  simple     DIR/train/images/<stem>.<jpg|png|...> with DIR/train/masks/<stem>.png, and the same
             under DIR/val/. A mask is a single-channel PNG (palette or grayscale) of class ids;
             255 marks pixels to ignore.

Images travel as uint8 CHW tensors (normalized later on the device, as for classification) and
masks as int64 HW tensors. The random transforms draw from python's `random`, so wrapped in
`common.data.SeededItems` an image's crop depends on (seed, rank, epoch, index) alone.
"""
import os
import random

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from common.data import DataError, load_rgb, sum_over_split

IGNORE_INDEX = 255
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
LAYOUTS = "--data must be a VOCdevkit folder or hold train/images, train/masks, val/images and val/masks"


# --- Finding (image, mask) pairs ------------------------------------------------------------------
def _voc_split(year_dir, split):
    """(image, mask) paths listed in YEAR/ImageSets/Segmentation/<split>.txt ([] without that file)."""
    listing = os.path.join(year_dir, "ImageSets", "Segmentation", f"{split}.txt")
    if not os.path.isfile(listing):
        return []
    with open(listing) as f:
        ids = [line.strip() for line in f if line.strip()]
    return [(os.path.join(year_dir, "JPEGImages", f"{i}.jpg"),
             os.path.join(year_dir, "SegmentationClass", f"{i}.png")) for i in ids]


def voc_pairs(root):
    """Train and val pairs of a VOCdevkit folder: VOC2007 + VOC2012 trainval / VOC2007 test."""
    years = [os.path.join(root, y) for y in ("VOC2007", "VOC2012")]
    train = [pair for year in years for pair in _voc_split(year, "trainval")]
    test_list = os.path.join(years[0], "ImageSets", "Segmentation", "test.txt")
    if not train:
        raise DataError(f"{root} holds no VOC2007/ or VOC2012/ with ImageSets/Segmentation/trainval.txt; "
                        f"point --data at the VOCdevkit folder")
    if not os.path.isfile(test_list):
        raise DataError(f"{test_list} is missing: the validation split is VOC2007 test (extract "
                        f"VOCtest_06-Nov-2007.tar into {os.path.dirname(root.rstrip(os.sep)) or '.'}), "
                        f"or use the images/ + masks/ layout with your own val/ split")
    return train, _voc_split(years[0], "test")


def folder_pairs(root, split):
    """Pairs of DIR/<split>/images/<stem>.* and DIR/<split>/masks/<stem>.png, sorted by stem."""
    images_dir, masks_dir = os.path.join(root, split, "images"), os.path.join(root, split, "masks")
    for folder in (images_dir, masks_dir):
        if not os.path.isdir(folder):
            raise DataError(f"{folder} does not exist; {LAYOUTS}")
    masks = {os.path.splitext(name)[0]: os.path.join(masks_dir, name) for name in os.listdir(masks_dir)
             if name.lower().endswith(".png")}
    pairs = []
    for name in sorted(os.listdir(images_dir)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTENSIONS:
            continue
        if stem not in masks:
            raise DataError(f"image {os.path.join(images_dir, name)} has no mask "
                            f"{os.path.join(masks_dir, stem)}.png; add the mask or remove the image")
        pairs.append((os.path.join(images_dir, name), masks[stem]))
    if not pairs:
        raise DataError(f"{images_dir} holds no images; put the {split} images there and their masks "
                        f"(same file stems, .png) in {masks_dir}")
    return pairs


def find_pairs(root):
    """(train pairs, val pairs, layout name) of a segmentation --data folder."""
    if not os.path.isdir(root):
        raise DataError(f"{root} does not exist; {LAYOUTS}")
    if any(os.path.isdir(os.path.join(root, y)) for y in ("VOC2007", "VOC2012")):
        return (*voc_pairs(root), "VOCdevkit")
    return folder_pairs(root, "train"), folder_pairs(root, "val"), "images/masks"


# --- Reading and checking masks -------------------------------------------------------------------
def load_mask(path):
    """A mask PNG as a uint8 HW array of class ids (palette indices for VOC's palette PNGs)."""
    try:
        with Image.open(path) as img:
            img.load()
            mode, array = img.mode, np.asarray(img)
    except FileNotFoundError:
        raise DataError(f"mask {path} does not exist; every image needs its mask") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise DataError(f"cannot read mask {path} ({error}); remove or replace the file") from None
    if array.ndim != 2:
        raise DataError(f"mask {path} is a {mode} image; masks must be single-channel PNGs "
                        f"(palette or grayscale) whose values are class ids")
    if array.dtype != np.uint8:
        if array.max(initial=0) > IGNORE_INDEX or array.min(initial=0) < 0:
            raise DataError(f"mask {path} holds value {int(array.max())}, beyond a class id or "
                            f"{IGNORE_INDEX} (ignore); masks must hold class ids")
        array = array.astype(np.uint8)
    return array


def image_size(path):
    """(width, height) from the image header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist; remove it from the list or restore the file") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise DataError(f"cannot read image {path} ({error}); remove or replace the file") from None


def check_pairs(pairs, num_classes):
    """Stop with one sentence naming the file on the first pair whose mask is unreadable, differs
    in size from its image, or holds a value that is neither a class id (< num_classes) nor 255.
    Runs once before training (a few seconds for VOC), so no bad file surfaces mid-epoch."""
    for image_path, mask_path in pairs:
        mask = load_mask(mask_path)
        width, height = image_size(image_path)
        if mask.shape != (height, width):
            raise DataError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} "
                            f"is {width}x{height}; a mask must have its image's size")
        values = np.unique(mask)
        bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
        if len(bad):
            raise DataError(f"mask {mask_path} holds class id {int(bad[0])}, outside 0..{num_classes - 1} "
                            f"(and {IGNORE_INDEX} = ignore); fix the mask or pass --num-classes")


# --- Paired transforms (official order: flip, random scale + pad + crop, blur; val: plain resize) -
class RandomScaleCropFlip:
    """Training pair transform: horizontal flip (p 0.5); resize so the short side is a random integer
    in [base / 2, 2 base] (image bilinear, mask nearest); pad right/bottom to `crop` (image 0, mask
    `mask_fill`, default 0 = background: the official code pads masks with 0, not 255); a random crop
    x crop; Gaussian blur of the image (p 0.5, radius in [0, 1))."""

    def __init__(self, base, crop, mask_fill=0, blur=True):
        self.base, self.crop, self.mask_fill, self.blur = base, crop, mask_fill, blur

    def __call__(self, image, mask):
        if random.random() < 0.5:
            image, mask = image.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
        short = random.randint(int(self.base * 0.5), int(self.base * 2.0))
        width, height = image.size
        size = (short, int(height * short / width)) if height > width else \
            (int(width * short / height), short)
        image, mask = image.resize(size, Image.BILINEAR), mask.resize(size, Image.NEAREST)
        pad_w, pad_h = max(self.crop - size[0], 0), max(self.crop - size[1], 0)
        if pad_w or pad_h:
            image = ImageOps.expand(image, border=(0, 0, pad_w, pad_h), fill=0)
            mask = ImageOps.expand(mask, border=(0, 0, pad_w, pad_h), fill=self.mask_fill)
        width, height = image.size
        left, top = random.randint(0, width - self.crop), random.randint(0, height - self.crop)
        box = (left, top, left + self.crop, top + self.crop)
        image, mask = image.crop(box), mask.crop(box)
        if self.blur and random.random() < 0.5:
            image = image.filter(ImageFilter.GaussianBlur(radius=random.random()))
        return image, mask


class ResizePair:
    """Validation pair transform: resize both to size x size (image bilinear, mask nearest); the
    official code scores mIoU on these resized masks."""

    def __init__(self, size):
        self.size = size

    def __call__(self, image, mask):
        size = (self.size, self.size)
        return image.resize(size, Image.BILINEAR), mask.resize(size, Image.NEAREST)


class SegmentationSet(Dataset):
    """(image, mask) pairs -> (uint8 CHW image tensor, int64 HW mask tensor) after a pair transform."""

    def __init__(self, pairs, transform=None):
        self.pairs, self.transform = pairs, transform

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        image_path, mask_path = self.pairs[index]
        image, mask = load_rgb(image_path), Image.fromarray(load_mask(mask_path))
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        image = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        return image, torch.from_numpy(np.array(mask, dtype=np.int64))


# --- Metric: confusion matrix and mean IoU --------------------------------------------------------
def confusion_matrix(prediction, target, num_classes, ignore_index=IGNORE_INDEX):
    """[C, C] int64 counts, rows = true class, columns = predicted class, over the pixels whose
    target is a class id (ignore_index and any other out-of-range value are skipped)."""
    prediction, target = prediction.reshape(-1), target.reshape(-1)
    valid = (target >= 0) & (target < num_classes) & (target != ignore_index)
    index = target[valid].long() * num_classes + prediction[valid].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(matrix):
    """IoU_c = TP / (TP + FP + FN); NaN for a class absent from both truth and prediction."""
    matrix = matrix.double()
    return matrix.diag() / (matrix.sum(0) + matrix.sum(1) - matrix.diag())  # 0 / 0 -> NaN


def mean_iou(matrix):
    """Mean over the classes with a defined IoU (NaNs skipped, as the official numpy nanmean)."""
    return float(iou_per_class(matrix).nanmean())


def evaluate_segmentation(model, data_loader, ctx, mean, std, num_classes, args=None, heads=1, desc="eval"):
    """mIoU (%) and pixel accuracy (%) over the whole split from confusion matrices summed by
    `common.data.sum_over_split`; `model` returns logit maps [B, C, H, W] at the mask's size;
    `args`: the run's flags, for --amp/--amp-dtype. One dict per head (a list when heads > 1)."""
    matrices = sum_over_split(model, data_loader, ctx, mean, std, args or False, desc, heads,
                              lambda logits, masks: confusion_matrix(logits.argmax(1), masks, num_classes),
                              (num_classes, num_classes))
    results = [{"miou": 100.0 * mean_iou(m),
                "pixel_acc": 100.0 * float(m.diag().sum() / m.sum().clamp(min=1)), "pixels": int(m.sum())}
               for m in matrices]
    return results if heads > 1 else results[0]
