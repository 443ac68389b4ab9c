"""Serves fkd.py alone (`--mode import`), hence beside it: FKD's released soft labels -> a label store.

The FKD authors released ImageNet region-level soft labels (EfficientNet-L2-ns-475, 500 crops; and
the senet154 + resnet152_v1s ensemble of MEAL V2, 200 crops, for Fast MEAL V2), listed on the FKD
project page linked from the FKD repository's README. Their format, as written by the official
FKD_SLG/generate_soft_label.py and read by the official training loaders:

  one file per training image, made by `torch.save([coords, flips, labels], path)` (numpy arrays);
  FKD loader:     SOURCE/train/<class>/<image name up to its first dot>.tar   (last 3 path parts)
  MEAL-V2 loader: SOURCE/<data folder>/train/<class>/<image name ...>.tar     (last 4 path parts)
  coords [N, 4]   (top/H, left/W, height/H, width/W) of each crop, float32 (float16 in the fp16 release)
  flips  [N]      bool, horizontal flip of each crop
  labels hard: [N] class indices (int64); smoothing: [N, 2] (index stored as a float, probability);
         marginal smoothing / re-norm top-K: [N, 2, K], row 0 the class indices stored as floats,
         row 1 their probabilities in descending order.

The official training replays crop i with torchvision `resized_crop(img, c0*H, c1*W, c2*H, c3*W,
224)` on a PIL image; `boxes_from_coords` turns the coords into the integer boxes that cut exactly
those pixels, so replaying the imported store gives the official crops.

Label types -> codecs: hard -> hard, smoothing -> smooth, marginal_smoothing_kK -> ms (K),
marginal_renorm -> mr (K); the files of the last two are identical, so the label type of top-K files
is picked at import (default: marginal smoothing, the released name). The store keeps the release's
precision (float16 values for the fp16 release, float32 for an fp32 one: meta "values_dtype"), so
decoding it gives the official Recover_soft_label's soft label bit for bit for every label type and
both releases (except the clamp of the marginal mass at 0, common/labels.py). The files are pickles, loaded
with torch.load(weights_only=True) and only NumPy's array reconstruction allowlisted: a file whose
pickle would run code is refused, never executed.
"""
import json
import os
import pathlib
import time

import numpy as np
import torch
from PIL import Image

from common.dist import Context, on_every_rank, quiet_worker
from common.labels import LabelStore, StoreError, _write_json_atomic, image_identity

LAYOUTS = ("fkd", "meal")
# official label_type names (without _kK) -> our codec
LABEL_TYPES = {"hard": "hard", "smoothing": "smooth", "marginal_smoothing": "ms", "marginal_renorm": "mr"}

_multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
# What unpickling a plain numeric numpy array needs, and nothing else: the reconstruct function under
# its NumPy 1.x name (the released files) and its NumPy 2.x name, ndarray, dtype, and the numeric dtype
# classes whose state the pickle sets. Object, string and structured dtypes are not allowlisted.
SAFE_NUMPY_GLOBALS = [
    (_multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
    (_multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
    np.ndarray, np.dtype,
    *sorted({type(np.dtype(code)) for code in "?bhilqBHILQefd"}, key=str),
]
FLUSH_EVERY = 256  # images whose rows are flushed and marked done together


class ReleasedFileError(ValueError):
    """One released label file that cannot be imported; `kind` groups the message per cause."""

    def __init__(self, kind, detail):
        super().__init__(detail)
        self.kind = kind


# --- One released file ----------------------------------------------------------------------------
def load_released_file(path):
    """[coords, flips, labels] of one released file as numpy arrays, without running pickled code."""
    try:
        with torch.serialization.safe_globals(SAFE_NUMPY_GLOBALS):
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 -- every failure becomes one sentence
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        refused = [line for line in lines
                   if "unsupported global" in line.lower() or "can only build" in line.lower()]
        if refused:  # the pickle asks for a global or a type outside the allowlist
            raise ReleasedFileError("unsafe", f"holds objects other than numeric arrays, which loading "
                                    f"would build by running pickled code, so it was not loaded "
                                    f"({refused[0][:100]})") from None
        reason = next((line for line in lines if "operand" in line.lower()), lines[0] if lines else "empty")
        raise ReleasedFileError("unreadable", f"is damaged or not a torch.save file "
                                f"({type(error).__name__}: {reason[:100]})") from None
    if not (isinstance(content, (list, tuple)) and len(content) == 3):
        raise ReleasedFileError("format", f"holds a {type(content).__name__}, not the list "
                                f"[coords, flips, labels] of the official format")
    arrays = tuple(item.numpy() if isinstance(item, torch.Tensor) else item for item in content)
    for name, item in zip(("coords", "flips", "labels"), arrays):
        if not isinstance(item, np.ndarray):
            raise ReleasedFileError("format", f"holds {name} as a {type(item).__name__}, not an array")
    return arrays


def file_format(coords, flips, labels):
    """(crops, label kind, K, dtype) of one file; ReleasedFileError if it is not the official format.
    kind: "hard" ([N]), "smoothing" ([N, 2]) or "topk" ([N, 2, K]); dtype: the coords' dtype, with
    the labels' appended when they differ and are not integer class indices."""
    n = coords.shape[0] if coords.ndim == 2 else -1
    if coords.shape != (n, 4) or n < 1 or coords.dtype.kind != "f":
        raise ReleasedFileError("format", f"has coords of shape {list(coords.shape)} {coords.dtype}, "
                                f"not [crops, 4] floats")
    if flips.shape != (n,) or flips.dtype.kind not in "biu":
        raise ReleasedFileError("format", f"has flips of shape {list(flips.shape)} {flips.dtype}, "
                                f"not [{n}] bool")
    if labels.shape == (n,) and labels.dtype.kind in "iuf":
        kind, k = "hard", 1
    elif labels.shape == (n, 2) and labels.dtype.kind == "f":
        kind, k = "smoothing", 1
    elif labels.ndim == 3 and labels.shape[:2] == (n, 2) and labels.shape[2] >= 1 and labels.dtype.kind == "f":
        kind, k = "topk", labels.shape[2]
    else:
        raise ReleasedFileError("format", f"has labels of shape {list(labels.shape)} {labels.dtype}, "
                                f"none of hard [{n}], smoothing [{n}, 2] or top-K [{n}, 2, K]")
    mixed = labels.dtype != coords.dtype and labels.dtype.kind == "f"
    return n, kind, k, str(coords.dtype) + (f"/{labels.dtype}" if mixed else "")


def boxes_from_coords(coords, width, height):
    """Integer crop boxes (top, left, height, width) int64 [N, 4] that cut exactly the pixels of the
    official replay, and how many boxes were clipped to the image.

    Official: i, j, h, w = c0*H, c1*W, c2*H, c3*W (Python floats), then PIL's Image.crop((j, i,
    j + w, i + h)) rounds each edge with round() (half to even), as np.rint does. A box that the
    rounding puts past the image edge is clipped to it (possible with fp16 coordinates on sides
    longer than 1365 px, where two coordinates' rounding errors can add up to half a pixel)."""
    c = np.asarray(coords, dtype=np.float64)  # the exact values .item() gives the official loader
    i, j, h, w = c[:, 0] * height, c[:, 1] * width, c[:, 2] * height, c[:, 3] * width
    top, left, bottom, right = np.rint(i), np.rint(j), np.rint(i + h), np.rint(j + w)
    clipped = (bottom > height) | (right > width)
    # differs from the official replay: PIL pads the strip past the edge with black, we clip it
    bottom, right = np.minimum(bottom, height), np.minimum(right, width)
    boxes = np.stack([top, left, bottom - top, right - left], axis=1).astype(np.int64)
    return boxes, int(clipped.sum())


def label_rows(labels, kind, num_classes):
    """(indices int64 [N, K], values [N, K] or None): the store's codec rows of released labels."""
    if kind == "hard":
        indices, values = labels.reshape(-1, 1), None
    elif kind == "smoothing":
        indices, values = labels[:, :1], labels[:, 1:]
    else:
        indices, values = labels[:, 0, :], labels[:, 1, :]
    if indices.dtype.kind == "f" and not np.array_equal(indices, np.round(indices)):
        raise ReleasedFileError("values", "has class indices that are not whole numbers")
    if indices.min() < 0 or indices.max() >= num_classes:
        raise ReleasedFileError("values", f"has class indices {int(indices.min())}..{int(indices.max())}, "
                                f"outside the {num_classes} classes of --data")
    if values is not None and not (np.isfinite(values).all() and 0 <= values.min() and values.max() <= 1):
        raise ReleasedFileError("values", "has probabilities outside [0, 1] or not finite")
    return indices.astype(np.int64), values


# --- The tree of files ----------------------------------------------------------------------------
def label_file_key(image_path, layout):
    """The released file of an image relative to the source folder, as the official loaders derive
    it: the last 3 (FKD) or 4 (MEAL-V2) parts of the image path, cut at the first dot, + '.tar'."""
    parts = os.path.abspath(image_path).split(os.sep)
    return "/".join(parts[-3 if layout == "fkd" else -4:]).split(".")[0] + ".tar"


def _check_source(source_dir, keys, layout):
    """The folder the keys' first part lives in must exist; otherwise one sentence with the fix."""
    if not os.path.isdir(source_dir):
        raise StoreError(f"--import-from {source_dir} is not a folder; pass the folder of the released "
                         f"label files")
    first = keys[0].split("/")[0]
    if os.path.isdir(os.path.join(source_dir, first)):
        return
    holders = sorted(e.name for e in os.scandir(source_dir) if e.is_dir() and
                     os.path.isdir(os.path.join(source_dir, e.name, "train")))
    hint = (f"it holds {holders[0]}/train, so pass --import-from {os.path.join(source_dir, holders[0])} "
            f"with the fkd layout" if holders else "pass the folder that holds train/<class>/<name>.tar")
    what = "train/" if layout == "fkd" else \
        f"{first}/train/ (the MEAL-V2 layout starts with the name of the --data folder)"
    raise StoreError(f"{source_dir} has no {what}; {hint}")


def _check_tree(source_dir, keys):
    """Every image has its file, no two images share one, no file is for an image not in --data."""
    seen = set()
    shared = [key for key in keys if key in seen or seen.add(key)]  # every repeat, in order
    if shared:
        raise StoreError(f"{len(shared)} training images map to a label file another image also maps "
                         f"to (the official loaders cut names at the first dot), the first: "
                         f"{os.path.join(source_dir, shared[0])}; rename those images")
    found = set()  # relative paths ('train/c/x.tar') of every .tar file under the keys' top folder
    for folder, _, names in os.walk(os.path.join(source_dir, keys[0].split("/")[0])):
        rel = os.path.relpath(folder, source_dir).replace(os.sep, "/")
        found.update(f"{rel}/{name}" for name in names if name.endswith(".tar"))
    missing = [key for key in keys if key not in found]
    if missing:
        raise StoreError(f"{len(missing)} training images have no released label file, the first: "
                         f"{os.path.join(source_dir, missing[0])} is missing; --data and --import-from "
                         f"must hold the same images (ImageNet-1k train for the released labels)")
    extra = sorted(found - set(keys))
    if extra:
        raise StoreError(f"{len(extra)} label files belong to no image of --data, the first: "
                         f"{os.path.join(source_dir, extra[0])}; --data must hold every image that was "
                         f"labelled (the full ImageNet-1k train set)")


def import_meta(source_dir, layout, train_set, fmt, label_type):
    """meta.json of an imported store: what the files hold and where they came from."""
    crops, kind, k, dtype = fmt
    codec = LABEL_TYPES[label_type.rstrip("0123456789").removesuffix("_k")]
    return {  # in this order, a refused resume names the fields that differ
        "codec": codec, "k": k, "num_crops": crops, **image_identity(train_set),
        "teachers": [{"name": "released", "sha256": None}],
        "crop_scale": None, "crop_ratio": None, "seed": None, "temperature": 1.0, "stores": "probs",
        "values_dtype": "float32" if dtype == "float32" else "float16",  # exact decode of the files
        "imported": {"source": os.path.abspath(source_dir), "label_type": label_type,
                     "layout": layout, "num_files": len(train_set), "dtype": dtype},
    }


def _label_type(kind, k, asked):
    """The official label_type name of files of this kind; `asked` may pick marginal_renorm for
    top-K files (the files of marginal smoothing and re-norm are identical; training decodes them)."""
    inferred = {"hard": "hard", "smoothing": "smoothing"}.get(kind, f"marginal_smoothing_k{k}")
    if asked is None or asked == inferred:
        return inferred
    if kind == "topk" and asked == "marginal_renorm":
        return asked
    raise StoreError(f"--import-label-type {asked} does not fit the files, which hold {inferred} labels"
                     + (" (marginal_renorm also fits)" if kind == "topk" else ""))


# --- The import -----------------------------------------------------------------------------------
class ReleasedFiles(torch.utils.data.Dataset):
    """Item i -> the store rows of image items[i] converted from its released file, or its problem
    (collected and reported together at the end, so one run names every bad file)."""

    def __init__(self, items, files, images, fmt, num_classes):
        self.items, self.files, self.images = items, files, images
        self.fmt, self.num_classes = fmt, num_classes

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        n = int(self.items[i])
        try:
            coords, flips, labels = load_released_file(self.files[n])
            fmt = file_format(coords, flips, labels)
            if fmt != self.fmt:
                raise ReleasedFileError("format", f"holds {fmt[0]} crops of {fmt[1]} labels, K {fmt[2]}, "
                                        f"{fmt[3]}, unlike the first image's file ({self.fmt[0]} crops of "
                                        f"{self.fmt[1]} labels, K {self.fmt[2]}, {self.fmt[3]})")
            if not (np.isfinite(coords).all() and coords.min() >= 0 and coords.max() <= 1):
                raise ReleasedFileError("values", "has crop coordinates outside [0, 1]")
            try:
                with Image.open(self.images[n]) as image:
                    width, height = image.size
            except Exception as error:  # noqa: BLE001
                raise ReleasedFileError("image", f"belongs to image {self.images[n]}, which cannot be "
                                        f"read ({type(error).__name__})") from None
            boxes, clipped = boxes_from_coords(coords, width, height)
            if (boxes[:, 2:] < 1).any():
                raise ReleasedFileError("values", "has a crop that rounds to zero pixels in the image")
            indices, values = label_rows(labels, fmt[1], self.num_classes)
        except ReleasedFileError as error:
            return {"n": n, "problem": (error.kind, str(error))}
        return {"n": n, "problem": None, "boxes": boxes, "flips": (flips == 1).astype(np.uint8),
                "indices": indices, "values": values, "clipped": clipped, "size": (width, height),
                "bytes": os.path.getsize(self.files[n])}


PROBLEMS = {  # kind -> (what the files have in common, the fix)
    "unsafe": ("are refused", "get the files from the authors' links again"),
    "unreadable": ("cannot be read", "download or unpack them again"),
    "format": ("differ in crop count, label kind, K or dtype from the first image's file, or are not "
               "in the official format", "replace them with files of the same release"),
    "values": ("hold out-of-range values", "replace them with files of the same release"),
    "image": ("belong to images that cannot be read", "replace or remove those images and their labels"),
}


def _problem_sentence(problems, files, store_path):
    """One sentence per run: for each kind of problem, its count and its first file."""
    parts = []
    for kind, (what, fix) in PROBLEMS.items():
        mine = sorted((n, detail) for n, k, detail in problems if k == kind)
        if mine:
            n, detail = mine[0]
            parts.append(f"{len(mine)} released label files {what}, the first: {files[n]} {detail}; {fix}")
    return ("; ".join(parts) + f"; the other images are imported into {store_path} (run the same "
            f"command again to import the rest)")


def _gather_results(store_path, ctx, result):
    """Every rank's result, through one file per rank: ranks finish at different times, so wait with
    a sleep instead of a collective that would time out (torchrun ends all ranks if one fails)."""
    if ctx.world == 1:
        return [result]
    names = [os.path.join(store_path, f".import-rank{r}-of-{ctx.world}.json") for r in range(ctx.world)]
    _write_json_atomic(names[ctx.rank], result)
    while not all(os.path.exists(name) for name in names):
        time.sleep(0.5)
    results = [json.loads(pathlib.Path(name).read_text()) for name in names]
    ctx.barrier()  # every rank has read every file (all arrive within one poll interval)
    if ctx.main:
        _remove_rank_results(store_path)
    return results


def _remove_rank_results(store_path):
    for name in os.listdir(store_path):
        if name.startswith(".import-rank"):
            os.remove(os.path.join(store_path, name))


def _prepare_store(source_dir, train_set, store_path, layout, keys, files, label_type):
    """Check the tree and the first file, then create the store (or check the one to resume)."""
    _check_source(source_dir, keys, layout)
    _check_tree(source_dir, keys)
    try:
        fmt = file_format(*load_released_file(files[0]))
    except ReleasedFileError as error:
        raise StoreError(f"the first released label file {files[0]} {error}; it sets the format the "
                         f"others are checked against, so replace it") from None
    meta = import_meta(source_dir, layout, train_set, fmt, _label_type(fmt[1], fmt[2], label_type))
    if meta["codec"] == "ms" and meta["k"] >= meta["num_classes"]:  # Eq. 5: 1 - sum over C - K classes
        raise StoreError(f"the released files keep the top {meta['k']} classes but --data has "
                         f"{meta['num_classes']} class folders; pass the data the labels were made for")
    existing = LabelStore.open(store_path) if LabelStore.is_store(store_path) else None
    if existing is not None and existing.ready:  # resume: the same import, or refuse
        diffs = [key for key in meta if existing.meta.get(key) != meta[key]]
        if diffs:
            raise StoreError(f"label store {store_path} holds other labels than an import of "
                             f"{source_dir} ({', '.join(diffs)} differ); pass a new --labels folder")
    else:  # only in a new or empty folder (or over an interrupted creation); checks the free disk
        LabelStore.create(store_path, meta, replace=existing is not None)
    _remove_rank_results(store_path)  # left by a killed run; no rank writes one before the broadcast


def import_labels(source_dir, train_set, store_path, layout="fkd", ctx=None, label_type=None,
                  workers=0):
    """Convert the released label files of `train_set`'s images (an ImageFolder of --data/train, the
    images the files were made for) into a label store at `store_path`, and return it opened. `layout`:
    "fkd" or "meal" (the module docstring); `label_type`: None (from the files: hard, smoothing,
    marginal_smoothing_kK) or "marginal_renorm" for top-K files to be decoded with Eq. 6-7. Under
    torchrun the ranks split the images; a killed import run again resumes (per-image done flags).
    `workers`: file-reading processes per rank."""
    ctx = ctx or Context()
    if layout not in LAYOUTS:
        raise StoreError(f"unknown import layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    keys = [label_file_key(path, layout) for path, _ in train_set.samples]
    files = [os.path.join(source_dir, key) for key in keys]
    # rank 0: every check possible before a byte is written, then the store (all ranks stop with its sentence)
    on_every_rank(ctx, lambda: _prepare_store(source_dir, train_set, store_path, layout, keys, files,
                                              label_type), StoreError, StoreError)
    store = LabelStore.open(store_path, writable=True)
    meta = store.meta
    fmt = (meta["num_crops"], {"hard": "hard", "smooth": "smoothing"}.get(meta["codec"], "topk"),
           meta["k"], meta["imported"]["dtype"])
    todo = np.flatnonzero(np.asarray(store.done) == 0)
    mine = np.array_split(todo, ctx.world)[ctx.rank]  # contiguous shares: ranks never share a row
    ctx.print(f"importing {len(todo)} of {len(files)} released label files "
              f"({meta['imported']['label_type']}, {fmt[0]} crops, {fmt[3]}) from {source_dir}, "
              f"{ctx.world} process(es) -> {store_path}")
    images = [path for path, _ in train_set.samples]
    data = torch.utils.data.DataLoader(ReleasedFiles(mine, files, images, fmt, len(train_set.classes)),
                                       batch_size=None, num_workers=workers, collate_fn=dict,  # each item as is
                                       worker_init_fn=quiet_worker)
    start, pending, tally = time.time(), [], {"problems": [], "clipped": 0, "bytes": 0, "imported": 0}
    with ctx.bar(total=len(mine), desc="import", unit="img") as bar:
        for item in data:
            bar.update(1)
            if item["problem"] is not None:
                tally["problems"].append((item["n"], *item["problem"]))
                continue
            store.write(item["n"], slice(0, meta["num_crops"]), item["boxes"], item["flips"],
                        item["indices"], item["values"], item["size"])
            pending.append(item["n"])
            for key, add in (("clipped", item["clipped"]), ("bytes", item["bytes"]), ("imported", 1)):
                tally[key] += add
            if len(pending) >= FLUSH_EVERY:
                store.mark_done(pending)
                pending = []
        store.mark_done(pending)
    store.close()
    results = _gather_results(store_path, ctx, tally)
    problems = [tuple(p) for r in results for p in r["problems"]]
    clipped, read_bytes, imported = (sum(r[key] for r in results) for key in ("clipped", "bytes", "imported"))
    if problems:
        raise StoreError(_problem_sentence(problems, files, store_path))
    store = LabelStore.open(store_path)
    crops = imported * meta["num_crops"]
    ctx.print(f"imported {imported} label files ({crops} crops) in {time.time() - start:.0f}s; store "
              f"{store.bytes_per_crop():.1f} bytes/crop"
              + (f", released files {read_bytes / crops:.1f} bytes/crop" if crops else "")
              + f"; {clipped} crop boxes clipped to their image (fp16 rounding past the edge); "
              f"{int(np.asarray(store.done).sum())}/{len(files)} images done")
    return store
