"""FRSKD: refine feature maps with a self-teacher network, distill them back (classification and
semantic segmentation).

Paper: Mingi Ji, Seungjae Shin, Seunghyun Hwang, Gibeom Park, Il-Chul Moon, "Refine Myself by
Teaching Myself: Feature Refinement via Self-Knowledge Distillation", CVPR 2021 (arXiv 2103.08273);
shared/papers/frskd.txt. Official code: github.com/MingiJi/FRSKD (classification/); where it
differs from the paper, this file follows the code the paper's numbers came from.

A small self-teacher (BiFPNc) reads the classifier's stage features F_i, refines them through a
top-down and a bottom-up path into T_i, and predicts the class itself. The classifier then learns
from the refined maps (attention transfer) and from the self-teacher's soft label; both networks
train together from scratch with one optimizer.

Equation map:
  Eq. 1   L_i = Conv(F_i; d_i), d_i = w c_i                  -> BiFPNLayer (lateral)
  Eq. 2   P_i = Conv(w1 L_i + w2 Resize(P_{i+1}))            -> BiFPNLayer.forward (top-down)
          T_i = Conv(w1 L'_i + w2 P_i + w3 Resize(T_{i-1}))  -> BiFPNLayer.forward (bottom-up;
                L'_i: a second, separate lateral conv, as in the official code)
  Eq. 3   L_F = sum_i || phi(T_i) - phi(F_i) ||              -> attention_loss()
  Eq. 4   L_KD = KL(softmax(c / K) || softmax(t / K))         -> frskd_loss() (official: K^2 KL(t || c))
  Eq. 5   L = CE(c) + CE(t) + alpha L_KD + beta L_F           -> frskd_loss()
Segmentation (--task segmentation, Sec. 4.2; the official segmentation/ code): the classifier is an
EfficientDet (EfficientNet + FPN + 3 BiFPN layers), the self-teacher 2 more BiFPN layers on its
outputs (width factor 1)                                     -> FRSKDSegNet, SegBiFPNLayer
  Eq. 3 over the six levels of the two BiFPN stacks          -> frskd_seg_loss() (attention_loss)
  Eq. 4 per pixel: T^2 sum KL(t || c) / (B H W), T = 1       -> pixel_kd_loss()
  Eq. 5 with CE over labelled pixels (255 ignored); alpha, beta 0 for 40 epochs, then ramped up
                                                             -> frskd_seg_loss(), distillation_ramp()

Commands:
  CPU demo   python frskd.py --data demo                       (FRSKD, then the plain-CE baseline)
  CIFAR-100  python frskd.py --data /cifar100 --recipe cifar   (ImageFolder of 32x32 images; CIFAR ResNet-18)
             python frskd.py --data /cifar100 --recipe cifar --arch wrn16_2
  Tiny-IN    python frskd.py --data /tiny-imagenet-200 --recipe tinyimagenet
  FGVR       python frskd.py --data /cub200 --recipe fgvr          (ResNet-18 at 224, batch 32)
  1 GPU      python frskd.py --data /imagenet --amp            (ResNet-18, batch 256)
  8 GPUs     torchrun --nproc_per_node=8 frskd.py --data /imagenet --amp
  2 nodes    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
                 frskd.py --data /imagenet --amp
  Segmentation: --data a VOCdevkit (VOC2007 + VOC2012 trainval / VOC2007 test) or DIR/{train,val}/{images,masks}
  CPU demo   python frskd.py --task segmentation --data demo   (FRSKD, then the baseline)
  1 GPU      python frskd.py --task segmentation --data /VOCdevkit --amp    (16 images x 2 accumulated)
  8 GPUs     torchrun --nproc_per_node=8 frskd.py --task segmentation --data /VOCdevkit --amp --accum-steps 1
  2 nodes    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
                 frskd.py --task segmentation --data /VOCdevkit --amp --accum-steps 1
  (--batch-size 32 is the global batch of one SGD step: 1 GPU x 16 x 2 steps is the official
  setting; 8 GPUs see 4 images each, 16 GPUs 2, which changes the BatchNorm batch)
--batch-size is global (all processes together). --beta 0 gives FRSKD\\F (no feature distillation).
"""
import argparse
import contextlib
import itertools
import json
import math
import os
import re
import time

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision import transforms

from common import ckpt, demo, flags
from common.data import (DataError, SeededItems, TaggedSampler, eval_loader, eval_transform, evaluate,
                         image_folder, loader, mix_batch, train_transform)
from common.dist import cleanup, epoch_generator, maybe_compile, seed_rank_epoch, seeded, setup
from common.models import (ModelError, create, describe_data_config, init_spec, make_optimizer, normalize,
                           param_groups)
from common.seg import (IGNORE_INDEX, RandomScaleCropFlip, ResizePair, SegmentationSet, check_pairs,
                        evaluate_segmentation, find_pairs)


# ----------------------------------------------------------------------------------------------
# The self-teacher: BiFPNc (Sec. 3.1)
# ----------------------------------------------------------------------------------------------
def conv_bn_relu(cin, cout):
    """1x1 conv -> BN -> ReLU: the lateral convs (Eq. 1) and BiFPNc's resampling convs."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def separable_conv(channels):
    """A node's Conv of Eq. 2: 2 x (depthwise 3x3 -> pointwise 1x1 -> BN), ReLU between (official)."""
    def separable():
        return [nn.Conv2d(channels, channels, 3, 1, 1, groups=channels, bias=False),
                nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels)]
    return nn.Sequential(*separable(), nn.ReLU(inplace=True), *separable())


def max_pool_same(x, kernel=3, stride=2):
    """Max-pool with TF-style "same" padding (EfficientDet, official): output ceil(n / stride); the
    padding this needs goes mostly to the bottom/right (3x3/2 on an even side: 0 top/left, 1 bottom/right)."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad order: left, right, then top, bottom
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.max_pool2d(F.pad(x, pads), kernel, stride)  # zero padding as official (inputs are >= 0)


class FastFusion(nn.Module):
    """Fast normalized fusion (BiFPN): sum_k relu(w_k) x_k / (sum_k relu(w_k) + 1e-6)."""

    def __init__(self, inputs):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(inputs))

    def normalized_weights(self):
        w = F.relu(self.weight)
        return w / (w.sum() + 1e-6)

    def forward(self, xs):
        w = self.normalized_weights()
        return sum(w[k] * x for k, x in enumerate(xs))


class BiFPNLayer(nn.Module):
    """One top-down + bottom-up pass (Eq. 1-2) over n levels, level 0 the shallowest (largest).

    in_channels: channels of the maps coming in; widths: d_i of this layer's nodes.
    first: the first layer of a stack maps its inputs to d_i with lateral convs L_i (Eq. 1); a
        later layer takes the previous layer's refined maps as L_i unchanged (official intent;
        the official `repeat > 1` path crashes), so then in_channels must equal widths.
    resample_convs: BiFPNc (True) follows each resampling with a 1x1 conv+BN+ReLU to the next
        level's width; the equal-width BiFPN of Table 6 (False) resamples only (nearest x2 up,
        max-pool down), which needs equal widths.
    The bottom-up path has its own laterals L'_i (levels 1..n-1) in every layer. Every node output
    is passed through a ReLU wherever it is used, and the returned refined maps T_i are ReLU'd.
    """

    def __init__(self, in_channels, widths, first=True, resample_convs=True):
        super().__init__()
        n = len(widths)
        if len(in_channels) != n or n < 2:
            raise ValueError(f"need as many (>= 2) input levels as widths, got {in_channels}, {widths}")
        if not first and list(in_channels) != list(widths):
            raise ValueError(f"a later layer (first=False) keeps its inputs as L_i: in_channels {in_channels} "
                             f"must equal widths {widths}")
        if not resample_convs and len(set(widths)) != 1:
            raise ValueError(f"resample_convs=False (equal-width BiFPN) needs equal widths, got {widths}")
        pairs = list(zip(in_channels, widths))
        self.lateral = nn.ModuleList(conv_bn_relu(c, d) for c, d in pairs) if first else None  # Eq. 1: L_i
        self.lateral_bottom_up = nn.ModuleList(conv_bn_relu(c, d) for c, d in pairs[1:])  # L'_i
        resample = conv_bn_relu if resample_convs else (lambda cin, cout: nn.Identity())
        self.up_resample = nn.ModuleList(resample(widths[i + 1], widths[i]) for i in range(n - 1))
        self.down_resample = nn.ModuleList(resample(widths[i - 1], widths[i]) for i in range(1, n))
        self.top_down_fusion = nn.ModuleList(FastFusion(2) for _ in range(n - 1))
        self.top_down_conv = nn.ModuleList(separable_conv(widths[i]) for i in range(n - 1))
        self.bottom_up_fusion = nn.ModuleList(FastFusion(3 if i < n - 1 else 2) for i in range(1, n))
        self.bottom_up_conv = nn.ModuleList(separable_conv(widths[i]) for i in range(1, n))

    def forward(self, features):
        n = len(features)
        features = [F.relu(f) for f in features]  # official: the laterals read ReLU'd features
        lateral = features if self.lateral is None else [conv(f) for conv, f in zip(self.lateral, features)]
        lateral_bottom_up = [None] + [conv(f) for conv, f in zip(self.lateral_bottom_up, features[1:])]
        top_down = [None] * (n - 1) + [lateral[-1]]  # P_n = L_n
        for i in reversed(range(n - 1)):
            # Resize up: nearest x2 (official; the paper says bilinear), to the lateral's size
            up = F.interpolate(F.relu(top_down[i + 1]), size=lateral[i].shape[-2:], mode="nearest")
            fused = self.top_down_fusion[i]([lateral[i], self.up_resample[i](up)])
            top_down[i] = self.top_down_conv[i](fused)  # Eq. 2: P_i
        refined = [top_down[0]] + [None] * (n - 1)  # T_1 = P_1
        for i in range(1, n):
            down = max_pool_same(F.relu(refined[i - 1]))  # Resize down: 3x3/2 max-pool, TF "same"
            if down.shape[-2:] != lateral[i].shape[-2:]:  # a backbone whose levels are not ceil(n/2) apart
                down = F.interpolate(down, size=lateral[i].shape[-2:], mode="nearest")
            down = self.down_resample[i - 1](down)
            inputs = [lateral_bottom_up[i], F.relu(top_down[i]), down] if i < n - 1 else \
                [lateral_bottom_up[i], down]  # the deepest node: no P term
            refined[i] = self.bottom_up_conv[i - 1](self.bottom_up_fusion[i - 1](inputs))  # Eq. 2: T_i
        return [F.relu(t) for t in refined]


class BiFPNc(nn.Module):
    """Self-teacher: `repeat` BiFPN layers on the classifier's stage features, then global average
    pooling of the deepest refined map and a linear classifier. Returns (refined maps, logits).

    in_channels: the classifier's stage channels c_i. BiFPNc: widths d_i = round(width x c_i).
    channels: the equal-width BiFPN of Table 6 instead (every d_i = channels, no resample convs).
    """

    def __init__(self, in_channels, num_classes, width=2.0, repeat=1, channels=None):
        super().__init__()
        widths = [channels] * len(in_channels) if channels else [int(round(width * c)) for c in in_channels]
        if min(widths) < 1:
            raise ValueError(f"width {width} gives a level of {min(widths)} channels; use a larger width")
        resample_convs = channels is None
        later = [BiFPNLayer(widths, widths, False, resample_convs) for _ in range(repeat - 1)]
        self.layers = nn.ModuleList([BiFPNLayer(in_channels, widths, True, resample_convs)] + later)
        self.widths = widths
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, features):
        for layer in self.layers:
            features = layer(features)
        return features, self.fc(features[-1].mean(dim=(2, 3)))


# ----------------------------------------------------------------------------------------------
# The losses (Sec. 3.2)
# ----------------------------------------------------------------------------------------------
def attention_map(feature):
    """phi(f): channel mean of f^2, flattened, L2-normalized (attention transfer)."""
    return F.normalize(feature.float().pow(2).mean(dim=1).flatten(1), dim=1)


def attention_loss(features, refined):
    """Eq. 3 as in the official code: sum over levels of the mean squared difference of attention
    maps (the paper writes an L2 norm); the refined maps are targets, detached."""
    return sum((attention_map(f) - attention_map(t.detach())).pow(2).mean()
               for f, t in zip(features, refined))


def soft_cross_entropy(logits, targets):
    """-sum_c y_c log softmax(z)_c, batch mean; targets one-hot or mixed by mixup/cutmix."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


def frskd_loss(logits, self_teacher_logits, features, refined, targets, alpha, beta, temperature):
    """Eq. 5: CE(c) + CE(t) + alpha L_KD + beta L_F, with the self-teacher's outputs detached in
    both distillation terms (they train the classifier only).

    `targets` are class probabilities [B, C] (one-hot, or mixed by mixup/cutmix). Returns the total
    and its four terms (ce_classifier, ce_self_teacher, kd, feature)."""
    ce_classifier = soft_cross_entropy(logits, targets)
    ce_self_teacher = soft_cross_entropy(self_teacher_logits, targets)
    # Eq. 4 as official: K^2 KL(softmax(t/K) || softmax(c/K)), batch mean; the paper writes
    # KL(softmax(c/K) || softmax(t/K)) without K^2
    kd = F.kl_div(F.log_softmax(logits / temperature, dim=1),
                  F.softmax(self_teacher_logits.detach() / temperature, dim=1),
                  reduction="batchmean") * temperature ** 2
    feature = attention_loss(features, refined)  # Eq. 3
    total = ce_classifier + ce_self_teacher + alpha * kd + beta * feature  # Eq. 5
    return total, (ce_classifier, ce_self_teacher, kd, feature)


# ----------------------------------------------------------------------------------------------
# Classifiers (not part of the method): stage features F_1..F_n and logits from one forward
# ----------------------------------------------------------------------------------------------
class WideBlock(nn.Module):
    """Official FRSKD WRN block: relu(x) -> conv3x3 -> BN -> ReLU -> conv3x3, plus the shortcut
    (x itself, or a 1x1 conv of relu(x) when the width changes); no BN before the first ReLU."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        activated = F.relu(x)
        out = self.conv2(F.relu(self.bn(self.conv1(activated))))
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nn.Module):
    """WRN-depth-k for 32x32 inputs as in the official FRSKD code (the classifier of Tables 1 and 6).

    Not the standard pre-activation WRN: blocks have no BN before their first ReLU, each group of
    blocks is followed by a BN whose output feeds the next group, the stage features are
    relu(BN(group output)), and convs are He-normal (fan-out) initialised. WRN-16-2: stages of 32,
    64, 128 channels, 702,804 parameters at 100 classes (the official module also holds a final BN
    it never calls, 256 more: 703,060).
    """

    def __init__(self, num_classes, depth=16, widen=2):
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ModelError(f"WRN depth must be 6 n + 4 (10, 16, 22, 28, ...), got {depth}")
        blocks = (depth - 4) // 6
        widths = [16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        cin, groups = 16, []
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            groups.append(nn.Sequential(*[WideBlock(cin if b == 0 else width, width, stride if b == 0 else 1)
                                          for b in range(blocks)]))
            cin = width
        self.groups = nn.ModuleList(groups)
        self.group_bns = nn.ModuleList(nn.BatchNorm2d(width) for width in widths)
        self.fc = nn.Linear(cin, num_classes)
        self.stage_channels = widths
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # He normal, fan-out (official)
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        nn.init.zeros_(self.fc.bias)

    def forward_stages(self, x):
        features, x = [], self.stem(x)
        for group, bn in zip(self.groups, self.group_bns):
            x = bn(group(x))  # the group's BN output (not its ReLU) feeds the next group
            features.append(F.relu(x))
        return features, self.fc(features[-1].mean(dim=(2, 3)))

    def forward(self, x):
        return self.forward_stages(x)[1]


def cifar_stem(model):
    """CIFAR-style ResNet stem (paper, Implementation details): 3x3 stride-1 conv, no max-pool."""
    if not (isinstance(getattr(model, "conv1", None), nn.Conv2d) and hasattr(model, "maxpool")):
        raise ModelError(f"--arch cifar_NAME needs a timm ResNet with a single conv1 stem, "
                         f"not {type(model).__name__}")
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


class TimmStages(nn.Module):
    """A timm CNN whose stage features (all but the stem) come from forward_intermediates."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.indices = [i for i, info in enumerate(model.feature_info) if info["reduction"] >= 4]
        self.stage_channels = [model.feature_info[i]["num_chs"] for i in self.indices]

    def forward_stages(self, x):
        final, features = self.model.forward_intermediates(x, indices=self.indices)
        # the official classifiers return relu(stage output); a no-op for ResNets, whose stages end in a ReLU
        return [F.relu(f) for f in features], self.model.forward_head(final)

    def forward(self, x):
        return self.model(x)


def make_classifier(arch, num_classes):
    """wrnDEPTH_K (official WRN), cifar_NAME (a timm ResNet with the CIFAR stem), or a timm CNN.

    Initialised as the official classifiers: timm ResNets without zero-initialised last BN gammas
    (official ImageNet ResNets: He fan-out convs, gammas 1), CIFAR ResNets with PyTorch's default
    init (the official CIFAR ResNet has no init code)."""
    wrn = re.fullmatch(r"wrn(\d+)_(\d+)", arch)
    if wrn:
        return WideResNet(num_classes, int(wrn.group(1)), int(wrn.group(2)))
    cifar = arch.startswith("cifar_")
    name = arch[len("cifar_"):] if cifar else arch
    resnet = timm.models.is_model_in_modules(name.split(".")[0], ["resnet"])
    model = create(name, num_classes, pretrained_head="none", adapt=cifar_stem if cifar else None,
                   **({"zero_init_last": False} if resnet else {}))[0]
    if cifar:
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                module.reset_parameters()
    return TimmStages(model)


class FRSKDNet(nn.Module):
    """Classifier + self-teacher in one module, so DDP sees the whole forward.

    Returns (features F_i, classifier logits, refined maps T_i, self-teacher logits); the last two
    are None without a self-teacher (the plain-CE baseline)."""

    def __init__(self, classifier, self_teacher):
        super().__init__()
        self.classifier, self.self_teacher = classifier, self_teacher

    def forward(self, x):
        features, logits = self.classifier.forward_stages(x)
        if self.self_teacher is None:
            return features, logits, None, None
        # classifier features enter the self-teacher undetached: its CE also trains the backbone (official)
        refined, self_teacher_logits = self.self_teacher(features)
        return features, logits, refined, self_teacher_logits


class BothLogits(nn.Module):
    """(classifier logits, self-teacher logits) of one forward, for evaluation."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        _, logits, _, self_teacher_logits = self.net(x)
        return logits, self_teacher_logits


# ----------------------------------------------------------------------------------------------
# Training step, loop and evaluation
# ----------------------------------------------------------------------------------------------
def training_step(net, images, targets, args, autocast):
    """Forward and Eq. 5 (or plain CE for the baseline). Returns (loss, its 4 terms stacked, logits)."""
    with autocast:
        features, logits, refined, self_teacher_logits = net(images)
    logits = logits.float()
    if self_teacher_logits is None:  # baseline: the classifier's CE alone
        loss = soft_cross_entropy(logits, targets)
        return loss, torch.stack([loss.detach(), *[torch.zeros_like(loss)] * 3]), logits
    loss, terms = frskd_loss(logits, self_teacher_logits.float(), features, refined, targets,
                             args.alpha, args.beta, args.temperature)
    return loss, torch.stack([t.detach() for t in terms]), logits


def build_net(args, num_classes):
    """Classifier (+ self-teacher); initial weights depend on --seed alone (the same on every rank)."""
    with seeded(args.seed):
        classifier = make_classifier(args.arch, num_classes)
        self_teacher = None if args.baseline else BiFPNc(classifier.stage_channels, num_classes, args.width,
                                                         args.repeat, args.bifpn_channels)
    return FRSKDNet(classifier, self_teacher)


def make_optimizer_for(net, args):
    """SGD; weight decay on every parameter (official) or, with --wd-scope weights, not on 1-d ones."""
    groups = param_groups(net, args.wd) if args.wd_scope == "weights" else \
        [{"params": [p for p in net.parameters() if p.requires_grad], "weight_decay": args.wd}]
    return make_optimizer("sgd", groups, args.lr, args.momentum)


def train(args, ctx, train_set, val_sets, cfg, out):
    num_classes = len(train_set.classes)
    net = build_net(args, num_classes).to(ctx.device)
    if ctx.device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    optimizer = make_optimizer_for(net, args)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.milestones, 0.1)
    scaler = ctx.grad_scaler(args)
    checkpoint = ckpt.Checkpointer(out, ctx, args.resume, args.overwrite, args=args, model=net, optimizer=optimizer,
                                   scheduler=scheduler, scaler=scaler)
    start_epoch, best = checkpoint.restore()
    model = net  # the bare FRSKDNet, evaluated without the wrappers
    if ctx.distributed:
        net = DistributedDataParallel(net, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    net = maybe_compile(net, args)
    autocast = ctx.autocast(args)
    # each rank's crops depend on (seed, rank, epoch, image) alone: resume- and worker-count-proof
    sampler = TaggedSampler(torch.utils.data.DistributedSampler(train_set, ctx.world, ctx.rank, shuffle=True,
                                                                seed=args.seed, drop_last=True))
    data = loader(SeededItems(train_set, args.seed, ctx.rank), args.batch_size // ctx.world, args.workers,
                  sampler, ctx.device, drop_last=True)
    metrics, run_start = {}, time.time()
    for epoch in range(start_epoch, args.epochs):
        seed_rank_epoch(args.seed, ctx.rank, epoch)
        sampler.set_epoch(epoch, epoch)
        mix_generator = epoch_generator(args.seed, ctx.rank, epoch)
        net.train()
        lr = optimizer.param_groups[0]["lr"]
        seen, epoch_start = 0, time.time()
        sums = torch.zeros(6, dtype=torch.float64, device=ctx.device)  # loss, 4 terms, correct (x images)
        for images, labels in ctx.bar(data, desc=f"epoch {epoch + 1}/{args.epochs}"):
            images = normalize(images.to(ctx.device, non_blocking=True), cfg["mean"], cfg["std"])
            labels = labels.to(ctx.device, non_blocking=True)
            targets = F.one_hot(labels, num_classes).float()
            if args.mixup > 0 or args.cutmix > 0:
                images, targets = mix_batch(images, targets, args.mixup, args.cutmix, mix_generator)
            loss, terms, logits = training_step(net, images, targets, args, autocast)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            n = len(labels)  # sums stay on the device: no host sync per step
            correct = (logits.detach().argmax(1) == labels).sum().view(1)
            sums += torch.cat([torch.cat([loss.detach().view(1), terms]) * n, correct]).double()
            seen += n
        scheduler.step()
        seen, loss_sum, ce_c, ce_t, kd, feat, correct = ctx.all_reduce_sum([seen] + sums.tolist())
        ckpt.check_finite(loss_sum, epoch, out)
        metrics = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / seen, "train_ce": ce_c / seen,
                   "train_ce_self_teacher": ce_t / seen, "train_kd": kd / seen, "train_feature": feat / seen,
                   "train_top1": 100 * correct / seen, "train_time": time.time() - epoch_start}
        metrics.update(evaluate_both(model, val_sets, ctx, cfg, args))
        best = max(best, metrics["val_top1"])
        if checkpoint.end_epoch(metrics, best, args, arch=args.arch, num_classes=num_classes, data_config=cfg):
            break
    return metrics, best, time.time() - run_start


def evaluate_both(model, val_sets, ctx, cfg, args):
    """Top-1/top-5 of the classifier (and the self-teacher's top-1) on each evaluation set."""
    metrics = {}
    for name, val_loader in val_sets.items():
        if model.self_teacher is None:
            result = evaluate(model.classifier, val_loader, ctx, cfg["mean"], cfg["std"], args, desc=name)
        else:  # classifier and self-teacher scored in one pass
            result, teacher_result = evaluate(BothLogits(model), val_loader, ctx, cfg["mean"], cfg["std"],
                                              args, desc=name, heads=2)
            metrics[f"{name}_self_teacher_top1"] = teacher_result["top1"]
        metrics.update({f"{name}_top1": result["top1"], f"{name}_top5": result["top5"],
                        f"{name}_count": result["count"]})
    return metrics


def transforms_for(args):
    """(train, eval) transforms of the recipe: uint8 tensors, normalized later on the device."""
    if args.augment == "pad_crop":  # CIFAR: pad-4 random crop + flip; other sizes resized to the input first
        train = transforms.Compose([transforms.Resize(args.input_size),
                                    transforms.RandomCrop(args.input_size, padding=4),
                                    transforms.RandomHorizontalFlip(), transforms.PILToTensor()])
    else:
        train = train_transform(args.input_size)
    return train, eval_transform(args.input_size, args.crop_pct)


# ----------------------------------------------------------------------------------------------
# Semantic segmentation (Sec. 4.2, Table 4; Implementation Details): the official segmentation code
# (MingiJi/FRSKD segmentation/) - an EfficientDet whose three stacked BiFPN layers form the
# classifier network and two more BiFPN layers (width factor 1) the self-teacher
# ----------------------------------------------------------------------------------------------
def conv_bn_relu_det(cin, cout, kernel, stride=1):
    """The official EfficientDet Conv: conv (with bias) -> BN(eps 1e-4, momentum 0.997) -> ReLU.
    momentum 0.997 is TF's decay passed as PyTorch's momentum (official): running stats ~ the last batch."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2),
                         nn.BatchNorm2d(cout, eps=1e-4, momentum=0.997), nn.ReLU(inplace=True))


class EfficientNetTaps(nn.Module):
    """A timm EfficientNet (stem + MBConv blocks) returning the official segmentation features: the
    output of the first block at strides 4, 8 and 16 and of the last block (stride 32).

    As the official `layer0 = (conv_stem, bn0)`, the stem has no activation after its BN, and the
    backbone's BN momentum is efficientnet_pytorch's 0.01. The head (conv_head, classifier) is dropped.
    """

    def __init__(self, model, bn_momentum=0.01):
        super().__init__()
        self.conv_stem, self.bn1 = model.conv_stem, model.bn1
        if hasattr(self.bn1, "act"):  # timm's BatchNormAct2d: drop the SiLU (official stem: conv + BN only)
            self.bn1.act = nn.Identity()
        self.blocks = nn.Sequential(*[block for stage in model.blocks for block in stage])
        stride, taps = self.conv_stem.stride[0], []
        for index, block in enumerate(self.blocks):
            stride *= max(m.stride[0] for m in block.modules() if isinstance(m, nn.Conv2d))
            if stride in (4, 8, 16) and len(taps) == (4, 8, 16).index(stride):
                taps.append(index)
        if stride != 32 or len(taps) != 3:
            raise ModelError(f"{type(model).__name__} does not step through strides 4, 8, 16 and 32 block "
                             f"by block; pass an EfficientNet (--arch tf_efficientnet_b0, ...)")
        self.taps = taps + [len(self.blocks) - 1]
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = bn_momentum
        was_training = self.training
        with torch.no_grad():  # channels of the four taps, from one small forward in eval mode
            self.channels = [f.shape[1] for f in self.eval()(torch.zeros(1, 3, 64, 64))]
        self.train(was_training)

    def forward(self, x):
        x = self.bn1(self.conv_stem(x))
        features = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.taps:
                features.append(x)
        return features


class TopDownFPN(nn.Module):
    """Six levels P2..P7 (strides 4..128) at one width: 1x1 laterals with a bilinear upsample-add
    top-down pass over P5..P2, and P6, P7 by 3x3 stride-2 convs from the raw stride-32 feature."""

    def __init__(self, in_channels, width):
        super().__init__()
        self.level6 = conv_bn_relu_det(in_channels[3], width, 3, 2)
        self.level7 = conv_bn_relu_det(width, width, 3, 2)
        self.lateral = nn.ModuleList(conv_bn_relu_det(c, width, 1) for c in in_channels)

    def forward(self, features):
        p6 = self.level6(features[3])
        levels = [self.lateral[3](features[3])]
        for i in (2, 1, 0):
            up = F.interpolate(levels[0], size=features[i].shape[-2:], mode="bilinear", align_corners=False)
            levels.insert(0, up + self.lateral[i](features[i]))
        return levels + [p6, self.level7(p6)]


class DepthwisePointConv(nn.Conv2d):
    """The official node conv, a depthwise 1x1 conv (weight [C, 1, 1, 1], bias [C], PyTorch's init),
    computed as the per-channel multiply-add it is: the same result, several times fewer CPU cycles
    than the grouped-convolution path on small maps."""

    def __init__(self, channels):
        super().__init__(channels, channels, 1, groups=channels)

    def forward(self, x):
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def channel_node(width):
    """A segmentation BiFPN node (official): per-channel (depthwise) 1x1 conv -> BN -> ReLU."""
    return nn.Sequential(DepthwisePointConv(width), nn.BatchNorm2d(width), nn.ReLU())


class SegBiFPNLayer(nn.Module):
    """The official segmentation BiFPN layer on equal-width levels (not BiFPNc): plain sums (no fusion
    weights), top-down P_i^td = node(P_i + Up(P_{i+1}^td)) with bilinear upsampling, bottom-up
    P_i^out = node(P_i + P_i^td + Down(P_{i-1}^out)) with nearest downsampling, P_0^out = P_0^td.
    `top_down_only`: the official last self-teacher layer, returning (P_0^td, ..., P_n^td)."""

    def __init__(self, width, levels=6, top_down_only=False):
        super().__init__()
        self.up_nodes = nn.ModuleList(channel_node(width) for _ in range(levels))
        self.down_nodes = None if top_down_only else \
            nn.ModuleList(channel_node(width) for _ in range(levels - 1))

    def forward(self, inputs):
        n = len(inputs)
        top_down = [None] * n
        top_down[-1] = self.up_nodes[-1](inputs[-1])
        for i in reversed(range(n - 1)):
            # official: nn.Upsample(scale_factor=W_i / W_{i+1}); the same wherever sizes halve exactly
            up = F.interpolate(top_down[i + 1], size=inputs[i].shape[-2:], mode="bilinear", align_corners=False)
            top_down[i] = self.up_nodes[i](inputs[i] + up)
        if self.down_nodes is None:
            return top_down
        outputs = [top_down[0]]
        for i in range(1, n):
            down = F.interpolate(outputs[-1], size=inputs[i].shape[-2:], mode="nearest")
            outputs.append(self.down_nodes[i - 1](inputs[i] + top_down[i] + down))
        return outputs


def segmentation_head(width, num_classes):
    """Official head on the finest level: conv3x3(width -> 256) + BN + ReLU + conv3x3(256 -> classes)."""
    return nn.Sequential(nn.Conv2d(width, 256, 3, padding=1), nn.BatchNorm2d(256, eps=1e-4, momentum=0.997),
                         nn.ReLU(inplace=True), nn.Conv2d(256, num_classes, 3, padding=1))


class FRSKDSegNet(nn.Module):
    """Classifier network = backbone + FPN + `classifier_layers` BiFPN layers + head; self-teacher =
    `self_teacher_layers` more BiFPN layers on the classifier's BiFPN outputs (undetached: its CE
    trains the classifier's layers too, as official) + its own head. Logits are upsampled
    bilinearly to the input size. forward -> (features F_i, logits, refined T_i, self-teacher logits)."""

    def __init__(self, backbone, num_classes, width, classifier_layers=3, self_teacher_layers=2,
                 self_teacher=True):
        super().__init__()
        self.backbone = backbone
        self.fpn = TopDownFPN(backbone.channels, width)
        self.bifpn = nn.Sequential(*[SegBiFPNLayer(width) for _ in range(classifier_layers)])
        self.head = segmentation_head(width, num_classes)
        self.self_teacher = self.self_teacher_head = None  # official baseline: built and run, unused
        if self_teacher:
            self.self_teacher = nn.Sequential(*[SegBiFPNLayer(width, top_down_only=k == self_teacher_layers - 1)
                                                for k in range(self_teacher_layers)])
            self.self_teacher_head = segmentation_head(width, num_classes)

    def forward(self, x):
        size = x.shape[-2:]
        features = self.bifpn(self.fpn(self.backbone(x)))
        logits = F.interpolate(self.head(features[0]), size=size, mode="bilinear", align_corners=False)
        if self.self_teacher is None:
            return features, logits, None, None
        refined = self.self_teacher(features)
        self_teacher_logits = F.interpolate(self.self_teacher_head(refined[0]), size=size, mode="bilinear",
                                            align_corners=False)
        return features, logits, refined, self_teacher_logits


def pixel_kd_loss(logits, self_teacher_logits, temperature):
    """Eq. 4 per pixel (official DistillKL): KL(softmax(t/T) || softmax(c/T)) summed over classes and
    pixels, x T^2, / (B H W); the self-teacher's maps are detached."""
    batch, _, height, width = logits.shape
    kl = F.kl_div(F.log_softmax(logits / temperature, dim=1),
                  F.softmax(self_teacher_logits.detach() / temperature, dim=1), reduction="sum")
    return kl * temperature ** 2 / (batch * height * width)


def frskd_seg_loss(logits, self_teacher_logits, features, refined, masks, alpha, beta, temperature):
    """Eq. 5 per pixel: CE(c) + CE(t) (mean over labelled pixels, 255 ignored) + alpha L_KD + beta L_F,
    L_F over the six levels of the two BiFPN stacks. Returns the total and its four terms."""
    ce_classifier = F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)
    ce_self_teacher = F.cross_entropy(self_teacher_logits, masks, ignore_index=IGNORE_INDEX)
    kd = pixel_kd_loss(logits, self_teacher_logits, temperature)  # Eq. 4
    feature = attention_loss(features, refined)  # Eq. 3, self-teacher side detached
    total = ce_classifier + ce_self_teacher + alpha * kd + beta * feature  # Eq. 5
    return total, (ce_classifier, ce_self_teacher, kd, feature)


def distillation_ramp(epoch, warmup, epochs):
    """Factor on alpha and beta in 0-based `epoch` (official warm-up and annealing): 0 for the first
    `warmup` epochs, then the sigmoid ramp-up exp(-5 (1 - t)^2), t = (epoch + 1 - warmup) /
    (epochs - warmup)."""
    if epoch < warmup:
        return 0.0
    if epochs <= warmup:
        return 1.0
    t = min(epoch + 1 - warmup, epochs - warmup) / (epochs - warmup)
    return math.exp(-5.0 * (1.0 - t) ** 2)


class SegLogits(nn.Module):
    """The classifier's logits, or (classifier, self-teacher) logits of one forward, for evaluation."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        _, logits, _, self_teacher_logits = self.net(x)
        return logits if self_teacher_logits is None else (logits, self_teacher_logits)


def segmentation_step(net, images, masks, args, alpha, beta, autocast):
    """Forward and the per-pixel Eq. 5 (or the classifier's CE alone for the baseline)."""
    with autocast:
        features, logits, refined, self_teacher_logits = net(images)
    if self_teacher_logits is None:
        loss = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX)
        return loss, torch.stack([loss.detach(), *[torch.zeros_like(loss)] * 3])
    loss, terms = frskd_seg_loss(logits.float(), self_teacher_logits.float(), features, refined, masks,
                                 alpha, beta, args.temperature)
    return loss, torch.stack([t.detach() for t in terms])


def build_seg_net(args, num_classes):
    """Backbone from --init (timm tag, NAME=PATH, or 'none': random), FPN, BiFPN stacks, heads; the
    initial weights of the new layers depend on --seed alone (the same on every rank)."""
    with seeded(args.seed):
        if args.init == "none":
            model, extra = create(args.arch, 0, pretrained_head="none")
        else:
            model, extra = create(init_spec(args.init, args.arch), 0, pretrained_head="reset")
        net = FRSKDSegNet(EfficientNetTaps(model), num_classes, args.bifpn_channels, args.bifpn_layers,
                          args.repeat, self_teacher=not args.baseline)
    return net, extra


def train_segmentation(args, ctx, train_set, val_set, out):
    net, extra = build_seg_net(args, args.num_classes)
    weights = "random init" if args.init == "none" else describe_data_config(extra)
    ctx.print(f"backbone {args.arch} ({weights}); features after blocks {net.backbone.taps} "
              f"({net.backbone.channels} channels), BiFPN width {args.bifpn_channels}; inputs normalized "
              f"with mean {args.mean}, std {args.std}")
    net = net.to(ctx.device)
    if ctx.device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    optimizer = make_optimizer_for(net, args)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.milestones, 0.1)
    scaler = ctx.grad_scaler(args)
    checkpoint = ckpt.Checkpointer(out, ctx, args.resume, args.overwrite, args=args, model=net,
                                   optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    start_epoch, best = checkpoint.restore()
    model = net
    if ctx.distributed:
        net = DistributedDataParallel(net, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    net = maybe_compile(net, args)
    autocast = ctx.autocast(args)
    micro_batch = args.batch_size // (ctx.world * args.accum_steps)
    sampler = TaggedSampler(torch.utils.data.DistributedSampler(train_set, ctx.world, ctx.rank, shuffle=True,
                                                                seed=args.seed, drop_last=True))
    data = loader(SeededItems(train_set, args.seed, ctx.rank), micro_batch, args.workers, sampler, ctx.device,
                  drop_last=True)
    # whole accumulation groups (official: a leftover micro-batch's gradient goes into the next epoch)
    updates = len(data) // args.accum_steps
    if updates == 0:
        raise DataError(f"each process gets {len(data)} batches of {micro_batch} images per epoch, fewer than "
                        f"--accum-steps {args.accum_steps}; lower --batch-size or --accum-steps")
    val_data = eval_loader(val_set, micro_batch, args.workers, ctx)
    metrics, run_start = {}, time.time()
    for epoch in range(start_epoch, args.epochs):
        seed_rank_epoch(args.seed, ctx.rank, epoch)
        sampler.set_epoch(epoch, epoch)
        ramp = 0.0 if args.baseline else distillation_ramp(epoch, args.warmup_epochs, args.epochs)
        alpha, beta = args.alpha * ramp, args.beta * ramp
        net.train()
        lr = optimizer.param_groups[0]["lr"]
        epoch_start = time.time()
        sums = torch.zeros(5, dtype=torch.float64, device=ctx.device)  # loss and its 4 terms, per micro-batch
        optimizer.zero_grad(set_to_none=True)
        batches = itertools.islice(data, updates * args.accum_steps)
        for index, (images, masks) in enumerate(ctx.bar(batches, total=updates * args.accum_steps,
                                                        desc=f"epoch {epoch + 1}/{args.epochs}")):
            images = normalize(images.to(ctx.device, non_blocking=True), args.mean, args.std)
            masks = masks.to(ctx.device, non_blocking=True)
            update = (index + 1) % args.accum_steps == 0
            # DDP: all-reduce gradients only on the micro-batch that completes an accumulation group
            with net.no_sync() if ctx.distributed and not update else contextlib.nullcontext():
                loss, terms = segmentation_step(net, images, masks, args, alpha, beta, autocast)
                scaler.scale(loss / args.accum_steps).backward()  # official: batch 16, accumulated to 32
            if update:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_value_(model.parameters(), args.clip_value)  # official: value clipping 2.0
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            sums += torch.cat([loss.detach().view(1), terms]).double()
        scheduler.step()
        count = updates * args.accum_steps * ctx.world
        loss_sum, ce_c, ce_t, kd, feat = ctx.all_reduce_sum(sums.tolist())
        ckpt.check_finite(loss_sum, epoch, out)
        metrics = {"epoch": epoch + 1, "lr": lr, "alpha": alpha, "beta": beta, "train_loss": loss_sum / count,
                   "train_ce": ce_c / count, "train_ce_self_teacher": ce_t / count, "train_kd": kd / count,
                   "train_feature": feat / count, "train_time": time.time() - epoch_start}
        result = evaluate_segmentation(SegLogits(model), val_data, ctx, args.mean, args.std, args.num_classes,
                                       args, heads=1 if args.baseline else 2, desc="val")
        if not args.baseline:
            result, self_teacher_result = result
            metrics["val_self_teacher_miou"] = self_teacher_result["miou"]
        metrics.update(val_miou=result["miou"], val_pixel_acc=result["pixel_acc"])
        best = max(best, metrics["val_miou"])
        if checkpoint.end_epoch(metrics, best, args, score="val_miou", arch=args.arch,
                                num_classes=args.num_classes):
            break
    return metrics, best, time.time() - run_start


# ----------------------------------------------------------------------------------------------
# Command line: recipes, arguments, main
# ----------------------------------------------------------------------------------------------
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
RECIPES = {  # the paper's Implementation details, with the official data pipelines (mean/std, augmentation)
    "imagenet": dict(arch="resnet18", epochs=90, batch_size=256, milestones=[30, 60], alpha=1.0, beta=200.0,
                     input_size=224, crop_pct=0.875, augment="rrc", mean=IMAGENET_MEAN, std=IMAGENET_STD, workers=8),
    "cifar": dict(arch="cifar_resnet18", epochs=200, batch_size=128, milestones=[100, 150], alpha=2.0, beta=100.0,
                  input_size=32, crop_pct=1.0, augment="pad_crop", mean=[0.4914, 0.4822, 0.4465],
                  std=[0.2023, 0.1994, 0.2010], workers=4),
    # official Tiny-ImageNet loader: RandomResizedCrop(32) + flip, evaluation resized to 32
    "tinyimagenet": dict(arch="cifar_resnet18", epochs=200, batch_size=128, milestones=[100, 150], alpha=3.0,
                         beta=100.0, input_size=32, crop_pct=1.0, augment="rrc", mean=[0.4802, 0.4481, 0.3975],
                         std=[0.2770, 0.2691, 0.2821], workers=4),
    # fine-grained (CUB200, MIT67, Dogs, Stanford40): the standard ResNet-18 at 224, batch 32
    "fgvr": dict(arch="resnet18", epochs=200, batch_size=32, milestones=[100, 150], alpha=1.0, beta=200.0,
                 input_size=224, crop_pct=0.875, augment="rrc", mean=IMAGENET_MEAN, std=IMAGENET_STD, workers=8),
    # the Tiny-ImageNet recipe (64 px images trained at 32) sized for a 2-core CPU (~5 min): the official
    # WRN structure at depth 16, width 1, whose BiFPNc is x0.58 its parameters / x0.66 its FLOPs, as in
    # Table 6's WRN-16-2 row (test_resnet's: x3.1 / x1.5), 16 epochs with the paper's milestone fractions
    "demo": dict(arch="wrn16_1", epochs=16, batch_size=64, milestones=[8, 12], alpha=3.0, beta=100.0,
                 input_size=32, crop_pct=1.0, augment="rrc", mean=IMAGENET_MEAN, std=IMAGENET_STD, workers=2),
}
SEG_RECIPES = {  # --task segmentation
    # the official segmentation code run with its README command (batch 16, gradients accumulated to 32)
    "voc": dict(arch="tf_efficientnet_b0", epochs=60, warmup_epochs=40, milestones=[40], batch_size=32,
                accum_steps=2, lr=0.01, wd=5e-4, crop_size=512, num_classes=21, alpha=1.0, beta=50.0,
                temperature=1.0, repeat=2, bifpn_layers=3, clip_value=2.0, workers=4),
    # laptop-sized: 64 px scenes, a tiny EfficientNet from random init, 2/3 of the epochs warm-up as official
    "demo": dict(arch="test_efficientnet", init="none", epochs=10, warmup_epochs=7, milestones=[7],
                 batch_size=8, accum_steps=1, lr=0.02, wd=5e-4, crop_size=demo.SEG_IMAGE_SIZE,
                 num_classes=len(demo.SEG_CLASSES), alpha=1.0, beta=50.0, temperature=1.0, repeat=2,
                 bifpn_layers=3, clip_value=2.0, workers=2),
}
SEG_BIFPN_WIDTHS = {"efficientnet_b0": 64, "efficientnet_b1": 88, "efficientnet_b2": 112}  # official outc
SEG_ONLY_FLAGS = ("init", "num_classes", "bifpn_layers", "warmup_epochs", "accum_steps", "clip_value",
                  "crop_size")
CLASSIFICATION_ONLY_FLAGS = ("recipe", "val_data", "mixup", "cutmix", "input_size", "crop_pct", "augment")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and val/, or 'demo' "
                   "(segmentation: a VOCdevkit folder or DIR/{train,val}/{images,masks}, or 'demo')")
    p.add_argument("--task", choices=["classification", "segmentation"], default="classification",
                   help="segmentation: EfficientDet with a BiFPN self-teacher (Sec. 4.2, Table 4)")
    p.add_argument("--val-data", action="append", default=[], help="extra ImageFolder to evaluate on")
    p.add_argument("--recipe", choices=["imagenet", "cifar", "tinyimagenet", "fgvr"],
                   help="default: imagenet (demo: its own)")
    p.add_argument("--out", help="output folder (default: a fresh runs/frskd_<recipe>[_baseline]/<date-time>)")
    p.add_argument("--arch", help="cifar_resnet18, wrn16_2, or a timm CNN (resnet18, resnet34, ...)")
    p.add_argument("--width", type=flags.positive_float, default=2.0,
                   help="self-teacher channel width w (d_i = w c_i)")
    p.add_argument("--bifpn-channels", type=flags.positive_int,
                   help="equal-width BiFPN of Table 6 (no resample convs) instead of BiFPNc; segmentation: "
                        "the BiFPN width (default 64 for B0, 88 for B1, as EfficientDet)")
    p.add_argument("--repeat", type=flags.positive_int, default=1,
                   help="stacked BiFPN layers of the self-teacher (segmentation: 2)")
    p.add_argument("--alpha", type=flags.nonneg_float, help="soft-label distillation weight (Eq. 5)")
    p.add_argument("--beta", type=flags.nonneg_float, help="feature distillation weight (Eq. 5); 0 = FRSKD\\F")
    p.add_argument("--temperature", type=flags.positive_float, default=4.0, help="K of Eq. 4")
    p.add_argument("--baseline", action="store_true", help="plain cross-entropy, no self-teacher")
    p.add_argument("--mixup", type=flags.nonneg_float, default=0.0, help="mixup alpha (Table 8; 0 = off)")
    p.add_argument("--cutmix", type=flags.nonneg_float, default=0.0, help="cutmix alpha (Table 8; 0 = off)")
    p.add_argument("--epochs", type=flags.positive_int)
    p.add_argument("--batch-size", type=flags.positive_int, help="global batch")
    p.add_argument("--lr", type=flags.positive_float, default=0.1)
    p.add_argument("--wd", type=flags.nonneg_float, default=1e-4)
    p.add_argument("--wd-scope", choices=["all", "weights"], default="all",
                   help="all: decay every parameter, incl. BN and fusion weights (official); "
                        "weights: exempt 1-d parameters")
    p.add_argument("--momentum", type=flags.fraction_below_one, default=0.9)
    p.add_argument("--milestones", type=flags.positive_int, nargs="+", help="epochs where lr is multiplied by 0.1")
    p.add_argument("--input-size", type=flags.positive_int)
    p.add_argument("--crop-pct", type=flags.open_fraction)
    p.add_argument("--augment", choices=["rrc", "pad_crop"], help="random-resized crop, or CIFAR pad-4 crop")
    p.add_argument("--mean", type=flags.fraction, nargs=3, help="per-channel normalization mean (recipe's)")
    p.add_argument("--std", type=flags.positive_float, nargs=3, help="per-channel normalization std (recipe's)")
    flags.add_run_flags(p)
    seg = p.add_argument_group("segmentation only (defaults: SEG_RECIPES)")
    seg.add_argument("--init", help="backbone weights: timm tag (default ARCH.aa_in1k for tf_efficientnet_b*), "
                                    "NAME=PATH, or 'none' (random init)")
    seg.add_argument("--num-classes", type=flags.positive_int, help="classes incl. background (VOC: 21)")
    seg.add_argument("--bifpn-layers", type=flags.positive_int, help="the classifier network's BiFPN layers (3)")
    seg.add_argument("--warmup-epochs", type=flags.nonneg_int, help="epochs with alpha = beta = 0 (40)")
    seg.add_argument("--accum-steps", type=flags.positive_int,
                     help="micro-batches whose gradients make one SGD step of --batch-size (2)")
    seg.add_argument("--clip-value", type=flags.positive_float, help="gradient value clipping (2.0)")
    seg.add_argument("--crop-size", type=flags.positive_int, help="training crop and validation size (512)")
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--task")
    early.add_argument("--data")
    known = early.parse_known_args(argv)[0]
    if known.task == "segmentation":  # the segmentation recipe's defaults replace the classification ones
        recipe = SEG_RECIPES["demo" if known.data == "demo" else "voc"]
        p.set_defaults(**recipe, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    args = p.parse_args(argv)
    if args.task == "segmentation":
        return segmentation_args(args, p)
    given = [name for name in SEG_ONLY_FLAGS if getattr(args, name) is not None]
    if given:
        p.error(f"--{given[0].replace('_', '-')} applies to --task segmentation only")
    args.recipe_name = "demo" if args.data == "demo" and args.recipe is None else (args.recipe or "imagenet")
    for key, value in RECIPES[args.recipe_name].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def segmentation_args(args, parser):
    """Finish the flags of --task segmentation: refuse classification-only flags, derive the width."""
    given = [name for name in CLASSIFICATION_ONLY_FLAGS if getattr(args, name) not in (None, [], 0.0)]
    if given:
        parser.error(f"--{given[0].replace('_', '-')} applies to classification only, not --task segmentation")
    args.recipe_name = "seg_demo" if args.data == "demo" else "seg"
    name = args.arch.split(".")[0]
    if args.bifpn_channels is None:
        args.bifpn_channels = SEG_BIFPN_WIDTHS.get(name.removeprefix("tf_"), 64)
    if args.init is None:  # ImageNet weights; timm's default B0 tag is trained on JFT
        tf_b = name.startswith("tf_efficientnet_b") and "." not in args.arch
        args.init = f"{name}.aa_in1k" if tf_b else args.arch
    return args


def main(argv=None):
    args = parse_args(argv)
    ctx = setup(args.device)
    try:
        run(args, ctx)
    except (DataError, ModelError, FloatingPointError) as error:
        raise SystemExit(f"error: {error}") from None
    except KeyboardInterrupt:
        raise SystemExit(ckpt.INTERRUPTED) from None
    finally:
        cleanup()


def run(args, ctx):
    if args.task == "segmentation":
        return run_segmentation(args, ctx)
    if args.batch_size % ctx.world:
        raise SystemExit(f"error: --batch-size {args.batch_size} must be divisible by the {ctx.world} processes")
    start = time.time()
    root = demo.ensure_data(ctx) if args.data == "demo" else args.data
    cfg = {"mean": list(args.mean), "std": list(args.std), "input_size": args.input_size,
           "crop_pct": args.crop_pct, "interpolation": "bilinear"}
    ctx.print(describe_data_config({"name": args.arch, "data_config": cfg, "data_config_source":
                                    f"the {args.recipe_name} recipe and flags; training: {args.augment}"}))
    train_tf, val_tf = transforms_for(args)
    train_set = image_folder(root, "train", train_tf)
    val_sets = {"val": eval_loader(image_folder(root, "val", val_tf, train_set.classes),
                                   args.batch_size, args.workers, ctx)}
    for i, extra in enumerate(args.val_data):
        val_sets[f"extra{i}"] = eval_loader(image_folder(extra, "", val_tf, train_set.classes),
                                            args.batch_size, args.workers, ctx)
    base = f"runs/frskd_{args.recipe_name}" + ("_baseline" if args.baseline else "")
    out = ckpt.resolve_out(args.out, base, ctx, args.resume)
    train_and_summarize(args, ctx, out, start, "top1", lambda run_args, run_out: train(
        run_args, ctx, train_set, val_sets, cfg, run_out), lambda a: f", w {a.width}")


def train_and_summarize(args, ctx, out, start, metric, train_one, describe):
    """Train the run the flags ask for (on the demo also the baseline with the same flags, in
    OUT/frskd and OUT/baseline), print one summary line, write OUT/summary.json.
    train_one(run_args, run_out) -> (final metrics, best val_<metric>, seconds)."""
    runs = [("baseline" if args.baseline else "frskd", args)]
    if args.data == "demo" and not args.baseline:  # the demo also trains the baseline (same epochs)
        runs.append(("baseline", argparse.Namespace(**dict(vars(args), baseline=True))))
    results = {}
    for name, run_args in runs:
        ctx.print(f"training {name}: {run_args.task}, {run_args.arch}, {run_args.epochs} epochs" + ("" if
                  run_args.baseline else f", alpha {run_args.alpha}, beta {run_args.beta}" + describe(run_args)))
        metrics, best, seconds = train_one(run_args, out if len(runs) == 1 else os.path.join(out, name))
        results[name] = {"final": metrics, f"best_{metric}": best, "train_time": seconds}
    name = "top-1" if metric == "top1" else "mIoU"
    line = ", ".join(f"{run} classifier {name} {r['final'].get(f'val_{metric}', float('nan')):.2f}% "
                     f"(best {r[f'best_{metric}']:.2f}%, {r['train_time']:.0f}s)"
                     + (f", self-teacher {r['final'][f'val_self_teacher_{metric}']:.2f}%"
                        if f"val_self_teacher_{metric}" in r["final"] else "") for run, r in results.items())
    title = "FRSKD summary" if args.task == "classification" else "FRSKD segmentation summary"
    ctx.print(f"{title}: {args.arch}, {args.epochs} epochs: {line}; total {time.time() - start:.0f}s, "
              f"out {out}")
    if ctx.main:
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(results, f, indent=1)


def run_segmentation(args, ctx):
    if args.batch_size % (ctx.world * args.accum_steps):
        raise SystemExit(f"error: --batch-size {args.batch_size} must be divisible by the {ctx.world} "
                         f"processes x --accum-steps {args.accum_steps}")
    start = time.time()
    root = demo.ensure_segmentation_data(ctx) if args.data == "demo" else args.data
    train_pairs, val_pairs, layout = find_pairs(root)
    check_pairs(train_pairs + val_pairs, args.num_classes)
    ctx.print(f"{layout} {root}: {len(train_pairs)} train / {len(val_pairs)} val images, {args.num_classes} classes")
    train_set = SegmentationSet(train_pairs, RandomScaleCropFlip(args.crop_size, args.crop_size))
    val_set = SegmentationSet(val_pairs, ResizePair(args.crop_size))
    base = f"runs/frskd_{args.recipe_name}" + ("_baseline" if args.baseline else "")
    out = ckpt.resolve_out(args.out, base, ctx, args.resume)
    train_and_summarize(args, ctx, out, start, "miou", lambda run_args, run_out: train_segmentation(
        run_args, ctx, train_set, val_set, run_out), lambda a: f" after {a.warmup_epochs} warm-up epochs")

if __name__ == "__main__":
    main()
