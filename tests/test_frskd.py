"""FRSKD pieces: BiFPNc structure, losses against hand-computed values, gradient isolation, CLI."""
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import frskd
from conftest import run_script, torchrun


def test_bifpnc_shapes_for_cifar_resnet18_and_wrn16_2():
    for arch, channels in (("cifar_resnet18", [64, 128, 256, 512]), ("wrn16_2", [32, 64, 128])):
        classifier = frskd.make_classifier(arch, 10)
        assert classifier.stage_channels == channels
        features, logits = classifier.forward_stages(torch.randn(2, 3, 32, 32))
        teacher = frskd.BiFPNc(channels, 10, width=2)
        refined, teacher_logits = teacher(features)
        assert [t.shape[1] for t in refined] == [2 * c for c in channels]  # d_i = w c_i
        assert [t.shape[-2:] for t in refined] == [f.shape[-2:] for f in features]
        assert features[0].shape[-1] == 32  # CIFAR stem keeps full resolution in the first stage
        assert logits.shape == teacher_logits.shape == (2, 10)


def test_repeat_two_and_equal_width_bifpn_run():
    features = [torch.randn(2, c, s, s) for c, s in ((8, 16), (16, 8), (32, 4))]
    refined, logits = frskd.BiFPNc([8, 16, 32], 5, width=2, repeat=2)(features)
    assert [t.shape[1] for t in refined] == [16, 32, 64] and logits.shape == (2, 5)
    refined, _ = frskd.BiFPNc([8, 16, 32], 5, channels=24)(features)
    assert [t.shape[1] for t in refined] == [24, 24, 24]


def test_fusion_weights_non_negative_and_normalized():
    fusion = frskd.FastFusion(3)
    with torch.no_grad():
        fusion.weight.copy_(torch.tensor([2.0, -1.0, 1.0]))
    w = fusion.normalized_weights()
    assert (w >= 0).all() and w.sum().item() == pytest.approx(1.0, abs=1e-5)
    xs = [torch.full((1, 1, 2, 2), v) for v in (1.0, 5.0, 4.0)]
    assert fusion(xs)[0, 0, 0, 0].item() == pytest.approx((2 * 1 + 0 + 1 * 4) / (3 + 1e-6), rel=1e-5)


def test_attention_transfer_hand_computed():
    f = torch.zeros(1, 2, 1, 2)
    f[0, :, 0, 0] = torch.tensor([1.0, 1.0])  # mean of squares: position 0 -> 1, position 1 -> 0
    t = torch.zeros(1, 2, 1, 2)
    t[0, :, 0, :] = torch.tensor([[2.0, 2.0], [2.0, 2.0]])  # positions equal -> [1/sqrt2, 1/sqrt2]
    assert frskd.attention_map(f).tolist() == [[1.0, 0.0]]
    expected = ((1 - 1 / math.sqrt(2)) ** 2 + (0 - 1 / math.sqrt(2)) ** 2) / 2
    assert frskd.attention_loss([f], [t]).item() == pytest.approx(expected, rel=1e-6)


def test_kd_term_on_known_logits():
    logits, teacher = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    one_hot = torch.tensor([[1.0, 0.0]])
    features = [torch.ones(1, 1, 2, 2)]
    _, (ce_c, ce_t, kd, feat) = frskd.frskd_loss(logits, teacher, features, features, one_hot, 1.0, 1.0, 4.0)
    p, q = torch.softmax(teacher / 4, 1)[0], torch.softmax(logits / 4, 1)[0]
    expected = 16 * sum(p[i] * math.log(p[i] / q[i]) for i in range(2))  # K^2 KL(teacher || classifier)
    assert kd.item() == pytest.approx(float(expected), rel=1e-5)
    assert ce_c.item() == pytest.approx(F.cross_entropy(logits, torch.tensor([0])).item())
    assert feat.item() == 0.0


def test_gradient_isolation():
    torch.manual_seed(0)
    net = frskd.FRSKDNet(frskd.make_classifier("wrn16_2", 5), frskd.BiFPNc([32, 64, 128], 5))
    features, logits, refined, teacher_logits = net(torch.randn(4, 3, 32, 32))
    targets = F.one_hot(torch.tensor([0, 1, 2, 3]), 5).float()
    _, (ce_c, ce_t, kd, feat) = frskd.frskd_loss(logits, teacher_logits, features, refined, targets, 2.0, 100.0, 4.0)
    teacher_params = list(net.self_teacher.parameters())
    backbone = net.classifier.stem.weight
    for term in (kd, feat):  # distillation terms: no gradient into the self-teacher
        grads = torch.autograd.grad(term, teacher_params + [backbone], retain_graph=True, allow_unused=True)
        assert all(g is None or g.abs().max() == 0 for g in grads[:-1])
        assert grads[-1] is not None and grads[-1].abs().max() > 0  # but they train the classifier
    grad = torch.autograd.grad(ce_t, backbone, retain_graph=True)[0]
    assert grad.abs().max() > 0  # the self-teacher's CE reaches the classifier backbone (official)


def test_table6_parameter_and_flop_ratios():
    classifier = frskd.WideResNet(100).eval()
    x = torch.randn(1, 3, 32, 32)
    features, _ = classifier.forward_stages(x)
    with FlopCounterMode(display=False) as count:
        classifier(x)
    base_flops, base_params = count.get_total_flops(), sum(p.numel() for p in classifier.parameters())
    for width, params_ratio, flops_ratio in ((2, 0.59, 0.68), (1, 0.19, 0.21)):  # Table 6, BiFPNc rows
        teacher = frskd.BiFPNc(classifier.stage_channels, 100, width=width).eval()
        with FlopCounterMode(display=False) as count:
            teacher(features)
        assert sum(p.numel() for p in teacher.parameters()) / base_params == pytest.approx(params_ratio, abs=0.015)
        assert count.get_total_flops() / base_flops == pytest.approx(flops_ratio, abs=0.015)


TINY = ["--arch", "test_resnet", "--input-size", "32", "--batch-size", "8", "--epochs", "2", "--workers", "0",
        "--milestones", "1", "--crop-pct", "1.0"]


def test_cli_end_to_end_resume_and_torchrun(tiny_data, tmp_path):
    run_script([sys.executable, "frskd.py", "--data", tiny_data, "--out", str(tmp_path / "a"), *TINY])
    records = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["epoch"] for r in records] == [1, 2] and records[0]["train_feature"] > 0
    assert "val_self_teacher_top1" in records[0] and records[1]["lr"] == pytest.approx(0.01)
    run_script([sys.executable, "frskd.py", "--data", tiny_data, "--out", str(tmp_path / "b"), *TINY, "--stop-epoch", "1"])
    run_script([sys.executable, "frskd.py", "--data", tiny_data, "--out", str(tmp_path / "b"), *TINY, "--resume", "auto"])
    resumed = [json.loads(l) for l in open(tmp_path / "b" / "metrics.jsonl")]
    assert resumed[1]["train_loss"] == pytest.approx(records[1]["train_loss"], rel=1e-5)
    result = run_script(torchrun(2) + ["frskd.py", "--data", tiny_data, "--out", str(tmp_path / "c"), *TINY,
                                       "--beta", "0", "--cutmix", "1.0"])
    ddp = [json.loads(l) for l in open(tmp_path / "c" / "metrics.jsonl")]
    assert [r["val_count"] for r in ddp] == [9, 9] and ddp[0]["train_feature"] > 0
    assert result.stdout.count("FRSKD summary") == 1
