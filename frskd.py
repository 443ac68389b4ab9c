"""FRSKD: refine feature maps with a self-teacher network, distill them back (classification).

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

Commands:
  CPU demo   python frskd.py --data demo                       (FRSKD, then the plain-CE baseline)
  CIFAR-100  python frskd.py --data /cifar100 --recipe cifar   (ImageFolder of 32x32 images; CIFAR ResNet-18)
             python frskd.py --data /cifar100 --recipe cifar --arch wrn16_2
  Tiny-IN    python frskd.py --data /tiny-imagenet-200 --recipe tinyimagenet
  1 GPU      python frskd.py --data /imagenet --amp            (ResNet-18, batch 256)
  8 GPUs     torchrun --nproc_per_node=8 frskd.py --data /imagenet --amp
  2 nodes    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
                 frskd.py --data /imagenet --amp
--batch-size is global (all processes together). --beta 0 gives FRSKD\\F (no feature distillation).
"""
import argparse
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
from common.models import ModelError, create, make_optimizer, normalize, param_groups


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
            raise ValueError(f"need the same number (>= 2) of input levels and widths, got {in_channels}, {widths}")
        if not first and list(in_channels) != list(widths):
            raise ValueError(f"a later layer (first=False) keeps its inputs as L_i: in_channels {in_channels} "
                             f"must equal widths {widths}")
        if not resample_convs and len(set(widths)) != 1:
            raise ValueError(f"resample_convs=False (equal-width BiFPN) needs equal widths, got {widths}")
        self.lateral = nn.ModuleList(conv_bn_relu(c, d) for c, d in zip(in_channels, widths)) if first else None
        self.lateral_bottom_up = nn.ModuleList(conv_bn_relu(c, d) for c, d in zip(in_channels[1:], widths[1:]))
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
        lateral = features if self.lateral is None else [conv(f) for conv, f in zip(self.lateral, features)]  # Eq. 1
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
            inputs = [lateral_bottom_up[i], F.relu(top_down[i]), down] if i < n - 1 else [lateral_bottom_up[i], down]
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
        self.layers = nn.ModuleList([BiFPNLayer(in_channels, widths, True, resample_convs)] +
                                    [BiFPNLayer(widths, widths, False, resample_convs) for _ in range(repeat - 1)])
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
    return sum((attention_map(f) - attention_map(t.detach())).pow(2).mean() for f, t in zip(features, refined))


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
    "demo": dict(arch="test_resnet", epochs=16, batch_size=64, milestones=[8, 12], alpha=2.0, beta=100.0,
                 input_size=64, crop_pct=1.0, augment="rrc", mean=IMAGENET_MEAN, std=IMAGENET_STD, workers=2),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and val/, or 'demo'")
    p.add_argument("--val-data", action="append", default=[], help="extra ImageFolder to evaluate on")
    p.add_argument("--recipe", choices=["imagenet", "cifar", "tinyimagenet"],
                   help="default: imagenet (demo: its own)")
    p.add_argument("--out", help="output folder (default: a fresh runs/frskd_<recipe>[_baseline]/<date-time>)")
    p.add_argument("--arch", help="cifar_resnet18, wrn16_2, or a timm CNN (resnet18, resnet34, ...)")
    p.add_argument("--width", type=flags.positive_float, default=2.0,
                   help="self-teacher channel width w (d_i = w c_i)")
    p.add_argument("--bifpn-channels", type=flags.positive_int,
                   help="equal-width BiFPN of Table 6 (no resample convs) instead of BiFPNc")
    p.add_argument("--repeat", type=flags.positive_int, default=1, help="stacked BiFPN layers")
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
    p.add_argument("--workers", type=flags.nonneg_int)
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    p.add_argument("--amp-dtype", choices=["float16", "bfloat16"], default="float16",
                   help="autocast dtype with --amp (bfloat16 needs no loss scaling)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--seed", type=flags.nonneg_int, default=0)
    p.add_argument("--resume", help="checkpoint to continue, or 'auto' (OUT/last.pth; without --out the newest run)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--stop-epoch", type=flags.positive_int, help="stop after this epoch (continue with --resume auto)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)
    args.recipe_name = "demo" if args.data == "demo" and args.recipe is None else (args.recipe or "imagenet")
    for key, value in RECIPES[args.recipe_name].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
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
    if args.batch_size % ctx.world:
        raise SystemExit(f"error: --batch-size {args.batch_size} must be divisible by the {ctx.world} processes")
    start = time.time()
    root = demo.ensure_data(ctx) if args.data == "demo" else args.data
    cfg = {"mean": list(args.mean), "std": list(args.std), "input_size": args.input_size,
           "crop_pct": args.crop_pct, "interpolation": "bilinear"}
    train_tf, val_tf = transforms_for(args)
    train_set = image_folder(root, "train", train_tf)
    val_sets = {"val": eval_loader(image_folder(root, "val", val_tf, train_set.classes),
                                   args.batch_size, args.workers, ctx)}
    for i, extra in enumerate(args.val_data):
        val_sets[f"extra{i}"] = eval_loader(image_folder(extra, "", val_tf, train_set.classes),
                                            args.batch_size, args.workers, ctx)
    base = f"runs/frskd_{args.recipe_name}" + ("_baseline" if args.baseline else "")
    out = ckpt.resolve_out(args.out, base, ctx, args.resume)
    runs = [("baseline" if args.baseline else "frskd", args)]
    if args.data == "demo" and not args.baseline:  # the demo also trains the plain-CE baseline
        runs.append(("baseline", argparse.Namespace(**dict(vars(args), baseline=True))))
    results = {}
    for name, run_args in runs:
        run_out = out if len(runs) == 1 else os.path.join(out, name)
        ctx.print(f"training {name}: {run_args.arch}, {run_args.epochs} epochs" + (
            "" if run_args.baseline else f", alpha {run_args.alpha}, beta {run_args.beta}, w {run_args.width}"))
        metrics, best, seconds = train(run_args, ctx, train_set, val_sets, cfg, run_out)
        results[name] = {"final": metrics, "best_top1": best, "train_time": seconds}
    line = ", ".join(f"{name} classifier top-1 {r['final'].get('val_top1', float('nan')):.2f}% "
                     f"(best {r['best_top1']:.2f}%, {r['train_time']:.0f}s)"
                     + (f", self-teacher {r['final']['val_self_teacher_top1']:.2f}%"
                        if "val_self_teacher_top1" in r["final"] else "") for name, r in results.items())
    ctx.print(f"FRSKD summary: {args.arch}, {args.epochs} epochs: {line}; "
              f"total {time.time() - start:.0f}s, out {out}")
    if ctx.main:
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
