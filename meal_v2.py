"""MEAL V2: distill a teacher ensemble into a well-initialized student, with a discriminator.

Paper: Zhiqiang Shen and Marios Savvides, "MEAL V2: Boosting Vanilla ResNet-50 to 80%+ Top-1
Accuracy on ImageNet without Tricks", 2020 (arXiv 2009.08453); shared/papers/meal_v2.txt.
Fast route: FKD paper Table 4 ("Fast MEAL V2"): the same training from an FKD label store made
with the same teacher ensemble, so no teacher runs during training.

The student starts from pretrained weights (the paper's "good initialization"), learns only from
the teachers' averaged softmax (no hard labels, no weight decay), and a small discriminator tells
teacher-ensemble outputs from student outputs.

Equation map:
  Eq. 1   p_e = (1/K) sum_t p_t                       -> common/models.py ensemble_probs()
  Eq. 2-3 L_KL / L_CE = -(1/N) sum p_e log p_S         -> soft_cross_entropy()
  Eq. 4   L_D = BCE(D(teacher), 1) + BCE(D(student), 0) -> discriminator_loss()
  Eq. 5   p_D = sigmoid(f(x)), f = three FC layers     -> Discriminator

Update rule (a deliberate difference from the official code, which summed the KD loss and the
discriminator's loss under one optimizer, so the student was also pushed to look *fake*, and whose
--d_lr was overwritten by the student's schedule): the discriminator takes its own step on Eq. 4
with its own optimizer and lr; then the student takes a step on L_CE + adv_weight x BCE(D(student), 1)
(the standard non-saturating GAN generator loss: the student tries to look like the teachers),
with the discriminator frozen. `--no-disc` drops the discriminator (ablation, paper Fig. 9).

Commands:
  CPU demo   python meal_v2.py --data demo                                   (online teachers)
             python fkd.py --data demo --mode label --codec full --teacher test_resnet \
                 --teacher test_efficientnet --labels runs/meal_v2_demo_labels
             python meal_v2.py --data demo --labels runs/meal_v2_demo_labels      (Fast MEAL V2)
  1 GPU      python meal_v2.py --data /imagenet --batch-size 128 --amp          (lr = 0.01 x 128/512)
  8 GPUs     torchrun --nproc_per_node=8 meal_v2.py --data /imagenet --amp
  2 nodes    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
                 meal_v2.py --data /imagenet --amp
  Fast       torchrun --nproc_per_node=8 fkd.py --data /imagenet --mode label --codec full \
                 --teacher senet154.gluon_in1k --teacher resnet152s.gluon_in1k --labels /data/meal_labels
             torchrun --nproc_per_node=8 meal_v2.py --data /imagenet --labels /data/meal_labels --amp
--batch-size is global (all processes together) and counts crops.
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
from torch.utils.data import DistributedSampler

from common import ckpt, demo
from common.data import DataError, FreshCrops, TaggedSampler, eval_loader, eval_transform, evaluate, image_folder, \
    loader, mix_batch
from common.dist import cleanup, seed_everything, setup, unwrap
from common.labels import LabelStore, StoreError, StoredCrops, decode_stored_batch, image_list_hash
from common.models import (ModelError, create, ensemble_probs, load_teachers, make_optimizer, normalize,
                           param_groups, parse_spec, teacher_logits)

PRESETS = {  # the paper's ResNet-50 recipe; a laptop-sized one for the demo
    "imagenet": dict(arch="resnet50", init="resnet50.ram_in1k", teacher=["senet154.gluon_in1k", "resnet152s.gluon_in1k"],
                     epochs=180, lr_drop_epoch=100, batch_size=512, base_lr=0.01, input_size=224, crop_pct=0.875,
                     workers=8, out="runs/meal_v2"),
    "demo": dict(arch="test_efficientnet", init=None, teacher=None, epochs=16, lr_drop_epoch=12, batch_size=64,
                 base_lr=0.24, input_size=64, crop_pct=1.0, workers=2, out="runs/meal_v2_demo"),
}
TEACHERS_380 = ["tf_efficientnet_b4.ns_jft_in1k", "tf_efficientnet_b4.in1k"]  # the paper's 380 pair
DEMO_TEACHERS, DEMO_STUDENT_INIT_EPOCHS = ("test_resnet", "test_efficientnet"), 6


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and val/, or 'demo'")
    p.add_argument("--val-data", action="append", default=[], help="extra ImageFolder to evaluate on")
    p.add_argument("--out", help="output folder")
    p.add_argument("--arch", help="student timm model")
    p.add_argument("--init", help="student initial weights: timm tag or NAME=PATH, 'none' for random "
                   "(default resnet50.ram_in1k; with --arch: that model's timm weights)")
    p.add_argument("--teacher", action="append", help="teacher NAME or NAME=PATH, repeat for the ensemble "
                   f"(default senet154 + resnet152s gluon at 224; the 380 pair: {' + '.join(TEACHERS_380)})")
    p.add_argument("--labels", help="FKD label store made with the same teachers: Fast MEAL V2 (no teacher runs)")
    p.add_argument("--num-crops", type=int, default=4, help="crops of one image per batch with --labels")
    p.add_argument("--no-disc", action="store_true", help="no discriminator (ablation)")
    p.add_argument("--adv-weight", type=float, default=1.0, help="weight of the student's adversarial term")
    p.add_argument("--d-lr", type=float, default=1e-4, help="discriminator learning rate (Adam)")
    p.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0 = off)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr-drop-epoch", type=int, help="lr x0.1 from this epoch (paper: 100 of 180)")
    p.add_argument("--batch-size", type=int, help="global crops per step")
    p.add_argument("--lr", type=float, help="default 0.01 x batch/512")
    p.add_argument("--base-lr", type=float, help=argparse.SUPPRESS)
    p.add_argument("--wd", type=float, default=0.0, help="weight decay (paper: 0)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--input-size", type=int)
    p.add_argument("--crop-pct", type=float)
    p.add_argument("--workers", type=int)
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", help="checkpoint to continue, or 'auto' for OUT/last.pth")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--stop-epoch", type=int, help="stop after this epoch (continue with --resume auto)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)
    if args.init is None and args.arch is not None and args.data != "demo":
        args.init = args.arch  # a chosen student starts from timm's default pretrained weights for it
    for key, value in PRESETS["demo" if args.data == "demo" else "imagenet"].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.lr is None:
        args.lr = args.base_lr * args.batch_size / 512
    return args


# ----------------------------------------------------------------------------------------------
# Method pieces
# ----------------------------------------------------------------------------------------------
class Discriminator(nn.Module):
    """Eq. 5: three fully connected layers, C -> C/8 -> C/64 -> 1 logit (official 1000 -> 125 -> 15 -> 1
    in spirit), on a class-probability vector. No activation after the last layer (the official
    ReLU there made logits >= 0, so "fake" could never be reached)."""

    def __init__(self, num_classes):
        super().__init__()
        hidden1, hidden2 = max(num_classes // 8, 2), max(num_classes // 64, 2)
        self.layers = nn.Sequential(nn.Linear(num_classes, hidden1), nn.ReLU(inplace=True),
                                    nn.Linear(hidden1, hidden2), nn.ReLU(inplace=True), nn.Linear(hidden2, 1))

    def forward(self, probs):
        return self.layers(probs).squeeze(1)


def discriminator_loss(discriminator, teacher_probs, student_probs):
    """Eq. 4: binary cross-entropy with teacher ensemble = real (1), student = fake (0); one forward
    over both halves (one DDP forward per backward)."""
    logits = discriminator(torch.cat([teacher_probs, student_probs]))
    real = torch.arange(len(logits), device=logits.device) < len(teacher_probs)
    return 2 * F.binary_cross_entropy_with_logits(logits, real.float())


def soft_cross_entropy(logits, targets):
    """Eq. 3: -(1/N) sum_i p_e(x_i) log p_S(x_i). Same gradient as the KL of Eq. 2 (they differ by
    the teachers' entropy, a constant). T = 1, no hard labels."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def batch_targets(batch, store, teachers, device, amp=False):
    """One batch of either route -> (student crops uint8 NCHW, ensemble targets p_e, hard labels)."""
    if store is not None:  # Fast MEAL V2: the stored ensemble p_e of the replayed crops
        crops, indices, values, labels = batch
        targets = decode_stored_batch(indices, values, store.meta, device)
        return crops.flatten(0, 1), targets, labels.repeat_interleave(crops.shape[1])
    crops, views, labels = batch  # online: every teacher on the same crop at its own size
    views = [v.to(device, non_blocking=True).flatten(0, 1) for v in views]
    return crops.flatten(0, 1), ensemble_probs(teacher_logits(teachers, views, amp)), labels  # Eq. 1


def check_store(store, train_set, teachers_specs):
    store.check_matches({"num_images": len(train_set), "num_classes": len(train_set.classes),
                         "image_list_sha256": image_list_hash(train_set.samples, train_set.root), "stores": "probs"})
    stored = [t["name"] for t in store.meta["teachers"]]
    wanted = [parse_spec(spec)[0] for spec in teachers_specs]
    if sorted(stored) != sorted(wanted):
        raise StoreError(f"label store {store.path} was made with teachers {stored}, not {wanted}; "
                         f"pass the same --teacher flags or another --labels folder")


def train(args, ctx, train_set, val_sets, store, teachers, student, cfg):
    num_classes = len(train_set.classes)
    model = student.to(ctx.device)
    discriminator = Discriminator(num_classes).to(ctx.device)
    if ctx.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if ctx.distributed:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
        discriminator = DistributedDataParallel(discriminator, device_ids=ids)
    optimizer = make_optimizer("sgd", param_groups(unwrap(model), args.wd), args.lr, args.momentum)
    d_optimizer = torch.optim.Adam(discriminator.parameters(), lr=args.d_lr, betas=(0.5, 0.999))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [args.lr_drop_epoch], 0.1)  # discriminator: fixed lr
    scaler = torch.amp.GradScaler(enabled=args.amp and ctx.device.type == "cuda")
    mix_generator = torch.Generator().manual_seed(args.seed + ctx.rank)
    checkpoint = ckpt.Checkpointer(args.out, ctx, args.resume, args.overwrite, model=unwrap(model),
                                   discriminator=unwrap(discriminator), optimizer=optimizer, d_optimizer=d_optimizer,
                                   scheduler=scheduler, scaler=scaler, mix_generator=mix_generator)
    start_epoch, best = checkpoint.restore()

    m = args.num_crops if store is not None else 1
    if store is not None:  # Fast MEAL V2: m stored crops of an image per batch, replayed exactly
        dataset = StoredCrops(train_set.samples, store, m, args.input_size, "bilinear", args.seed)
    else:  # one fresh random crop per image, seen by the student and by every teacher at its own size
        views = [(ex["data_config"]["input_size"], ex["data_config"]["interpolation"]) for _, ex in teachers]
        dataset = FreshCrops(train_set.samples, 1, args.input_size, "bilinear", views, (0.08, 1.0), (3 / 4, 4 / 3), args.seed)
    sampler = TaggedSampler(DistributedSampler(dataset, ctx.world, ctx.rank, shuffle=True, seed=args.seed, drop_last=True))
    data = loader(dataset, args.batch_size // (m * ctx.world), args.workers, sampler, ctx.device, drop_last=True)

    metrics, run_start, step_times = {}, time.time(), []
    for epoch in range(start_epoch, args.epochs, m):  # with --labels one pass = m epochs of samples
        sampler.set_epoch(epoch, epoch)  # tag: the stream position (stored crops) or epoch (fresh crops)
        for _ in range(epoch - scheduler.last_epoch):
            scheduler.step()
        model.train()
        discriminator.train()
        lr, sums, epoch_start = optimizer.param_groups[0]["lr"], np.zeros(5), time.time()
        for batch in ctx.bar(data, desc=f"epoch {epoch + 1}/{args.epochs}"):
            step_start = time.time()
            crops, targets, labels = batch_targets(batch, store, teachers, ctx.device, args.amp)
            images = normalize(crops.to(ctx.device, non_blocking=True), cfg["mean"], cfg["std"])
            if args.cutmix > 0:
                images, targets = mix_batch(images, targets, 0.0, args.cutmix, mix_generator)
            with torch.autocast(ctx.device.type, enabled=args.amp and ctx.device.type == "cuda"):
                logits = model(images)
            logits = logits.float()
            student_probs = F.softmax(logits, dim=1)
            d_loss = torch.zeros(())
            if not args.no_disc:  # discriminator step on detached inputs, its own optimizer (Eq. 4)
                d_loss = discriminator_loss(discriminator, targets, student_probs.detach())
                d_optimizer.zero_grad(set_to_none=True)
                d_loss.backward()
                d_optimizer.step()
            kd = soft_cross_entropy(logits, targets)  # Eq. 3
            loss = kd
            if not args.no_disc:  # student: look real to the frozen discriminator (no DDP sync needed)
                frozen = unwrap(discriminator).requires_grad_(False)
                fake = frozen(student_probs)
                loss = loss + args.adv_weight * F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
                frozen.requires_grad_(True)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step_times.append(time.time() - step_start)
            n = len(labels)
            sums += [n, loss.item() * n, kd.item() * n, d_loss.item() * n, (logits.argmax(1).cpu() == labels).sum().item()]
        seen, loss_sum, kd_sum, d_sum, correct = ctx.all_reduce_sum(sums.tolist())
        ckpt.check_finite(loss_sum, epoch, args.out)
        covered = min(m, args.epochs - epoch)
        metrics = {"epoch": epoch + covered, "lr": lr, "train_loss": loss_sum / seen, "train_kd": kd_sum / seen,
                   "train_disc": d_sum / seen, "train_top1": 100 * correct / seen, "train_time": time.time() - epoch_start,
                   "step_time_median": float(np.median(step_times[-len(data):]))}
        for name, val_loader in val_sets.items():
            result = evaluate(unwrap(model), val_loader, ctx, cfg["mean"], cfg["std"], args.amp, desc=name)
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
    except (DataError, ModelError, StoreError, FloatingPointError) as error:
        raise SystemExit(f"error: {error}")
    finally:
        cleanup()


def run(args, ctx):
    m = args.num_crops if args.labels else 1
    if args.batch_size % (m * ctx.world) or args.num_crops < 1:
        raise SystemExit(f"error: --batch-size {args.batch_size} must be divisible by crops per image x processes "
                         f"= {m * ctx.world}")
    if args.d_lr <= 0 or args.lr <= 0 or args.adv_weight < 0:
        raise SystemExit("error: need --lr > 0, --d-lr > 0 and --adv-weight >= 0")
    seed_everything(args.seed, ctx.rank)
    start = time.time()
    root = demo.ensure_data(ctx) if args.data == "demo" else args.data
    if args.data == "demo":  # two demo teachers of different architectures + a demo-pretrained student
        args.teacher = demo.resolve_teachers(args.teacher, DEMO_TEACHERS, ctx, log=ctx.print)
        args.init = args.init or demo.ensure_teacher(args.arch, ctx, epochs=DEMO_STUDENT_INIT_EPOCHS, log=ctx.print)
    train_set = image_folder(root, "train")
    num_classes = len(train_set.classes)
    store = None
    if args.labels:
        if not os.path.isfile(os.path.join(args.labels, "meta.json")):
            names = DEMO_TEACHERS if args.data == "demo" else [parse_spec(spec)[0] for spec in args.teacher]
            raise StoreError(f"no label store at {args.labels}; make it with the same teachers first: python fkd.py "
                             f"--data {args.data} --mode label --codec full "
                             + " ".join(f"--teacher {name}" for name in names) + f" --labels {args.labels}")
        store = LabelStore.open(args.labels)
        check_store(store, train_set, args.teacher)
        if args.num_crops > store.meta["num_crops"] or not np.asarray(store.done).all():
            raise StoreError(f"label store {args.labels} is incomplete or has fewer than --num-crops "
                             f"{args.num_crops} crops per image; finish it with fkd.py --mode label")
    teachers = load_teachers(args.teacher, num_classes, ctx.device) if store is None or args.data == "demo" else []
    torch.manual_seed(args.seed)
    init = None if args.init == "none" else args.init
    student, extra = create(init or args.arch, num_classes, pretrained_head="reset" if init else "none")
    cfg = dict(extra["data_config"], input_size=args.input_size, crop_pct=args.crop_pct, interpolation="bilinear")
    val_transform = eval_transform(args.input_size, args.crop_pct)
    val_sets = {"val": eval_loader(image_folder(root, "val", val_transform, train_set.classes),
                                   args.batch_size, args.workers, ctx)}
    for i, extra_root in enumerate(args.val_data):
        val_sets[f"extra{i}"] = eval_loader(image_folder(extra_root, "", val_transform, train_set.classes),
                                            args.batch_size, args.workers, ctx)
    # before training: the initialized student, and the teachers' ensemble on the same val images
    before = evaluate(student.to(ctx.device), val_sets["val"], ctx, cfg["mean"], cfg["std"], desc="init")["top1"]
    ensemble_top1 = evaluate_ensemble(teachers, root, train_set.classes, args, ctx) if teachers else None
    metrics, best, train_time = train(args, ctx, train_set, val_sets, store, teachers if store is None else [],
                                      student, cfg)
    route = "labels (Fast MEAL V2)" if store is not None else "online teachers"
    ctx.print(f"MEAL V2 summary: {route}, student {args.arch}, {args.epochs} epochs: top-1 {before:.2f}% -> "
              f"{metrics.get('val_top1', float('nan')):.2f}% (best {best:.2f}%)"
              + (f", teacher ensemble {ensemble_top1:.2f}%" if ensemble_top1 is not None else "")
              + f", median step {1000 * metrics.get('step_time_median', float('nan')):.1f} ms, train {train_time:.0f}s, "
              f"total {time.time() - start:.0f}s")
    if ctx.main:
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump({"route": route, "init_top1": before, "final": metrics, "best_top1": best,
                       "ensemble_top1": ensemble_top1, "train_time": train_time}, f, indent=1)


@torch.no_grad()
def evaluate_ensemble(teachers, root, classes, args, ctx):
    """Top-1 of the averaged teacher softmax (Eq. 1), each teacher on its own eval transform."""
    correct = total = 0
    sets = [image_folder(root, "val", eval_transform(ex["data_config"]["input_size"], ex["data_config"]["crop_pct"],
                                                     ex["data_config"]["interpolation"]), classes) for _, ex in teachers]
    loaders = [eval_loader(s, args.batch_size, 0, ctx, persistent=False) for s in sets]
    for batches in zip(*loaders):
        views = [images.to(ctx.device) for images, _ in batches]
        probs = ensemble_probs(teacher_logits(teachers, views, args.amp))
        labels = batches[0][1].to(ctx.device)
        correct += (probs.argmax(1) == labels).sum().item()
        total += len(labels)
    correct, total = ctx.all_reduce_sum([correct, total])
    return 100.0 * correct / max(total, 1)


if __name__ == "__main__":
    main()
