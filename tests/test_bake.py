"""BAKE pieces against the paper's equations and independent rebuilds of the official code's
behaviour (yxgeee/BAKE: pycls for ImageNet, small_scale for CIFAR), the per-class sampler, the
recipes and flags, and the CLI end to end (resume with a loader worker, torchrun)."""
import copy
import json
import math
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import bake
from common.dist import Context
from conftest import run_script, torchrun


def affinity_of(features):
    f = F.normalize(features, dim=1)
    a = f @ f.t() - 1e9 * torch.eye(len(f))
    return torch.softmax(a, dim=1)


# ---------------------------------------------------------------------------------------------
# Eq. 1-9: the ensembled soft targets
# ---------------------------------------------------------------------------------------------
def test_eq9_equals_iterated_propagation_eq7():
    torch.manual_seed(0)
    features, logits = torch.randn(12, 5), torch.randn(12, 7)
    q = bake.bake_soft_targets(features, logits, omega=0.5, temperature=4.0)
    p = torch.softmax(logits / 4.0, dim=1)
    iterated = bake.propagate_iteratively(affinity_of(features), p, 0.5, steps=200)
    torch.testing.assert_close(q, iterated, atol=1e-6, rtol=0)
    torch.testing.assert_close(q.sum(1), torch.ones(12), atol=1e-6, rtol=0)  # rows sum to 1


def official_knowledge_ensemble(features, logits, omega, temperature):
    """The official knowledge_ensemble, rebuilt from its description in float64 numpy: L2-normalize,
    W = f f^T - 1e9 I, row softmax, (1 - w) * inverse(I - w W) @ softmax(z / T)."""
    f = features / np.linalg.norm(features, axis=1, keepdims=True)
    w = f @ f.T - 1e9 * np.eye(len(f))
    w = np.exp(w - w.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    p = np.exp(logits / temperature - (logits / temperature).max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return (1 - omega) * np.linalg.inv(np.eye(len(f)) - omega * w) @ p


@pytest.mark.parametrize("omega", [0.5, 0.9])
def test_soft_targets_match_official_explicit_inverse(omega):
    rng = np.random.default_rng(3)
    features, logits = rng.normal(size=(16, 8)), rng.normal(size=(16, 10)) * 3
    q = bake.bake_soft_targets(torch.tensor(features, dtype=torch.float32), torch.tensor(logits, dtype=torch.float32),
                               omega, 4.0)
    np.testing.assert_allclose(q.numpy(), official_knowledge_ensemble(features, logits, omega, 4.0), atol=2e-6)


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


def test_soft_targets_exact_under_bf16_autocast():
    torch.manual_seed(0)
    features, logits = torch.randn(10, 6), torch.randn(10, 5) * 4
    outside = bake.bake_soft_targets(features, logits)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = bake.bake_soft_targets(features, logits)
        from_bf16 = bake.bake_soft_targets(features.bfloat16(), logits.bfloat16())  # a bf16 network's outputs
    assert inside.dtype == torch.float32 and torch.equal(inside, outside)
    np.testing.assert_allclose(inside.numpy(), official_knowledge_ensemble(
        features.double().numpy(), logits.double().numpy(), 0.5, 4.0), atol=2e-6)  # fp32-exact
    assert torch.equal(from_bf16, bake.bake_soft_targets(features.bfloat16().float(), logits.bfloat16().float()))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # without the guard the affinities would be bf16
        f = F.normalize(features, dim=1)
        similarity = f @ f.t()
    assert similarity.dtype == torch.bfloat16


def test_single_image_batch_gives_p():
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    q = bake.bake_soft_targets(torch.randn(1, 4), logits, omega=0.9, temperature=2.0)
    torch.testing.assert_close(q, torch.softmax(logits / 2.0, dim=1))
    # ... which is what the official closed form gives for N = 1 (A = [1] from the -1e9 diagonal)
    np.testing.assert_allclose(q.numpy(), official_knowledge_ensemble(np.ones((1, 4)), logits.numpy(), 0.9, 2.0),
                               atol=1e-6)


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
    loss2 = F.cross_entropy(logits2, torch.zeros(8, dtype=torch.long)) + 16 * F.kl_div(
        F.log_softmax(logits2 / 4, 1), q.clone(), reduction="batchmean")
    torch.testing.assert_close(grad, torch.autograd.grad(loss2, layer.weight)[0])


def test_loss_eq2_hand_computed_and_logged_kd_includes_t_squared():
    logits = torch.tensor([[1.0, 0.0]])
    q = torch.tensor([[0.25, 0.75]])
    p = torch.softmax(logits / 2, 1)[0]
    kl = 0.25 * math.log(0.25 / p[0]) + 0.75 * math.log(0.75 / p[1])
    ce = -math.log(torch.softmax(logits, 1)[0, 0])
    total, ce_out, kd = bake.bake_loss(logits, torch.tensor([0]), q, lam=0.5, temperature=2.0)
    assert total.item() == pytest.approx(ce + 0.5 * 4 * kl, rel=1e-5)
    assert kd.item() == pytest.approx(4 * kl, rel=1e-5)  # train_kd logs what lambda multiplies
    assert total.item() == pytest.approx(ce_out.item() + 0.5 * kd.item(), rel=1e-6)


def test_loss_matches_official_kd_loss():
    """Official KDLoss: KLDivLoss(reduction="sum")(log_softmax(z / T), Q) * T^2 / N, plus CE."""
    torch.manual_seed(1)
    logits, labels = torch.randn(6, 5), torch.randint(0, 5, (6,))
    q = torch.softmax(torch.randn(6, 5), 1)
    kd = (q * (q.log() - torch.log_softmax(logits / 4, 1))).sum() * 16 / 6
    total, _, _ = bake.bake_loss(logits, labels, q, lam=1.0, temperature=4.0)
    torch.testing.assert_close(total, F.cross_entropy(logits, labels) + kd)


# ---------------------------------------------------------------------------------------------
# Sec. 3.3: the per-class sampler
# ---------------------------------------------------------------------------------------------
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
            size = (targets == targets[t[0]]).sum()
            if size > 1:
                assert t[0] not in t[1:]  # never the anchor itself unless alone in its class
            if size - 1 >= 2:
                assert t[1] != t[2]  # without replacement when the class has M others (official)
            if size == 1:
                assert (t == t[0]).all()
        anchors += tuples[:, 0].tolist()
    assert len(set(anchors)) == len(anchors) == len(batches) * 3  # each image is an anchor at most once
    sampler.set_epoch(1)
    assert list(sampler) != batches  # reseeded each epoch
    sampler.set_epoch(0)
    assert list(sampler) == batches


def test_sampler_companions_uniform_without_replacement():
    # one class of 5: each anchor's M = 2 companions are a uniformly random pair of the 4 others
    targets = np.zeros(5, dtype=np.int64)
    counts = {}
    for epoch in range(600):
        sampler = bake.PerClassBatchSampler(targets, anchors_per_batch=5, per_class=2, seed=0)
        sampler.set_epoch(epoch)
        for t in np.array(next(iter(sampler))).reshape(5, 3):
            assert len(set(t.tolist())) == 3
            key = (t[0], frozenset(t[1:].tolist()))
            counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 5 * 6  # every (anchor, pair of others) occurs
    expected = 600 / 6
    assert all(abs(c - expected) < 5 * math.sqrt(expected) for c in counts.values()), counts


def test_distinct_offsets_small_counts_with_replacement():
    rng = np.random.default_rng(0)
    counts = np.array([0, 1, 2, 3, 10] * 200)
    offsets = bake.distinct_offsets(rng, counts, 3)
    assert (offsets >= 0).all() and (offsets < np.maximum(counts, 1)[:, None]).all()
    assert (offsets[counts == 0] == 0).all() and (offsets[counts == 1] == 0).all()
    assert (np.sort(offsets[counts == 3], 1) == [0, 1, 2]).all()  # exactly M others: all of them
    rows = np.sort(offsets[counts == 10], 1)
    assert (np.diff(rows, axis=1) > 0).all()
    assert (offsets[counts == 2][:, 0] == offsets[counts == 2][:, 1]).any()  # fewer than M: with replacement


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


def test_sampler_at_imagenet_scale():
    targets = np.repeat(np.arange(1000), 1281)
    sampler = bake.PerClassBatchSampler(targets, 32, 1, rank=3, world=8)
    first = next(iter(sampler))
    assert len(first) == 64 and len(sampler) == len(targets) // 256


def test_epoch_tags_reach_the_items():
    from common.data import TaggedSampler
    sampler = TaggedSampler(bake.PerClassBatchSampler(np.repeat(np.arange(2), 4), 2, 1))
    sampler.set_epoch(3, 3)
    batches = list(sampler)
    assert all(epoch == 3 for batch in batches for _, epoch in batch)
    sampler.sampler.set_epoch(3)
    assert [[i for i, _ in b] for b in batches] == list(sampler.sampler)


# ---------------------------------------------------------------------------------------------
# What the recipes train with: lighting, the CIFAR network, SyncBN, schedule, precise BN, init
# ---------------------------------------------------------------------------------------------
def official_lighting_then_norm(rgb01, alpha, alphastd_unused=None):
    """pycls: the image is BGR CHW in [0, 1]; rgb = sum over columns of V * alpha * lambda (each
    row of V times alpha * lambda), and channel i gets rgb[2 - i]; then BGR mean/std."""
    eigval = np.array([0.2175, 0.0188, 0.0045])
    eigvec = np.array([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])
    bgr = rgb01[::-1].copy()
    rgb = (eigvec * (alpha * eigval)[None, :]).sum(axis=1)
    for i in range(3):
        bgr[i] += rgb[2 - i]
    mean_bgr, std_bgr = [0.406, 0.456, 0.485], [0.225, 0.224, 0.229]
    for i in range(3):
        bgr[i] = (bgr[i] - mean_bgr[i]) / std_bgr[i]
    return bgr[::-1]  # back to RGB for the comparison


def test_lighting_matches_official_pca_jitter():
    rng = np.random.default_rng(0)
    images = torch.tensor(rng.integers(0, 256, (3, 3, 5, 4)), dtype=torch.uint8)
    alpha = torch.tensor(rng.normal(0, 0.1, (3, 3)), dtype=torch.float32)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    ours = bake.PCALighting(std)(bake.normalize(images, mean, std), alpha)
    for n in range(3):
        expected = official_lighting_then_norm(images[n].numpy() / 255.0, alpha[n].double().numpy())
        np.testing.assert_allclose(ours[n].numpy(), expected, atol=1e-5)
    assert not torch.equal(ours, bake.normalize(images, mean, std))


def official_preact_resnet18(x, p):
    """The official small-scale CIFAR_ResNet18, rebuilt from its description with functional ops on
    weights p named as in the official module (conv1, bn1, layerS.B.{bn1,conv1,bn2,conv2,shortcut.0},
    linear): stem conv-BN-ReLU; each block o = relu(bn1(x)), out = conv2(relu(bn2(conv1(o)))) +
    shortcut(o), shortcut = 1x1 projection on a shape change, else o itself; 4x4 avg pool; linear."""
    def bn(t, name):
        return F.batch_norm(t, None, None, p[name + ".weight"], p[name + ".bias"], training=True)

    out = F.relu(bn(F.conv2d(x, p["conv1.weight"], padding=1), "bn1"))
    for stage, stride in zip(range(1, 5), (1, 2, 2, 2)):
        for block in range(2):
            name = f"layer{stage}.{block}"
            o = F.relu(bn(out, name + ".bn1"))
            s = stride if block == 0 else 1
            short = (F.conv2d(o, p[name + ".shortcut.0.weight"], stride=s)
                     if name + ".shortcut.0.weight" in p else o)
            h = F.conv2d(o, p[name + ".conv1.weight"], stride=s, padding=1)
            out = F.conv2d(F.relu(bn(h, name + ".bn2")), p[name + ".conv2.weight"], padding=1) + short
    pooled = F.avg_pool2d(out, 4).flatten(1)
    return pooled, F.linear(pooled, p["linear.weight"], p["linear.bias"])


def test_cifar_preact_resnet18_matches_official_structure():
    torch.manual_seed(0)
    model = bake.CifarPreActResNet18(100)
    assert sum(p.numel() for p in model.parameters()) == 11_217_444  # the official model's count
    mapped = {}
    for key, value in model.state_dict().items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            key = f"layer{int(index) // 2 + 1}.{int(index) % 2}.{rest.replace('shortcut', 'shortcut.0')}"
        mapped[key] = value
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        features, logits = bake.FeaturesAndLogits(model.train())(x)
        ref_features, ref_logits = official_preact_resnet18(x, mapped)
    torch.testing.assert_close(features, ref_features, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["test_efficientnet", "test_resnet"])
def test_sync_batchnorm_conversion_keeps_outputs(arch):
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=5)
    converted = bake.with_sync_batchnorm(copy.deepcopy(model))
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())
    x = torch.randn(4, 3, 32, 32)
    for mode in (True, False):  # batch statistics (CPU, no process group) and running statistics
        torch.testing.assert_close(converted.train(mode)(x), model.train(mode)(x), atol=0, rtol=0)
    if arch == "test_efficientnet":  # torch's own converter drops BatchNormAct2d's activation
        plain = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
        assert not torch.allclose(plain(x), model.eval()(x), atol=1e-3)


def test_lr_schedules_match_official():
    args = bake.parse_args(["--data", "/x"])  # ImageNet: cosine, 5 warmup epochs from 0.1 x lr
    for epoch in range(100):  # pycls get_epoch_lr: cosine value times the warmup factor, per epoch
        lr = 0.5 * 0.4 * (1 + np.cos(np.pi * epoch / 100))
        if epoch < 5:
            lr *= 0.1 * (1 - epoch / 5) + epoch / 5
        assert bake.epoch_lr(epoch, args) == pytest.approx(lr, rel=1e-12)
    args = bake.parse_args(["--data", "/x", "--recipe", "cifar"])
    lr, official = 0.1, []  # small_scale train.py: train epoch e, then adjust_learning_rate(e)
    for epoch in range(200):
        official.append(lr)
        lr = 0.1 / (10 if epoch >= 100 else 1) / (10 if epoch >= 150 else 1)
    assert [bake.epoch_lr(e, args) for e in range(200)] == pytest.approx(official, rel=1e-12)


def test_precise_bn_averages_batch_statistics():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    batches = [torch.randn(6, 3, 5, 5) * (i + 1) + i for i in range(3)]
    assert bake.precise_bn_stats(model.eval(), batches) == 3
    assert not model.training and model[1].momentum == 0.1
    with torch.no_grad():
        h = [model[0](b) for b in batches]
    mean = torch.stack([t.mean(dim=(0, 2, 3)) for t in h]).mean(0)
    var = torch.stack([t.transpose(0, 1).reshape(4, -1).var(dim=1, unbiased=True) for t in h]).mean(0)
    torch.testing.assert_close(model[1].running_mean, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model[1].running_var, var, atol=1e-5, rtol=1e-5)


def test_resnet_blocks_start_without_zero_gamma():
    model, _ = bake.build_classifier("test_resnet", None, 3)
    last = [m.bn2.weight for m in model.modules() if isinstance(m, timm.models.resnet.BasicBlock)]
    assert last and all(torch.all(w == 1) for w in last)  # pycls ZERO_INIT_FINAL_GAMMA False
    model, _ = bake.build_classifier("test_efficientnet", None, 3)  # no such option: builds as usual
    assert model.num_classes == 3


# ---------------------------------------------------------------------------------------------
# Recipes, flags, per-rank randomness
# ---------------------------------------------------------------------------------------------
def test_recipes_and_baseline():
    a = bake.parse_args(["--data", "/x"])
    assert (a.batch_size, a.lr, a.per_class, a.lam, a.sync_bn, a.wd, a.lighting) == (512, 0.4, 1, 1.0, "auto", 5e-5, 0.1)
    b = bake.parse_args(["--data", "/x", "--baseline"])  # official R-50 config: 256 at lr 0.2, no SyncBN
    assert (b.batch_size, b.lr, b.per_class, b.lam, b.sync_bn) == (256, 0.2, 0, 0.0, "off")
    c = bake.parse_args(["--data", "/x", "--recipe", "cifar"])
    assert (c.arch, c.batch_size, c.lr, c.per_class, c.epochs, c.nesterov, c.wd) == \
        (bake.CIFAR_ARCH, 128, 0.1, 3, 200, False, 1e-4)
    control = bake.parse_args(["--data", "demo", "--lam", "0", "--per-class", "1"])
    assert (control.batch_size, control.lr, control.per_class) == (64, 0.1, 1)  # BAKE's images per step
    assert [name for name, _ in bake.runs_of(control, [])] == ["bake"]  # no paired baseline for a control
    demo_runs = bake.runs_of(bake.parse_args(["--data", "demo"]), ["--data", "demo"])
    assert [(n, r.batch_size, r.lr, r.per_class) for n, r in demo_runs] == [("bake", 64, 0.1, 1), ("baseline", 32, 0.05, 0)]


@pytest.mark.parametrize("flag,value", [
    ("--omega", "1"), ("--omega", "-0.1"), ("--temperature", "0"), ("--temperature", "nan"), ("--lam", "-1"),
    ("--lam", "nan"), ("--per-class", "-1"), ("--epochs", "0"), ("--batch-size", "0"), ("--lr", "nan"),
    ("--lr", "0"), ("--wd", "-1"), ("--momentum", "1"), ("--warmup-epochs", "-1"), ("--warmup-factor", "0"),
    ("--lighting", "inf"), ("--precise-bn-images", "-1"), ("--input-size", "0"), ("--crop-pct", "1.5"),
    ("--interpolation", "cubic"), ("--workers", "-1"), ("--seed", "-1"), ("--stop-epoch", "0"),
])
def test_bad_flag_values_are_refused_at_parse_time(flag, value, capsys):
    with pytest.raises(SystemExit):
        bake.parse_args(["--data", "/x", f"{flag}={value}"])
    assert f"argument {flag}:" in capsys.readouterr().err


def test_batch_that_cannot_hold_whole_tuples_is_refused():
    args = bake.parse_args(["--data", "/x", "--batch-size", "512"])
    bake.check_args(args, Context(world=8))
    with pytest.raises(SystemExit, match=r"--batch-size 512 must be a multiple of processes x \(M \+ 1\) = 3 x 2"):
        bake.check_args(args, Context(world=3))


def test_two_ranks_see_different_crops_of_the_same_image(tiny_data):
    args = bake.parse_args(["--data", tiny_data, "--input-size", "16"])
    rank0, rank1 = bake.training_images(tiny_data, args, 0), bake.training_images(tiny_data, args, 1)
    assert torch.equal(rank0[(2, 0)][0], rank0[(2, 0)][0])  # (seed, rank, epoch, index) fixes the crop
    assert not torch.equal(rank0[(2, 0)][0], rank1[(2, 0)][0])
    assert not torch.equal(rank0[(2, 0)][0], rank0[(2, 1)][0])


def test_cifar_crop_resizes_other_sizes_first(tiny_data):
    args = bake.parse_args(["--data", tiny_data, "--recipe", "cifar"])
    image, _ = bake.training_images(tiny_data, args, 0)[(0, 0)]  # 40 x 40+ images
    assert image.shape == (3, 32, 32)


# ---------------------------------------------------------------------------------------------
# Global ensembling under torchrun, and the CLI end to end
# ---------------------------------------------------------------------------------------------
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
        "--crop-pct", "1.0", "--precise-bn-images", "8"]


def read_metrics(folder):
    return [json.loads(line) for line in open(folder / "metrics.jsonl")]


def test_cli_end_to_end_resume_with_a_worker_and_torchrun(tiny_data, tmp_path):
    # one loader worker (persistent): the resumed run must continue exactly as the uninterrupted one
    run_script([sys.executable, "bake.py", "--data", tiny_data, "--out", str(tmp_path / "a"), *TINY, "--workers", "1"])
    records = read_metrics(tmp_path / "a")
    assert [r["epoch"] for r in records] == [1, 2] and records[0]["train_kd"] > 0
    assert records[0]["train_images"] == 32 and records[0]["precise_bn_batches"] == 1  # 18 images: 4 x (4 + 4)
    state = torch.load(tmp_path / "a" / "last.pth", weights_only=True)
    assert [g["weight_decay"] for g in state["optimizer"]["param_groups"]] == [5e-5]  # every parameter decayed
    assert len(state["optimizer"]["param_groups"][0]["params"]) == len([k for k in state["model"]
                                                                       if not k.endswith(("running_mean",
                                                                                          "running_var",
                                                                                          "num_batches_tracked"))])
    run_script([sys.executable, "bake.py", "--data", tiny_data, "--out", str(tmp_path / "b"), *TINY, "--workers", "1",
                "--stop-epoch", "1"])
    run_script([sys.executable, "bake.py", "--data", tiny_data, "--out", str(tmp_path / "b"), *TINY, "--workers", "1",
                "--resume", "auto"])
    resumed = read_metrics(tmp_path / "b")
    for key in ("train_loss", "train_kd", "val_top1", "val_top5"):
        assert [r[key] for r in resumed] == pytest.approx([r[key] for r in records], rel=1e-6, abs=1e-9), key
    # the equal-budget control: BAKE's sampler and images per step, no distillation term
    run_script([sys.executable, "bake.py", "--data", tiny_data, "--out", str(tmp_path / "c"), *TINY, "--workers", "0",
                "--lam", "0", "--per-class", "1"])
    control = read_metrics(tmp_path / "c")
    assert [r["train_kd"] for r in control] == [0.0, 0.0] and control[0]["train_images"] == 32
    result = run_script(torchrun(2) + ["bake.py", "--data", tiny_data, "--out", str(tmp_path / "d"), *TINY,
                                       "--workers", "0"])
    ddp = read_metrics(tmp_path / "d")
    assert [r["val_count"] for r in ddp] == [9, 9] and ddp[0]["train_images"] == 32
    assert "SyncBatchNorm needs CUDA" in result.stdout and result.stdout.count("BAKE summary") == 1


def test_precise_bn_leaves_non_batchnorm2d_layers_to_their_momentum_as_the_official_code():
    """Official compute_precise_bn_stats collects nn.BatchNorm2d only; SyncBatchNorm is not one, so
    under SYNC_BN its training-mode forwards just moved the running statistics with momentum 0.1."""
    class NotBatchNorm2d(torch.nn.modules.batchnorm._BatchNorm):  # like SyncBatchNorm: no BatchNorm2d
        def _check_input_dim(self, x):
            pass
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), NotBatchNorm2d(4))
    batches = [torch.randn(6, 3, 5, 5) * (i + 1) + i for i in range(3)]
    mean, var = torch.zeros(4), torch.ones(4)
    with torch.no_grad():
        for b in batches:  # the momentum rule by hand: running = 0.9 running + 0.1 batch statistic
            h = model[0](b).transpose(0, 1).reshape(4, -1)
            mean, var = 0.9 * mean + 0.1 * h.mean(1), 0.9 * var + 0.1 * h.var(1, unbiased=True)
    assert bake.precise_bn_stats(model.eval(), batches) == 3
    torch.testing.assert_close(model[1].running_mean, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model[1].running_var, var, atol=1e-5, rtol=1e-5)
