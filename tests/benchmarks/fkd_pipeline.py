"""FKD data and label pipeline, measured side by side in one run.

    python tests/benchmarks/fkd_pipeline.py                     # CPU, ~3-5 minutes
    python tests/benchmarks/fkd_pipeline.py --images 400 --teacher resnet50 --device cuda

1. Loader: crops/s delivered by the FKD loader (num_crops crops replayed from one decoded image)
   vs a loader that decodes one image per crop (num_crops = 1), both reading stored crops and
   labels, on generated ImageNet-like JPEGs (~500x375), with --workers workers; plus where the
   time of one item goes (decode, crop+resize, label read).
2. Label generation: crops/s of `fkd.py --mode label` vs bare teacher inference on as many crops
   of the same size and batch (same threads).
3. Label store: random-access reads/s from a store of --store-images x --store-crops (ms, K=5)
   with several loader workers, and the workers' resident memory before/after (mmap: flat).
4. Scaling (--scaling): label generation and FKD training throughput under torchrun with 1 and 2
   processes (gloo on CPU, one thread each), and the parallel efficiency.

Prints tables (device, sizes, threads) and writes JSON to --json.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from common import demo  # noqa: E402
from common.ckpt import save_atomic  # noqa: E402
from common.crops import replay_crops  # noqa: E402
from common.data import image_folder, load_rgb, loader  # noqa: E402
from common.labels import LabelStore, StoredCrops, crop_schedule  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_jpeg_folder(root, images, classes=10, seed=0):
    """ImageNet-like JPEGs: demo shapes drawn on 500x375 noisy backgrounds, quality 90."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", images), ("val", classes)):
        for i in range(count):
            c = i % classes
            folder = os.path.join(root, split, demo.CLASSES[c])
            os.makedirs(folder, exist_ok=True)
            small = demo.render(c, rng, size=128).resize((500, 375), Image.BILINEAR)
            noise = rng.integers(-20, 20, (375, 500, 3))
            pixels = np.clip(np.asarray(small, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{i:06d}.JPEG"), quality=90)
    return root


def rss_mb():
    """(private, file-backed) resident MB: mmap'd store pages count as file-backed (shared page cache)."""
    with open("/proc/self/status") as f:
        status = f.read()
    return [int(re.search(rf"{key}:\s+(\d+)", status).group(1)) / 1024 for key in ("RssAnon", "RssFile")]


class TimedReads(torch.utils.data.Dataset):
    """Random (image, crops) reads from a store; each item reports the worker's RSS."""

    def __init__(self, store, count, m, seed=0):
        self.store, self.m = store, m
        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, store.meta["num_images"], count)
        self.crops = rng.integers(0, store.meta["num_crops"] - m, count)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        rows = self.store.read(int(self.images[i]), np.arange(self.crops[i], self.crops[i] + self.m))
        return torch.from_numpy(rows[2]), torch.from_numpy(rows[3]), torch.tensor(rss_mb())


def loader_rate(dataset, batch_images, workers, items):
    """Crops/s over `items` items (cycling through the images), first batch excluded as warm-up."""
    sampler = [(n % len(dataset), 0) for n in range(items)]
    data = loader(dataset, batch_images, workers, sampler, drop_last=True, persistent=False)
    iterator = iter(data)
    next(iterator)  # warm-up: workers started, first batch decoded
    start, crops = time.perf_counter(), 0
    for batch in iterator:
        crops += batch[0].shape[0] * batch[0].shape[1]
    return crops / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=240)
    p.add_argument("--teacher", default="resnet18", help="timm architecture (random weights)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--stored-crops", type=int, default=8)
    p.add_argument("--num-crops", type=int, default=4)
    p.add_argument("--batch", type=int, default=32, help="crops per batch")
    p.add_argument("--label-batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--loader-crops", type=int, default=3072, help="crops per loader measurement")
    p.add_argument("--store-images", type=int, default=100_000)
    p.add_argument("--store-crops", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="float16 autocast for the teacher (CUDA only), "
                   "in fkd.py --mode label and in the bare inference it is compared with")
    p.add_argument("--store-only", action="store_true", help="only the label-store read benchmark")
    p.add_argument("--scaling", action="store_true", help="also measure 1 vs 2 processes under torchrun")
    p.add_argument("--json", default="runs/benchmarks/fkd_pipeline.json")
    args = p.parse_args()
    results = {"args": vars(args), "threads": torch.get_num_threads(), "device": args.device}
    print(f"device {args.device}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; "
          f"{args.images} JPEGs 500x375, crops {args.size}px, teacher {args.teacher}")
    if not args.store_only:
        with tempfile.TemporaryDirectory() as tmp:
            data = make_jpeg_folder(os.path.join(tmp, "data"), args.images)
            teacher_file = os.path.join(tmp, "teacher.pth")
            import timm
            torch.manual_seed(0)
            teacher = timm.create_model(args.teacher, num_classes=10)
            cfg = {"input_size": args.size, "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
                   "std": [0.229, 0.224, 0.225], "crop_pct": 0.875}
            save_atomic({"model": teacher.state_dict(), "arch": args.teacher, "num_classes": 10, "data_config": cfg},
                        teacher_file)

            # 2. label generation vs bare teacher inference (same crops, size, batch, threads)
            labels = os.path.join(tmp, "labels")
            command = [sys.executable, "fkd.py", "--data", data, "--mode", "label", "--teacher",
                       f"{args.teacher}={teacher_file}", "--labels", labels, "--out", os.path.join(tmp, "out"),
                       "--stored-crops", str(args.stored_crops), "--label-batch", str(args.label_batch),
                       "--workers", str(args.workers), "--k", "5", "--device", args.device] + (["--amp"] if args.amp else [])
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
            label_rate = float(re.search(r"\((\d+) crops/s\)", done.stdout).group(1))
            device = torch.device(args.device)
            teacher = teacher.to(device).eval()
            x = torch.randn(args.label_batch, 3, args.size, args.size, device=device)
            if device.type == "cuda":  # as fkd.py's teachers (common.dist.setup turns cudnn.benchmark on)
                torch.backends.cudnn.benchmark = True
                teacher, x = teacher.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
            total = args.images * args.stored_crops
            with torch.no_grad(), torch.autocast(device.type, enabled=args.amp and device.type == "cuda"):
                for _ in range(3):  # warm-up (cuDNN autotuning, lazy init), finished before the clock starts
                    teacher(x)
                sync(device)
                start = time.perf_counter()
                for _ in range(total // args.label_batch):
                    teacher(x)
                sync(device)  # CUDA runs asynchronously: wait for the queued work, not only its launch
            bare_rate = (total // args.label_batch) * args.label_batch / (time.perf_counter() - start)
            results["label_generation"] = {"fkd_label_crops_per_s": label_rate, "bare_teacher_crops_per_s": bare_rate,
                                           "ratio": label_rate / bare_rate}
            print(f"\nlabel generation ({total} crops, teacher batch {args.label_batch})\n"
                  f"  fkd.py --mode label     {label_rate:8.1f} crops/s\n"
                  f"  bare teacher inference  {bare_rate:8.1f} crops/s\n"
                  f"  ratio                   {label_rate / bare_rate:8.3f}   (target >= 0.9)")

            if args.scaling:  # 4. torchrun with 1 and 2 processes, one thread each
                scaling = {}
                for procs in (1, 2):
                    out = os.path.join(tmp, f"scale{procs}")
                    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                           *command[1:command.index("--labels")], "--labels", os.path.join(out, "labels"), "--out", out,
                           "--stored-crops", str(args.stored_crops), "--label-batch", str(args.label_batch),
                           "--workers", "1", "--k", "5", "--device", "cpu"]
                    env = dict(os.environ, OMP_NUM_THREADS="1")
                    done = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, check=True, env=env)
                    rate = float(re.search(r"\((\d+) crops/s\)", done.stdout).group(1))
                    train = run[:run.index("--mode") + 1] + ["fkd"] + run[run.index("--mode") + 2:] + [
                        "--arch", "resnet18", "--input-size", str(args.size // 2), "--batch-size", "32", "--num-crops", "4",
                        "--epochs", "8"]
                    subprocess.run(train, cwd=ROOT, capture_output=True, text=True, check=True, env=env)
                    with open(os.path.join(out, "metrics.jsonl")) as f:
                        records = [json.loads(line) for line in f]
                    seconds, crops = sum(r["train_time"] for r in records), sum(r["train_crops"] for r in records)
                    scaling[procs] = {"label_crops_per_s": rate, "train_crops_per_s": crops / seconds}
                for key in ("label_crops_per_s", "train_crops_per_s"):
                    scaling[f"{key}_efficiency"] = scaling[2][key] / (2 * scaling[1][key])
                results["scaling"] = scaling
                print(f"\nscaling under torchrun (gloo, 1 thread per process)\n"
                      f"  label generation  1 proc {scaling[1]['label_crops_per_s']:7.1f}  2 procs "
                      f"{scaling[2]['label_crops_per_s']:7.1f} crops/s  efficiency {scaling['label_crops_per_s_efficiency']:.2f}\n"
                      f"  FKD training ({args.size // 2}px) 1 proc {scaling[1]['train_crops_per_s']:7.1f}  2 procs "
                      f"{scaling[2]['train_crops_per_s']:7.1f} crops/s  efficiency {scaling['train_crops_per_s_efficiency']:.2f}")

            # 1. loader: num_crops crops per decoded image vs one decoded image per crop
            store = LabelStore.open(labels)
            samples = image_folder(data, "train").samples
            rates = {}
            for m in (args.num_crops, 1, args.num_crops, 1):  # interleaved, two rounds
                dataset = StoredCrops(samples, store, m, args.size, "bilinear", seed=0)
                rate = loader_rate(dataset, args.batch // m, args.workers, args.loader_crops // m)
                rates.setdefault(m, []).append(rate)
            fkd_rate, single_rate = statistics.median(rates[args.num_crops]), statistics.median(rates[1])
            stages = {"decode (PIL open + RGB)": [], "crop + resize (replay)": [], "label read": []}
            for n in range(min(50, len(samples))):
                t0 = time.perf_counter()
                image = load_rgb(samples[n][0])
                t1 = time.perf_counter()
                ids = crop_schedule(0, n, store.meta["num_crops"], 0, args.num_crops)
                boxes, flips, _, _ = store.read(n, ids)
                t2 = time.perf_counter()
                replay_crops(image, boxes, flips, args.size, "bilinear")
                t3 = time.perf_counter()
                stages["decode (PIL open + RGB)"].append(t1 - t0)
                stages["label read"].append(t2 - t1)
                stages["crop + resize (replay)"].append(t3 - t2)
            per_item = {k: 1000 * statistics.median(v) for k, v in stages.items()}
            results["loader"] = {"fkd_crops_per_s": fkd_rate, "one_image_per_crop_crops_per_s": single_rate,
                                 "ratio": fkd_rate / single_rate, "item_ms": per_item}
            print(f"\nloader ({args.workers} workers, batch {args.batch} crops, {args.size}px)\n"
                  f"  FKD, {args.num_crops} crops per decoded image {fkd_rate:8.1f} crops/s\n"
                  f"  one decoded image per crop     {single_rate:8.1f} crops/s\n"
                  f"  ratio                          {fkd_rate / single_rate:8.2f}   (target >= 2.5)\n"
                  f"  one item of {args.num_crops} crops, median ms: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in per_item.items()))

    # 3. store: bytes per crop of every codec (1000 classes, K=5), then random access
    with tempfile.TemporaryDirectory() as tmp:
        codec_bytes = {}
        for codec in ("full", "hard", "smooth", "ms", "mr"):
            meta = {"codec": codec, "k": 5, "num_crops": 500, "num_classes": 1000, "num_images": 20}
            codec_bytes[codec] = LabelStore.create(os.path.join(tmp, codec), meta).bytes_per_crop()
        results["bytes_per_crop"] = codec_bytes
        print("\nlabel store bytes per crop (1000 classes, K=5, 500 crops per image, all files counted)\n  "
              + ", ".join(f"{codec} {size:.1f}" for codec, size in codec_bytes.items())
              + "\n  official format on disk: ms K=5 at 500 crops 76 (fp32) / 39 (fp16), one pickled file per image")
        meta = {"codec": "ms", "k": 5, "num_crops": args.store_crops, "num_classes": 1000,
                "num_images": args.store_images}
        store = LabelStore.create(os.path.join(tmp, "store"), meta)
        rng = np.random.default_rng(0)
        for name in ("indices", "values"):  # real bytes, not sparse zeros; filled via a writable map
            array = np.load(os.path.join(tmp, "store", f"{name}.npy"), mmap_mode="r+")
            for start in range(0, args.store_images, 10_000):
                chunk = array[start:start + 10_000]
                chunk[:] = (rng.integers(0, 1000, chunk.shape) if name == "indices" else rng.random(chunk.shape))
            array.flush()
            del array
        done = np.load(os.path.join(tmp, "store", "done.npy"), mmap_mode="r+")
        done[:] = 1
        done.flush()
        del done
        size_mb = sum(os.path.getsize(os.path.join(tmp, "store", f)) for f in os.listdir(os.path.join(tmp, "store"))) / 2**20
        store = LabelStore.open(os.path.join(tmp, "store"))
        reads = 20_000
        dataset = TimedReads(store, reads, args.num_crops)
        data = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=args.workers)
        start, rss = time.perf_counter(), []
        for _, _, worker_rss in data:
            rss.extend(worker_rss.tolist())  # [private, file-backed] per read
        rate = reads / (time.perf_counter() - start)
        results["store"] = {"size_mb": size_mb, "reads_per_s": rate, "worker_private_rss_first_last_mb": [rss[0][0], rss[-1][0]],
                            "worker_file_rss_first_last_mb": [rss[0][1], rss[-1][1]],
                            "bytes_per_crop": store.bytes_per_crop()}
        print(f"\nlabel store ({args.store_images} images x {args.store_crops} crops, ms K=5, {size_mb:.0f} MB, "
              f"{store.bytes_per_crop():.1f} B/crop)\n"
              f"  random reads ({args.num_crops} crops each, {args.workers} workers) {rate:9.0f} reads/s\n"
              f"  worker private RSS first / last read    {rss[0][0]:6.0f} / {rss[-1][0]:6.0f} MB\n"
              f"  worker file-backed RSS (store pages in the shared page cache) {rss[0][1]:6.0f} / {rss[-1][1]:6.0f} MB")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
