"""BAKE pieces against the paper's equations, the per-class sampler, and the CLI end to end."""
import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bake
from conftest import run_script, torchrun


def affinity_of(features):
    f = F.normalize(features, dim=1)
    a = f @ f.t() - 1e9 * torch.eye(len(f))
    return torch.softmax(a, dim=1)


def test_eq9_equals_iterated_propagation_eq7():
    torch.manual_seed(0)
    features, logits = torch.randn(12, 5), torch.randn(12, 7)
    q = bake.bake_soft_targets(features, logits, omega=0.5, temperature=4.0)
    p = torch.softmax(logits / 4.0, dim=1)
    iterated = bake.propagate_iteratively(affinity_of(features), p, 0.5, steps=200)
    torch.testing.assert_close(q, iterated, atol=1e-6, rtol=0)
    torch.testing.assert_close(q.sum(1), torch.ones(12), atol=1e-6, rtol=0)  # rows sum to 1


def test_omega_zero_gives_back_p():
    features, logits = torch.randn(6, 4), torch.randn(6, 3)
    torch.testing.assert_close(bake.bake_soft_targets(features, logits, omega=0.0, temperature=2.0),
                               torch.softmax(logits / 2.0, dim=1))


def test_hand_computed_three_samples():
    # f1 = e1, f2 = e2, f3 = (e1 + e2)/sqrt2: A12 = 0, A13 = A23 = 1/sqrt2; diagonal dropped
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    e = math.exp(1 / math.sqrt(2))
    a_hat = np.array([[0, 1 / (1 + e), e / (1 + e)],
                      [1 / (1 + e), 0, e / (1 + e)],
                      [0.5, 0.5, 0]])  # Eq. 4 row softmax over j != i
    torch.testing.assert_close(affinity_of(features), torch.tensor(a_hat, dtype=torch.float32), atol=1e-6, rtol=0)
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    p = np.exp(logits.numpy() / 1.0)
    p /= p.sum(1, keepdims=True)
    expected = 0.5 * np.linalg.inv(np.eye(3) - 0.5 * a_hat) @ p  # Eq. 9 with w = 0.5, T = 1
    q = bake.bake_soft_targets(features, logits, omega=0.5, temperature=1.0)
    np.testing.assert_allclose(q.numpy(), expected, atol=1e-5)
    assert abs(q[2, 0].item() - 0.5) < 1e-6  # the symmetric sample stays balanced


def test_no_gradient_reaches_parameters_through_q():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(8, 4)
    logits = layer(x)
    q = bake.bake_soft_targets(x, logits)
    assert not q.requires_grad
    # the loss gradient equals the one computed with Q as a constant
    loss, _, _ = bake.bake_loss(logits, torch.zeros(8, dtype=torch.long), q, lam=1.0, temperature=4.0)
    grad = torch.autograd.grad(loss, layer.weight)[0]
    logits2 = layer(x)
    q_const = q.clone()
    loss2 = F.cross_entropy(logits2, torch.zeros(8, dtype=torch.long)) + 16 * F.kl_div(
        F.log_softmax(logits2 / 4, 1), q_const, reduction="batchmean")
    torch.testing.assert_close(grad, torch.autograd.grad(loss2, layer.weight)[0])


def test_loss_eq2_hand_computed():
    logits = torch.tensor([[1.0, 0.0]])
    q = torch.tensor([[0.25, 0.75]])
    p = torch.softmax(logits / 2, 1)[0]
    kl = 0.25 * math.log(0.25 / p[0]) + 0.75 * math.log(0.75 / p[1])
    ce = -math.log(torch.softmax(logits, 1)[0, 0])
    total, _, _ = bake.bake_loss(logits, torch.tensor([0]), q, lam=0.5, temperature=2.0)
    assert total.item() == pytest.approx(ce + 0.5 * 4 * kl, rel=1e-5)


def test_sampler_tuples_same_class_and_anchor_coverage():
    targets = np.repeat(np.arange(7), [5, 3, 1, 8, 2, 6, 4])  # a class with one image too
    sampler = bake.PerClassBatchSampler(targets, anchors_per_batch=3, per_class=2, seed=1)
    batches = list(sampler)
    assert len(batches) == len(targets) // 3
    anchors = []
    for batch in batches:
        tuples = np.array(batch).reshape(3, 3)
        assert (targets[tuples] == targets[tuples[:, :1]]).all()  # companions share the anchor's class
        for t in tuples:
            if (targets == targets[t[0]]).sum() > 1:
                assert t[0] not in t[1:]  # never the anchor itself unless alone in its class
        anchors += tuples[:, 0].tolist()
    assert len(set(anchors)) == len(anchors) == len(batches) * 3  # each image is an anchor at most once
    sampler.set_epoch(1)
    assert list(sampler) != batches  # reseeded each epoch
    sampler.set_epoch(0)
    assert list(sampler) == batches


def test_sampler_two_ranks_disjoint_whole_tuples():
    targets = np.repeat(np.arange(10), 20)
    ranks = [bake.PerClassBatchSampler(targets, 4, 1, rank=r, world=2, seed=0) for r in range(2)]
    anchor_sets = []
    for sampler in ranks:
        anchors = []
        for batch in sampler:
            pairs = np.array(batch).reshape(4, 2)
            assert (targets[pairs[:, 0]] == targets[pairs[:, 1]]).all()
            anchors += pairs[:, 0].tolist()
        anchor_sets.append(set(anchors))
    assert not anchor_sets[0] & anchor_sets[1]
    assert len(anchor_sets[0] | anchor_sets[1]) == 200  # 200 images, every one an anchor once


def test_sampler_is_fast_at_imagenet_scale():
    targets = np.repeat(np.arange(1000), 1281)
    sampler = bake.PerClassBatchSampler(targets, 32, 1, rank=3, world=8)
    first = next(iter(sampler))
    assert len(first) == 64 and len(sampler) == len(targets) // 256


GLOBAL_CHECK = r"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, ".")
import bake
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
feats = [torch.randn(5, 6, generator=torch.Generator().manual_seed(10 + r)) for r in range(world)]
logits = [torch.randn(5, 4, generator=torch.Generator().manual_seed(20 + r)) for r in range(world)]
mine = bake.bake_soft_targets(bake.gather_rows(feats[rank]), bake.gather_rows(logits[rank]))[rank * 5:(rank + 1) * 5]
single = bake.bake_soft_targets(torch.cat(feats), torch.cat(logits))[rank * 5:(rank + 1) * 5]
assert torch.allclose(mine, single, atol=1e-6), (mine - single).abs().max()
local = bake.bake_soft_targets(feats[rank], logits[rank])
assert not torch.allclose(mine, local, atol=1e-4)  # global ensembling sees the other rank's images
open(sys.argv[1] + f"/rank{rank}.ok", "w").close()  # a file per rank: their stdout lines can interleave
dist.destroy_process_group()
"""


def test_global_ensembling_matches_single_process(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(GLOBAL_CHECK)
    run_script(torchrun(2) + [str(script), str(tmp_path)])
    assert (tmp_path / "rank0.ok").exists() and (tmp_path / "rank1.ok").exists()


TINY = ["--arch", "test_efficientnet", "--input-size", "32", "--batch-size", "8", "--epochs", "2",
        "--workers", "0", "--crop-pct", "1.0"]


def test_cli_end_to_end_resume_and_torchrun(tiny_data, tmp_path):
    run_script([sys.executable, "bake.py", "--data", tiny_data, "--out", str(tmp_path / "a"), *TINY])
    records = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["epoch"] for r in records] == [1, 2] and records[0]["train_kd"] > 0
    assert records[0]["train_images"] == 32  # 18 images -> 4 batches of 4 anchors + 4 companions
    run_script([sys.executable, "bake.py", "--data", tiny_data, "--out", str(tmp_path / "b"), *TINY, "--stop-epoch", "1"])
    run_script([sys.executable, "bake.py", "--data", tiny_data, "--out", str(tmp_path / "b"), *TINY, "--resume", "auto"])
    resumed = [json.loads(l) for l in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["val_top1"] for r in resumed] == [r["val_top1"] for r in records]
    assert resumed[1]["train_loss"] == pytest.approx(records[1]["train_loss"], rel=1e-5)
    run_script([sys.executable, "bake.py", "--data", tiny_data, "--out", str(tmp_path / "c"), *TINY, "--baseline"])
    assert [json.loads(l)["train_kd"] for l in open(tmp_path / "c" / "metrics.jsonl")] == [0.0, 0.0]
    result = run_script(torchrun(2) + ["bake.py", "--data", tiny_data, "--out", str(tmp_path / "d"), *TINY])
    ddp = [json.loads(l) for l in open(tmp_path / "d" / "metrics.jsonl")]
    assert [r["val_count"] for r in ddp] == [9, 9] and ddp[0]["train_images"] == 32
    assert "SyncBatchNorm needs CUDA" in result.stdout and result.stdout.count("BAKE summary") == 1
