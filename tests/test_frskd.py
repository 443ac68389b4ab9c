"""FRSKD: BiFPNc and WRN-16-2 against references rebuilt from the official structure, Table 6,
losses against hand-computed values, gradient isolation, per-rank data, the CLI."""
import argparse
import itertools
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

import frskd
from common.data import SeededItems, image_folder
from conftest import run_script, torchrun


# ---------------------------------------------------------------------------------------------
# Reference BiFPNc, written from the paper's Eq. 1-2 and the official module's structure:
# laterals L_i and separate bottom-up laterals L'_i = 1x1 conv-BN-ReLU of relu(F_i); top-down
# P_n = L_n, P_i = node(fuse(relu L_i, R_up(up2(relu P_{i+1})))); bottom-up T_1 = P_1,
# T_i = node(fuse(relu L'_i, relu P_i, R_down(pool(relu T_{i-1})))) (deepest: no P term);
# up2 nearest x2, pool = 3x3/2 max-pool after zero-padding 0 top/left and 1 bottom/right;
# R_up/R_down = 1x1 conv-BN-ReLU (BiFPNc) or nothing (equal-width BiFPN); node = 2 x (depthwise
# 3x3, pointwise 1x1, BN) with a ReLU between; fuse = sum relu(w_k) x_k / (sum relu(w_k) + 1e-6);
# outputs relu(T_i); logits = fc(mean over space of relu(T_n)). BN in training mode.
# ---------------------------------------------------------------------------------------------
def reference_parameters(in_channels, widths, classes, resample, seed=0):
    g = torch.Generator().manual_seed(seed)
    W, n = {}, len(widths)

    def rand(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    def conv_bn(key, cin, cout):
        W[key] = rand(cout, cin, 1, 1)
        W[key + ".g"], W[key + ".b"] = 1 + rand(cout, scale=0.2), rand(cout, scale=0.2)

    def node(key, c):
        for part in ("1", "2"):
            W[f"{key}.dw{part}"], W[f"{key}.pw{part}"] = rand(c, 1, 3, 3), rand(c, c, 1, 1)
            W[f"{key}.g{part}"], W[f"{key}.b{part}"] = 1 + rand(c, scale=0.2), rand(c, scale=0.2)

    for i in range(n):
        conv_bn(f"L{i}", in_channels[i], widths[i])
        if i > 0:
            conv_bn(f"L'{i}", in_channels[i], widths[i])
            node(f"T{i}", widths[i])
            W[f"wT{i}"] = 0.3 + torch.rand(3 if i < n - 1 else 2, generator=g)  # > 0: every input counts
            if resample:
                conv_bn(f"down{i}", widths[i - 1], widths[i])
        if i < n - 1:
            node(f"P{i}", widths[i])
            W[f"wP{i}"] = 0.3 + torch.rand(2, generator=g)
            if resample:
                conv_bn(f"up{i}", widths[i + 1], widths[i])
    W["fc"], W["fc.b"] = rand(classes, widths[-1]), rand(classes)
    return W


def reference_bifpnc(features, W, resample):
    relu, n = F.relu, len(features)

    def bn(x, gamma, beta):
        return F.batch_norm(x, None, None, gamma, beta, training=True, eps=1e-5)

    def conv_bn_relu(x, key):
        return relu(bn(F.conv2d(x, W[key]), W[key + ".g"], W[key + ".b"]))

    def node(x, key):
        c = x.shape[1]
        x = bn(F.conv2d(F.conv2d(x, W[key + ".dw1"], padding=1, groups=c), W[key + ".pw1"]), W[key + ".g1"], W[key + ".b1"])
        x = relu(x)
        return bn(F.conv2d(F.conv2d(x, W[key + ".dw2"], padding=1, groups=c), W[key + ".pw2"]), W[key + ".g2"], W[key + ".b2"])

    def fuse(xs, key):
        w = relu(W[key])
        w = w / (w.sum() + 1e-6)
        return sum(w[k] * x for k, x in enumerate(xs))

    def up(x, i):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return conv_bn_relu(x, f"up{i}") if resample else x

    def down(x, i):
        x = F.max_pool2d(F.pad(x, (0, 1, 0, 1)), 3, 2)
        return conv_bn_relu(x, f"down{i}") if resample else x

    L = [conv_bn_relu(relu(f), f"L{i}") for i, f in enumerate(features)]
    L2 = {i: conv_bn_relu(relu(features[i]), f"L'{i}") for i in range(1, n)}
    P = {n - 1: L[n - 1]}
    for i in reversed(range(n - 1)):
        P[i] = node(fuse([relu(L[i]), up(relu(P[i + 1]), i)], f"wP{i}"), f"P{i}")
    T = {0: P[0]}
    for i in range(1, n):
        xs = [relu(L2[i]), relu(P[i])] if i < n - 1 else [relu(L2[i])]
        T[i] = node(fuse(xs + [down(relu(T[i - 1]), i)], f"wT{i}"), f"T{i}")
    refined = [relu(T[i]) for i in range(n)]
    return refined, F.linear(refined[-1].mean(dim=(2, 3)), W["fc"], W["fc.b"])


def load_reference_into(model, W, n, resample):
    """Copy the reference's weights into our BiFPNc; every parameter of ours must be set."""
    layer, assigned = model.layers[0], []

    def put(param, value):
        with torch.no_grad():
            param.copy_(value)
        assigned.append(param)

    def conv_bn(seq, key):
        put(seq[0].weight, W[key]), put(seq[1].weight, W[key + ".g"]), put(seq[1].bias, W[key + ".b"])

    def node(seq, key):
        for offset, part in ((0, "1"), (4, "2")):
            put(seq[offset].weight, W[f"{key}.dw{part}"]), put(seq[offset + 1].weight, W[f"{key}.pw{part}"])
            put(seq[offset + 2].weight, W[f"{key}.g{part}"]), put(seq[offset + 2].bias, W[f"{key}.b{part}"])

    for i in range(n):
        conv_bn(layer.lateral[i], f"L{i}")
    for i in range(1, n):
        conv_bn(layer.lateral_bottom_up[i - 1], f"L'{i}")
        node(layer.bottom_up_conv[i - 1], f"T{i}")
        put(layer.bottom_up_fusion[i - 1].weight, W[f"wT{i}"])
        if resample:
            conv_bn(layer.down_resample[i - 1], f"down{i}")
    for i in range(n - 1):
        node(layer.top_down_conv[i], f"P{i}")
        put(layer.top_down_fusion[i].weight, W[f"wP{i}"])
        if resample:
            conv_bn(layer.up_resample[i], f"up{i}")
    put(model.fc.weight, W["fc"]), put(model.fc.bias, W["fc.b"])
    assert {id(p) for p in assigned} == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("channels, sizes, bifpn_channels", [
    ([32, 64, 128], [32, 16, 8], None),             # WRN-16-2 stages, BiFPNc w = 2
    ([64, 128, 256, 512], [32, 16, 8, 4], None),    # CIFAR ResNet-18 stages, BiFPNc w = 2
    ([32, 64, 128], [32, 16, 8], 24),               # equal-width BiFPN (Table 6), no resample convs
])
def test_bifpnc_matches_reference_rebuilt_from_official_structure(channels, sizes, bifpn_channels):
    torch.manual_seed(0)
    features = [torch.randn(3, c, s, s) for c, s in zip(channels, sizes)]  # signed: the ReLUs matter
    resample = bifpn_channels is None
    ours = frskd.BiFPNc(channels, 7, width=2, channels=bifpn_channels).train()
    W = reference_parameters(channels, ours.widths, 7, resample)
    load_reference_into(ours, W, len(channels), resample)
    refined, logits = ours(features)
    expected_refined, expected_logits = reference_bifpnc(features, W, resample)
    assert ours.widths == ([2 * c for c in channels] if resample else [bifpn_channels] * len(channels))
    for got, want in zip(refined, expected_refined):
        assert got.shape == want.shape and (got - want).abs().max() < 1e-5
    assert (logits - expected_logits).abs().max() < 1e-5


def test_max_pool_same_pads_like_tensorflow():
    x = torch.rand(1, 2, 8, 7)  # even height: 0 top / 1 bottom; odd width: 1 left / 1 right
    expected = F.max_pool2d(F.pad(x, (1, 1, 0, 1)), 3, 2)
    assert frskd.max_pool_same(x).shape[-2:] == (4, 4) and torch.equal(frskd.max_pool_same(x), expected)


def test_repeat_stacks_without_extra_laterals_and_equal_width_layers_stack():
    features = [torch.randn(2, c, s, s) for c, s in ((8, 16), (16, 8), (32, 4))]
    teacher = frskd.BiFPNc([8, 16, 32], 5, width=2, repeat=2)
    refined, logits = teacher(features)
    assert [t.shape[1] for t in refined] == [16, 32, 64] and logits.shape == (2, 5)
    later = teacher.layers[1]
    assert later.lateral is None  # L_i = the previous layer's T_i (identity), no d -> d conv
    assert [seq[0].weight.shape[:2] for seq in later.lateral_bottom_up] == [(32, 32), (64, 64)]
    # an equal-width stack (no channel change, several layers), as segmentation uses
    stack = nn.ModuleList([frskd.BiFPNLayer([24] * 3, [24] * 3, first=False, resample_convs=False) for _ in range(2)])
    maps = [torch.randn(2, 24, s, s) for s in (16, 8, 4)]
    for layer in stack:
        maps = layer(maps)
    assert [m.shape for m in maps] == [(2, 24, s, s) for s in (16, 8, 4)] and min(m.min() for m in maps) >= 0
    with pytest.raises(ValueError):
        frskd.BiFPNLayer([8, 16], [16, 32], first=False)


def test_fusion_weights_non_negative_and_normalized():
    fusion = frskd.FastFusion(3)
    with torch.no_grad():
        fusion.weight.copy_(torch.tensor([2.0, -1.0, 1.0]))
    w = fusion.normalized_weights()
    assert (w >= 0).all() and w.sum().item() == pytest.approx(1.0, abs=1e-5)
    xs = [torch.full((1, 1, 2, 2), v) for v in (1.0, 5.0, 4.0)]
    assert fusion(xs)[0, 0, 0, 0].item() == pytest.approx((2 * 1 + 0 + 1 * 4) / (3 + 1e-6), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# WRN-16-2 as in the official code, rebuilt from its description: 3x3 stem (no BN); three groups
# of two blocks (16 -> 32, 32 -> 64 /2, 64 -> 128 /2); block: a = relu(x), out = conv3x3(relu(BN(
# conv3x3(a)))), plus x (same width) or conv1x1(a); a BN after each group whose output feeds the
# next group; features relu(BN(group)); logits = fc(mean relu(f3)); a final BN defined, never used.
# ---------------------------------------------------------------------------------------------
class ReferenceWRN16x2(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.blocks, self.group_norms = nn.ModuleList(), nn.ModuleList()
        for cin, cout in ((16, 32), (32, 64), (64, 128)):
            for b in range(2):
                block = nn.ModuleDict({"a": nn.Conv2d(cin if b == 0 else cout, cout, 3, 2 if b == 0 and cin != 16 else 1,
                                                      1, bias=False),
                                       "bn": nn.BatchNorm2d(cout), "b": nn.Conv2d(cout, cout, 3, 1, 1, bias=False)})
                if b == 0:
                    block["short"] = nn.Conv2d(cin, cout, 1, 2 if cin != 16 else 1, bias=False)
                self.blocks.append(block)
            self.group_norms.append(nn.BatchNorm2d(cout))
        self.unused_bn = nn.BatchNorm2d(128)
        self.fc = nn.Linear(128, classes)

    def forward(self, x):
        x, features = self.stem(x), []
        for g in range(3):
            for block in self.blocks[2 * g: 2 * g + 2]:
                a = F.relu(x)
                out = block["b"](F.relu(block["bn"](block["a"](a))))
                x = out + (block["short"](a) if "short" in block else x)
            x = self.group_norms[g](x)
            features.append(F.relu(x))
        return features, self.fc(features[-1].mean(dim=(2, 3)))


def test_wrn16_2_matches_the_official_structure():
    reference, ours = ReferenceWRN16x2(100), frskd.make_classifier("wrn16_2", 100)
    assert sum(p.numel() for p in reference.parameters()) == 703_060  # the official count
    # ours leaves out the final BN the official module never calls
    assert sum(p.numel() for p in ours.parameters()) == 703_060 - 2 * 128
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.2)
    mapping = {"stem.weight": reference.stem.weight, "fc.weight": reference.fc.weight, "fc.bias": reference.fc.bias}
    for g, b in itertools.product(range(3), range(2)):
        block, prefix = reference.blocks[2 * g + b], f"groups.{g}.{b}."
        mapping.update({prefix + "conv1.weight": block["a"].weight, prefix + "bn.weight": block["bn"].weight,
                        prefix + "bn.bias": block["bn"].bias, prefix + "conv2.weight": block["b"].weight})
        if "short" in block:
            mapping[prefix + "shortcut.weight"] = block["short"].weight
    for g in range(3):
        mapping[f"group_bns.{g}.weight"] = reference.group_norms[g].weight
        mapping[f"group_bns.{g}.bias"] = reference.group_norms[g].bias
    assert set(mapping) == {name for name, _ in ours.named_parameters()}
    ours.load_state_dict({**ours.state_dict(), **{k: v.detach() for k, v in mapping.items()}})
    x = torch.randn(2, 3, 32, 32)
    (features, logits), (ref_features, ref_logits) = ours.forward_stages(x), reference(x)
    assert [f.shape[1] for f in features] == [32, 64, 128]
    for got, want in zip(features, ref_features):
        assert (got - want).abs().max() < 1e-5
    assert (logits - ref_logits).abs().max() < 1e-5


class ReferenceCifarResNet18(nn.Module):
    """The official CIFAR ResNet-18, from its description: conv3x3 + BN stem (its ReLU comes at the
    first block), no max-pool; block: a = relu(x), out = BN(conv(relu(BN(conv(a))))) + (a, or
    BN(conv1x1/s(a))), no ReLU at its end; features relu(layer outputs); logits fc(mean relu(out4)).
    Parameter names as timm's, so the weights map by name."""

    def __init__(self, classes):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)
        cin = 64
        for i, cout in enumerate((64, 128, 256, 512)):
            blocks = []
            for b in range(2):
                stride = 2 if b == 0 and i > 0 else 1
                block = nn.Module()
                block.conv1, block.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
                block.conv2, block.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
                if stride != 1 or cin != cout:
                    block.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                blocks.append(block)
                cin = cout
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x, features = self.bn1(self.conv1(x)), []
        for i in range(1, 5):
            for block in getattr(self, f"layer{i}"):
                a = F.relu(x)
                out = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(a)))))
                x = out + (block.downsample(a) if hasattr(block, "downsample") else a)
            features.append(F.relu(x))
        return features, self.fc(features[-1].mean(dim=(2, 3)))


def test_cifar_resnet18_matches_the_official_structure():
    reference, ours = ReferenceCifarResNet18(100), frskd.make_classifier("cifar_resnet18", 100)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.05)
    ours.model.load_state_dict(reference.state_dict())  # strict: the same parameters and buffers
    x = torch.randn(2, 3, 32, 32)
    (features, logits), (ref_features, ref_logits) = ours.forward_stages(x), reference(x)
    assert [f.shape[1:] for f in features] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]
    for got, want in zip(features, ref_features):
        assert (got - want).abs().max() < 1e-4 * want.abs().max()
    assert (logits - ref_logits).abs().max() < 1e-4 * ref_logits.abs().max()


def test_classifier_initialisation_follows_the_official_code():
    wrn = frskd.make_classifier("wrn16_2", 10)
    conv = wrn.groups[1][0].conv1  # He normal, fan-out: std sqrt(2 / (9 * 64))
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.05)
    for arch in ("cifar_resnet18", "resnet18"):  # timm's zero-initialised last BN gammas are off
        model = frskd.make_classifier(arch, 10)
        assert all((m.weight == 1).all() for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    cifar = frskd.make_classifier("cifar_resnet18", 10).model  # PyTorch default init (official CIFAR ResNet)
    weight = cifar.layer2[0].conv1.weight
    assert weight.abs().max() <= 1 / math.sqrt(weight[0].numel()) and cifar.conv1.kernel_size == (3, 3)


def test_weight_decay_on_every_parameter_by_default():
    net = frskd.build_net(frskd.parse_args(["--data", "x", "--recipe", "cifar", "--arch", "wrn16_2"]), 10)
    args = argparse.Namespace(wd=1e-4, wd_scope="all", lr=0.1, momentum=0.9)
    decayed = [p for g in frskd.make_optimizer_for(net, args).param_groups if g["weight_decay"] > 0 for p in g["params"]]
    assert len(decayed) == len(list(net.parameters()))  # BN, biases and fusion weights too (official)
    args.wd_scope = "weights"
    decayed = [p for g in frskd.make_optimizer_for(net, args).param_groups if g["weight_decay"] > 0 for p in g["params"]]
    assert all(p.ndim > 1 for p in decayed)


def test_table6_parameter_and_flop_ratios():
    classifier = frskd.WideResNet(100).eval()
    x = torch.randn(1, 3, 32, 32)
    features, _ = classifier.forward_stages(x)
    with FlopCounterMode(display=False) as count:
        classifier(x)
    base_flops, base_params = count.get_total_flops(), sum(p.numel() for p in classifier.parameters())
    rows = {(2, None): (0.59, 0.68), (1, None): (0.19, 0.21), (2, 128): (0.30, 0.67), (2, 256): (0.97, 2.38)}
    for (width, channels), (params_ratio, flops_ratio) in rows.items():  # Table 6: BiFPNc w=2, w=1, BiFPN 128, 256
        teacher = frskd.BiFPNc(classifier.stage_channels, 100, width=width, channels=channels).eval()
        with FlopCounterMode(display=False) as count:
            teacher(features)
        assert sum(p.numel() for p in teacher.parameters()) / base_params == pytest.approx(params_ratio, abs=0.005)
        # FLOPs of convolutions and matmuls only; the paper does not say what its counter counts
        assert count.get_total_flops() / base_flops == pytest.approx(flops_ratio, abs=max(0.015, 0.015 * flops_ratio))


def test_demo_self_teacher_has_table6_proportions():
    recipe = frskd.RECIPES["demo"]
    classifier = frskd.make_classifier(recipe["arch"], 10).eval()
    x = torch.randn(1, 3, recipe["input_size"], recipe["input_size"])
    features, _ = classifier.forward_stages(x)
    teacher = frskd.BiFPNc(classifier.stage_channels, 10).eval()
    with FlopCounterMode(display=False) as base, torch.no_grad():
        classifier(x)
    with FlopCounterMode(display=False) as count, torch.no_grad():
        teacher(features)
    params = sum(p.numel() for p in teacher.parameters()) / sum(p.numel() for p in classifier.parameters())
    assert params == pytest.approx(0.58, abs=0.01)  # Table 6, BiFPNc w = 2 on WRN-16-2: x0.59 / x0.68
    assert count.get_total_flops() / base.get_total_flops() == pytest.approx(0.66, abs=0.01)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------
def test_attention_transfer_hand_computed():
    f = torch.zeros(1, 2, 1, 2)
    f[0, :, 0, 0] = torch.tensor([1.0, 1.0])  # mean of squares: position 0 -> 1, position 1 -> 0
    t = torch.zeros(1, 2, 1, 2)
    t[0, :, 0, :] = torch.tensor([[2.0, 2.0], [2.0, 2.0]])  # positions equal -> [1/sqrt2, 1/sqrt2]
    assert frskd.attention_map(f).tolist() == [[1.0, 0.0]]
    expected = ((1 - 1 / math.sqrt(2)) ** 2 + (0 - 1 / math.sqrt(2)) ** 2) / 2
    assert frskd.attention_loss([f], [t]).item() == pytest.approx(expected, rel=1e-6)


def test_kd_term_on_known_logits():
    logits, self_teacher = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    one_hot = torch.tensor([[1.0, 0.0]])
    features = [torch.ones(1, 1, 2, 2)]
    _, (ce_c, ce_t, kd, feat) = frskd.frskd_loss(logits, self_teacher, features, features, one_hot, 1.0, 1.0, 4.0)
    p, q = torch.softmax(self_teacher / 4, 1)[0], torch.softmax(logits / 4, 1)[0]
    expected = 16 * sum(p[i] * math.log(p[i] / q[i]) for i in range(2))  # K^2 KL(self-teacher || classifier)
    assert kd.item() == pytest.approx(float(expected), rel=1e-5)
    assert ce_c.item() == pytest.approx(F.cross_entropy(logits, torch.tensor([0])).item())
    assert ce_t.item() == pytest.approx(F.cross_entropy(self_teacher, torch.tensor([0])).item())
    assert feat.item() == 0.0


def test_gradient_isolation():
    torch.manual_seed(0)
    net = frskd.FRSKDNet(frskd.make_classifier("wrn16_2", 5), frskd.BiFPNc([32, 64, 128], 5))
    features, logits, refined, self_teacher_logits = net(torch.randn(4, 3, 32, 32))
    targets = F.one_hot(torch.tensor([0, 1, 2, 3]), 5).float()
    _, (ce_c, ce_t, kd, feat) = frskd.frskd_loss(logits, self_teacher_logits, features, refined, targets,
                                                 2.0, 100.0, 4.0)
    teacher_params = list(net.self_teacher.parameters())
    backbone = net.classifier.stem.weight
    for term in (kd, feat):  # distillation terms: no gradient into the self-teacher
        grads = torch.autograd.grad(term, teacher_params + [backbone], retain_graph=True, allow_unused=True)
        assert all(g is None or g.abs().max() == 0 for g in grads[:-1])
        assert grads[-1] is not None and grads[-1].abs().max() > 0  # but they train the classifier
    grad = torch.autograd.grad(ce_t, backbone, retain_graph=True)[0]
    assert grad.abs().max() > 0  # the self-teacher's CE reaches the classifier backbone (official)


# ---------------------------------------------------------------------------------------------
# Data: the CIFAR pipeline on other sizes, per-rank crops
# ---------------------------------------------------------------------------------------------
def test_cifar_pad_crop_resizes_other_sizes_first(tiny_data):
    args = frskd.parse_args(["--data", tiny_data, "--recipe", "cifar"])
    assert args.mean == [0.4914, 0.4822, 0.4465] and args.std == [0.2023, 0.1994, 0.2010]  # official CIFAR
    train_tf, eval_tf = frskd.transforms_for(args)
    folder = image_folder(tiny_data, "train")
    image = folder.loader(folder.samples[1][0])
    assert image.size == (47, 40)
    resized = transforms.PILToTensor()(transforms.Resize(32)(image))  # short side to 32
    padded = F.pad(resized, (4, 4, 4, 4))
    windows = [padded[:, y:y + 32, x:x + 32] for y in range(9) for x in range(padded.shape[2] - 31)]
    assert any(torch.equal(eval_tf(image), w) for w in windows[:1] + [padded[:, 4:36, x:x + 32] for x in range(4, 10)])
    torch.manual_seed(0)
    for _ in range(4):  # training crops: pad-4 random 32 x 32 windows (or their mirror) of the same resize
        crop = train_tf(image)
        assert any(torch.equal(crop, w) or torch.equal(crop.flip(-1), w) for w in windows)


def test_two_ranks_see_different_crops_of_the_same_image(tiny_data):
    args = frskd.parse_args(["--data", tiny_data, "--input-size", "32"])
    folder = image_folder(tiny_data, "train", frskd.transforms_for(args)[0])
    rank0, rank1 = SeededItems(folder, args.seed, 0), SeededItems(folder, args.seed, 1)
    assert torch.equal(rank0[(2, 0)][0], rank0[(2, 0)][0])  # a function of (seed, rank, epoch, index)
    assert not torch.equal(rank0[(2, 0)][0], rank1[(2, 0)][0])
    assert not torch.equal(rank0[(2, 0)][0], rank0[(2, 1)][0])


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
TINY = ["--arch", "test_resnet", "--input-size", "32", "--batch-size", "8", "--epochs", "2",
        "--milestones", "1", "--crop-pct", "1.0"]


def test_cli_end_to_end_resume_with_workers_and_torchrun(tiny_data, tmp_path):
    run_script([sys.executable, "frskd.py", "--data", tiny_data, "--out", str(tmp_path / "a"), *TINY, "--workers", "0"])
    records = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["epoch"] for r in records] == [1, 2] and records[0]["train_feature"] > 0
    assert "val_self_teacher_top1" in records[0] and records[1]["lr"] == pytest.approx(0.01)
    # stopped and resumed, with a loader worker: the same epoch 2 as the uninterrupted run without
    b = ["--data", tiny_data, "--out", str(tmp_path / "b"), *TINY, "--workers", "1"]
    run_script([sys.executable, "frskd.py", *b, "--stop-epoch", "1"])
    run_script([sys.executable, "frskd.py", *b, "--resume", "auto"])
    resumed = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    for key in ("train_loss", "train_kd", "train_feature", "val_top1", "val_self_teacher_top1"):
        assert resumed[1][key] == pytest.approx(records[1][key], rel=1e-5, abs=1e-7), key
    result = run_script(torchrun(2) + ["frskd.py", "--data", tiny_data, "--out", str(tmp_path / "c"), *TINY,
                                       "--workers", "0", "--beta", "0", "--cutmix", "1.0"])
    ddp = [json.loads(line) for line in open(tmp_path / "c" / "metrics.jsonl")]
    assert [r["val_count"] for r in ddp] == [9, 9] and ddp[0]["train_feature"] > 0
    assert result.stdout.count("FRSKD summary") == 1


def test_demo_trains_frskd_then_the_baseline_with_the_same_flags(tmp_path, monkeypatch, capsys):
    """`--data demo`: FRSKD in OUT/frskd, then plain CE with the same flags in OUT/baseline, one
    summary line naming both, and summary.json with both runs (tiny demo set, 1 epoch)."""
    monkeypatch.setenv("KD_DEMO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(frskd.demo, "TRAIN_PER_CLASS", 4)
    monkeypatch.setattr(frskd.demo, "VAL_PER_CLASS", 1)
    out = tmp_path / "out"
    assert frskd.parse_args(["--data", "demo"]).warmup_epochs == 8  # the demo's warm-up (not official)
    frskd.main(["--data", "demo", "--out", str(out), "--epochs", "1", "--milestones", "1", "--warmup-epochs", "0",
                "--batch-size", "8", "--workers", "0", "--device", "cpu"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "FRSKD summary" in line]
    assert len(lines) == 1 and "frskd classifier top-1" in lines[0] and "baseline classifier top-1" in lines[0]
    summary = json.load(open(out / "summary.json"))
    assert set(summary) == {"frskd", "baseline"} and "best_top1" in summary["baseline"]
    assert "val_self_teacher_top1" in summary["frskd"]["final"]
    assert "val_self_teacher_top1" not in summary["baseline"]["final"]
    for run in ("frskd", "baseline"):
        assert [json.loads(r)["epoch"] for r in open(out / run / "metrics.jsonl")] == [1]


def test_classification_distillation_warmup_holds_alpha_and_beta_at_zero_then_full(tiny_data, tmp_path):
    """--warmup-epochs N (not in the official classification code; default 0): Eq. 5 without its
    distillation terms for N epochs, then at full weight; 0 leaves every epoch at full weight."""
    frskd.main(["--data", tiny_data, "--out", str(tmp_path / "w"), *TINY, "--workers", "0", "--warmup-epochs",
                "1", "--alpha", "3", "--beta", "100", "--device", "cpu"])
    first, second = [json.loads(line) for line in open(tmp_path / "w" / "metrics.jsonl")]
    assert (first["alpha"], first["beta"], second["alpha"], second["beta"]) == (0.0, 0.0, 3.0, 100.0)
    assert first["train_kd"] > 0 and first["train_loss"] == pytest.approx(
        first["train_ce"] + first["train_ce_self_teacher"], rel=1e-5)
    assert second["train_loss"] == pytest.approx(second["train_ce"] + second["train_ce_self_teacher"] + 3 *
                                                 second["train_kd"] + 100 * second["train_feature"], rel=1e-5)
    assert frskd.parse_args(["--data", "x"]).warmup_epochs == 0  # the official default
    with pytest.raises(SystemExit):  # a warm-up as long as the run would never distil: refused
        frskd.parse_args(["--data", "x", "--epochs", "2", "--warmup-epochs", "2"])
