"""FKD soft-label codecs (Sec. 3.5, Eq. 3-7) and the label store.

Codecs, vectorized over a batch of crops (torch, any device):
  full    all C probabilities (float32; or pre-softmax logits for the SSL variant, Sec. 3.4)
  hard    argmax class (Eq. 3)
  smooth  argmax class + its probability, the rest spread uniformly (Eq. 4)
  ms      marginal smoothing: top-K probabilities, the remaining mass spread uniformly (Eq. 5)
  mr      marginal re-norm: top-K probabilities renormalized to sum 1, the rest 0 (Eq. 6-7)

The store is a directory: meta.json plus a few fixed-record .npy arrays opened with mmap and
allow_pickle=False (no pickle anywhere), so any DataLoader worker reads any crop in O(1):
  boxes   [N, M, 4] uint16  crop (top, left, height, width) in pixels of the original image
  flips   [N, M]    uint8   horizontal flip bit
  indices [N, M, K] uint16  class indices (hard/smooth: K = 1; ms/mr: top-K; absent for full)
  values  [N, M, K] float16 probabilities (smooth/ms/mr); full: [N, M, C] float32
  done    [N]       uint8   set only after the image's rows are flushed to disk
"""
import hashlib
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .crops import replay_crops
from .data import load_rgb

CODECS = ("full", "hard", "smooth", "ms", "mr")
FORMAT_VERSION = 1


def codec_width(codec, k, num_classes):
    """Number of stored indices/values per crop."""
    return {"full": num_classes, "hard": 1, "smooth": 1, "ms": k, "mr": k}[codec]


def encode(probs, codec, k=5):
    """Compress probabilities [B, C] -> (indices [B, K] or None, values [B, K] or None)."""
    if codec == "full":
        return None, probs.float()
    if codec == "hard":
        return probs.argmax(dim=1, keepdim=True), None  # Eq. 3: Y_H = argmax_c z(c)
    if codec == "smooth":
        top_value, top_index = probs.max(dim=1, keepdim=True)
        return top_index, top_value.half()
    if codec in ("ms", "mr"):
        top_values, top_indices = probs.topk(k, dim=1)
        return top_indices, top_values.half()
    raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")


def decode(indices, values, codec, num_classes, logits_temperature=None):
    """Expand stored rows back to dense soft labels [B, C] (float32), on the rows' device.

    `logits_temperature`: for a `full` store of pre-softmax logits (SSL variant), the temperature
    of the softmax applied here at training time.
    """
    if codec == "full":
        values = values.float()
        return F.softmax(values / logits_temperature, dim=1) if logits_temperature else values
    indices = indices.long()
    batch = indices.shape[0]
    if codec == "hard":
        return torch.zeros(batch, num_classes, device=indices.device).scatter_(1, indices, 1.0)
    values = values.float()
    if codec == "smooth":
        # Eq. 4: y_c = p_c for the hard label, (1 - p_c) / (C - 1) otherwise
        rest = (1 - values) / (num_classes - 1)
        return rest.expand(batch, num_classes).clone().scatter_(1, indices, values)
    if codec == "ms":
        k = indices.shape[1]
        # Eq. 5: top-K keep p_c, the others share (1 - sum_topK p_c) / (C - K); fp16 top-K values
        # can sum above 1, so the marginal mass is clamped at 0.
        rest = (1 - values.sum(dim=1, keepdim=True)).clamp_min(0) / max(num_classes - k, 1)
        return rest.expand(batch, num_classes).clone().scatter_(1, indices, values)
    if codec == "mr":
        # Eq. 6: y^M = p_c on the top-K, 0 elsewhere; Eq. 7: y^MR = y^M / sum_c y^M
        dense = torch.zeros(batch, num_classes, device=indices.device).scatter_(1, indices, values)
        return dense / dense.sum(dim=1, keepdim=True).clamp_min(1e-12)
    raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")


def image_list_hash(samples, root):
    """sha256 of the ordered (relative path, class index) list: ties a store to its images."""
    digest = hashlib.sha256()
    for path, target in samples:
        digest.update(f"{os.path.relpath(path, root)}\t{target}\n".encode())
    return digest.hexdigest()


class StoreError(ValueError):
    """A label store that cannot be used as asked (missing, damaged or built for other data)."""


def _write_json_atomic(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class LabelStore:
    """Region-level soft labels of N images x M crops; see the module docstring for the layout.

    Arrays are opened lazily and not pickled, so a store handed to DataLoader workers re-opens its
    memory maps in each worker.
    """

    # meta fields that must match between the store and the run that uses it
    IDENTITY = ("num_images", "image_list_sha256", "num_classes", "codec", "k", "stores",
                "temperature")

    def __init__(self, path, meta, writable=False):
        self.path, self.meta, self.writable = path, meta, writable
        self._arrays = None

    # -- layout --------------------------------------------------------------------------------
    @staticmethod
    def array_specs(meta):
        n, m, c = meta["num_images"], meta["num_crops"], meta["num_classes"]
        width = codec_width(meta["codec"], meta["k"], c)
        specs = {
            "boxes": ((n, m, 4), "uint16"),
            "flips": ((n, m), "uint8"),
            "done": ((n,), "uint8"),
        }
        if meta["codec"] != "full":
            specs["indices"] = ((n, m, width), "uint16" if c <= 65535 else "int32")
        if meta["codec"] != "hard":
            specs["values"] = ((n, m, width), "float32" if meta["codec"] == "full" else "float16")
        return specs

    def bytes_per_crop(self):
        n, m = self.meta["num_images"], self.meta["num_crops"]
        total = sum(os.path.getsize(os.path.join(self.path, f"{name}.npy"))
                    for name in self.array_specs(self.meta))
        return total / (n * m)

    # -- create / open ---------------------------------------------------------------------------
    @classmethod
    def create(cls, path, meta):
        """Preallocate all arrays on disk (so a full disk fails here, not in the middle of a run),
        then write meta.json last: a store without meta.json is incomplete and gets recreated."""
        if meta["codec"] not in CODECS:
            raise StoreError(f"unknown codec {meta['codec']!r}; choose one of {', '.join(CODECS)}")
        meta = dict(meta, format_version=FORMAT_VERSION)
        try:
            os.makedirs(path, exist_ok=True)
            for name, (shape, dtype) in cls.array_specs(meta).items():
                file = os.path.join(path, f"{name}.npy")
                array = np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=shape)
                size = array.offset + array.nbytes
                del array
                with open(file, "r+b") as f:
                    os.posix_fallocate(f.fileno(), 0, size)
        except OSError as error:  # ENOSPC, EFBIG (file size limit), EDQUOT, EACCES, ...
            raise StoreError(f"cannot create the label store in {path} ({error.strerror}); free disk space "
                             f"or pass another --labels folder, then run the same command again") from None
        _write_json_atomic(os.path.join(path, "meta.json"), meta)
        return cls(path, meta, writable=True)

    @classmethod
    def open(cls, path, writable=False):
        meta_file = os.path.join(path, "meta.json")
        if not os.path.isfile(meta_file):
            raise StoreError(f"no label store at {path} (meta.json missing); generate it with "
                             f"`python fkd.py --mode label --labels {path} ...`")
        try:
            with open(meta_file) as f:
                meta = json.load(f)
        except (OSError, ValueError) as error:
            raise StoreError(f"label store meta {meta_file} is unreadable ({error}); "
                             f"delete the folder and generate it again") from None
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise StoreError(f"label store {path} has format version {meta['format_version']}, "
                             f"newer than this code's {FORMAT_VERSION}; update the code")
        store = cls(path, meta, writable)
        store.arrays  # open now so truncated or foreign files are reported here
        return store

    @property
    def arrays(self):
        if self._arrays is None:
            self._arrays = {}
            for name, (shape, dtype) in self.array_specs(self.meta).items():
                file = os.path.join(self.path, f"{name}.npy")
                try:
                    array = np.load(file, mmap_mode="r", allow_pickle=False)
                except (OSError, ValueError) as error:
                    raise StoreError(f"label store array {file} is missing, truncated or not a "
                                     f"plain .npy array ({error}); generate the store again") from None
                if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
                    raise StoreError(f"label store array {file} has shape {array.shape} "
                                     f"{array.dtype}, expected {tuple(shape)} {dtype}; "
                                     f"the store is damaged, generate it again")
                self._arrays[name] = array
        return self._arrays

    def __getstate__(self):  # DataLoader workers re-open the maps themselves
        return {"path": self.path, "meta": self.meta, "writable": False, "_arrays": None}

    # -- checks -----------------------------------------------------------------------------------
    def check_matches(self, expected):
        """Refuse a store built for other images / classes / codec, naming each difference."""
        diffs = [f"{key}: store has {self.meta.get(key)!r}, this run expects {expected[key]!r}"
                 for key in self.IDENTITY if key in expected and self.meta.get(key) != expected[key]]
        if diffs:
            raise StoreError(f"label store {self.path} was built for other data or flags ("
                             + "; ".join(diffs) + "); pass matching flags or another --labels folder")

    # -- rows -------------------------------------------------------------------------------------
    @property
    def done(self):
        return self.arrays["done"]

    def _fd(self, name):
        """Writers use pwrite at byte offsets instead of writable memory maps: two processes (or two
        nodes on a shared filesystem) that write disjoint rows never overwrite each other's pages,
        and an I/O error is an exception, not a SIGBUS."""
        if not self.writable:
            raise StoreError(f"label store {self.path} was opened read-only")
        if not hasattr(self, "_fds"):
            self._fds = {}
        if name not in self._fds:
            self._fds[name] = os.open(os.path.join(self.path, f"{name}.npy"), os.O_RDWR)
        return self._fds[name]

    def _pwrite(self, name, image_index, crop_slice, rows):
        array = self.arrays[name]
        row_bytes = array[0, 0].nbytes if array.ndim > 1 else array.itemsize
        first = image_index * array.shape[1] + (crop_slice.start or 0)
        data = np.ascontiguousarray(rows, dtype=array.dtype).tobytes()
        os.pwrite(self._fd(name), data, array.offset + first * row_bytes)

    def write(self, image_index, crop_slice, boxes, flips, indices, values):
        """Rows of crops `crop_slice` of one image (visible to readers after mark_done)."""
        if boxes.max(initial=0) > 65535:
            raise StoreError(f"image {image_index} is larger than 65535 pixels on a side; "
                             f"downscale it (crop boxes are stored as uint16)")
        self._pwrite("boxes", image_index, crop_slice, boxes)
        self._pwrite("flips", image_index, crop_slice, flips)
        if "indices" in self.arrays:
            self._pwrite("indices", image_index, crop_slice, indices)
        if "values" in self.arrays:
            self._pwrite("values", image_index, crop_slice, values)

    def mark_done(self, image_indices):
        """fsync the rows of `image_indices`, then set and fsync their done flags."""
        if len(image_indices) == 0:
            return
        for name in self.arrays:
            if name != "done":
                os.fsync(self._fd(name))
        offset = self.done.offset
        for n in image_indices:
            os.pwrite(self._fd("done"), b"\x01", offset + int(n))
        os.fsync(self._fd("done"))

    def close(self):
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)
        self._fds = {}

    def read(self, image_index, crop_ids):
        """Rows of the given crops of one image: boxes int64 [m, 4], flips bool [m], indices, values."""
        a = self.arrays
        indices = a["indices"][image_index, crop_ids].astype(np.int64) if "indices" in a else None
        values = np.array(a["values"][image_index, crop_ids]) if "values" in a else None
        return (a["boxes"][image_index, crop_ids].astype(np.int64),
                a["flips"][image_index, crop_ids].astype(bool), indices, values)


# Reading a store for training (FKD phase 2, Fast MEAL V2)
def crop_schedule(seed, image_index, stored, start, count):
    """Which stored crops an image uses at stream positions start .. start+count-1.

    A per-image permutation of the M stored crops, consumed `count` at a time: no crop repeats
    until all M were used (the paper's "shuffling and non-overlapping sampling"; the official code
    drew at random each pass). After M positions a fresh permutation starts.
    """
    positions = np.arange(start, start + count)
    cycles = positions // stored
    out = np.empty(count, dtype=np.int64)
    for cycle in np.unique(cycles):
        perm = np.random.default_rng([seed, image_index, 1, int(cycle)]).permutation(stored)
        where = cycles == cycle
        out[where] = perm[positions[where] % stored]
    return out


def decode_stored_batch(indices, values, meta, device, logits_temperature=None):
    """Dense soft labels [B * m, C] on `device` for a collated StoredCrops batch ([B, m, ...] rows;
    an empty tensor stands for an array the codec does not store)."""
    indices = indices.to(device, non_blocking=True).flatten(0, 1) if indices.numel() else None
    values = values.to(device, non_blocking=True).flatten(0, 1) if values.numel() else None
    return decode(indices, values, meta["codec"], meta["num_classes"], logits_temperature)


class StoredCrops(Dataset):
    """Item (image n, stream position) -> m stored crops replayed at the student's size + label rows."""

    def __init__(self, samples, store, m, size, interpolation, seed):
        self.samples, self.store, self.m, self.size, self.interp, self.seed = samples, store, m, size, interpolation, seed

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, item):
        n, start = item
        crop_ids = crop_schedule(self.seed, n, self.store.meta["num_crops"], start, self.m)
        boxes, flips, indices, values = self.store.read(n, crop_ids)
        image = load_rgb(self.samples[n][0])
        crops = replay_crops(image, boxes, flips, self.size, self.interp)  # exact replay of the crop
        empty = torch.zeros(0)
        return (crops, torch.from_numpy(indices) if indices is not None else empty,
                torch.from_numpy(values) if values is not None else empty, self.samples[n][1])
