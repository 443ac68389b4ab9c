"""Run the same file under `python` and under `torchrun`: NCCL on CUDA, gloo on CPU.

Rank 0 alone prints, shows tqdm bars, writes logs and checkpoints.
"""
import contextlib
import datetime
import os
import random
import sys

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
        """A tqdm bar on rank 0, a plain iterable elsewhere."""
        return tqdm(iterable, disable=not self.main, dynamic_ncols=True, leave=False, **kwargs)

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
    else:
        torch_device = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    if torch_device.type == "cpu" and world > 1:
        # share the machine's cores between the ranks instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return Context(rank, world, local_rank, torch_device)


def cleanup():
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
