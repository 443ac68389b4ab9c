"""FRSKD for semantic segmentation (frskd.py --task segmentation) and frskd_seg_data.py.

The official network, losses, schedule and metric are rebuilt here from their description
(MingiJi/FRSKD segmentation/: EfficientDet with BiFPNSeg layers, DistillKL, Attention,
sigmoid_rampup, EvaluatorSeg) and compared with ours on the same inputs, weights mapped in.
"""
import json
import math
import os

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import frskd
from common import demo
from common.data import DataError
from conftest import run_script, torchrun
from frskd_seg_data import (IGNORE_INDEX, RandomScaleCropFlip, ResizePair, SegmentationSet, check_pairs,
                            confusion_matrix, find_pairs, iou_per_class, mean_iou)

SEG = ["frskd.py", "--task", "segmentation"]


def tiny_net(num_classes=5, width=16, baseline=False, seed=0):
    torch.manual_seed(seed)
    backbone = frskd.EfficientNetTaps(timm.create_model("test_efficientnet", num_classes=0))
    return frskd.FRSKDSegNet(backbone, num_classes, width, self_teacher=not baseline)


# ----------------------------------------------------------------------------------------------
# Network against an independent rebuild of the official EfficientDet/BiFPNSeg forward
# ----------------------------------------------------------------------------------------------
def _conv_bn_relu(x, seq, groups=1):
    """conv (+bias) -> BN in training mode (batch statistics) -> ReLU, with the module's weights."""
    conv, bn = seq[0], seq[1]
    x = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, groups=groups)
    return F.relu(F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps))


def _official_bifpn_layer(layer, p, last):
    """BiFPNSeg: top-down P_i^up = node(P_i + Upsample(scale_factor=w_i / w_{i+1}, bilinear)(P_{i+1}^up)),
    bottom-up P_i^out = node(P_i + P_i^up + interpolate(P_{i-1}^out, size)) (nearest); the last layer
    returns (P_2^out, P_3^up, ..., P_7^up)."""
    width = p[0].shape[1]
    node = lambda x, seq: _conv_bn_relu(x, seq, groups=width)  # noqa: E731  depthwise 1x1
    up = [None] * 6
    up[5] = node(p[5], layer.up_nodes[5])
    for i in (4, 3, 2, 1, 0):
        scale = p[i].shape[3] / up[i + 1].shape[3]
        up[i] = node(p[i] + F.interpolate(up[i + 1], scale_factor=scale, mode="bilinear"), layer.up_nodes[i])
    if last:
        return up
    out = [up[0]]
    for i in range(1, 6):
        out.append(node(p[i] + up[i] + F.interpolate(out[-1], size=up[i].shape[2:]), layer.down_nodes[i - 1]))
    return out


def _official_forward(net, x):
    """EfficientDet.forward of the official segmentation code, functionally, with our weights."""
    c2, c3, c4, c5 = net.backbone(x)
    fpn = net.fpn
    p6 = _conv_bn_relu(c5, fpn.level6)
    p7 = _conv_bn_relu(p6, fpn.level7)
    p5 = _conv_bn_relu(c5, fpn.lateral[3])
    def up_add(top, lateral):
        return F.interpolate(top, size=lateral.shape[2:], mode="bilinear") + lateral
    p4 = up_add(p5, _conv_bn_relu(c4, fpn.lateral[2]))
    p3 = up_add(p4, _conv_bn_relu(c3, fpn.lateral[1]))
    p2 = up_add(p3, _conv_bn_relu(c2, fpn.lateral[0]))
    sources1 = [p2, p3, p4, p5, p6, p7]
    for layer in net.bifpn:
        sources1 = _official_bifpn_layer(layer, sources1, last=False)
    sources2 = sources1
    for k, layer in enumerate(net.self_teacher):
        sources2 = _official_bifpn_layer(layer, sources2, last=k == len(net.self_teacher) - 1)

    def head(seq, f):
        y = F.relu(F.batch_norm(F.conv2d(f, seq[0].weight, seq[0].bias, padding=1), None, None, seq[1].weight,
                                seq[1].bias, training=True, eps=seq[1].eps))
        y = F.conv2d(y, seq[3].weight, seq[3].bias, padding=1)
        return F.interpolate(y, size=x.shape[2:], mode="bilinear")
    return sources1, head(net.head, sources1[0]), sources2, head(net.self_teacher_head, sources2[0])


def test_network_matches_official_forward():
    net = tiny_net(num_classes=5, width=16)
    with torch.no_grad():  # non-trivial BN affine parameters
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    # float64: the two forwards sum in different orders, and float32 rounding (~2e-5 on this CPU
    # build, 1.7e-5 on CI's) would hide nothing but flake; in float64 they agree to ~1e-12.
    net.double().train()
    x = torch.randn(2, 3, 128, 128, dtype=torch.float64)  # strides 4..128: 32, 16, 8, 4, 2, 1
    ours = net(x)
    with torch.no_grad():
        reference = _official_forward(net, x)
    for a, b in zip(ours[1::2], reference[1::2]):  # classifier and self-teacher logits
        assert a.shape == (2, 5, 128, 128)
        assert (a - b).abs().max() < 1e-9
    for level_a, level_b in zip(ours[0] + ours[2], reference[0] + reference[2]):  # both BiFPN stacks
        assert (level_a - level_b).abs().max() < 1e-9


def test_official_batchnorm_settings():
    net = tiny_net()
    backbone_bn = [m for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert backbone_bn and all(m.momentum == 0.01 for m in backbone_bn)  # efficientnet_pytorch: 1 - 0.99
    for seq in (net.fpn.level6, net.fpn.lateral[0], net.head):
        assert seq[1].eps == 1e-4 and seq[1].momentum == 0.997  # official EfficientDet Conv and heads
    node = net.bifpn[0].up_nodes[0]
    assert node[0].groups == node[0].in_channels == 16 and node[0].kernel_size == (1, 1)
    assert node[1].eps == 1e-5 and node[1].momentum == 0.1  # BiFPNSeg: PyTorch defaults


@pytest.mark.parametrize("arch, taps, channels", [("tf_efficientnet_b0", [1, 3, 5, 15], [24, 40, 80, 320]),
                                                  ("tf_efficientnet_b1", [2, 5, 8, 22], [24, 40, 80, 320])])
def test_backbone_taps_are_the_official_layer_ends(arch, taps, channels):
    """Official b0: layer1..5 = blocks[0:2], [2:4], [4:6], [6:12], [12:16] (b1: [0:3], [3:6], [6:9],
    [9:12], [12:23]); features = layer1, 2, 3 and 5 outputs; layer0 = conv_stem + BN, no activation."""
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=0)
    backbone = frskd.EfficientNetTaps(model)
    assert backbone.taps == taps and backbone.channels == channels
    backbone.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        bn = model.bn1
        h = F.batch_norm(model.conv_stem(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0,
                         bn.eps)
        expected = []
        for index, block in enumerate(b for stage in model.blocks for b in stage):
            h = block(h)
            if index in taps:
                expected.append(h)
        for a, b in zip(backbone(x), expected):
            assert torch.equal(a, b)


def test_output_shapes_at_odd_input_sizes_and_stack_widths():
    net = tiny_net(num_classes=7, width=24)
    assert len(net.bifpn) == 3 and len(net.self_teacher) == 2  # classifier 3 BiFPN layers, self-teacher 2
    assert net.self_teacher[-1].down_nodes is None and net.self_teacher[0].down_nodes is not None
    for height, width in ((37, 53), (65, 65), (31, 96)):
        features, logits, refined, self_teacher_logits = net(torch.randn(2, 3, height, width))
        assert logits.shape == self_teacher_logits.shape == (2, 7, height, width)
        assert len(features) == len(refined) == 6
        assert all(f.shape[1] == 24 for f in features + refined)  # equal width, factor 1
        assert [f.shape for f in features] == [r.shape for r in refined]
    baseline = tiny_net(baseline=True)
    assert baseline.self_teacher is None and baseline(torch.randn(2, 3, 33, 33))[3] is None


def test_segmentation_recipe_is_the_official_one_and_flags_do_not_mix():
    args = frskd.parse_args(["--task", "segmentation", "--data", "x"])
    assert (args.arch, args.init, args.bifpn_channels, args.bifpn_layers, args.repeat) == \
        ("tf_efficientnet_b0", "tf_efficientnet_b0.aa_in1k", 64, 3, 2)
    assert (args.epochs, args.warmup_epochs, args.milestones, args.lr, args.momentum, args.wd, args.wd_scope) == \
        (60, 40, [40], 0.01, 0.9, 5e-4, "all")
    assert (args.batch_size, args.accum_steps, args.clip_value, args.crop_size, args.num_classes) == \
        (32, 2, 2.0, 512, 21)
    assert (args.alpha, args.beta, args.temperature, args.mean) == (1.0, 50.0, 1.0, frskd.IMAGENET_MEAN)
    args = frskd.parse_args(["--task", "segmentation", "--data", "x", "--arch", "tf_efficientnet_b1"])
    assert args.bifpn_channels == 88 and args.init == "tf_efficientnet_b1.aa_in1k"
    assert frskd.parse_args(["--data", "x"]).temperature == 4.0  # classification defaults untouched
    with pytest.raises(SystemExit):
        frskd.parse_args(["--task", "segmentation", "--data", "x", "--mixup", "0.2"])
    with pytest.raises(SystemExit):
        frskd.parse_args(["--data", "x", "--accum-steps", "2"])


# ----------------------------------------------------------------------------------------------
# Losses, schedule, metric against hand-computed values
# ----------------------------------------------------------------------------------------------
def test_pixel_kd_hand_computed():
    logits = torch.tensor([[[[0.0, 1.0]], [[0.0, -1.0]]]])  # [1, 2, 1, 2]: two pixels, two classes
    teacher = torch.tensor([[[[math.log(3.0), 0.0]], [[0.0, 0.0]]]])
    for temperature in (1.0, 2.0):
        total = 0.0
        for pixel in range(2):
            c = [logits[0, k, 0, pixel].item() / temperature for k in range(2)]
            t = [teacher[0, k, 0, pixel].item() / temperature for k in range(2)]
            q = [math.exp(v) / sum(math.exp(u) for u in c) for v in c]
            p = [math.exp(v) / sum(math.exp(u) for u in t) for v in t]
            total += sum(p[k] * math.log(p[k] / q[k]) for k in range(2))
        expected = total * temperature ** 2 / (1 * 1 * 2)  # sum, x T^2, / (B H W)
        assert frskd.pixel_kd_loss(logits, teacher, temperature).item() == pytest.approx(expected, rel=1e-6)


def test_seg_loss_terms_hand_computed():
    masks = torch.tensor([[[0, IGNORE_INDEX]]])  # the ignored pixel counts in KD, not in CE
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 5.0]]]])
    teacher = torch.tensor([[[[0.0, 0.0]], [[1.0, 0.0]]]])
    f = [torch.zeros(1, 2, 1, 2), torch.ones(1, 2, 1, 1)]
    f[0][0, :, 0, 0] = 1.0  # attention map [1, 0]
    t = [torch.full((1, 2, 1, 2), 2.0), torch.ones(1, 2, 1, 1)]  # [1/sqrt2, 1/sqrt2]; second level equal
    total, (ce_c, ce_t, kd, feat) = frskd.frskd_seg_loss(logits, teacher, f, t, masks, 0.5, 10.0, 1.0)
    assert ce_c.item() == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-6)
    assert ce_t.item() == pytest.approx(math.log(1 + math.e), rel=1e-6)
    expected_feature = ((1 - 1 / math.sqrt(2)) ** 2 + (1 / math.sqrt(2)) ** 2) / 2  # mean over 2 positions
    assert feat.item() == pytest.approx(expected_feature, rel=1e-6)
    assert total.item() == pytest.approx(ce_c.item() + ce_t.item() + 0.5 * kd.item() + 10.0 * expected_feature,
                                         rel=1e-6)


def test_distillation_ramp_boundaries():
    def official(epoch, warmup=40, epochs=60):  # sigmoid_rampup(epoch + 1 - warmup, epochs - warmup)
        if epoch < warmup:
            return 0.0
        current = float(np.clip(epoch + 1 - warmup, 0.0, epochs - warmup))
        return float(np.exp(-5.0 * (1.0 - current / (epochs - warmup)) ** 2))
    assert frskd.distillation_ramp(0, 40, 60) == frskd.distillation_ramp(39, 40, 60) == 0.0
    assert frskd.distillation_ramp(40, 40, 60) == pytest.approx(math.exp(-5 * 0.95 ** 2))
    assert frskd.distillation_ramp(59, 40, 60) == 1.0
    for epoch in range(60):
        assert frskd.distillation_ramp(epoch, 40, 60) == pytest.approx(official(epoch), abs=1e-12)
    assert frskd.distillation_ramp(0, 0, 1) == 1.0


def test_miou_on_hand_made_confusion_matrix():
    target = torch.tensor([[0, 0, 1, IGNORE_INDEX], [1, 1, 2, IGNORE_INDEX]])
    prediction = torch.tensor([[0, 1, 1, 3], [1, 0, 3, 0]])
    matrix = confusion_matrix(prediction, target, num_classes=4)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    for t, p in ((0, 0), (0, 1), (1, 1), (1, 1), (1, 0), (2, 3)):  # the six labelled pixels
        expected[t, p] += 1
    assert torch.equal(matrix, expected)
    # IoU: class 0: 1 / (2 + 2 - 1); class 1: 2 / (3 + 3 - 2); class 2: 0 / 1; class 3: 0 / 1
    iou = iou_per_class(matrix)
    assert iou.tolist() == pytest.approx([1 / 3, 2 / 4, 0.0, 0.0])
    assert mean_iou(matrix) == pytest.approx((1 / 3 + 1 / 2) / 4)
    # a class absent from truth and prediction has no IoU and is left out of the mean (nanmean)
    matrix5 = confusion_matrix(prediction, target, num_classes=5)
    assert math.isnan(iou_per_class(matrix5)[4]) and mean_iou(matrix5) == pytest.approx(mean_iou(matrix))


# ----------------------------------------------------------------------------------------------
# Gradient isolation
# ----------------------------------------------------------------------------------------------
def test_distillation_terms_give_no_gradient_to_the_self_teacher():
    net = tiny_net(num_classes=4)
    features, logits, refined, self_teacher_logits = net(torch.randn(2, 3, 64, 64))
    masks = torch.randint(0, 4, (2, 64, 64))
    _, (ce_c, ce_t, kd, feat) = frskd.frskd_seg_loss(logits, self_teacher_logits, features, refined, masks,
                                                     1.0, 50.0, 1.0)
    teacher_params = list(net.self_teacher.parameters()) + list(net.self_teacher_head.parameters())
    classifier_params = [net.backbone.conv_stem.weight, net.bifpn[0].up_nodes[0][0].weight]
    for term in (kd, feat):
        grads = torch.autograd.grad(term, teacher_params + classifier_params, retain_graph=True,
                                    allow_unused=True)
        assert all(g is None or g.abs().max() == 0 for g in grads[:len(teacher_params)])
        assert all(g is not None and g.abs().max() > 0 for g in grads[len(teacher_params):])
    # the self-teacher's own CE trains it and, through its input, the classifier's BiFPN and backbone
    grads = torch.autograd.grad(ce_t, [net.self_teacher_head[0].weight] + classifier_params, allow_unused=True)
    assert all(g is not None and g.abs().max() > 0 for g in grads)


# ----------------------------------------------------------------------------------------------
# Data: readers, one-sentence errors, paired transforms, demo masks
# ----------------------------------------------------------------------------------------------
def _write_pair(image_path, mask_path, mask, image_size=None):
    os.makedirs(os.path.dirname(image_path), exist_ok=True)
    os.makedirs(os.path.dirname(mask_path), exist_ok=True)
    h, w = mask.shape
    image = Image.fromarray((np.stack([mask] * 3, -1) * 20).astype(np.uint8))
    image.resize(image_size or (w, h)).save(image_path)
    Image.fromarray(mask.astype(np.uint8)).save(mask_path)


def test_voc_layout_splits(tmp_path):
    mask = np.zeros((6, 8), np.uint8)
    for year, ids in (("VOC2007", {"trainval": ["000001", "000002"], "test": ["000003"]}),
                      ("VOC2012", {"trainval": ["2012_000001"]})):
        root = tmp_path / year
        os.makedirs(root / "ImageSets" / "Segmentation")
        for split, names in ids.items():
            (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
            for name in names:
                _write_pair(str(root / "JPEGImages" / f"{name}.jpg"),
                            str(root / "SegmentationClass" / f"{name}.png"), mask)
    train, val, layout = find_pairs(str(tmp_path))
    assert layout == "VOCdevkit"
    assert [os.path.basename(i) for i, _ in train] == ["000001.jpg", "000002.jpg", "2012_000001.jpg"]
    assert [os.path.basename(m) for _, m in val] == ["000003.png"]
    os.remove(tmp_path / "VOC2007" / "ImageSets" / "Segmentation" / "test.txt")
    with pytest.raises(DataError, match="VOC2007 test"):
        find_pairs(str(tmp_path))


@pytest.mark.parametrize("problem, needle", [("out_of_range", "holds class id 7"), ("no_mask", "has no mask"),
                                             ("size", "must have its image's size"), ("rgb", "single-channel")])
def test_bad_masks_stop_with_one_sentence_naming_the_file(tmp_path, problem, needle):
    mask = np.zeros((8, 8), np.uint8)
    mask[2:4, 2:4] = IGNORE_INDEX  # 255 is allowed
    for split in ("train", "val"):
        _write_pair(str(tmp_path / split / "images" / "a.png"), str(tmp_path / split / "masks" / "a.png"), mask)
    bad_image, bad_mask = tmp_path / "train" / "images" / "b.jpg", tmp_path / "train" / "masks" / "b.png"
    _write_pair(str(bad_image), str(bad_mask), mask)
    if problem == "out_of_range":
        bad = mask.copy()
        bad[0, 0] = 7
        Image.fromarray(bad).save(bad_mask)
    elif problem == "no_mask":
        os.remove(bad_mask)
    elif problem == "size":
        Image.new("RGB", (9, 8)).save(bad_image)
    else:
        Image.new("RGB", (8, 8)).save(bad_mask)
    with pytest.raises(DataError) as error:
        train, val, _ = find_pairs(str(tmp_path))
        check_pairs(train + val, num_classes=5)
    message = str(error.value)
    assert needle in message and "\n" not in message
    assert os.path.basename(str(bad_mask if problem != "no_mask" else bad_image)) in message


def test_paired_transforms_keep_image_and_mask_aligned():
    import random
    mask = np.kron(np.arange(12, dtype=np.uint8).reshape(3, 4) % 5, np.ones((10, 10), np.uint8))  # 30 x 40 blocks
    image = Image.fromarray(np.stack([mask * 40] * 3, -1))
    transform = RandomScaleCropFlip(base=32, crop=48)
    for seed in range(20):
        random.seed(seed)
        out_image, out_mask = transform(image, Image.fromarray(mask))
        assert out_image.size == out_mask.size == (48, 48)
        got_image, got_mask = np.asarray(out_image)[..., 0].astype(int), np.asarray(out_mask).astype(int)
        padded = (got_image == 0) & (got_mask == 0)
        interior = np.abs(got_image - got_mask * 40) < 4  # away from bilinear block edges and blur
        assert (interior | padded).mean() > 0.6  # the image still shows the mask's blocks in place
    val_image, val_mask = ResizePair(16)(image, Image.fromarray(mask))
    assert val_image.size == val_mask.size == (16, 16) and set(np.unique(val_mask)) <= set(range(5))


def _official_train_pair(image, mask, base, crop):
    """The official training transforms, rebuilt from their description: flip (random() < 0.5);
    short side = randint(base / 2, 2 base), long side scaled (int), image bilinear / mask nearest;
    pad right/bottom to crop with 0 (image and mask); crop at randint offsets; blur (random() < 0.5,
    radius random())."""
    import random
    from PIL import ImageFilter, ImageOps
    if random.random() < 0.5:
        image, mask = image.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
    short = random.randint(int(base * 0.5), int(base * 2.0))
    w, h = image.size
    ow, oh = (short, int(1.0 * h * short / w)) if h > w else (int(1.0 * w * short / h), short)
    image, mask = image.resize((ow, oh), Image.BILINEAR), mask.resize((ow, oh), Image.NEAREST)
    if short < crop:
        border = (0, 0, crop - ow if ow < crop else 0, crop - oh if oh < crop else 0)
        image, mask = ImageOps.expand(image, border=border, fill=0), ImageOps.expand(mask, border=border, fill=0)
    w, h = image.size
    x1, y1 = random.randint(0, w - crop), random.randint(0, h - crop)
    image, mask = image.crop((x1, y1, x1 + crop, y1 + crop)), mask.crop((x1, y1, x1 + crop, y1 + crop))
    if random.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(radius=random.random()))
    return image, mask


def test_train_transform_matches_official_draw_for_draw():
    import random
    image, mask = demo.render_scene(np.random.default_rng(3), size=48)
    image, mask = image.resize((60, 44)), mask.resize((60, 44), Image.NEAREST)  # not square
    for seed in range(30):
        random.seed(seed)
        ours = RandomScaleCropFlip(base=40, crop=40)(image, mask)
        random.seed(seed)
        reference = _official_train_pair(image, mask, base=40, crop=40)
        for a, b in zip(ours, reference):
            assert np.array_equal(np.asarray(a), np.asarray(b))


def test_demo_scenes_have_pixel_masks(tmp_path):
    image, mask = demo.render_scene(np.random.default_rng(0), size=48)
    values = np.unique(np.asarray(mask))
    assert image.size == mask.size == (48, 48) and values[0] == 0 and values.max() <= len(demo.CLASSES)
    assert len(demo.SEG_CLASSES) == 11 and demo.SEG_CLASSES[0] == "background"
    dataset = SegmentationSet([(str(tmp_path / "i.png"), str(tmp_path / "m.png"))], ResizePair(32))
    image.save(tmp_path / "i.png")
    mask.save(tmp_path / "m.png")
    x, y = dataset[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32) and y.dtype == torch.int64 and y.shape == (32, 32)


# ----------------------------------------------------------------------------------------------
# End to end: CLI, resume, torchrun (gloo)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_seg_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        os.makedirs(root / split / "images")
        os.makedirs(root / split / "masks")
        for i in range(count):
            image, mask = demo.render_scene(rng, size=40)
            image.save(root / split / "images" / f"s{i}.jpg")
            mask.save(root / split / "masks" / f"s{i}.png")
    return str(root)


TINY = ["--arch", "test_efficientnet", "--init", "none", "--num-classes", "11", "--crop-size", "32",
        "--batch-size", "8", "--accum-steps", "2", "--epochs", "2", "--warmup-epochs", "1", "--milestones", "1",
        "--bifpn-channels", "16", "--workers", "0", "--device", "cpu"]


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_cli_end_to_end_and_resume(tiny_seg_data, tmp_path, capsys):
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    frskd.main(["--task", "segmentation", "--data", tiny_seg_data, "--out", full] + TINY)
    summary = [line for line in capsys.readouterr().out.splitlines() if "FRSKD segmentation summary" in line]
    assert len(summary) == 1 and "frskd classifier mIoU" in summary[0] and "self-teacher" in summary[0]
    records = _metrics(full)
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[0]["alpha"] == records[0]["beta"] == 0.0 and records[1]["beta"] == 50.0  # ramp reaches 1
    assert 0.0 <= records[1]["val_miou"] <= 100.0 and "val_self_teacher_miou" in records[1]
    best_epoch = max(records, key=lambda r: (r["val_miou"], r["epoch"]))["epoch"]  # ties: the later
    assert torch.load(os.path.join(full, "best.pth"), weights_only=True)["epoch"] == best_epoch  # by mIoU
    frskd.main(["--task", "segmentation", "--data", tiny_seg_data, "--out", split, "--stop-epoch", "1"] + TINY)
    frskd.main(["--task", "segmentation", "--data", tiny_seg_data, "--out", split, "--resume", "auto"] + TINY)
    resumed = _metrics(split)
    assert [r["epoch"] for r in resumed] == [1, 2]
    for key in ("train_loss", "train_kd", "val_miou", "val_self_teacher_miou"):  # resume replays the same run
        assert resumed[1][key] == pytest.approx(records[1][key], rel=1e-5, abs=1e-6)


def test_torchrun_two_processes(tiny_seg_data, tmp_path):
    result = run_script(torchrun(2) + SEG + ["--data", tiny_seg_data, "--out", str(tmp_path / "ddp")] + TINY)
    assert "FRSKD segmentation summary" in result.stdout
    assert [r["epoch"] for r in _metrics(str(tmp_path / "ddp"))] == [1, 2]


def test_cli_bad_mask_is_one_sentence(tiny_seg_data, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(tiny_seg_data, data)
    Image.new("L", (40, 40), 42).save(data / "val" / "masks" / "s1.png")
    with pytest.raises(SystemExit) as error:
        frskd.main(["--task", "segmentation", "--data", str(data), "--out", str(tmp_path / "o")] + TINY)
    message = str(error.value)
    assert "s1.png holds class id 42" in message and "\n" not in message


def test_demo_trains_frskd_then_the_baseline(tmp_path, monkeypatch, capsys):
    """`--task segmentation --data demo` on a tiny scene set: both runs, one summary, best by mIoU."""
    monkeypatch.setenv("KD_DEMO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "SEG_TRAIN_IMAGES", 8)
    monkeypatch.setattr(demo, "SEG_VAL_IMAGES", 2)
    out = tmp_path / "out"
    frskd.main(SEG[1:] + ["--data", "demo", "--out", str(out), "--epochs", "2", "--warmup-epochs", "1",
                          "--milestones", "1", "--crop-size", "32", "--workers", "0", "--device", "cpu"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "FRSKD segmentation summary" in line]
    assert len(lines) == 1 and "frskd classifier mIoU" in lines[0] and "baseline classifier mIoU" in lines[0]
    summary = json.load(open(out / "summary.json"))
    assert set(summary) == {"frskd", "baseline"} and "best_miou" in summary["frskd"]
    assert "val_self_teacher_miou" in summary["frskd"]["final"]
    assert "val_self_teacher_miou" not in summary["baseline"]["final"]
    baseline = _metrics(str(out / "baseline"))
    assert [r["epoch"] for r in baseline] == [1, 2] and baseline[1]["alpha"] == baseline[1]["beta"] == 0.0
