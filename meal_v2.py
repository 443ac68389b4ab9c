"""MEAL V2: distill a teacher ensemble into a well-initialized student, with a discriminator.

Paper: Zhiqiang Shen and Marios Savvides, "MEAL V2: Boosting Vanilla ResNet-50 to 80%+ Top-1
Accuracy on ImageNet without Tricks", 2020 (arXiv 2009.08453); shared/papers/meal_v2.txt. Official
code: szq0214/MEAL-V2 (train.py: online teachers; FKD_train.py: stored labels). Fast MEAL V2 (FKD
paper Table 4, --labels): the same training from an FKD label store of the same teacher ensemble.
The student starts from pretrained weights and learns only from the teachers' averaged softmax (no
hard labels, no weight decay); a small discriminator tells teacher from student outputs.

Equation map:
  Eq. 1   p_e = (1/K) sum_t p_t                                     -> ensemble_average()
  Eq. 2-3 L_CE = -(1/N) sum_i p_e(x_i) log p_S(x_i)                  -> soft_cross_entropy()
  Eq. 4   L_D = -(1/N) sum_i [y_i log p_D + (1 - y_i) log(1 - p_D)]  -> discriminator_loss()
  Eq. 5   p_D = sigmoid(f(x)), f = three fully connected layers      -> Discriminator
  update  L_CE + L_D under one optimizer (official)                  -> meal_step()

The discriminator sees the student's logits vs the teachers' mean logits online (paper, train.py),
the student's softmax through the store's codec vs the stored p_e with --labels (FKD_train.py).
--disc-rule cooperative (default, official): ONE SGD minimizes L_CE + L_D over student and
discriminator, so the student also descends the discriminator's BCE, which slows its mimicking of
the teachers (Sec. 6.3 / App. B); gan: not what the paper ran. --no-disc: Fig. 9's ablation;
--no-teachers: the hard-label CE control (docs/meal_v2.md: recipes, schedules, 380 px, released labels).

Commands (--batch-size is global over all processes and counts crops; lr = 0.01 x batch / 512):
  CPU demo   python meal_v2.py --data demo                                       (online teachers)
             python meal_v2.py --data demo --no-teachers                  (CE control, same init)
             python fkd.py --data demo --mode label --codec full --teacher test_resnet \\
                 --teacher test_efficientnet --labels runs/meal_v2_demo_labels
             python meal_v2.py --data demo --labels runs/meal_v2_demo_labels        (Fast MEAL V2)
  1 GPU      python meal_v2.py --data /imagenet --batch-size 128 --amp              (lr 0.0025)
  8 GPUs     torchrun --nproc_per_node=8 meal_v2.py --data /imagenet --amp      (paper: 80.67%)
  2 nodes    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
                 meal_v2.py --data /imagenet --amp --out /shared/runs/meal_v2
  Fast       torchrun --nproc_per_node=8 fkd.py --data /imagenet --mode label --stored-crops 200 \\
                 --codec ms --k 5 --crop-scale 0.08 1 --teacher senet154.gluon_in1k \\
                 --teacher resnet152s.gluon_in1k --labels /data/meal_labels     (~7.4 GB on disk)
             torchrun --nproc_per_node=8 meal_v2.py --data /imagenet --labels /data/meal_labels --amp
"""
import argparse
import contextlib
import math
import os
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler

from common import ckpt, demo, flags
from common.data import (DataError, FreshCrops, TaggedSampler, eval_loader, eval_sets, eval_transform, evaluate,
                         evaluate_sets, image_folder, loader, to_device)
from common.dist import (EpochSums, derive_seed, maybe_compile, run_main, seed_rank_epoch, seeded, unwrap,
                         wrap_ddp)
from common.labels import (LabelStore, StoreError, StoredCrops, decode, decode_stored_batch, encode,
                           free_bytes, human_bytes, image_list_hash, teacher_identity)
from common.models import (ModelError, create, describe_data_config, init_spec, load_teachers,
                           make_optimizer, normalize, param_groups, parse_spec, teacher_logits)


# ---------- The method: the teachers' average, the discriminator, the losses ---------------------
def ensemble_average(logits_per_teacher):
    """p_e, the student's target: the mean of the K teachers' softmax on the same crops (T = 1)."""
    return torch.stack([F.softmax(z, dim=1) for z in logits_per_teacher]).mean(dim=0)  # Eq. 1


class Discriminator(nn.Module):
    """Eq. 5's f: Linear C -> C/8 -> C/64 -> 2, a ReLU after each, the last too (official: 1x1 convs
    1000 -> 125 -> 15 -> 2). Widths stay >= 32 and 15: at the demo's 10 classes, 2 and 2 left the head
    dead (both outputs 0, no gradient, loss log 2) from initialization for 4 of 20 seeds."""

    def __init__(self, num_classes, shrink=8):
        super().__init__()
        hidden1 = max(num_classes // shrink, 32)  # 1000 -> 125
        hidden2 = max(hidden1 // shrink, 15)  # 125 -> 15
        self.layers = nn.Sequential(nn.Linear(num_classes, hidden1), nn.ReLU(), nn.Linear(hidden1, hidden2),
                                    nn.ReLU(), nn.Linear(hidden2, 2), nn.ReLU())

    def forward(self, x):
        return self.layers(x)  # Eq. 5: f(x); its sigmoid is taken inside BCE-with-logits (Eq. 4)


def discriminator_loss(discriminator, student, teacher):
    """Eq. 4: BCE-with-logits, student rows [1, 0], teacher rows [0, 1], the mean over all rows and
    both outputs (official). `teacher`: rows [B, C], or [(weight, rows), ...] (weights sum to 1) scored
    as sum_i weight_i x L_D(student, rows_i) (cutmix with --labels, official FKD_train.py)."""
    sides = teacher if isinstance(teacher, (list, tuple)) else [(1.0, teacher)]
    outputs = discriminator(torch.cat([student] + [rows for _, rows in sides]))  # one DDP forward
    targets = torch.zeros_like(outputs)
    targets[:len(student), 0] = 1.0  # student = [1, 0]
    targets[len(student):, 1] = 1.0  # teacher ensemble = [0, 1]
    weights = torch.cat([outputs.new_full((len(rows),), float(w)) for w, rows in [(1.0, student), *sides]])
    per_row = F.binary_cross_entropy_with_logits(outputs, targets, reduction="none").sum(dim=1)
    return (per_row * weights).sum() / (4 * len(student))  # Eq. 4: the mean over 2B rows x 2 outputs


def soft_cross_entropy(logits, targets):
    """T = 1, no hard labels; Eq. 2's KL has the same gradient (it differs by the teachers' entropy)."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()  # Eq. 3


def compress_like_store(probs, codec, k):
    """The student's probabilities through a store's codec (FKD Eq. 3-7), so the discriminator sees
    one kind of vector on both sides; differentiable for smooth, ms and mr, constant for hard."""
    return probs if codec == "full" else decode(*encode(probs, codec, k), codec, probs.shape[1])


# ---------- The training step: forward, loss, backward, optimizer step ---------------------------
def meal_step(model, discriminator, optimizer, scaler, images, targets, teacher_side, student_side=None,
              rule="cooperative", autocast=None):
    """One update of the student and the discriminator, both in `optimizer`. targets: p_e (a one-hot
    for the CE control); teacher_side: D's teacher rows or [(weight, rows), ...]; student_side: logits
    -> rows of that kind. Returns detached (loss, L_CE, L_D, logits)."""
    with autocast or contextlib.nullcontext():
        logits = model(images).float()
    kd = soft_cross_entropy(logits, targets)  # Eq. 3
    loss, d_loss = kd, torch.zeros((), device=logits.device)
    if discriminator is not None:  # without one: Eq. 3 alone (--no-disc, --no-teachers)
        student = student_side(logits) if student_side is not None else logits
        if rule == "cooperative":  # official: one summed loss, one optimizer (Eq. 3 + Eq. 4)
            d_loss = discriminator_loss(discriminator, student, teacher_side)  # Eq. 4
            loss = kd + d_loss
        elif rule == "gan":  # D descends Eq. 4 on detached student rows; the student tries to look real
            d_loss = discriminator_loss(discriminator, student.detach(), teacher_side)  # Eq. 4
            frozen = unwrap(discriminator).requires_grad_(False)  # the student's term leaves D as is
            outputs = frozen(student)
            look_real = torch.tensor([0.0, 1.0], device=outputs.device).expand_as(outputs)  # teachers'
            loss = kd + d_loss + F.binary_cross_entropy_with_logits(outputs, look_real)
            frozen.requires_grad_(True)
        else:
            raise ValueError(f"unknown discriminator rule {rule!r}; choose cooperative or gan")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)  # skipped (for every group) when a gradient is inf/nan under fp16
    scaler.update()
    return loss.detach(), kd.detach(), d_loss.detach(), logits.detach()


# ---------- The training loop and its batches ----------------------------------------------------
def cutmix(crops, views, alpha, rng):
    """CutMix (official --w-cutmix: lambda ~ Beta(alpha, alpha), box side sqrt(1 - lambda)) on uint8
    crops, the same relative box on each teacher's view, so the teachers label the mixed images
    (official online code). Returns (crops, views, perm, lam), lam = 1 - the box's share."""
    lam, perm = rng.beta(alpha, alpha), to_device(torch.from_numpy(rng.permutation(len(crops))), crops.device)
    (center_y, center_x), side = rng.random(2), math.sqrt(1.0 - lam)

    def paste(images):
        h, w = images.shape[-2:]
        cut_h, cut_w, y, x = int(h * side), int(w * side), int(center_y * h), int(center_x * w)
        y0, y1 = np.clip([y - cut_h // 2, y + cut_h // 2], 0, h)
        x0, x1 = np.clip([x - cut_w // 2, x + cut_w // 2], 0, w)
        images = images.clone()
        images[:, :, y0:y1, x0:x1] = images[perm][:, :, y0:y1, x0:x1]
        return images, 1.0 - (y1 - y0) * (x1 - x0) / (h * w)

    crops, lam = paste(crops)
    return crops, [paste(v)[0] for v in views], perm, float(lam)


def batch_inputs(batch, store, device):
    """A loader batch -> (student crops uint8 [B, 3, S, S], teacher views [uint8 per teacher],
    stored p_e [B, C] or None, image labels [B]) on `device`; B counts crops."""
    if store is not None:  # Fast MEAL V2: m stored crops per image, replayed exactly, and their p_e
        crops, indices, values, labels = batch
        views, stored = [], decode_stored_batch(indices, values, store.meta, device)
        labels = labels.repeat_interleave(crops.shape[1])
    else:  # one fresh crop per image, also resized for every teacher
        crops, views, labels = batch
        views, stored = [v.to(device, non_blocking=True).flatten(0, 1) for v in views], None
    return crops.to(device, non_blocking=True).flatten(0, 1), views, stored, labels.to(device, non_blocking=True)


def batch_targets(crops, views, stored, labels, teachers, num_classes, args, ctx, rng):
    """(crops, KD targets, the discriminator's teacher side) of one batch, cutmix applied if on."""
    perm = None
    if args.cutmix > 0:
        crops, views, perm, lam = cutmix(crops, views, args.cutmix, rng)
    if teachers:  # online: every teacher on the (mixed) crop at its own size; D: their mean logits
        logits_t = teacher_logits(teachers, views, ctx.teacher_autocast(args)[0])
        return crops, ensemble_average(logits_t), torch.stack(logits_t).mean(dim=0)  # Eq. 1, official
    targets = stored if stored is not None else F.one_hot(labels, num_classes).float()
    if perm is None:
        return crops, targets, targets
    # labels of mixed crops: mixed by the pasted area; D scores both sources (official FKD_train.py)
    return crops, lam * targets + (1 - lam) * targets[perm], [(lam, targets), (1 - lam, targets[perm])]


def pass_plan(epochs, m, drops):
    """(first epoch, crops per image) of each pass, generated: with --labels a pass of m stored crops per
    image is m epochs (official FKD_train.py: `for epoch in range(0, epochs, m)`); no pass crosses an lr
    drop (`drops`: one or a list) or the end (each logged epoch is one epoch): the epochs left before
    either run one crop per image, as FKD's tail."""
    epoch, drops = 0, [drops] if isinstance(drops, int) else drops
    for end in sorted({min(drop, epochs) for drop in drops} | {epochs}):
        while epoch < end:
            crops = m if epoch + m <= end else 1
            yield epoch, crops
            epoch += crops


def clock(cuda):
    """A step boundary: a CUDA event (read once per epoch: no host sync per step), or perf_counter."""
    if not cuda:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def build_training(student, num_classes, args, ctx):
    """The student (and discriminator) on the device, ONE SGD holding both (official), the scaler."""
    model = student.to(ctx.device, memory_format=torch.channels_last if ctx.device.type == "cuda" else None)
    with seeded(args.seed):  # the discriminator's initial weights: the same on every rank
        discriminator = None if args.no_teachers or args.no_disc else Discriminator(num_classes).to(ctx.device)
    groups = [dict(g, base_lr=args.lr) for g in param_groups(model, args.wd)]  # base lr: the schedule's
    if discriminator is not None:  # official: the discriminator is a parameter group of the same SGD
        groups.append({"params": list(discriminator.parameters()), "weight_decay": args.wd,
                       "lr": args.d_lr or args.lr, "base_lr": args.d_lr or args.lr})
    optimizer = make_optimizer("sgd", groups, args.lr, args.momentum)
    return model, discriminator, optimizer, ctx.grad_scaler(args)


def train_loader(train_set, store, m, teachers, args, ctx):
    if store is not None:
        dataset = StoredCrops(train_set.samples, store, m, args.input_size, "bilinear", args.seed)
    else:  # the official pipeline: RandomResizedCrop (0.08, 1), flip, bilinear; a view per teacher
        views = [(ex["data_config"]["input_size"], ex["data_config"]["interpolation"]) for _, ex in teachers]
        dataset = FreshCrops(train_set.samples, 1, args.input_size, "bilinear", views, (0.08, 1.0),
                             (3 / 4, 4 / 3), args.seed)
    sampler = TaggedSampler(DistributedSampler(dataset, ctx.world, ctx.rank, seed=args.seed, drop_last=True))
    return loader(dataset, args.batch_size // (m * ctx.world), args.workers, sampler, ctx.device,
                  drop_last=True), sampler


def train(args, ctx, train_set, val_sets, store, teachers, model, discriminator, optimizer, scaler,
          checkpoint, cfg):
    num_classes, cuda = len(train_set.classes), ctx.device.type == "cuda"
    start_epoch, best = checkpoint.restore(num_classes)
    model, discriminator = maybe_compile(wrap_ddp(model, ctx), args), wrap_ddp(discriminator, ctx)
    student_side = None  # online: logits on both sides (paper, text under Eq. 5)
    if store is not None:  # the discriminator compares stored p_e with the student's softmax
        codec, k = store.meta["codec"], store.meta.get("k", 1)
        student_side = lambda logits: compress_like_store(F.softmax(logits, dim=1), codec, k)  # noqa: E731
    metrics, run_start, loader_crops = {}, time.time(), None
    for epoch, m in pass_plan(args.epochs, 1 if store is None else args.num_crops, args.lr_drop_epoch):
        if epoch < start_epoch:
            continue
        if m != loader_crops:  # a single-crop pass needs a loader of its own
            data = sampler = None
            (data, sampler), loader_crops = train_loader(train_set, store, m, teachers, args, ctx), m
        seed_rank_epoch(args.seed, ctx.rank, epoch)  # dropout, drop-path: (seed, rank, epoch) only
        cutmix_rng = np.random.default_rng(derive_seed(args.seed, ctx.rank, epoch, 1))
        sampler.set_epoch(epoch, epoch)  # tag: crops used per image so far (--labels: m per m-epoch pass)
        for group in optimizer.param_groups:  # the step schedule; official: D's lr follows it too
            group["lr"] = group["base_lr"] * 0.1 ** sum(epoch >= drop for drop in args.lr_drop_epoch)
        model.train()  # the discriminator has no train/eval behaviour and is never evaluated
        sums, epoch_start, marks = EpochSums(ctx.device), time.time(), []
        for batch in ctx.bar(data, desc=f"epoch {epoch + 1}{f'-{epoch + m}' * (m > 1)}/{args.epochs}"):
            step_start = clock(cuda)
            crops, views, stored, labels = batch_inputs(batch, store, ctx.device)
            crops, targets, teacher_side = batch_targets(crops, views, stored, labels, teachers,
                                                         num_classes, args, ctx, cutmix_rng)
            images = normalize(crops, cfg["mean"], cfg["std"])
            loss, kd, disc, logits = meal_step(model, discriminator, optimizer, scaler, images, targets,
                                               teacher_side, student_side, args.disc_rule, ctx.autocast(args))
            marks.append((step_start, clock(cuda)))
            sums.add(len(labels), counts=("correct",), loss=loss, kd=kd, disc=disc,
                     correct=(logits.argmax(1) == labels).sum())  # stays on the device
        means, seen = sums.means(ctx)
        if cuda:  # the step times: CUDA events, read once per epoch
            torch.cuda.synchronize()
        steps = [start.elapsed_time(end) / 1000 if cuda else end - start for start, end in marks]
        ckpt.check_finite(means["loss"], epoch, args.out)
        if discriminator is not None and abs(means["disc"] - math.log(2)) < 1e-6:
            ctx.print("note: the discriminator's two outputs were 0 for every input in this pass (the "
                      "official head's last ReLU): it passed no gradient")
        metrics = {"epoch": epoch + m, "crops_per_image": m, "lr": optimizer.param_groups[0]["lr"],
                   "train_loss": means["loss"], "train_kd": means["kd"], "train_disc": means["disc"],
                   "train_top1": 100 * means["correct"], "train_crops": seen,
                   "train_time": time.time() - epoch_start, "step_time_median": float(np.median(steps))}
        metrics.update(evaluate_sets(unwrap(model), val_sets, ctx, cfg["mean"], cfg["std"], args))
        best = max(best, metrics["val_top1"])
        if checkpoint.end_epoch(metrics, best, args, arch=args.arch, num_classes=num_classes, data_config=cfg):
            break
    return metrics, best, time.time() - run_start


@torch.no_grad()
def evaluate_ensemble(teachers, root, classes, args, ctx):
    """Top-1 of the averaged teacher softmax (Eq. 1), each teacher on its own eval transform."""
    sets = [image_folder(root, "val", eval_transform(c["input_size"], c["crop_pct"], c["interpolation"]),
                         classes) for c in (ex["data_config"] for _, ex in teachers)]
    correct, total = torch.zeros((), device=ctx.device), 0
    batch = max(1, args.batch_size // ctx.world)  # per process, with the run's loader workers
    for batches in zip(*[eval_loader(s, batch, args.workers, ctx, persistent=False) for s in sets]):
        views = [images.to(ctx.device, non_blocking=True) for images, _ in batches]
        labels = batches[0][1].to(ctx.device, non_blocking=True)
        probs = ensemble_average(teacher_logits(teachers, views, ctx.teacher_autocast(args)[0]))  # Eq. 1
        correct, total = correct + (probs.argmax(1) == labels).sum(), total + len(labels)
    correct, total = ctx.all_reduce_sum([correct.item(), total])
    return 100.0 * correct / max(total, 1)


# ---------- Command line: recipes, flags, checks, main -------------------------------------------
PRESETS = {  # the paper's ResNet-50 recipe (Sec. 6.1, official train.py, whose LR_REGIME [0, 100, 0.01,
    # 101, 300, 0.001] drops after 101 epochs, although Sec. 6.1 says "at 100 epoch"); a laptop demo
    "imagenet": dict(arch="resnet50", teacher=["senet154.gluon_in1k", "resnet152s.gluon_in1k"],
                     epochs=180, lr_drop_epoch=[101], batch_size=512, base_lr=0.01, input_size=224,
                     crop_pct=0.875, num_crops=2, workers=8),
    "demo": dict(arch="test_efficientnet", teacher=None, epochs=16, lr_drop_epoch=[12], batch_size=64,
                 base_lr=0.24, input_size=64, crop_pct=1.0, num_crops=4, workers=2),
}
# --labels: the official FKD_train.py README command (--epochs 200 --schedule 100 180; was 180, one drop)
PRESETS["labels"] = dict(PRESETS["imagenet"], epochs=200, lr_drop_epoch=[100, 180])
TEACHERS_380 = ["tf_efficientnet_b4.ns_jft_in1k", "tf_efficientnet_b4.aa_in1k"]  # the paper's 380 pair
PAPER_INITS = {"resnet50": "resnet50.ram_in1k"}  # the paper's student weights (timm's default changed)
DEMO_TEACHERS, DEMO_STUDENT_INIT_EPOCHS = ("test_resnet", "test_efficientnet"), 6
MEAL_CROP_SCALE = [0.08, 1.0]  # official: torchvision RandomResizedCrop's default scale
FLAGS = [  # flag, kind (a common.flags parser: it checks the value), choices or action, help[, more]
    ("--data", str, "ImageFolder root with train/ and val/, or 'demo'", dict(required=True)),
    ("--val-data", "append", "extra ImageFolder to evaluate on (repeatable)", dict(default=[])),
    ("--out", str, "output folder (default: a fresh runs/meal_v2_<data>_<route>/<time>)"),
    ("--arch", str, "student timm model (resnet50; demo: test_efficientnet)"),
    ("--init", str, "student weights: timm tag, NAME=PATH or 'none' (resnet50: the paper's ram_in1k)"),
    ("--teacher", "append", "teacher NAME or NAME=PATH, repeated (the paper's gluon senet154 + resnet152s; "
     f"380 px: {' + '.join(TEACHERS_380)})"),
    ("--labels", str, "FKD label store of the same teachers: Fast MEAL V2 (no teacher runs)"),
    ("--verify-images", "store_true", "check every image's file hash against --labels (default: 64 of them)"),
    ("--num-crops", flags.positive_int, "m, crops per image in a batch with --labels (2: FKD Table 4; demo 4)"),
    ("--no-disc", "store_true", "no discriminator (ablation, paper Fig. 9)"),
    ("--no-teachers", "store_true", "control: hard-label CE, same init, crops, optimizer, schedule"),
    ("--disc-rule", ["cooperative", "gan"], "cooperative: KD + BCE under one optimizer (official); gan: D "
     "on detached inputs, the student tries to look like the teachers", dict(default="cooperative")),
    ("--d-lr", flags.positive_float, "discriminator lr (default: the student's; the official --d_lr 1e-4 "
     "was overwritten by the student's schedule)"),
    ("--cutmix", flags.nonneg_float, "cutmix alpha (0 = off; official 1)", dict(default=0.0)),
    ("--epochs", flags.positive_int, "180; 200 with --labels (official FKD_train.py)"),
    ("--lr-drop-epoch", flags.nonneg_int, "lr x0.1 from each of these 0-based epochs on (101; 100 180 "
     "with --labels)", dict(nargs="+")),
    ("--batch-size", flags.positive_int, "global crops per step"),
    ("--lr", flags.positive_float, "default 0.01 x batch/512"),
    ("--base-lr", flags.positive_float, argparse.SUPPRESS),
    ("--wd", flags.nonneg_float, "weight decay (paper: 0)", dict(default=0.0)),
    ("--momentum", flags.fraction_below_one, "SGD momentum", dict(default=0.9)),
    ("--input-size", flags.positive_int, "training and eval crop size"),
    ("--crop-pct", flags.open_fraction, "eval center crop (0.875: 256 -> 224)"),
    ("--eval-only", "store_true", "evaluate the student's init and exit"),
    ("--teacher-amp", "store_true", "teachers under --amp too (default fp32, as the official code)"),
]


def parse_args(argv=None):
    p = flags.build_parser(__doc__.split("\n\n")[0] + " Flags without a default take the recipe's value "
                           "(PRESETS: ImageNet, --labels, demo).", FLAGS, "the student")
    args = p.parse_args(argv)
    flags.refuse_ignored(flags.given(p, argv), [
        (args.no_teachers, "--no-teachers (hard-label CE on fresh crops: no discriminator, no label store)",
         ("labels", "d_lr", "disc_rule", "no_disc")), (args.no_disc, "--no-disc", ("d_lr", "disc_rule")),
        (not args.labels, "online teachers (no --labels)", ["verify_images"])])
    flags.fill_from(args, PRESETS[recipe_of(args)], skip=("arch",))  # the student: see student_spec()
    args.lr = args.lr or args.base_lr * args.batch_size / 512
    return args


def recipe_of(args):
    return "demo" if args.data == "demo" else "labels" if args.labels else "imagenet"


def student_spec(args, ctx):
    """The student's spec: --init checked against --arch, or naming it; without it a demo-pretrained student
    (demo set), the paper's weights (resnet50.ram_in1k, not timm's default a1_in1k), else timm's default."""
    preset_arch = PRESETS[recipe_of(args)]["arch"]
    if args.data == "demo" and args.init is None:
        args.arch = args.arch or preset_arch
        args.init = demo.ensure_teacher(args.arch, ctx, epochs=DEMO_STUDENT_INIT_EPOCHS, log=ctx.print)
    if args.init not in (None, "none"):
        name, path = parse_spec(args.init)
        if args.arch is None:
            args.arch = preset_arch if path is None and os.path.isfile(name) else name.split(".")[0]
        return init_spec(args.init, args.arch)
    args.arch = args.arch or preset_arch
    if args.init == "none" or "." in args.arch:  # random weights, or the tag given with --arch
        return args.arch
    if args.arch in PAPER_INITS:
        ctx.print(f"student init: {PAPER_INITS[args.arch]} (the paper's; --init chooses other weights)")
        return PAPER_INITS[args.arch]
    tag = (getattr(timm.models.get_pretrained_cfg(args.arch), "hf_hub_id", None) or "").split("/")[-1]
    ctx.print(f"note: no --init: the student starts from timm's default weights for {args.arch}"
              + (f" ({tag})" if tag else "") + "; pass --init NAME.TAG to choose others")
    return args.arch


def open_store(args, train_set, teacher_specs, ctx):
    """The --labels store, checked against this run: images, classes, probabilities at T = 1, the
    official crop scale, the same teachers (name + weights hash), complete, enough crops."""
    if not LabelStore.is_store(args.labels):
        raise StoreError(f"no label store at {args.labels}; make it with the same teachers first: "
                         f"python fkd.py --data {args.data} --mode label --codec full --crop-scale 0.08 1 "
                         + " ".join(f"--teacher {parse_spec(s)[0]}" for s in teacher_specs)
                         + f" --labels {args.labels}")
    store = LabelStore.open(args.labels)
    expected = {"num_images": len(train_set), "num_classes": len(train_set.classes), "stores": "probs",
                "image_list_sha256": image_list_hash(train_set.samples, train_set.root)}
    if store.meta.get("imported"):  # released labels converted by fkd.py --mode import: no teacher files
        expected.update({"temperature": 1.0} if "temperature" in store.meta else {})
        ctx.print(f"note: {args.labels} holds imported labels ({store.meta['imported']}); the released Fast "
                  "MEAL V2 labels are those of the senet154 + resnet152_v1s ensemble, the default teachers")
    else:
        expected.update(temperature=1.0, crop_scale=MEAL_CROP_SCALE, teachers=teacher_identity(teacher_specs))
    store.check_matches(expected, advice="make a store for this run with fkd.py --mode label (commands "
                        "in meal_v2.py's header), or pass another --labels folder")
    store.check_contents(train_set.samples, every=args.verify_images)  # images replaced since labelling
    if args.num_crops > store.meta["num_crops"] or not store.complete:
        raise StoreError(f"label store {args.labels} is incomplete or has fewer than --num-crops "
                         f"{args.num_crops} crops per image; finish it with fkd.py --mode label")
    ctx.print(f"label store {args.labels}: {store.meta['num_images']} images x {store.meta['num_crops']} "
              f"crops, codec {store.meta['codec']}, {human_bytes(store.bytes_on_disk())} on disk; "
              f"{human_bytes(free_bytes(args.labels))} free there")
    return store


def recipe_line(args):
    """The recipe in use, and where it differs from the paper's (the ImageNet recipes)."""
    recipe, paper = recipe_of(args), PRESETS[recipe_of(args)]
    keys = ["epochs", "batch_size", "input_size", "teacher", "arch"] + ["num_crops"] * bool(args.labels)
    differs = [f"{key} {getattr(args, key)} (paper {paper[key]})" for key in keys
               if recipe != "demo" and getattr(args, key) != paper[key]]
    disc = "none" if args.no_disc or args.no_teachers else f"{args.disc_rule}, lr {args.d_lr or args.lr:g}"
    name = {"demo": "demo", "imagenet": "imagenet (the paper's ResNet-50 recipe)",
            "labels": "imagenet (the paper's ResNet-50 recipe, official FKD_train.py schedule)"}[recipe]
    drops = ", ".join(str(drop + 1) for drop in args.lr_drop_epoch)
    return (f"recipe: {name}" + (", differs from the paper in " + ", ".join(differs) if differs else "")
            + f"; {args.epochs} epochs, batch {args.batch_size}, lr {args.lr:g} (x0.1 from epoch {drops}), "
            f"wd {args.wd:g}, discriminator: {disc}")


def run(args, ctx):
    m = args.num_crops if args.labels else 1
    if args.batch_size % (m * ctx.world):
        raise SystemExit(f"error: --batch-size {args.batch_size} must be divisible by crops per image x "
                         f"processes = {m * ctx.world}")
    start, root = time.time(), demo.ensure_data(ctx) if args.data == "demo" else args.data
    # every input is checked before a teacher is loaded: data folders, the label store, the init, OUT
    train_set = image_folder(root, "train")
    num_classes, transform = len(train_set.classes), eval_transform(args.input_size, args.crop_pct)
    val_sets = eval_sets(root, args.val_data, transform, train_set.classes, args.batch_size, args.workers, ctx)
    if args.data == "demo" and not args.no_teachers:  # two demo teachers of different architectures
        args.teacher = demo.resolve_teachers(args.teacher, DEMO_TEACHERS, ctx, log=ctx.print)
    spec = student_spec(args, ctx)
    store = open_store(args, train_set, args.teacher, ctx) if args.labels else None
    with seeded(args.seed):  # a random init (or a new head) depends on the seed alone
        student, extra = create(spec, num_classes, pretrained_head="none" if args.init == "none" else "reset")
    cfg = dict(extra["data_config"], input_size=args.input_size, crop_pct=args.crop_pct,
               interpolation="bilinear")  # the official protocol: bilinear crops, resize 256 / crop 224
    ctx.print("student " + describe_data_config(dict(extra, data_config=cfg, data_config_source=(
        f"--input-size/--crop-pct, mean/std from {extra['data_config_source']}"))))
    if args.eval_only:
        result = evaluate(student.to(ctx.device), val_sets["val"], ctx, cfg["mean"], cfg["std"], args)
        return ctx.print(f"eval {spec}: top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}% "
                         f"on {result['count']} images")
    ctx.print(recipe_line(args))
    route = "ce" if args.no_teachers else ("labels" if args.labels else "online")  # --no-disc: not with "ce"
    base = os.path.join("runs", f"meal_v2_{os.path.basename(os.path.normpath(args.data))}_{route}"
                        + "_nodisc" * args.no_disc)  # the data folder's name (demo: demo)
    args.out = ckpt.resolve_out(args.out, base, ctx, args.resume)
    model, discriminator, optimizer, scaler = build_training(student, num_classes, args, ctx)
    objects = dict(model=model, optimizer=optimizer, scaler=scaler, discriminator=discriminator)
    checkpoint = ckpt.Checkpointer(args.out, ctx, args.resume, args.overwrite, args=args,
                                   **{name: obj for name, obj in objects.items() if obj is not None})
    need_teachers = not args.no_teachers and (store is None or args.data == "demo")
    teachers = load_teachers(args.teacher, num_classes, ctx.device) if need_teachers else []
    for _, teacher_extra in teachers:
        ctx.print("teacher " + describe_data_config(teacher_extra))
    # before training: the initialized student, and the teachers' ensemble on the same val images
    before = evaluate(model, val_sets["val"], ctx, cfg["mean"], cfg["std"], args, desc="init")["top1"]
    ensemble_top1 = evaluate_ensemble(teachers, root, train_set.classes, args, ctx) if teachers else None
    metrics, best, train_time = train(args, ctx, train_set, val_sets, store, teachers if store is None else [],
                                      model, discriminator, optimizer, scaler, checkpoint, cfg)
    if not metrics:  # --resume auto on a run that had already finished: nothing trained, keep its summary
        return ckpt.nothing_to_do(ctx, "MEAL V2", args.out, args.epochs)
    route = {"online": "online teachers", "labels": "labels (Fast MEAL V2)",
             "ce": "CE fine-tuning, no teachers"}[route]
    line = (f"MEAL V2 summary: {route}, student {args.arch}, {args.epochs} epochs: top-1 {before:.2f}% -> "
            f"{metrics['val_top1']:.2f}% (best {best:.2f}%)"
            + (f", teacher ensemble {ensemble_top1:.2f}%" if ensemble_top1 is not None else "")
            + f", median step {1000 * metrics['step_time_median']:.1f} ms, train {train_time:.0f}s, total "
            f"{time.time() - start:.0f}s, out {args.out}")
    ckpt.write_summary(ctx, args.out, {"route": route, "init_top1": before, "final": metrics, "best_top1": best,
                                       "ensemble_top1": ensemble_top1, "train_time": train_time}, line)


def main(argv=None):
    args = parse_args(argv)
    run_main(lambda ctx: run(args, ctx), args, (DataError, ModelError, StoreError, FloatingPointError))


if __name__ == "__main__":
    main()
