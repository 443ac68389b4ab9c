"""MEAL V2: distill a teacher ensemble into a well-initialized student, with a discriminator.

Paper: Zhiqiang Shen and Marios Savvides, "MEAL V2: Boosting Vanilla ResNet-50 to 80%+ Top-1
Accuracy on ImageNet without Tricks", 2020 (arXiv 2009.08453); shared/papers/meal_v2.txt.
Official code: szq0214/MEAL-V2 (train.py: online teachers; FKD_train.py: stored labels).
Fast route: FKD paper Table 4 ("Fast MEAL V2"): the same training from an FKD label store made
with the same teacher ensemble, so no teacher runs during training.

The student starts from pretrained weights (the paper's "good initialization"), learns only from
the teachers' averaged softmax (no hard labels, no weight decay), and a small discriminator tells
teacher-ensemble outputs from student outputs.

Equation map:
  Eq. 1   p_e = (1/K) sum_t p_t                              -> common/models.py ensemble_probs()
  Eq. 2-3 L_CE = -(1/N) sum_i p_e(x_i) log p_S(x_i)           -> soft_cross_entropy()
  Eq. 4   L_D = -(1/N) sum_i [y_i log p_D + (1 - y_i) log(1 - p_D)] -> discriminator_loss()
  Eq. 5   p_D = sigmoid(f(x)), f = three fully connected layers -> Discriminator
  update  L_CE + L_D under one optimizer (official)           -> meal_step()

What the discriminator sees (Eq. 5, "the last output layer before softmax"):
  online      student logits vs the mean of the teachers' logits (paper and official train.py);
  --labels    a store holds the ensemble's probabilities, not logits, so the student's softmax vs
              the stored p_e (as the official FKD_train.py); with a compressed store (ms, mr,
              smooth, hard) the student's softmax goes through the same codec first, so the
              discriminator compares like with like instead of learning the codec's flat tails.

Update rule (`--disc-rule`):
  cooperative (default; the official code the paper's numbers came from): the KD loss and the
      discriminator's BCE are summed and minimized by ONE SGD optimizer holding the student and
      the discriminator. The student thus descends the same BCE as the discriminator ("student =
      [1, 0]"): it is pulled toward outputs the discriminator finds easy to call "student", which
      slows its mimicking of the teachers - the regularizer of Sec. 6.3 / App. B ("can slow down
      the moving of a student to mimic the teachers' output"). The discriminator's lr is the
      student's (official: --d_lr was overwritten by the schedule, see --d-lr).
  gan: the discriminator descends L_D on detached inputs; the student descends L_CE + BCE(D(student),
      teacher target) with D frozen (it tries to look like the teachers). Not what the paper ran.
`--no-disc` drops the discriminator (ablation, paper Fig. 9); `--no-teachers` is the control of
plain hard-label CE fine-tuning from the same init, crops, optimizer and schedule.

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
  380 px     torchrun --nproc_per_node=8 meal_v2.py --data /imagenet --amp --input-size 380 \\
                 --teacher tf_efficientnet_b4.ns_jft_in1k --teacher tf_efficientnet_b4.aa_in1k
  Fast       torchrun --nproc_per_node=8 fkd.py --data /imagenet --mode label --stored-crops 200 \\
                 --codec ms --k 5 --crop-scale 0.08 1 --teacher senet154.gluon_in1k \\
                 --teacher resnet152s.gluon_in1k --labels /data/meal_labels     (~7.4 GB on disk)
             torchrun --nproc_per_node=8 meal_v2.py --data /imagenet --labels /data/meal_labels --amp
  Released   python fkd.py --data /imagenet --mode import --import-layout meal --import-from DIR \
                 --labels /data/meal_labels     (the authors' Fast MEAL V2 labels; then as above)
"""
import argparse
import contextlib
import json
import math
import os
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from common import ckpt, demo, flags
from common.data import (DataError, FreshCrops, TaggedSampler, eval_loader, eval_transform, evaluate,
                         evaluate_sets, image_folder, loader)
from common.dist import cleanup, derive_seed, maybe_compile, seed_rank_epoch, seeded, setup, unwrap
from common.labels import (LabelStore, StoreError, StoredCrops, decode, decode_stored_batch, encode,
                           free_bytes, human_bytes, image_list_hash, teacher_identity)
from common.models import (ModelError, create, describe_data_config, ensemble_probs, init_spec,
                           load_teachers, make_optimizer, normalize, param_groups, parse_spec,
                           teacher_logits)


# ----------------------------------------------------------------------------------------------
# The method: discriminator, losses, and the student + discriminator update
# ----------------------------------------------------------------------------------------------
class Discriminator(nn.Module):
    """Eq. 5's f: three fully connected layers C -> C/8 -> C/64 -> 2 with a ReLU after every layer,
    including the last (official: 1x1 convs 1000 -> 125 -> 15 -> 2, which are these Linear layers
    on a 1x1 map). Its two outputs are scored by BCE-with-logits against [1, 0] for student rows
    and [0, 1] for teacher rows (discriminator_loss). The last ReLU floors both outputs at 0,
    i.e. at probability 0.5, so a row's "0" target costs at least log 2; its "1" output still
    grows, and the larger output tells student from teachers. An input whose two outputs are both
    0 passes no gradient; a head where that holds for every input is dead (its loss stays log 2).
    Below 1000 classes the hidden widths stay >= 32 and 15: at 10 classes (the demo's) widths 2
    and 2 were dead from initialization for 4 of 20 seeds on random inputs, 32 and 15 for none."""

    def __init__(self, num_classes, shrink=8):
        super().__init__()
        hidden1 = max(num_classes // shrink, 32)  # 1000 -> 125
        hidden2 = max(hidden1 // shrink, 15)  # 125 -> 15
        self.layers = nn.Sequential(nn.Linear(num_classes, hidden1), nn.ReLU(),
                                    nn.Linear(hidden1, hidden2), nn.ReLU(),
                                    nn.Linear(hidden2, 2), nn.ReLU())

    def forward(self, x):
        return self.layers(x)


def discriminator_loss(discriminator, student, teacher):
    """Eq. 4 with Eq. 5's sigmoid inside BCE-with-logits: student rows labelled [1, 0], teacher rows
    [0, 1], the mean over all rows and both outputs (official). `teacher`: rows [B, C], or
    [(weight, rows), ...] with weights summing to 1, scored as sum_i weight_i x L_D(student, rows_i)
    (cutmix with --labels, official FKD_train.py). One forward over all rows (one DDP forward per
    backward)."""
    sides = teacher if isinstance(teacher, (list, tuple)) else [(1.0, teacher)]
    outputs = discriminator(torch.cat([student] + [rows for _, rows in sides]))
    targets = torch.zeros_like(outputs)
    targets[:len(student), 0] = 1.0  # student = [1, 0]
    targets[len(student):, 1] = 1.0  # teacher ensemble = [0, 1]
    if len(sides) == 1:
        return F.binary_cross_entropy_with_logits(outputs, targets)
    per_row = F.binary_cross_entropy_with_logits(outputs, targets, reduction="none").sum(dim=1)
    weights = torch.cat([torch.ones(len(student), device=outputs.device)]
                        + [torch.full((len(rows),), float(w), device=outputs.device) for w, rows in sides])
    return (per_row * weights).sum() / (4 * len(student))  # the mean over 2B rows x 2 outputs


def soft_cross_entropy(logits, targets):
    """Eq. 3: -(1/N) sum_i p_e(x_i) log p_S(x_i). Same gradient as the KL of Eq. 2 (they differ by
    the teachers' entropy, a constant). T = 1, no hard labels."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def compress_like_store(probs, codec, k):
    """The student's probabilities through a store's codec (encode, then decode: FKD Eq. 3-7), so
    the discriminator sees the same kind of vector on both sides. Differentiable for smooth, ms and
    mr (through the kept values and the spread remainder); `hard` gives a constant one-hot."""
    if codec == "full":
        return probs
    indices, values = encode(probs, codec, k)
    return decode(indices, values, codec, probs.shape[1])


def meal_step(model, discriminator, optimizer, scaler, images, targets, teacher_side, student_side=None,
              rule="cooperative", autocast=None):
    """One update of the student and the discriminator, both held by `optimizer`.

    images        the student's normalized batch
    targets       p_e [B, C] (Eq. 1), the KD target (a one-hot for the CE control)
    teacher_side  the teachers' input to the discriminator [B, C] (mean teacher logits online, the
                  stored p_e with --labels), or [(weight, rows), ...] (see discriminator_loss)
    student_side  student logits -> the student's input of the same kind (default: the logits)
    discriminator None: Eq. 3 alone (--no-disc, --no-teachers).
    rule          "cooperative" (official): loss = L_CE + L_D, one backward, one step: the
                  discriminator and the student both descend L_D. "gan": the discriminator
                  descends L_D on detached inputs, the student L_CE + BCE(D(student), [0, 1]).
    `scaler` is a torch.amp.GradScaler (disabled outside float16 AMP): a step whose gradients are
    not finite is skipped for the student and the discriminator alike.
    Returns detached (loss, L_CE, L_D, logits).
    """
    with autocast or contextlib.nullcontext():
        logits = model(images)
    logits = logits.float()
    kd = soft_cross_entropy(logits, targets)  # Eq. 3
    d_loss = torch.zeros((), device=logits.device)
    loss = kd
    if discriminator is not None:
        student = student_side(logits) if student_side is not None else logits
        if rule == "cooperative":  # official: one summed loss, one optimizer (Eq. 3 + Eq. 4)
            d_loss = discriminator_loss(discriminator, student, teacher_side)
            loss = kd + d_loss
        elif rule == "gan":  # D's gradients only from Eq. 4 on the detached student rows
            d_loss = discriminator_loss(discriminator, student.detach(), teacher_side)
            frozen = unwrap(discriminator).requires_grad_(False)  # the student's term leaves D as is
            outputs = frozen(student)
            look_real = torch.zeros_like(outputs)
            look_real[:, 1] = 1.0  # the teachers' target [0, 1]
            loss = kd + d_loss + F.binary_cross_entropy_with_logits(outputs, look_real)
            frozen.requires_grad_(True)
        else:
            raise ValueError(f"unknown discriminator rule {rule!r}; choose cooperative or gan")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)  # skipped (for every group) when a gradient is inf/nan under fp16
    scaler.update()
    return loss.detach(), kd.detach(), d_loss.detach(), logits.detach()


# ----------------------------------------------------------------------------------------------
# Batches: crops, teachers' targets, cutmix; the pass plan of the --labels route
# ----------------------------------------------------------------------------------------------
def cutmix(crops, views, alpha, rng):
    """CutMix (official --w-cutmix, lambda ~ Beta(alpha, alpha), box side sqrt(1 - lambda) of the
    image's) on uint8 crops: each crop gets a box of crop[perm]. `views` (the same crops at each
    teacher's size) get the same box in relative coordinates, so the teachers label the mixed
    images, as in the official online code. Returns (crops, views, perm, lam), lam = 1 - box share."""
    lam, perm = rng.beta(alpha, alpha), torch.from_numpy(rng.permutation(len(crops))).to(crops.device)
    center_y, center_x = rng.random(2)
    side = math.sqrt(1.0 - lam)

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
        stored = decode_stored_batch(indices, values, store.meta, device)
        labels = labels.repeat_interleave(crops.shape[1])
        views = []
    else:  # one fresh crop per image, also resized for every teacher
        crops, views, labels = batch
        views, stored = [v.to(device, non_blocking=True).flatten(0, 1) for v in views], None
    return (crops.to(device, non_blocking=True).flatten(0, 1), views, stored,
            labels.to(device, non_blocking=True))


def pass_plan(epochs, m, drop_epoch):
    """[(first epoch, crops per image)]: with --labels one pass over the images with m stored crops
    each is m epochs of samples (official FKD_train.py: `for epoch in range(0, epochs, m)`). A pass
    never crosses the lr drop or the end: epochs left before either that do not fill a pass run
    one crop per image, one epoch per pass (FKD's single-crop tail), so the drop happens at
    --lr-drop-epoch and every logged epoch is an epoch. Online (m = 1): one epoch per pass."""
    plan, epoch = [], 0
    for end in sorted({min(drop_epoch, epochs), epochs}):
        while epoch < end:
            crops = m if epoch + m <= end else 1
            plan.append((epoch, crops))
            epoch += crops
    return plan


class StepTimer:
    """Per-step wall time that waits for the GPU: CUDA events read once per epoch (no host sync per
    step); on CPU the work is synchronous and perf_counter suffices."""

    def __init__(self, device):
        self.cuda, self.times, self.events = device.type == "cuda", [], []

    def start(self):
        if self.cuda:
            self.events.append([torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)])
            self.events[-1][0].record()
        else:
            self._start = time.perf_counter()

    def stop(self):
        if self.cuda:
            self.events[-1][1].record()
        else:
            self.times.append(time.perf_counter() - self._start)

    def median(self):
        """Median step seconds since the last call (one synchronization on CUDA)."""
        if self.cuda:
            torch.cuda.synchronize()
            self.times = [begin.elapsed_time(end) / 1000 for begin, end in self.events]
            self.events = []
        times, self.times = self.times, []
        return float(np.median(times)) if times else float("nan")


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------
def build_training(student, num_classes, args, ctx):
    """The student (and discriminator) on the device, ONE SGD optimizer holding both (official),
    and the GradScaler; every group carries its base lr for the step schedule."""
    model = student.to(ctx.device)
    if ctx.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    discriminator = None
    if not (args.no_disc or args.no_teachers):
        with seeded(args.seed):  # the same initial weights on every rank
            discriminator = Discriminator(num_classes).to(ctx.device)
    groups = [dict(g, base_lr=args.lr) for g in param_groups(model, args.wd)]
    if discriminator is not None:  # official: the discriminator is a parameter group of the same SGD
        groups.append({"params": list(discriminator.parameters()), "weight_decay": args.wd,
                       "lr": args.d_lr or args.lr, "base_lr": args.d_lr or args.lr})
    optimizer = make_optimizer("sgd", groups, args.lr, args.momentum)
    return model, discriminator, optimizer, ctx.grad_scaler(args)


def train(args, ctx, train_set, val_sets, store, teachers, model, discriminator, optimizer, scaler,
          checkpoint, cfg):
    num_classes = len(train_set.classes)
    start_epoch, best = checkpoint.restore()
    if ctx.distributed:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
        if discriminator is not None:
            discriminator = DistributedDataParallel(discriminator, device_ids=ids)
    model = maybe_compile(model, args)

    if store is not None:  # the discriminator compares stored p_e with the student's softmax
        codec, k = store.meta["codec"], store.meta.get("k", 1)
        student_side = lambda logits: compress_like_store(F.softmax(logits, dim=1), codec, k)  # noqa: E731
    else:  # online: logits on both sides (paper, text under Eq. 5)
        student_side = None
    views = [(ex["data_config"]["input_size"], ex["data_config"]["interpolation"]) for _, ex in teachers]

    def build_loader(m):
        if store is not None:
            dataset = StoredCrops(train_set.samples, store, m, args.input_size, "bilinear", args.seed)
        else:  # the official pipeline: RandomResizedCrop (0.08, 1), flip, bilinear
            dataset = FreshCrops(train_set.samples, 1, args.input_size, "bilinear", views, (0.08, 1.0),
                                 (3 / 4, 4 / 3), args.seed)
        sampler = TaggedSampler(DistributedSampler(dataset, ctx.world, ctx.rank, shuffle=True,
                                                   seed=args.seed, drop_last=True))
        return loader(dataset, args.batch_size // (m * ctx.world), args.workers, sampler, ctx.device,
                      drop_last=True), sampler

    data = sampler = loader_crops = None
    position = 0  # stored crops consumed per image so far (the non-overlapping schedule's stream)
    metrics, run_start, timer = {}, time.time(), StepTimer(ctx.device)
    plan = pass_plan(args.epochs, args.num_crops if store is not None else 1, args.lr_drop_epoch)
    for epoch, m in plan:
        if epoch < start_epoch:
            position += m
            continue
        if m != loader_crops:  # a single-crop pass needs a loader of its own
            data = sampler = None
            data, sampler = build_loader(m)
            loader_crops = m
        seed_rank_epoch(args.seed, ctx.rank, epoch)  # dropout, drop-path: (seed, rank, epoch) only
        cutmix_rng = np.random.default_rng(derive_seed(args.seed, ctx.rank, epoch, 1))
        sampler.set_epoch(epoch, position if store is not None else epoch)
        factor = 0.1 if epoch >= args.lr_drop_epoch else 1.0  # the paper's step schedule
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor  # official: the discriminator's lr follows it too
        model.train()
        if discriminator is not None:
            discriminator.train()
        sums = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # loss, kd, disc, correct
        seen, epoch_start = 0, time.time()
        for batch in ctx.bar(data, desc=f"epoch {epoch + 1}-{epoch + m}/{args.epochs}" if m > 1
                             else f"epoch {epoch + 1}/{args.epochs}"):
            timer.start()
            crops, teacher_views, stored, labels = batch_inputs(batch, store, ctx.device)
            perm = None
            if args.cutmix > 0:
                crops, teacher_views, perm, lam = cutmix(crops, teacher_views, args.cutmix, cutmix_rng)
            if teachers:  # online: every teacher on the (mixed) crop at its own size
                logits_t = teacher_logits(teachers, teacher_views, ctx.autocast(args))
                targets = ensemble_probs(logits_t)  # Eq. 1
                teacher_side = torch.stack(logits_t).mean(dim=0)  # official: the mean of their logits
            else:
                targets = stored if store is not None else F.one_hot(labels, num_classes).float()
                teacher_side = targets
                if perm is not None:  # labels of mixed crops: mixed by the pasted area (official)
                    teacher_side = [(lam, targets), (1 - lam, targets[perm])]  # official FKD_train.py
                    targets = lam * targets + (1 - lam) * targets[perm]
            images = normalize(crops, cfg["mean"], cfg["std"])
            loss, kd, d_loss, logits = meal_step(model, discriminator, optimizer, scaler, images, targets,
                                                 teacher_side, student_side, args.disc_rule,
                                                 ctx.autocast(args))
            timer.stop()
            n = len(labels)
            seen += n
            hits = (logits.argmax(1) == labels).sum().float()
            sums += torch.stack([loss * n, kd * n, d_loss * n, hits]).double()  # stays on the device
        seen, loss_sum, kd_sum, d_sum, correct = ctx.all_reduce_sum([seen] + sums.tolist())  # one sync
        ckpt.check_finite(loss_sum, epoch, args.out)
        if discriminator is not None and abs(d_sum / seen - math.log(2)) < 1e-6:
            ctx.print("note: the discriminator's two outputs were 0 for every input in this pass (the "
                      "official head's last ReLU): it passed no gradient")
        position += m
        metrics = {"epoch": epoch + m, "crops_per_image": m, "lr": optimizer.param_groups[0]["lr"],
                   "train_loss": loss_sum / seen, "train_kd": kd_sum / seen, "train_disc": d_sum / seen,
                   "train_top1": 100 * correct / seen, "train_crops": int(seen),
                   "train_time": time.time() - epoch_start, "step_time_median": timer.median()}
        metrics.update(evaluate_sets(unwrap(model), val_sets, ctx, cfg["mean"], cfg["std"], args))
        best = max(best, metrics["val_top1"])
        if checkpoint.end_epoch(metrics, best, args, arch=args.arch, num_classes=num_classes,
                                data_config=cfg):
            break
    return metrics, best, time.time() - run_start


@torch.no_grad()
def evaluate_ensemble(teachers, root, classes, args, ctx):
    """Top-1 of the averaged teacher softmax (Eq. 1), each teacher on its own eval transform."""
    configs = [ex["data_config"] for _, ex in teachers]
    sets = [image_folder(root, "val", eval_transform(c["input_size"], c["crop_pct"], c["interpolation"]),
                         classes) for c in configs]
    loaders = [eval_loader(s, args.batch_size, 0, ctx, persistent=False) for s in sets]
    correct, total = torch.zeros((), device=ctx.device), 0
    for batches in zip(*loaders):
        views = [images.to(ctx.device) for images, _ in batches]
        probs = ensemble_probs(teacher_logits(teachers, views, ctx.autocast(args)))
        labels = batches[0][1].to(ctx.device)
        correct += (probs.argmax(1) == labels).sum()
        total += len(labels)
    correct, total = ctx.all_reduce_sum([correct.item(), total])
    return 100.0 * correct / max(total, 1)


# ----------------------------------------------------------------------------------------------
# Command line: arguments, recipes, checks, main
# ----------------------------------------------------------------------------------------------
PRESETS = {  # the paper's ResNet-50 recipe (Sec. 6.1, official train.py); a laptop-sized demo one
    "imagenet": dict(arch="resnet50", teacher=["senet154.gluon_in1k", "resnet152s.gluon_in1k"],
                     epochs=180, batch_size=512, base_lr=0.01, input_size=224, crop_pct=0.875,
                     num_crops=2, workers=8),
    "demo": dict(arch="test_efficientnet", teacher=None, epochs=16, lr_drop_epoch=12, batch_size=64,
                 base_lr=0.24, input_size=64, crop_pct=1.0, num_crops=4, workers=2),
}
# The lr drops x0.1 after 101 epochs online (official train.py LR_REGIME [0, 100, 0.01, 101, 300,
# 0.001]: inclusive epoch intervals, although Sec. 6.1 says "at 100 epoch") and after 100 epochs
# with --labels (official FKD_train.py: lr x0.1 once epoch >= 100).
LR_DROP = {"online": 101, "labels": 100}
TEACHERS_380 = ["tf_efficientnet_b4.ns_jft_in1k", "tf_efficientnet_b4.aa_in1k"]  # the paper's 380 pair
PAPER_INITS = {"resnet50": "resnet50.ram_in1k"}  # the paper's student weights (timm's default changed)
DEMO_TEACHERS, DEMO_STUDENT_INIT_EPOCHS = ("test_resnet", "test_efficientnet"), 6
MEAL_CROP_SCALE = [0.08, 1.0]  # official: torchvision RandomResizedCrop's default scale


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--data", required=True, help="ImageFolder root with train/ and val/, or 'demo'")
    add("--val-data", action="append", default=[], help="extra ImageFolder to evaluate on")
    add("--out", help="output folder (default: a new runs/meal_v2_<data>_<route>/<time> per run)")
    add("--arch", help="student timm model (default resnet50; demo: test_efficientnet)")
    add("--init", help="student weights: timm tag or NAME=PATH, 'none' for random (default "
        "resnet50.ram_in1k, the paper's; with another --arch: timm's default tag for it)")
    add("--teacher", action="append", help="teacher NAME or NAME=PATH, repeat for the ensemble (default "
        f"senet154 + resnet152s gluon at 224; the 380 pair: {' + '.join(TEACHERS_380)})")
    add("--labels", help="FKD label store of the same teachers: Fast MEAL V2 (no teacher runs)")
    add("--num-crops", type=flags.positive_int, help="m, crops of one image per batch with --labels "
        "(default 2: FKD Table 4's 80.70%% is Table 7's m = 2; demo 4)")
    add("--no-disc", action="store_true", help="no discriminator (ablation, paper Fig. 9)")
    add("--no-teachers", action="store_true", help="control: hard-label CE fine-tuning from the same "
        "init, crops, optimizer and schedule (no teachers, no discriminator)")
    add("--disc-rule", default="cooperative", choices=["cooperative", "gan"], help="cooperative: KD + "
        "BCE summed under one optimizer (official); gan: the student tries to look like the teachers")
    add("--d-lr", type=flags.positive_float, help="discriminator lr (default: the student's, as in the "
        "official run, where --d_lr 1e-4 was overwritten by the student's schedule)")
    add("--cutmix", type=flags.nonneg_float, default=0.0, help="cutmix alpha (0 = off; official 1)")
    add("--epochs", type=flags.positive_int)
    add("--lr-drop-epoch", type=flags.nonneg_int,
        help="lr x0.1 from this epoch on (0-based; official 101 online, 100 with --labels)")
    add("--batch-size", type=flags.positive_int, help="global crops per step")
    add("--lr", type=flags.positive_float, help="default 0.01 x batch/512")
    add("--base-lr", type=flags.positive_float, help=argparse.SUPPRESS)
    add("--wd", type=flags.nonneg_float, default=0.0, help="weight decay (paper: 0)")
    add("--momentum", type=flags.fraction_below_one, default=0.9)
    add("--input-size", type=flags.positive_int)
    add("--crop-pct", type=flags.open_fraction, help="eval center-crop fraction (0.875: 256 -> 224)")
    flags.add_run_flags(p, "the student")
    add("--eval-only", action="store_true", help="evaluate the student's init and exit")
    args = p.parse_args(argv)
    for key, value in PRESETS["demo" if args.data == "demo" else "imagenet"].items():
        if getattr(args, key, None) is None and key != "arch":  # the student: see student_spec()
            setattr(args, key, value)
    if args.lr_drop_epoch is None:
        args.lr_drop_epoch = LR_DROP["labels" if args.labels else "online"]
    if args.lr is None:
        args.lr = args.base_lr * args.batch_size / 512
    return args


def student_spec(args, ctx):
    """The spec the student is built from. --init is checked against --arch; without --arch the
    init names it. Without --init: the paper's weights for the paper's students (resnet50 ->
    resnet50.ram_in1k, not timm's default resnet50.a1_in1k), else timm's default tag, named."""
    preset_arch = PRESETS["demo" if args.data == "demo" else "imagenet"]["arch"]
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
    cfg = timm.models.get_pretrained_cfg(args.arch)
    tag = (cfg.hf_hub_id or "").split("/")[-1] if cfg is not None else ""
    ctx.print(f"note: no --init: the student starts from timm's default weights for {args.arch}"
              + (f" ({tag})" if tag else "") + "; pass --init NAME.TAG to choose others")
    return args.arch


def route_name(args):
    route = "ce" if args.no_teachers else ("labels" if args.labels else "online")
    return route + ("_nodisc" if args.no_disc and not args.no_teachers else "")


def open_store(args, train_set, teacher_specs, ctx):
    """The --labels store, checked against this run: images, classes, probabilities at T = 1, the
    official crop scale, the same teachers (name + weights hash), complete, enough crops."""
    if not os.path.isfile(os.path.join(args.labels, "meta.json")):
        names = DEMO_TEACHERS if args.data == "demo" else [parse_spec(s)[0] for s in teacher_specs]
        raise StoreError(f"no label store at {args.labels}; make it with the same teachers first: "
                         f"python fkd.py --data {args.data} --mode label --codec full --crop-scale 0.08 1 "
                         + " ".join(f"--teacher {name}" for name in names) + f" --labels {args.labels}")
    store = LabelStore.open(args.labels)
    expected = {"num_images": len(train_set), "num_classes": len(train_set.classes), "stores": "probs",
                "image_list_sha256": image_list_hash(train_set.samples, train_set.root)}
    imported = store.meta.get("imported")
    if imported:  # released labels converted by fkd.py --mode import: no teacher files to compare
        if "temperature" in store.meta:
            expected["temperature"] = 1.0
        ctx.print(f"note: {args.labels} holds imported labels ({imported}); the released Fast MEAL V2 "
                  f"labels are those of the senet154 + resnet152_v1s ensemble, the default teachers")
    else:
        expected.update(temperature=1.0, crop_scale=MEAL_CROP_SCALE, teachers=teacher_identity(teacher_specs))
    store.check_matches(expected, advice="make a store for this run with fkd.py --mode label (commands "
                        "in meal_v2.py's header), or pass another --labels folder")
    if args.num_crops > store.meta["num_crops"] or not np.asarray(store.done).all():
        raise StoreError(f"label store {args.labels} is incomplete or has fewer than --num-crops "
                         f"{args.num_crops} crops per image; finish it with fkd.py --mode label")
    size = sum(os.path.getsize(os.path.join(args.labels, f)) for f in os.listdir(args.labels))
    ctx.print(f"label store {args.labels}: {store.meta['num_images']} images x {store.meta['num_crops']} "
              f"crops, codec {store.meta['codec']}, {human_bytes(size)} on disk; "
              f"{human_bytes(free_bytes(args.labels))} free there")
    return store


def recipe_line(args):
    """The recipe in use, and where it differs from the paper's (ImageNet preset)."""
    recipe, paper = "demo" if args.data == "demo" else "imagenet", PRESETS["imagenet"]
    keys = ("epochs", "batch_size", "input_size", "teacher", "arch") + (("num_crops",) if args.labels else ())
    differs = [f"{key} {getattr(args, key)} (paper {paper[key]})" for key in keys
               if recipe == "imagenet" and getattr(args, key) != paper[key]]
    disc = "none" if args.no_disc or args.no_teachers else f"{args.disc_rule}, lr {args.d_lr or args.lr:g}"
    return (f"recipe: {recipe}" + (" (the paper's ResNet-50 recipe)" if recipe == "imagenet" else "")
            + (", differs from the paper in " + ", ".join(differs) if differs else "")
            + f"; {args.epochs} epochs, batch {args.batch_size}, lr {args.lr:g} (x0.1 from epoch "
            f"{args.lr_drop_epoch + 1}), wd {args.wd:g}, discriminator: {disc}")


def run(args, ctx):
    m = args.num_crops if args.labels else 1
    if args.batch_size % (m * ctx.world):
        raise SystemExit(f"error: --batch-size {args.batch_size} must be divisible by crops per image x "
                         f"processes = {m * ctx.world}")
    if args.no_teachers and args.labels:
        raise SystemExit("error: --no-teachers trains on fresh crops with the image labels; drop --labels")
    if args.amp and ctx.device.type != "cuda":
        ctx.print("note: --amp applies to CUDA only; running in fp32 on CPU")
    start = time.time()
    root = demo.ensure_data(ctx) if args.data == "demo" else args.data
    # every input is checked before a teacher is loaded: data folders, the label store, the init, OUT
    train_set = image_folder(root, "train")
    num_classes = len(train_set.classes)
    val_transform = eval_transform(args.input_size, args.crop_pct)
    val_sets = {"val": eval_loader(image_folder(root, "val", val_transform, train_set.classes),
                                   args.batch_size, args.workers, ctx)}
    for i, extra_root in enumerate(args.val_data):
        val_sets[f"extra{i}"] = eval_loader(image_folder(extra_root, "", val_transform, train_set.classes),
                                            args.batch_size, args.workers, ctx)
    if args.data == "demo":  # two demo teachers of different architectures + a demo-pretrained student
        if not args.no_teachers:
            args.teacher = demo.resolve_teachers(args.teacher, DEMO_TEACHERS, ctx, log=ctx.print)
        if args.init is None:
            args.arch = args.arch or PRESETS["demo"]["arch"]
            args.init = demo.ensure_teacher(args.arch, ctx, epochs=DEMO_STUDENT_INIT_EPOCHS, log=ctx.print)
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
        ctx.print(f"eval {spec}: top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}% "
                  f"on {result['count']} images")
        return
    ctx.print(recipe_line(args))
    data_name = "demo" if args.data == "demo" else os.path.basename(os.path.normpath(args.data))
    base = os.path.join("runs", f"meal_v2_{data_name}_{route_name(args)}")
    args.out = ckpt.resolve_out(args.out, base, ctx, args.resume)
    model, discriminator, optimizer, scaler = build_training(student, num_classes, args, ctx)
    objects = dict(model=model, optimizer=optimizer, scaler=scaler)
    if discriminator is not None:
        objects["discriminator"] = discriminator
    checkpoint = ckpt.Checkpointer(args.out, ctx, args.resume, args.overwrite, args=args, **objects)

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
        ctx.print(f"MEAL V2: {args.out} already holds a finished run of {args.epochs} epochs; nothing to "
                  f"do (its results are in {os.path.join(args.out, 'summary.json')})")
        return
    route = {"online": "online teachers", "labels": "labels (Fast MEAL V2)",
             "ce": "CE fine-tuning, no teachers"}[route_name(args).replace("_nodisc", "")]
    ctx.print(f"MEAL V2 summary: {route}, student {args.arch}, {args.epochs} epochs: top-1 "
              f"{before:.2f}% -> {metrics.get('val_top1', float('nan')):.2f}% (best {best:.2f}%)"
              + (f", teacher ensemble {ensemble_top1:.2f}%" if ensemble_top1 is not None else "")
              + f", median step {1000 * metrics.get('step_time_median', float('nan')):.1f} ms, "
              f"train {train_time:.0f}s, total {time.time() - start:.0f}s, out {args.out}")
    if ctx.main:
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump({"route": route, "init_top1": before, "final": metrics, "best_top1": best,
                       "ensemble_top1": ensemble_top1, "train_time": train_time}, f, indent=1)


def main(argv=None):
    args = parse_args(argv)
    ctx = setup(args.device)
    try:
        run(args, ctx)
    except KeyboardInterrupt:
        raise SystemExit(ckpt.INTERRUPTED)
    except (DataError, ModelError, StoreError, FloatingPointError) as error:
        raise SystemExit(f"error: {error}")
    finally:
        cleanup()


if __name__ == "__main__":
    main()
