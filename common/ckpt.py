"""Atomic checkpoints, resume, and the per-epoch metrics log (JSON lines)."""
import json
import math
import os

import torch

from .models import ModelError, read_checkpoint


def save_atomic(obj, path):
    """torch.save to a temporary file, fsync, then rename: a kill never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state(device):
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def prepare_out(out, resume, overwrite):
    """Create the output folder; refuse to start over another run's checkpoint unless told to.

    Returns the checkpoint to resume from (or None).
    """
    os.makedirs(out, exist_ok=True)
    last = os.path.join(out, "last.pth")
    if resume:
        path = last if resume == "auto" else resume
        if not os.path.isfile(path):
            if resume == "auto":
                return None
            raise ModelError(f"--resume {path}: no such checkpoint; drop --resume to start fresh")
        return path
    if os.path.exists(last) and not overwrite:
        raise ModelError(f"{out} already holds a run's checkpoint (last.pth); pass --resume auto "
                         f"to continue it, --overwrite to start over, or another --out")
    if overwrite:
        for name in ("metrics.jsonl",):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    return None


def load_resume(path):
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "epoch" not in checkpoint:
        raise ModelError(f"{path} is not a training checkpoint of this project; "
                         f"pass a last.pth written by the same script")
    return checkpoint


def check_finite(loss, epoch, out):
    if not math.isfinite(loss):
        last = os.path.join(out, "last.pth")
        kept = f"the last good checkpoint is kept in {last}" if os.path.isfile(last) else "no checkpoint was written yet"
        raise FloatingPointError(f"training loss became {loss} in epoch {epoch + 1}; {kept}; lower --lr "
                                 f"or disable --amp")


class MetricsLog:
    """Append one JSON object per line to OUT/metrics.jsonl (rank 0 only)."""

    def __init__(self, out, enabled=True):
        self.path = os.path.join(out, "metrics.jsonl")
        self.enabled = enabled

    def append(self, record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_after(self, epoch):
        """On resume, drop records written after the checkpoint's epoch (a killed run's tail)."""
        if not (self.enabled and os.path.exists(self.path)):
            return
        with open(self.path) as f:
            keep = [line for line in f if line.strip() and json.loads(line).get("epoch", 0) <= epoch]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(self.path + ".tmp", self.path)


class Checkpointer:
    """Saves and restores everything a resumed run needs.

    `objects` maps names to things with state_dict()/load_state_dict() (model, optimizers,
    schedulers, GradScaler) or torch.Generator (get_state/set_state). OUT/last.pth holds all of it
    plus RNG state, epoch and best metric; OUT/best.pth holds the model alone (+ its data config),
    loadable as `ARCH=OUT/best.pth` by any script here.
    """

    def __init__(self, out, ctx, resume=None, overwrite=False, **objects):
        self.out, self.ctx, self.objects = out, ctx, objects
        path = prepare_out(out, resume, overwrite) if ctx.main else None
        self.resume_path = ctx.broadcast_object(path)
        self.log = MetricsLog(out, ctx.main)

    def restore(self):
        """Load the resume checkpoint if any; returns (start_epoch, best_top1)."""
        if not self.resume_path:  # a fresh start (also after --overwrite, or a run killed before its first save)
            self.log.truncate_after(0)
            return 0, 0.0
        state = load_resume(self.resume_path)
        for name, obj in self.objects.items():
            if isinstance(obj, torch.Generator):
                obj.set_state(state[name])
            else:
                obj.load_state_dict(state[name])
        set_rng_state(state["rng"], self.ctx.device)
        self.log.truncate_after(state["epoch"])
        self.ctx.print(f"resumed {self.resume_path} at epoch {state['epoch']}")
        return state["epoch"], state["best_top1"]

    def end_epoch(self, metrics, best, args, **meta):
        """Append the epoch's metrics to the log and print them, checkpoint, wait for all ranks.
        Returns True when --stop-epoch says to stop here."""
        epoch = metrics["epoch"]
        self.log.append(metrics)
        self.ctx.print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
        self.save(epoch, metrics["val_top1"], best, args, **meta)
        self.ctx.barrier()
        stop = args.stop_epoch is not None and epoch >= args.stop_epoch
        if stop:
            self.ctx.print(f"stopping after epoch {epoch} (--stop-epoch); continue with --resume auto")
        return stop

    def save(self, epoch, top1, best, args, **meta):
        """Write last.pth (and best.pth when top1 reaches best) on rank 0, atomically."""
        if not self.ctx.main:
            return
        state = {name: (obj.get_state() if isinstance(obj, torch.Generator) else obj.state_dict())
                 for name, obj in self.objects.items()}
        state.update(rng=rng_state(self.ctx.device), epoch=epoch, best_top1=best, args=vars(args), **meta)
        save_atomic(state, os.path.join(self.out, "last.pth"))
        if top1 >= best:
            save_atomic({"model": state["model"], "epoch": epoch, **meta}, os.path.join(self.out, "best.pth"))
