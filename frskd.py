"""FRSKD: refine feature maps with a self-teacher network, distill them back (classification).

Paper: Mingi Ji, Seungjae Shin, Seunghyun Hwang, Gibeom Park, Il-Chul Moon, "Refine Myself by
Teaching Myself: Feature Refinement via Self-Knowledge Distillation", CVPR 2021 (arXiv 2103.08273);
shared/papers/frskd.txt.

A small self-teacher (BiFPNc) reads the classifier's stage features F_i, refines them through a
top-down and a bottom-up path into T_i, and predicts the class itself. The classifier then learns
from the refined maps (attention transfer) and from the self-teacher's soft label; both networks
train together from scratch with one optimizer.

Equation map:
  Eq. 1   L_i = Conv(F_i; d_i), d_i = w c_i                 -> BiFPNcLayer.lateral
  Eq. 2   P_i = Conv(w1 L_i + w2 Resize(P_{i+1}))           -> BiFPNcLayer.forward (top-down)
          T_i = Conv(w1 L'_i + w2 P_i + w3 Resize(T_{i-1})) -> BiFPNcLayer.forward (bottom-up)
  Eq. 3   L_F = sum_i || phi(T_i) - phi(F_i) ||             -> attention_loss()
  Eq. 4   L_KD = KL(softmax(t / K) || softmax(c / K))        -> frskd_loss()
  Eq. 5   L = CE(c) + CE(t) + alpha L_KD + beta L_F          -> frskd_loss()

Commands:
  CPU demo   python frskd.py --data demo                       (FRSKD, then the plain-CE baseline)
  CIFAR      python frskd.py --data /cifar100 --recipe cifar   (ImageFolder of 32x32 images; CIFAR ResNet-18)
             python frskd.py --data /cifar100 --recipe cifar --arch wrn16_2
  1 GPU      python frskd.py --data /imagenet --amp            (ResNet-18, batch 256)
  8 GPUs     torchrun --nproc_per_node=8 frskd.py --data /imagenet --amp
  2 nodes    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
                 frskd.py --data /imagenet --amp
--batch-size is global (all processes together). --beta 0 gives FRSKD\\F (no feature distillation).
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision import transforms

from common import ckpt, demo
from common.data import (DataError, eval_loader, eval_transform, evaluate, image_folder, loader, mix_batch,
                         train_transform)
from common.dist import cleanup, seed_everything, setup, unwrap
from common.models import ModelError, cifar_stem, create, make_optimizer, normalize, param_groups

RECIPES = {  # Implementation details of the paper; the demo is a laptop-sized CIFAR-like run
    "imagenet": dict(arch="resnet18", epochs=90, batch_size=256, milestones=[30, 60], alpha=1.0, beta=200.0,
                     input_size=224, crop_pct=0.875, augment="rrc", workers=8),
    "cifar": dict(arch="cifar_resnet18", epochs=200, batch_size=128, milestones=[100, 150], alpha=2.0,
                  beta=100.0, input_size=32, crop_pct=1.0, augment="pad_crop", workers=4),
    "demo": dict(arch="test_resnet", epochs=16, batch_size=64, milestones=[8, 12], alpha=2.0, beta=100.0,
                 input_size=64, crop_pct=1.0, augment="rrc", workers=2),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and val/, or 'demo'")
    p.add_argument("--val-data", action="append", default=[], help="extra ImageFolder to evaluate on")
    p.add_argument("--recipe", choices=["imagenet", "cifar"], help="default: imagenet (demo: its own)")
    p.add_argument("--out", help="output folder (default runs/frskd_<recipe>)")
    p.add_argument("--arch", help="cifar_resnet18, wrn16_2, or a timm CNN (resnet18, resnet34, ...)")
    p.add_argument("--width", type=float, default=2.0, help="self-teacher channel width w (d_i = w c_i)")
    p.add_argument("--bifpn-channels", type=int, help="equal-width BiFPN variant (Table 6) instead of BiFPNc")
    p.add_argument("--repeat", type=int, default=1, help="stacked BiFPNc layers")
    p.add_argument("--alpha", type=float, help="soft-label distillation weight (Eq. 5)")
    p.add_argument("--beta", type=float, help="feature distillation weight (Eq. 5); 0 = FRSKD\\F")
    p.add_argument("--temperature", type=float, default=4.0, help="K of Eq. 4")
    p.add_argument("--baseline", action="store_true", help="plain cross-entropy, no self-teacher")
    p.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (Table 8; 0 = off)")
    p.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (Table 8; 0 = off)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--wd", type=float, default=1e-4)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--milestones", type=int, nargs="+", help="epochs where lr is multiplied by 0.1")
    p.add_argument("--input-size", type=int)
    p.add_argument("--crop-pct", type=float)
    p.add_argument("--augment", choices=["rrc", "pad_crop"], help="random-resized crop, or CIFAR pad-4 crop")
    p.add_argument("--workers", type=int)
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", help="checkpoint to continue, or 'auto' for OUT/last.pth")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--stop-epoch", type=int, help="stop after this epoch (continue with --resume auto)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)
    recipe = "demo" if args.data == "demo" and args.recipe is None else (args.recipe or "imagenet")
    for key, value in RECIPES[recipe].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.out = args.out or f"runs/frskd_{recipe}"
    return args


# ----------------------------------------------------------------------------------------------
# Classifiers: stage features F_1..F_n and logits from one forward
# ----------------------------------------------------------------------------------------------
class WideBasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        return self.conv2(F.relu(self.bn2(out))) + shortcut


class WideResNet(nn.Module):
    """WRN-depth-k for 32x32 inputs (Zagoruyko & Komodakis); WRN-16-2: stages of 32, 64, 128 channels."""

    def __init__(self, num_classes, depth=16, widen=2):
        super().__init__()
        blocks = (depth - 4) // 6
        widths = [16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        cin, stages = 16, []
        for i, width in enumerate(widths):
            stages.append(nn.Sequential(*[WideBasicBlock(cin if b == 0 else width, width, (1 if i == 0 else 2) if b == 0 else 1)
                                          for b in range(blocks)]))
            cin = width
        self.stages = nn.ModuleList(stages)
        self.bn, self.fc = nn.BatchNorm2d(cin), nn.Linear(cin, num_classes)
        self.stage_channels = widths

    def forward_stages(self, x):
        features = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features, self.fc(F.relu(self.bn(x)).mean(dim=(2, 3)))

    def forward(self, x):
        return self.forward_stages(x)[1]


class TimmStages(nn.Module):
    """A timm CNN whose stage features (all but the stem) come from forward_intermediates."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.indices = [i for i, info in enumerate(model.feature_info) if info["reduction"] >= 4]
        self.stage_channels = [model.feature_info[i]["num_chs"] for i in self.indices]

    def forward_stages(self, x):
        final, features = self.model.forward_intermediates(x, indices=self.indices)
        return features, self.model.forward_head(final)

    def forward(self, x):
        return self.model(x)


def make_classifier(arch, num_classes):
    if arch == "wrn16_2":
        return WideResNet(num_classes, 16, 2)
    if arch.startswith("cifar_"):  # CIFAR ResNet: 3x3 stride-1 stem, no max-pool
        return TimmStages(create(arch[len("cifar_"):], num_classes, pretrained_head="none", adapt=cifar_stem)[0])
    return TimmStages(create(arch, num_classes, pretrained_head="none")[0])


# ----------------------------------------------------------------------------------------------
# Self-teacher: BiFPNc (Sec. 3.1)
# ----------------------------------------------------------------------------------------------
def conv_bn_relu(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def separable_node(channels):
    """A node's Conv: 2 x (depthwise 3x3 -> pointwise 1x1 -> BN), ReLU between (official structure)."""
    def separable():
        return [nn.Conv2d(channels, channels, 3, 1, 1, groups=channels, bias=False),
                nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels)]
    return nn.Sequential(*separable(), nn.ReLU(inplace=True), *separable())


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


class BiFPNcLayer(nn.Module):
    """One top-down + bottom-up pass over n levels (level 0 = shallowest), widths d_i per level."""

    def __init__(self, in_channels, widths):
        super().__init__()
        n = len(widths)
        self.lateral = nn.ModuleList(conv_bn_relu(c, d) for c, d in zip(in_channels, widths))  # Eq. 1: L_i
        # L'_i: separate laterals for the bottom-up path (none for level 0, where T_1 = P_1)
        self.lateral_up = nn.ModuleList(conv_bn_relu(c, d) for c, d in zip(in_channels[1:], widths[1:]))
        self.resize_down = nn.ModuleList(conv_bn_relu(widths[i + 1], widths[i]) for i in range(n - 1))
        self.resize_up = nn.ModuleList(conv_bn_relu(widths[i - 1], widths[i]) for i in range(1, n))
        self.td_fuse = nn.ModuleList(FastFusion(2) for _ in range(n - 1))
        self.td_node = nn.ModuleList(separable_node(widths[i]) for i in range(n - 1))
        self.bu_fuse = nn.ModuleList(FastFusion(3 if i < n - 1 else 2) for i in range(1, n))
        self.bu_node = nn.ModuleList(separable_node(widths[i]) for i in range(1, n))

    def forward(self, features):
        n = len(features)
        lateral = [conv(f) for conv, f in zip(self.lateral, features)]
        lateral_up = [None] + [conv(f) for conv, f in zip(self.lateral_up, features[1:])]
        top_down = [None] * n
        top_down[-1] = lateral[-1]  # P_n = L_n
        for i in reversed(range(n - 1)):
            # nearest upsampling as the official code (the paper says bilinear)
            upsampled = F.interpolate(top_down[i + 1], size=lateral[i].shape[-2:], mode="nearest")
            upsampled = self.resize_down[i](upsampled)
            top_down[i] = self.td_node[i](self.td_fuse[i]([lateral[i], upsampled]))  # Eq. 2: P_i
        refined = [top_down[0]] + [None] * (n - 1)  # T_1 = P_1
        for i in range(1, n):
            down = F.max_pool2d(refined[i - 1], 3, 2, 1)  # 3x3/2 max-pool, "same" padding
            if down.shape[-2:] != lateral[i].shape[-2:]:
                down = F.interpolate(down, size=lateral[i].shape[-2:], mode="nearest")
            down = self.resize_up[i - 1](down)
            inputs = [lateral_up[i], top_down[i], down] if i < n - 1 else [lateral_up[i], down]
            refined[i] = self.bu_node[i - 1](self.bu_fuse[i - 1](inputs))  # Eq. 2: T_i
        return refined


class BiFPNc(nn.Module):
    """Self-teacher: `repeat` BiFPNc layers on the classifier's stage features, then
    global average pooling of the deepest refined map and a linear classifier.

    in_channels: the classifier's stage channels c_i; widths d_i = width x c_i, or all equal to
    `channels` for the plain BiFPN of Table 6.
    """

    def __init__(self, in_channels, num_classes, width=2.0, repeat=1, channels=None):
        super().__init__()
        widths = [channels] * len(in_channels) if channels else [int(round(width * c)) for c in in_channels]
        self.layers = nn.ModuleList([BiFPNcLayer(in_channels, widths)] +
                                    [BiFPNcLayer(widths, widths) for _ in range(repeat - 1)])
        self.widths = widths
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, features):
        for layer in self.layers:
            features = layer(features)
        return features, self.fc(features[-1].mean(dim=(2, 3)))


class FRSKDNet(nn.Module):
    """Classifier + self-teacher in one module, so DDP sees the whole forward."""

    def __init__(self, classifier, self_teacher):
        super().__init__()
        self.classifier, self.self_teacher = classifier, self_teacher

    def forward(self, x):
        features, logits = self.classifier.forward_stages(x)
        if self.self_teacher is None:
            return features, logits, None, None
        # classifier features enter the self-teacher undetached: its CE also trains the backbone (official)
        refined, teacher_logits = self.self_teacher(features)
        return features, logits, refined, teacher_logits


class BothLogits(nn.Module):
    """(classifier logits, self-teacher logits) of one forward, for evaluation."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        _, logits, _, teacher_logits = self.net(x)
        return logits, teacher_logits


# ----------------------------------------------------------------------------------------------
# Losses (Sec. 3.2)
# ----------------------------------------------------------------------------------------------
def attention_map(feature):
    """phi(f): channel mean of f^2, flattened, L2-normalized (attention transfer)."""
    return F.normalize(feature.float().pow(2).mean(dim=1).flatten(1), dim=1)


def attention_loss(features, refined):
    """Eq. 3 as in the official code: sum over levels of the mean squared difference of attention
    maps (the paper writes an L2 norm); the refined maps are targets, detached."""
    return sum((attention_map(f) - attention_map(t.detach())).pow(2).mean() for f, t in zip(features, refined))


def frskd_loss(logits, teacher_logits, features, refined, targets, alpha, beta, temperature):
    """Eq. 5: CE(c) + CE(t) + alpha K^2 KL(softmax(t/K) || softmax(c/K)) + beta L_F.

    `targets` are class probabilities [B, C] (one-hot, or mixed by mixup/cutmix). Returns the total
    and its four terms."""
    ce_classifier = -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()
    ce_teacher = -(targets * F.log_softmax(teacher_logits, dim=1)).sum(1).mean()
    kd = F.kl_div(F.log_softmax(logits / temperature, dim=1),  # Eq. 4, teacher detached, batch mean x K^2
                  F.softmax(teacher_logits.detach() / temperature, dim=1), reduction="batchmean") * temperature ** 2
    feature = attention_loss(features, refined)  # Eq. 3
    total = ce_classifier + ce_teacher + alpha * kd + beta * feature
    return total, (ce_classifier, ce_teacher, kd, feature)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def build_net(args, num_classes):
    torch.manual_seed(args.seed)
    classifier = make_classifier(args.arch, num_classes)
    self_teacher = None if args.baseline else BiFPNc(classifier.stage_channels, num_classes, args.width,
                                                     args.repeat, args.bifpn_channels)
    return FRSKDNet(classifier, self_teacher)


def train(args, ctx, train_set, val_sets, cfg, out):
    num_classes = len(train_set.classes)
    net = build_net(args, num_classes).to(ctx.device)
    if ctx.device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    if ctx.distributed:
        net = DistributedDataParallel(net, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    optimizer = make_optimizer("sgd", param_groups(unwrap(net), args.wd), args.lr, args.momentum)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.milestones, 0.1)
    scaler = torch.amp.GradScaler(enabled=args.amp and ctx.device.type == "cuda")
    mix_generator = torch.Generator().manual_seed(args.seed + ctx.rank)
    checkpoint = ckpt.Checkpointer(out, ctx, args.resume, args.overwrite, model=unwrap(net), optimizer=optimizer,
                                   scheduler=scheduler, scaler=scaler, mix_generator=mix_generator)
    start_epoch, best = checkpoint.restore()
    sampler = torch.utils.data.DistributedSampler(train_set, ctx.world, ctx.rank, shuffle=True, seed=args.seed,
                                                  drop_last=True)
    data = loader(train_set, args.batch_size // ctx.world, args.workers, sampler, ctx.device, drop_last=True)
    metrics, run_start = {}, time.time()
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        net.train()
        lr = optimizer.param_groups[0]["lr"]
        sums, epoch_start = np.zeros(7), time.time()  # images, loss, ce_c, ce_t, kd, feature, correct
        for images, labels in ctx.bar(data, desc=f"epoch {epoch + 1}/{args.epochs}"):
            images = normalize(images.to(ctx.device, non_blocking=True), cfg["mean"], cfg["std"])
            labels = labels.to(ctx.device, non_blocking=True)
            targets = F.one_hot(labels, num_classes).float()
            if args.mixup > 0 or args.cutmix > 0:
                images, targets = mix_batch(images, targets, args.mixup, args.cutmix, mix_generator)
            with torch.autocast(ctx.device.type, enabled=args.amp and ctx.device.type == "cuda"):
                features, logits, refined, teacher_logits = net(images)
            logits = logits.float()
            if args.baseline:
                loss = -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()
                terms = (loss, torch.zeros(()), torch.zeros(()), torch.zeros(()))
            else:
                loss, terms = frskd_loss(logits, teacher_logits.float(), features, refined, targets,
                                         args.alpha, args.beta, args.temperature)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            n = len(labels)
            sums += [n, loss.item() * n, *(t.item() * n for t in terms), (logits.argmax(1) == labels).sum().item()]
        scheduler.step()
        seen, loss_sum, ce_c, ce_t, kd, feat, correct = ctx.all_reduce_sum(sums.tolist())
        ckpt.check_finite(loss_sum, epoch, out)
        metrics = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / seen, "train_ce": ce_c / seen, "train_ce_teacher": ce_t / seen, "train_kd": kd / seen,
                   "train_feature": feat / seen, "train_top1": 100 * correct / seen,
                   "train_time": time.time() - epoch_start}
        model = unwrap(net)
        for name, val_loader in val_sets.items():
            if model.self_teacher is None:
                result = evaluate(model.classifier, val_loader, ctx, cfg["mean"], cfg["std"], args.amp, desc=name)
            else:  # classifier and self-teacher scored in one pass
                result, teacher_result = evaluate(BothLogits(model), val_loader, ctx, cfg["mean"], cfg["std"],
                                                  args.amp, desc=name, heads=2)
                metrics[f"{name}_self_teacher_top1"] = teacher_result["top1"]
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
    if args.batch_size % ctx.world:
        raise SystemExit(f"error: --batch-size {args.batch_size} must be divisible by the {ctx.world} processes")
    if args.alpha < 0 or args.beta < 0 or args.temperature <= 0 or args.repeat < 1 or args.width <= 0:
        raise SystemExit("error: need --alpha >= 0, --beta >= 0, --temperature > 0, --repeat >= 1, --width > 0")
    seed_everything(args.seed, ctx.rank)
    start = time.time()
    root = demo.ensure_data(ctx) if args.data == "demo" else args.data
    cfg = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "input_size": args.input_size,
           "crop_pct": args.crop_pct, "interpolation": "bilinear"}
    if args.augment == "pad_crop":
        augment = transforms.Compose([transforms.RandomCrop(args.input_size, padding=4), transforms.RandomHorizontalFlip(),
                                      transforms.PILToTensor()])
    else:
        augment = train_transform(args.input_size)
    train_set = image_folder(root, "train", augment)
    val_transform = eval_transform(args.input_size, args.crop_pct)
    val_sets = {"val": eval_loader(image_folder(root, "val", val_transform, train_set.classes),
                                   args.batch_size, args.workers, ctx)}
    for i, extra in enumerate(args.val_data):
        val_sets[f"extra{i}"] = eval_loader(image_folder(extra, "", val_transform, train_set.classes),
                                            args.batch_size, args.workers, ctx)
    runs = [("baseline" if args.baseline else "frskd", args)]
    if args.data == "demo" and not args.baseline:  # the demo also trains the plain-CE baseline
        runs.append(("baseline", argparse.Namespace(**dict(vars(args), baseline=True))))
    results = {}
    for name, run_args in runs:
        out = args.out if len(runs) == 1 else os.path.join(args.out, name)
        ctx.print(f"training {name}: {run_args.arch}, {run_args.epochs} epochs"
                  + ("" if run_args.baseline else f", alpha {run_args.alpha}, beta {run_args.beta}, w {run_args.width}"))
        metrics, best, seconds = train(run_args, ctx, train_set, val_sets, cfg, out)
        results[name] = {"final": metrics, "best_top1": best, "train_time": seconds}
    line = ", ".join(f"{name} classifier top-1 {r['final'].get('val_top1', float('nan')):.2f}% "
                     f"(best {r['best_top1']:.2f}%, {r['train_time']:.0f}s)"
                     + (f", self-teacher {r['final']['val_self_teacher_top1']:.2f}%"
                        if "val_self_teacher_top1" in r["final"] else "") for name, r in results.items())
    ctx.print(f"FRSKD summary: {args.arch}, {args.epochs} epochs: {line}; total {time.time() - start:.0f}s, out {args.out}")
    if ctx.main:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
