"""MEAL V2: the pieces (Eq. 1, 3-5), the official update rebuilt independently, the Fast MEAL V2
label route, the CE control, and the CLI end to end."""
import argparse
import copy
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import meal_v2
from common import ckpt
from common.dist import Context
from common.crops import replay_crops
from common.data import image_folder, load_rgb
from common.labels import (LabelStore, StoreError, StoredCrops, crop_schedule, decode, encode, label_identity,
                           teacher_identity)
from common.models import ModelError, ensemble_probs, load_teachers, teacher_logits
from conftest import TINY_CFG, make_teacher, run_script, torchrun

TINY = ["--arch", "test_efficientnet", "--input-size", "32", "--batch-size", "8", "--epochs", "2",
        "--lr-drop-epoch", "1", "--workers", "0", "--crop-pct", "1.0", "--lr", "0.05"]

TINY_RANDOM = TINY + ["--init", "none"]  # random student init: no download


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def two_teachers(tmp_path_factory):
    """Two teachers of different architectures, resolutions and normalizations."""
    folder = tmp_path_factory.mktemp("meal_teachers")
    other_cfg = dict(TINY_CFG, input_size=40, interpolation="bicubic", mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    return [make_teacher(folder / "a.pth", "test_resnet", seed=1),
            make_teacher(folder / "b.pth", "test_efficientnet", seed=2, cfg=other_cfg)]


@pytest.fixture(scope="module")
def init_file(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("meal_init") / "init.pth", "test_efficientnet", seed=5)


def teacher_flags(specs):
    return [flag for spec in specs for flag in ("--teacher", spec)]


# ---------------------------------------------------------------------------------------------
# Eq. 1, 3, 4-5: teachers, loss, discriminator
# ---------------------------------------------------------------------------------------------
def test_ensemble_is_mean_of_per_teacher_softmax():
    z1, z2 = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, math.log(4.0)]])
    p1 = [math.e ** 2 / (math.e ** 2 + 2), 1 / (math.e ** 2 + 2), 1 / (math.e ** 2 + 2)]
    p2 = [1 / 6, 1 / 6, 4 / 6]
    expected = torch.tensor([[(a + b) / 2 for a, b in zip(p1, p2)]])
    torch.testing.assert_close(ensemble_probs([z1, z2]), expected)  # Eq. 1


def test_each_teacher_gets_its_own_view_and_normalization(two_teachers):
    teachers = load_teachers(two_teachers, 3, torch.device("cpu"))
    sizes = [ex["data_config"]["input_size"] for _, ex in teachers]
    assert sizes == [32, 40]
    seen = []
    hooks = [t.register_forward_pre_hook(lambda m, inp: seen.append(inp[0])) for t, _ in teachers]
    views = [torch.full((2, 3, s, s), 255, dtype=torch.uint8) for s in sizes]
    teacher_logits(teachers, views)
    for h in hooks:
        h.remove()
    assert [tuple(x.shape[-2:]) for x in seen] == [(32, 32), (40, 40)]
    # white pixels normalized with each teacher's own mean/std
    assert seen[0][0, 0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, rel=1e-5)
    assert seen[1][0, 0, 0, 0].item() == pytest.approx((1 - 0.5) / 0.25, rel=1e-5)


def test_soft_cross_entropy_eq3():
    logits, targets = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.2, 0.5, 0.3]])
    log_p = F.log_softmax(logits, 1)[0]
    expected = -sum(t * lp for t, lp in zip(targets[0].tolist(), log_p.tolist()))
    assert meal_v2.soft_cross_entropy(logits, targets).item() == pytest.approx(expected, rel=1e-6)


class OfficialHead(nn.Module):
    """The official discriminator as described: 1x1 convs C -> C/8 -> C/64 -> 2 on x[:, :, None, None],
    ReLU after each of the three, flattened."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(c, c // 8, 1), nn.Conv2d(c // 8, c // 64, 1), \
            nn.Conv2d(c // 64, 2, 1)

    def forward(self, x):
        x = F.relu(self.conv1(x[:, :, None, None]))
        return F.relu(self.conv3(F.relu(self.conv2(x)))).flatten(1)


def load_official_head(ours):
    """The official head holding our discriminator's weights (Linear [out, in] -> conv [out, in, 1, 1])."""
    official = OfficialHead(1000)
    linears = [layer for layer in ours.layers if isinstance(layer, nn.Linear)]
    with torch.no_grad():
        for conv, linear in zip((official.conv1, official.conv2, official.conv3), linears):
            conv.weight.copy_(linear.weight[:, :, None, None])
            conv.bias.copy_(linear.bias)
    return official


def test_discriminator_is_the_official_head():
    torch.manual_seed(0)
    ours = meal_v2.Discriminator(1000)
    widths = [layer.out_features for layer in ours.layers if isinstance(layer, nn.Linear)]
    assert widths == [125, 15, 2]
    assert [type(layer) for layer in ours.layers][1::2] == [nn.ReLU] * 3  # a ReLU after every layer
    x = torch.randn(6, 1000) * 3
    torch.testing.assert_close(ours(x), load_official_head(ours)(x))
    with torch.no_grad():
        ours.layers[-2].bias.fill_(-100.0)
    assert (ours(x) == 0).all()  # the last ReLU floors both outputs at 0 (probability 0.5)
    small = meal_v2.Discriminator(10)  # the demo's 10 classes: widths stay >= 32 and 15
    assert [layer.out_features for layer in small.layers if isinstance(layer, nn.Linear)] == [32, 15, 2]


def test_discriminator_loss_official_targets():
    class Fixed(nn.Module):  # D(x) = x: the two "outputs" are the inputs
        def forward(self, x):
            return x

    student = torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    teacher = torch.tensor([[0.0, 3.0], [1.0, 1.0]])
    log_sig = lambda x: math.log(1 / (1 + math.exp(-x)))  # noqa: E731
    log_not = lambda x: math.log(1 - 1 / (1 + math.exp(-x)))  # noqa: E731
    terms = [log_sig(2.0), log_not(-1.0), log_sig(0.5), log_not(0.0),  # student rows: [1, 0]
             log_not(0.0), log_sig(3.0), log_not(1.0), log_sig(1.0)]  # teacher rows: [0, 1]
    expected = -sum(terms) / len(terms)  # Eq. 4, mean over rows and both outputs
    assert meal_v2.discriminator_loss(Fixed(), student, teacher).item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# The update: official cooperative rule rebuilt independently; the GAN option; fp16 skip
# ---------------------------------------------------------------------------------------------
def step_args(**overrides):
    values = dict(no_disc=False, no_teachers=False, seed=0, wd=0.0, lr=0.01, d_lr=None, momentum=0.9, amp=False,
                  amp_dtype="float16")
    return argparse.Namespace(**{**values, **overrides})


def batches(steps=2, batch=4, features=16, classes=1000, teachers=2):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(batch, features, generator=g),
             [torch.randn(batch, classes, generator=g) * 2 for _ in range(teachers)]) for _ in range(steps)]


def test_cooperative_step_matches_the_official_update():
    """Official train.py, rebuilt from its description: one SGD (momentum 0.9, wd 0) over
    [student params, {discriminator params, lr: d_lr}] whose every group's lr is then set to the
    schedule's 0.01 (so d_lr is overwritten); loss = KL loss (soft CE, batch mean) + BCE-with-logits
    of the head on cat(student logits, mean teacher logits) against [1, 0] / [0, 1] rows; backward;
    step. After two steps (momentum included) student and discriminator weights are equal."""
    torch.manual_seed(0)
    student = nn.Linear(16, 1000)
    model, disc, optimizer, scaler = meal_v2.build_training(copy.deepcopy(student), 1000, step_args(), Context())
    assert len(optimizer.param_groups) == 3 and optimizer.param_groups[-1]["lr"] == 0.01  # D: the student's lr
    official_student, official_disc = copy.deepcopy(model), load_official_head(disc)
    official_opt = torch.optim.SGD([{"params": official_student.parameters()},
                                    {"params": official_disc.parameters(), "lr": 1e-4}], lr=0, momentum=0.9,
                                   weight_decay=0)
    for group in official_opt.param_groups:  # _set_learning_rate(optimizer, regime lr) each epoch
        group["lr"] = 0.01
    for x, teacher_out in batches():
        soft = torch.stack([F.softmax(t, 1) for t in teacher_out], 2).mean(2)
        soft_no_softmax = torch.stack(teacher_out, 2).mean(2)
        meal_v2.meal_step(model, disc, optimizer, scaler, x, ensemble_probs(teacher_out),
                          torch.stack(teacher_out).mean(0))
        out = official_student(x)
        kl = -torch.bmm(soft.unsqueeze(1), F.log_softmax(out, 1).unsqueeze(2)).mean()
        pair = torch.cat([out, soft_no_softmax])
        target = torch.tensor([[1.0, 0.0]] * len(x) + [[0.0, 1.0]] * len(x))
        loss = kl + nn.BCEWithLogitsLoss()(official_disc(pair), target)
        loss.backward()
        official_opt.step()
        official_opt.zero_grad()
    for a, b in zip(model.parameters(), official_student.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for a, b in zip(disc.parameters(), official_disc.parameters()):
        torch.testing.assert_close(a, b.reshape(a.shape), atol=1e-6, rtol=1e-5)
    moved = [(a - b).abs().max().item() for a, b in zip(disc.parameters(), meal_v2.Discriminator(1000).parameters())]
    assert max(moved) > 0  # the discriminator was updated


def test_gan_rule_discriminator_on_detached_inputs_student_looks_real():
    torch.manual_seed(0)
    model, disc, optimizer, scaler = meal_v2.build_training(nn.Linear(16, 1000), 1000, step_args(momentum=0.0),
                                                            Context())
    before_s, before_d = copy.deepcopy(model), copy.deepcopy(disc)
    (x, teacher_out), = batches(steps=1)
    targets, teacher_side = ensemble_probs(teacher_out), torch.stack(teacher_out).mean(0)
    meal_v2.meal_step(model, disc, optimizer, scaler, x, targets, teacher_side, rule="gan")
    # expected: D descends Eq. 4 on the student's detached logits; the student descends
    # L_CE + BCE(D(student), [0, 1]) through a frozen D
    logits = before_s(x)
    d_loss = meal_v2.discriminator_loss(before_d, logits.detach(), teacher_side)
    d_grads = torch.autograd.grad(d_loss, list(before_d.parameters()))
    outputs = before_d(logits)
    look_real = F.binary_cross_entropy_with_logits(outputs, torch.tensor([[0.0, 1.0]]).expand_as(outputs))
    s_grads = torch.autograd.grad(meal_v2.soft_cross_entropy(logits, targets) + look_real, list(before_s.parameters()))
    for p, p0, g in zip(disc.parameters(), before_d.parameters(), d_grads):
        torch.testing.assert_close(p, p0 - 0.01 * g, atol=1e-7, rtol=1e-5)
    for p, p0, g in zip(model.parameters(), before_s.parameters(), s_grads):
        torch.testing.assert_close(p, p0 - 0.01 * g, atol=1e-7, rtol=1e-5)


def test_discriminator_loss_weighted_over_mixed_sources():
    """Cutmix with --labels (official FKD_train.py): lam x L_D(student, p_e) + (1 - lam) x L_D(student, p_e[perm])."""
    torch.manual_seed(0)
    model, disc, optimizer, scaler = meal_v2.build_training(nn.Linear(16, 1000), 1000, step_args(), Context())
    (x, teacher_out), = batches(steps=1)
    a, b = F.softmax(teacher_out[0], 1), F.softmax(teacher_out[1], 1)
    side = lambda z: F.softmax(z, 1)  # noqa: E731
    with torch.no_grad():
        probs = side(model(x))
        expected = 0.3 * meal_v2.discriminator_loss(disc, probs, a) + 0.7 * meal_v2.discriminator_loss(disc, probs, b)
    _, _, d_loss, _ = meal_v2.meal_step(model, disc, optimizer, scaler, x, 0.3 * a + 0.7 * b, [(0.3, a), (0.7, b)],
                                        side)
    assert d_loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_non_finite_batch_is_skipped_for_student_and_discriminator():
    """Under fp16 the GradScaler skips a step whose gradients are inf/nan: with one optimizer the
    discriminator is skipped too, so one bad batch cannot poison its weights (CPU scaler here)."""
    torch.manual_seed(0)
    model, disc, optimizer, _ = meal_v2.build_training(nn.Linear(16, 1000), 1000, step_args(), Context())
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    (x, teacher_out), = batches(steps=1)
    before = [p.detach().clone() for p in list(model.parameters()) + list(disc.parameters())]
    bad = x.clone()
    bad[0, 0] = float("inf")
    scale = scaler.get_scale()
    meal_v2.meal_step(model, disc, optimizer, scaler, bad, ensemble_probs(teacher_out),
                      torch.stack(teacher_out).mean(0))
    after = list(model.parameters()) + list(disc.parameters())
    assert all(torch.equal(a, b) for a, b in zip(after, before)) and scaler.get_scale() < scale
    meal_v2.meal_step(model, disc, optimizer, scaler, x, ensemble_probs(teacher_out), torch.stack(teacher_out).mean(0))
    assert all(torch.isfinite(p).all() for p in after)
    assert not torch.equal(next(disc.parameters()), before[len(list(model.parameters()))])


def test_student_side_goes_through_the_store_codec():
    logits = torch.randn(3, 6, requires_grad=True)
    probs = F.softmax(logits, 1)
    assert meal_v2.compress_like_store(probs, "full", 1) is probs
    ms = meal_v2.compress_like_store(probs, "ms", 2)
    teacher_row = decode(*encode(F.softmax(torch.randn(3, 6), 1), "ms", 2), "ms", 6)
    for rows in (ms, teacher_row):  # same shape of vector on both sides: 2 kept values, a flat tail
        assert all(len(set(np.round(r.tolist(), 6))) <= 3 for r in rows)
        torch.testing.assert_close(rows.sum(1), torch.ones(3), atol=2e-3, rtol=0)
    top = probs.topk(2, 1)
    torch.testing.assert_close(ms.gather(1, top.indices), top.values.half().float())
    (ms * torch.arange(6.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0  # the student still gets gradients
    hard = meal_v2.compress_like_store(probs, "hard", 1)
    assert torch.equal(hard, F.one_hot(probs.argmax(1), 6).float())


def test_pass_plan_keeps_drop_and_end_on_logged_epochs():
    assert list(meal_v2.pass_plan(180, 4, 100)) == [(e, 4) for e in range(0, 180, 4)]  # the paper's: whole passes
    assert list(meal_v2.pass_plan(10, 4, 6)) == [(0, 4), (4, 1), (5, 1), (6, 4)]  # single-crop passes before the drop
    assert list(meal_v2.pass_plan(7, 4, 100)) == [(0, 4), (4, 1), (5, 1), (6, 1)]  # and before the end
    assert list(meal_v2.pass_plan(3, 1, 101)) == [(0, 1), (1, 1), (2, 1)]  # online: one epoch per pass
    assert next(meal_v2.pass_plan(10**9, 4, 101)) == (0, 4)  # --epochs 1e9: a generator, no plan in memory


def test_cutmix_pastes_the_same_relative_box_into_every_view():
    crops = torch.arange(4 * 3 * 8 * 8).reshape(4, 3, 8, 8).to(torch.uint8)  # no two rows alike
    crops = crops + torch.arange(4).view(4, 1, 1, 1) * 7
    views = [F.interpolate(crops.float(), size=16, mode="nearest").to(torch.uint8)]
    mixed, (mixed_view,), perm, lam = meal_v2.cutmix(crops, views, 1.0, np.random.default_rng(1))
    moved = [i for i in range(4) if perm[i] != i]
    assert moved and 0 < lam < 1
    for images, source, out, side in ((crops, crops, mixed, 8), (views[0], views[0], mixed_view, 16)):
        for i in moved:
            box = (out[i] != images[i]).any(0)
            rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
            assert box.sum() == len(rows) * len(cols)  # one rectangle ...
            assert torch.equal(out[i][:, box], source[perm[i]][:, box])  # ... cut from the paired crop
            if side == 8:
                assert lam == pytest.approx(1 - box.float().mean().item())  # lambda = 1 - pasted share
                relative = torch.tensor([rows[0], rows[-1] + 1, cols[0], cols[-1] + 1]) / 8
            else:  # the teacher's view: the same box in relative coordinates (within a pixel)
                view_box = torch.tensor([rows[0], rows[-1] + 1, cols[0], cols[-1] + 1]) / 16
                assert (view_box - relative).abs().max() <= 1 / 8


# ---------------------------------------------------------------------------------------------
# CLI: student init, flags, store checks
# ---------------------------------------------------------------------------------------------
def test_student_init_follows_the_paper_or_says_what_it_uses(capsys):
    ctx = Context()
    assert meal_v2.student_spec(meal_v2.parse_args(["--data", "x"]), ctx) == "resnet50.ram_in1k"
    assert meal_v2.student_spec(meal_v2.parse_args(["--data", "x", "--arch", "resnet50"]), ctx) == "resnet50.ram_in1k"
    assert meal_v2.student_spec(meal_v2.parse_args(["--data", "x", "--arch", "resnet18"]), ctx) == "resnet18"
    assert "resnet18.a1_in1k" in capsys.readouterr().out  # timm's default tag is named
    args = meal_v2.parse_args(["--data", "x", "--init", "resnet18.tv_in1k"])
    assert meal_v2.student_spec(args, ctx) == "resnet18.tv_in1k" and args.arch == "resnet18"
    with pytest.raises(ModelError, match="--arch"):
        meal_v2.student_spec(meal_v2.parse_args(["--data", "x", "--arch", "resnet50", "--init", "resnet18.tv_in1k"]),
                             ctx)


@pytest.mark.parametrize("flag,value", [
    ("--num-crops", "0"), ("--d-lr", "nan"), ("--d-lr", "0"), ("--cutmix", "-1"), ("--epochs", "0"),
    ("--lr-drop-epoch", "-1"), ("--batch-size", "-8"), ("--lr", "inf"), ("--wd", "-0.1"), ("--momentum", "1"),
    ("--input-size", "0"), ("--crop-pct", "1.5"), ("--workers", "-1"), ("--seed", "-1"), ("--stop-epoch", "0"),
    ("--disc-rule", "adversarial"), ("--amp-dtype", "float8")])
def test_every_numeric_flag_is_checked_when_parsed(flag, value, capsys):
    with pytest.raises(SystemExit):
        meal_v2.parse_args(["--data", "x", flag, value])
    assert f"argument {flag}" in capsys.readouterr().err


def test_ctrl_c_exits_with_one_sentence(monkeypatch):
    def interrupted(args, ctx):
        raise KeyboardInterrupt
    monkeypatch.setattr(meal_v2, "run", interrupted)
    with pytest.raises(SystemExit) as stop:
        meal_v2.main(["--data", "x", "--device", "cpu"])
    assert str(stop.value) == ckpt.INTERRUPTED


def make_store(path, train_set, teachers, codec="full", crop_scale=(0.08, 1.0), temperature=1.0, imported=None):
    """A complete tiny store written in-process (whole-image boxes, random probabilities)."""
    meta = label_identity(train_set, teacher_identity(teachers), codec, 2, 2, crop_scale, (3 / 4, 4 / 3),
                          temperature, "probs", 0)
    if imported:
        meta.update(imported=imported, teachers=[{"name": "released", "sha256": None}], crop_scale=None,
                    crop_ratio=None, seed=None)
    store = LabelStore.create(str(path), meta)
    classes = len(train_set.classes)
    for n, (image_path, _) in enumerate(train_set.samples):
        with Image.open(image_path) as image:
            w, h = image.size
        indices, values = encode(F.softmax(torch.randn(2, classes), 1), codec, 2)
        store.write(n, slice(0, 2), np.array([[0, 0, h, w]] * 2), np.zeros(2, bool),
                    None if indices is None else indices.numpy(), None if values is None else values.numpy(), (w, h))
    store.mark_done(list(range(len(train_set))))
    store.close()
    return str(path)


@pytest.mark.parametrize("change,needle", [
    (dict(temperature=4.0), "temperature"), (dict(crop_scale=(0.08, 0.936)), "crop_scale"),
    (dict(teachers="other"), "teachers")])
def test_store_for_other_settings_is_refused_naming_the_field(change, needle, tiny_data, two_teachers, tmp_path):
    train_set = image_folder(tiny_data, "train")
    change = dict(change)
    teachers = two_teachers[:1] if change.pop("teachers", None) else two_teachers
    path = make_store(tmp_path / "store", train_set, teachers, **change)
    args = meal_v2.parse_args(["--data", tiny_data, "--labels", path, "--num-crops", "2"])
    with pytest.raises(StoreError, match=needle):
        meal_v2.open_store(args, train_set, two_teachers, Context())


def test_imported_store_is_accepted_with_a_note(tiny_data, two_teachers, tmp_path, capsys):
    train_set = image_folder(tiny_data, "train")
    path = make_store(tmp_path / "store", train_set, two_teachers, codec="ms",
                      imported={"source": "released", "label_type": "marginal_smoothing_k5"})
    args = meal_v2.parse_args(["--data", tiny_data, "--labels", path, "--num-crops", "2"])
    store = meal_v2.open_store(args, train_set, two_teachers, Context())
    out = capsys.readouterr().out
    assert store.meta["codec"] == "ms" and "imported labels" in out and "free there" in out


# ---------------------------------------------------------------------------------------------
# What the discriminator is fed, in the real training loop (in-process, one tiny epoch)
# ---------------------------------------------------------------------------------------------
def record_step_inputs(monkeypatch):
    """Record, per step, the student's logits and KD targets, the teachers' logits and the
    discriminator's input."""
    seen = {"logits": [], "targets": [], "teachers": [], "disc": []}
    original_ce, original_teachers = meal_v2.soft_cross_entropy, meal_v2.teacher_logits

    def ce(logits, targets):
        seen["logits"].append(logits.detach().clone())
        seen["targets"].append(targets.detach().clone())
        return original_ce(logits, targets)

    def teachers(*args, **kwargs):
        out = original_teachers(*args, **kwargs)
        seen["teachers"].append([t.clone() for t in out])
        return out

    def disc_forward(self, x):
        seen["disc"].append(x.detach().clone())
        return self.layers(x)

    monkeypatch.setattr(meal_v2, "soft_cross_entropy", ce)
    monkeypatch.setattr(meal_v2, "teacher_logits", teachers)
    monkeypatch.setattr(meal_v2.Discriminator, "forward", disc_forward)
    return seen


def test_online_discriminator_compares_student_logits_with_mean_teacher_logits(tiny_data, two_teachers, tmp_path,
                                                                             monkeypatch):
    seen = record_step_inputs(monkeypatch)
    meal_v2.main(["--data", tiny_data, "--out", str(tmp_path / "run"), *teacher_flags(two_teachers), *TINY_RANDOM,
                  "--epochs", "1", "--device", "cpu", "--cutmix", "1"])  # teachers label the mixed crops
    steps = len(seen["disc"])
    assert steps == len(seen["logits"]) == 2  # 18 images, batch 8
    # the teachers' last calls are the training steps (the first ones score the ensemble on val)
    for disc_in, logits, teacher_out in zip(seen["disc"], seen["logits"], seen["teachers"][-steps:]):
        b = len(logits)
        torch.testing.assert_close(disc_in[:b], logits)  # the student's logits, not probabilities
        torch.testing.assert_close(disc_in[b:], torch.stack(teacher_out).mean(0))  # the teachers' mean logits
    assert seen["disc"][0][:len(seen["logits"][0])].sum(1).sub(1).abs().max() > 0.01


# ---------------------------------------------------------------------------------------------
# End to end: online, CE control, Fast MEAL V2 (resume, refusal), torchrun
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def online_run(tiny_data, two_teachers, init_file, tmp_path_factory):
    init, out = init_file, tmp_path_factory.mktemp("meal_online") / "run"
    result = run_script([sys.executable, "meal_v2.py", "--data", tiny_data, "--out", str(out), "--init", init,
                         *teacher_flags(two_teachers), *TINY, "--lr", "1e-4"])  # small lr: weights stay near init
    return out, init, result


def test_online_end_to_end_local_init_and_one_optimizer(online_run):
    out, init, result = online_run
    records = metrics(out)
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[0]["train_disc"] > 0 and records[0]["train_kd"] > 0
    assert [r["lr"] for r in records] == pytest.approx([1e-4, 1e-5])  # drop at --lr-drop-epoch
    assert "MEAL V2 summary: online teachers" in result.stdout and "teacher ensemble" in result.stdout
    assert "teacher test_resnet: 32 px" in result.stdout  # each teacher's data config is printed
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["args"]["wd"] == 0.0  # the paper's recipe: no weight decay
    groups = state["optimizer"]["param_groups"]
    assert all(g["weight_decay"] == 0.0 for g in groups)
    assert [g["lr"] for g in groups] == pytest.approx([1e-5] * 3)  # the discriminator follows the schedule
    assert len(groups[-1]["params"]) == len(state["discriminator"])  # ONE optimizer holds the discriminator
    # the student started from the local init file: its backbone moved from there, not from a random init
    from common.models import create
    init_model, _ = create(init, 3, pretrained_head="reset")
    start = dict(init_model.state_dict())
    stem = "conv_stem.weight"
    drift = (state["model"][stem] - start[stem]).abs().max().item()
    random_model, _ = create("test_efficientnet", 3, pretrained_head="none")
    assert drift < 0.01 < (random_model.state_dict()[stem] - start[stem]).abs().max().item()


def test_no_teachers_control_is_plain_ce_from_the_same_init(tiny_data, init_file, tmp_path, monkeypatch, capsys):
    seen = record_step_inputs(monkeypatch)
    out = tmp_path / "ce"
    meal_v2.main(["--data", tiny_data, "--out", str(out), "--init", init_file, "--no-teachers", *TINY, "--epochs", "1",
                  "--device", "cpu"])
    stdout = capsys.readouterr().out
    record, = metrics(out)
    assert record["train_disc"] == 0.0 and record["train_loss"] == pytest.approx(record["train_kd"])
    assert "CE fine-tuning, no teachers" in stdout and "teacher ensemble" not in stdout
    assert not seen["teachers"] and not seen["disc"]
    for targets in seen["targets"]:  # the image labels, one-hot: plain cross-entropy
        assert torch.equal(targets.sum(1), torch.ones(len(targets))) and set(targets.unique().tolist()) == {0.0, 1.0}
    state = torch.load(out / "last.pth", weights_only=True)
    assert "discriminator" not in state and len(state["optimizer"]["param_groups"]) == 2


@pytest.fixture(scope="module")
def ensemble_store(tiny_data, two_teachers, tmp_path_factory):
    labels = tmp_path_factory.mktemp("meal_store") / "labels"
    run_script([sys.executable, "fkd.py", "--data", tiny_data, "--mode", "label", "--codec", "full",
                "--stored-crops", "4", "--label-batch", "4", "--workers", "0", "--input-size", "32",
                "--crop-scale", "0.08", "1", "--labels", str(labels), "--out", str(labels.parent / "fkd"),
                *teacher_flags(two_teachers)])
    return labels


def test_labels_route_targets_are_the_decoded_stored_ensemble(ensemble_store, tiny_data, two_teachers):
    store = LabelStore.open(str(ensemble_store))
    train = image_folder(tiny_data, "train")
    dataset = StoredCrops(train.samples, store, 2, 32, "bilinear", seed=0)
    batch = torch.utils.data.default_collate([dataset[(n, 2)] for n in (1, 10)])
    crops, views, targets, labels = meal_v2.batch_inputs(batch, store, torch.device("cpu"))
    assert crops.shape == (4, 3, 32, 32) and views == []
    assert labels.tolist() == [train.samples[1][1]] * 2 + [train.samples[10][1]] * 2
    teachers = load_teachers(two_teachers, 3, torch.device("cpu"))
    for row, n in enumerate((1, 10)):
        boxes, flips, _, values = store.read(n, crop_schedule(0, n, store.meta["num_crops"], 2, 2))
        stored = torch.from_numpy(values)
        torch.testing.assert_close(targets[2 * row:2 * row + 2], stored)
        # the stored rows are the teachers' ensemble (Eq. 1) on the same crops, each at its own size
        image = load_rgb(train.samples[n][0])
        views = [replay_crops(image, boxes, flips, ex["data_config"]["input_size"], ex["data_config"]["interpolation"])
                 for _, ex in teachers]
        with torch.no_grad():
            torch.testing.assert_close(stored, ensemble_probs(teacher_logits(teachers, views)), atol=2e-3, rtol=0)


def test_labels_route_discriminator_compares_stored_probs(ensemble_store, tiny_data, two_teachers, tmp_path,
                                                          monkeypatch):
    seen = record_step_inputs(monkeypatch)
    meal_v2.main(["--data", tiny_data, "--out", str(tmp_path / "run"), "--labels", str(ensemble_store),
                  "--num-crops", "2", *teacher_flags(two_teachers), *TINY_RANDOM, "--epochs", "2", "--device", "cpu"])
    assert not seen["teachers"] and len(seen["disc"]) == len(seen["logits"]) == 4  # 18 images, 4 per batch
    for disc_in, logits, targets in zip(seen["disc"], seen["logits"], seen["targets"]):
        b = len(logits)
        torch.testing.assert_close(disc_in[:b], F.softmax(logits, 1))  # full store: the student's softmax
        torch.testing.assert_close(disc_in[b:], targets)  # the stored p_e
    for key in seen:
        seen[key].clear()
    meal_v2.main(["--data", tiny_data, "--out", str(tmp_path / "mixed"), "--labels", str(ensemble_store),
                  "--num-crops", "2", *teacher_flags(two_teachers), *TINY_RANDOM, "--epochs", "2", "--device", "cpu",
                  "--cutmix", "1"])
    for disc_in, logits, targets in zip(seen["disc"], seen["logits"], seen["targets"]):
        b = len(logits)  # one forward: the student, the stored p_e, p_e of the pasted crops (official)
        first, second = disc_in[b:2 * b], disc_in[2 * b:]
        assert len(disc_in) == 3 * b
        lam = ((targets - second) * (first - second)).sum() / (first - second).square().sum()
        torch.testing.assert_close(targets, lam * first + (1 - lam) * second)  # the KD target: their mix


def test_labels_route_end_to_end_resume_and_mismatch(ensemble_store, tiny_data, two_teachers, init_file, tmp_path):
    common = ["--data", tiny_data, "--init", init_file, "--labels", str(ensemble_store), "--num-crops", "2",
              *teacher_flags(two_teachers), *TINY, "--epochs", "4", "--lr-drop-epoch", "2"]
    result = run_script([sys.executable, "meal_v2.py", "--out", str(tmp_path / "a"), *common])
    whole = metrics(tmp_path / "a")
    assert [r["epoch"] for r in whole] == [2, 4]  # one pass over the stream = num_crops epochs
    assert "labels (Fast MEAL V2)" in result.stdout and "on disk" in result.stdout
    run_script([sys.executable, "meal_v2.py", "--out", str(tmp_path / "b"), *common, "--stop-epoch", "2"])
    run_script([sys.executable, "meal_v2.py", "--out", str(tmp_path / "b"), *common, "--resume", "auto"])
    resumed = metrics(tmp_path / "b")
    assert [r["val_top1"] for r in resumed] == [r["val_top1"] for r in whole]
    assert resumed[-1]["train_loss"] == pytest.approx(whole[-1]["train_loss"], rel=1e-5)
    a = torch.load(tmp_path / "a" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pth", weights_only=True)
    for key in ("model", "discriminator"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    # a store made by other teachers is refused with one sentence
    bad = run_script([sys.executable, "meal_v2.py", "--out", str(tmp_path / "c"), "--data", tiny_data,
                      "--labels", str(ensemble_store), "--teacher", two_teachers[0], "--init", "none", *TINY],
                     check=False)
    assert bad.returncode != 0 and "teachers" in bad.stderr and "fkd.py --mode label" in bad.stderr
    missing = run_script([sys.executable, "meal_v2.py", "--out", str(tmp_path / "d"), "--data", tiny_data,
                          "--labels", str(tmp_path / "nowhere"), *teacher_flags(two_teachers), "--init", "none", *TINY],
                         check=False)
    assert missing.returncode != 0 and "python fkd.py" in missing.stderr and "--mode label" in missing.stderr


def test_no_disc_and_torchrun(tiny_data, two_teachers, ensemble_store, tmp_path):
    run_script([sys.executable, "meal_v2.py", "--data", tiny_data, "--out", str(tmp_path / "nd"), "--no-disc",
                *teacher_flags(two_teachers), *TINY_RANDOM, "--epochs", "1"])
    assert metrics(tmp_path / "nd")[0]["train_disc"] == 0.0
    result = run_script(torchrun(2) + ["meal_v2.py", "--data", tiny_data, "--out", str(tmp_path / "ddp"),
                                       *teacher_flags(two_teachers), *TINY_RANDOM])
    ddp = metrics(tmp_path / "ddp")
    assert [r["val_count"] for r in ddp] == [9, 9] and result.stdout.count("MEAL V2 summary") == 1
    run_script(torchrun(2) + ["meal_v2.py", "--data", tiny_data, "--out", str(tmp_path / "ddp_labels"),
                              "--labels", str(ensemble_store), "--num-crops", "2", *teacher_flags(two_teachers),
                              *TINY_RANDOM, "--epochs", "2", "--lr-drop-epoch", "2"])
    assert metrics(tmp_path / "ddp_labels")[0]["epoch"] == 2  # one pass of 2 stored crops per image


def test_fast_meal_v2_schedule_is_the_official_fkd_train_command():
    """MEAL-V2's README runs FKD_train.py with --epochs 200 --schedule 100 180 at lr 0.01 (batch 512);
    its adjust_learning_rate: lr *= 0.1 for each milestone <= epoch. Rebuilt here, per epoch."""
    args = meal_v2.parse_args(["--data", "/x", "--labels", "/store"])
    assert (args.epochs, args.lr_drop_epoch, args.batch_size) == (200, [100, 180], 512)
    official = [0.01 * 0.1 ** ((epoch >= 100) + (epoch >= 180)) for epoch in range(200)]
    ours = {}
    for start, m in meal_v2.pass_plan(args.epochs, args.num_crops, args.lr_drop_epoch):
        for epoch in range(start, start + m):  # the lr is constant within a pass: no pass straddles a drop
            ours[epoch] = args.lr * 0.1 ** sum(start >= drop for drop in args.lr_drop_epoch)
    assert [ours[e] for e in range(200)] == pytest.approx(official, rel=1e-12)
