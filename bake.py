"""BAKE: self-distillation with batch knowledge ensembling.

Paper: Yixiao Ge, Xiao Zhang, Ching Lam Choi, Ka Chun Cheung, Peipei Zhao, Feng Zhu, Xiaogang Wang,
Rui Zhao, Hongsheng Li, "Self-distillation with Batch Knowledge Ensembling Improves ImageNet
Classification", 2021 (arXiv 2104.13298); shared/papers/bake.txt. Official code: yxgeee/BAKE
(imagenet/: pycls; small_scale/: CIFAR-100, TinyImageNet). Recipes, controls, differences: docs/bake.md.

Equation map:
  Eq. 1     p^T = softmax(z / T)                           -> bake_soft_targets()
  Eq. 3-4   A = f f^T (normalized features), no diagonal, row softmax
  Eq. 5-8   propagation  Q_t = w A Q_{t-1} + (1 - w) P     -> propagate_iteratively() (tests)
  Eq. 9     Q = (1 - w)(I - w A)^-1 P  via a linear solve
  Eq. 2     L = CE(z, y) + lambda T^2 KL(Q || p^T)         -> bake_loss()
  Sec. 3.3  N anchors + M same-class images per batch      -> PerClassBatchSampler
  GLOBAL_KE ensembling over the global batch of all GPUs   -> gather_rows()
  Sec. 4.2  lighting (PCA) noise, alphastd 0.1             -> PCALighting

Commands (--batch-size is global and counts anchors and companions: ImageNet 512 = 256 + 256):
  CPU demo   python bake.py --data demo                 (BAKE, then the vanilla baseline, same epochs)
  1 GPU      python bake.py --data /imagenet --batch-size 128 --amp     (lr = 0.2 x 128/256)
  8 GPUs     torchrun --nproc_per_node=8 bake.py --data /imagenet --amp  (ResNet-50, the paper's 78.0%)
  2 nodes    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
                 bake.py --data /imagenet --amp --batch-size 1024
  vanilla    torchrun --nproc_per_node=8 bake.py --data /imagenet --amp --baseline    (the paper's 76.8%)
  CIFAR-100  python bake.py --data /cifar100 --recipe cifar        (ImageFolder; pre-act ResNet-18, M 3)
"""
import argparse
import itertools
import math
import os
import sys
import time

import numpy as np
import timm.layers
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.utils.data import DataLoader, Sampler
from torchvision import transforms

from common import ckpt, demo, flags
from common.data import (DataError, SeededItems, TaggedSampler, eval_sets, eval_transform, evaluate_sets,
                         image_folder, train_transform)
from common.dist import (EpochSums, epoch_generator, maybe_compile, quiet_worker, run_main, seed_rank_epoch, seeded,
                         wrap_ddp)
from common.models import (ModelError, create, describe_data_config, init_spec, normalize, parse_spec,
                           read_checkpoint, state_dict_of)


# --- Batch knowledge ensembling (Sec. 3.2) and the loss (Eq. 2) ----------------------------------
def bake_soft_targets(features, logits, omega=0.5, temperature=4.0):
    """Soft targets Q [N, K] (rows sum to 1) from pooled features [N, D] and logits [N, K], in fp32 and
    without gradient also under autocast (paper: no backpropagation through them); N = 1: Q = P."""
    with torch.no_grad(), torch.autocast(features.device.type, enabled=False):
        probs = F.softmax(logits.float() / temperature, dim=1)  # Eq. 1: P^T
        f = F.normalize(features.float(), dim=1)  # Eq. 3: sigma(f) = f / ||f||
        eye = torch.eye(len(f), device=f.device)
        # Eq. 3-4: A(i, j) = sigma(f_i)^T sigma(f_j), row softmax over j != i: -1e9 on the diagonal as the
        # official code (Algorithm 1 prints 1e-9, which would keep the diagonal); no temperature on A
        affinity = F.softmax(f @ f.t() - 1e9 * eye, dim=1)
        # Eq. 9: Q = (1 - w)(I - w A)^-1 P by a solve, not the official inverse; w < 1: regular, no check/sync
        return (1 - omega) * torch.linalg.solve_ex(eye - omega * affinity, probs, check_errors=False)[0]


def propagate_iteratively(affinity, probs, omega, steps):
    """Eq. 7: Q_t = w A Q_{t-1} + (1 - w) P, Q_0 = P; converges to Eq. 9 (used by the tests)."""
    q = probs
    for _ in range(steps):
        q = omega * affinity @ q + (1 - omega) * probs
    return q


def bake_loss(logits, labels, soft_targets, lam=1.0, temperature=4.0):
    """Eq. 2, batch means. Returns (total, ce, kd), kd = T^2 KL: what lambda multiplies (train_kd)."""
    ce = F.cross_entropy(logits, labels)
    if lam == 0:
        return ce, ce, torch.zeros_like(ce)
    kd = temperature ** 2 * F.kl_div(F.log_softmax(logits / temperature, dim=1), soft_targets,
                                     reduction="batchmean")
    return ce + lam * kd, ce, kd  # Eq. 2: L = CE + lambda T^2 KL(Q || p^T)


def gather_rows(tensor):
    """All ranks' rows concatenated in rank order (no gradient), for global ensembling."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class FeaturesAndLogits(nn.Module):
    """classifier -> (pooled penultimate features: the f of Eq. 3, logits), one module for DDP."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        pooled = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return pooled, self.model.get_classifier()(pooled)


# --- Per-class sampler (Sec. 3.3) ----------------------------------------------------------------
def distinct_offsets(rng, counts, m):
    """[n, m] integers, row i from range(counts[i]): without replacement where counts[i] >= m
    (Floyd's algorithm, vectorized over rows), with replacement where 0 < counts[i] < m, else 0."""
    counts = np.asarray(counts, dtype=np.int64)
    out = np.zeros((len(counts), m), dtype=np.int64)
    few = (counts > 0) & (counts < m)
    out[few] = rng.integers(0, counts[few][:, None], size=(int(few.sum()), m))
    many = counts >= m
    top, chosen = counts[many], np.zeros((int(many.sum()), m), dtype=np.int64)
    for i in range(m):  # Floyd: for j = K - m .. K - 1 take t ~ U{0..j}, or j if t is taken already
        j = top - m + i
        t = rng.integers(0, j + 1)
        chosen[:, i] = np.where((chosen[:, :i] == t[:, None]).any(axis=1), j, t)
    out[many] = chosen
    return out


class PerClassBatchSampler(Sampler):
    """Batches of N anchors, each followed by M other images of its class (M = 0: plain random batches);
    each image an anchor once per epoch, draws from (seed, epoch), each rank whole tuples, disjoint anchors.
    Companions without replacement when the class has M others (official), else with replacement; a
    one-image class repeats the anchor (the official sampler drops them: differs)."""

    def __init__(self, targets, anchors_per_batch, per_class=1, rank=0, world=1, seed=0):
        self.targets = targets = np.asarray(targets, dtype=np.int64)
        self.anchors_per_batch, self.per_class = anchors_per_batch, per_class
        self.rank, self.world, self.seed, self.epoch = rank, world, seed, 0
        self.order = np.argsort(targets, kind="stable")  # image indices grouped by class
        self.class_size = np.bincount(targets)
        self.class_start = np.concatenate([[0], np.cumsum(self.class_size)[:-1]])
        self.pos_in_class = np.argsort(self.order) - self.class_start[targets]  # each image's place in its class

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.targets) // (self.anchors_per_batch * self.world)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        anchors = rng.permutation(len(self.targets))[: len(self) * self.anchors_per_batch * self.world]
        cls = self.targets[anchors]
        size = self.class_size[cls]
        offsets = distinct_offsets(rng, size - 1, self.per_class)  # among the size - 1 others; M = 0: none
        pick = (self.pos_in_class[anchors][:, None] + 1 + offsets) % size[:, None]  # skips the anchor itself
        tuples = np.concatenate([anchors[:, None], self.order[self.class_start[cls][:, None] + pick]], axis=1)
        return iter(tuples.reshape(len(self), self.world, -1)[:, self.rank].tolist())  # this rank's batches


# --- What the recipes train with: lighting, the CIFAR network, schedule, precise BN --------------
# Eigenvalues, eigenvectors (columns) of ImageNet's RGB covariance in [0, 1]: fb.resnet.torch's, as pycls
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))


class PCALighting(nn.Module):
    """Sec. 4.2 lighting noise (pycls's) on normalized images: image n's pixels (in [0, 1]) shift
    by V (alpha_n * lambda), alpha_n ~ N(0, alphastd^2): rgb_c / std_c in channel c. Not clipped."""

    def __init__(self, std, eigval=IMAGENET_PCA_EIGVAL, eigvec=IMAGENET_PCA_EIGVEC):
        super().__init__()
        # weight[c, k] = V[c, k] lambda_k / std_c, so the shift of image n is weight @ alpha_n
        weight = torch.tensor(eigvec) * torch.tensor(eigval)[None, :] / torch.tensor(std)[:, None]
        self.register_buffer("weight", weight.float(), persistent=False)

    def forward(self, images, alpha):
        return images + (alpha @ self.weight.t()).to(images.dtype)[:, :, None, None]


class PreActBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        # official: both shortcuts start from relu(bn1(x)); He et al.'s identity shortcut adds x itself
        shortcut = out if self.shortcut is None else self.shortcut(out)
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + shortcut


class CifarPreActResNet18(nn.Module):
    """The official small_scale CIFAR_ResNet18: 3x3 stem conv-BN-ReLU, 4 stages of 2 pre-activation blocks
    (64-512 channels), no final BN-ReLU, 4x4 average pool, linear head; 11,217,444 parameters at 100 classes."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)
        stages = ((64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2))  # in, out channels, stride
        self.blocks = nn.Sequential(*[block for cin, cout, stride in stages
                                      for block in (PreActBlock(cin, cout, stride), PreActBlock(cout, cout, 1))])
        self.linear = nn.Linear(512, num_classes)  # PyTorch's default init throughout

    def forward_features(self, x):
        return self.blocks(F.relu(self.bn1(self.conv1(x))))

    def forward_head(self, x, pre_logits=False):
        pooled = F.avg_pool2d(x, 4).flatten(1)  # official nn.AvgPool2d(4): 4x4 windows, global at 32 px
        return pooled if pre_logits else self.linear(pooled)

    def get_classifier(self):
        return self.linear

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


CIFAR_ARCH = "cifar_preact_resnet18"
CIFAR_NORM = {"mean": (0.4914, 0.4822, 0.4465), "std": (0.2023, 0.1994, 0.2010)}  # official small_scale
# BN -> SyncBatchNorm (Table 13: per-GPU BN on per-class batches collapses BAKE to 74.7%), by timm's
# converter: torch's turns timm's BatchNormAct2d into a SyncBatchNorm without activation
with_sync_batchnorm = timm.layers.convert_sync_batchnorm


def build_classifier(arch, init, num_classes):
    """The network to train and its `extra` (name, data config); random init unless --init."""
    spec = init_spec(init, arch)
    if arch == CIFAR_ARCH:
        model, (_, path) = CifarPreActResNet18(num_classes), parse_spec(spec)
        if path is not None:
            try:
                model.load_state_dict(state_dict_of(read_checkpoint(path)))
            except RuntimeError as error:
                raise ModelError(f"weights {path} do not fit {CIFAR_ARCH} ({str(error).splitlines()[0]}); "
                                 f"pass weights saved by bake.py --arch {CIFAR_ARCH}") from None
        return model, {"name": arch, "source": path or "random init", "data_config": None}
    head = "reset" if spec != arch else "none"
    try:  # timm ResNets zero-init each block's last BN gamma; pycls does not (ZERO_INIT_FINAL_GAMMA)
        return create(spec, num_classes, pretrained_head=head, zero_init_last=False)
    except TypeError as error:
        if "zero_init_last" not in str(error):
            raise
        return create(spec, num_classes, pretrained_head=head)  # no such option: no zero init


def epoch_lr(epoch, args):
    """The lr of 0-based epoch e, set once per epoch (both official codes): cosine (pycls) lr/2 (1 + cos(pi e/E))
    x (w (1 - e/W) + e/W) while e < W; step (small_scale) x0.1 past 1/2 and 3/4 of E (200: after 101, 151)."""
    lr = (0.5 * args.lr * (1.0 + math.cos(math.pi * epoch / args.epochs)) if args.schedule == "cosine"
          else args.lr * 0.1 ** sum(epoch - 1 >= fraction * args.epochs for fraction in (0.5, 0.75)))
    progress = min(1.0, epoch / args.warmup_epochs) if args.warmup_epochs else 1.0  # warmup: 0 .. 1
    return lr * (args.warmup_factor * (1.0 - progress) + progress)


@torch.no_grad()
def precise_bn_stats(model, batches):
    """pycls's "precise BN" as the official runs did it (docs/bake.md): every nn.BatchNorm2d's running
    statistics become the mean over `batches` (and ranks) of each batch's own, forwards in training mode;
    a SyncBatchNorm is not one: its statistics only move with momentum 0.1. Returns the number of batches."""
    plain = [(m, m.momentum) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m, _ in plain:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: the mean of the batches' statistics
    was_training, count = model.training, 0
    model.train()
    for count, images in enumerate(batches, 1):
        model(images)
    model.train(was_training)
    for m, momentum in plain:
        m.momentum = momentum
        for stat in (m.running_mean, m.running_var):  # the mean over ranks
            stat.copy_(gather_rows(stat[None]).mean(0))
    return count


def training_images(root, args, rank):
    """Item (index, epoch) -> (uint8 crop, label), the crop seeded by (seed, rank, epoch, index)."""
    size, mode = args.input_size, transforms.InterpolationMode(args.interpolation)
    if args.augment == "pad_crop":  # CIFAR: pad 4 and crop 32; other sizes are resized to it first
        transform = transforms.Compose([
            transforms.Resize(size, interpolation=mode), transforms.CenterCrop(size),
            transforms.RandomCrop(size, padding=4), transforms.RandomHorizontalFlip(), transforms.PILToTensor()])
    else:  # torchvision's RandomResizedCrop (log-uniform ratio, PIL); pycls: uniform + swap, OpenCV
        transform = train_transform(size, interpolation=args.interpolation)
    return SeededItems(image_folder(root, "train", transform), args.seed, rank)


def build_network(args, ctx, num_classes):
    """(net, its bare classifier, data config): FeaturesAndLogits on the device, SyncBN, compile, DDP."""
    with seeded(args.seed):  # the same initial weights on every rank, whatever each rank drew before
        model, extra = build_classifier(args.arch, args.init, num_classes)
        head_std = RECIPES[args.recipe]["head_init_std"]
        if head_std and args.init is None:  # pycls init_weights: classifier N(0, 0.01), bias 0
            torch.nn.init.normal_(model.get_classifier().weight, std=head_std)
            torch.nn.init.zeros_(model.get_classifier().bias)
    imagenet = {"mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD}
    norm = {"model": extra["data_config"] or imagenet, "cifar": CIFAR_NORM, "imagenet": imagenet}[args.norm]
    cfg = {"input_size": args.input_size, "interpolation": args.interpolation, "mean": list(norm["mean"]),
           "std": list(norm["std"]), "crop_pct": args.crop_pct}
    ctx.print(describe_data_config(dict(extra, data_config=cfg,
                                        data_config_source=f"bake.py's {args.recipe} recipe")))
    cuda = ctx.device.type == "cuda"
    sync_bn = (args.sync_bn == "on" or args.sync_bn == "auto" and args.per_class > 0) and ctx.distributed
    if sync_bn and cuda:
        model = with_sync_batchnorm(model)
    elif sync_bn:
        ctx.print("note: SyncBatchNorm needs CUDA; on CPU each process normalizes its own batch "
                  "(paper Table 13: per-process BN hurts BAKE under DDP)")
    net = FeaturesAndLogits(model).to(ctx.device, memory_format=torch.channels_last if cuda else None)
    return wrap_ddp(maybe_compile(net, args), ctx), model, cfg


def train_step(net, images, labels, optimizer, scaler, args, ctx):
    """Forward, soft targets, Eq. 2, backward, step. Returns device tensors (loss, ce, kd, correct)."""
    with ctx.autocast(args):
        features, logits = net(images)
    logits, targets = logits.float(), None
    if args.lam > 0:  # GLOBAL_KE: one affinity matrix over all ranks' images (or per GPU), this rank's rows
        gather, rank = ((lambda t: t), 0) if args.local_ensembling else (gather_rows, ctx.rank)
        targets = bake_soft_targets(gather(features.detach()), gather(logits.detach()), args.omega,
                                    args.temperature)[rank * len(labels):(rank + 1) * len(labels)]
    loss, ce, kd = bake_loss(logits, labels, targets, args.lam, args.temperature)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), ce.detach(), kd.detach(), (logits.detach().argmax(1) == labels).sum()


# --- The training loop ---------------------------------------------------------------------------
def train(args, ctx, train_items, val_sets, out):
    """Train one run into `out` from training_images(); returns (last metrics, best top-1, seconds)."""
    targets, num_classes = train_items.dataset.targets, len(train_items.dataset.classes)
    net, model, cfg = build_network(args, ctx, num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd,
                                nesterov=args.nesterov)
    scaler = ctx.grad_scaler(args)
    checkpoint = ckpt.Checkpointer(out, ctx, args.resume, args.overwrite, args=args, model=model,
                                   optimizer=optimizer, scaler=scaler)
    start_epoch, best = checkpoint.restore(num_classes)
    anchors = args.batch_size // (ctx.world * (args.per_class + 1))  # per rank and step
    sampler = TaggedSampler(PerClassBatchSampler(targets, anchors, args.per_class, ctx.rank, ctx.world,
                                                 args.seed))
    if len(sampler) == 0:
        raise DataError(f"{len(targets)} training images make no batch of {args.batch_size} "
                        f"(anchors + same-class images, all processes); lower --batch-size")
    data = DataLoader(train_items, batch_sampler=sampler, num_workers=args.workers,
                      pin_memory=ctx.device.type == "cuda", persistent_workers=args.workers > 0,
                      worker_init_fn=quiet_worker)
    # pycls: int(8192 / global batch) batches, here at least one when on
    precise = args.precise_bn_images and min(max(1, args.precise_bn_images // args.batch_size), len(sampler))
    lighting = PCALighting(cfg["std"]).to(ctx.device) if args.lighting > 0 else None

    def prepare(images, generator):  # uint8 loader batch -> normalized on the device, + lighting noise
        images = normalize(images.to(ctx.device, non_blocking=True), cfg["mean"], cfg["std"])
        alpha = torch.randn(len(images), 3, generator=generator, device=ctx.device) * args.lighting
        return images if lighting is None else lighting(images, alpha)
    metrics, run_start = {}, time.time()
    for epoch in range(start_epoch, args.epochs):
        seed_rank_epoch(args.seed, ctx.rank, epoch)  # dropout / drop-path: this rank's own stream
        noise = epoch_generator(args.seed, ctx.rank, epoch, 1, ctx.device)  # lighting alphas
        sampler.set_epoch(epoch, epoch)
        optimizer.param_groups[0]["lr"] = lr = epoch_lr(epoch, args)
        net.train()
        sums, epoch_start = EpochSums(ctx.device), time.time()  # on the device, read once per epoch
        for images, labels in ctx.bar(data, desc=f"epoch {epoch + 1}/{args.epochs}"):
            labels = labels.to(ctx.device, non_blocking=True)
            loss, ce, kd, correct = train_step(net, prepare(images, noise), labels, optimizer, scaler, args, ctx)
            sums.add(len(labels), counts=("correct",), loss=loss, ce=ce, kd=kd, correct=correct)
        means, seen = sums.means(ctx)
        ckpt.check_finite(means["loss"], epoch, out)
        metrics = {"epoch": epoch + 1, "lr": lr, "train_loss": means["loss"], "train_ce": means["ce"],
                   "train_kd": means["kd"], "train_top1": 100 * means["correct"], "train_images": seen,
                   "train_steps": len(sampler), "train_time": time.time() - epoch_start}
        if precise:  # pycls: after each epoch, on the first batches the train loader gives
            noise = epoch_generator(args.seed, ctx.rank, epoch, 2, ctx.device)
            metrics["precise_bn_batches"] = precise_bn_stats(model, (
                prepare(batch, noise) for batch, _ in itertools.islice(data, precise)))
        metrics.update(evaluate_sets(model, val_sets, ctx, cfg["mean"], cfg["std"], args))
        best = max(best, metrics["val_top1"])
        if checkpoint.end_epoch(metrics, best, args, arch=args.arch, num_classes=num_classes, data_config=cfg):
            break
    return metrics, best, time.time() - run_start


def run(args, runs, ctx):
    """Check `runs` (one, or the demo's two), load the data once, train each into OUT, summarize."""
    for _, run_args in runs:
        check_args(run_args, ctx)
    start, root = time.time(), demo.ensure_data(ctx) if args.data == "demo" else args.data
    train_set = training_images(root, args, ctx.rank)
    val_sets = eval_sets(root, args.val_data, eval_transform(args.input_size, args.crop_pct, args.interpolation),
                         train_set.dataset.classes, args.batch_size, args.workers, ctx)
    base = f"runs/bake_{args.recipe}" + "_baseline" * args.baseline
    out, results, trained = ckpt.resolve_out(args.out, base, ctx, args.resume), {}, False
    for name, a in runs:
        ctx.print(f"training {name}: {a.arch}, {a.epochs} epochs, batch {a.batch_size}, lr {a.lr:g}, "
                  f"lambda {a.lam:g}, M {a.per_class}, omega {a.omega:g}, T {a.temperature:g}")
        sub = os.path.join(out, name) if len(runs) > 1 else out
        metrics, best, seconds = train(a, ctx, train_set, val_sets, sub)
        trained = trained or bool(metrics)  # {}: --resume auto found this run finished
        results[name] = {"final": ckpt.final_metrics(metrics, sub), "best_top1": best, "train_time": seconds}
    if not trained:  # every run had finished: keep their summary
        return ckpt.nothing_to_do(ctx, "BAKE", out, args.epochs)
    line = ", ".join(f"{name} top-1 {r['final']['val_top1']:.2f}% (best {r['best_top1']:.2f}%, "
                     f"{r['train_time']:.0f}s)" for name, r in results.items())
    ckpt.write_summary(ctx, out, results, f"BAKE summary: {args.arch}, {args.epochs} epochs: {line}; "
                       f"total {time.time() - start:.0f}s, out {out}")


# --- Command line: recipes, flags, main ----------------------------------------------------------
# Sec. 4.1 and the official pycls configs BAKE-R-50 / R-50 (lr = 0.2 x batch/256 for ResNets)
IMAGENET = dict(arch="resnet50", epochs=100, batch_size=512, baseline_batch_size=256, per_class=1, base_lr=0.2,
                wd=5e-5, nesterov=True, schedule="cosine", warmup_epochs=5, lighting=0.1, precise_bn_images=8192,
                head_init_std=0.01, augment="rrc", input_size=224, crop_pct=0.875, norm="model", workers=8)
RECIPES = {
    "imagenet": IMAGENET,
    # Sec. 4.3 and the official small_scale scripts (CIFAR-100: 128 = 32 anchors x (M = 3 + 1))
    "cifar": dict(arch=CIFAR_ARCH, epochs=200, batch_size=128, baseline_batch_size=128, per_class=3, base_lr=0.2,
                  wd=1e-4, nesterov=False, schedule="step", warmup_epochs=0, lighting=0.0, precise_bn_images=0,
                  head_init_std=None, augment="pad_crop", input_size=32, crop_pct=1.0, norm="cifar", workers=4),
    # laptop-sized, shaped like the ImageNet recipe (no precise BN: it would cost more than an epoch)
    "demo": dict(IMAGENET, arch="test_efficientnet", epochs=16, batch_size=64, baseline_batch_size=32,
                 base_lr=0.4, wd=5e-4, warmup_epochs=0, precise_bn_images=0, input_size=64, crop_pct=1.0,
                 workers=2),
}
FLAGS = [  # flag, kind (a common.flags parser: it checks the value), choices or action, help[, more]
    ("--data", str, "ImageFolder root with train/ and val/, or 'demo'", dict(required=True)),
    ("--val-data", "append", "extra ImageFolder to evaluate on", dict(default=[])),
    ("--recipe", ["imagenet", "cifar"], "imagenet (default), or cifar; --data demo: its own"),
    ("--out", str, "output folder (default: a fresh runs/bake_<recipe>[_baseline]/<time>)"),
    ("--arch", str, f"timm model or {CIFAR_ARCH} (resnet50; cifar: {CIFAR_ARCH})"),
    ("--init", str, "initial weights: timm tag or NAME=PATH (default: random)"),
    ("--omega", flags.fraction_below_one, "ensembling weight w of Eq. 9", dict(default=0.5)),
    ("--temperature", flags.positive_float, "T of Eq. 1-2", dict(default=4.0)),
    ("--lam", flags.nonneg_float, "lambda of Eq. 2, the KD weight", dict(default=1.0)),
    ("--per-class", flags.nonneg_int, "M same-class images per anchor"),
    ("--baseline", "store_true", "the paper's vanilla run: lambda 0, M 0, no SyncBN, its own batch"),
    ("--local-ensembling", "store_true", "ensemble per GPU (default: global batch, official GLOBAL_KE)"),
    ("--sync-bn", ["auto", "on", "off"], "SyncBatchNorm under CUDA DDP (auto: iff M > 0)", dict(default="auto")),
    ("--epochs", flags.positive_int, ""),
    ("--batch-size", flags.positive_int, "global images per step, anchors x (M + 1)"),
    ("--lr", flags.positive_float, "default 0.2 x batch/256 (ImageNet: 0.4 at 512)"),
    ("--base-lr", flags.positive_float, argparse.SUPPRESS),
    ("--wd", flags.nonneg_float, "weight decay on every parameter, BN and biases too (both official codes)"),
    ("--momentum", flags.fraction_below_one, "", dict(default=0.9)),
    ("--nesterov", argparse.BooleanOptionalAction, "Nesterov momentum"),
    ("--schedule", ["cosine", "step"], "cosine, or x0.1 after 1/2 and 3/4 of the epochs"),
    ("--warmup-epochs", flags.nonneg_int, ""),
    ("--warmup-factor", flags.open_fraction, "warmup from this lr fraction (official)", dict(default=0.1)),
    ("--lighting", flags.nonneg_float, "PCA lighting noise alphastd (0: off)"),
    ("--precise-bn-images", flags.nonneg_int, "recompute BN statistics on this many images (0: off)"),
    ("--augment", ["rrc", "pad_crop"], "random-resized, or CIFAR pad-4 crop"),
    ("--input-size", flags.positive_int, ""),
    ("--crop-pct", flags.open_fraction, "eval center crop (0.875: 256 -> 224)"),
    ("--interpolation", flags.interpolation, "", dict(default="bilinear")),
    ("--norm", ["model", "imagenet", "cifar"], "mean/std: the model's, ImageNet's, or CIFAR's"),
]


def parse_args(argv=None, paired=False):
    p = flags.build_parser(__doc__.split("\n\n")[0] + " Flags without a default take the recipe's value "
                           "(RECIPES).", FLAGS)
    args = p.parse_args(argv)
    flags.refuse_ignored(set() if paired else flags.given(p, argv), [  # the demo's pair: BAKE's flags
        (args.baseline, "--baseline (the paper's vanilla run: lambda 0, M 0; a control with other values: "
         "--lam 0 without --baseline)", ("lam", "per_class"))])
    args.recipe = args.recipe or ("demo" if args.data == "demo" else "imagenet")
    if args.baseline:  # forced: the demo's pair passes BAKE's typed flags here too
        args.lam, args.per_class = 0.0, 0
        args.batch_size = args.batch_size or RECIPES[args.recipe]["baseline_batch_size"]
        args.sync_bn = "off" if args.sync_bn == "auto" else args.sync_bn
    flags.fill_from(args, RECIPES[args.recipe])
    args.lr = args.lr or args.base_lr * args.batch_size / 256  # the paper's lr = base_lr x batch/256
    return args


def check_args(args, ctx):
    """Refuse what the flags cannot mean together, in one sentence, before any work."""
    group = ctx.world * (args.per_class + 1)
    if args.batch_size % group:
        raise SystemExit(f"error: --batch-size {args.batch_size} must be a multiple of processes x (M + 1) = "
                         f"{ctx.world} x {args.per_class + 1} = {group}; pass a --batch-size that is")


def runs_of(args, argv):
    """[(name, args)]: the run asked for, then on the demo (not for --lam 0) the same with --baseline."""
    runs = [("baseline" if args.baseline else "bake", args)]
    if args.data == "demo" and not args.baseline and args.lam > 0:
        runs.append(("baseline", parse_args(list(argv) + ["--baseline"], paired=True)))
    return runs


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    run_main(lambda ctx: run(args, runs_of(args, argv), ctx), args, (DataError, ModelError, FloatingPointError))


if __name__ == "__main__":
    main()
