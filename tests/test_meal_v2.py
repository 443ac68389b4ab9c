"""MEAL V2 pieces (Eq. 1, 3-5), the Fast MEAL V2 label route, and the CLI end to end."""
import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import meal_v2
from common.crops import replay_crops
from common.data import load_rgb, image_folder
from common.labels import LabelStore, StoredCrops, crop_schedule, decode
from common.models import create, ensemble_probs, load_teachers, teacher_logits
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


def test_discriminator_shapes_and_no_final_relu():
    torch.manual_seed(0)
    d = meal_v2.Discriminator(1000)
    assert [layer.out_features for layer in d.layers if isinstance(layer, torch.nn.Linear)] == [125, 15, 1]
    out = d(torch.softmax(torch.randn(6, 1000), 1))
    assert out.shape == (6,)
    with torch.no_grad():
        d.layers[-1].bias.fill_(-100.0)
    assert (d(torch.softmax(torch.randn(6, 1000), 1)) < 0).all()  # "fake" logits are reachable


def test_discriminator_loss_on_known_inputs():
    class Fixed(torch.nn.Module):  # D(p) = logit given by the first entry
        def forward(self, p):
            return p[:, 0]

    teacher = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    student = torch.tensor([[-1.0, 0.0], [3.0, 0.0]])
    sig = lambda x: 1 / (1 + math.exp(-x))
    real = -(math.log(sig(2.0)) + math.log(sig(0.0))) / 2  # Eq. 4, teacher = 1
    fake = -(math.log(1 - sig(-1.0)) + math.log(1 - sig(3.0))) / 2  # student = 0
    assert meal_v2.discriminator_loss(Fixed(), teacher, student).item() == pytest.approx(real + fake, rel=1e-6)


def test_soft_cross_entropy_eq3():
    logits, targets = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.2, 0.5, 0.3]])
    log_p = F.log_softmax(logits, 1)[0]
    expected = -sum(t * lp for t, lp in zip(targets[0].tolist(), log_p.tolist()))
    assert meal_v2.soft_cross_entropy(logits, targets).item() == pytest.approx(expected, rel=1e-6)


@pytest.fixture(scope="module")
def online_run(tiny_data, two_teachers, init_file, tmp_path_factory):
    init, out = init_file, tmp_path_factory.mktemp("meal_online") / "run"
    result = run_script([sys.executable, "meal_v2.py", "--data", tiny_data, "--out", str(out), "--init", init,
                         *teacher_flags(two_teachers), *TINY, "--lr", "1e-4"])  # small lr: weights stay near init
    return out, init, result


def test_online_end_to_end_local_init_and_own_optimizers(online_run):
    out, init, result = online_run
    records = metrics(out)
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[0]["train_disc"] > 0 and records[0]["train_kd"] > 0
    assert [r["lr"] for r in records] == pytest.approx([1e-4, 1e-5])  # drop at --lr-drop-epoch
    assert "MEAL V2 summary: online teachers" in result.stdout and "teacher ensemble" in result.stdout
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["args"]["wd"] == 0.0  # the paper's recipe: no weight decay
    assert all(g["weight_decay"] == 0.0 for g in state["optimizer"]["param_groups"])
    student_params = sum(len(g["params"]) for g in state["optimizer"]["param_groups"])
    assert student_params == len([k for k in state["model"] if "running" not in k and "num_batches" not in k])
    d_groups = state["d_optimizer"]["param_groups"]
    assert len(d_groups) == 1 and d_groups[0]["lr"] == 1e-4  # its own lr, untouched by the student's schedule
    # the student started from the local init file: its backbone moved from there, not from a random init
    init_model, _ = create(init, 3, pretrained_head="reset")
    start = dict(init_model.state_dict())
    stem = "conv_stem.weight"
    drift = (state["model"][stem] - start[stem]).abs().max().item()
    random_model, _ = create("test_efficientnet", 3, pretrained_head="none")
    assert drift < 0.01 < (random_model.state_dict()[stem] - start[stem]).abs().max().item()


def test_discriminator_updated_only_by_its_own_optimizer(two_teachers):
    """One training step: the discriminator's parameters change by exactly its Adam step at --d-lr."""
    torch.manual_seed(0)
    d = meal_v2.Discriminator(3)
    before = [p.detach().clone() for p in d.parameters()]
    teacher_probs = torch.softmax(torch.randn(4, 3), 1)
    student_logits = torch.randn(4, 3, requires_grad=True)
    d_opt = torch.optim.Adam(d.parameters(), lr=1e-3, betas=(0.5, 0.999))
    loss = meal_v2.discriminator_loss(d, teacher_probs, torch.softmax(student_logits, 1).detach())
    d_opt.zero_grad()
    loss.backward()
    d_opt.step()
    assert student_logits.grad is None  # the discriminator step does not touch the student
    # Adam's first step moves every parameter entry by about lr in the sign of its gradient
    for p, b in zip(d.parameters(), before):
        moved = (p.detach() - b).abs()
        assert torch.allclose(moved[p.grad != 0], torch.full_like(moved[p.grad != 0], 1e-3), rtol=1e-2)
    # the student's adversarial term does not reach the discriminator
    snapshot = [p.detach().clone() for p in d.parameters()]
    d.requires_grad_(False)
    fake = d(torch.softmax(student_logits, 1))
    F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake)).backward()
    d.requires_grad_(True)
    assert student_logits.grad is not None
    assert all(torch.equal(p.detach(), s) for p, s in zip(d.parameters(), snapshot))


@pytest.fixture(scope="module")
def ensemble_store(tiny_data, two_teachers, tmp_path_factory):
    labels = tmp_path_factory.mktemp("meal_store") / "labels"
    run_script([sys.executable, "fkd.py", "--data", tiny_data, "--mode", "label", "--codec", "full",
                "--stored-crops", "4", "--label-batch", "4", "--workers", "0", "--input-size", "32",
                "--labels", str(labels), "--out", str(labels.parent / "fkd"), *teacher_flags(two_teachers)])
    return labels


def test_labels_route_targets_are_the_decoded_stored_ensemble(ensemble_store, tiny_data, two_teachers):
    store = LabelStore.open(str(ensemble_store))
    train = image_folder(tiny_data, "train")
    dataset = StoredCrops(train.samples, store, 2, 32, "bilinear", seed=0)
    items = [dataset[(n, 2)] for n in (1, 10)]
    batch = torch.utils.data.default_collate(items)
    crops, targets, labels = meal_v2.batch_targets(batch, store, [], torch.device("cpu"))
    assert crops.shape == (4, 3, 32, 32) and labels.tolist() == [train.samples[1][1]] * 2 + [train.samples[10][1]] * 2
    teachers = load_teachers(two_teachers, 3, torch.device("cpu"))
    for row, n in enumerate((1, 10)):
        ids = crop_schedule(0, n, store.meta["num_crops"], 2, 2)
        boxes, flips, indices, values = store.read(n, ids)
        stored = decode(None, torch.from_numpy(values), "full", 3)
        torch.testing.assert_close(targets[2 * row:2 * row + 2], stored)
        # and those stored rows are the teachers' ensemble on the same crops, each at its own size
        image = load_rgb(train.samples[n][0])
        views = [replay_crops(image, boxes, flips, ex["data_config"]["input_size"], ex["data_config"]["interpolation"])
                 for _, ex in teachers]
        with torch.no_grad():
            fresh = ensemble_probs(teacher_logits(teachers, views))
        torch.testing.assert_close(stored, fresh, atol=2e-3, rtol=0)


def test_labels_route_end_to_end_resume_and_mismatch(ensemble_store, tiny_data, two_teachers, init_file, tmp_path):
    common = ["--data", tiny_data, "--init", init_file, "--labels", str(ensemble_store), "--num-crops", "2",
              *teacher_flags(two_teachers), *TINY, "--epochs", "4", "--lr-drop-epoch", "2"]
    result = run_script([sys.executable, "meal_v2.py", "--out", str(tmp_path / "a"), *common])
    whole = metrics(tmp_path / "a")
    assert [r["epoch"] for r in whole] == [2, 4]  # one pass over the stream = num_crops epochs
    assert "labels (Fast MEAL V2)" in result.stdout
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
    assert bad.returncode != 0 and "was made with teachers" in bad.stderr
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
                              *TINY_RANDOM, "--epochs", "2"])
    assert metrics(tmp_path / "ddp_labels")[0]["epoch"] == 2
