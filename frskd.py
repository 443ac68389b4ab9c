"""FRSKD: refine feature maps with a self-teacher network, distill them back (classification and
semantic segmentation).

Paper: Mingi Ji, Seungjae Shin, Seunghyun Hwang, Gibeom Park, Il-Chul Moon, "Refine Myself by
Teaching Myself: Feature Refinement via Self-Knowledge Distillation", CVPR 2021 (arXiv 2103.08273);
shared/papers/frskd.txt. Official code: github.com/MingiJi/FRSKD; where it differs from the paper,
this file follows the code the paper's numbers came from. A self-teacher (BiFPNc) refines the
classifier's stage features F_i into T_i; both networks train together from scratch, one optimizer.

Equation map:
  Eq. 1   L_i = Conv(F_i; d_i), d_i = w c_i                  -> BiFPNLayer (lateral)
  Eq. 2   P_i = Conv(w1 L_i + w2 Resize(P_{i+1}))            -> BiFPNLayer.forward (top-down)
          T_i = Conv(w1 L'_i + w2 P_i + w3 Resize(T_{i-1}))  -> BiFPNLayer.forward (bottom-up;
                L'_i: a second, separate lateral conv, as in the official code)
  Eq. 3   L_F = sum_i || phi(T_i) - phi(F_i) ||              -> attention_loss()
  Eq. 4   L_KD = KL(softmax(c / K) || softmax(t / K))         -> kd_loss() (official: K^2 KL(t || c))
  Eq. 5   L = CE(c) + CE(t) + alpha L_KD + beta L_F           -> frskd_loss()
Segmentation (--task segmentation, Sec. 4.2): the last section, with its own equation map and commands.

Commands (--batch-size is global, all processes together; --beta 0 gives FRSKD\\F):
  CPU demo   python frskd.py --data demo                       (FRSKD, then the plain-CE baseline)
  recipes    python frskd.py --data /cifar100 --recipe cifar   (or tinyimagenet, fgvr; --arch wrn16_2)
  1 GPU      python frskd.py --data /imagenet --amp            (ResNet-18, batch 256)
  8 GPUs     torchrun --nproc_per_node=8 frskd.py --data /imagenet --amp
  2 nodes    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
                 frskd.py --data /imagenet --amp
"""
import argparse
import contextlib
import functools
import itertools
import math
import os
import time

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms

from common import ckpt, demo, flags
from common.data import (DataError, SeededItems, TaggedSampler, eval_loader, eval_transform, evaluate,
                         image_folder, loader, mix_batch, train_transform)
from common.dist import EpochSums, epoch_generator, maybe_compile, run_main, seed_rank_epoch, seeded, wrap_ddp
from common.models import (ModelError, create, describe_data_config, init_spec, make_optimizer, normalize,
                           param_groups)
from frskd_seg_data import (IGNORE_INDEX, RandomScaleCropFlip, ResizePair, SegmentationSet, check_pairs,
                            evaluate_segmentation, find_pairs)

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
TERMS = ("loss", "ce", "ce_self_teacher", "kd", "feature")  # logged as train_*: Eq. 5 and its terms


# --- The self-teacher: BiFPNc (Sec. 3.1) ---------------------------------------------------------
def conv_bn_relu(cin, cout):
    """1x1 conv -> BN -> ReLU: the lateral convs (Eq. 1) and BiFPNc's resampling convs."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def separable_conv(c):
    """A node's Conv of Eq. 2: 2 x (depthwise 3x3 -> pointwise 1x1 -> BN), ReLU between (official)."""
    parts = [[nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False), nn.Conv2d(c, c, 1, bias=False),
              nn.BatchNorm2d(c)] for _ in range(2)]
    return nn.Sequential(*parts[0], nn.ReLU(inplace=True), *parts[1])


def max_pool_same(x, kernel=3, stride=2):
    """Max-pool with TF-style "same" padding (EfficientDet, official): output ceil(n / stride), the
    padding mostly bottom/right (3x3/2 on an even side: 0 top/left, 1 bottom/right)."""
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
        return sum(w * x for w, x in zip(self.normalized_weights(), xs))


class BiFPNLayer(nn.Module):
    """One top-down + bottom-up pass (Eq. 1-2) over n levels, level 0 the shallowest (largest).
    first: laterals L_i map the inputs to the widths d_i (Eq. 1); a later layer takes the previous T_i as
    L_i (official intent; the official `repeat > 1` path crashes). resample_convs: BiFPNc follows each
    resampling with a 1x1 conv+BN+ReLU to the next level's width; Table 6's equal-width BiFPN only
    resamples. Each layer has its own bottom-up laterals L'_i; node outputs are ReLU'd where used."""
    def __init__(self, in_channels, widths, first=True, resample_convs=True):
        super().__init__()
        n = len(widths)
        if len(in_channels) != n or n < 2:
            raise ValueError(f"need as many (>= 2) input levels as widths, got {in_channels}, {widths}")
        if not first and list(in_channels) != list(widths):  # a later layer keeps its inputs as L_i
            raise ValueError(f"first=False needs in_channels == widths, got {in_channels}, {widths}")
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
    """Self-teacher: `repeat` BiFPN layers of widths d_i = round(width x c_i) (`channels`: Table 6's
    equal width) on the stage features F_i, then avg-pool + linear on the last -> (T_i, logits)."""
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


# --- The losses (Sec. 3.2) ------------------------------------------------------------------------
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


def kd_loss(logits, self_teacher_logits, temperature):
    """Eq. 4 as official (DistillKL): K^2 KL(softmax(t/K) || softmax(c/K)) summed over classes, mean over
    samples (segmentation: pixels, / B H W); the paper writes KL(softmax(c/K) || softmax(t/K)) without K^2.
    The self-teacher's logits are detached."""
    kl = F.kl_div(F.log_softmax(logits / temperature, dim=1),
                  F.softmax(self_teacher_logits.detach() / temperature, dim=1), reduction="sum")
    return kl * temperature ** 2 / (logits.numel() // logits.shape[1])


def frskd_loss(logits, self_teacher_logits, features, refined, targets, alpha, beta, temperature,
               cross_entropy=soft_cross_entropy):
    """Eq. 5, the self-teacher's outputs detached in both distillation terms (they train the classifier only).
    targets: probabilities [B, C] (or masks) -> (total, (ce_classifier, ce_self_teacher, kd, feature))"""
    ce_classifier = cross_entropy(logits, targets)
    ce_self_teacher = cross_entropy(self_teacher_logits, targets)
    kd = kd_loss(logits, self_teacher_logits, temperature)  # Eq. 4
    feature = attention_loss(features, refined)  # Eq. 3
    total = ce_classifier + ce_self_teacher + alpha * kd + beta * feature  # Eq. 5
    return total, (ce_classifier, ce_self_teacher, kd, feature)


# --- Classifiers (not part of the method): stage features F_1..F_n and logits from one forward ----
class WideBlock(nn.Module):
    """Official WRN block: relu(x) -> conv3x3 -> BN -> ReLU -> conv3x3, plus x or conv1x1(relu(x))."""
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
    """WRN-depth-k for 32x32 inputs as in the official FRSKD code (Tables 1, 6), not the pre-activation
    WRN: a BN after each group feeds the next, stage features relu(BN(group)), He-normal fan-out convs.
    WRN-16-2: 702,804 parameters at 100 classes (the official final BN, never called, is left out)."""
    def __init__(self, num_classes, depth=16, widen=2):
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ModelError(f"WRN depth must be 6 n + 4 (10, 16, 22, 28, ...), got {depth}")
        blocks, widths = (depth - 4) // 6, [16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.groups = nn.ModuleList(  # a group's first block changes the width (groups 2, 3: the size)
            nn.Sequential(*[WideBlock(cin if b == 0 else width, width, 2 if b == 0 and i > 0 else 1)
                            for b in range(blocks)])
            for i, (cin, width) in enumerate(zip([16] + widths, widths)))
        self.group_bns = nn.ModuleList(nn.BatchNorm2d(width) for width in widths)
        self.fc = nn.Linear(widths[-1], num_classes)
        self.stage_channels = widths
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # He normal, fan-out (official): fan_out = numel / in_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 * module.in_channels / module.weight.numel()))
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


def make_classifier(arch, num_classes):
    """wrnDEPTH_K (official WRN), cifar_NAME (a timm ResNet, CIFAR stem) or a timm CNN, initialised as
    the official ones: timm ResNets without zero-initialised last BN gammas (official ImageNet ResNets:
    He fan-out convs, gammas 1), CIFAR ResNets PyTorch's default (the official has no init code)."""
    depth, _, widen = arch.removeprefix("wrn").partition("_")
    if arch.startswith("wrn") and depth.isdigit() and widen.isdigit():
        return WideResNet(num_classes, int(depth), int(widen))
    cifar, name = arch.startswith("cifar_"), arch.removeprefix("cifar_")
    resnet = timm.models.is_model_in_modules(name.split(".")[0], ["resnet"])
    model = create(name, num_classes, pretrained_head="none", adapt=cifar_stem if cifar else None,
                   **({"zero_init_last": False} if resnet else {}))[0]
    for module in model.modules() if cifar else ():
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            module.reset_parameters()
    return TimmStages(model)


class FRSKDNet(nn.Module):
    """Classifier + self-teacher in one module, so DDP sees the whole forward -> (features F_i, logits,
    refined maps T_i, self-teacher logits); the last two None for the baseline."""
    def __init__(self, classifier, self_teacher):
        super().__init__()
        self.classifier, self.self_teacher = classifier, self_teacher

    def forward(self, x):
        features, logits = self.classifier.forward_stages(x)
        # classifier features enter the self-teacher undetached: its CE also trains the backbone (official)
        return features, logits, *((None, None) if self.self_teacher is None else self.self_teacher(features))


class EvalHeads(nn.Module):
    """Evaluation (both tasks): the classifier's logits, and the self-teacher's from the same forward."""
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        _, logits, _, self_teacher_logits = self.net(x)
        return logits if self_teacher_logits is None else (logits, self_teacher_logits)


def build_net(args, num_classes):
    """Classifier (+ self-teacher); initial weights depend on --seed alone (the same on every rank)."""
    with seeded(args.seed):
        classifier = make_classifier(args.arch, num_classes)
        self_teacher = None if args.baseline else BiFPNc(classifier.stage_channels, num_classes, args.width,
                                                         args.repeat, args.bifpn_channels)
    return FRSKDNet(classifier, self_teacher)


def make_optimizer_for(net, args):
    """SGD; weight decay on every parameter (official) or, with --wd-scope weights, not on 1-d ones."""
    return make_optimizer("sgd", param_groups(net, args.wd, args.wd_scope), args.lr, args.momentum)


# --- The training step and loop (both tasks) ------------------------------------------------------
def training_step(net, optimizer, scaler, images, targets, args, alpha, beta, autocast, losses, update):
    """Forward, the task's losses (CE, Eq. 5), backward and, if `update` (the micro-batch that completes
    an accumulation group), the SGD step. Returns (loss, its 4 terms stacked, logits), detached."""
    cross_entropy, eq5 = losses
    # DDP: all-reduce gradients only on the micro-batch that completes an accumulation group
    with contextlib.nullcontext() if update or not hasattr(net, "no_sync") else net.no_sync():
        with autocast:
            features, logits, refined, self_teacher_logits = net(images)
        logits = logits.float()
        if self_teacher_logits is None:  # baseline: the classifier's CE alone
            loss = cross_entropy(logits, targets)
            terms = [loss, *[torch.zeros_like(loss)] * 3]
        else:
            loss, terms = eq5(logits, self_teacher_logits.float(), features, refined, targets, alpha,
                              beta, args.temperature)
        scaler.scale(loss / (args.accum_steps or 1)).backward()  # segmentation (official): 16 x 2
    if update:
        if args.clip_value:  # official segmentation: gradient value clipping 2.0
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_value_(net.parameters(), args.clip_value)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), torch.stack([t.detach() for t in terms]), logits.detach()


def train(args, ctx, net, train_set, val_sets, num_classes, out, losses, ramp=None, **meta):
    """Both tasks' loop; ramp(epoch): factor on alpha, beta. -> (last epoch's metrics, best score, seconds)"""
    seg, cuda = args.task == "segmentation", ctx.device.type == "cuda"
    accum, score = args.accum_steps or 1, "val_miou" if seg else "val_top1"
    net = net.to(ctx.device, memory_format=torch.channels_last if cuda else torch.preserve_format)
    optimizer = make_optimizer_for(net, args)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.milestones, 0.1)
    scaler = ctx.grad_scaler(args)
    checkpoint = ckpt.Checkpointer(out, ctx, args.resume, args.overwrite, args=args, model=net,
                                   optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    start_epoch, best = checkpoint.restore(num_classes)
    model = net  # the bare network, evaluated without the wrappers
    net, autocast = maybe_compile(wrap_ddp(net, ctx), args), ctx.autocast(args)
    # each rank's crops depend on (seed, rank, epoch, image) alone: resume- and worker-count-proof
    sampler = TaggedSampler(torch.utils.data.DistributedSampler(train_set, ctx.world, ctx.rank, shuffle=True,
                                                                seed=args.seed, drop_last=True))
    batch = args.batch_size // (ctx.world * accum)
    data = loader(SeededItems(train_set, args.seed, ctx.rank), batch, args.workers, sampler, ctx.device,
                  drop_last=True)
    steps = len(data) // accum * accum  # whole groups (official: a leftover's gradient goes on)
    if steps == 0:
        raise DataError(f"each process gets {len(data)} batches of {batch} images per epoch, fewer than "
                        f"--accum-steps {accum}; lower --batch-size or --accum-steps")
    metrics, run_start = {}, time.time()
    for epoch in range(start_epoch, args.epochs):
        seed_rank_epoch(args.seed, ctx.rank, epoch)
        sampler.set_epoch(epoch, epoch)
        mix_generator = epoch_generator(args.seed, ctx.rank, epoch)
        factor = 0.0 if args.baseline else ramp(epoch) if ramp else 1.0
        alpha, beta = args.alpha * factor, args.beta * factor
        net.train()
        lr, epoch_start = optimizer.param_groups[0]["lr"], time.time()
        sums = EpochSums(ctx.device)
        for index, (images, labels) in enumerate(ctx.bar(itertools.islice(data, steps), total=steps,
                                                          desc=f"epoch {epoch + 1}/{args.epochs}")):
            images = normalize(images.to(ctx.device, non_blocking=True), args.mean, args.std)
            labels = targets = labels.to(ctx.device, non_blocking=True)  # segmentation: the masks
            if not seg:  # class probabilities: one-hot, or mixed by mixup/cutmix
                targets = F.one_hot(labels, num_classes).float()
                if args.mixup > 0 or args.cutmix > 0:
                    images, targets = mix_batch(images, targets, args.mixup, args.cutmix, mix_generator)
            loss, terms, logits = training_step(net, optimizer, scaler, images, targets, args, alpha,
                                                beta, autocast, losses, (index + 1) % accum == 0)
            sums.add(batch, counts=("correct",), **dict(zip(TERMS, [loss, *terms])),  # on the device
                     **({} if seg else {"correct": (logits.argmax(1) == labels).sum()}))
        scheduler.step()
        means, _ = sums.means(ctx)
        ckpt.check_finite(means["loss"], epoch, out)
        metrics = {"epoch": epoch + 1, "lr": lr, **({"alpha": alpha, "beta": beta} if ramp else {}),
                   **{f"train_{name}": means[name] for name in TERMS},
                   **({} if seg else {"train_top1": 100 * means["correct"]}),
                   "train_time": time.time() - epoch_start, **evaluate_sets(model, val_sets, ctx, args)}
        best = max(best, metrics[score])
        if checkpoint.end_epoch(metrics, best, args, score=score, arch=args.arch,
                                num_classes=num_classes, **meta):
            break
    return metrics, best, time.time() - run_start


def evaluate_sets(model, val_sets, ctx, args):
    """Each set's classifier top-1/5 (segmentation: mIoU, pixel accuracy) and self-teacher top-1 (mIoU)."""
    seg, heads = args.task == "segmentation", 1 if model.self_teacher is None else 2
    score, keys = ("miou", ("miou", "pixel_acc")) if seg else ("top1", ("top1", "top5", "count"))
    metrics = {}
    for name, data in val_sets.items():
        results = evaluate_segmentation(EvalHeads(model), data, ctx, args.mean, args.std, args.num_classes,
                                        args, heads=heads, desc=name) if seg else \
            evaluate(EvalHeads(model), data, ctx, args.mean, args.std, args, desc=name, heads=heads)
        result, *teacher = results if heads == 2 else (results,)
        metrics.update({f"{name}_self_teacher_{score}": t[score] for t in teacher})
        metrics.update({f"{name}_{key}": result[key] for key in keys})
    return metrics


# --- Classification data --------------------------------------------------------------------------
def transforms_for(args):
    """(train, eval) transforms of the recipe: uint8 tensors, normalized later on the device."""
    size = args.input_size  # CIFAR: pad-4 random crop + flip, other sizes resized to the input first
    train_tf = transforms.Compose([transforms.Resize(size), transforms.RandomCrop(size, padding=4),
                                   transforms.RandomHorizontalFlip(), transforms.PILToTensor()]) \
        if args.augment == "pad_crop" else train_transform(size)
    return train_tf, eval_transform(size, args.crop_pct)


def prepare_classification(args, ctx):
    """Read the data -> train_one(run_args, out), which returns train()'s result."""
    root = demo.ensure_data(ctx) if args.data == "demo" else args.data
    cfg = {"mean": list(args.mean), "std": list(args.std), "input_size": args.input_size,
           "crop_pct": args.crop_pct, "interpolation": "bilinear"}
    ctx.print(describe_data_config({"name": args.arch, "data_config": cfg, "data_config_source":
                                    f"the {args.recipe_name} recipe and flags; training: {args.augment}"}))
    train_tf, val_tf = transforms_for(args)
    train_set = image_folder(root, "train", train_tf)
    folders = [("val", root, "val")] + [(f"extra{i}", path, "") for i, path in enumerate(args.val_data)]
    val_sets = {name: eval_loader(image_folder(folder, split, val_tf, train_set.classes),
                                  args.batch_size, args.workers, ctx) for name, folder, split in folders}
    classes = len(train_set.classes)
    return lambda run_args, out: train(  # --warmup-epochs: not in the official classification code
        run_args, ctx, build_net(run_args, classes), train_set, val_sets, classes, out,
        (soft_cross_entropy, frskd_loss), (lambda e: float(e >= run_args.warmup_epochs)) if
        run_args.warmup_epochs else None, data_config=cfg)


# --- Segmentation (paper Sec. 4.2, Table 4; Appendix, Implementation Details) ---------------------
# The official segmentation/ code: the classifier network is an EfficientDet (EfficientNet + FPN + 3 BiFPN
# layers), the self-teacher 2 more BiFPN layers on its outputs (width factor 1) -> FRSKDSegNet, SegBiFPNLayer
#   Eq. 3 over the six levels of the two BiFPN stacks            -> frskd_seg_loss() (attention_loss)
#   Eq. 4 per pixel: T^2 sum KL(t || c) / (B H W), T = 1         -> pixel_kd_loss() (= kd_loss)
#   Eq. 5 with CE over labelled pixels (255 ignored); alpha, beta 0 for 40 epochs, then ramped up
#                                                                -> frskd_seg_loss(), distillation_ramp()
# Commands: those of the docstring with --task segmentation and --data demo, or a VOCdevkit (VOC2007 +
# VOC2012 trainval / VOC2007 test) or DIR/{train,val}/{images,masks}. --batch-size 32 is one SGD step:
# 1 GPU accumulates 2 x 16 (official); add --accum-steps 1 on 8 GPUs (4 images each: another BN batch).
def conv_bn_relu_det(cin, cout, kernel, stride=1):
    """The official EfficientDet Conv: conv (with bias) -> BN(eps 1e-4, momentum 0.997) -> ReLU.
    momentum 0.997 is TF's decay passed as PyTorch's momentum (official): running stats ~ the last batch."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2),
                         nn.BatchNorm2d(cout, eps=1e-4, momentum=0.997), nn.ReLU(inplace=True))


class EfficientNetTaps(nn.Module):
    """A timm EfficientNet's stem and blocks returning the official segmentation features: the first
    block's output at strides 4, 8 and 16 and the last block's. As the official `layer0 = (conv_stem,
    bn0)`: no activation after the stem's BN; BN momentum efficientnet_pytorch's 0.01."""
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
        with torch.no_grad():  # channels of the four taps, from one small forward in eval mode
            self.channels = [f.shape[1] for f in self.eval()(torch.zeros(1, 3, 64, 64))]
        self.train()

    def forward(self, x):
        x, features = self.bn1(self.conv_stem(x)), []
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
    computed as the per-channel multiply-add it is: the same result, far cheaper on CPU on small maps."""
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
        top_down = [None] * (n - 1) + [self.up_nodes[-1](inputs[-1])]
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
    """Official head on the finest level: Conv (3x3, width -> 256) + conv3x3(256 -> classes)."""
    return nn.Sequential(*conv_bn_relu_det(width, 256, 3), nn.Conv2d(256, num_classes, 3, padding=1))


class FRSKDSegNet(nn.Module):
    """Classifier network = backbone + FPN + `classifier_layers` BiFPN layers + head; self-teacher = more
    BiFPN layers on its outputs (undetached: their CE trains the classifier too, as official) + a head.
    forward -> (features F_i, logits, refined T_i, self-teacher logits), logits resized to the input."""
    def __init__(self, backbone, num_classes, width, classifier_layers=3, self_teacher_layers=2,
                 self_teacher=True):
        super().__init__()
        self.backbone = backbone
        self.fpn = TopDownFPN(backbone.channels, width)
        self.bifpn = nn.Sequential(*[SegBiFPNLayer(width) for _ in range(classifier_layers)])
        self.head = segmentation_head(width, num_classes)
        self.self_teacher = self.self_teacher_head = None  # official baseline: built and run, unused
        if self_teacher:
            self.self_teacher = nn.Sequential(*[SegBiFPNLayer(width) for _ in range(self_teacher_layers - 1)],
                                              SegBiFPNLayer(width, top_down_only=True))  # the official last one
            self.self_teacher_head = segmentation_head(width, num_classes)

    def forward(self, x):
        upsampled = functools.partial(F.interpolate, size=x.shape[-2:], mode="bilinear", align_corners=False)
        features = self.bifpn(self.fpn(self.backbone(x)))
        logits = upsampled(self.head(features[0]))
        if self.self_teacher is None:
            return features, logits, None, None
        refined = self.self_teacher(features)
        return features, logits, refined, upsampled(self.self_teacher_head(refined[0]))


pixel_kd_loss = kd_loss  # Eq. 4 per pixel: summed over classes and pixels, x T^2, / (B H W)
seg_cross_entropy = functools.partial(F.cross_entropy, ignore_index=IGNORE_INDEX)  # labelled pixels
# Eq. 5 per pixel (masks as targets), L_F (Eq. 3) over the six levels of the two BiFPN stacks
frskd_seg_loss = functools.partial(frskd_loss, cross_entropy=seg_cross_entropy)


def distillation_ramp(epoch, warmup, epochs):
    """Factor on alpha and beta in 0-based `epoch` (official warm-up and annealing): 0 for the first
    `warmup` epochs, then exp(-5 (1 - t)^2), t = (epoch + 1 - warmup) / (epochs - warmup)."""
    if epoch < warmup or epochs <= warmup:
        return 0.0 if epoch < warmup else 1.0
    t = min(epoch + 1 - warmup, epochs - warmup) / (epochs - warmup)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def build_seg_net(args, ctx):
    """Backbone from --init (timm tag, NAME=PATH, or 'none': random), FPN, BiFPN stacks, heads; the new
    layers' initial weights depend on --seed alone (the same on every rank)."""
    with seeded(args.seed):
        random_init = args.init == "none"
        model, extra = create(args.arch if random_init else init_spec(args.init, args.arch), 0,
                              pretrained_head="none" if random_init else "reset")
        net = FRSKDSegNet(EfficientNetTaps(model), args.num_classes, args.bifpn_channels,
                          args.bifpn_layers, args.repeat, self_teacher=not args.baseline)
    weights = "random init" if args.init == "none" else describe_data_config(extra)
    ctx.print(f"backbone {args.arch} ({weights}); features after blocks {net.backbone.taps} "
              f"({net.backbone.channels} channels), BiFPN width {args.bifpn_channels}; inputs normalized "
              f"with mean {args.mean}, std {args.std}")
    return net


def prepare_segmentation(args, ctx):
    """Read the data -> train_one(run_args, out), which returns train()'s result."""
    root = demo.ensure_segmentation_data(ctx) if args.data == "demo" else args.data
    train_pairs, val_pairs, layout = find_pairs(root)
    check_pairs(train_pairs + val_pairs, args.num_classes)
    ctx.print(f"{layout} {root}: {len(train_pairs)} train / {len(val_pairs)} val images, "
              f"{args.num_classes} classes")
    train_set = SegmentationSet(train_pairs, RandomScaleCropFlip(args.crop_size, args.crop_size))
    val_sets = {"val": eval_loader(SegmentationSet(val_pairs, ResizePair(args.crop_size)),
                                   args.batch_size // (ctx.world * args.accum_steps), args.workers, ctx)}
    return lambda run_args, out: train(
        run_args, ctx, build_seg_net(run_args, ctx), train_set, val_sets, run_args.num_classes, out,
        (seg_cross_entropy, frskd_seg_loss),
        lambda epoch: distillation_ramp(epoch, run_args.warmup_epochs, run_args.epochs))


SEG_RECIPES = {  # merged into RECIPES; --task segmentation picks "seg", with --data demo "seg_demo"
    # the official segmentation code run with its README command (batch 16, gradients accumulated to 32)
    "seg": dict(arch="tf_efficientnet_b0", epochs=60, warmup_epochs=40, milestones=[40], batch_size=32,
                accum_steps=2, lr=0.01, wd=5e-4, crop_size=512, num_classes=21, alpha=1.0, beta=50.0,
                temperature=1.0, repeat=2, bifpn_layers=3, clip_value=2.0, workers=4, mean=IMAGENET_MEAN,
                std=IMAGENET_STD)}
# laptop-sized: 64 px scenes, a tiny EfficientNet from random init, 2/3 of the epochs warm-up as official
SEG_RECIPES["seg_demo"] = dict(SEG_RECIPES["seg"], arch="test_efficientnet", init="none", epochs=10,
                               warmup_epochs=7, milestones=[7], batch_size=8, accum_steps=1, lr=0.02,
                               crop_size=demo.SEG_IMAGE_SIZE, num_classes=len(demo.SEG_CLASSES), workers=2)
SEG_BIFPN_WIDTHS = {"efficientnet_b0": 64, "efficientnet_b1": 88, "efficientnet_b2": 112}  # official outc
SEGMENTATION_ONLY = [  # declared as FLAGS below (TASK_ONLY)
    ("--init", str, "backbone weights: timm tag (default ARCH.aa_in1k for tf_efficientnet_b*), "
     "NAME=PATH, or 'none' (random init)"),
    ("--num-classes", flags.positive_int, "classes incl. background (VOC: 21)"),
    ("--bifpn-layers", flags.positive_int, "the classifier network's BiFPN layers (VOC: 3)"),
    ("--accum-steps", flags.positive_int, "micro-batches whose gradients make one SGD step (VOC: 2)"),
    ("--clip-value", flags.positive_float, "gradient value clipping (VOC: 2.0)"),
    ("--crop-size", flags.positive_int, "training crop and validation size (VOC: 512)"),
]


# --- Command line: recipes, flags, main -----------------------------------------------------------
IMAGENET = dict(arch="resnet18", epochs=90, batch_size=256, milestones=[30, 60], alpha=1.0, beta=200.0,
                input_size=224, crop_pct=0.875, augment="rrc", mean=IMAGENET_MEAN, std=IMAGENET_STD, workers=8)
# official Tiny-ImageNet loader: RandomResizedCrop(32) + flip, evaluation resized to 32
TINY_IMAGENET = dict(arch="cifar_resnet18", epochs=200, batch_size=128, milestones=[100, 150], alpha=3.0,
                     beta=100.0, input_size=32, crop_pct=1.0, augment="rrc", mean=[0.4802, 0.4481, 0.3975],
                     std=[0.2770, 0.2691, 0.2821], workers=4)
RECIPES = {  # the paper's Implementation details, with the official data pipelines (mean/std, augmentation)
    "imagenet": IMAGENET,
    "cifar": dict(TINY_IMAGENET, alpha=2.0, augment="pad_crop", mean=[0.4914, 0.4822, 0.4465],
                  std=[0.2023, 0.1994, 0.2010]),
    "tinyimagenet": TINY_IMAGENET,
    # fine-grained (CUB200, MIT67, Dogs, Stanford40): the standard ResNet-18 at 224, batch 32
    "fgvr": dict(IMAGENET, epochs=200, batch_size=32, milestones=[100, 150]),
    # Tiny-ImageNet's for 2 CPU cores (WRN-16-1: its BiFPNc has Table 6's proportions), with a distillation
    # warm-up to the first lr drop, NOT official: 3 seeds +4.5 vs baseline, without it -12.1 (docs/frskd.md)
    "demo": dict(TINY_IMAGENET, arch="wrn16_1", epochs=16, batch_size=64, milestones=[8, 12], warmup_epochs=8,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, workers=2),
    **SEG_RECIPES,
}
FLAGS = [  # flag, kind (a common.flags parser: it checks the value), choices or action, help[, extras]
    ("--data", str, "ImageFolder root with train/ and val/, 'demo', or for segmentation a VOCdevkit or "
     "DIR/{train,val}/{images,masks}", dict(required=True)),
    ("--task", ["classification", "segmentation"], "(Sec. 4.2)", dict(default="classification")),
    ("--out", str, "output folder (default: a fresh runs/frskd_<recipe>[_baseline]/<date-time>)"),
    ("--arch", str, "cifar_resnet18, wrn16_2, a timm CNN (resnet18, ...); segmentation: EfficientNet"),
    ("--width", flags.positive_float, "self-teacher channel width w, d_i = w c_i", dict(default=2.0)),
    ("--bifpn-channels", flags.positive_int, "Table 6's equal-width BiFPN (segmentation: B0 64, B1 88)"),
    ("--repeat", flags.positive_int, "self-teacher BiFPN layers (segmentation: 2)", dict(default=1)),
    ("--alpha", flags.nonneg_float, "soft-label distillation weight of Eq. 5"),
    ("--beta", flags.nonneg_float, "feature distillation weight of Eq. 5; 0 = FRSKD\\F"),
    ("--temperature", flags.positive_float, "K of Eq. 4 (segmentation: 1)", dict(default=4.0)),
    ("--baseline", "store_true", "plain cross-entropy, no self-teacher"),
    ("--warmup-epochs", flags.nonneg_int, "epochs with alpha = beta = 0, then full weight (classification; "
     "0 = official) or the official ramp (segmentation; VOC: 40)", dict(default=0)),
    ("--epochs", flags.positive_int, ""),
    ("--batch-size", flags.positive_int, "global batch of one SGD step"),
    ("--lr", flags.positive_float, "learning rate (segmentation: 0.01)", dict(default=0.1)),
    ("--wd", flags.nonneg_float, "weight decay (segmentation: 5e-4)", dict(default=1e-4)),
    ("--wd-scope", ["all", "weights"], "all (official), or exempt 1-d parameters", dict(default="all")),
    ("--momentum", flags.fraction_below_one, "", dict(default=0.9)),
    ("--milestones", flags.positive_int, "epochs where lr is multiplied by 0.1", dict(nargs="+")),
    ("--mean", flags.fraction, "per-channel normalization mean", dict(nargs=3)),
    ("--std", flags.positive_float, "per-channel normalization std", dict(nargs=3)),
]
TASK_ONLY = {"classification": [  # a flag of one task only, typed for the other task, is refused
    ("--recipe", ["imagenet", "cifar", "tinyimagenet", "fgvr"], "imagenet if not given (demo: its own)"),
    ("--val-data", "append", "extra ImageFolder to evaluate on", dict(default=[])),
    ("--mixup", flags.nonneg_float, "mixup alpha (Table 8; 0 = off)", dict(default=0.0)),
    ("--cutmix", flags.nonneg_float, "cutmix alpha (Table 8; 0 = off)", dict(default=0.0)),
    ("--input-size", flags.positive_int, ""),
    ("--crop-pct", flags.open_fraction, "evaluation center crop"),
    ("--augment", ["rrc", "pad_crop"], "random-resized crop, or CIFAR pad-4 crop"),
], "segmentation": SEGMENTATION_ONLY}


def parse_args(argv=None):
    only = [(flag, kind, f"{task} only" + (text and f": {text}"), *more)
            for task, rows in TASK_ONLY.items() for flag, kind, text, *more in rows]
    p = flags.build_parser(__doc__.split("\n\n")[0] + " Flags without a default take the recipe's value "
                           "(RECIPES).", FLAGS + only)
    known = p.parse_known_args(argv)[0]
    seg, demo_data = known.task == "segmentation", known.data == "demo"
    name = ("seg_demo" if demo_data else "seg") if seg else \
        known.recipe or ("demo" if demo_data else "imagenet")
    p.set_defaults(**RECIPES[name], recipe_name=name)  # the recipe's values for the flags not given
    args = p.parse_args(argv)
    flags.refuse_ignored(flags.given(p, argv), [(task != args.task, f"--task {args.task}", [
        row[0][2:].replace("-", "_") for row in rows]) for task, rows in TASK_ONLY.items()])
    if args.warmup_epochs and not args.baseline and args.warmup_epochs >= args.epochs:
        p.error(f"--epochs {args.epochs} ends within the distillation warm-up of {args.warmup_epochs} epochs "
                f"(alpha = beta = 0 until then): FRSKD would never distil; pass more --epochs or a smaller "
                f"--warmup-epochs")
    if seg:  # the BiFPN width and the backbone's weights
        arch = args.arch.split(".")[0]
        args.bifpn_channels = args.bifpn_channels or SEG_BIFPN_WIDTHS.get(arch.removeprefix("tf_"), 64)
        if args.init is None:  # ImageNet weights; timm's default B0 tag is trained on JFT
            tf_b = arch.startswith("tf_efficientnet_b") and "." not in args.arch
            args.init = f"{arch}.aa_in1k" if tf_b else args.arch
    return args


def run(args, ctx):
    """Train the run the flags ask for (the demo: then the baseline, in OUT/frskd and OUT/baseline)."""
    seg = args.task == "segmentation"
    metric, shown = ("miou", "mIoU") if seg else ("top1", "top-1")
    if args.batch_size % (ctx.world * (args.accum_steps or 1)):
        raise SystemExit(f"error: --batch-size {args.batch_size} must be divisible by the {ctx.world} "
                         "processes" + (f" x --accum-steps {args.accum_steps}" if seg else ""))
    start = time.time()
    train_one = (prepare_segmentation if seg else prepare_classification)(args, ctx)
    base = f"runs/frskd_{args.recipe_name}" + ("_baseline" if args.baseline else "")
    out = ckpt.resolve_out(args.out, base, ctx, args.resume)
    runs = [("baseline" if args.baseline else "frskd", args)]
    if args.data == "demo" and not args.baseline:  # the demo also trains the baseline (same epochs)
        runs.append(("baseline", argparse.Namespace(**dict(vars(args), baseline=True))))
    results, parts, trained = {}, [], False
    for name, a in runs:
        ctx.print(f"training {name}: {a.task}, {a.arch}, {a.epochs} epochs" + ("" if a.baseline else
                  f", alpha {a.alpha}, beta {a.beta}" + ("" if seg else f", w {a.width}")
                  + (f" after {a.warmup_epochs} warm-up epochs" if a.warmup_epochs else "")))
        sub = out if len(runs) == 1 else os.path.join(out, name)
        metrics, best, seconds = train_one(a, sub)
        trained = trained or bool(metrics)  # {}: --resume auto found this run finished
        final = ckpt.final_metrics(metrics, sub)
        results[name] = {"final": final, f"best_{metric}": best, "train_time": seconds}
        teacher = final.get(f"val_self_teacher_{metric}")
        teacher = "" if teacher is None else f", self-teacher {teacher:.2f}%"
        parts.append(f"{name} classifier {shown} {final.get(f'val_{metric}', math.nan):.2f}% "
                     f"(best {best:.2f}%, {seconds:.0f}s){teacher}")
    if not trained:  # every run had finished: keep their summary
        return ckpt.nothing_to_do(ctx, "FRSKD", out, args.epochs)
    ckpt.write_summary(ctx, out, results, f"FRSKD {'segmentation ' if seg else ''}summary: {args.arch}, "
                       f"{args.epochs} epochs: {', '.join(parts)}; total {time.time() - start:.0f}s, out {out}")


def main(argv=None):
    args = parse_args(argv)
    run_main(lambda ctx: run(args, ctx), args, (DataError, ModelError, FloatingPointError))


if __name__ == "__main__":
    main()
