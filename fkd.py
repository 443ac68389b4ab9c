"""FKD: fast knowledge distillation with stored region-level soft labels.

Paper: Zhiqiang Shen and Eric Xing, "A Fast Knowledge Distillation Framework for Visual
Recognition", ECCV 2022 (arXiv 2112.01528); shared/papers/fkd.txt. Official code: szq0214/FKD.

Phase 1 (label generation, Sec. 3.1): for every training image sample M random-resized crops and
flips, run the teacher(s) on each crop at the teacher's own resolution and normalization, and store
the crop boxes, flips and compressed soft labels (Sec. 3.5) in a label store (common/labels.py).
Phase 2 (training, Sec. 3.1 and 3.3): each image of a batch replays `--num-crops` of its stored
crops exactly; the student learns from the stored soft labels with a soft cross-entropy, so no
teacher runs during training.

Modes:
  fkd     phase 1 for images not labelled yet (resumable; nothing to do when the store is complete),
          then phase 2
  label   phase 1 only
  online  vanilla KD baseline: same student, loss and crop pipeline, teacher forward on fresh crops
  ce      plain cross-entropy on the image label, same crop pipeline (no teacher)
  show    PNG grid of stored crops with their top-3 labels (the paper's Fig. 2 idea)
  import  convert the authors' released label files into a store (--import-from DIR)

Equation map:
  Eq. 1     (1 - lambda) H(y, S(x)) + lambda H(T(x), S(x)): lambda = 1 here (FKD, online),
            lambda = 0 is --mode ce                                  -> soft_cross_entropy()
  Sec. 3.1  P_i = T(R_i), several teachers: mean of their softmax   -> label_crops()
            (each teacher's forward: common/models.py teacher_logits())
  Eq. 3-7   hard / smooth / marginal smoothing / re-norm, encode side -> label_crops() via
            common/labels.py encode(); decode side -> common/labels.py decode()
  Sec. 3.3  m crops of one image per batch, serrated lr               -> pass_plan(), train()
  Sec. 3.4  SSL variant: --stores logits --codec full [--label-dim D]; T applied at training time
  Table 3   --recipe resnet50 (80.1%: warmup + colour jitter), --recipe resnet50-plain (79.8%)
  Table 5   --recipe vit (ViT-T 75.2%)

Commands (batch sizes are global, all GPUs together, counted in crops, as in the paper):
  CPU demo   python fkd.py --data demo          (then --mode online, --mode ce, --mode show)
  1 GPU      python fkd.py --data /imagenet --batch-size 256 --amp      (lr = 0.1 x 256/512)
  8 GPUs     torchrun --nproc_per_node=8 fkd.py --data /imagenet --amp
  2 nodes    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
                 fkd.py --data /imagenet --labels /shared/fkd_labels --out /shared/fkd_run --amp
  labels only, then train:  torchrun ... fkd.py --data /imagenet --mode label;  then without --mode
  released labels:          python fkd.py --data /imagenet --mode import --import-from DIR --labels L
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler
from torchvision.transforms.v2 import functional as TF

from common import ckpt, demo, flags
from common.crops import replay_crops, sample_crops
from common.data import (DataError, FreshCrops, TaggedSampler, eval_loader, evaluate, evaluate_sets,
                         eval_transform, image_folder, load_rgb, loader, mix_batch)
from common.dist import cleanup, epoch_generator, maybe_compile, seed_rank_epoch, seeded, setup, unwrap
from common.labels import (CODECS, IMAGE_FIELDS, LabelStore, StoreError, StoredCrops, decode,
                           decode_stored_batch, encode, free_bytes, human_bytes, identity_digest,
                           label_identity, open_for_generation, teacher_identity)
from common.models import (ModelError, create, describe_data_config, init_spec, load_teachers,
                           make_optimizer, normalize, teacher_logits)


# ----------------------------------------------------------------------------------------------
# The method (Sec. 3): what a reader copies
# ----------------------------------------------------------------------------------------------
def soft_cross_entropy(logits, targets, temperature=1.0):
    """L = -sum_c P_c log S_c(R), batch mean (Sec. 3.1): Eq. 1 with lambda = 1 and the region-level
    soft label P as the teacher term (one-hot targets give lambda = 0, --mode ce). As the official
    code: T divides the student logits only, no T^2 factor."""
    return -(targets * F.log_softmax(logits / temperature, dim=1)).sum(dim=1).mean()


def pass_plan(epochs, m, warmup_epochs=0):
    """[(first epoch, crops per image, epochs covered)] of the official loops (Sec. 3.3).

    One pass over the images with m crops each = m epochs of samples at one learning rate (the
    "serrated" cosine); the last m epochs run one crop per image, one epoch per pass. Warmup epochs
    run one crop per image first, as the official ViT script (train_ViT_FKD.py) does.
    """
    plan, epoch = [], 0
    while epoch < epochs:
        if epoch < warmup_epochs or epoch >= epochs - m:
            plan.append((epoch, 1, 1))
            epoch += 1
        else:
            plan.append((epoch, m, m))
            epoch += m
    return plan


@torch.no_grad()
def label_crops(teachers, views, codec, k, temperature, stores, autocast):
    """Soft labels of one block of crops of one image (Sec. 3.1 label generation), compressed.

    P_i = T(R_i): with several teachers, the exact mean of their softmax on the same crop. Then
    Sec. 3.5: `full` keeps P; Eq. 3 `hard` keeps argmax P (of the *ensemble* probabilities; the
    same class as argmax z for one teacher); Eq. 4 `smooth` keeps the argmax and its probability;
    Eq. 5 `ms` / Eq. 6-7 `mr` keep the top-K probabilities (the rest is restored at decode).
    `stores="logits"` (SSL variant, Sec. 3.4): one teacher's raw outputs, T applied at training.
    Returns (indices or None, values or None).
    """
    outputs = teacher_logits(teachers, views, autocast)
    if stores == "logits":
        return encode(outputs[0], "full")
    probs = torch.stack([F.softmax(z / temperature, dim=1) for z in outputs]).mean(dim=0)
    return encode(probs, codec, k)


class ColorJitter:
    """torchvision's ColorJitter(s, s, s) on replayed uint8 crops [m, 3, H, W] (the 80.1% recipe of
    Table 3): per crop, brightness, contrast and saturation factors uniform in [1 - s, 1 + s],
    applied in a random order. The labels were made without it: Sec. 3.1 accepts that slight
    mismatch. Draws come from the generator the dataset seeds per (seed, image, pass)."""

    OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)

    def __init__(self, strength):
        self.strength = strength

    def __call__(self, crops, generator):
        out = []
        for crop in crops:
            factors = (1 + self.strength * (2 * torch.rand(3, generator=generator) - 1)).tolist()
            for op in torch.randperm(3, generator=generator).tolist():
                crop = self.OPS[op](crop, factors[op])
            out.append(crop)
        return torch.stack(out)


def train_step(model, optimizer, scaler, images, targets, temperature, autocast):
    """One SGD/AdamW step on the soft cross-entropy; returns (loss, logits), both detached."""
    with autocast:
        logits = model(images)
    loss = soft_cross_entropy(logits.float(), targets, temperature)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), logits.detach()


def parameter_groups(model, weight_decay, rule):
    """'all': weight decay on every parameter (official ResNet-50: torch SGD on model.parameters());
    'weights': none on biases, norm parameters and the model's no_weight_decay() tokens (timm's rule,
    the official ViT script's create_optimizer)."""
    if rule == "all":
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)


# ----------------------------------------------------------------------------------------------
# Phase 1 loop: label generation (Sec. 3.1 "Label Generation Phase")
# ----------------------------------------------------------------------------------------------
class CropsForTeachers(Dataset):
    """Item (image n, crop block j) -> the block's crops resized for each teacher view.

    Crop i depends only on (seed, n, i) and block j is a fixed slice of the image's M crops, so
    the teacher's batches, and hence the stored bytes, never depend on worker or rank count or
    restarts.
    """

    def __init__(self, samples, items, num_crops, block, views, scale, ratio, seed):
        self.samples, self.items, self.num_crops, self.block = samples, items, num_crops, block
        self.views, self.scale, self.ratio, self.seed = views, scale, ratio, seed

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        n, j = self.items[i]
        image = load_rgb(self.samples[n][0])
        part = slice(j * self.block, min((j + 1) * self.block, self.num_crops))
        boxes, flips = sample_crops(self.seed, n, image.width, image.height, part.stop, self.scale, self.ratio)
        views = [replay_crops(image, boxes[part], flips[part], size, interp) for size, interp in self.views]
        return (n, j, torch.from_numpy(boxes[part]), torch.from_numpy(flips[part]), views,
                torch.tensor(image.size))


def generate_labels(args, ctx, train_set, teachers, store):
    """Label every image not marked done; under torchrun each rank takes a disjoint share, then
    waits (polling the done flags, no collective with a timeout) for the others."""
    todo = np.flatnonzero(np.asarray(store.done) == 0)
    mine = np.array_split(todo, ctx.world)[ctx.rank]  # contiguous shares: ranks never share a row
    blocks = math.ceil(args.stored_crops / args.label_batch)
    views = [(ex["data_config"]["input_size"], ex["data_config"]["interpolation"]) for _, ex in teachers]
    dataset = CropsForTeachers(train_set.samples, [(int(n), j) for n in mine for j in range(blocks)],
                               args.stored_crops, args.label_batch, views, args.crop_scale,
                               args.crop_ratio, args.seed)
    data = loader(dataset, None, args.workers, device=ctx.device, persistent=False)
    ctx.print(f"generating labels: {len(todo)} images x {args.stored_crops} crops, codec {args.codec}, "
              f"{len(teachers)} teacher(s), {ctx.world} process(es) -> {store.path}")
    start, pending, autocast = time.time(), [], ctx.autocast(args)
    with ctx.bar(total=len(mine), desc="labels", unit="img") as bar:
        for n, j, boxes, flips, images, size in data:
            images = [x.to(ctx.device, non_blocking=True) for x in images]
            indices, values = label_crops(teachers, images, args.codec, args.k, args.temperature,
                                          args.stores, autocast)
            part = slice(j * args.label_batch, j * args.label_batch + len(boxes))
            store.write(n, part, boxes.numpy(), flips.numpy(),
                        None if indices is None else indices.cpu().numpy(),
                        None if values is None else values.cpu().numpy(), tuple(size.tolist()))
            if j == blocks - 1:  # the image's last block: its rows are complete
                pending.append(n)
                bar.update(1)
                if len(pending) >= args.flush_every:
                    store.mark_done(pending)
                    pending = []
        store.mark_done(pending)
    store.close()
    if ctx.distributed:
        ctx.print("waiting for the other processes to finish their shares of the labels")
        store.wait_until_complete(poll_seconds=1.0 if len(todo) < 10_000 else 10.0)
    elapsed = time.time() - start
    ctx.print(f"labels done: {len(todo)} images in {elapsed:.0f}s "
              f"({len(todo) * args.stored_crops / max(elapsed, 1e-9):.0f} crops/s), "
              f"{store.bytes_per_crop():.1f} bytes/crop")
    return LabelStore.open(store.path)


# ----------------------------------------------------------------------------------------------
# Phase 2 loop: training on stored crops (Sec. 3.1 "Training Phase", Sec. 3.3)
# ----------------------------------------------------------------------------------------------
def build_train_loader(args, ctx, train_set, store, m, views):
    augment = ColorJitter(args.color_jitter) if args.color_jitter > 0 else None
    if args.mode == "fkd":
        dataset = StoredCrops(train_set.samples, store, m, args.input_size, args.interpolation, args.seed,
                              augment)
    else:
        dataset = FreshCrops(train_set.samples, m, args.input_size, args.interpolation,
                             views if args.mode == "online" else [], args.crop_scale, args.crop_ratio,
                             args.seed, augment)
    # shuffled by (seed, epoch) alone, also with one process, so a resumed run sees the same order
    sampler = TaggedSampler(DistributedSampler(dataset, ctx.world, ctx.rank, shuffle=True, seed=args.seed,
                                               drop_last=True))
    images_per_batch = args.batch_size // (m * ctx.world)
    return loader(dataset, images_per_batch, args.workers, sampler, ctx.device, drop_last=True), sampler


def batch_targets(args, batch, store, teachers, num_classes, device, autocast):
    """Images (uint8, flattened to B crops) and soft targets [B, D] for one batch of any mode."""
    if args.mode == "fkd":
        crops, indices, values, labels = batch
        logits_t = args.temperature if store.meta["stores"] == "logits" else None  # Sec. 3.4
        targets = decode_stored_batch(indices, values, store.meta, device, logits_t)  # Eq. 3-7 decode
    else:
        crops, views, labels = batch
        if args.mode == "online":  # vanilla KD: the teacher runs on this step's crops
            views = [v.to(device, non_blocking=True).flatten(0, 1) for v in views]
            outputs = teacher_logits(teachers, views, autocast)
            targets = torch.stack([F.softmax(z / args.temperature, dim=1) for z in outputs]).mean(dim=0)
        else:  # Eq. 1 with lambda = 0: the image label
            targets = F.one_hot(labels.repeat_interleave(crops.shape[1]).to(device), num_classes).float()
    crops = crops.to(device, non_blocking=True).flatten(0, 1)
    labels = labels.repeat_interleave(crops.shape[0] // labels.shape[0])
    return crops, targets, labels


def train(args, ctx, train_set, val_sets, store, teachers, student, student_cfg):
    num_classes = len(train_set.classes)
    model = student.to(ctx.device)
    if ctx.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    groups = parameter_groups(model, args.wd, args.wd_params)
    optimizer = make_optimizer(args.opt, groups, args.lr, args.momentum)
    scheduler = CosineLRScheduler(optimizer, t_initial=args.epochs, lr_min=args.min_lr,
                                  warmup_t=args.warmup_epochs, warmup_lr_init=args.warmup_lr)
    scaler = ctx.grad_scaler(args)
    checkpoint = ckpt.Checkpointer(args.out, ctx, args.resume, args.overwrite, args=training_flags(args),
                                   model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    start_epoch, best = checkpoint.restore()
    if ctx.distributed:
        gpu = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=gpu)
    model = maybe_compile(model, args)
    autocast = ctx.autocast(args)

    views = [(ex["data_config"]["input_size"], ex["data_config"]["interpolation"]) for _, ex in teachers]
    data, sampler, loader_crops = None, None, None
    position = 0  # crops consumed per image so far (the non-overlapping schedule's stream position)
    metrics = {}
    run_start = time.time()
    for epoch, m, covered in pass_plan(args.epochs, args.num_crops, args.warmup_epochs):
        if epoch < start_epoch:
            position += m
            continue
        if m != loader_crops:  # single-crop passes need another loader (the old workers end)
            data = sampler = None
            data, sampler = build_train_loader(args, ctx, train_set, store, m, views)
            loader_crops = m
        sampler.set_epoch(epoch, position if args.mode == "fkd" else epoch)
        seed_rank_epoch(args.seed, ctx.rank, epoch)  # dropout, drop-path: (seed, rank, epoch) alone
        mix_generator = epoch_generator(args.seed, ctx.rank, epoch)
        scheduler.step(epoch)  # lr constant for the whole pass: the serrated cosine of Sec. 3.3
        model.train()
        seen, pass_start = 0, time.time()
        loss_sum = torch.zeros((), device=ctx.device)  # summed on the device, read once per pass
        correct = torch.zeros((), dtype=torch.int64, device=ctx.device)
        scores_classes = unwrap(model).num_classes == num_classes  # not for SSL labels of another width
        for batch in ctx.bar(data, desc=f"epoch {epoch + 1}-{epoch + covered}/{args.epochs}"):
            crops, targets, labels = batch_targets(args, batch, store, teachers, num_classes, ctx.device,
                                                   autocast)
            images = normalize(crops, student_cfg["mean"], student_cfg["std"])
            if args.mixup > 0 or args.cutmix > 0:
                images, targets = mix_batch(images, targets, args.mixup, args.cutmix, mix_generator)
            loss, logits = train_step(model, optimizer, scaler, images, targets, args.temperature, autocast)
            seen += len(labels)
            loss_sum += loss * len(labels)
            if scores_classes:
                correct += (logits.argmax(1) == labels.to(ctx.device, non_blocking=True)).sum()
        seen, loss_sum, correct = ctx.all_reduce_sum([seen, loss_sum.item(), correct.item()])
        ckpt.check_finite(loss_sum, epoch, args.out)
        position += m
        metrics = {"epoch": epoch + covered, "crops_per_image": m, "lr": optimizer.param_groups[0]["lr"],
                   "train_loss": loss_sum / max(seen, 1), "train_crop_top1": 100 * correct / max(seen, 1),
                   "train_crops": int(seen), "train_time": time.time() - pass_start}
        # the bare model: a DDP forward broadcasts buffers, which hangs a rank with no eval images
        metrics.update(evaluate_all(unwrap(model), val_sets, ctx, student_cfg, args))
        best = max(best, metrics["val_top1"]) if not math.isnan(metrics["val_top1"]) else best
        if checkpoint.end_epoch(metrics, best, args=training_flags(args), arch=args.arch,
                                num_classes=unwrap(model).num_classes, data_config=student_cfg):
            break
    return metrics, best, time.time() - run_start


def evaluate_all(model, val_sets, ctx, cfg, args):
    """Top-1/top-5 on val and each --val-data set; val_top1 NaN when the student predicts no classes
    (SSL labels of another width)."""
    if not val_sets:
        return {"val_top1": float("nan")}
    return evaluate_sets(model, val_sets, ctx, cfg["mean"], cfg["std"], args)


# ----------------------------------------------------------------------------------------------
# Label visualizer (the paper's Fig. 2 idea)
# ----------------------------------------------------------------------------------------------
def show_labels(store, train_set, path, temperature, num_images=6, crops_per_image=6, size=128):
    """PNG grid: per row one image's stored crops (replayed), each with its top-3 stored classes."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(0)
    images = rng.choice(len(train_set), size=min(num_images, len(train_set)), replace=False)
    crops_per_image = min(crops_per_image, store.meta["num_crops"])
    width = store.meta.get("label_dim") or store.meta["num_classes"]
    names = train_set.classes if width == len(train_set.classes) else [f"dim {i}" for i in range(width)]
    canvas = Image.new("RGB", (crops_per_image * size, len(images) * (size + 36)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, n in enumerate(images):
        boxes, flips, indices, values = store.read(int(n), np.arange(crops_per_image))
        crops = replay_crops(load_rgb(train_set.samples[n][0]), boxes, flips, size)
        probs = decode(None if indices is None else torch.from_numpy(indices),
                       None if values is None else torch.from_numpy(values), store.meta["codec"], width,
                       temperature if store.meta["stores"] == "logits" else None)
        for col in range(crops_per_image):
            x, y = col * size, row * (size + 36)
            canvas.paste(Image.fromarray(crops[col].permute(1, 2, 0).numpy()), (x, y))
            top = probs[col].topk(min(3, probs.shape[1]))
            text = "\n".join(f"{names[c][:10]} {p:.2f}"
                             for p, c in zip(top.values.tolist(), top.indices.tolist()))
            draw.text((x + 2, y + size), text, fill="black")
    canvas.save(path)
    return path


# ----------------------------------------------------------------------------------------------
# CLI: recipes, arguments, main
# ----------------------------------------------------------------------------------------------
L2_TEACHER = "tf_efficientnet_l2.ns_jft_in1k_475"
RESNET50 = dict(arch="resnet50", teacher=[L2_TEACHER], stored_crops=500, crop_scale=(0.08, 0.936),
                codec="ms", k=5, epochs=300, batch_size=1024, num_crops=4, opt="sgd", lr_rule=(0.1, 512),
                wd=1e-4, wd_params="all", zero_init_last=False, warmup_epochs=5, warmup_lr=1e-5,
                min_lr=0.0, color_jitter=0.4, input_size=224, crop_pct=0.875, label_batch=125, workers=8)
RECIPES = {
    # Table 3 "FKD (Ours)": the official README's "same as ReLabel", i.e. with warmup and colour
    # jitter; that run's code is not public: warmup as the official ViT script, jitter as ReLabel's
    "resnet50": dict(RESNET50,
                     reported="80.1% top-1, ResNet-50 (Table 3, with warmup and colour jitter)"),
    # Table 3 "FKD w/o warmup & colorj": exactly the official train_FKD.py
    "resnet50-plain": dict(RESNET50, warmup_epochs=0, warmup_lr=0.0, color_jitter=0.0,
                           reported="79.8% top-1, ResNet-50 (Table 3, w/o warmup & colour jitter; "
                                    "train_FKD.py)"),
    # Table 5 "ViT w/ FKD": the official train_ViT_FKD.py (timm AdamW, cosine, 5 single-crop warmup)
    "vit": dict(RESNET50, arch="deit_tiny_patch16_224", opt="adamw", lr_rule=(0.002, 1024), wd=0.05,
                wd_params="weights", zero_init_last=None, warmup_epochs=5, warmup_lr=1e-5, min_lr=1e-5,
                color_jitter=0.0, reported="75.2% top-1, ViT-T (Table 5; train_ViT_FKD.py)"),
    # a laptop-sized recipe for the embedded demo set (no paper number)
    "demo": dict(arch="test_efficientnet", teacher=None, stored_crops=16, crop_scale=(0.08, 1.0),
                 codec="ms", k=5, epochs=16, batch_size=64, num_crops=4, opt="sgd", lr_rule=(0.8, 512), wd=5e-4,
                 wd_params="weights", zero_init_last=None, warmup_epochs=0, warmup_lr=0.0, min_lr=0.0,
                 color_jitter=0.0, input_size=64, crop_pct=1.0, label_batch=128, workers=2, reported=None),
}
DEMO_TEACHER = "test_resnet"
SIZE_CHECK_LIMIT = 50_000  # images whose sizes are checked at start; larger sets: as each is loaded
# flags that may change between a run and its resume here (besides common/ckpt.py's list)
NOT_TRAINING_FLAGS = ("overwrite_labels", "import_from", "import_layout", "import_label_type",
                      "show_images")


def parse_args(argv=None):
    """Returns (args, explicit): `explicit` names the flags given on the command line among those
    whose default comes from the recipe (or is None)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and val/, or 'demo'")
    p.add_argument("--val-data", action="append", default=[], help="extra ImageFolder to evaluate on "
                   "(same class folders; e.g. ImageNetV2); repeatable")
    p.add_argument("--mode", default="fkd", choices=["fkd", "label", "online", "ce", "show", "import"])
    p.add_argument("--recipe", choices=sorted(RECIPES), help="default: demo for --data demo, else resnet50")
    p.add_argument("--out", help="output folder (default: a fresh runs/fkd_<data>_<mode>/<time> per run)")
    p.add_argument("--labels", help="label store folder (default: runs/fkd_labels/<data>-<hash of the "
                   "label settings>, shared by every run with the same data and settings)")
    p.add_argument("--overwrite-labels", action="store_true", help="make the label store again from "
                   "the start (after the training images or label flags changed)")
    p.add_argument("--import-from", help="--mode import: folder of the authors' released label files")
    p.add_argument("--import-layout", default="fkd", choices=["fkd", "meal"],
                   help="released tree: fkd (train/<class>/<name>.tar) or meal (one more folder level)")
    p.add_argument("--import-label-type", choices=["marginal_renorm"], help="--mode import: decode "
                   "top-K files with marginal re-norm (Eq. 6-7) instead of marginal smoothing (Eq. 5); "
                   "the released files of the two are identical")
    # models
    p.add_argument("--arch", help="student timm model (recipes: resnet50, deit_tiny_patch16_224, "
                   "test_efficientnet)")
    p.add_argument("--init", help="student initial weights: timm tag or NAME=PATH (default: random)")
    p.add_argument("--teacher", action="append", help="teacher NAME or NAME=PATH[?input_size=..]; repeat for "
                   f"an ensemble (default {L2_TEACHER}; demo: a cached demo teacher)")
    p.add_argument("--zero-init-last", action=argparse.BooleanOptionalAction, default=None,
                   help="timm ResNets: zero-init each block's last BN gamma (timm's default; the "
                   "ResNet-50 recipes use torchvision's init, no zeroing, as the official code)")
    # label generation
    p.add_argument("--stored-crops", type=flags.positive_int, help="M, crops stored per image (paper: 500)")
    p.add_argument("--crop-scale", type=flags.open_fraction, nargs=2, help="RandomResizedCrop area range "
                   "(recipe 0.08 0.936 for the L2-475 teacher)")
    p.add_argument("--crop-ratio", type=flags.positive_float, nargs=2, default=(3 / 4, 4 / 3))
    p.add_argument("--codec", choices=CODECS, help="label compression, Sec. 3.5 (recipe ms)")
    p.add_argument("--k", type=flags.positive_int, help="top-K of the ms/mr codecs (recipe 5)")
    p.add_argument("--temperature", type=flags.positive_float, default=1.0,
                   help="softmax temperature (official 1)")
    p.add_argument("--stores", default="probs", choices=["probs", "logits"],
                   help="logits = SSL variant, Sec. 3.4 (needs --codec full; T applied at training)")
    p.add_argument("--label-dim", type=flags.positive_int, help="--stores logits: width of the teacher's "
                   "outputs (e.g. 128 for a MoCo projection head; default: the class count)")
    p.add_argument("--label-batch", type=flags.positive_int, help="crops per teacher forward")
    p.add_argument("--flush-every", type=flags.positive_int, default=64, help="images whose rows are flushed "
                   "and marked done together (work redone after a kill is at most this much per rank)")
    # training
    p.add_argument("--num-crops", type=flags.positive_int, help="m, crops of one image in a batch (official 4)")
    p.add_argument("--epochs", type=flags.positive_int)
    p.add_argument("--batch-size", type=flags.positive_int, help="global batch in crops (all ranks)")
    p.add_argument("--lr", type=flags.positive_float,
                   help="default 0.1 x batch/512 (sgd), 0.002 x batch/1024 (adamw)")
    p.add_argument("--wd", type=flags.nonneg_float)
    p.add_argument("--wd-params", choices=["all", "weights"], help="all parameters (ResNet recipes, as "
                   "train_FKD.py) or weights only (no biases/norms/tokens; ViT recipe, timm's rule)")
    p.add_argument("--opt", choices=["sgd", "adamw"])
    p.add_argument("--momentum", type=flags.fraction_below_one, default=0.9)
    p.add_argument("--warmup-epochs", type=flags.nonneg_int, help="single-crop warmup epochs (recipes: 5)")
    p.add_argument("--warmup-lr", type=flags.nonneg_float, help="lr of the first warmup epoch (official 1e-5)")
    p.add_argument("--min-lr", type=flags.nonneg_float)
    p.add_argument("--color-jitter", type=flags.nonneg_float, help="brightness/contrast/saturation "
                   "jitter on the replayed crops (80.1%% recipe: 0.4; 0 = off)")
    p.add_argument("--input-size", type=flags.positive_int, help="student training resolution")
    p.add_argument("--interpolation", type=flags.interpolation, default="bilinear",
                   help="student crop resize (official bilinear)")
    p.add_argument("--crop-pct", type=flags.open_fraction, help="eval center-crop fraction (0.875: 256 -> 224)")
    p.add_argument("--mixup", type=flags.nonneg_float, default=0.0, help="mixup alpha on soft labels (0 = off)")
    p.add_argument("--cutmix", type=flags.nonneg_float, default=0.0,
                   help="cutmix alpha on soft labels (0 = off)")
    # run
    flags.add_run_flags(p, "the student")
    p.add_argument("--eval-only", action="store_true", help="evaluate --init and exit")
    p.add_argument("--show-images", type=flags.positive_int, default=6, help="images in the --mode show grid")
    args = p.parse_args(argv)
    explicit = {key for key, value in vars(args).items() if value is not None}

    args.recipe = args.recipe or ("demo" if args.data == "demo" else "resnet50")
    recipe = RECIPES[args.recipe]
    for key, value in recipe.items():
        if key not in ("reported", "lr_rule") and getattr(args, key, None) is None:
            setattr(args, key, list(value) if isinstance(value, list) else value)
    if args.lr is None:  # linear scaling rule of the paper's recipes
        base, per = lr_rule(args, recipe)
        args.lr = base * args.batch_size / per
    return args, explicit


def describe_recipe(args, explicit):
    """One line: the recipe in use and every value that differs from it (or from the paper's)."""
    recipe = RECIPES[args.recipe]
    diffs = [f"--{key.replace('_', '-')} {getattr(args, key)} (recipe {value})" for key, value in recipe.items()
             if key not in ("reported", "lr_rule", "label_batch", "workers") and key in explicit
             and _differs(getattr(args, key), value)]
    base, per = lr_rule(args, recipe)
    if "lr" in explicit or args.opt != recipe["opt"]:
        diffs.append(f"--lr {args.lr:g} (recipe {base:g} x batch/{per})")
    head = f"recipe {args.recipe}: " + (f"the paper's {recipe['reported']}" if recipe["reported"]
                                        else "laptop-sized, no paper number")
    return head + ("; differs from it in " + ", ".join(diffs) if diffs else "; no changes") + \
        (f"; lr {args.lr:g} for batch {args.batch_size}" if "lr" not in explicit else "")


def lr_rule(args, recipe):
    """(base lr, per batch) of the linear scaling rule: the recipe's, or the paper's for another --opt."""
    if args.opt == recipe["opt"]:
        return recipe["lr_rule"]
    return (0.1, 512) if args.opt == "sgd" else (0.002, 1024)


def _differs(value, default):
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return len(value) != len(default) or any(_differs(a, b) for a, b in zip(value, default))
    return value != default


def check_args(args, explicit, world):
    """Inconsistent flags (each flag's own range is checked when it is parsed): one sentence each."""
    def need(ok, message):
        if not ok:
            raise SystemExit(f"error: {message}")
    need(args.batch_size % (args.num_crops * world) == 0, f"--batch-size {args.batch_size} must be "
         f"divisible by --num-crops x processes = {args.num_crops * world}")
    need(args.mode != "fkd" or args.num_crops <= args.stored_crops, f"--num-crops {args.num_crops} exceeds "
         f"the {args.stored_crops} crops stored per image; lower --num-crops or raise --stored-crops")
    need(args.crop_scale[0] <= args.crop_scale[1],
         f"--crop-scale {args.crop_scale[0]:g} {args.crop_scale[1]:g} needs low <= high")
    need(args.crop_ratio[0] <= args.crop_ratio[1], "--crop-ratio needs low <= high")
    need(args.stores == "probs" or args.codec == "full", "--stores logits needs --codec full")
    need(args.stores == "probs" or len(args.teacher or []) <= 1, "--stores logits takes one --teacher")
    need(args.stores == "probs" or args.mode in ("fkd", "label", "show"), "--stores logits describes a label "
         "store: use it with --mode fkd, label or show")
    need(args.stores == "logits" or "label_dim" not in explicit, "--label-dim is for --stores logits only")
    need(args.mode != "import" or args.import_from,
         "--mode import needs --import-from DIR (the folder of the released labels)")
    need(not (args.resume and args.overwrite), "--resume continues a run and --overwrite starts it over; "
         "pass only one")


def training_flags(args):
    """The flags recorded in (and compared with) a checkpoint: not those that only steer labels or
    output."""
    return argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in NOT_TRAINING_FLAGS})


def data_tag(data):
    return "demo" if data == "demo" else os.path.basename(os.path.normpath(data)) or "data"


def default_labels_path(args, root, teachers_identity, label_dim):
    """runs/fkd_labels/<data>-<hash of the data folder and the label flags>: one store per data set
    and label settings, shared by every run that uses them (modes fkd, label, show)."""
    settings = {"data_root": os.path.abspath(root), "teachers": teachers_identity,
                "crop_scale": args.crop_scale, "crop_ratio": args.crop_ratio, "seed": args.seed,
                "num_crops": args.stored_crops, "codec": args.codec,
                "k": args.k if args.codec in ("ms", "mr") else 1, "stores": args.stores,
                "temperature": None if args.stores == "logits" else args.temperature, "label_dim": label_dim}
    digest = identity_digest(settings, list(settings))
    return os.path.join("runs", "fkd_labels", f"{data_tag(args.data)}-{digest}")


def describe_store(path, meta=None, store=None):
    """'label store PATH: 18.5 GB for N images x M crops (ms, K=5), 1.2 TB free on its disk'."""
    meta = store.meta if store is not None else meta
    size = store.bytes_on_disk() if store is not None else LabelStore.planned_bytes(meta)
    return (f"label store {path}: {human_bytes(size)} {'on disk' if store is not None else 'to allocate'} for "
            f"{meta['num_images']} images x {meta['num_crops']} crops ({meta['codec']}"
            f"{', K=' + str(meta['k']) if meta['codec'] in ('ms', 'mr') else ''}), "
            f"{human_bytes(free_bytes(path))} free on its disk")


def one_sentence(error):
    """An error raised in a DataLoader worker carries the worker's traceback: keep its last line."""
    text = str(error)
    if "Traceback (most recent call last)" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        kind, _, rest = last.partition(": ")
        text = rest if rest and kind.replace(".", "").isidentifier() else last  # "module.Error: ..."
    return text


def main(argv=None):
    args, explicit = parse_args(argv)
    ctx = setup(args.device)
    try:
        run(args, explicit, ctx)
    except KeyboardInterrupt:
        raise SystemExit(ckpt.INTERRUPTED) from None
    except (DataError, ModelError, StoreError, FloatingPointError) as error:
        raise SystemExit(f"error: {one_sentence(error)}") from None
    finally:
        cleanup()


def on_every_rank(ctx, work):
    """Run `work()` on rank 0, hand its result (or its error) to every rank: no rank waits forever
    for a rank that failed."""
    result, error = None, None
    if ctx.main:
        try:
            result = work()
        except (DataError, ModelError, StoreError, ckpt.CheckpointError) as exc:
            error = str(exc)
    error = ctx.broadcast_object(error)
    if error:
        raise StoreError(error)
    return result


def lock_labels(path, ctx):
    """Hold a lock on the store's hidden sibling file .NAME.lock while this run generates into it: two runs
    sharing a (default) store never create or write it at the same time."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    try:
        lock = os.path.join(parent, "." + os.path.basename(os.path.abspath(path)) + ".lock")
        note = ckpt.hold_lock(lock, "labels:" + os.path.realpath(path),
                              "another run", "wait for it to end (it is labelling these images), or pass "
                              "another --labels folder", f"label store {path}")
    except PermissionError as error:
        raise StoreError(f"cannot write next to label store {path} ({error}); pass a writable --labels "
                         f"folder") from None
    if note:
        ctx.print(note)


def open_store_for_training(args, explicit, ctx, train_set, store, teachers_identity, label_dim):
    """Refuse a store made for other images, classes, teachers, crops, seed, codec, K, T or kind."""
    if store.imported:  # released labels: their codec and K are fixed by the files
        for flag, key in (("codec", "codec"), ("k", "k")):
            if flag in explicit and getattr(args, flag) != store.meta[key] and \
                    not (flag == "k" and store.meta["codec"] not in ("ms", "mr")):
                raise StoreError(f"--{flag} {getattr(args, flag)} differs from the imported store's "
                                 f"{store.meta[key]} ({store.path}); drop --{flag}: imported labels are "
                                 f"used as released")
        args.codec, args.k = store.meta["codec"], store.meta["k"]
        expected = {key: value for key, value in label_identity(
            train_set, [], "full", 1, 1, (0, 1), (1, 1), 1.0, "probs", 0).items() if key in IMAGE_FIELDS}
        expected["stores"] = "probs"
        store.check_matches({k: v for k, v in expected.items() if k in store.meta},
                            advice="the imported labels are for other images; import them for these "
                                   "with --mode import")
        imported = store.meta["imported"]
        ctx.print(f"training on imported labels from {imported.get('source')} ({imported.get('label_type')}, "
                  f"{store.meta['num_crops']} crops per image)")
    else:
        expected = label_identity(train_set, teachers_identity, args.codec, args.k, args.stored_crops,
                                  args.crop_scale, args.crop_ratio, args.temperature, args.stores, args.seed,
                                  label_dim)
        del expected["num_crops"]  # training may use a store with more crops than --stored-crops
        store.check_matches(expected)
    if args.num_crops > store.meta["num_crops"]:
        raise StoreError(f"--num-crops {args.num_crops} exceeds the {store.meta['num_crops']} crops stored per "
                         f"image in {store.path}; lower --num-crops")
    store.check_image_sizes(train_set.samples, limit=SIZE_CHECK_LIMIT)


def run(args, explicit, ctx):
    start = time.time()
    root = demo.ensure_data(ctx) if args.data == "demo" else args.data
    if args.data == "demo" and args.mode not in ("ce", "import"):
        args.teacher = demo.resolve_teachers(args.teacher, [DEMO_TEACHER], ctx, log=ctx.print)
    check_args(args, explicit, ctx.world)
    ctx.print(describe_recipe(args, explicit))
    if args.amp and ctx.device.type != "cuda":
        ctx.print("note: --amp applies to CUDA only; running in fp32 on CPU")
    train_set = image_folder(root, "train")
    num_classes = len(train_set.classes)
    if args.mode == "import":  # the authors' released label files -> a store
        try:
            from common.released import import_labels
        except ImportError:
            raise SystemExit("error: --mode import needs common/released.py, which this copy of the code "
                             "lacks; update the code") from None
        path = args.labels or os.path.join("runs", "fkd_labels", f"{data_tag(args.data)}-imported")
        store = import_labels(args.import_from, train_set, path, layout=args.import_layout, ctx=ctx,
                              label_type=args.import_label_type, workers=args.workers)
        ctx.print(f"train with: python fkd.py --data {args.data} --labels {store.path}")
        return

    # every input is checked before label generation: data, val sets, student, teachers
    label_dim = (args.label_dim or num_classes) if args.stores == "logits" else num_classes
    trains = args.mode in ("fkd", "online", "ce")
    val_sets, student, student_cfg = {}, None, None
    if trains or args.eval_only:
        student_kwargs = {}
        if args.zero_init_last is not None and timm.models.is_model_in_modules(args.arch.split(".")[0],
                                                                                ["resnet"]):
            student_kwargs["zero_init_last"] = args.zero_init_last  # a timm ResNet option
        with seeded(args.seed):  # the student's initial weights depend on the seed alone
            student, extra = create(init_spec(args.init, args.arch), label_dim,
                                    pretrained_head="reset" if args.init else "none", **student_kwargs)
        # train crops and eval resize use the official protocol (bilinear, resize 256 / crop 224 at 224)
        student_cfg = dict(extra["data_config"], input_size=args.input_size, crop_pct=args.crop_pct,
                           interpolation=args.interpolation)
        ctx.print("student " + describe_data_config(dict(extra, data_config=student_cfg,
                                                         data_config_source="the recipe and flags")))
        val_transform = eval_transform(args.input_size, student_cfg["crop_pct"], student_cfg["interpolation"])
        val_set = image_folder(root, "val", val_transform, train_set.classes)
        if label_dim == num_classes:  # SSL labels of another width: the student predicts no classes
            val_sets["val"] = eval_loader(val_set, args.batch_size, args.workers, ctx)
            for i, extra_root in enumerate(args.val_data):  # e.g. ImageNetV2: DIR/<class>/<image>
                extra_set = image_folder(extra_root, "", val_transform, train_set.classes)
                val_sets[f"extra{i}"] = eval_loader(extra_set, args.batch_size, args.workers, ctx)
        else:
            ctx.print(f"note: the student learns {label_dim}-d teacher outputs, not the {num_classes} "
                      f"classes: no val accuracy (evaluate its features with a linear probe)")
    if args.eval_only:
        result = evaluate(student.to(ctx.device), val_sets["val"], ctx, student_cfg["mean"],
                          student_cfg["std"], args)
        ctx.print(f"eval {args.init or args.arch}: top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}% "
                  f"on {result['count']} images")
        return

    if args.mode != "label":  # before any labelling: a bad --out is reported now, and OUT is locked
        args.out = ckpt.resolve_out(args.out, os.path.join("runs", f"fkd_{data_tag(args.data)}_{args.mode}"),
                                    ctx, args.resume)
    teachers_identity = teacher_identity(args.teacher or []) if args.mode != "ce" else []
    store = None
    if args.mode in ("fkd", "label", "show"):
        args.labels = args.labels or default_labels_path(args, root, teachers_identity, label_dim)
        existing = LabelStore.open(args.labels) if LabelStore.is_store(args.labels) else None
        if existing is not None and existing.complete and not args.overwrite_labels:
            store = existing
        elif args.mode == "show" or (existing is not None and existing.imported and not args.overwrite_labels):
            raise StoreError(f"no complete label store at {args.labels}; make it with --mode label (or "
                             f"finish an import with --mode import)")
    if store is None and args.mode in ("fkd", "label") and args.codec in ("ms", "mr") and args.k >= label_dim:
        raise SystemExit(f"error: --k {args.k} must be smaller than the {label_dim} classes; lower --k")
    # teachers: to label, for online KD, and to score the demo teacher
    need_teachers = args.mode == "online" or (args.mode in ("fkd", "label") and store is None) or \
        (args.data == "demo" and args.mode in ("fkd", "online"))
    teachers = load_teachers(args.teacher, label_dim, ctx.device) if need_teachers else []
    for _, tex in teachers:
        ctx.print("teacher " + describe_data_config(tex))
    if store is None and args.mode in ("fkd", "label"):
        recorded = [{"name": ex["name"], "sha256": ex["sha256"], **ex["data_config"]} for _, ex in teachers]
        meta = label_identity(train_set, recorded, args.codec, args.k, args.stored_crops, args.crop_scale,
                              args.crop_ratio, args.temperature, args.stores, args.seed, label_dim)
        if not LabelStore.is_store(args.labels) or args.overwrite_labels:
            ctx.print(describe_store(args.labels, meta))
        # rank 0 creates (or reopens) the store; the others open it once it exists
        on_every_rank(ctx, lambda: (lock_labels(args.labels, ctx),
                                    open_for_generation(args.labels, meta, args.overwrite_labels))[1])
        store = generate_labels(args, ctx, train_set, teachers, LabelStore.open(args.labels, writable=True))
    if store is not None:
        ctx.print(describe_store(args.labels, store=store))
        open_store_for_training(args, explicit, ctx, train_set, store, teachers_identity, label_dim)
    if args.mode == "label":
        return
    if args.mode == "show":
        if ctx.main:
            path = show_labels(store, train_set, os.path.join(args.out, "labels.png"), args.temperature,
                               args.show_images)
            ctx.print(f"wrote {path}")
        return

    teacher_top1 = None
    if args.data == "demo" and teachers:
        teacher, tex = teachers[0]
        cfg = tex["data_config"]
        transform = eval_transform(cfg["input_size"], cfg["crop_pct"], cfg["interpolation"])
        tval = eval_loader(image_folder(root, "val", transform, train_set.classes), args.batch_size,
                           args.workers, ctx, persistent=False)
        teacher_top1 = evaluate(teacher, tval, ctx, cfg["mean"], cfg["std"], args, desc="teacher")["top1"]

    metrics, best, train_time = train(args, ctx, train_set, val_sets, store,
                                      teachers if args.mode == "online" else [], student, student_cfg)
    del teachers
    if not metrics:  # --resume auto on a run that had already finished: nothing trained, keep its summary
        ctx.print(f"FKD: {args.out} already holds a finished run of {args.epochs} epochs; nothing to do "
                  f"(its results are in {os.path.join(args.out, 'summary.json')})")
        return
    top1 = metrics.get("val_top1", float("nan"))
    summary = (f"FKD summary: mode {args.mode}, student {args.arch}, {args.epochs} epochs, "
               + (f"teacher top-1 {teacher_top1:.2f}%, " if teacher_top1 is not None else "")
               + (f"student top-1 {top1:.2f}% (best {best:.2f}%), " if not math.isnan(top1) else
                  f"final train loss {metrics['train_loss']:.4f} (no val accuracy for {label_dim}-d labels), ")
               + f"train {train_time:.0f}s, total {time.time() - start:.0f}s, out {args.out}")
    ctx.print(summary)
    if ctx.main:
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump({"mode": args.mode, "recipe": args.recipe, "teacher_top1": teacher_top1,
                       "final": metrics, "best_top1": best, "train_time": train_time,
                       "total_time": time.time() - start}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
