"""FKD pieces: crop schedule, serrated pass plan, loss, ensemble, mixing."""
import numpy as np
import torch
import torch.nn.functional as F

import fkd
from common.data import mix_batch
from common.labels import crop_schedule
from common.models import ensemble_probs, teacher_logits


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
    plan = fkd.pass_plan(300, 4)
    assert plan[0] == (0, 4, 4) and plan[-5] == (292, 4, 4)
    assert plan[-4:] == [(296, 1, 1), (297, 1, 1), (298, 1, 1), (299, 1, 1)]
    assert sum(covered for _, _, covered in plan) == 300
    assert fkd.pass_plan(3, 1) == [(0, 1, 1), (1, 1, 1), (2, 1, 1)]


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
