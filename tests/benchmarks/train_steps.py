"""Training-step cost of each method against its own baseline, measured side by side in one run.

    python tests/benchmarks/train_steps.py                 # CPU defaults (small sizes)
    python tests/benchmarks/train_steps.py --device cuda --size 224 --batch 256 --amp
    python tests/benchmarks/train_steps.py --device cuda --size 224 --batch 256 --amp --amp-dtype bfloat16

Every pair of steps runs on the same synthetic batch, interleaved (A, B, A, B, ...), warm-up
excluded, median of --repeats. On CUDA each timed step starts and ends with
torch.cuda.synchronize(), so a time is the GPU's work, not how fast the CPU queued it; AMP and
the gradient scaler come from common.dist (--amp, --amp-dtype) as in the method files. Data
loading is excluded (see the loader benchmark for that):

  FKD      plain CE step | FKD step (decode stored top-K labels + soft CE) | online KD step (teacher
           forward + soft CE); ideal FKD speedup over online = (student step + teacher forward) / student step
  BAKE     baseline step | BAKE step (Eq. 9 soft targets + KL)      paper: +3.7% step time
  FRSKD    baseline step | FRSKD step (BiFPNc self-teacher + Eq. 5)
  MEAL V2  --labels step (decode stored ensemble) | online step (two teachers forward)

Prints a table with the device, sizes and thread count, and writes JSON to --json.
"""
import argparse
import json
import os
import statistics
import sys
import time

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import bake  # noqa: E402
import frskd  # noqa: E402
import meal_v2  # noqa: E402
from common.labels import decode, encode  # noqa: E402
from common.dist import Context  # noqa: E402
from common.models import ensemble_probs  # noqa: E402

FeaturesAndLogits = bake.FeaturesAndLogits


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device):
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - start


def compare(steps, device, repeats, warmup=2):
    """Interleaved timing of several step functions; returns the median seconds of each."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(timed(step, device))
    return {name: statistics.median(values) for name, values in times.items()}


def sgd_step(model, loss, optimizer, scaler):
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def setup_model(model, device, lr=0.01):
    model = model.to(device).train()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def bench_fkd(args, device, x, labels, classes, scaler, autocast):
    student, optimizer = setup_model(timm.create_model(args.student, num_classes=classes), device)
    teacher = timm.create_model(args.teacher, num_classes=classes).to(device).eval().requires_grad_(False)
    probs = torch.softmax(torch.randn(len(x), classes, device=device), 1)
    indices, values = encode(probs, "ms", 5)  # what the loader hands over: top-5 indices/values per crop

    def plain():
        with autocast():
            loss = F.cross_entropy(student(x).float(), labels)
        sgd_step(student, loss, optimizer, scaler)

    def fkd_step():
        targets = decode(indices, values, "ms", classes)
        with autocast():
            loss = -(targets * F.log_softmax(student(x).float(), 1)).sum(1).mean()
        sgd_step(student, loss, optimizer, scaler)

    def online():
        with torch.no_grad(), autocast():
            targets = torch.softmax(teacher(x).float(), 1)
        with autocast():
            loss = -(targets * F.log_softmax(student(x).float(), 1)).sum(1).mean()
        sgd_step(student, loss, optimizer, scaler)

    def teacher_forward():
        with torch.no_grad(), autocast():
            teacher(x)

    def decode_only():
        decode(indices, values, "ms", classes)

    t = compare({"plain CE": plain, "FKD": fkd_step, "online KD": online, "teacher forward": teacher_forward,
                 "label decode": decode_only}, device, args.repeats)
    ideal = (t["plain CE"] + t["teacher forward"]) / t["plain CE"]
    return t, {"FKD / plain throughput": t["plain CE"] / t["FKD"], "FKD speedup over online": t["online KD"] / t["FKD"],
               "ideal speedup": ideal, "speedup / ideal": t["online KD"] / t["FKD"] / ideal,
               "decode share of FKD step": t["label decode"] / t["FKD"]}


def bench_bake(args, device, x, labels, classes, scaler, autocast):
    net, optimizer = setup_model(FeaturesAndLogits(timm.create_model(args.student, num_classes=classes)), device)

    def step(lam):
        def run():
            with autocast():
                features, logits = net(x)
            logits = logits.float()
            targets = bake.bake_soft_targets(features, logits) if lam > 0 else None
            loss, _, _ = bake.bake_loss(logits, labels, targets, lam)
            sgd_step(net, loss, optimizer, scaler)
        return run

    t = compare({"baseline": step(0.0), "BAKE": step(1.0)}, device, args.repeats)
    return t, {"BAKE / baseline step": t["BAKE"] / t["baseline"]}


def bench_frskd(args, device, classes, scaler, autocast):
    x = torch.randn(args.frskd_batch, 3, 32, 32, device=device)
    targets = F.one_hot(torch.randint(0, classes, (len(x),), device=device), classes).float()
    steps = {}
    for name, with_teacher in (("baseline", False), ("FRSKD", True)):
        classifier = frskd.WideResNet(classes)
        net = frskd.FRSKDNet(classifier, frskd.BiFPNc(classifier.stage_channels, classes, 2.0) if with_teacher else None)
        net, optimizer = setup_model(net, device)

        def run(net=net, optimizer=optimizer, with_teacher=with_teacher):
            with autocast():
                features, logits, refined, self_teacher_logits = net(x)
            if with_teacher:
                loss, _ = frskd.frskd_loss(logits.float(), self_teacher_logits.float(), features, refined, targets,
                                           2.0, 100.0, 4.0)
            else:
                loss = -(targets * F.log_softmax(logits.float(), 1)).sum(1).mean()
            sgd_step(net, loss, optimizer, scaler)
        steps[name] = run
    t = compare(steps, device, args.repeats)
    return t, {"FRSKD / baseline step (WRN-16-2, 32px)": t["FRSKD"] / t["baseline"]}


def bench_meal(args, device, x, classes, scaler, autocast):
    """meal_v2.meal_step as trained (official cooperative rule: student and discriminator under one
    optimizer, one backward), fed from a store (--labels) or from two teachers' forward (online)."""
    student, _ = setup_model(timm.create_model(args.student, num_classes=classes), device)
    disc = meal_v2.Discriminator(classes).to(device)
    optimizer = torch.optim.SGD(list(student.parameters()) + list(disc.parameters()), lr=0.01, momentum=0.9)
    teachers = [timm.create_model(name, num_classes=classes).to(device).eval().requires_grad_(False)
                for name in (args.teacher, args.teacher2)]
    indices, values = encode(torch.softmax(torch.randn(len(x), classes, device=device), 1), "ms", 5)

    def labels_step():  # the stored p_e is both the target and the discriminator's teacher side
        targets = decode(indices, values, "ms", classes)
        meal_v2.meal_step(student, disc, optimizer, scaler, x, targets, targets,
                          student_side=lambda logits: F.softmax(logits, 1), autocast=autocast())

    def online_step():  # official online: the discriminator sees logits, the teachers' mean logits
        with torch.no_grad(), autocast():
            logits = [t(x).float() for t in teachers]
        meal_v2.meal_step(student, disc, optimizer, scaler, x, ensemble_probs(logits),
                          torch.stack(logits).mean(0), autocast=autocast())

    t = compare({"--labels": labels_step, "online": online_step}, device, args.repeats)
    return t, {"MEAL V2 online / --labels step": t["online"] / t["--labels"]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--student", default="resnet18")
    p.add_argument("--teacher", default="resnet50", help="FKD / online KD teacher; MEAL V2 first teacher")
    p.add_argument("--teacher2", default="resnet34", help="MEAL V2 second teacher")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--bake-batch", type=int, default=256, help="BAKE's comparison batch (paper: 256 per GPU)")
    p.add_argument("--bake-size", type=int, default=64)
    p.add_argument("--frskd-batch", type=int, default=128)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--amp", action="store_true", help="autocast on CUDA (as the scripts' --amp)")
    p.add_argument("--amp-dtype", choices=["float16", "bfloat16"], default="float16")
    p.add_argument("--only", nargs="+", default=["fkd", "bake", "frskd", "meal_v2"])
    p.add_argument("--json", default="runs/benchmarks/train_steps.json")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as common.dist.setup: fixed shapes
    torch.manual_seed(0)
    ctx = Context(device=device)
    scaler = ctx.grad_scaler(args)  # float16 on CUDA only; bfloat16 needs no scaler

    def autocast():
        return ctx.autocast(args)

    def batch(n, size):
        x = torch.randn(n, 3, size, size, device=device)
        return (x.to(memory_format=torch.channels_last) if device.type == "cuda" else x,
                torch.randint(0, args.classes, (n,), device=device))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device {name}; torch {torch.__version__}; student {args.student}, teacher {args.teacher}"
          f" (+{args.teacher2} for MEAL V2); {args.classes} classes; amp {args.amp} ({args.amp_dtype}); "
          f"median of {args.repeats}")
    results = {"device": name, "args": vars(args)}
    x, labels = batch(args.batch, args.size)
    if "fkd" in args.only:
        results["fkd"] = bench_fkd(args, device, x, labels, args.classes, scaler, autocast)
    if "bake" in args.only:
        bx, blabels = batch(args.bake_batch, args.bake_size)
        results["bake"] = bench_bake(args, device, bx, blabels, args.classes, scaler, autocast)
    if "frskd" in args.only:
        results["frskd"] = bench_frskd(args, device, 100, scaler, autocast)
    if "meal_v2" in args.only:
        results["meal_v2"] = bench_meal(args, device, x, args.classes, scaler, autocast)
    for method in args.only:
        times, ratios = results[method]
        sizes = {"fkd": f"batch {args.batch} @ {args.size}px", "meal_v2": f"batch {args.batch} @ {args.size}px",
                 "bake": f"batch {args.bake_batch} @ {args.bake_size}px",
                 "frskd": f"WRN-16-2, batch {args.frskd_batch} @ 32px, 100 classes"}[method]
        print(f"\n{method} ({sizes})")
        for step, seconds in times.items():
            print(f"  {step:24} {1000 * seconds:9.1f} ms")
        for ratio, value in ratios.items():
            print(f"  {ratio:38} {value:6.3f}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
