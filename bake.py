"""BAKE: self-distillation with batch knowledge ensembling.

Paper: Yixiao Ge, Xiao Zhang, Ching Lam Choi, Ka Chun Cheung, Peipei Zhao, Feng Zhu, Xiaogang Wang,
Rui Zhao, Hongsheng Li, "Self-distillation with Batch Knowledge Ensembling Improves ImageNet
Classification", 2021 (arXiv 2104.13298); shared/papers/bake.txt.
Official code: yxgeee/BAKE (imagenet/: pycls; small_scale/: the CIFAR-100 and TinyImageNet runs).

One network, no teacher: for every image of a batch, the predictions of the *other* images are
propagated along feature affinities and ensembled into a soft target (Eq. 3-9), which the network
then distills into itself (Eq. 2). A per-class sampler (Sec. 3.3) puts M images of each anchor's
class in the batch so that affinities are not uniformly low.

Equation map:
  Eq. 1     p^T = softmax(z / T)                           -> bake_soft_targets()
  Eq. 3-4   A = f f^T (normalized features), no diagonal, row softmax
  Eq. 5-8   propagation  Q_t = w A Q_{t-1} + (1 - w) P     -> propagate_iteratively() (tests)
  Eq. 9     Q = (1 - w)(I - w A)^-1 P  via a linear solve
  Eq. 2     L = CE(z, y) + lambda T^2 KL(Q || p^T)         -> bake_loss()
  Sec. 3.3  N anchors + M same-class images per batch      -> PerClassBatchSampler
  GLOBAL_KE ensembling over the global batch of all GPUs   -> gather_rows()
  Sec. 4.2  lighting (PCA) noise, alphastd 0.1             -> PCALighting

Commands:
  CPU demo   python bake.py --data demo                 (BAKE, then the vanilla baseline, same epochs)
  1 GPU      python bake.py --data /imagenet --batch-size 128 --amp     (lr = 0.2 x 128/256)
  8 GPUs     torchrun --nproc_per_node=8 bake.py --data /imagenet --amp  (ResNet-50, the paper's 78.0%)
  2 nodes    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
                 bake.py --data /imagenet --amp --batch-size 1024
  vanilla    torchrun --nproc_per_node=8 bake.py --data /imagenet --amp --baseline    (the paper's 76.8%)
  CIFAR-100  python bake.py --data /cifar100 --recipe cifar        (ImageFolder; pre-act ResNet-18, M 3)
  TinyImg    python bake.py --data /tinyimagenet --recipe cifar --per-class 1 --omega 0.9 --augment rrc \
                 --norm imagenet                                   (64 px images, trained at 32 px)
  controls   ... --lam 0 --per-class 1       the vanilla run with BAKE's sampler and images per step
             ... --baseline --epochs 200     the vanilla run given as many images as 100 BAKE epochs

Accounting (the official one): --batch-size counts every image of a step, anchors and companions
(ImageNet: 512 = 256 anchors + 256 same-class images). An epoch makes every image an anchor once,
so with M same-class images per anchor it holds (M + 1) x the images of a plain epoch. --baseline
is the paper's vanilla run: M = 0, lambda = 0, no SyncBN and the baseline batch of the recipe
(ImageNet 256 at lr 0.2: as many steps per epoch as BAKE, half the images; CIFAR 128: a quarter of
BAKE's steps and images with M = 3).
"""
import argparse
import itertools
import json
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
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from common import ckpt, demo, flags
from common.data import (DataError, SeededItems, eval_loader, eval_transform, evaluate_sets, image_folder,
                         train_transform)
from common.dist import cleanup, derive_seed, maybe_compile, seed_rank_epoch, seeded, setup, unwrap
from common.models import (ModelError, create, describe_data_config, init_spec, normalize, parse_spec,
                           read_checkpoint, state_dict_of)


# ----------------------------------------------------------------------------------------------
# Batch knowledge ensembling (Sec. 3.2) and the loss (Eq. 2)
# ----------------------------------------------------------------------------------------------
def bake_soft_targets(features, logits, omega=0.5, temperature=4.0):
    """Soft targets Q [N, K] from a batch's pooled features [N, D] and logits [N, K].

    Always fp32 and without gradient, also when called under autocast (the paper: "the gradient
    is not backpropagated through the soft targets"). Rows of Q sum to 1. N = 1 (no other image
    to ensemble from) gives Q = P, which is also what the official -1e9 diagonal yields (A = [1]).
    0 <= omega < 1, so I - wA (A row-stochastic) is never singular: the solve needs no check.
    """
    with torch.no_grad(), torch.autocast(features.device.type, enabled=False):
        probs = F.softmax(logits.float() / temperature, dim=1)  # Eq. 1: P^T
        n = probs.shape[0]
        if n == 1:
            return probs
        f = F.normalize(features.float(), dim=1)  # Eq. 3: sigma(f) = f / ||f||
        eye = torch.eye(n, device=f.device)
        # Eq. 3-4: A(i, j) = sigma(f_i)^T sigma(f_j), diagonal discarded, row softmax over j != i
        # (as the official code: -1e9 on the diagonal before the softmax, where Algorithm 1 prints
        # 1e-9, which would keep the diagonal; no temperature on A)
        affinity = F.softmax(f @ f.t() - 1e9 * eye, dim=1)
        # Eq. 9: Q = (1 - w)(I - w A)^-1 P, a linear solve instead of the official explicit inverse;
        # solve_ex(check_errors=False) does not wait for the GPU to report singularity
        solution, _ = torch.linalg.solve_ex(eye - omega * affinity, probs, check_errors=False)
        return (1 - omega) * solution


def propagate_iteratively(affinity, probs, omega, steps):
    """Eq. 7: Q_t = w A Q_{t-1} + (1 - w) P, Q_0 = P; converges to Eq. 9 (used by the tests)."""
    q = probs
    for _ in range(steps):
        q = omega * affinity @ q + (1 - omega) * probs
    return q


def bake_loss(logits, labels, soft_targets, lam=1.0, temperature=4.0):
    """Eq. 2: CE(z, y) + lambda T^2 KL(Q || softmax(z / T)), batch means.

    Returns (total, ce, kd) with kd = T^2 KL, the term lambda multiplies (logged as train_kd).
    """
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
    """Wrap a timm-style classifier so one forward returns (pooled penultimate features, logits):
    the f of Eq. 3 is the classifier's input. A module, so DistributedDataParallel sees it all."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        pooled = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return pooled, self.model.get_classifier()(pooled)


# ----------------------------------------------------------------------------------------------
# Per-class sampler (Sec. 3.3)
# ----------------------------------------------------------------------------------------------
def distinct_offsets(rng, counts, m):
    """[n, m] integers, row i drawn from range(counts[i]): without replacement where
    counts[i] >= m (Floyd's algorithm: a uniformly random subset), with replacement where
    0 < counts[i] < m, zeros where counts[i] == 0. Vectorized over rows."""
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
    """Batches of N anchors, each followed by M other images of its class (index lists).

    Every image is an anchor once per epoch, in an order shuffled by (seed, epoch). An anchor's M
    companions are drawn from the other images of its class without replacement when the class
    has at least M others (official), with replacement when it has fewer, and are the anchor
    itself when its class has one image (the official sampler drops them, which shifts the
    batches; here every tuple keeps M + 1 images). The draws depend on (seed, epoch) only, the
    same on every rank; under DDP each rank gets whole tuples and disjoint anchors. Built from
    per-class index arrays: O(images) numpy work per epoch. M = 0 gives plain random batches.
    """

    def __init__(self, targets, anchors_per_batch, per_class=1, rank=0, world=1, seed=0):
        self.targets = np.asarray(targets, dtype=np.int64)
        self.anchors_per_batch, self.per_class = anchors_per_batch, per_class
        self.rank, self.world, self.seed, self.epoch = rank, world, seed, 0
        self.order = np.argsort(self.targets, kind="stable")  # image indices grouped by class
        self.class_size = np.bincount(self.targets)
        self.class_start = np.concatenate([[0], np.cumsum(self.class_size)[:-1]])
        self.pos_in_class = np.empty(len(self.targets), dtype=np.int64)
        first_of_class = self.class_start[self.targets[self.order]]
        self.pos_in_class[self.order] = np.arange(len(self.targets)) - first_of_class

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
            offsets = distinct_offsets(rng, size[:, 0] - 1, self.per_class)  # among the size - 1 others
            pick = (self.pos_in_class[anchors][:, None] + 1 + offsets) % size  # skips the anchor itself
            tuples = np.concatenate([tuples, self.order[self.class_start[cls][:, None] + pick]], axis=1)
        batches = tuples.reshape(len(self), self.world, self.anchors_per_batch, -1)[:, self.rank]
        for batch in batches:
            yield batch.reshape(-1).tolist()


class EpochTaggedBatches(Sampler):
    """A batch sampler whose items are (index, epoch), for common.data.SeededItems: an image's
    random crop then depends on (seed, rank, epoch, index) only, never on loader workers."""

    def __init__(self, batch_sampler):
        self.batch_sampler, self.epoch = batch_sampler, 0

    def set_epoch(self, epoch):
        self.batch_sampler.set_epoch(epoch)
        self.epoch = epoch

    def __iter__(self):
        epoch = self.epoch
        return ([(index, epoch) for index in batch] for batch in self.batch_sampler)

    def __len__(self):
        return len(self.batch_sampler)


# ----------------------------------------------------------------------------------------------
# What the paper's recipes train with (not the method itself)
# ----------------------------------------------------------------------------------------------
# Eigenvalues and eigenvectors (columns) of the RGB covariance of ImageNet pixels in [0, 1]: the
# AlexNet-style PCA lighting constants of fb.resnet.torch, which the official pycls code uses.
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                       (-0.5808, -0.0045, -0.8140),
                       (-0.5836, -0.6948, 0.4203))


class PCALighting(nn.Module):
    """Sec. 4.2 lighting noise, applied to normalized RGB images [N, 3, H, W]: the pixels of image
    n (in [0, 1] units) shift by V (alpha_n * lambda), alpha_n ~ N(0, alphastd^2) per component;
    after normalization that is a shift of rgb_c / std_c in channel c. Not clipped (as official)."""

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
        projection = stride != 1 or cin != cout
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if projection else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        # official: both shortcuts start from relu(bn1(x)); He et al.'s identity shortcut adds x itself
        shortcut = out if self.shortcut is None else self.shortcut(out)
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + shortcut


class CifarPreActResNet18(nn.Module):
    """The small-scale classifier of the paper ("pre-activation blocks [17] ... following [52]",
    official small_scale CIFAR_ResNet18): 3x3 stem conv-BN-ReLU, four stages of two pre-activation
    blocks (64, 128, 256, 512 channels) whose shortcuts (identity or 1x1 projection) take the
    block's relu(bn1(x)), no BN-ReLU after the last block, 4x4 average pool (global at 32 px),
    linear head with bias. 11,217,444 parameters at 100 classes. PyTorch's default init."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)
        blocks, cin = [], 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [PreActBlock(cin, width, stride), PreActBlock(width, width, 1)]
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.linear = nn.Linear(512, num_classes)
        self.num_classes = num_classes

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


def build_classifier(arch, init, num_classes):
    """The network to train and its `extra` (name, data config). Random init unless --init.

    timm ResNets zero-initialize the last BN gamma of every block by default; the official pycls
    code does not (ZERO_INIT_FINAL_GAMMA False), so it is switched off where timm has the option.
    """
    spec = init_spec(init, arch)
    if arch == CIFAR_ARCH:
        model = CifarPreActResNet18(num_classes)
        _, path = parse_spec(spec)
        if path is not None:
            try:
                model.load_state_dict(state_dict_of(read_checkpoint(path)))
            except RuntimeError as error:
                first = str(error).splitlines()[0]
                raise ModelError(f"weights {path} do not fit {CIFAR_ARCH} ({first}); pass weights "
                                 f"saved by bake.py --arch {CIFAR_ARCH}") from None
        return model, {"name": arch, "source": path or "random init", "data_config": None}
    head = "reset" if spec != arch else "none"
    try:
        return create(spec, num_classes, pretrained_head=head, zero_init_last=False)
    except TypeError as error:
        if "zero_init_last" not in str(error):
            raise
        return create(spec, num_classes, pretrained_head=head)  # no such option: no zero init


def with_sync_batchnorm(model):
    """BN -> SyncBatchNorm (Table 13: per-GPU BN on per-class batches collapses BAKE to 74.7%).
    timm's converter: torch's turns timm's BatchNormAct2d into a plain SyncBatchNorm and drops its
    activation (efficientnet, mobilenetv3, regnet would train without activations)."""
    return timm.layers.convert_sync_batchnorm(model)


def epoch_lr(epoch, args):
    """The lr of a (0-based) epoch; set once per epoch, as both official codes do.

    cosine (pycls): lr/2 (1 + cos(pi e / E)), times a linear warmup factor from warmup_factor to 1
    over the first warmup epochs (pycls: factor(e) = w (1 - e/W) + e/W, on top of the cosine).
    step (small-scale code): x0.1 once more than half, and once more than three quarters of the
    epochs have been trained (the official sets the next epoch's lr after epoch e from
    e >= 0.5 E: at E = 200 epochs 1-101 (1-based) run at 0.1, 102-151 at 0.01, 152-200 at 0.001).
    """
    if args.schedule == "cosine":
        lr = 0.5 * args.lr * (1.0 + math.cos(math.pi * epoch / args.epochs))
    else:
        lr = args.lr * 0.1 ** sum(epoch - 1 >= fraction * args.epochs for fraction in (0.5, 0.75))
    if epoch < args.warmup_epochs:
        progress = epoch / args.warmup_epochs
        lr *= args.warmup_factor * (1.0 - progress) + progress
    return lr


@torch.no_grad()
def precise_bn_stats(model, batches):
    """pycls's "precise BN" (USE_PRECISE_STATS, on by default in the official runs): set every BN
    layer's running mean and variance to the average over `batches` of each batch's own statistics
    (momentum 1 for these forwards), averaged over ranks too. Returns the number of batches used."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    means = [torch.zeros_like(m.running_mean) for m in norms]
    variances = [torch.zeros_like(m.running_var) for m in norms]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 1.0
    was_training, count = model.training, 0
    model.train()
    for images in batches:
        model(images)
        for i, m in enumerate(norms):
            means[i] += m.running_mean
            variances[i] += m.running_var
        count += 1
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    for i, m in enumerate(norms):
        if world > 1:
            dist.all_reduce(means[i])
            dist.all_reduce(variances[i])
        m.running_mean.copy_(means[i] / (count * world))
        m.running_var.copy_(variances[i] / (count * world))
        m.momentum = momenta[i]
    model.train(was_training)
    return count


CIFAR_MEAN_STD = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))  # official small_scale CIFAR


def student_data_config(args, extra):
    """Size, crop and interpolation from the flags; mean/std from --norm: the model's data config
    (ImageNet's for a network without one), ImageNet's, or the official CIFAR constants."""
    model = extra["data_config"] or {"mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD}
    mean, std = {"model": (model["mean"], model["std"]), "imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
                 "cifar": CIFAR_MEAN_STD}[args.norm]
    return {"input_size": args.input_size, "interpolation": args.interpolation, "mean": list(mean),
            "std": list(std), "crop_pct": args.crop_pct}


def train_transform_of(args):
    if args.augment == "pad_crop":  # CIFAR: pad 4 and crop 32; other sizes are resized to it first
        return transforms.Compose([
            transforms.Resize(args.input_size, interpolation=InterpolationMode(args.interpolation)),
            transforms.CenterCrop(args.input_size),
            transforms.RandomCrop(args.input_size, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.PILToTensor()])
    # torchvision's RandomResizedCrop (log-uniform aspect ratio, PIL); pycls: uniform ratio + swap, OpenCV
    return train_transform(args.input_size, interpolation=args.interpolation)


def training_images(root, args, rank):
    """The training set as the loader reads it: item (index, epoch) -> (uint8 crop, label), the
    random crop seeded from (seed, rank, epoch, index)."""
    return SeededItems(image_folder(root, "train", train_transform_of(args)), args.seed, rank)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def prepare_images(images, cfg, device, lighting=None, lighting_std=0.0, generator=None):
    """uint8 batch from the loader -> normalized float on the device, with lighting noise drawn
    from `generator` (on the device: no host-to-device copy per step)."""
    images = normalize(images.to(device, non_blocking=True), cfg["mean"], cfg["std"])
    if lighting is not None and lighting_std > 0:
        alpha = torch.randn(len(images), 3, generator=generator, device=device) * lighting_std
        images = lighting(images, alpha)
    return images


def device_generator(device, *keys):
    """A generator on `device` seeded from (seed, rank, epoch, stream) keys."""
    return torch.Generator(device=device).manual_seed(derive_seed(*keys))


def train_step(net, images, labels, optimizer, scaler, args, ctx):
    """One BAKE step (Algorithm 1). Returns device tensors (loss, ce, kd, correct): no host sync."""
    with ctx.autocast(args):
        features, logits = net(images)
    logits = logits.float()
    targets = None
    if args.lam > 0:
        if args.local_ensembling:
            targets = bake_soft_targets(features, logits, args.omega, args.temperature)
        else:  # GLOBAL_KE: one affinity matrix over all ranks' images, keep this rank's rows
            rows = slice(ctx.rank * len(labels), (ctx.rank + 1) * len(labels))
            everyone = bake_soft_targets(gather_rows(features.detach().float()), gather_rows(logits.detach()),
                                         args.omega, args.temperature)
            targets = everyone[rows]
    loss, ce, kd = bake_loss(logits, labels, targets, args.lam, args.temperature)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), ce.detach(), kd.detach(), (logits.detach().argmax(1) == labels).sum()


def train(args, ctx, train_items, val_sets, out):
    """Train one run into `out` from training_images(); returns (last metrics, best top-1, seconds)."""
    targets, num_classes = train_items.dataset.targets, len(train_items.dataset.classes)
    with seeded(args.seed):  # the same initial weights on every rank, whatever each rank drew before
        model, extra = build_classifier(args.arch, args.init, num_classes)
        head_std = RECIPES[args.recipe]["head_init_std"]
        if head_std and args.init is None:  # pycls init_weights: classifier N(0, 0.01), bias 0
            torch.nn.init.normal_(model.get_classifier().weight, std=head_std)
            torch.nn.init.zeros_(model.get_classifier().bias)
    cfg = student_data_config(args, extra)
    extra = dict(extra, data_config=cfg, data_config_source=f"bake.py's {args.recipe} recipe")
    ctx.print(describe_data_config(extra))
    sync_bn = args.sync_bn == "on" or (args.sync_bn == "auto" and args.per_class > 0)
    if sync_bn and ctx.distributed and ctx.device.type == "cuda":
        model = with_sync_batchnorm(model)
    elif sync_bn and ctx.distributed:
        ctx.print("note: SyncBatchNorm needs CUDA; on CPU each process normalizes its own batch "
                  "(paper Table 13: per-process BN hurts BAKE under DDP)")
    net = FeaturesAndLogits(model).to(ctx.device)
    if ctx.device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    net = maybe_compile(net, args)
    if ctx.distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        net = DistributedDataParallel(net, device_ids=device_ids)
    # every parameter decayed, BN and biases too (both official codes; no 1-d exemption)
    optimizer = torch.optim.SGD(unwrap(net).parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.wd, nesterov=args.nesterov)
    scaler = ctx.grad_scaler(args)
    checkpoint = ckpt.Checkpointer(out, ctx, args.resume, args.overwrite, args=args,
                                   model=unwrap(net).model, optimizer=optimizer, scaler=scaler)
    start_epoch, best = checkpoint.restore()

    sampler = EpochTaggedBatches(PerClassBatchSampler(
        targets, args.batch_size // (ctx.world * (args.per_class + 1)), args.per_class,
        ctx.rank, ctx.world, args.seed))
    if len(sampler) == 0:
        raise DataError(f"{len(targets)} training images make no batch of {args.batch_size} "
                        f"(anchors + same-class images, all processes); lower --batch-size")
    data = torch.utils.data.DataLoader(train_items, batch_sampler=sampler,
                                       num_workers=args.workers, pin_memory=ctx.device.type == "cuda",
                                       persistent_workers=args.workers > 0)
    # pycls: int(8192 / global batch) batches, here at least one when on
    precise_batches = min(max(1, args.precise_bn_images // args.batch_size), len(sampler)) \
        if args.precise_bn_images else 0
    lighting = PCALighting(cfg["std"]).to(ctx.device) if args.lighting > 0 else None
    metrics, run_start = {}, time.time()
    for epoch in range(start_epoch, args.epochs):
        seed_rank_epoch(args.seed, ctx.rank, epoch)  # dropout / drop-path: this rank's own stream
        noise = device_generator(ctx.device, args.seed, ctx.rank, epoch, 1)  # lighting alphas
        sampler.set_epoch(epoch)
        lr = epoch_lr(epoch, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        net.train()
        sums, count = torch.zeros(4, dtype=torch.float64, device=ctx.device), 0  # loss, ce, kd, correct
        epoch_start = time.time()
        for images, labels in ctx.bar(data, desc=f"epoch {epoch + 1}/{args.epochs}"):
            images = prepare_images(images, cfg, ctx.device, lighting, args.lighting, noise)
            labels = labels.to(ctx.device, non_blocking=True)
            loss, ce, kd, correct = train_step(net, images, labels, optimizer, scaler, args, ctx)
            n = len(labels)
            sums += torch.stack([loss * n, ce * n, kd * n, correct.to(loss.dtype)])
            count += n
        # the sums stay on the device during the epoch and are read here, once
        loss_sum, ce_sum, kd_sum, correct, seen = ctx.all_reduce_sum(sums.tolist() + [count])
        ckpt.check_finite(loss_sum, epoch, out)
        metrics = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / seen,
                   "train_ce": ce_sum / seen, "train_kd": kd_sum / seen, "train_top1": 100 * correct / seen,
                   "train_images": int(seen), "train_steps": len(sampler),
                   "train_time": time.time() - epoch_start}
        if precise_batches:  # pycls: after each epoch, on the first batches the train loader gives
            noise = device_generator(ctx.device, args.seed, ctx.rank, epoch, 2)
            metrics["precise_bn_batches"] = precise_bn_stats(unwrap(net).model, (
                prepare_images(batch, cfg, ctx.device, lighting, args.lighting, noise)
                for batch, _ in itertools.islice(data, precise_batches)))
        metrics.update(evaluate_sets(unwrap(net).model, val_sets, ctx, cfg["mean"], cfg["std"], args))
        best = max(best, metrics["val_top1"])
        if checkpoint.end_epoch(metrics, best, args, arch=args.arch, num_classes=num_classes,
                                data_config=cfg):
            break
    return metrics, best, time.time() - run_start


# ----------------------------------------------------------------------------------------------
# Command line: recipes, arguments, main
# ----------------------------------------------------------------------------------------------
RECIPES = {
    # Sec. 4.1 and the official pycls configs BAKE-R-50 / R-50 (lr = 0.2 x batch/256 for ResNets)
    "imagenet": dict(arch="resnet50", epochs=100, batch_size=512, baseline_batch_size=256, per_class=1,
                     omega=0.5, base_lr=0.2, wd=5e-5, nesterov=True, schedule="cosine", warmup_epochs=5,
                     lighting=0.1, precise_bn_images=8192, head_init_std=0.01, augment="rrc",
                     input_size=224, crop_pct=0.875, norm="model", workers=8),
    # Sec. 4.3 and the official small_scale scripts (CIFAR-100: 128 = 32 anchors x (M = 3 + 1))
    "cifar": dict(arch=CIFAR_ARCH, epochs=200, batch_size=128, baseline_batch_size=128, per_class=3,
                  omega=0.5, base_lr=0.2, wd=1e-4, nesterov=False, schedule="step", warmup_epochs=0,
                  lighting=0.0, precise_bn_images=0, head_init_std=None, augment="pad_crop",
                  input_size=32, crop_pct=1.0, norm="cifar", workers=4),
    # laptop-sized, shaped like the ImageNet recipe (no precise BN: it would cost more than an epoch)
    "demo": dict(arch="test_efficientnet", epochs=16, batch_size=64, baseline_batch_size=32, per_class=1,
                 omega=0.5, base_lr=0.4, wd=5e-4, nesterov=True, schedule="cosine", warmup_epochs=0,
                 lighting=0.1, precise_bn_images=0, head_init_std=0.01, augment="rrc", input_size=64,
                 crop_pct=1.0, norm="model", workers=2),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and val/, or 'demo'")
    p.add_argument("--val-data", action="append", default=[], help="extra ImageFolder to evaluate on")
    p.add_argument("--recipe", choices=["imagenet", "cifar"], help="default: imagenet (demo: its own)")
    p.add_argument("--out", help="output folder (default: a fresh runs/bake_<recipe>[_baseline]/<time>)")
    p.add_argument("--arch", help=f"timm model or {CIFAR_ARCH} (default resnet50; cifar: {CIFAR_ARCH})")
    p.add_argument("--init", help="initial weights: timm tag or NAME=PATH (default: random)")
    p.add_argument("--omega", type=flags.fraction_below_one, help="ensembling weight w of Eq. 9, [0, 1)")
    p.add_argument("--temperature", type=flags.positive_float, default=4.0, help="T of Eq. 1-2")
    p.add_argument("--lam", type=flags.nonneg_float, default=1.0, help="lambda of Eq. 2 (KD weight)")
    p.add_argument("--per-class", type=flags.nonneg_int, help="M same-class images per anchor")
    p.add_argument("--baseline", action="store_true",
                   help="the paper's vanilla run: lambda 0, M 0, no SyncBN, the recipe's baseline batch")
    p.add_argument("--local-ensembling", action="store_true",
                   help="ensemble within each GPU's batch (default: the global batch, official GLOBAL_KE)")
    p.add_argument("--sync-bn", choices=["auto", "on", "off"], default="auto",
                   help="SyncBatchNorm under CUDA DDP (auto: on iff M > 0, as the paper)")
    p.add_argument("--epochs", type=flags.positive_int)
    p.add_argument("--batch-size", type=flags.positive_int, help="global images per step, anchors x (M + 1)")
    p.add_argument("--lr", type=flags.positive_float, help="default 0.2 x batch/256 (ImageNet: 0.4 at 512)")
    p.add_argument("--base-lr", type=flags.positive_float, help=argparse.SUPPRESS)
    p.add_argument("--wd", type=flags.nonneg_float, help="weight decay, on every parameter (official)")
    p.add_argument("--momentum", type=flags.fraction_below_one, default=0.9)
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, help="Nesterov momentum")
    p.add_argument("--schedule", choices=["cosine", "step"], help="cosine, or x0.1 after 1/2 and 3/4")
    p.add_argument("--warmup-epochs", type=flags.nonneg_int)
    p.add_argument("--warmup-factor", type=flags.open_fraction, default=0.1,
                   help="warmup starts at this fraction of the lr (official 0.1)")
    p.add_argument("--lighting", type=flags.nonneg_float, help="PCA lighting noise alphastd (0 = off)")
    p.add_argument("--precise-bn-images", type=flags.nonneg_int,
                   help="recompute BN statistics on this many training images per epoch (0: off)")
    p.add_argument("--augment", choices=["rrc", "pad_crop"], help="random-resized, or CIFAR pad-4 crop")
    p.add_argument("--input-size", type=flags.positive_int)
    p.add_argument("--crop-pct", type=flags.open_fraction, help="eval center crop (0.875: 256 -> 224)")
    p.add_argument("--interpolation", type=flags.interpolation, default="bilinear")
    p.add_argument("--norm", choices=["model", "imagenet", "cifar"],
                   help="mean/std: the model's, ImageNet's, or CIFAR's (default: the recipe's)")
    flags.add_run_flags(p)
    args = p.parse_args(argv)
    args.recipe = "demo" if args.data == "demo" and args.recipe is None else (args.recipe or "imagenet")
    recipe = RECIPES[args.recipe]
    if args.baseline:
        if args.batch_size is None:
            args.batch_size = recipe["baseline_batch_size"]
        args.lam, args.per_class = 0.0, 0
        args.sync_bn = "off" if args.sync_bn == "auto" else args.sync_bn
    for key, value in recipe.items():
        if key in vars(args) and getattr(args, key) is None:
            setattr(args, key, value)
    if args.lr is None:
        args.lr = args.base_lr * args.batch_size / 256  # the paper's lr = base_lr x batch/256
    return args


def check_args(args, ctx):
    """Refuse what the flags cannot mean together, in one sentence, before any work."""
    group = ctx.world * (args.per_class + 1)
    if args.batch_size % group:
        raise SystemExit(f"error: --batch-size {args.batch_size} must be a multiple of processes x (M + 1)"
                         f" = {ctx.world} x {args.per_class + 1} = {group}; pass a --batch-size that is")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    ctx = setup(args.device)
    try:
        runs = runs_of(args, argv)
        for _, run_args in runs:
            check_args(run_args, ctx)
        run(args, runs, ctx)
    except (DataError, ModelError, FloatingPointError) as error:
        raise SystemExit(f"error: {error}")
    except KeyboardInterrupt:
        raise SystemExit(ckpt.INTERRUPTED)
    finally:
        cleanup()


def runs_of(args, argv):
    """[(name, args)]: the run asked for; on the demo, BAKE is followed by the paper's vanilla run
    (the same command with --baseline). A control (--lam 0) or --baseline runs alone."""
    runs = [("baseline" if args.baseline else "bake", args)]
    if args.data == "demo" and not args.baseline and args.lam > 0:
        runs.append(("baseline", parse_args(list(argv) + ["--baseline"])))
    return runs


def run(args, runs, ctx):
    """Load the data once, train each of `runs` (one, or the demo's two) into OUT, summarize."""
    start = time.time()
    root = demo.ensure_data(ctx) if args.data == "demo" else args.data
    train_set = training_images(root, args, ctx.rank)
    classes = train_set.dataset.classes
    val_transform = eval_transform(args.input_size, args.crop_pct, args.interpolation)
    val_sets = {"val": eval_loader(image_folder(root, "val", val_transform, classes), args.batch_size,
                                   args.workers, ctx)}
    for i, extra in enumerate(args.val_data):
        val_sets[f"extra{i}"] = eval_loader(image_folder(extra, "", val_transform, classes),
                                            args.batch_size, args.workers, ctx)
    base = f"runs/bake_{args.recipe}" + ("_baseline" if args.baseline else "")
    out = ckpt.resolve_out(args.out, base, ctx, args.resume)
    results = {}
    for name, run_args in runs:
        run_out = out if len(runs) == 1 else os.path.join(out, name)
        ctx.print(f"training {name}: {run_args.arch}, {run_args.epochs} epochs, batch "
                  f"{run_args.batch_size}, lr {run_args.lr:g}, lambda {run_args.lam:g}, M {run_args.per_class}, "
                  f"omega {run_args.omega:g}, T {run_args.temperature:g}")
        metrics, best, seconds = train(run_args, ctx, train_set, val_sets, run_out)
        results[name] = {"final": metrics, "best_top1": best, "train_time": seconds}
    line = ", ".join(f"{name} top-1 {r['final']['val_top1']:.2f}% (best {r['best_top1']:.2f}%, "
                     f"{r['train_time']:.0f}s)" for name, r in results.items())
    ctx.print(f"BAKE summary: {args.arch}, {args.epochs} epochs: {line}; total {time.time() - start:.0f}s, "
              f"out {out}")
    if ctx.main:
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
