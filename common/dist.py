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
import signal
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
from timm.utils import unwrap_model
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm


class Context:
    """What a process needs to know about the job: rank, world size, device."""

    def __init__(self, rank=0, world=1, local_rank=0, device=torch.device("cpu")):
        self.rank, self.world, self.local_rank, self.device = rank, world, local_rank, device

    @property
    def main(self):
        return self.rank == 0

    @property
    def distributed(self):  # a process group: several processes, or one under KD_DDP=1 (GPU smoke)
        return self.world > 1 or (dist.is_available() and dist.is_initialized())

    def print(self, *args):
        if self.main:
            tqdm.write(" ".join(str(a) for a in args), file=sys.stdout)
            sys.stdout.flush()

    def bar(self, iterable=None, **kwargs):
        """Progress on rank 0: a tqdm bar when stdout is a terminal, plain lines with rate and ETA
        (at most every 30 s or 5 %) when it is a file (SLURM logs); nothing on other ranks."""
        if iterable is not None:  # each step first checks for a stop that a swallowed signal asked for
            kwargs.setdefault("total", len(iterable) if hasattr(iterable, "__len__") else None)
            iterable = (item for item in iterable if not stop_if_interrupted())
        if self.main and not _is_terminal(sys.stdout):
            return PlainProgress(iterable, write=self.print, **kwargs)
        return tqdm(iterable, disable=not self.main, dynamic_ncols=True, leave=False, **kwargs)

    def autocast(self, args):
        """torch.autocast for the forward pass: on iff --amp and CUDA, dtype from --amp-dtype."""
        return torch.autocast(self.device.type, dtype=getattr(torch, amp_dtype(args)),
                              enabled=amp_enabled(args, self.device))

    def teacher_autocast(self, args):
        """Teachers (FKD labels and online KD, MEAL V2) run in fp32 as the official code, unless
        --teacher-amp puts them under --amp too; returns (autocast, the precision they run in)."""
        on = bool(getattr(args, "teacher_amp", False)) and amp_enabled(args, self.device)
        return (self.autocast(args) if on else torch.autocast(self.device.type, enabled=False),
                amp_dtype(args) if on else "float32")

    def grad_scaler(self, args):
        """A GradScaler that scales only float16 AMP on CUDA (bfloat16 has fp32's range: no scaler)."""
        return torch.amp.GradScaler("cuda", enabled=scaler_enabled(args, self.device))

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, values):
        """Sum a list of numbers over ranks (float64 on the communication device)."""
        nccl = dist.is_initialized() and dist.get_backend() == "nccl"
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device if nccl else "cpu")
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor.tolist()

    def broadcast_object(self, obj):
        holder = [obj]
        if self.distributed:
            dist.broadcast_object_list(holder, src=0)
        return holder[0]


class EpochSums:
    """Per-epoch sums kept on the device (no host sync per step), all-reduced once at epoch end:
    `add(n, loss=l, correct=c)` adds n * l for a batch mean l, or c as it is for a count
    (`counts=`); `means(ctx)` returns ({name: sum / n over all ranks}, n over all ranks)."""

    def __init__(self, device):
        self.device, self.count, self.sums = device, 0, {}

    def add(self, n, counts=(), **values):
        self.count += n
        for name, value in values.items():
            value = value.detach() if torch.is_tensor(value) else torch.tensor(float(value))
            value = value.to(self.device, torch.float64) * (1 if name in counts else n)
            self.sums[name] = self.sums[name] + value if name in self.sums else value

    def means(self, ctx):
        names = sorted(self.sums)
        *sums, count = ctx.all_reduce_sum([self.sums[k].item() for k in names] + [self.count])
        return {k: s / max(count, 1) for k, s in zip(names, sums)}, int(count)


def on_every_rank(ctx, work, errors, raise_as, share_result=False):
    """Run `work()` on rank 0 and share its outcome: an error of one of the types `errors` there
    ends every rank as `raise_as(sentence)` instead of leaving the others waiting for rank 0;
    with `share_result` every rank gets rank 0's (picklable) result, else only rank 0 does."""
    result, message = None, None
    if ctx.main:
        try:
            result = work()
        except errors as exc:
            message = str(exc)
    message, shared = ctx.broadcast_object((message, result if share_result else None))
    if message is not None:
        raise raise_as(message)
    return result if ctx.main else shared


def one_sentence(error):
    """An error raised in a DataLoader worker carries the worker's traceback: keep its last line."""
    text = str(error)
    if "Traceback (most recent call last)" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        kind, _, rest = last.partition(": ")
        text = rest if rest and kind.replace(".", "").isidentifier() else last  # "module.Error: ..."
    return text


_signals = {"critical": 0, "received": False}


@contextlib.contextmanager
def uninterrupted():
    """Ctrl-C / SIGTERM wait until the block is done (a checkpoint write), then stop the run."""
    _signals["critical"] += 1
    try:
        yield
    finally:
        _signals["critical"] -= 1
        stop_if_interrupted()


def stop_if_interrupted():
    """Raise the interruption a signal asked for, outside a critical block; the raise in the handler itself
    is lost when the signal lands inside a finaliser or an at-fork hook (both swallow exceptions)."""
    if _signals["received"] and not _signals["critical"]:
        raise KeyboardInterrupt


def quiet_worker(worker_id):
    """DataLoader worker_init_fn: a worker whose main process stopped mid-handover of a batch (a broken
    pipe in multiprocessing's fd-sharing thread) ends without a traceback; the main process says why."""
    hook = sys.excepthook
    sys.excepthook = lambda kind, *rest: None if issubclass(kind, (ConnectionError, EOFError)) else hook(kind, *rest)


def _interrupt(signum, frame):
    _signals["received"] = True
    sys.unraisablehook = lambda unraisable: None  # what a finaliser prints from now on is the stop itself
    stop_if_interrupted()


def run_main(work, args, errors):
    """Set up the process (group; a note when --amp cannot apply, off CUDA), run `work(ctx)`, and end
    every way one sentence long: Ctrl-C and SIGTERM (what a cluster scheduler sends before it kills a
    job) say how to resume, `errors` print as `error: ...`; both exit non-zero. The process group and
    the run lock are released."""
    from .ckpt import INTERRUPTED

    main_thread = threading.current_thread() is threading.main_thread()
    _signals["received"] = False
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGINT)} if main_thread else {}
    try:
        ctx = setup(args.device, getattr(args, "threads", None))
        if getattr(args, "amp", False) and ctx.device.type != "cuda":
            ctx.print("note: --amp applies to CUDA only; running in fp32 on CPU")
        work(ctx)
    except BaseException as error:
        # the same SIGTERM to the process group also ended the loader workers: what their loss raised
        # here (a worker "killed by signal", a broken pipe) is the interruption too; say how to resume
        if isinstance(error, KeyboardInterrupt) or _signals["received"]:
            sys.unraisablehook = lambda unraisable: None
            raise SystemExit(INTERRUPTED) from None
        if isinstance(error, errors):
            raise SystemExit(f"error: {one_sentence(error)}") from None
        raise
    finally:
        _signals["received"] = False
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        cleanup()


def amp_dtype(args):
    return getattr(args, "amp_dtype", None) or "float16"


def amp_enabled(args, device):
    return bool(getattr(args, "amp", False)) and device.type == "cuda"


def scaler_enabled(args, device):
    return amp_enabled(args, device) and amp_dtype(args) == "float16"


def maybe_compile(model, args):
    """torch.compile(model) when --compile was given; the model unchanged otherwise."""
    return torch.compile(model) if getattr(args, "compile", False) else model


def wrap_ddp(model, ctx, **kwargs):
    """DistributedDataParallel(model) on this rank's device in a process group; the model unchanged
    otherwise (and None, an optional network, stays None). `kwargs` go to DistributedDataParallel."""
    if model is None or not ctx.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                   **kwargs)


def _is_terminal(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


class PlainProgress:
    """tqdm's interface as used here (iterate, update, `with`) printing plain lines for log files:
    "epoch 3/90: 1200/5004 (24%), 13.1 it/s, 1m32s elapsed, ETA 4m50s", at most one line every
    `interval` seconds, or sooner after each further `step` fraction of the total (not sooner
    than `min_gap` seconds)."""

    def __init__(self, iterable=None, desc="", total=None, unit="it", write=print, interval=30.0,
                 step=0.05, min_gap=2.0, clock=time.monotonic, **_tqdm_only_kwargs):
        self.iterable, self.desc, self.unit, self.write = iterable, desc, unit, write
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.interval, self.step, self.min_gap, self.clock = interval, step, min_gap, clock
        self.n = self.last_n = 0
        self.start = self.last_time = clock()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def update(self, n=1):
        self.n += n
        now = self.clock()
        since, elapsed = now - self.last_time, now - self.start
        stepped = self.total and self.n - self.last_n >= self.step * self.total
        if since >= self.interval or (stepped and since >= self.min_gap):
            rate = self.n / elapsed if elapsed > 0 else math.nan
            done = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
            eta = f", ETA {_duration((self.total - self.n) / rate)}" if self.total and rate > 0 else ""
            self.write(f"{self.desc}: {done}, {rate:.1f} {self.unit}/s, {_duration(elapsed)} elapsed{eta}")
            self.last_time, self.last_n = now, self.n


def _duration(seconds):
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def setup(device="auto", threads=None):
    """Initialise the process group if torchrun started us, and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was given but no CUDA GPU is visible; "
                         "use --device cpu or run on a GPU machine")
    torch_device = torch.device("cuda", local_rank) if device == "cuda" else torch.device(device)
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    # KD_DDP=1 under torchrun: a process group of one, so one GPU runs the DDP, NCCL and SyncBN paths
    grouped = world > 1 or (os.environ.get("KD_DDP") == "1" and "MASTER_ADDR" in os.environ)
    if grouped and not dist.is_initialized():
        # device_id binds NCCL to this rank's GPU (no guessing from the current device)
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30),
                                device_id=torch_device if torch_device.type == "cuda" else None)
    threads, why = cpu_threads(torch_device, int(os.environ.get("LOCAL_WORLD_SIZE", world)), os.environ,
                               threads)
    if threads:
        torch.set_num_threads(threads)
    ctx = Context(rank, world, local_rank, torch_device)
    if why:
        ctx.print(f"threads: {torch.get_num_threads()} per process ({why}; set --threads N to choose)")
    return ctx


def idle_cores(sample_seconds=0.1):
    """(cores this process may use, how many of them were idle over a short sample of /proc/stat);
    the sample is machine-wide, so another job's busy cores count as taken; off Linux all are idle."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    def busy_and_total():
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq ...
        return sum(ticks) - ticks[3] - ticks[4], sum(ticks)
    try:
        busy0, total0 = busy_and_total()
        time.sleep(sample_seconds)
        busy1, total1 = busy_and_total()
    except (OSError, ValueError, IndexError):
        return cores, float(cores)
    busy = (os.cpu_count() or cores) * (busy1 - busy0) / max(total1 - total0, 1)
    return cores, max(0.0, min(float(cores), cores - busy))


def cpu_threads(device, local_world, environ, requested=None, measure=idle_cores):
    """(intra-op threads per process on CPU, or None for torch's choice; a line saying why):
    --threads N wins, then an explicit OMP_NUM_THREADS (torchrun sets it to 1 for several processes
    per node); otherwise the cores idle at start, shared between this node's processes. Threads on
    cores that another job keeps busy make every parallel region wait for the descheduled thread:
    label generation ran 3.4x slower with one busy core beside it (docs/performance.md)."""
    if requested:
        return requested, f"--threads {requested}"
    if device.type != "cpu":
        return None, None
    if environ.get("OMP_NUM_THREADS"):
        return None, f"OMP_NUM_THREADS={environ['OMP_NUM_THREADS']}"
    cores, idle = measure()
    threads = max(1, int(idle + 0.5) // max(1, local_world))
    return threads, f"{cores} cores, {idle:.1f} idle at start, {local_world} process(es) on this node"


def cleanup():
    """The end of a run: leave the process group, release the output folder's lock."""
    from .ckpt import release_all  # imported here: ckpt builds on models, dist on nothing of ours
    release_all()
    if dist.is_initialized():
        dist.destroy_process_group()


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


def epoch_generator(seed, rank, epoch, stream=0, device="cpu"):
    """A torch.Generator of its own (on `device`) for (seed, rank, epoch, stream): mixup, lighting."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, rank, epoch, stream))


@contextlib.contextmanager
def seeded(seed):
    """Run a block with torch's CPU RNG and python's `random` seeded by `seed` alone, and restore the
    caller's streams after: a model's initial weights (or an item's augmentation, SeededItems) depend
    on the seed only, the same on every rank, and the rank's own streams are not reset."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


unwrap = unwrap_model  # the bare model under DistributedDataParallel / torch.compile wrappers
