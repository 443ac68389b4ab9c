"""FKD: fast knowledge distillation with stored region-level soft labels.

Paper: Zhiqiang Shen and Eric Xing, "A Fast Knowledge Distillation Framework for Visual
Recognition", ECCV 2022 (arXiv 2112.01528); shared/papers/fkd.txt. Official code: szq0214/FKD.

Phase 1 (Sec. 3.1): M random-resized crops + flips per training image, each fed to the teacher(s)
at the teacher's own resolution and normalization; boxes, flips and compressed soft labels
(Sec. 3.5) go into a label store (common/labels.py). Phase 2 (Sec. 3.1, 3.3): each image of a
batch replays `--num-crops` of its stored crops exactly and the student learns the stored labels
with a soft cross-entropy: no teacher runs during training. Modes: fkd (label what is not labelled
yet, then train), label, online (vanilla KD baseline: teacher forward on fresh crops), ce (image
label, same crop pipeline), show (PNG of stored crops and their labels), import (released labels).

Equation map:
  Eq. 1     (1 - lambda) H(y, S) + lambda H(T, S); lambda = 1 (fkd, online), 0 (--mode ce)
                                                            -> soft_cross_entropy()
  Sec. 3.1  P_i = T(R_i); several teachers: mean softmax     -> label_crops()
  Eq. 3-7   hard / smooth / marginal smoothing / re-norm     -> common/labels.py encode(), decode()
  Sec. 3.3  m crops of one image per batch, serrated lr      -> pass_plan(), train()
  Sec. 3.4  SSL variant: --stores logits --codec full [--label-dim D]; T applied when training
  Table 3 / 5  --recipe resnet50 (80.1%), resnet50-plain (79.8%), vit (ViT-T 75.2%)

Commands (batch sizes are global, all GPUs together, counted in crops, as in the paper):
  CPU demo  python fkd.py --data demo          (then --mode online, --mode ce, --mode show)
  1 GPU     python fkd.py --data /imagenet --batch-size 256 --amp        (lr = 0.1 x 256/512)
  8 GPUs    torchrun --nproc_per_node=8 fkd.py --data /imagenet --amp
  2 nodes   torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
                fkd.py --data /imagenet --labels /shared/fkd_labels --out /shared/fkd_run --amp
  released labels  python fkd.py --data /imagenet --mode import --import-from DIR --labels L
"""
import argparse
import math
import os
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler
from torch.utils.data import Dataset, DistributedSampler
from torchvision.transforms.v2 import functional as TF

from common import ckpt, demo, flags
from common.crops import replay_crops, sample_crops
from common.data import (DataError, FreshCrops, TaggedSampler, eval_sets, evaluate, evaluate_sets,
                         eval_transform, image_folder, load_rgb, loader, mix_batch)
from common.dist import (EpochSums, epoch_generator, maybe_compile, on_every_rank, run_main, seed_rank_epoch,
                         seeded, unwrap, wrap_ddp)
from common.labels import (CODECS, LabelStore, StoreError, StoredCrops, check_for_training, decode_stored_batch,
                           default_store_path, describe_store, encode, failing_tells_the_others, failure_marker,
                           content_digest, label_identity, lock_store, open_for_generation, open_shared,
                           show_labels, teacher_identity)
from common.models import (ModelError, create, describe_data_config, ensemble_probs, init_spec, load_teachers,
                           make_optimizer, normalize, param_groups, teacher_logits)


# ---------- The method (Sec. 3): what a reader copies --------------------------------------------
def soft_cross_entropy(logits, targets, temperature=1.0):
    """-sum_c P_c log S_c(R), batch mean (Sec. 3.1); as the official code: T divides S's logits only, no T^2."""
    return -(targets * F.log_softmax(logits / temperature, dim=1)).sum(dim=1).mean()  # Eq. 1


def pass_plan(epochs, m, warmup_epochs=0):
    """(first epoch, crops per image, epochs covered) of each pass of the official loops (Sec. 3.3): a pass of
    m crops per image = m epochs at one lr (the "serrated" cosine); warmup epochs one crop each
    first (train_ViT_FKD.py); from the first pass that would start at or after `epochs - m`, one
    crop per epoch (both loops): the last m epochs, or the last 3 with 5 warmup epochs and m = 4.
    A generator: any --epochs costs no memory."""
    epoch = 0
    while epoch < epochs:
        single = epoch < warmup_epochs or epoch >= epochs - m
        yield (epoch, 1, 1) if single else (epoch, m, m)
        epoch += 1 if single else m


@torch.no_grad()
def label_crops(teachers, views, codec, k, temperature, stores, autocast):
    """Soft labels of one block of crops of one image (Sec. 3.1), compressed (Sec. 3.5): `full` P,
    `hard` argmax of the *ensemble* P, `smooth` argmax + its probability, `ms`/`mr` the top-K;
    `stores="logits"` (Sec. 3.4): one teacher's raw outputs. Returns (indices or None, values or None)."""
    outputs = teacher_logits(teachers, views, autocast)
    if stores == "logits":
        return encode(outputs[0], "full")
    return encode(ensemble_probs(outputs, temperature), codec, k)  # P_i = T(R_i), then Eq. 3-7


class ColorJitter:
    """torchvision's ColorJitter(s, s, s) on replayed uint8 crops [m, 3, H, W] (the 80.1% recipe): brightness,
    contrast, saturation factors uniform in [1 - s, 1 + s], in a random order, drawn from the generator the
    dataset seeds per (seed, image, pass). Labels were made without it: a "slight mismatch" Sec. 3.1 accepts."""

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
    """Forward, soft cross-entropy, backward, step; returns (loss, logits), both detached."""
    with autocast:
        logits = model(images)
    loss = soft_cross_entropy(logits.float(), targets, temperature)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), logits.detach()


# ---------- Phase 1: label generation (Sec. 3.1 "Label Generation Phase") ------------------------
class CropsForTeachers(Dataset):
    """Item (image n, crop block j) -> the block's crops for each teacher view. Crop i depends only on
    (seed, n, i), block j is a fixed slice of the M crops: the bytes never depend on workers or ranks."""

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
        digest = content_digest(self.samples[n][0]) if j == 0 else None  # the image's identity (its bytes)
        return (n, j, torch.from_numpy(boxes[part]), torch.from_numpy(flips[part]), views, torch.tensor(image.size),
                digest)


def teacher_views(teachers):
    return [(ex["data_config"]["input_size"], ex["data_config"]["interpolation"]) for _, ex in teachers]


def generate_labels(args, ctx, train_set, teachers, store):
    """Label every image not marked done; under torchrun each rank takes a disjoint share, then
    waits (polling the done flags, no collective with a timeout) for the others."""
    todo = np.flatnonzero(np.asarray(store.done) == 0)
    mine = np.array_split(todo, ctx.world)[ctx.rank]  # contiguous shares: ranks never share a row
    blocks = math.ceil(args.stored_crops / args.label_batch)
    dataset = CropsForTeachers(train_set.samples, [(int(n), j) for n in mine for j in range(blocks)],
                               args.stored_crops, args.label_batch, teacher_views(teachers),
                               args.crop_scale, args.crop_ratio, args.seed)
    data = loader(dataset, None, args.workers, device=ctx.device, persistent=False)
    ctx.print(f"generating labels: {len(todo)} images x {args.stored_crops} crops, codec {args.codec}, "
              f"{len(teachers)} teacher(s), {ctx.world} process(es) -> {store.path}")
    start, pending, (autocast, _) = time.time(), [], ctx.teacher_autocast(args)
    with ctx.bar(total=len(mine), desc="labels", unit="img") as bar, failing_tells_the_others(store.path):
        for n, j, boxes, flips, views, size, digest in data:
            views = [v.to(ctx.device, non_blocking=True) for v in views]
            coded = label_crops(teachers, views, args.codec, args.k, args.temperature, args.stores, autocast)
            indices, values = (t if t is None else t.cpu().numpy() for t in coded)
            part = slice(j * args.label_batch, j * args.label_batch + len(boxes))
            store.write(n, part, boxes.numpy(), flips.numpy(), indices, values, tuple(size.tolist()), digest)
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
    rate = len(todo) * args.stored_crops / max(elapsed, 1e-9)
    ctx.print(f"labels done: {len(todo)} images in {elapsed:.0f}s ({rate:.0f} crops/s), "
              f"{store.bytes_per_crop():.1f} bytes/crop")
    return LabelStore.open(store.path)


# ---------- Phase 2: training on stored crops (Sec. 3.1 "Training Phase", Sec. 3.3) --------------
def build_train_loader(args, ctx, samples, store, m, views):
    augment = ColorJitter(args.color_jitter) if args.color_jitter > 0 else None
    if args.mode == "fkd":  # the stored crops, replayed
        dataset = StoredCrops(samples, store, m, args.input_size, args.interpolation, args.seed, augment)
    else:  # fresh crops, and their views for the teachers of online KD
        dataset = FreshCrops(samples, m, args.input_size, args.interpolation, views, args.crop_scale,
                             args.crop_ratio, args.seed, augment)
    # shuffled by (seed, epoch) alone, also with one process, so a resumed run sees the same order
    sampler = TaggedSampler(DistributedSampler(dataset, ctx.world, ctx.rank, seed=args.seed, drop_last=True))
    return loader(dataset, args.batch_size // (m * ctx.world), args.workers, sampler, ctx.device, drop_last=True)


def batch_targets(args, batch, store, teachers, num_classes, device, teacher_autocast):
    """Crops (uint8, flattened to B = images x m), soft targets [B, D] and labels [B] of one batch."""
    crops, *middle, labels = batch  # middle: stored (indices, values), or [teacher views]
    m = crops.shape[1]
    if args.mode == "fkd":
        logits_t = args.temperature if store.meta["stores"] == "logits" else None  # Sec. 3.4
        targets = decode_stored_batch(*middle, store.meta, device, logits_t)  # Eq. 3-7 decode
    elif args.mode == "online":  # vanilla KD: the teacher runs on this step's crops
        views = [v.to(device, non_blocking=True).flatten(0, 1) for v in middle[0]]
        targets = ensemble_probs(teacher_logits(teachers, views, teacher_autocast), args.temperature)
    else:  # Eq. 1 with lambda = 0: the image label, one-hot made on the device (no host sync)
        targets = F.one_hot(labels.to(device, non_blocking=True).repeat_interleave(m), num_classes).float()
    return crops.to(device, non_blocking=True).flatten(0, 1), targets, labels.repeat_interleave(m)


def train(args, ctx, train_set, val_sets, store, teachers, student, student_cfg):
    num_classes = len(train_set.classes)
    model = student.to(ctx.device, memory_format=torch.channels_last if ctx.device.type == "cuda" else None)
    optimizer = make_optimizer(args.opt, param_groups(model, args.wd, args.wd_params), args.lr, args.momentum)
    scheduler = CosineLRScheduler(optimizer, t_initial=args.epochs, lr_min=args.min_lr,
                                  warmup_t=args.warmup_epochs, warmup_lr_init=args.warmup_lr)
    scaler = ctx.grad_scaler(args)
    recorded = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in NOT_TRAINING_FLAGS})
    checkpoint = ckpt.Checkpointer(args.out, ctx, args.resume, args.overwrite, args=recorded,
                                   model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    start_epoch, best = checkpoint.restore(student.num_classes)
    model, autocast = maybe_compile(wrap_ddp(model, ctx), args), ctx.autocast(args)
    teacher_autocast = ctx.teacher_autocast(args)[0]  # online KD's teachers: fp32 unless --teacher-amp
    scores_classes = unwrap(model).num_classes == num_classes  # not for SSL labels of another width
    data, metrics, run_start = None, {}, time.time()
    for epoch, m, covered in pass_plan(args.epochs, args.num_crops, args.warmup_epochs):
        if epoch < start_epoch:
            continue
        if data is None or data.dataset.m != m:  # single-crop passes need another loader (the old workers end)
            data = None
            data = build_train_loader(args, ctx, train_set.samples, store, m, teacher_views(teachers))
        data.sampler.set_epoch(epoch, epoch)  # tag = crops used per image so far (stored crops' stream position)
        seed_rank_epoch(args.seed, ctx.rank, epoch)  # dropout, drop-path: (seed, rank, epoch) alone
        mix_generator = epoch_generator(args.seed, ctx.rank, epoch)
        scheduler.step(epoch)  # lr constant for the whole pass: the serrated cosine of Sec. 3.3
        model.train()
        sums, pass_start = EpochSums(ctx.device), time.time()
        for batch in ctx.bar(data, desc=f"epoch {epoch + 1}-{epoch + covered}/{args.epochs}"):
            crops, targets, labels = batch_targets(args, batch, store, teachers, num_classes, ctx.device,
                                                   teacher_autocast)
            images = normalize(crops, student_cfg["mean"], student_cfg["std"])
            if args.mixup > 0 or args.cutmix > 0:
                images, targets = mix_batch(images, targets, args.mixup, args.cutmix, mix_generator)
            loss, logits = train_step(model, optimizer, scaler, images, targets, args.temperature, autocast)
            hits = (logits.argmax(1) == labels.to(ctx.device, non_blocking=True)).sum() if scores_classes else 0
            sums.add(len(labels), counts=("correct",), loss=loss, correct=hits)
        means, seen = sums.means(ctx)
        ckpt.check_finite(means["loss"], epoch, args.out)
        metrics = {"epoch": epoch + covered, "crops_per_image": m, "lr": optimizer.param_groups[0]["lr"],
                   "train_loss": means["loss"], "train_crop_top1": 100 * means["correct"],
                   "train_crops": seen, "train_time": time.time() - pass_start}
        # the bare model: a DDP forward broadcasts buffers, which hangs a rank with no eval images
        metrics.update(evaluate_sets(unwrap(model), val_sets, ctx, student_cfg["mean"], student_cfg["std"], args)
                       if val_sets else {"val_top1": float("nan")})  # SSL labels: no classes to score
        best = max(best, metrics["val_top1"]) if not math.isnan(metrics["val_top1"]) else best
        if checkpoint.end_epoch(metrics, best, args=recorded, arch=args.arch,
                                num_classes=unwrap(model).num_classes, data_config=student_cfg):
            break
    return metrics, best, time.time() - run_start


# ---------- Running a mode: every input checked, then labels, then training ----------------------
def build_student(args, ctx, root, train_set, label_dim):
    """The student (initial weights from the seed alone), its data config, and its val loaders."""
    kwargs = {}
    if args.zero_init_last is not None and timm.models.is_model_in_modules(args.arch.split(".")[0], ["resnet"]):
        kwargs["zero_init_last"] = args.zero_init_last  # a timm ResNet option
    with seeded(args.seed):
        student, extra = create(init_spec(args.init, args.arch), label_dim,
                                pretrained_head="reset" if args.init else "none", **kwargs)
    # train crops and eval resize use the official protocol (bilinear, resize 256 / crop 224 at 224)
    cfg = dict(extra["data_config"], input_size=args.input_size, crop_pct=args.crop_pct,
               interpolation=args.interpolation)
    ctx.print("student " + describe_data_config(dict(extra, data_config=cfg,
                                                     data_config_source="the recipe and flags")))
    if label_dim != len(train_set.classes):  # SSL labels of another width: the student predicts no classes
        ctx.print(f"note: the student learns {label_dim}-d teacher outputs, not the {len(train_set.classes)} "
                  f"classes: no val accuracy (evaluate its features with a linear probe)")
        return student, cfg, {}
    transform = eval_transform(args.input_size, cfg["crop_pct"], cfg["interpolation"])
    return student, cfg, eval_sets(root, args.val_data, transform, train_set.classes, args.batch_size,
                                   args.workers, ctx)


def store_is_ready(args):
    """True: train from the complete store at --labels; False: (finish) labelling into it."""
    existing = LabelStore.open(args.labels) if LabelStore.is_store(args.labels) else None
    if existing is not None and existing.complete and not args.overwrite_labels:
        return True
    if args.mode == "show" or (existing is not None and existing.imported and not args.overwrite_labels):
        raise StoreError(f"no complete label store at {args.labels}; make it with --mode label (or finish an "
                         f"import with --mode import)")
    return False


def prepare_store(args, ctx, train_set, teachers, label_dim, precision):
    """Label the images not labelled yet (rank 0 creates or reopens the store) and return it."""
    recorded = [{"name": ex["name"], "sha256": ex["sha256"], **ex["data_config"]} for _, ex in teachers]
    meta = label_identity(train_set, recorded, args.codec, args.k, args.stored_crops, args.crop_scale,
                          args.crop_ratio, args.temperature, args.stores, args.seed, label_dim)
    if precision != "float32":  # recorded only when not the official fp32
        meta["teacher_precision"] = precision
    meta["content_digests"] = True  # each image's file hash, checked at training start (not identity)
    if not LabelStore.is_store(args.labels) or args.overwrite_labels:
        ctx.print(describe_store(args.labels, meta))
    marker = failure_marker(args.labels)
    on_every_rank(ctx, lambda: (lock_store(args.labels, ctx.print), os.path.exists(marker) and os.remove(marker),
                                open_for_generation(args.labels, meta, args.overwrite_labels)),
                  (DataError, ModelError, StoreError, ckpt.CheckpointError), StoreError)
    return generate_labels(args, ctx, train_set, teachers, open_shared(ctx, args.labels, writable=True))


def run(args, explicit, ctx):
    start = time.time()
    root = demo.ensure_data(ctx) if args.data == "demo" else args.data
    tag = "demo" if args.data == "demo" else os.path.basename(os.path.normpath(args.data)) or "data"
    if args.data == "demo" and args.mode not in ("ce", "import"):
        args.teacher = demo.resolve_teachers(args.teacher, [DEMO_TEACHER], ctx, log=ctx.print)
    check_args(args, explicit, ctx.world)
    ctx.print(describe_recipe(args, explicit))
    train_set = image_folder(root, "train")
    if args.mode == "import":  # the authors' released label files -> a store
        from fkd_released import import_labels
        path = args.labels or os.path.join("runs", "fkd_labels", f"{tag}-imported")
        store = import_labels(args.import_from, train_set, path, layout=args.import_layout, ctx=ctx,
                              label_type=args.import_label_type, workers=args.workers)
        return ctx.print(f"train with: python fkd.py --data {args.data} --labels {store.path}")

    # every input is checked before label generation: data, val sets, student, teachers
    label_dim = (args.label_dim or len(train_set.classes)) if args.stores == "logits" else len(train_set.classes)
    student, student_cfg, val_sets = None, None, {}
    if args.mode in ("fkd", "online", "ce") or args.eval_only:
        student, student_cfg, val_sets = build_student(args, ctx, root, train_set, label_dim)
    if args.eval_only:
        result = evaluate(student.to(ctx.device), val_sets["val"], ctx, student_cfg["mean"], student_cfg["std"],
                          args)
        return ctx.print(f"eval {args.init or args.arch}: top-1 {result['top1']:.2f}% "
                         f"top-5 {result['top5']:.2f}% on {result['count']} images")
    if args.mode != "label":  # before any labelling: a bad --out is reported now, and OUT is locked
        args.out = ckpt.resolve_out(args.out, os.path.join("runs", f"fkd_{tag}_{args.mode}"), ctx, args.resume)
    teachers_identity = teacher_identity(args.teacher or []) if args.mode != "ce" else []
    store, precision = None, ctx.teacher_autocast(args)[1]
    if args.mode in ("fkd", "label", "show"):
        args.labels = ctx.broadcast_object(args.labels or default_store_path(
            tag, root, args, teachers_identity, label_dim, precision))
        # rank 0 decides for the job: every rank then opens the same store, or all stop in one sentence
        if on_every_rank(ctx, lambda: store_is_ready(args), (StoreError, OSError), StoreError, share_result=True):
            store = open_shared(ctx, args.labels)
    labelling = store is None and args.mode in ("fkd", "label")
    if labelling and args.codec in ("ms", "mr") and args.k >= label_dim:
        raise SystemExit(f"error: --k {args.k} must be smaller than the {label_dim} classes; lower --k")
    # teachers: to label, for online KD, and to score the demo teacher
    need_teachers = args.mode == "online" or labelling or (args.data == "demo" and args.mode in ("fkd", "online"))
    teachers = load_teachers(args.teacher, label_dim, ctx.device) if need_teachers else []
    for _, tex in teachers:
        ctx.print("teacher " + describe_data_config(tex))
    if labelling:
        store = prepare_store(args, ctx, train_set, teachers, label_dim, precision)
    if store is not None:
        ctx.print(describe_store(args.labels, store=store))
        check_for_training(store, args, explicit, train_set, teachers_identity, label_dim, SIZE_CHECK_LIMIT,
                           ctx.print)
    if args.mode == "show" and ctx.main:
        ctx.print("wrote " + show_labels(store, train_set, os.path.join(args.out, "labels.png"),
                                         args.temperature, args.show_images))
    if args.mode in ("label", "show"):
        return

    teacher_top1 = None
    if args.data == "demo" and teachers:
        teacher, cfg = teachers[0][0], teachers[0][1]["data_config"]
        tval = eval_sets(root, [], eval_transform(cfg["input_size"], cfg["crop_pct"], cfg["interpolation"]),
                         train_set.classes, args.batch_size, args.workers, ctx)["val"]
        teacher_top1 = evaluate(teacher, tval, ctx, cfg["mean"], cfg["std"], args, desc="teacher")["top1"]
    metrics, best, train_time = train(args, ctx, train_set, val_sets, store,
                                      teachers if args.mode == "online" else [], student, student_cfg)
    if not metrics:  # --resume auto on a run that had already finished: nothing trained, keep its summary
        return ckpt.nothing_to_do(ctx, "FKD", args.out, args.epochs)
    top1, total = metrics["val_top1"], time.time() - start
    line = (f"FKD summary: mode {args.mode}, student {args.arch}, {args.epochs} epochs, "
            + (f"teacher top-1 {teacher_top1:.2f}%, " if teacher_top1 is not None else "")
            + (f"student top-1 {top1:.2f}% (best {best:.2f}%), " if not math.isnan(top1) else
               f"final train loss {metrics['train_loss']:.4f} (no val accuracy for {label_dim}-d labels), ")
            + f"train {train_time:.0f}s, total {total:.0f}s, out {args.out}")
    ckpt.write_summary(ctx, args.out, dict(mode=args.mode, recipe=args.recipe, teacher_top1=teacher_top1,
                                           final=metrics, best_top1=best, train_time=train_time,
                                           total_time=total), line)


# ---------- Command line: recipes, flags, checks, main -------------------------------------------
L2_TEACHER = "tf_efficientnet_l2.ns_jft_in1k_475"
RESNET50 = dict(arch="resnet50", teacher=[L2_TEACHER], stored_crops=500, crop_scale=[0.08, 0.936],
                codec="ms", k=5, epochs=300, batch_size=1024, num_crops=4, opt="sgd", lr_rule=(0.1, 512),
                wd=1e-4, wd_params="all", zero_init_last=False, warmup_epochs=5, warmup_lr=1e-5,
                min_lr=0.0, color_jitter=0.4, input_size=224, crop_pct=0.875, label_batch=125, workers=8)
RECIPES = {
    # Table 3 "FKD (Ours)", official README: "same as ReLabel while initial lr = 0.1 x batch/512";
    # its code is not public: warmup as train_ViT_FKD.py (per epoch from 1e-5; ReLabel's goes per
    # iteration from 0, with its cosine counted after the warmup), colour jitter as ReLabel's
    "resnet50": dict(RESNET50, reported="80.1% top-1, ResNet-50 (Table 3, with warmup and colour jitter)"),
    # Table 3 "w/o warmup & colorj": train_FKD.py as its README runs it (--lr 0.1 -b 1024, unscaled)
    "resnet50-plain": dict(RESNET50, warmup_epochs=0, warmup_lr=0.0, color_jitter=0.0, lr_rule=(0.1, 1024),
                           reported="79.8% top-1, ResNet-50 (Table 3, w/o warmup & colorj; train_FKD.py)"),
    # Table 5 "ViT w/ FKD": train_ViT_FKD.py (timm AdamW, cosine, 5 single-crop warmup epochs)
    "vit": dict(RESNET50, arch="deit_tiny_patch16_224", opt="adamw", lr_rule=(0.002, 1024), wd=0.05,
                wd_params="weights", zero_init_last=None, min_lr=1e-5, color_jitter=0.0,
                reported="75.2% top-1, ViT-T (Table 5; train_ViT_FKD.py)"),
    "demo": dict(arch="test_efficientnet", teacher=None, stored_crops=16, crop_scale=[0.08, 1.0],
                 codec="ms", k=5, epochs=16, batch_size=64, num_crops=4, opt="sgd", lr_rule=(0.8, 512),
                 wd=5e-4, wd_params="weights", zero_init_last=None, warmup_epochs=0, warmup_lr=0.0,
                 min_lr=0.0, color_jitter=0.0, input_size=64, crop_pct=1.0, label_batch=128, workers=2,
                 reported=None),  # laptop-sized, no paper number
}
DEMO_TEACHER = "test_resnet"
SIZE_CHECK_LIMIT = 50_000  # images whose sizes are checked at start; larger sets: as each is loaded
# not recorded in (nor compared with) a checkpoint: they only steer labels or output
NOT_TRAINING_FLAGS = ("overwrite_labels", "import_from", "import_layout", "import_label_type", "show_images")



FLAGS = [  # flag, kind (a common.flags parser checks the value), help[, argparse extras]
    ("--data", str, "ImageFolder root with train/ and val/, or 'demo'", dict(required=True)),
    ("--val-data", "append", "extra ImageFolder to evaluate on (same classes)", dict(default=[])),
    ("--mode", ["fkd", "label", "online", "ce", "show", "import"], "", dict(default="fkd")),
    ("--recipe", sorted(RECIPES), "default: demo for --data demo, else resnet50"),
    ("--out", str, "output folder (default: a fresh runs/fkd_<data>_<mode>/<time> per run)"),
    ("--labels", str, "label store (default: runs/fkd_labels/<data>-<hash of the label settings>)"),
    ("--overwrite-labels", "store_true", "make the label store again from the start"),
    ("--verify-images", "store_true", "check every image's file hash against the store (default: 64 of them)"),
    ("--import-from", str, "--mode import: folder of the authors' released label files"),
    ("--import-layout", ["fkd", "meal"], "released tree: fkd (train/<class>/<name>.tar) or meal (one more "
     "folder level)", dict(default="fkd")),
    ("--import-label-type", ["marginal_renorm"], "--mode import: decode top-K files with re-norm (Eq. 6-7) "
     "instead of smoothing (Eq. 5); the released files are identical"),
    ("--arch", str, "student timm model"),
    ("--init", str, "student initial weights: timm tag or NAME=PATH (default: random)"),
    ("--teacher", "append", f"NAME or NAME=PATH[?input_size=..]; repeat for an ensemble ({L2_TEACHER}; "
     "demo: a cached demo teacher)"),
    ("--zero-init-last", argparse.BooleanOptionalAction, "timm ResNets: zero-init each block's last BN "
     "gamma (the ResNet-50 recipes don't, as the official code)"),
    ("--stored-crops", flags.positive_int, "M, crops stored per image (paper: 500)"),
    ("--crop-scale", flags.open_fraction, "RandomResizedCrop area range", dict(nargs=2)),
    ("--crop-ratio", flags.positive_float, "", dict(nargs=2, default=(3 / 4, 4 / 3))),
    ("--codec", CODECS, "label compression, Sec. 3.5"),
    ("--k", flags.positive_int, "top-K of the ms/mr codecs"),
    ("--temperature", flags.positive_float, "softmax temperature (official 1)", dict(default=1.0)),
    ("--stores", ["probs", "logits"], "logits: SSL variant, Sec. 3.4", dict(default="probs")),
    ("--label-dim", flags.positive_int, "--stores logits: width of the teacher's outputs"),
    ("--label-batch", flags.positive_int, "crops per teacher forward"),
    ("--teacher-amp", "store_true", "teachers under --amp too (default fp32, as the official code)"),
    ("--flush-every", flags.positive_int, "images marked done together (the most a kill redoes per rank)",
     dict(default=64)),
    ("--num-crops", flags.positive_int, "m, crops of one image in a batch (official 4)"),
    ("--epochs", flags.positive_int, ""),
    ("--batch-size", flags.positive_int, "global batch in crops (all ranks)"),
    ("--lr", flags.positive_float, "default: the recipe's linear scaling rule"),
    ("--wd", flags.nonneg_float, ""),
    ("--wd-params", ["all", "weights"], "decay all parameters, or weights only"),
    ("--opt", ["sgd", "adamw"], ""),
    ("--momentum", flags.fraction_below_one, "", dict(default=0.9)),
    ("--warmup-epochs", flags.nonneg_int, "single-crop warmup epochs"),
    ("--warmup-lr", flags.nonneg_float, "lr of the first warmup epoch"),
    ("--min-lr", flags.nonneg_float, ""),
    ("--color-jitter", flags.nonneg_float, "jitter on the replayed crops (0 = off)"),
    ("--input-size", flags.positive_int, "student training resolution"),
    ("--interpolation", flags.interpolation, "student crop resize", dict(default="bilinear")),
    ("--crop-pct", flags.open_fraction, "eval center-crop fraction (0.875: 256 -> 224)"),
    ("--mixup", flags.nonneg_float, "mixup alpha on soft labels (0 = off)", dict(default=0.0)),
    ("--cutmix", flags.nonneg_float, "cutmix alpha on soft labels (0 = off)", dict(default=0.0)),
    ("--eval-only", "store_true", "evaluate --init and exit"),
    ("--show-images", flags.positive_int, "images in the --mode show picture", dict(default=6)),
]


def parse_args(argv=None):
    """Returns (args, explicit): the flags given on the command line are never overridden by the recipe."""
    parser = flags.build_parser(__doc__.split("\n\n")[0], FLAGS, "the student")
    args, explicit = parser.parse_args(argv), flags.given(parser, argv)
    # flags this mode would not use; the store's flags stay accepted in online / ce: one command, three modes
    flags.refuse_ignored(explicit, [
        (args.mode != "import", f"--mode {args.mode}", ("import_from", "import_layout", "import_label_type")),
        (args.mode in ("online", "ce", "import"), f"--mode {args.mode} (no label store checked)",
         ("verify_images",))])
    args.recipe = args.recipe or ("demo" if args.data == "demo" else "resnet50")
    flags.fill_from(args, RECIPES[args.recipe])  # "reported", "lr_rule": no flags
    if "lr" not in explicit:  # linear scaling rule of the paper's recipes
        base, per = lr_rule(args, RECIPES[args.recipe])
        args.lr = base * args.batch_size / per
    return args, explicit


def lr_rule(args, recipe):
    """(base lr, per batch) of the linear scaling rule: the recipe's, or the paper's for another --opt."""
    return recipe["lr_rule"] if args.opt == recipe["opt"] else (0.1, 512) if args.opt == "sgd" else (0.002, 1024)


def describe_recipe(args, explicit):
    """One line: the recipe in use and every value that differs from it."""
    recipe = RECIPES[args.recipe]
    (base, per), paper = lr_rule(args, recipe), recipe["reported"]
    diffs = [f"--{key.replace('_', '-')} {getattr(args, key)} (recipe {value})" for key, value in recipe.items()
             if key in explicit and key not in ("label_batch", "workers") and getattr(args, key) != value]
    if "lr" in explicit or args.opt != recipe["opt"]:
        diffs.append(f"--lr {args.lr:g} (recipe {base:g} x batch/{per})")
    return (f"recipe {args.recipe}: " + (f"the paper's {paper}" if paper else "laptop-sized, no paper number")
            + ("; differs from it in " + ", ".join(diffs) if diffs else "; no changes")
            + (f"; lr {args.lr:g} for batch {args.batch_size}" if "lr" not in explicit else ""))


def check_args(args, explicit, world):
    """Inconsistent flags (each flag's own range is checked when it is parsed): one sentence each."""
    for bad, message in (
            (args.batch_size % (args.num_crops * world), f"--batch-size {args.batch_size} must be divisible "
             f"by --num-crops x processes = {args.num_crops * world}"),
            (args.mode == "fkd" and args.num_crops > args.stored_crops, f"--num-crops {args.num_crops} exceeds "
             f"the {args.stored_crops} crops stored per image; lower --num-crops or raise --stored-crops"),
            *[(low > high, f"--{flag} {low:g} {high:g} needs low <= high")
              for flag, (low, high) in (("crop-scale", args.crop_scale), ("crop-ratio", args.crop_ratio))],
            (args.stores == "logits" and args.codec != "full", "--stores logits needs --codec full"),
            (args.stores == "logits" and len(args.teacher or []) > 1, "--stores logits takes one --teacher"),
            (args.stores == "logits" and args.mode not in ("fkd", "label", "show"), "--stores logits describes "
             "a label store: use it with --mode fkd, label or show"),
            (args.stores == "probs" and "label_dim" in explicit, "--label-dim is for --stores logits only"),
            (args.mode == "import" and not args.import_from,
             "--mode import needs --import-from DIR (the folder of the released labels)"),
            (args.resume and args.overwrite,
             "--resume continues a run and --overwrite starts it over; pass only one")):
        if bad:
            raise SystemExit(f"error: {message}")


def main(argv=None):
    args, explicit = parse_args(argv)
    run_main(lambda ctx: run(args, explicit, ctx), args, (DataError, ModelError, StoreError, FloatingPointError))


if __name__ == "__main__":
    main()
