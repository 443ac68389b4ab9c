"""The process-group paths of common/ that a single-process run never touches, in one process group.

    torchrun --nproc_per_node=1 tests/gpu/dist_check.py            # one GPU: NCCL group of one
    torchrun --nproc_per_node=2 tests/gpu/dist_check.py --device cpu   # CPU: gloo (run by the tests)

common.dist.setup() starts a process group for WORLD_SIZE > 1 (or KD_DDP=1 under torchrun), and
NCCL refuses two ranks on one GPU, so on a one-GPU machine this script starts the group itself (NCCL bound to the GPU
with device_id, as setup() does) and checks, printing one line per check:
  collectives   all_reduce_sum / broadcast_object / barrier on the communication device
  evaluate      top-1 of a model with a known answer, sharded over the ranks, with a rank whose
                shard is empty (more ranks than images: no hang, every image counted once)
  eval buffers  evaluate() and evaluate_segmentation() first give every rank rank 0's buffers (BN
                statistics), the ones that rank 0's checkpoint holds
  ddp step      a DistributedDataParallel step with ctx.autocast / ctx.grad_scaler (--amp,
                float16 and bfloat16 on CUDA) keeps every rank's weights equal and finite
  syncbn        timm's convert_sync_batchnorm keeps timm's BatchNormAct2d activations (outputs
                equal before and after conversion, eval mode) and trains under DDP (CUDA only)
Exit status 0 when every check passed.
"""
import argparse
import datetime
import os
import sys
from argparse import Namespace

import timm
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from common.data import ShardSampler, evaluate  # noqa: E402
from common.dist import Context  # noqa: E402


def start(device_name):
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_name == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=5), device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    return Context(rank, world, local_rank, device)


def check_collectives(ctx):
    total = ctx.all_reduce_sum([1.0, float(ctx.rank)])
    assert total == [ctx.world, sum(range(ctx.world))], total
    assert ctx.broadcast_object({"from": ctx.rank})["from"] == 0
    ctx.barrier()
    return f"backend {dist.get_backend()}, {ctx.world} process(es)"


class Oracle(torch.nn.Module):
    """Logits that put the target first for even-valued images and second for odd ones."""

    def forward(self, images):
        first = images[:, 0, 0, 0].round().long()  # normalized with mean 0, std 1/255: pixel value
        logits = torch.zeros(len(images), 10, device=images.device)
        logits[torch.arange(len(images)), first % 10] = 2.0
        logits[torch.arange(len(images)), (first + 1) % 10] = 1.0 + (first % 2) * 2.0
        return logits


def check_evaluate(ctx):
    count = max(ctx.world - 1, 1)  # fewer images than ranks when world > 1: the last shard is empty
    images = torch.arange(count, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).contiguous()
    targets = torch.arange(count) % 10
    data = list(zip(images, targets))
    loader = torch.utils.data.DataLoader(data, batch_size=2, sampler=ShardSampler(len(data), ctx.rank, ctx.world))
    result = evaluate(Oracle().to(ctx.device), loader, ctx, [0.0] * 3, [1 / 255] * 3,
                      amp=Namespace(amp=True, amp_dtype="bfloat16"))
    even = sum(1 for i in range(count) if i % 2 == 0)
    assert result["count"] == count and abs(result["top1"] - 100.0 * even / count) < 1e-6, result
    assert result["top5"] == 100.0, result
    return f"{count} image(s) over {ctx.world} rank(s), top-1 {result['top1']:.1f}%"


def check_eval_buffers(ctx):
    from frskd_seg_data import evaluate_segmentation
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).to(ctx.device)
    image = torch.zeros(3, 2, 2, dtype=torch.uint8)
    for name, target, run in [("classification", 0, lambda loader: evaluate(model, loader, ctx, [0.0] * 3, [1.0] * 3)),
                              ("segmentation", torch.zeros(2, 2, dtype=torch.int64),
                               lambda loader: evaluate_segmentation(model, loader, ctx, [0.0] * 3, [1.0] * 3, 4))]:
        model[1].running_mean.fill_(float(ctx.rank))  # each rank its own statistics, as after DDP steps
        data = [(image, target)]
        run(torch.utils.data.DataLoader(data, sampler=ShardSampler(len(data), ctx.rank, ctx.world)))
        assert torch.all(model[1].running_mean == 0.0), f"rank {ctx.rank} evaluated {name} with its own BN statistics"
    return f"{ctx.world} rank(s) evaluate with rank 0's BN statistics (classification, segmentation)"


def check_ddp_step(ctx, dtype):
    args = Namespace(amp=True, amp_dtype=dtype)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = timm.create_model("test_resnet", num_classes=10).to(ctx.device)
    ddp = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    scaler = ctx.grad_scaler(args)
    generator = torch.Generator().manual_seed(ctx.rank)  # each rank its own batch
    for _ in range(3):
        x = torch.randn(4, 3, 32, 32, generator=generator).to(ctx.device)
        y = torch.randint(0, 10, (4,), generator=generator).to(ctx.device)
        with ctx.autocast(args):
            loss = torch.nn.functional.cross_entropy(ddp(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    assert torch.isfinite(flat).all()
    gathered = [torch.zeros_like(flat) for _ in range(ctx.world)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(gathered[0], g) for g in gathered), "ranks' weights differ after DDP steps"
    return (f"{dtype} autocast {'on' if ctx.device.type == 'cuda' else 'off (CPU)'}, scaler "
            f"{'on' if scaler.is_enabled() else 'off'}, loss {loss.item():.3f}")


def check_syncbn(ctx):
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=10).to(ctx.device).eval()
    x = torch.randn(4, 3, 32, 32, device=ctx.device)
    with torch.no_grad():
        before = model(x)
    converted = timm.layers.convert_sync_batchnorm(model).to(ctx.device).eval()
    layers = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())
    with torch.no_grad():
        after = converted(x)
    assert layers > 0 and torch.allclose(before, after, atol=1e-5), "conversion changed the outputs"
    ddp = DistributedDataParallel(converted.train(), device_ids=[ctx.device.index])
    loss = ddp(x).logsumexp(1).mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in converted.parameters() if p.grad is not None)
    return f"{layers} SyncBatchNorm layers, outputs equal before/after, DDP backward finite"


def run_checks(ctx):
    """Run every check in an initialized process group; returns (lines, number failed)."""
    checks = [("collectives", check_collectives), ("evaluate", check_evaluate), ("eval buffers", check_eval_buffers),
              ("ddp step float16", lambda c: check_ddp_step(c, "float16")),
              ("ddp step bfloat16", lambda c: check_ddp_step(c, "bfloat16"))]
    if ctx.device.type == "cuda":
        checks.append(("syncbn", check_syncbn))
    lines, failed = [], 0
    for name, check in checks:
        try:
            lines.append(f"ok   {name}: {check(ctx)}")
        except Exception as error:  # report every check, not only the first failure
            failed += 1
            lines.append(f"FAIL {name} (rank {ctx.rank}): {type(error).__name__}: {error}")
    return lines, failed


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = p.parse_args()
    ctx = start(args.device)
    lines, failed = run_checks(ctx)
    for line in lines:
        if ctx.main or line.startswith("FAIL"):
            print(line, flush=True)
    dist.destroy_process_group()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
