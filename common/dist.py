"""Run the same file under `python` and under `torchrun`: NCCL on CUDA, gloo on CPU.

Rank 0 alone prints, shows progress (a tqdm bar on a terminal, plain periodic lines in a log
file), writes logs and checkpoints. Mixed precision (`--amp`, `--amp-dtype`) and `--compile`
are set up here the same way for every script.
"""
import contextlib
import datetime
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm


class Context:
    """What a process needs to know about the job: rank, world size, device."""

    def __init__(self, rank=0, world=1, local_rank=0, device=torch.device("cpu")):
        self.rank, self.world, self.local_rank, self.device = rank, world, local_rank, device

    @property
    def main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world > 1

    def print(self, *args):
        if self.main:
            tqdm.write(" ".join(str(a) for a in args), file=sys.stdout)
            sys.stdout.flush()

    def bar(self, iterable=None, **kwargs):
        """Progress on rank 0: a tqdm bar when stdout is a terminal, plain lines with rate and ETA
        (at most every 30 s or 5 %) when it is a file (SLURM logs); nothing on other ranks."""
        if self.main and not _is_terminal(sys.stdout):
            return PlainProgress(iterable, write=self.print, **kwargs)
        return tqdm(iterable, disable=not self.main, dynamic_ncols=True, leave=False, **kwargs)

    def autocast(self, args):
        """torch.autocast for the forward pass: on iff --amp and CUDA, dtype from --amp-dtype."""
        return torch.autocast(self.device.type, dtype=getattr(torch, amp_dtype(args)),
                              enabled=amp_enabled(args, self.device))

    def grad_scaler(self, args):
        """A GradScaler that scales only float16 AMP on CUDA (bfloat16 has fp32's range: no scaler)."""
        return torch.amp.GradScaler("cuda", enabled=scaler_enabled(args, self.device))

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, values):
        """Sum a list of numbers over ranks (float64 on the communication device)."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor.tolist()

    def broadcast_object(self, obj):
        holder = [obj]
        if self.distributed:
            dist.broadcast_object_list(holder, src=0)
        return holder[0]

    @property
    def comm_device(self):
        return self.device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")


def amp_dtype(args):
    return getattr(args, "amp_dtype", None) or "float16"


def amp_enabled(args, device):
    return bool(getattr(args, "amp", False)) and device.type == "cuda"


def scaler_enabled(args, device):
    return amp_enabled(args, device) and amp_dtype(args) == "float16"


def maybe_compile(model, args):
    """torch.compile(model) when --compile was given; the model unchanged otherwise."""
    return torch.compile(model) if getattr(args, "compile", False) else model


def _is_terminal(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


class PlainProgress:
    """tqdm's interface (iterate, update, context manager) printing plain lines for log files:
    "epoch 3/90: 1200/5004 (24%), 13.1 it/s, 1m32s elapsed, ETA 4m50s", at most one line every
    `interval` seconds, or sooner after each further `step` fraction of the total (not sooner
    than `min_gap` seconds)."""

    def __init__(self, iterable=None, desc="", total=None, unit="it", write=print, interval=30.0,
                 step=0.05, min_gap=2.0, clock=time.monotonic, **_tqdm_only_kwargs):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.desc, self.total, self.unit, self.write = iterable, desc, total, unit, write
        self.interval, self.step, self.min_gap, self.clock = interval, step, min_gap, clock
        self.n, self.start = 0, clock()
        self.last_time, self.last_n = self.start, 0

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def __len__(self):
        return self.total if self.total is not None else len(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def close(self):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def update(self, n=1):
        self.n += n
        now = self.clock()
        since = now - self.last_time
        stepped = bool(self.total) and (self.n - self.last_n) >= self.step * self.total
        if since >= self.interval or (stepped and since >= self.min_gap):
            self.write(self.line(now))
            self.last_time, self.last_n = now, self.n

    def line(self, now):
        elapsed = now - self.start
        rate = self.n / elapsed if elapsed > 0 else float("nan")
        done = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        eta = ""
        if self.total and rate > 0 and math.isfinite(rate):
            eta = f", ETA {_duration((self.total - self.n) / rate)}"
        return f"{self.desc}: {done}, {rate:.1f} {self.unit}/s, {_duration(elapsed)} elapsed{eta}"


def _duration(seconds):
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


def setup(device="auto"):
    """Initialise the process group if torchrun started us, and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was given but no CUDA GPU is visible; "
                         "use --device cpu or run on a GPU machine")
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    else:
        torch_device = torch.device(device)
    if world > 1 and not dist.is_initialized():
        # device_id binds NCCL to this rank's GPU (no guessing from the current device)
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30),
                                device_id=torch_device if torch_device.type == "cuda" else None)
    threads = cpu_threads(torch_device, world, os.environ)
    if threads:
        torch.set_num_threads(threads)
    return Context(rank, world, local_rank, torch_device)


def cpu_threads(device, world, environ):
    """Threads per rank for torch on CPU under torchrun, or None to leave torch's choice.

    An explicit OMP_NUM_THREADS is respected (the user knows what else shares the machine; note
    that torchrun itself sets it to 1 for several processes per node); otherwise the cores are
    shared between the ranks of this node instead of oversubscribed."""
    if device.type != "cpu" or world <= 1 or environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, (os.cpu_count() or 1) // int(environ.get("LOCAL_WORLD_SIZE", world)))


def cleanup():
    """The end of a run: leave the process group, release the output folder's lock."""
    from .ckpt import release_all  # imported here: ckpt builds on models, dist on nothing of ours
    release_all()
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed, rank=0):
    """Seed python, numpy and torch; each rank gets its own stream (seed + rank)."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


# One rule for randomness in every script: everything random in a run derives from
# (seed, rank, epoch[, item]), never from what ran before. Then every rank has its own stream
# (dropout, drop-path, mixup/cutmix, loader worker seeds), and a run resumed at an epoch boundary
# draws exactly the numbers the uninterrupted run drew, with no RNG state in the checkpoint.
def derive_seed(*keys):
    """A 32-bit seed from integer keys (numpy SeedSequence: well mixed, no collisions of a+b)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def seed_rank_epoch(seed, rank, epoch):
    """Seed python, numpy and torch (all devices) from (seed, rank, epoch); call at each epoch start."""
    value = derive_seed(seed, rank, epoch)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def epoch_generator(seed, rank, epoch, stream=0):
    """A torch.Generator of its own for (seed, rank, epoch, stream), e.g. mixup/cutmix draws."""
    return torch.Generator().manual_seed(derive_seed(seed, rank, epoch, stream))


@contextlib.contextmanager
def seeded(seed):
    """Run a block with torch's CPU RNG seeded by `seed` alone and restore the caller's stream after:
    a model's initial weights depend on the seed only (the same on every rank), and the rank's own
    stream is not reset by building it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def unwrap(model):
    """The bare model under DistributedDataParallel / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
