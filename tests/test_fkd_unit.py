"""FKD pieces: crop schedule, serrated pass plan, loss, ensemble, mixing, recipes, flags."""
import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fkd
from common.data import mix_batch
from common.labels import crop_schedule
from common.models import ensemble_probs, param_groups, teacher_logits


def test_crop_schedule_is_non_overlapping_until_all_used():
    stored, m = 10, 4
    used = np.concatenate([crop_schedule(0, 7, stored, start, m) for start in range(0, 8, m)])
    assert len(set(used.tolist())) == 8  # first 8 positions: 8 distinct crops
    first_cycle = crop_schedule(0, 7, stored, 0, stored)
    assert sorted(first_cycle.tolist()) == list(range(stored))
    # positions 8..11 straddle two permutations; positions are consistent however they are chunked
    assert np.array_equal(crop_schedule(0, 7, stored, 8, 4),
                          np.concatenate([crop_schedule(0, 7, stored, 8, 2), crop_schedule(0, 7, stored, 10, 2)]))
    assert not np.array_equal(crop_schedule(0, 7, stored, 0, stored), crop_schedule(0, 8, stored, 0, stored))


def test_pass_plan_matches_official_loop():
    # official: for epoch in range(0, 300, 4) with the last 4 epochs run one crop per image
    plan = list(fkd.pass_plan(300, 4))
    assert plan[0] == (0, 4, 4) and plan[-5] == (292, 4, 4)
    assert plan[-4:] == [(296, 1, 1), (297, 1, 1), (298, 1, 1), (299, 1, 1)]
    assert sum(covered for _, _, covered in plan) == 300
    assert list(fkd.pass_plan(3, 1)) == [(0, 1, 1), (1, 1, 1), (2, 1, 1)]
    assert next(fkd.pass_plan(10**9, 4)) == (0, 4, 4)  # --epochs 1e9: a generator, no plan in memory


def test_soft_cross_entropy_equals_hand_computed():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    targets = torch.tensor([[0.7, 0.2, 0.1]])
    expected = -(targets * torch.log_softmax(logits, 1)).sum()
    torch.testing.assert_close(fkd.soft_cross_entropy(logits, targets), expected)
    # one-hot targets give the usual cross-entropy
    torch.testing.assert_close(fkd.soft_cross_entropy(logits, torch.tensor([[1.0, 0, 0]])),
                               F.cross_entropy(logits, torch.tensor([0])))
    # temperature divides the student logits only
    torch.testing.assert_close(fkd.soft_cross_entropy(logits, targets, 2.0),
                               -(targets * torch.log_softmax(logits / 2, 1)).sum())


def test_ensemble_is_mean_of_softmax():
    a, b = torch.tensor([[4.0, 0.0]]), torch.tensor([[0.0, 4.0]])
    out = ensemble_probs([a, b])
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.5]]))
    z = torch.randn(3, 7)
    torch.testing.assert_close(ensemble_probs([z], temperature=3.0), torch.softmax(z / 3, 1))


def test_teachers_see_their_own_size_and_normalization():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append((x.shape[-1], x.mean().item()))
            return torch.zeros(x.shape[0], 3)

    img = torch.full((2, 3, 8, 8), 128, dtype=torch.uint8)
    teachers = [(Probe(), {"data_config": {"mean": [0.5] * 3, "std": [0.5] * 3}}),
                (Probe(), {"data_config": {"mean": [0.0] * 3, "std": [1.0] * 3}})]
    teacher_logits(teachers, [img, torch.full((2, 3, 12, 12), 128, dtype=torch.uint8)])
    assert seen[0][0] == 8 and seen[1][0] == 12
    assert abs(seen[0][1] - (128 / 255 - 0.5) / 0.5) < 1e-5 and abs(seen[1][1] - 128 / 255) < 1e-5


def test_mix_soft_labels_mixes_inputs_and_labels_with_same_lambda():
    g = torch.Generator().manual_seed(0)
    x = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mx, my = mix_batch(x, y, mixup_alpha=1.0, cutmix_alpha=0.0, generator=g)
    # mixup: every pixel of sample i equals the label mass of class 1
    torch.testing.assert_close(mx[:, 0, 0, 0], my[:, 1])
    torch.testing.assert_close(my.sum(1), torch.ones(2))
    cx, cy = mix_batch(x, y, mixup_alpha=0.0, cutmix_alpha=1.0, generator=g)
    # cutmix: the label mass of class 1 equals the area fraction of ones (area-corrected lambda)
    torch.testing.assert_close(cx.mean(dim=(1, 2, 3)), cy[:, 1])


# ---------------------------------------------------------------------------------------------
# Recipes (Table 3, Table 5) against the paper and the official scripts
# ---------------------------------------------------------------------------------------------
def official_loop(epochs, m, warmup):
    """The epochs of train_ViT_FKD.py (warmup single-crop epochs, then range(warmup, epochs, m) with
    the last m epochs one crop each); train_FKD.py is the same with warmup = 0."""
    plan = [(e, 1, 1) for e in range(warmup)]
    for epoch in range(warmup, epochs, m):
        if epoch >= epochs - m:
            return plan + [(e, 1, 1) for e in range(epoch, epochs)]
        plan.append((epoch, m, m))
    return plan


def test_pass_plan_with_warmup_matches_the_official_loops():
    for epochs, m, warmup in ((300, 4, 5), (300, 4, 0), (10, 3, 2), (7, 4, 0), (5, 2, 5)):
        assert list(fkd.pass_plan(epochs, m, warmup)) == official_loop(epochs, m, warmup)


def test_recipes_are_labelled_with_their_table_numbers():
    r80, r79, vit = fkd.RECIPES["resnet50"], fkd.RECIPES["resnet50-plain"], fkd.RECIPES["vit"]
    assert "80.1" in r80["reported"] and "79.8" in r79["reported"] and "75.2" in vit["reported"]
    # Table 3: 80.1 with warmup and colour jitter, 79.8 without; both: train_FKD.py's optimizer
    assert (r80["warmup_epochs"], r80["color_jitter"]) == (5, 0.4)
    assert (r79["warmup_epochs"], r79["color_jitter"]) == (0, 0.0)
    # lr: 80.1 "0.1 x batch/512" (official README table); 79.8 train_FKD.py's command, --lr 0.1 -b 1024
    for recipe, lr_rule in ((r80, (0.1, 512)), (r79, (0.1, 1024))):
        assert (recipe["opt"], recipe["lr_rule"], recipe["wd"], recipe["wd_params"], recipe["zero_init_last"]) == \
            ("sgd", lr_rule, 1e-4, "all", False)
        assert (recipe["epochs"], recipe["batch_size"], recipe["num_crops"], recipe["stored_crops"]) == (300, 1024, 4, 500)
    # train_ViT_FKD.py: AdamW lr 0.002 at batch 1024, wd 0.05, 5 single-crop warmup epochs from 1e-5
    assert (vit["opt"], vit["lr_rule"], vit["wd"], vit["warmup_epochs"], vit["warmup_lr"], vit["min_lr"]) == \
        ("adamw", (0.002, 1024), 0.05, 5, 1e-5, 1e-5)
    args, _ = fkd.parse_args(["--data", "/x"])
    assert args.recipe == "resnet50" and args.lr == pytest.approx(0.2) and args.teacher == [fkd.L2_TEACHER]
    args, explicit = fkd.parse_args(["--data", "/x", "--recipe", "vit", "--batch-size", "512"])
    assert args.lr == pytest.approx(0.001) and args.opt == "adamw"
    line = fkd.describe_recipe(args, explicit)
    assert line.startswith("recipe vit: the paper's 75.2% top-1") and "--batch-size 512 (recipe 1024)" in line


def test_weight_decay_sets_and_torchvision_init():
    import timm
    resnet = timm.create_model("test_resnet", zero_init_last=False)
    groups = param_groups(resnet, 1e-4, "all")  # train_FKD.py: SGD(model.parameters(), wd)
    assert len(groups) == 1 and len(groups[0]["params"]) == len(list(resnet.parameters()))
    gammas = lambda model: [float(m.weight.detach().min()) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]  # noqa: E731
    assert min(gammas(resnet)) == 1.0 and min(gammas(timm.create_model("test_resnet"))) == 0.0  # timm zeroes
    vit = timm.create_model("test_vit")
    decayed = {id(p) for g in param_groups(vit, 0.05, "weights") if g["weight_decay"] > 0 for p in g["params"]}
    names = {n for n, p in vit.named_parameters() if id(p) not in decayed}
    assert {"cls_token", "pos_embed"} <= names and all(p.ndim > 1 for n, p in vit.named_parameters() if id(p) in decayed)


def test_color_jitter_is_seeded_per_crop_and_off_at_zero():
    crops = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    jitter = fkd.ColorJitter(0.4)
    a = jitter(crops, torch.Generator().manual_seed(1))
    assert a.dtype == torch.uint8 and a.shape == crops.shape
    assert torch.equal(a, jitter(crops, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, jitter(crops, torch.Generator().manual_seed(2)))
    assert torch.equal(fkd.ColorJitter(0.0)(crops, torch.Generator()), crops)
    gray = torch.full((1, 3, 4, 4), 100, dtype=torch.uint8)  # contrast/saturation keep a gray image
    factor = (1 + 0.4 * (2 * torch.rand(3, generator=torch.Generator().manual_seed(5)) - 1))[0]
    expected = torch.full_like(gray, int(min(255, 100 * float(factor))))  # brightness alone scales it
    assert (jitter(gray, torch.Generator().manual_seed(5)).int() - expected.int()).abs().max() <= 1


def test_label_crops_is_the_ensemble_mean_then_the_codec():
    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, x):
            return self.logits.expand(x.shape[0], -1)

    za, zb = torch.tensor([[3.0, 1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 1.0, 0.0]])
    cfg = {"data_config": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    teachers = [(Fixed(za), cfg), (Fixed(zb), cfg)]
    views = [torch.zeros(2, 3, 4, 4, dtype=torch.uint8)] * 2
    ensemble = (torch.softmax(za / 2, 1) + torch.softmax(zb / 2, 1)) / 2
    idx, val = fkd.label_crops(teachers, views, "ms", 2, 2.0, "probs", contextlib.nullcontext())
    assert idx.tolist() == [ensemble[0].topk(2).indices.tolist()] * 2
    torch.testing.assert_close(val.float(), ensemble.topk(2, 1).values.expand(2, -1), atol=1e-3, rtol=0)
    hard, _ = fkd.label_crops(teachers, views, "hard", 1, 1.0, "probs", contextlib.nullcontext())
    assert hard.flatten().tolist() == [int((torch.softmax(za, 1) + torch.softmax(zb, 1)).argmax())] * 2
    _, raw = fkd.label_crops(teachers[:1], views[:1], "full", 1, 2.0, "logits", contextlib.nullcontext())
    torch.testing.assert_close(raw, za.expand(2, -1))  # Sec. 3.4: raw outputs, no temperature


@pytest.mark.parametrize("flag", ["--stored-crops", "--k", "--temperature", "--label-dim", "--label-batch",
                                  "--flush-every", "--num-crops", "--epochs", "--batch-size", "--lr", "--wd",
                                  "--momentum", "--warmup-epochs", "--warmup-lr", "--min-lr", "--color-jitter",
                                  "--input-size", "--crop-pct", "--mixup", "--cutmix", "--workers", "--seed",
                                  "--stop-epoch", "--show-images"])
def test_every_numeric_flag_is_checked_when_parsed(flag, capsys):
    for bad in ("nan", "-1", "inf"):
        with pytest.raises(SystemExit):
            fkd.parse_args(["--data", "/x", flag, bad])
        assert f"argument {flag}: must be" in capsys.readouterr().err
