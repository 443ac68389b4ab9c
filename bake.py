"""BAKE: self-distillation with batch knowledge ensembling.

Paper: Yixiao Ge, Xiao Zhang, Ching Lam Choi, Ka Chun Cheung, Peipei Zhao, Feng Zhu, Xiaogang Wang,
Rui Zhao, Hongsheng Li, "Self-distillation with Batch Knowledge Ensembling Improves ImageNet
Classification", 2021 (arXiv 2104.13298); shared/papers/bake.txt.

One network, no teacher: for every image of a batch, the predictions of the *other* images are
propagated along feature affinities and ensembled into a soft target (Eq. 3-9), which the network
then distills into itself (Eq. 2). A per-class sampler (Sec. 3.3) puts M images of each anchor's
class in the batch so that affinities are not uniformly low.

Equation map:
  Eq. 1     p^T = softmax(z / T)                           -> bake_soft_targets()
  Eq. 3-4   A = f f^T (normalized features), no diagonal, row softmax
  Eq. 5-8   propagation  Q_t = w A Q_{t-1} + (1 - w) P  (iterated: propagate_iteratively(), tests)
  Eq. 9     Q = (1 - w)(I - w A)^-1 P  via a linear solve
  Eq. 2     L = CE(z, y) + lambda T^2 KL(Q || p^T)         -> bake_loss()
  Sec. 3.3  N anchors + M same-class images per batch      -> PerClassBatchSampler
  GLOBAL_KE ensembling over the global batch of all GPUs   -> gather_rows()

Commands:
  CPU demo   python bake.py --data demo                 (BAKE, then the baseline, same epochs)
  1 GPU      python bake.py --data /imagenet --batch-size 128 --amp     (lr = 0.2 x 128/256)
  8 GPUs     torchrun --nproc_per_node=8 bake.py --data /imagenet --amp
  2 nodes    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
                 bake.py --data /imagenet --amp --batch-size 1024
  baseline   ... bake.py --data /imagenet --baseline       (lambda = 0, M = 0: plain cross-entropy)
--batch-size is the global number of images (anchors + same-class images), as in the paper (512).
With M = 1 an epoch visits every image once as an anchor plus as many same-class companions, i.e.
twice the images of a baseline epoch (the official accounting).
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler
from timm.scheduler import CosineLRScheduler

from common import ckpt, demo
from common.data import DataError, eval_loader, eval_transform, evaluate, image_folder, train_transform
from common.dist import cleanup, seed_everything, setup, unwrap
from common.models import (FeaturesAndLogits, ModelError, create, data_config_of, make_optimizer, normalize,
                           param_groups)

PRESETS = {  # ResNet-50 ImageNet recipe of the paper; a laptop-sized one for the demo
    "imagenet": dict(arch="resnet50", epochs=100, batch_size=512, base_lr=0.2, wd=5e-5, warmup_epochs=5,
                     input_size=224, crop_pct=0.875, workers=8, out="runs/bake"),
    "demo": dict(arch="test_efficientnet", epochs=16, batch_size=64, base_lr=0.4, wd=5e-4, warmup_epochs=0,
                 input_size=64, crop_pct=1.0, workers=2, out="runs/bake_demo"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and val/, or 'demo'")
    p.add_argument("--val-data", action="append", default=[], help="extra ImageFolder to evaluate on")
    p.add_argument("--out", help="output folder")
    p.add_argument("--arch", help="timm model (default resnet50; demo: test_efficientnet)")
    p.add_argument("--init", help="initial weights: timm tag or NAME=PATH (default: random)")
    p.add_argument("--omega", type=float, default=0.5, help="ensembling weight w of Eq. 9")
    p.add_argument("--temperature", type=float, default=4.0, help="T of Eq. 1-2")
    p.add_argument("--lam", type=float, default=1.0, help="lambda of Eq. 2 (distillation weight)")
    p.add_argument("--per-class", type=int, default=1, help="M same-class images per anchor (Sec. 3.3)")
    p.add_argument("--baseline", action="store_true", help="vanilla run: lambda = 0, M = 0")
    p.add_argument("--local-ensembling", action="store_true",
                   help="ensemble within each GPU's batch only (default: the global batch, official GLOBAL_KE)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global images per step (anchors x (M + 1))")
    p.add_argument("--lr", type=float, help="default 0.2 x batch/256 (paper: 0.4 at 512)")
    p.add_argument("--base-lr", type=float, help=argparse.SUPPRESS)
    p.add_argument("--wd", type=float)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--warmup-epochs", type=int)
    p.add_argument("--input-size", type=int)
    p.add_argument("--crop-pct", type=float, help="eval center crop fraction (0.875: 256 -> 224)")
    p.add_argument("--workers", type=int)
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", help="checkpoint to continue, or 'auto' for OUT/last.pth")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--stop-epoch", type=int, help="stop after this epoch (continue with --resume auto)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)
    for key, value in PRESETS["demo" if args.data == "demo" else "imagenet"].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.lr is None:
        args.lr = args.base_lr * args.batch_size / 256  # the paper's lr = base_lr x batch/256
    if args.baseline:
        args.lam, args.per_class = 0.0, 0
    return args


# ----------------------------------------------------------------------------------------------
# Batch knowledge ensembling (Sec. 3.2)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def bake_soft_targets(features, logits, omega=0.5, temperature=4.0):
    """Soft targets Q [N, K] from a batch's pooled features [N, D] and logits [N, K].

    Computed in fp32 without gradient (the paper: "the gradient is not backpropagated through the
    soft targets"). Rows of Q sum to 1.
    """
    f = F.normalize(features.float(), dim=1)  # Eq. 3: sigma(f) = f / ||f||
    affinity = f @ f.t()  # Eq. 3: A(i, j) = sigma(F(x_i))^T sigma(F(x_j))
    n = affinity.shape[0]
    eye = torch.eye(n, device=affinity.device)
    # Eq. 3-4: discard the diagonal, then row softmax over j != i (as the official code: -1e9 on the
    # diagonal before the softmax; no temperature on A)
    affinity = F.softmax(affinity - 1e9 * eye, dim=1)
    probs = F.softmax(logits.float() / temperature, dim=1)  # Eq. 1: P^T
    # Eq. 9: Q = (1 - w)(I - w A)^-1 P, as a linear solve rather than an explicit inverse
    return (1 - omega) * torch.linalg.solve(eye - omega * affinity, probs)


def propagate_iteratively(affinity, probs, omega, steps):
    """Eq. 7: Q_t = w A Q_{t-1} + (1 - w) P, Q_0 = P; converges to Eq. 9 (used by the tests)."""
    q = probs
    for _ in range(steps):
        q = omega * affinity @ q + (1 - omega) * probs
    return q


def bake_loss(logits, labels, soft_targets, lam=1.0, temperature=4.0):
    """Eq. 2: CE(z, y) + lambda T^2 KL(Q || softmax(z / T)), batch mean. Returns (total, ce, kd)."""
    ce = F.cross_entropy(logits, labels)
    if lam == 0:
        return ce, ce, torch.zeros_like(ce)
    kd = F.kl_div(F.log_softmax(logits / temperature, dim=1), soft_targets, reduction="batchmean")
    return ce + lam * temperature ** 2 * kd, ce, kd


def gather_rows(tensor):
    """All ranks' rows concatenated in rank order (no gradient), for global ensembling."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


# ----------------------------------------------------------------------------------------------
# Per-class sampler (Sec. 3.3)
# ----------------------------------------------------------------------------------------------
class PerClassBatchSampler(Sampler):
    """Batches of N anchors, each followed by M other images of its class.

    Every image is an anchor once per epoch (shuffled by (seed, epoch)); companions are drawn
    uniformly from the anchor's class without the anchor itself (the anchor again when its class
    has one image). Built from per-class index arrays, vectorized: O(num images) numpy per epoch.
    Under DDP each rank gets whole tuples and disjoint anchors. M = 0 gives plain random batches.
    """

    def __init__(self, targets, anchors_per_batch, per_class=1, rank=0, world=1, seed=0):
        self.targets = np.asarray(targets, dtype=np.int64)
        self.anchors_per_batch, self.per_class = anchors_per_batch, per_class
        self.rank, self.world, self.seed, self.epoch = rank, world, seed, 0
        self.order = np.argsort(self.targets, kind="stable")  # image indices grouped by class
        self.class_size = np.bincount(self.targets)
        self.class_start = np.concatenate([[0], np.cumsum(self.class_size)[:-1]])
        self.pos_in_class = np.empty(len(self.targets), dtype=np.int64)
        self.pos_in_class[self.order] = np.arange(len(self.targets)) - self.class_start[self.targets[self.order]]

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.targets) // (self.anchors_per_batch * self.world)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        anchors = rng.permutation(len(self.targets))[: len(self) * self.anchors_per_batch * self.world]
        tuples = anchors[:, None]
        if self.per_class > 0:
            cls = self.targets[anchors]
            size = self.class_size[cls][:, None]
            step = 1 + rng.integers(0, np.maximum(size - 1, 1), size=(len(anchors), self.per_class))
            pick = np.where(size > 1, (self.pos_in_class[anchors][:, None] + step) % size, 0)
            companions = self.order[self.class_start[cls][:, None] + pick]
            tuples = np.concatenate([tuples, companions], axis=1)
        batches = tuples.reshape(len(self), self.world, self.anchors_per_batch, -1)[:, self.rank]
        for batch in batches:
            yield batch.reshape(-1).tolist()


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train(args, ctx, root, train_set, val_sets, cfg, out):
    num_classes = len(train_set.classes)
    torch.manual_seed(args.seed)
    model, _ = create(args.init or args.arch, num_classes, pretrained_head="reset" if args.init else "none")
    if ctx.distributed and ctx.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # Table 13: plain BN collapses under per-class sampling
    elif ctx.distributed:
        ctx.print("note: SyncBatchNorm needs CUDA; on CPU each process normalizes its own batch "
                  "(paper Table 13: per-process BN hurts BAKE under DDP)")
    net = FeaturesAndLogits(model).to(ctx.device)
    if ctx.device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    if ctx.distributed:
        net = DistributedDataParallel(net, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    optimizer = make_optimizer("sgd", param_groups(unwrap(net), args.wd), args.lr, args.momentum, nesterov=True)
    scheduler = CosineLRScheduler(optimizer, t_initial=args.epochs, warmup_t=args.warmup_epochs,
                                  warmup_lr_init=args.lr * 0.01 if args.warmup_epochs else 0)
    scaler = torch.amp.GradScaler(enabled=args.amp and ctx.device.type == "cuda")
    checkpoint = ckpt.Checkpointer(out, ctx, args.resume, args.overwrite, model=unwrap(net).model,
                                   optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    start_epoch, best = checkpoint.restore()

    per_rank = args.batch_size // ctx.world
    sampler = PerClassBatchSampler(train_set.targets, per_rank // (args.per_class + 1), args.per_class,
                                   ctx.rank, ctx.world, args.seed)
    if len(sampler) == 0:
        raise DataError(f"{len(train_set)} training images make no batch of {args.batch_size} "
                        f"(anchors + same-class images, all processes); lower --batch-size")
    data = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=args.workers,
                                       pin_memory=ctx.device.type == "cuda", persistent_workers=args.workers > 0)
    metrics, run_start = {}, time.time()
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        scheduler.step(epoch)
        net.train()
        sums = np.zeros(5)  # images, loss, ce, kd, correct
        epoch_start = time.time()
        for images, labels in ctx.bar(data, desc=f"epoch {epoch + 1}/{args.epochs}"):
            images = normalize(images.to(ctx.device, non_blocking=True), cfg["mean"], cfg["std"])
            labels = labels.to(ctx.device, non_blocking=True)
            with torch.autocast(ctx.device.type, enabled=args.amp and ctx.device.type == "cuda"):
                features, logits = net(images)
            logits = logits.float()
            targets = None
            if args.lam > 0:
                if args.local_ensembling:
                    targets = bake_soft_targets(features, logits, args.omega, args.temperature)
                else:  # GLOBAL_KE: one affinity matrix over all ranks' images, keep this rank's rows
                    rows = slice(ctx.rank * len(labels), (ctx.rank + 1) * len(labels))
                    targets = bake_soft_targets(gather_rows(features.detach().float()),
                                                gather_rows(logits.detach()), args.omega, args.temperature)[rows]
            loss, ce, kd = bake_loss(logits, labels, targets, args.lam, args.temperature)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            sums += [len(labels), loss.item() * len(labels), ce.item() * len(labels), kd.item() * len(labels),
                     (logits.argmax(1) == labels).sum().item()]
        seen, loss_sum, ce_sum, kd_sum, correct = ctx.all_reduce_sum(sums.tolist())
        ckpt.check_finite(loss_sum, epoch, out)
        metrics = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "train_loss": loss_sum / seen,
                   "train_ce": ce_sum / seen, "train_kd": kd_sum / seen, "train_top1": 100 * correct / seen,
                   "train_images": int(seen), "train_time": time.time() - epoch_start}
        for name, val_loader in val_sets.items():
            result = evaluate(unwrap(net).model, val_loader, ctx, cfg["mean"], cfg["std"], args.amp, desc=name)
            metrics.update({f"{name}_top1": result["top1"], f"{name}_top5": result["top5"],
                            f"{name}_count": result["count"]})
        best = max(best, metrics["val_top1"])
        if checkpoint.end_epoch(metrics, best, args, arch=args.arch, num_classes=num_classes, data_config=cfg):
            break
    return metrics, best, time.time() - run_start


def main(argv=None):
    args = parse_args(argv)
    ctx = setup(args.device)
    try:
        run(args, ctx)
    except (DataError, ModelError, FloatingPointError) as error:
        raise SystemExit(f"error: {error}")
    finally:
        cleanup()


def run(args, ctx):
    anchors = args.batch_size // (ctx.world * (args.per_class + 1))
    if args.batch_size % (ctx.world * (args.per_class + 1)) or anchors < 1:
        raise SystemExit(f"error: --batch-size {args.batch_size} must be a multiple of processes x (M + 1) "
                         f"= {ctx.world * (args.per_class + 1)}")
    if not 0 <= args.omega < 1 or args.temperature <= 0 or args.lam < 0:
        raise SystemExit("error: need 0 <= --omega < 1, --temperature > 0 and --lam >= 0")
    seed_everything(args.seed, ctx.rank)
    start = time.time()
    root = demo.ensure_data(ctx) if args.data == "demo" else args.data
    cfg = dict(data_config_of(create(args.arch, 2, pretrained_head="none")[0]), input_size=args.input_size,
               crop_pct=args.crop_pct, interpolation="bilinear")
    train_set = image_folder(root, "train", train_transform(args.input_size))
    val_transform = eval_transform(args.input_size, args.crop_pct, cfg["interpolation"])
    val_sets = {"val": eval_loader(image_folder(root, "val", val_transform, train_set.classes),
                                   args.batch_size, args.workers, ctx)}
    for i, extra in enumerate(args.val_data):
        val_sets[f"extra{i}"] = eval_loader(image_folder(extra, "", val_transform, train_set.classes),
                                            args.batch_size, args.workers, ctx)
    runs = [("bake" if not args.baseline else "baseline", args)]
    if args.data == "demo" and not args.baseline:  # the demo also trains the baseline, same epochs
        runs.append(("baseline", argparse.Namespace(**dict(vars(args), lam=0.0, per_class=0, baseline=True))))
    results = {}
    for name, run_args in runs:
        out = args.out if len(runs) == 1 else os.path.join(args.out, name)
        ctx.print(f"training {name}: {run_args.arch}, {run_args.epochs} epochs, lambda {run_args.lam}, "
                  f"M {run_args.per_class}, omega {run_args.omega}, T {run_args.temperature}")
        metrics, best, seconds = train(run_args, ctx, root, train_set, val_sets, cfg, out)
        results[name] = {"final": metrics, "best_top1": best, "train_time": seconds}
    line = ", ".join(f"{name} top-1 {r['final'].get('val_top1', float('nan')):.2f}% (best {r['best_top1']:.2f}%, "
                     f"{r['train_time']:.0f}s)" for name, r in results.items())
    ctx.print(f"BAKE summary: {args.arch}, {args.epochs} epochs: {line}; total {time.time() - start:.0f}s, out {args.out}")
    if ctx.main:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
