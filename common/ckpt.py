"""Output folders, atomic checkpoints, resume, and the per-epoch metrics log (JSON lines).

The rules every script follows:
- OUT: `--out` if given; otherwise a fresh `runs/<method>_<data>_<mode>/YYYYmmdd-HHMMSS` per run
  (`resolve_out`), and `--resume auto` continues the newest run under that base.
- One run per OUT at a time: rank 0 holds an advisory lock (fcntl.flock on OUT/.lock) for the
  whole run; a second run on the same OUT is refused, naming the pid that holds it.
- An explicit OUT that already holds a checkpoint is never overwritten without `--overwrite`.
- Resume continues the same run: every training flag must equal the checkpoint's; only the
  flags in RESUMABLE_FLAGS (where and how fast it runs, never what it computes) may change.
- Checkpoints hold no RNG state: every random draw derives from (seed, rank, epoch[, item])
  (see common/dist.py), so resuming at an epoch boundary replays the uninterrupted run.
- Checkpoints and summary.json are written to a temporary file, fsynced and renamed: a kill or a
  full disk leaves the previous last.pth (summary.json) intact.
- `--resume auto` on a run that had already finished trains nothing and keeps its summary.json
  (`nothing_to_do`).
"""
import datetime
import errno
import fcntl
import json
import math
import os
import re
import shutil
import sys

import torch

from .dist import on_every_rank, uninterrupted
from .labels import teacher_identity
from .models import ModelError, read_checkpoint

INTERRUPTED = ("interrupted; run the same command with --resume auto to continue from the last "
               "completed epoch")

# AMP and torch.compile change speed and rounding only, so a run saved without --amp may continue with it
RESUMABLE_FLAGS = frozenset({
    "workers", "device", "stop_epoch", "resume", "overwrite", "out", "val_data", "eval_only",
    "amp", "amp_dtype", "compile", "threads", "label_batch", "flush_every", "show_images", "verify_images",
})
# Locations that may move between a run and its resume (the label store is checked by content).
MOVABLE_FLAGS = frozenset({"labels"})
WEIGHT_FLAGS = ("teacher",)  # weights files a run reads every epoch (online teachers): re-hashed at resume

RUN_FILES = ("last.pth", "best.pth", "metrics.jsonl", "summary.json")  # what a run writes in OUT
RUN_NAME = re.compile(r"(\d{8}-\d{6})(?:-(\d+))?")


class CheckpointError(ModelError):
    """A checkpoint or log that cannot be written or does not fit this run."""


# --- Writing files without losing the previous version --------------------------------------------
def save_atomic(obj, path, write=torch.save):
    """write(obj, binary file) (torch.save), atomically (above); a failed write (full disk, quota)
    leaves no temporary file."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with uninterrupted():  # a Ctrl-C or SIGTERM now stops the run after the write, not inside it
        try:
            with open(tmp, "wb") as f:
                write(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as error:  # torch's zip writer reports ENOSPC as RuntimeError
            if os.path.exists(tmp):
                os.remove(tmp)
            raise CheckpointError(write_error(path, error)) from None


def write_error(path, error):
    if isinstance(error, OSError) and error.strerror:
        reason = error.strerror
    else:  # torch's zip writer: a RuntimeError whose text names no cause ("unexpected pos ...")
        try:
            full = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < 64 * 2**20
        except OSError:
            full = False
        reason = "no space left on device" if full else "the write failed: quota, file-size limit or I/O error"
    kept = f"the previous {os.path.basename(path)} is intact" if os.path.exists(path) else "nothing was lost"
    return (f"cannot write {path} ({reason}); {kept}; free disk space (or fix quota/permissions) and "
            f"run the same command with --resume auto to continue")


# --- The output folder: choose it, check it, lock it ----------------------------------------------
def make_out_folder(out):
    """Create OUT (and parents) or say in one sentence why it cannot be used."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise CheckpointError(f"--out {out} is a file, not a folder; pass a folder path")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as error:
        raise CheckpointError(f"cannot create output folder {out} ({error.strerror or error}); "
                              f"pass a writable --out") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise CheckpointError(f"output folder {out} is not writable; pass a writable --out")


_held_locks = {}  # realpath -> open lock file, kept for the life of the process


def lock_out(out):
    """Lock OUT/.lock for this process (re-entrant); a warning (returned) where the filesystem cannot."""
    try:
        return hold_lock(os.path.join(out, ".lock"), os.path.realpath(out), "another run",
                         "wait for it to end, or pass another --out", f"{out}")
    except PermissionError as error:
        raise CheckpointError(f"cannot write in output folder {out} ({error}); pass a writable --out") from None


def hold_lock(path, key, holder_kind, fix, what):
    """flock `path` exclusively for this process's lifetime (re-entrant under `key`); `what` is in
    use by `holder_kind` -> CheckpointError "WHAT is in use by HOLDER (pid N); FIX"."""
    if key in _held_locks:
        return None
    try:
        handle = open(path, "a+")
    except OSError as error:
        raise PermissionError(error.strerror or str(error)) from None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise CheckpointError(f"{what} is in use by {holder_kind}{who}; {fix}") from None
        handle.close()
        return (f"note: cannot lock {what} on this filesystem ({error.strerror}); make sure no other "
                f"run uses it at the same time")
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _held_locks[key] = handle
    return None


def release_out(out):
    """Release this process's lock on OUT (it is released at exit anyway)."""
    handle = _held_locks.pop(os.path.realpath(out), None)
    if handle is not None:
        handle.close()  # closing the last descriptor releases the flock


def release_all():
    """Release every lock this process holds (the end of a run: common.dist.cleanup)."""
    for key in list(_held_locks):
        _held_locks.pop(key).close()


def newest_run(base):
    """The newest run folder (YYYYmmdd-HHMMSS[-N]) under base, or None."""
    if not os.path.isdir(base):
        return None
    runs = [((m.group(1), int(m.group(2) or 0)), name) for name in os.listdir(base)
            if (m := RUN_NAME.fullmatch(name)) and os.path.isdir(os.path.join(base, name))]
    return os.path.join(base, max(runs)[1]) if runs else None


def fresh_run(base, now=None):
    """Create and return base/YYYYmmdd-HHMMSS (base/YYYYmmdd-HHMMSS-2, ... when taken)."""
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    make_out_folder(base)
    for attempt in range(1, 1000):
        path = os.path.join(base, stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            os.mkdir(path)  # atomic: two runs started in the same second get different folders
            return path
        except FileExistsError:
            continue
    raise CheckpointError(f"cannot find a free run folder under {base}; pass --out")


def resolve_out(out, base, ctx, resume=None):
    """The run's output folder, created and locked (rank 0 decides, every rank gets the answer or
    the error): `out` as is; else `--resume auto` continues the newest run under `base`, `--resume
    PATH` writes next to PATH, and a plain start gets a fresh `base/YYYYmmdd-HHMMSS`."""
    def choose():
        if out:
            path = out
        elif resume == "auto":
            path = newest_run(base) or fresh_run(base)
        elif resume:
            path = resume if os.path.isdir(resume) else (os.path.dirname(resume) or ".")
        else:
            path = fresh_run(base)
        make_out_folder(path)
        return path, lock_out(path)
    path, note = on_every_rank(ctx, choose, CheckpointError, CheckpointError, share_result=True)
    if note:
        ctx.print(note)
    if not out:
        ctx.print(f"output folder: {path}")
    return path


def prepare_out(out, resume, overwrite):
    """Create OUT; refuse to start over another run's checkpoint unless told to. Returns the
    checkpoint to resume from (or None)."""
    if resume and overwrite:
        raise CheckpointError("--resume continues a run and --overwrite starts it over; pass only one")
    make_out_folder(out)
    for name in os.listdir(out):  # OUT is locked: a temporary file is a killed run's half-written one
        if re.fullmatch(r"((last|best)\.pth|summary\.json)\.tmp\d+|metrics\.jsonl\.tmp", name):
            os.remove(os.path.join(out, name))
    written = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
    if resume:
        path = os.path.join(out, "last.pth") if resume == "auto" else resume
        if resume == "auto" and not os.path.exists(path):
            kept = [name for name in written if name != "metrics.jsonl"]  # a log alone: killed before epoch 1's save
            if kept:
                raise CheckpointError(f"{out} holds a run ({', '.join(written)}) but no last.pth to continue "
                                      f"from; pass --overwrite to start over (it replaces them), or another --out")
            return None
        if os.path.isdir(path):  # a run's folder: its last.pth
            if not os.path.isfile(os.path.join(path, "last.pth")):
                raise CheckpointError(f"--resume {path} is a folder without a last.pth; pass a run's "
                                      f"folder or its last.pth, or drop --resume to start fresh")
            path = os.path.join(path, "last.pth")
        if not os.path.exists(path):
            raise CheckpointError(f"--resume {path}: no such checkpoint; drop --resume to start fresh")
        return path
    if written and not overwrite:
        raise CheckpointError(f"{out} already holds a run ({', '.join(written)}); pass --resume auto to "
                              f"continue it, --overwrite to start over, or another --out")
    for name in ("metrics.jsonl", "summary.json") if overwrite else ():  # checkpoints: replaced when saved
        if name in written:
            os.remove(os.path.join(out, name))
    return None


# --- Resume: what may change, and checkpoints of other scripts or architectures -------------------
def load_resume(path):
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "epoch" not in checkpoint:
        raise CheckpointError(f"{path} is not a training checkpoint of this project; "
                              f"pass a last.pth written by the same script")
    return checkpoint


def _flag(name):
    return "--" + name.replace("_", "-")


def _shown(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value) or "(none)"
    return "(none)" if value is None else str(value)


def _same(old, new):
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return len(old) == len(new) and all(_same(a, b) for a, b in zip(old, new))
    if isinstance(old, str) and isinstance(new, str) and old != new and os.path.exists(new):
        return os.path.realpath(old) == os.path.realpath(new)  # the same path spelled differently
    if isinstance(old, float) or isinstance(new, float):
        try:
            return float(old) == float(new)
        except (TypeError, ValueError):
            return False
    return old == new


def changed_flags(saved, current):
    """[(name, saved value, current value)] for training flags that differ (order of `current`)."""
    return [(name, saved[name], value) for name, value in current.items()
            if name not in RESUMABLE_FLAGS and name in saved
            and not (name in MOVABLE_FLAGS and saved[name] is not None and value is not None)
            and not _same(saved[name], value)]


def weight_hashes(args):
    """{flag: teacher_identity (names, sha256 of NAME=PATH files)} of each WEIGHT_FLAGS flag given."""
    return {name: teacher_identity(getattr(args, name)) for name in WEIGHT_FLAGS if getattr(args, name, None)}


def check_resume(checkpoint, path, args, script):
    """Refuse a resume that would not continue the same run, in one sentence."""
    saved_script = checkpoint.get("script")
    if saved_script and script and saved_script != script:
        raise CheckpointError(f"--resume {path} is a checkpoint of {saved_script}, not of {script}; "
                              f"pass a last.pth written by {script}, or drop --resume")
    saved = checkpoint.get("args")
    if args is None or not isinstance(saved, dict):
        return  # checkpoints written before flags were recorded
    changed = changed_flags(saved, vars(args))
    if changed:
        name, old, new = changed[0]
        also = f" (also {', '.join(_flag(n) for n, _, _ in changed[1:])})" if len(changed) > 1 else ""
        raise CheckpointError(f"{_flag(name)} {_shown(new)} differs from the checkpoint's {_shown(old)}{also}: "
                              f"resume with the checkpoint's flags, or start a new run (another --out, "
                              f"or --overwrite)")
    for name, saved_hashes in (checkpoint.get("weight_sha256") or {}).items():
        if weight_hashes(args).get(name, saved_hashes) != saved_hashes:
            raise CheckpointError(f"{_flag(name)} {_shown(getattr(args, name))}: a weights file changed since "
                                  f"{path} was written (its sha256 differs); restore the file the run started "
                                  f"with, or start a new run (another --out, or --overwrite)")


def load_into(obj, state, name, path):
    """Load one saved state into a model/optimizer/scheduler/scaler/generator, one-sentence errors."""
    if isinstance(obj, torch.Generator):
        return obj.set_state(state)
    if isinstance(obj, torch.amp.GradScaler) and not state:
        return  # saved without --amp (a disabled scaler saves {}): this run's scaler starts fresh
    try:
        obj.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        first = first[:157] + "..." if len(first) > 160 else first
        raise CheckpointError(f"--resume {path} does not fit this run's {name} ({first}); pass a "
                              f"checkpoint written by the same script with the same --arch") from None


# --- The metrics log ------------------------------------------------------------------------------
def check_finite(loss, epoch, out):
    if not math.isfinite(loss):
        last = os.path.join(out, "last.pth")
        kept = f"the last good checkpoint is kept in {last}" if os.path.isfile(last) else "no checkpoint was written yet"
        raise FloatingPointError(f"training loss became {loss} in epoch {epoch + 1}; {kept}; lower --lr "
                                 f"or disable --amp")


class MetricsLog:
    """Append one JSON object per line to OUT/metrics.jsonl (rank 0 only)."""

    def __init__(self, out, enabled=True):
        self.path, self.enabled = os.path.join(out, "metrics.jsonl"), enabled

    def append(self, record):
        if self.enabled:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as error:
                raise CheckpointError(write_error(self.path, error)) from None

    def truncate_after(self, epoch):
        """On resume, drop records written after the checkpoint's epoch (a killed run's tail,
        including a half-written last line)."""
        if not (self.enabled and os.path.exists(self.path)):
            return
        keep = []
        with open(self.path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get("epoch", 0) <= epoch:
                    keep.append(json.dumps(record) + "\n")
        with open(self.path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(self.path + ".tmp", self.path)


# --- The end of a run: its summary ----------------------------------------------------------------
def write_summary(ctx, out, results, line):
    """Print the run's summary `line`; on rank 0 write `results` to OUT/summary.json, atomically."""
    ctx.print(line)
    if ctx.main:
        save_atomic(results, os.path.join(out, "summary.json"),
                    lambda obj, f: f.write(json.dumps(obj, indent=1).encode()))


def nothing_to_do(ctx, method, out, epochs):
    """Say that `--resume auto` found the run in OUT finished (train() returned no metrics): nothing
    is trained and OUT/summary.json is kept as it is."""
    ctx.print(f"{method}: {out} already holds a finished run of {epochs} epochs; nothing to do "
              f"(its results are in {os.path.join(out, 'summary.json')})")


def final_metrics(metrics, out):
    """`metrics` of the last epoch trained; for a run that had finished before this command ({}: a
    demo's first run when its second was interrupted), the last record of OUT/metrics.jsonl."""
    path = os.path.join(out, "metrics.jsonl")
    if metrics or not os.path.isfile(path):
        return metrics
    with open(path) as f:
        lines = f.read().splitlines()
    return json.loads(lines[-1]) if lines else {}


# --- The checkpointer of a training run -----------------------------------------------------------
class Checkpointer:
    """Saves and restores everything a resumed run needs: `objects` (model, optimizers, schedulers,
    GradScaler: state_dict(); torch.Generator: get_state()) in OUT/last.pth with the epoch, best
    metric, flags (`args`) and script name; the model alone (+ its data config) in OUT/best.pth,
    loadable as `ARCH=OUT/best.pth` by any script here. Constructing it locks OUT, refuses to start
    over a run without --overwrite and checks a resume against the flags, raising on every rank."""

    def __init__(self, out, ctx, resume=None, overwrite=False, args=None, **objects):
        self.out, self.ctx, self.objects, self._state = out, ctx, objects, None
        self.script = os.path.basename(sys._getframe(1).f_code.co_filename)  # the calling method file

        def open_run():
            make_out_folder(out)
            note = lock_out(out)
            path = prepare_out(out, resume, overwrite)
            if path:
                self._state = load_resume(path)
                check_resume(self._state, path, args, self.script)
            return path, note
        # ModelError: also CheckpointError and read_checkpoint's errors
        self.resume_path, note = on_every_rank(ctx, open_run, ModelError, CheckpointError, share_result=True)
        if note:
            ctx.print(note)
        self.log = MetricsLog(out, ctx.main)

    def restore(self, num_classes=None):
        """Load the resume checkpoint if any; returns (start_epoch, best_top1). `num_classes`: the
        run's, compared first, so that a class folder added or removed is named as the cause."""
        if not self.resume_path:  # a fresh start (also after --overwrite, or a run killed before its first save)
            self.log.truncate_after(0)
            return 0, 0.0
        # every rank reads the checkpoint itself: on several nodes OUT must be on a shared filesystem
        missing = self.ctx.all_reduce_sum([0.0 if os.path.isfile(self.resume_path) else 1.0])[0]
        if missing:
            raise CheckpointError(f"{self.resume_path} is missing on {int(missing)} of {self.ctx.world} "
                                  f"processes: --out must be on a filesystem shared by all nodes")
        state = self._state if self._state is not None else load_resume(self.resume_path)
        self._state = None
        if None not in (num_classes, state.get("num_classes")) and num_classes != state["num_classes"]:
            raise CheckpointError(f"--resume {self.resume_path} was trained on {state['num_classes']} classes "
                                  f"and the data now has {num_classes}: a class folder was added or removed "
                                  f"since; restore the data as it was, or start a new run (another --out, or "
                                  f"--overwrite)")
        for name, obj in self.objects.items():
            if name not in state:
                raise CheckpointError(f"--resume {self.resume_path} holds no {name} state; pass a "
                                      f"last.pth written by the same script")
            load_into(obj, state[name], name, self.resume_path)
        self.log.truncate_after(state["epoch"])
        self.ctx.print(f"resumed {self.resume_path} at epoch {state['epoch']}")
        return state["epoch"], state["best_top1"]

    def end_epoch(self, metrics, best, args, score="val_top1", **meta):
        """Log and print the epoch's metrics, checkpoint (best.pth by metrics[score]: top-1, or e.g.
        val_miou), wait for all ranks. Returns True when --stop-epoch says to stop here."""
        def write():  # on rank 0; a write error reaches every rank (never leaves them waiting)
            self.log.append(metrics)
            self.ctx.print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
            self.save(metrics["epoch"], metrics[score], best, args, **meta)
        on_every_rank(self.ctx, write, CheckpointError, CheckpointError)
        stop = args.stop_epoch is not None and metrics["epoch"] >= args.stop_epoch
        if stop:
            self.ctx.print(f"stopping after epoch {metrics['epoch']} (--stop-epoch); continue with "
                           f"--resume auto")
        return stop

    def save(self, epoch, top1, best, args, **meta):
        """Write last.pth (and best.pth when top1 reaches best) on rank 0, atomically."""
        if not self.ctx.main:
            return
        state = {name: (obj.get_state() if isinstance(obj, torch.Generator) else obj.state_dict())
                 for name, obj in self.objects.items()}
        state.update(epoch=epoch, best_top1=best, args=vars(args), script=self.script,
                     weight_sha256=weight_hashes(args), **meta)
        save_atomic(state, os.path.join(self.out, "last.pth"))
        if top1 >= best:
            save_atomic({"model": state["model"], "epoch": epoch, **meta}, os.path.join(self.out, "best.pth"))
