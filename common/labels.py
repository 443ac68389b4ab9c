"""FKD soft-label codecs (Sec. 3.5, Eq. 3-7), vectorized over a batch of crops on any device, and the
label store (its files and checks: docs/fkd.md, "The label store"): meta.json (layout and IDENTITY, compared
by every path that opens it) plus fixed-record .npy arrays read with mmap and allow_pickle=False, so any
DataLoader worker reads any crop in O(1). An imported store (fkd_released.py) carries meta["imported"]."""
import contextlib
import errno
import hashlib
import json
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from .crops import replay_crops
from .data import item_and_tag, load_rgb
from .dist import derive_seed, one_sentence
from .models import DATA_CONFIG_KEYS, file_sha256, parse_spec

CODECS = ("full", "hard", "smooth", "ms", "mr")
FORMAT_VERSION = 2  # 2: sizes.npy, label_dim, identity of teachers/crops/seed checked everywhere
REQUIRED = ("format_version", "codec", "k", "num_crops", "num_classes", "num_images")


def encode(probs, codec, k=5):
    """Probabilities [B, C] (the ensemble's, Sec. 3.1) -> (indices [B, K] or None, values [B, K] or None)."""
    if codec == "full":
        return None, probs.float()  # all C; a logits store (Sec. 3.4): the pre-softmax outputs
    if codec == "hard":  # Eq. 3: Y_H = argmax_c z(c); several teachers: of the *ensemble probabilities*
        return probs.argmax(dim=1, keepdim=True), None
    if codec == "smooth":
        top_value, top_index = probs.max(dim=1, keepdim=True)  # Eq. 4: keep p_c of the hard label
        return top_index, top_value.half()
    if codec in ("ms", "mr"):
        top_values, top_indices = probs.topk(k, dim=1)  # Eq. 5 / Eq. 6: keep p_c of the top-K
        return top_indices, top_values.half()
    raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")


def decode(indices, values, codec, num_classes, logits_temperature=None):
    """Stored rows -> dense soft labels [B, num_classes] float32 on their device; num_classes: the label
    width (label_dim); logits_temperature: the softmax T applied to a `full` store of logits (SSL variant)."""
    if codec == "full":
        values = values.float()
        return F.softmax(values / logits_temperature, dim=1) if logits_temperature else values
    indices, batch = indices.long(), indices.shape[0]
    if codec == "hard":  # Eq. 3: one-hot of the stored argmax
        return torch.zeros(batch, num_classes, device=indices.device).scatter_(1, indices, 1.0)
    values = values.float()
    if codec in ("smooth", "ms"):
        # Eq. 4 (K = 1) and Eq. 5: the top-K keep p_c, the other C - K share 1 - sum_topK p_c, clamped at 0
        # (fp16 top-K values can sum above 1)
        rest = (1 - values.sum(dim=1, keepdim=True)).clamp_min(0) / max(num_classes - indices.shape[1], 1)
        return rest.expand(batch, num_classes).clone().scatter_(1, indices, values)
    if codec == "mr":
        # Eq. 6: y^M = p_c on the top-K, 0 elsewhere; Eq. 7: y^MR = y^M / sum_c y^M
        dense = torch.zeros(batch, num_classes, device=indices.device).scatter_(1, indices, values)
        return F.normalize(dense, p=1.0, dim=1, eps=1e-12)  # as the official decode: the L1 norm
    raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")


# --- Identity: what decides a store's bytes -------------------------------------------------------
def image_list_hash(samples, root):
    """sha256 of the ordered (relative path, class index) list: ties a store to its images."""
    digest = hashlib.sha256()
    for path, target in samples:
        digest.update(f"{os.path.relpath(path, root)}\t{target}\n".encode())
    return digest.hexdigest()


def image_identity(train_set):
    """The IMAGE_FIELDS of an ImageFolder: its images and classes, in order."""
    return {"num_classes": len(train_set.classes), "num_images": len(train_set),
            "image_list_sha256": image_list_hash(train_set.samples, train_set.root),
            "classes_sha256": image_list_hash([(c, i) for i, c in enumerate(train_set.classes)], "")}


def teacher_identity(specs):
    """[{"name", "sha256"}] of teacher specs, no model loaded: sha256 of a NAME=PATH file, None for a timm
    tag (it names its weights). fkd.py adds each one's data config, compared where both sides record it."""
    return [{"name": name, "sha256": file_sha256(path) if path and os.path.isfile(path) else None}
            for name, path in map(parse_spec, specs)]


def label_identity(train_set, teachers, codec, k, num_crops, crop_scale, crop_ratio, temperature,
                   stores, seed, label_dim=None):
    """The meta of a store generated for `train_set` (an ImageFolder); `teachers`: teacher_identity's."""
    settings = _settings(teachers, codec, k, num_crops, crop_scale, crop_ratio, temperature, stores, seed,
                         label_dim or len(train_set.classes))
    return {**image_identity(train_set), **settings}


def _settings(teachers, codec, k, num_crops, crop_scale, crop_ratio, temperature, stores, seed, label_dim):
    """A store's label settings; temperature None for a logits store (SSL variant: T applies in training)."""
    return {"codec": codec, "k": k if codec in ("ms", "mr") else 1, "num_crops": num_crops,
            "label_dim": label_dim, "teachers": [dict(t) for t in teachers],
            "crop_scale": [float(v) for v in crop_scale], "crop_ratio": [float(v) for v in crop_ratio],
            "temperature": None if stores == "logits" else float(temperature), "stores": stores, "seed": seed}


def identity_digest(meta, keys=None):
    """Short hash of identity fields: names a default store folder per data set and settings."""
    keys = keys or [k for k in IDENTITY if k in meta]
    text = json.dumps({k: _comparable(k, meta.get(k)) for k in keys}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _same_teachers(stored, expected):
    """Teachers match by name and file hash, and by every data-config key both sides record."""
    if stored is None or expected is None or len(stored) != len(expected):
        return stored == expected
    return all((a.get("name"), a.get("sha256")) == (b.get("name"), b.get("sha256")) and
               all(a[key] == b[key] for key in DATA_CONFIG_KEYS if key in a and key in b)
               for a, b in zip(stored, expected))


def _comparable(key, value):
    if key == "teachers" and value is not None:
        return [(t.get("name"), t.get("sha256"), *sorted((k, repr(t[k])) for k in DATA_CONFIG_KEYS if k in t))
                for t in value]
    if key in ("crop_scale", "crop_ratio") and value is not None:
        return [float(v) for v in value]
    if key == "temperature" and value is not None:
        return float(value)
    return value


def _shown(key, value):
    if key == "teachers" and value is not None:
        return "[" + ", ".join(f"{t.get('name')} ("
                               f"{'sha256 ' + t['sha256'][:12] if t.get('sha256') else 'timm weights'})"
                               for t in value) + "]"
    if isinstance(value, str) and len(value) == 64:  # a sha256
        return value[:12]
    if key in ("crop_scale", "crop_ratio") and value is not None:
        return "(" + ", ".join(f"{float(v):.4g}" for v in value) + ")"
    return repr(value)


IMAGE_FIELDS = ("num_images", "image_list_sha256", "num_classes", "classes_sha256")
IDENTITY = IMAGE_FIELDS + ("label_dim", "teachers", "crop_scale", "crop_ratio", "seed", "num_crops",
                          "codec", "k", "temperature", "stores")


def _diff_text(diffs):
    return "; ".join(f"{key}: store {_shown(key, a)}, this run {_shown(key, b)}" for key, a, b in diffs)


def content_digest(path):
    """A 64-bit hash of a file's bytes (blake2b), never 0 (0 marks an image without one)."""
    with open(path, "rb") as f:
        return int.from_bytes(hashlib.blake2b(f.read(), digest_size=8).digest(), "little") or 1


class StoreError(ValueError):
    """A label store that cannot be used as asked (missing, damaged or built for other data)."""


def _write_json_atomic(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def human_bytes(n):
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000


def free_bytes(path):
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


class LabelStore:
    """Region-level soft labels of N images x M crops (layout: docs/fkd.md). Arrays are opened
    lazily and not pickled, so a store handed to DataLoader workers re-opens its memory maps in each."""

    def __init__(self, path, meta, writable=False):
        self.path, self.meta, self.writable, self._arrays = path, meta, writable, None

    @staticmethod
    def array_specs(meta):
        n, m, c, k = meta["num_images"], meta["num_crops"], meta["num_classes"], meta["k"]
        width = {"full": meta.get("label_dim") or c, "ms": k, "mr": k}.get(meta["codec"], 1)
        specs = {"boxes": ((n, m, 4), "uint16"), "flips": ((n, m), "uint8"), "sizes": ((n, 2), "uint16"),
                 "done": ((n,), "uint8")}
        if meta.get("content_digests"):  # stores made by fkd.py --mode label (not imported, not older ones)
            specs["digests"] = ((n, 1), "uint64")
        if meta["codec"] != "full":
            specs["indices"] = ((n, m, width), "uint16" if c <= 65535 else "int32")
        if meta["codec"] != "hard":
            # float16 by default (29 B/crop for ms K=5); an import of fp32 released labels keeps
            # float32 (meta values_dtype) so that it decodes exactly as the official files
            specs["values"] = ((n, m, width), "float32" if meta["codec"] == "full"
                               else meta.get("values_dtype", "float16"))
        return specs

    @classmethod
    def planned_bytes(cls, meta):
        """Bytes the store's arrays take on disk (data + .npy headers)."""
        return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize + 128
                   for shape, dtype in cls.array_specs(meta).values())

    def bytes_on_disk(self):
        return sum(os.path.getsize(os.path.join(self.path, f"{name}.npy"))
                   for name in self.array_specs(self.meta))

    def bytes_per_crop(self):
        return self.bytes_on_disk() / (self.meta["num_images"] * self.meta["num_crops"])

    # -- create / open ---------------------------------------------------------------------------
    @staticmethod
    def is_store(path):
        return os.path.isfile(os.path.join(path, "meta.json"))

    @classmethod
    def create(cls, path, meta, replace=False):
        """Preallocate every array (a full disk fails here, not mid-run) in a new or empty folder, or over a
        store with replace=True (a folder holding anything else is refused). meta.json says "allocating", then
        "ready" once every array exists, so the same command makes an interrupted creation again."""
        if meta["codec"] not in CODECS:
            raise StoreError(f"unknown codec {meta['codec']!r}; choose one of {', '.join(CODECS)}")
        if os.path.exists(path) and not os.path.isdir(path):
            raise StoreError(f"--labels {path} is a file, not a folder; pass a new or empty folder")
        if os.path.isdir(path) and os.listdir(path):
            if not cls.is_store(path):
                shown = ", ".join(sorted(os.listdir(path))[:3])
                raise StoreError(f"--labels {path} holds other files ({shown}) and no label store; a store "
                                 f"is made only in a new or empty folder: pass another --labels folder")
            if not replace:
                raise StoreError(f"--labels {path} already holds a label store; pass --overwrite-labels "
                                 f"to make it again")
            names = {"meta.json", *(f"{a}.npy" for a in "boxes flips sizes done indices values digests".split())}
            for name in os.listdir(path):  # delete the store's own files (meta, arrays, temporary files) only
                if name in names or name.startswith("meta.json.tmp"):
                    os.remove(os.path.join(path, name))
        meta = dict(meta, format_version=FORMAT_VERSION, label_dim=meta.get("label_dim") or meta["num_classes"],
                    stores=meta.get("stores", "probs"))
        need, free = cls.planned_bytes(meta), free_bytes(path)
        if need > free:
            raise StoreError(f"the label store needs {human_bytes(need)} but {path} has {human_bytes(free)} "
                             f"free; free disk space or pass another --labels folder")
        try:
            os.makedirs(path, exist_ok=True)
            _write_json_atomic(os.path.join(path, "meta.json"), dict(meta, state="allocating"))
            for name, (shape, dtype) in cls.array_specs(meta).items():
                file = os.path.join(path, f"{name}.npy")
                np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=shape)  # header, sparse rows
                with open(file, "r+b") as f:  # reserve the blocks; sparse where unsupported (macOS, some fs)
                    try:
                        getattr(os, "posix_fallocate", lambda *_: None)(f.fileno(), 0, os.path.getsize(file))
                    except OSError as error:
                        if error.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS):
                            raise
            _write_json_atomic(os.path.join(path, "meta.json"), dict(meta, state="ready"))
        except OSError as error:
            full = error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            fix = ("free disk space or pass another --labels folder, then run the same command again" if full
                   else "pass a writable --labels folder")
            raise StoreError(f"cannot create the label store in {path} ({error.strerror}); {fix}") from None
        return cls(path, dict(meta, state="ready"), writable=True)

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
            raise StoreError(f"label store meta {meta_file} is unreadable ({error}); make the store "
                             f"again with --overwrite-labels") from None
        missing = [key for key in REQUIRED if not isinstance(meta, dict) or key not in meta]
        if missing:
            raise StoreError(f"label store meta {meta_file} lacks {', '.join(missing)}: it is damaged or "
                             f"not a label store of this project; make it again with --overwrite-labels")
        if meta["format_version"] > FORMAT_VERSION:
            raise StoreError(f"label store {path} has format version {meta['format_version']}, "
                             f"newer than this code's {FORMAT_VERSION}; update the code")
        if meta["format_version"] < FORMAT_VERSION:
            raise StoreError(f"label store {path} has format version {meta['format_version']} (made before "
                             f"image sizes were recorded); make it again with --overwrite-labels")
        if meta["codec"] not in CODECS:
            raise StoreError(f"label store {path} names an unknown codec {meta['codec']!r} (known: "
                             f"{', '.join(CODECS)}); it is damaged: make it again with --overwrite-labels")
        store = cls(path, meta, writable)
        if store.ready:
            store.arrays  # open now so truncated or foreign files are reported here
        return store

    @property
    def ready(self):
        """All arrays were allocated (False: a creation that was interrupted)."""
        return self.meta.get("state") == "ready"

    @property
    def imported(self):
        return "imported" in self.meta

    @property
    def arrays(self):
        if self._arrays is None:
            if not self.ready:
                raise StoreError(f"label store {self.path} was not fully created (interrupted); run the "
                                 f"label generation again")
            arrays = {}
            for name, (shape, dtype) in self.array_specs(self.meta).items():
                file = os.path.join(self.path, f"{name}.npy")
                try:
                    arrays[name] = array = np.load(file, mmap_mode="r", allow_pickle=False)
                except (OSError, ValueError) as error:
                    raise StoreError(f"label store array {file} is missing, truncated or not a plain .npy "
                                     f"array ({error}); make the store again with --overwrite-labels") from None
                if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
                    raise StoreError(f"label store array {file} has shape {array.shape} "
                                     f"{array.dtype}, expected {tuple(shape)} {dtype}; the store is "
                                     f"damaged: make it again with --overwrite-labels")
            self._arrays = arrays
        return self._arrays

    def __getstate__(self):  # DataLoader workers re-open the maps themselves
        return {"path": self.path, "meta": self.meta, "writable": False, "_arrays": None}

    # -- checks -----------------------------------------------------------------------------------
    def differences(self, expected):
        """[(field, store value, expected value)] for every identity field present in `expected`."""
        return [(key, self.meta.get(key), expected[key]) for key in IDENTITY if key in expected and
                (not _same_teachers(self.meta.get(key), expected[key]) if key == "teachers" else
                 _comparable(key, self.meta.get(key)) != _comparable(key, expected[key]))]

    def check_matches(self, expected, advice=None):
        """Refuse a store whose identity differs from `expected`: one sentence naming each field that does."""
        diffs = self.differences(expected)
        if diffs:
            advice = advice or ("pass the flags it was made with, another --labels folder, or "
                                "--overwrite-labels to make it again")
            raise StoreError(f"label store {self.path} was made with other settings "
                             f"({_diff_text(diffs)}); {advice}")

    @property
    def complete(self):
        return self.ready and bool(np.asarray(self.done).all())

    def done_count(self):
        """Labelled images, read from the file itself (fresh on a shared filesystem, no mmap cache)."""
        with open(os.path.join(self.path, "done.npy"), "rb") as f:
            f.seek(self.arrays["done"].offset)
            return int(np.frombuffer(f.read(self.meta["num_images"]), dtype=np.uint8).astype(bool).sum())

    def wait_until_complete(self, poll_seconds=2.0):
        """Poll (no collective: ranks may finish hours apart) until every image is done; a failed rank's
        sentence in failure_marker(path) stops every waiting rank with it."""
        while self.done_count() < self.meta["num_images"]:
            if os.path.exists(failure_marker(self.path)):
                with open(failure_marker(self.path)) as f:
                    raise StoreError(f"another process stopped while labelling: {f.read().strip()}")
            time.sleep(poll_seconds)

    def check_image_sizes(self, samples, limit=None):
        """Refuse images whose (width, height) changed since labelling (PIL header reads, no decode); skipped
        above `limit` images (the dataset checks each image anyway, when it is loaded)."""
        if limit is not None and len(samples) > limit:
            return False
        for n, (path, _) in enumerate(samples):
            try:
                with Image.open(path) as image:
                    size = image.size
            except OSError:
                continue  # unreadable images are reported, with their path, where they are loaded
            self.check_size(n, path, size)
        return True

    def check_contents(self, samples, every=False, sample=64):
        """Refuse images whose file changed since labelling (content_digest): all of them with `every`
        (--verify-images) or in a set of up to 2,048, else `sample` spread over the set."""
        if "digests" not in self.arrays:
            return
        spread = np.unique(np.linspace(0, len(samples) - 1, sample).astype(int))
        for n in range(len(samples)) if every or len(samples) <= 2048 else spread:
            path, stored = samples[n][0], int(self.arrays["digests"][n, 0])
            if stored and os.path.isfile(path) and content_digest(path) != stored:
                raise StoreError(f"image {path} changed since its labels in {self.path} were made (its content hash "
                                 f"differs); restore it, or make the labels again with --overwrite-labels")

    def check_size(self, n, path, size):
        stored = self.arrays["sizes"][n]
        if tuple(int(v) for v in stored) != tuple(size):
            raise StoreError(f"image {path} is {size[0]}x{size[1]} px but was {int(stored[0])}x"
                             f"{int(stored[1])} when its labels in {self.path} were made; restore the "
                             f"image, or make the labels again with --overwrite-labels")

    # -- rows -------------------------------------------------------------------------------------
    @property
    def done(self):
        return self.arrays["done"]

    def _fd(self, name):
        """pwrite at byte offsets, not a writable memory map: each process writes only its own bytes (no page
        written back whole), an I/O error is an exception, not a SIGBUS. Two ranks' rows and done flags can
        share a page: across nodes that needs a filesystem merging byte-range writes (NFS, Lustre, GPFS)."""
        if not self.writable:
            raise StoreError(f"label store {self.path} was opened read-only")
        fds = self.__dict__.setdefault("_fds", {})
        if name not in fds:
            fds[name] = os.open(os.path.join(self.path, f"{name}.npy"), os.O_RDWR)
        return fds[name]

    def _pwrite(self, name, image_index, crop_slice, rows):
        array = self.arrays[name]
        at = array.offset + image_index * array.strides[0] + (crop_slice.start or 0) * array.strides[1]
        os.pwrite(self._fd(name), np.ascontiguousarray(rows, dtype=array.dtype).tobytes(), at)

    def write(self, image_index, crop_slice, boxes, flips, indices, values, size, digest=None):
        """Rows of crops `crop_slice` of one image of (width, height) `size` (and its content_digest);
        readers see them after mark_done."""
        if max(size) > 65535:
            raise StoreError(f"image {image_index} is larger than 65535 pixels on a side; "
                             f"downscale it (crop boxes are stored as uint16)")
        self._pwrite("sizes", image_index, slice(0, 2), size)  # the image's one (width, height) row
        if digest is not None and "digests" in self.arrays:
            self._pwrite("digests", image_index, slice(0, 1), [digest])
        for name, rows in (("boxes", boxes), ("flips", flips), ("indices", indices), ("values", values)):
            if name in self.arrays:
                self._pwrite(name, image_index, crop_slice, rows)

    def mark_done(self, image_indices):
        """fsync the rows of `image_indices`, then set and fsync their done flags."""
        if len(image_indices) == 0:
            return
        for name in self.arrays:
            if name != "done":
                os.fsync(self._fd(name))
        for n in image_indices:
            os.pwrite(self._fd("done"), b"\x01", self.done.offset + int(n))
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


def open_for_generation(path, meta, overwrite=False):
    """The store at `path` to generate `meta`'s labels into (call on one process): created when the
    folder is new or empty, made again after an interrupted creation or with `overwrite`, reused (to
    resume) when it was started with the same identity; otherwise one sentence says what differs."""
    if overwrite or not LabelStore.is_store(path):
        return LabelStore.create(path, meta, replace=overwrite)
    store = LabelStore.open(path)
    if not store.ready:  # killed (or a full disk) while allocating: nothing labelled yet
        return LabelStore.create(path, meta, replace=True)
    made, wanted = store.meta.get("teacher_precision", "float32"), meta.get("teacher_precision", "float32")
    if made != wanted:
        raise StoreError(f"label store {path} was started with the teachers in {made}, this run has them in "
                         f"{wanted} (--teacher-amp); run as it was started, pass --overwrite-labels, or "
                         f"another --labels folder")
    if store.imported:
        raise StoreError(f"label store {path} holds imported labels; train from it (--mode fkd) or "
                         f"pass another --labels folder to generate labels")
    diffs = store.differences(meta)
    if diffs and not store.complete and {key for key, _, _ in diffs} <= set(IMAGE_FIELDS):
        raise StoreError(f"label store {path} is incomplete ({store.done_count()} of {store.meta['num_images']} "
                         f"images labelled) and was started for other images ({_diff_text(diffs)}): the "
                         f"training images changed since that run (an image added or removed); rerun with "
                         f"--overwrite-labels to label the current images from the start")
    store.check_matches(meta)
    return store


# --- Reading a store for training (FKD phase 2, Fast MEAL V2) ------------------------------------
def crop_schedule(seed, image_index, stored, start, count):
    """Stored crops an image uses at stream positions start .. start+count-1: a fresh per-image permutation
    of the M crops every M positions, so none repeats until all M were used (the paper's "shuffling and
    non-overlapping sampling"; the official code drew at random each pass)."""
    positions = range(start, start + count)
    perms = {cycle: np.random.default_rng([seed, image_index, 1, cycle]).permutation(stored)
             for cycle in {p // stored for p in positions}}
    return np.array([perms[p // stored][p % stored] for p in positions], dtype=np.int64)


def decode_stored_batch(indices, values, meta, device, logits_temperature=None):
    """Dense soft labels [B * m, D] on `device` of a collated StoredCrops batch (empty tensor: not stored)."""
    indices = indices.to(device, non_blocking=True).flatten(0, 1) if indices.numel() else None
    values = values.to(device, non_blocking=True).flatten(0, 1) if values.numel() else None
    width = meta.get("label_dim") or meta["num_classes"]
    return decode(indices, values, meta["codec"], width, logits_temperature)


class StoredCrops(Dataset):
    """Item (image n, stream position) -> m stored crops replayed at the student's size + label rows. Use
    with TaggedSampler and `sampler.set_epoch(epoch, position)` (crops per image consumed so far).
    `augment(crops, generator)`: an optional random op on the uint8 crops (e.g. colour jitter), seeded by
    (seed, n, position), so never by workers or restarts. An image resized since labelling is refused."""

    def __init__(self, samples, store, m, size, interpolation, seed, augment=None):
        self.samples, self.store, self.m, self.size, self.interp = samples, store, m, size, interpolation
        self.seed, self.augment = seed, augment

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, item):
        n, start = item_and_tag(item, "StoredCrops")
        crop_ids = crop_schedule(self.seed, n, self.store.meta["num_crops"], start, self.m)
        boxes, flips, indices, values = self.store.read(n, crop_ids)
        image = load_rgb(self.samples[n][0])
        self.store.check_size(n, self.samples[n][0], image.size)
        crops = replay_crops(image, boxes, flips, self.size, self.interp)  # exact replay of the crop
        if self.augment is not None:
            crops = self.augment(crops, torch.Generator().manual_seed(derive_seed(self.seed, n, 2, start)))
        rows = (torch.zeros(0) if a is None else torch.from_numpy(a) for a in (indices, values))
        return (crops, *rows, self.samples[n][1])


def default_store_path(tag, root, args, teachers, label_dim, precision="float32"):
    """runs/fkd_labels/<data>-<hash of the data folder and label settings>, shared by every run using both."""
    settings = {"data_root": os.path.abspath(root), **_settings(
        teachers, args.codec, args.k, args.stored_crops, args.crop_scale, args.crop_ratio, args.temperature,
        args.stores, args.seed, label_dim)}
    settings.update({"teacher_precision": precision} if precision != "float32" else {})
    return os.path.join("runs", "fkd_labels", f"{tag}-{identity_digest(settings, list(settings))}")


def describe_store(path, meta=None, store=None):
    """'label store PATH: 18.5 GB on disk for N images x M crops (ms, K=5), 1.2 TB free on its disk'."""
    meta = store.meta if store is not None else meta
    size = store.bytes_on_disk() if store is not None else LabelStore.planned_bytes(meta)
    return (f"label store {path}: {human_bytes(size)} {'on disk' if store is not None else 'to allocate'} for "
            f"{meta['num_images']} images x {meta['num_crops']} crops ({meta['codec']}"
            f"{', K=' + str(meta['k']) if meta['codec'] in ('ms', 'mr') else ''}), "
            f"{human_bytes(free_bytes(path))} free on its disk")


def lock_store(path, log=print):
    """Hold .NAME.lock beside the store while generating: two runs never create or write one store at once."""
    from .ckpt import hold_lock
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    try:
        note = hold_lock(os.path.join(parent, f".{name}.lock"), "labels:" + os.path.realpath(path), "another run",
                         "wait for it to end (it is labelling these images), or pass another --labels folder",
                         f"label store {path}")
    except PermissionError as error:
        raise StoreError(f"cannot write next to label store {path} ({error}); pass a writable --labels "
                         f"folder") from None
    if note:
        log(note)


def check_for_training(store, args, explicit, train_set, teachers, label_dim, size_check_limit, log=print):
    """Refuse a store made for other images, classes, teachers, crops, seed, codec, K, T or kind, or
    with fewer crops than --num-crops. Imported labels fix args.codec and args.k."""
    if store.imported:  # released labels: their codec and K are fixed by the files
        for flag in ("codec", "k"):
            if flag in explicit and getattr(args, flag) != store.meta[flag] and \
                    not (flag == "k" and store.meta["codec"] not in ("ms", "mr")):
                raise StoreError(f"--{flag} {getattr(args, flag)} differs from the imported store's "
                                 f"{store.meta[flag]} ({store.path}); drop --{flag}: imported labels are "
                                 f"used as released")
        args.codec, args.k = store.meta["codec"], store.meta["k"]
        expected = dict(image_identity(train_set), stores="probs")
        store.check_matches({k: v for k, v in expected.items() if k in store.meta}, advice="the imported "
                            "labels are for other images; import them for these with --mode import")
        log(f"training on imported labels from {store.meta['imported'].get('source')} "
            f"({store.meta['imported'].get('label_type')}, {store.meta['num_crops']} crops per image)")
    else:
        expected = label_identity(train_set, teachers, args.codec, args.k, args.stored_crops, args.crop_scale,
                                  args.crop_ratio, args.temperature, args.stores, args.seed, label_dim)
        del expected["num_crops"]  # training may use a store with more crops than the recipe's M
        store.check_matches(expected)
        if "stored_crops" in explicit and args.stored_crops != store.meta["num_crops"]:
            raise StoreError(f"--stored-crops {args.stored_crops} differs from the {store.meta['num_crops']} "
                             f"crops stored per image in {store.path}; drop --stored-crops or pass another "
                             f"--labels")
    if args.num_crops > store.meta["num_crops"]:
        raise StoreError(f"--num-crops {args.num_crops} exceeds the {store.meta['num_crops']} crops stored per "
                         f"image in {store.path}; lower --num-crops")
    store.check_image_sizes(train_set.samples, limit=size_check_limit)
    store.check_contents(train_set.samples, every=args.verify_images)


def failure_marker(path):
    """.NAME.failed beside the store: the sentence of a rank that stopped while labelling into it."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.failed")


def open_shared(ctx, path, writable=False):
    """Open the store on every process and check that all of them see the same one: a store on one
    node's local disk is refused in one sentence on every rank instead of a wait that never ends."""
    store, error = None, None
    try:
        store = LabelStore.open(path, writable=writable)
    except (StoreError, OSError, ValueError) as exc:
        error = str(exc)
    digest = identity_digest(store.meta) if store is not None else None
    same = ctx.broadcast_object(digest) == digest
    missing, differ = ctx.all_reduce_sum([float(store is None), float(store is not None and not same)])
    if missing or differ:
        raise StoreError(f"label store {path} is {'missing' if missing else 'another store'} on "
                         f"{int(missing or differ)} of {ctx.world} processes{' (' + error + ')' if error else ''}: "
                         f"--labels must be a folder that every node sees (a shared filesystem)")
    return store


@contextlib.contextmanager
def failing_tells_the_others(path):
    """An error on this rank leaves its sentence beside the store, where the other ranks' wait sees it."""
    try:
        yield
    except Exception as error:
        with open(failure_marker(path), "w") as f:
            f.write(one_sentence(error))
        raise


def show_labels(store, train_set, path, temperature, num_images=6, crops_per_image=6, size=128):
    """PNG, one row per image: the whole image with its crop boxes and its class, then each stored
    crop (replayed, framed in its box's colour) with its number and top-3 stored classes."""
    from PIL import ImageDraw, ImageFont
    font = ImageFont.load_default()
    cell, caption = size + 8, 4 * (font.getbbox("Ag")[3] + 3) + 4
    colours = ("#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#a65628", "#f781bf", "#999999")
    images = np.random.default_rng(0).choice(len(train_set), size=min(num_images, len(train_set)), replace=False)
    crops_per_image = min(crops_per_image, store.meta["num_crops"])
    width = store.meta.get("label_dim") or store.meta["num_classes"]
    names = train_set.classes if width == len(train_set.classes) else [f"dim {i}" for i in range(width)]
    canvas = Image.new("RGB", ((crops_per_image + 1) * cell, len(images) * (cell + caption)), "white")
    draw = ImageDraw.Draw(canvas)

    def fit(text):  # shorten a caption until it fits under its cell
        while len(text) > 2 and draw.textlength(text, font=font) > size:
            text = text[:-2] + "."
        return text

    def under(x, y, lines):  # a caption under the cell at (x, y)
        draw.multiline_text((x, y + cell), "\n".join(lines), fill="black", font=font, spacing=3)
    for row, n in enumerate(images):
        image_path, target = train_set.samples[n]
        image, y = load_rgb(image_path), row * (cell + caption)
        boxes, flips, indices, values = store.read(int(n), np.arange(crops_per_image))
        crops = replay_crops(image, boxes, flips, size)
        probs = decode(*(None if a is None else torch.from_numpy(a) for a in (indices, values)),
                       store.meta["codec"], width, temperature if store.meta["stores"] == "logits" else None)
        scale = size / max(image.size)
        canvas.paste(image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale)))),
                     (4, y + 4))
        under(4, y, [fit(f"image {n}"), fit(f"class {train_set.classes[target]}"),
                     fit(f"{len(boxes)} crops shown")])
        for col, (top, left, h, w) in enumerate(boxes.tolist()):
            x, colour = (col + 1) * cell, colours[col % len(colours)]
            draw.rectangle([4 + left * scale, y + 4 + top * scale, 4 + (left + w) * scale - 1,
                            y + 4 + (top + h) * scale - 1], outline=colour, width=2)  # its box on the image
            draw.rectangle([x + 1, y + 1, x + cell - 2, y + cell - 2], outline=colour, width=3)
            canvas.paste(Image.fromarray(crops[col].permute(1, 2, 0).numpy()), (x + 4, y + 4))
            best = probs[col].topk(min(3, probs.shape[1]))
            under(x + 4, y, [f"crop {col}" + (" (flipped)" if flips[col] else "")] +
                  [fit(f"{p:.2f} {names[c]}") for p, c in zip(best.values.tolist(), best.indices.tolist())])
    canvas.save(path)
    return path
