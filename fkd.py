"""FKD: fast knowledge distillation with stored region-level soft labels.

Paper: Zhiqiang Shen and Eric Xing, "A Fast Knowledge Distillation Framework for Visual
Recognition", ECCV 2022 (arXiv 2112.01528); shared/papers/fkd.txt.

Phase 1 (label generation, Sec. 3.1): for every training image sample M random-resized crops and
flips, run the teacher(s) on each crop at the teacher's own resolution and normalization, and store
the crop boxes, flips and compressed soft labels (Sec. 3.5) in a label store (common/labels.py).
Phase 2 (training, Sec. 3.1 and 3.3): each image of a batch replays `--num-crops` of its stored
crops exactly; the student learns from the stored soft labels with a soft cross-entropy, so no
teacher runs during training.

Modes:
  fkd     phase 1 for images not labeled yet (resumable; a no-op when the store is complete), then phase 2
  label   phase 1 only
  online  vanilla KD baseline: same student, loss and crop pipeline, teacher forward on fresh crops every step
  ce      plain cross-entropy on the image label, same crop pipeline (no teacher)
  show    PNG grid of stored crops with their top-K labels (the paper's Fig. 2 idea)

Equation map:
  Sec. 3.1  P_i = T(R_i), ensemble = mean of softmax      -> common/models.py teacher_logits(), ensemble_probs()
  Sec. 3.1  L = -sum_i P_i log S(R_i)                     -> soft_cross_entropy()
  Eq. 3-7   hard / smooth / marginal smoothing / re-norm  -> common/labels.py encode(), decode()
  Sec. 3.3  m crops of one image per batch, serrated lr   -> common/labels.py StoredCrops, crop_schedule(); pass_plan()
  Sec. 3.4  SSL variant: `--stores logits --codec full`, temperature applied at training time

Commands:
  CPU demo   python fkd.py --data demo
  1 GPU      python fkd.py --data /imagenet --batch-size 256 --amp   (lr = 0.1 x 256/512)
  8 GPUs     torchrun --nproc_per_node=8 fkd.py --data /imagenet --amp
  2 nodes    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
                 fkd.py --data /imagenet --labels /shared/fkd_labels --out /shared/fkd_run --amp
  labels only, then train:   ... fkd.py --data /imagenet --mode label;  ... fkd.py --data /imagenet
Batch sizes are global (all GPUs together), counted in crops, as in the paper.
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler
from timm.scheduler import CosineLRScheduler

from common import ckpt, demo
from common.crops import replay_crops, sample_crops
from common.data import (DataError, FreshCrops, TaggedSampler, eval_loader, evaluate, image_folder,
                         eval_transform, load_rgb, loader, mix_batch)
from common.dist import seed_everything, setup, cleanup, unwrap
from common.labels import (CODECS, LabelStore, StoreError, StoredCrops, decode, decode_stored_batch, encode,
                           image_list_hash)
from common.models import (ModelError, create, ensemble_probs, load_teachers, make_optimizer, normalize,
                           param_groups, teacher_logits)

# Paper recipe (ResNet-50, 80.1% top-1) for real data; a laptop-sized recipe for the demo.
PRESETS = {
    "imagenet": dict(arch="resnet50", teacher=["tf_efficientnet_l2.ns_jft_in1k_475"], epochs=300,
                     batch_size=1024, base_lr=0.1, wd=1e-4, opt="sgd", stored_crops=500, num_crops=4,
                     crop_scale=(0.08, 0.936), input_size=224, warmup_epochs=0, min_lr=0.0,
                     label_batch=125, workers=8, crop_pct=0.875, out="runs/fkd"),
    "demo": dict(arch="test_efficientnet", teacher=None, epochs=16, batch_size=64, base_lr=0.8, wd=5e-4,
                 opt="sgd", stored_crops=16, num_crops=4, crop_scale=(0.08, 1.0), input_size=64,
                 warmup_epochs=0, min_lr=0.0, label_batch=128, workers=2, crop_pct=1.0, out="runs/fkd_demo"),
}
DEMO_TEACHER = "test_resnet"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and val/, or 'demo'")
    p.add_argument("--val-data", action="append", default=[], help="extra ImageFolder to evaluate on "
                   "(same class folders; e.g. ImageNetV2); repeatable")
    p.add_argument("--mode", default="fkd", choices=["fkd", "label", "online", "ce", "show"])
    p.add_argument("--out", help="output folder (metrics.jsonl, last.pth, best.pth)")
    p.add_argument("--labels", help="label store folder (default: OUT/labels)")
    # models
    p.add_argument("--arch", help="student timm model (default resnet50; demo: test_efficientnet)")
    p.add_argument("--init", help="student initial weights: timm tag or NAME=PATH (default: random)")
    p.add_argument("--teacher", action="append", help="teacher NAME or NAME=PATH; repeat for an "
                   "ensemble (default tf_efficientnet_l2.ns_jft_in1k_475; demo: a cached demo teacher)")
    # label generation
    p.add_argument("--stored-crops", type=int, help="M, crops stored per image (paper: 500)")
    p.add_argument("--crop-scale", type=float, nargs=2, help="RandomResizedCrop area range "
                   "(default 0.08 0.936 for the L2-475 teacher)")
    p.add_argument("--crop-ratio", type=float, nargs=2, default=(3 / 4, 4 / 3))
    p.add_argument("--codec", default="ms", choices=CODECS, help="label compression, Sec. 3.5")
    p.add_argument("--k", type=int, default=5, help="top-K of the ms/mr codecs")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (official 1)")
    p.add_argument("--stores", default="probs", choices=["probs", "logits"],
                   help="logits = SSL variant, Sec. 3.4 (needs --codec full)")
    p.add_argument("--label-batch", type=int, help="crops per teacher forward")
    p.add_argument("--flush-every", type=int, default=64, help="images whose rows are flushed and "
                   "marked done together (work redone after a kill is at most this much per rank)")
    # training
    p.add_argument("--num-crops", type=int, help="m, crops of one image in a batch (official 4)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch in crops (all ranks)")
    p.add_argument("--lr", type=float, help="default 0.1 x batch/512 (sgd), 0.002 x batch/1024 (adamw)")
    p.add_argument("--base-lr", type=float, help=argparse.SUPPRESS)
    p.add_argument("--wd", type=float)
    p.add_argument("--opt", choices=["sgd", "adamw"])
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--warmup-epochs", type=int)
    p.add_argument("--min-lr", type=float)
    p.add_argument("--input-size", type=int, help="student training resolution")
    p.add_argument("--interpolation", default="bilinear", help="student crop resize (official bilinear)")
    p.add_argument("--crop-pct", type=float, help="eval center-crop fraction (default 0.875: 256 -> 224)")
    p.add_argument("--mixup", type=float, default=0.0, help="mixup alpha on soft labels (0 = off)")
    p.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha on soft labels (0 = off)")
    # run
    p.add_argument("--workers", type=int, help="DataLoader workers per rank")
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", help="checkpoint to continue, or 'auto' for OUT/last.pth")
    p.add_argument("--overwrite", action="store_true", help="start over in an OUT holding a run")
    p.add_argument("--eval-only", action="store_true", help="evaluate --init and exit")
    p.add_argument("--stop-epoch", type=int, help="stop after this epoch as if interrupted (split a run "
                   "into time-limited jobs; continue with --resume auto)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--show-images", type=int, default=6, help="images in the --mode show grid")
    args = p.parse_args(argv)

    preset = PRESETS["demo" if args.data == "demo" else "imagenet"]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.lr is None:  # linear scaling rule of the paper's recipes
        args.lr = args.base_lr * args.batch_size / 512 if args.opt == "sgd" else 0.002 * args.batch_size / 1024
    args.labels = args.labels or os.path.join(args.out, "labels")
    return args


def check_args(args, world):
    """Out-of-range or inconsistent flags: one sentence each."""
    def need(ok, message):
        if not ok:
            raise SystemExit(f"error: {message}")
    need(args.stored_crops >= 1 and args.num_crops >= 1 and args.epochs >= 1, "--stored-crops, "
         "--num-crops and --epochs must be >= 1")
    need(args.batch_size % (args.num_crops * world) == 0, f"--batch-size {args.batch_size} must be "
         f"divisible by --num-crops x processes = {args.num_crops * world}")
    need(args.mode not in ("fkd",) or args.num_crops <= args.stored_crops, f"--num-crops "
         f"{args.num_crops} exceeds the {args.stored_crops} crops stored per image")
    need(0 < args.crop_scale[0] <= args.crop_scale[1] <= 1, "--crop-scale needs 0 < low <= high <= 1")
    need(args.temperature > 0 and args.lr > 0, "--temperature and --lr must be > 0")
    need(args.codec not in ("ms", "mr") or args.k >= 1, f"--k {args.k} must be >= 1 for the top-K codecs (the paper uses 5)")
    need(args.stores == "probs" or args.codec == "full", "--stores logits needs --codec full")
    need(args.stores == "probs" or len(args.teacher or []) == 1, "--stores logits takes one --teacher")


# ----------------------------------------------------------------------------------------------
# Phase 1: label generation (Sec. 3.1 "Label Generation Phase")
# ----------------------------------------------------------------------------------------------
class CropsForTeachers(Dataset):
    """Item (image n, crop block j) -> the block's crops resized for each teacher view.

    Crops depend only on (seed, n): boxes are drawn for all M crops of the image and block j is a
    fixed slice, so the teacher's batches, and hence the stored bytes, never depend on worker count,
    rank count or restarts.
    """

    def __init__(self, samples, items, num_crops, block, views, scale, ratio, seed):
        self.samples, self.items, self.num_crops, self.block = samples, items, num_crops, block
        self.views, self.scale, self.ratio, self.seed = views, scale, ratio, seed

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        n, j = self.items[i]
        image = load_rgb(self.samples[n][0])
        boxes, flips = sample_crops(self.seed, n, image.width, image.height, self.num_crops,
                                    self.scale, self.ratio)
        part = slice(j * self.block, (j + 1) * self.block)
        views = [replay_crops(image, boxes[part], flips[part], size, interp) for size, interp in self.views]
        return n, j, torch.from_numpy(boxes[part]), torch.from_numpy(flips[part]), views


def store_meta(args, train_set, teachers):
    """Everything that determines the store's bytes; a resumed generation must match all of it."""
    return {
        "codec": args.codec, "k": args.k if args.codec in ("ms", "mr") else 1,
        "num_crops": args.stored_crops, "num_classes": len(train_set.classes),
        "num_images": len(train_set), "image_list_sha256": image_list_hash(train_set.samples, train_set.root),
        "classes_sha256": image_list_hash([(c, i) for i, c in enumerate(train_set.classes)], ""),
        "teachers": [{"name": ex["name"], "sha256": ex["sha256"], **ex["data_config"]} for _, ex in teachers],
        "crop_scale": list(args.crop_scale), "crop_ratio": list(args.crop_ratio),
        "temperature": args.temperature, "stores": args.stores, "seed": args.seed,
    }


def complete_store(path):
    """The store at `path` if it exists and every image is labeled, else None."""
    if not os.path.isfile(os.path.join(path, "meta.json")):
        return None
    store = LabelStore.open(path)
    return store if np.asarray(store.done).all() else None


def generate_labels(args, ctx, train_set, teachers):
    """Label every image not marked done; under torchrun each rank takes a disjoint share."""
    meta = store_meta(args, train_set, teachers)
    if ctx.main:
        if os.path.isfile(os.path.join(args.labels, "meta.json")):
            existing = LabelStore.open(args.labels)
            diffs = [k for k in meta if existing.meta.get(k) != meta[k]]
            if diffs:
                raise StoreError(f"label store {args.labels} was generated with other settings "
                                 f"({', '.join(diffs)} differ); pass the same flags to resume it, "
                                 f"or another --labels folder")
        else:
            LabelStore.create(args.labels, meta)
    ctx.barrier()
    store = LabelStore.open(args.labels, writable=True)
    todo = np.flatnonzero(np.asarray(store.done) == 0)
    mine = np.array_split(todo, ctx.world)[ctx.rank]  # contiguous shares: ranks never share a row
    if len(todo) == 0:
        ctx.print(f"label store {args.labels} is complete ({store.meta['num_images']} images x "
                  f"{store.meta['num_crops']} crops)")
        return store
    blocks = math.ceil(args.stored_crops / args.label_batch)
    views = [(ex["data_config"]["input_size"], ex["data_config"]["interpolation"]) for _, ex in teachers]
    dataset = CropsForTeachers(train_set.samples, [(int(n), j) for n in mine for j in range(blocks)],
                               args.stored_crops, args.label_batch, views, args.crop_scale,
                               args.crop_ratio, args.seed)
    data = loader(dataset, None, args.workers, device=ctx.device)
    ctx.print(f"generating labels: {len(todo)} images x {args.stored_crops} crops, codec {args.codec}, "
              f"{len(teachers)} teacher(s), {ctx.world} process(es) -> {args.labels}")
    start, pending = time.time(), []
    with ctx.bar(total=len(mine), desc="labels", unit="img") as bar:
        for n, j, boxes, flips, images in data:
            images = [x.to(ctx.device, non_blocking=True) for x in images]
            logits = teacher_logits(teachers, images, args.amp)
            if args.stores == "logits":  # Sec. 3.4: keep pre-softmax outputs, temperature at training
                indices, values = encode(logits[0], "full")
            else:
                indices, values = encode(ensemble_probs(logits, args.temperature), args.codec, args.k)
            part = slice(j * args.label_batch, j * args.label_batch + len(boxes))
            store.write(n, part, boxes.numpy(), flips.numpy(),
                        None if indices is None else indices.cpu().numpy(),
                        None if values is None else values.cpu().numpy())
            if j == blocks - 1:
                pending.append(n)
                bar.update(1)
                if len(pending) >= args.flush_every:
                    store.mark_done(pending)
                    pending = []
        store.mark_done(pending)
    store.close()
    ctx.barrier()
    elapsed = time.time() - start
    ctx.print(f"labels done: {len(todo)} images in {elapsed:.0f}s "
              f"({len(todo) * args.stored_crops / max(elapsed, 1e-9):.0f} crops/s), "
              f"{store.bytes_per_crop():.1f} bytes/crop")
    return store


# ----------------------------------------------------------------------------------------------
# Phase 2: training on stored crops (Sec. 3.1 "Training Phase", Sec. 3.3)
# ----------------------------------------------------------------------------------------------
def soft_cross_entropy(logits, targets, temperature=1.0):
    """L = -sum_c P_c log S_c, batch mean (Sec. 3.1). As the official code: T divides the student
    logits only, no T^2 factor."""
    return -(targets * F.log_softmax(logits / temperature, dim=1)).sum(dim=1).mean()


def pass_plan(epochs, m):
    """[(first epoch, crops per image, epochs covered)] of the official loop (Sec. 3.3).

    One pass over the images with m crops each = m epochs of samples at one learning rate (the
    "serrated" cosine); the last m epochs run one crop per image, one epoch per pass.
    """
    plan, epoch = [], 0
    while epoch < epochs:
        if epoch < epochs - m:
            plan.append((epoch, m, m))
            epoch += m
        else:
            plan.append((epoch, 1, 1))
            epoch += 1
    return plan


def build_train_loader(args, ctx, train_set, store, m, views, teacher_mode):
    if args.mode == "fkd":
        dataset = StoredCrops(train_set.samples, store, m, args.input_size, args.interpolation, args.seed)
    else:
        dataset = FreshCrops(train_set.samples, m, args.input_size, args.interpolation,
                             views if teacher_mode else [], args.crop_scale, args.crop_ratio, args.seed)
    # shuffled by (seed, epoch) alone, also with one process, so a resumed run sees the same order
    sampler = TaggedSampler(DistributedSampler(dataset, ctx.world, ctx.rank, shuffle=True, seed=args.seed,
                                               drop_last=True))
    images_per_batch = args.batch_size // (m * ctx.world)
    return loader(dataset, images_per_batch, args.workers, sampler, ctx.device, drop_last=True), sampler


def targets_for_batch(args, batch, store, teachers, num_classes, device):
    """Images (uint8, flattened to B crops) and soft targets [B, C] for one batch of any mode."""
    if args.mode == "fkd":
        crops, indices, values, labels = batch
        logits_t = args.temperature if store.meta["stores"] == "logits" else None
        targets = decode_stored_batch(indices, values, store.meta, device, logits_t)  # Eq. 3-7 decode
    else:
        crops, views, labels = batch
        if args.mode == "online":  # vanilla KD: the teacher runs on this step's crops
            views = [v.to(device, non_blocking=True).flatten(0, 1) for v in views]
            targets = ensemble_probs(teacher_logits(teachers, views, args.amp), args.temperature)
        else:
            targets = F.one_hot(labels.repeat_interleave(crops.shape[1]).to(device), num_classes).float()
    crops = crops.to(device, non_blocking=True).flatten(0, 1)
    labels = labels.repeat_interleave(crops.shape[0] // labels.shape[0])
    return crops, targets, labels


def train(args, ctx, train_set, val_sets, store, teachers, student, student_cfg):
    num_classes = len(train_set.classes)
    model = student.to(ctx.device)
    if ctx.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if ctx.distributed:
        model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    optimizer = make_optimizer(args.opt, param_groups(unwrap(model), args.wd), args.lr, args.momentum)
    scheduler = CosineLRScheduler(optimizer, t_initial=args.epochs, lr_min=args.min_lr,
                                  warmup_t=args.warmup_epochs, warmup_lr_init=args.lr * 0.01 if args.warmup_epochs else 0)
    scaler = torch.amp.GradScaler(enabled=args.amp and ctx.device.type == "cuda")
    mix_generator = torch.Generator().manual_seed(args.seed + ctx.rank)
    checkpoint = ckpt.Checkpointer(args.out, ctx, args.resume, args.overwrite, model=unwrap(model),
                                   optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                   mix_generator=mix_generator)
    start_epoch, best = checkpoint.restore()

    views = [(ex["data_config"]["input_size"], ex["data_config"]["interpolation"]) for _, ex in teachers]
    data, sampler, loader_crops = None, None, None
    plan = pass_plan(args.epochs, args.num_crops)
    position = 0  # crops consumed per image so far (the non-overlapping schedule's stream position)
    metrics = {}
    run_start = time.time()
    for epoch, m, covered in plan:
        if epoch < start_epoch:
            position += m
            continue
        if m != loader_crops:  # the last passes use one crop per image: a new loader (old workers end)
            data = sampler = None
            data, sampler = build_train_loader(args, ctx, train_set, store, m, views, args.mode == "online")
            loader_crops = m
        sampler.set_epoch(epoch, position if args.mode == "fkd" else epoch)
        scheduler.step(epoch)  # lr constant for the whole pass: the serrated cosine of Sec. 3.3
        model.train()
        seen, loss_sum, correct, pass_start = 0, 0.0, 0, time.time()
        for batch in ctx.bar(data, desc=f"epoch {epoch + 1}-{epoch + covered}/{args.epochs}"):
            crops, targets, labels = targets_for_batch(args, batch, store, teachers, num_classes, ctx.device)
            images = normalize(crops, student_cfg["mean"], student_cfg["std"])
            if args.mixup > 0 or args.cutmix > 0:
                images, targets = mix_batch(images, targets, args.mixup, args.cutmix, mix_generator)
            with torch.autocast(ctx.device.type, enabled=args.amp and ctx.device.type == "cuda"):
                logits = model(images)
            loss = soft_cross_entropy(logits.float(), targets, args.temperature)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            seen += len(labels)
            loss_sum += loss.item() * len(labels)
            correct += (logits.argmax(1).cpu() == labels).sum().item()
        seen, loss_sum, correct = ctx.all_reduce_sum([seen, loss_sum, correct])
        ckpt.check_finite(loss_sum, epoch, args.out)
        position += m
        metrics = {"epoch": epoch + covered, "crops_per_image": m, "lr": optimizer.param_groups[0]["lr"],
                   "train_loss": loss_sum / max(seen, 1), "train_crop_top1": 100 * correct / max(seen, 1),
                   "train_crops": int(seen), "train_time": time.time() - pass_start}
        for name, val_loader in val_sets.items():
            result = evaluate(model, val_loader, ctx, student_cfg["mean"], student_cfg["std"], args.amp, desc=name)
            metrics.update({f"{name}_top1": result["top1"], f"{name}_top5": result["top5"],
                            f"{name}_count": result["count"]})
        best = max(best, metrics["val_top1"])
        if checkpoint.end_epoch(metrics, best, args, arch=args.arch, num_classes=num_classes,
                                data_config=student_cfg):
            break
    return metrics, best, time.time() - run_start


# ----------------------------------------------------------------------------------------------
# Label visualizer (the paper's Fig. 2 idea)
# ----------------------------------------------------------------------------------------------
def show_labels(store, train_set, path, num_images=6, crops_per_image=6, size=128):
    """PNG grid: per row one image's stored crops (replayed), each with its top-3 stored classes."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(0)
    images = rng.choice(len(train_set), size=min(num_images, len(train_set)), replace=False)
    crops_per_image = min(crops_per_image, store.meta["num_crops"])
    canvas = Image.new("RGB", (crops_per_image * size, len(images) * (size + 36)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, n in enumerate(images):
        boxes, flips, indices, values = store.read(int(n), np.arange(crops_per_image))
        crops = replay_crops(load_rgb(train_set.samples[n][0]), boxes, flips, size)
        probs = decode(None if indices is None else torch.from_numpy(indices),
                       None if values is None else torch.from_numpy(values), store.meta["codec"],
                       store.meta["num_classes"], store.meta["temperature"] if store.meta["stores"] == "logits" else None)
        for col in range(crops_per_image):
            x, y = col * size, row * (size + 36)
            canvas.paste(Image.fromarray(crops[col].permute(1, 2, 0).numpy()), (x, y))
            top = probs[col].topk(min(3, probs.shape[1]))
            text = "\n".join(f"{train_set.classes[c][:10]} {p:.2f}" for p, c in zip(top.values.tolist(), top.indices.tolist()))
            draw.text((x + 2, y + size), text, fill="black")
    canvas.save(path)
    return path


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    ctx = setup(args.device)
    try:
        run(args, ctx)
    except (DataError, ModelError, StoreError, FloatingPointError) as error:
        raise SystemExit(f"error: {error}")
    finally:
        cleanup()


def run(args, ctx):
    seed_everything(args.seed, ctx.rank)
    start = time.time()
    root = demo.ensure_data(ctx) if args.data == "demo" else args.data
    if args.data == "demo" and args.mode != "ce":
        args.teacher = demo.resolve_teachers(args.teacher, [DEMO_TEACHER], ctx, log=ctx.print)
    check_args(args, ctx.world)
    train_set = image_folder(root, "train")
    num_classes = len(train_set.classes)
    if args.codec in ("ms", "mr") and args.k >= num_classes:
        raise SystemExit(f"error: --k {args.k} must be smaller than the {num_classes} classes; lower --k")
    if args.amp and ctx.device.type != "cuda":
        ctx.print("note: --amp applies to CUDA only; running in fp32 on CPU")
    store = None
    if args.mode in ("fkd", "label", "show"):
        store = complete_store(args.labels)
        if store is None and args.mode == "show":
            raise StoreError(f"no complete label store at {args.labels}; generate it with --mode label")
    # phase 2 needs no teacher once the store is complete (the demo still scores its teacher)
    need_teachers = args.mode == "online" or (args.mode in ("fkd", "label") and store is None) or \
        (args.data == "demo" and args.mode != "ce")
    teachers = load_teachers(args.teacher, num_classes, ctx.device) if need_teachers else []
    if store is None and args.mode in ("fkd", "label"):
        store = generate_labels(args, ctx, train_set, teachers)
    if args.mode == "show":
        if ctx.main:
            path = show_labels(store, train_set, os.path.join(args.out, "labels.png"), args.show_images)
            ctx.print(f"wrote {path}")
        return
    if args.mode == "label":
        return
    if store is not None:  # training refuses a store built for other images, classes or codec
        store.check_matches({"num_images": len(train_set), "num_classes": num_classes,
                             "image_list_sha256": image_list_hash(train_set.samples, train_set.root),
                             "codec": args.codec, "temperature": args.temperature, "stores": args.stores})
        if args.num_crops > store.meta["num_crops"]:
            raise StoreError(f"--num-crops {args.num_crops} exceeds the {store.meta['num_crops']} crops "
                             f"stored per image in {args.labels}; lower --num-crops")
    teachers_for_training = teachers if args.mode == "online" else []

    torch.manual_seed(args.seed)  # the student's init depends on the seed alone
    student, extra = create(args.init or args.arch, num_classes,
                            pretrained_head="reset" if args.init else "none")
    # train crops and eval resize use the official protocol (bilinear, resize 256 / crop 224 at 224)
    student_cfg = dict(extra["data_config"], input_size=args.input_size, crop_pct=args.crop_pct,
                       interpolation=args.interpolation)
    val_transform = eval_transform(args.input_size, student_cfg["crop_pct"], student_cfg["interpolation"])
    val_sets = {"val": eval_loader(image_folder(root, "val", val_transform, train_set.classes),
                                   args.batch_size, args.workers, ctx)}
    for i, extra_root in enumerate(args.val_data):  # e.g. ImageNetV2: DIR/<class>/<image>
        val_sets[f"extra{i}"] = eval_loader(image_folder(extra_root, "", val_transform, train_set.classes),
                                            args.batch_size, args.workers, ctx)
    if args.eval_only:
        result = evaluate(student.to(ctx.device), val_sets["val"], ctx, student_cfg["mean"], student_cfg["std"])
        ctx.print(f"eval {args.init or args.arch}: top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}% "
                  f"on {result['count']} images")
        return

    teacher_top1 = None
    if args.data == "demo" and teachers:
        teacher, tex = teachers[0]
        cfg = tex["data_config"]
        tval = eval_loader(image_folder(root, "val", eval_transform(cfg["input_size"], cfg["crop_pct"], cfg["interpolation"]),
                                        train_set.classes), args.batch_size, args.workers, ctx, persistent=False)
        teacher_top1 = evaluate(teacher, tval, ctx, cfg["mean"], cfg["std"], desc="teacher")["top1"]

    del teachers
    metrics, best, train_time = train(args, ctx, train_set, val_sets, store, teachers_for_training, student, student_cfg)
    summary = (f"FKD summary: mode {args.mode}, student {args.arch}, {args.epochs} epochs, "
               + (f"teacher top-1 {teacher_top1:.2f}%, " if teacher_top1 is not None else "")
               + f"student top-1 {metrics.get('val_top1', float('nan')):.2f}% (best {best:.2f}%), "
               f"train {train_time:.0f}s, total {time.time() - start:.0f}s, out {args.out}")
    ctx.print(summary)
    if ctx.main:
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump({"mode": args.mode, "teacher_top1": teacher_top1, "final": metrics, "best_top1": best,
                       "train_time": train_time, "total_time": time.time() - start}, f, indent=1)


if __name__ == "__main__":
    main()
