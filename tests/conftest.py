"""Shared fixtures: a tiny ImageFolder made from demo renders, and tiny local teacher files."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import demo  # noqa: E402
from common.ckpt import save_atomic  # noqa: E402

TINY_CLASSES = 3
TINY_SIZE = 40
TINY_CFG = {"input_size": 32, "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225], "crop_pct": 1.0}


def make_image_folder(root, per_class=(6, 3), classes=TINY_CLASSES, size=TINY_SIZE, seed=0):
    for split, count in zip(("train", "val"), per_class):
        for c in range(classes):
            folder = os.path.join(root, split, demo.CLASSES[c])
            os.makedirs(folder, exist_ok=True)
            rng = np.random.default_rng([seed, c, split == "val"])
            for i in range(count):
                # odd sizes on purpose: crops must not assume square images
                demo.render(c, rng, size=size).resize((size + 7 * (i % 3), size)).save(
                    os.path.join(folder, f"img_{i:03d}.png"))
    return str(root)


def make_teacher(path, arch="test_resnet", classes=TINY_CLASSES, seed=0, cfg=TINY_CFG):
    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=classes)
    save_atomic({"model": model.state_dict(), "arch": arch, "num_classes": classes,
                 "data_config": cfg, "epoch": 0}, str(path))
    return f"{arch}={path}"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pth")


def run_script(args, timeout=600, env=None, check=True):
    """Run a method file (or torchrun) in a subprocess on CPU; return the CompletedProcess."""
    full_env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **(env or {}))
    result = subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def torchrun(nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def label_store_ready(folder):
    """Whether a label store's meta.json says "ready": while it says "allocating", done.npy and the
    other arrays are still being created (a reader may find them empty)."""
    try:
        with open(os.path.join(folder, "meta.json")) as f:
            return json.load(f).get("state") == "ready"
    except (OSError, ValueError):
        return False
