"""Students and teachers by timm name; weights from a timm pretrained tag or a local file.

A model spec is `NAME` (timm's pretrained weights, needs the hub or its cache) or `NAME=PATH`
(a local file, no network): a plain state_dict, a timm/torchvision checkpoint, or a checkpoint of
ours (which also records the data config the model was trained with). Files are read with
torch.load(weights_only=True), so a file that needs pickle code to load is refused.
"""
import hashlib
import os
import pickle

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from timm.models import clean_state_dict
from torch import nn


class ModelError(ValueError):
    """A model or weights file that cannot be used as asked."""


def parse_spec(spec):
    """'resnet50' -> ('resnet50', None); 'resnet50=w.pth' -> ('resnet50', 'w.pth')."""
    name, _, path = spec.partition("=")
    return name.strip(), (path.strip() or None)


def file_sha256(path, limit=None):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_checkpoint(path):
    """torch.load with weights_only=True and one-sentence errors."""
    if not os.path.isfile(path):
        raise ModelError(f"weights file {path} does not exist; check the path after '='")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ModelError(f"{path} is not a plain weights file: loading it would execute pickled "
                         f"code, which is refused ({str(error).splitlines()[0]}); "
                         f"re-save it as a state_dict") from None
    except Exception as error:  # truncated zip, random bytes, ...
        raise ModelError(f"cannot read weights file {path} ({type(error).__name__}: {error}); "
                         f"the file is damaged or not a PyTorch checkpoint") from None


def state_dict_of(checkpoint):
    if isinstance(checkpoint, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(checkpoint.get(key), dict):
                return clean_state_dict(checkpoint[key])
    return clean_state_dict(checkpoint)


def cifar_stem(model):
    """CIFAR-style ResNet stem: 3x3 stride-1 conv, no max-pool (for 32x32 inputs)."""
    if not (isinstance(getattr(model, "conv1", None), nn.Conv2d) and hasattr(model, "maxpool")):
        raise ModelError(f"--cifar-stem needs a timm ResNet with a single conv1 stem, "
                         f"not {type(model).__name__}")
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def create(spec, num_classes, pretrained_head="keep", adapt=None, **kwargs):
    """Build a timm model from a spec and load its weights.

    pretrained_head: "keep" - the weights must already predict `num_classes` (teachers);
                     "reset" - a new classifier for `num_classes` if the counts differ (students);
                     "none"  - random init, `spec` must not name weights.
    adapt: optional callable model -> model applied right after creation, before weights are
           loaded (e.g. frskd.py's CIFAR stem), so a local file saved from the adapted model fits.
    Returns (model, extra) where extra = {"data_config": ..., "sha256": ..., "source": ...}.
    """
    name, path = parse_spec(spec)
    if name not in timm.list_models(pretrained=False) and not timm.is_model(name.split(".")[0]):
        raise ModelError(f"unknown timm model {name!r}; see timm.list_models()")
    extra = {"name": name, "source": path or name, "sha256": None, "data_config": None}
    try:
        if pretrained_head == "none":
            model = timm.create_model(name, num_classes=num_classes, **kwargs)
        elif path is None:
            try:
                model = timm.create_model(name, pretrained=True, **kwargs)
            except Exception as error:
                raise ModelError(f"cannot fetch pretrained weights for {name} ({type(error).__name__}); "
                                 f"without network pass a local file as {name}=PATH") from None
        else:
            checkpoint = read_checkpoint(path)
            state = state_dict_of(checkpoint)
            extra["sha256"] = file_sha256(path)
            if isinstance(checkpoint, dict) and isinstance(checkpoint.get("data_config"), dict):
                extra["data_config"] = checkpoint["data_config"]
            probe = timm.create_model(name, num_classes=1, **kwargs)
            head_key = f"{probe.pretrained_cfg.get('classifier', 'fc')}.weight"
            file_classes = state[head_key].shape[0] if head_key in state else num_classes
            model = timm.create_model(name, num_classes=file_classes, **kwargs)
            if adapt is not None:
                model = adapt(model)
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ModelError(f"weights {path} do not fit architecture {name} "
                                 f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}); "
                                 f"pass the architecture the weights were trained with")
    except RuntimeError as error:  # size mismatch inside load_state_dict
        first = str(error).split("\n\t")[1] if "\n\t" in str(error) else str(error)
        raise ModelError(f"weights {path} do not fit architecture {name} ({first.strip()}); "
                         f"pass the architecture the weights were trained with") from None
    if adapt is not None and (pretrained_head == "none" or path is None):
        model = adapt(model)
    if model.num_classes != num_classes:
        if pretrained_head == "reset":
            model.reset_classifier(num_classes)
        else:
            raise ModelError(f"{name} predicts {model.num_classes} classes but the data has "
                             f"{num_classes} class folders; use a model trained on these classes")
    if extra["data_config"] is None:
        extra["data_config"] = data_config_of(model)
    return model, extra


def data_config_of(model):
    """Input size, interpolation, mean, std and crop_pct of a timm model."""
    cfg = resolve_model_data_config(model)
    return {"input_size": int(cfg["input_size"][-1]), "interpolation": cfg["interpolation"],
            "mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]],
            "crop_pct": float(cfg.get("crop_pct", 0.875))}


def load_teachers(specs, num_classes, device):
    """Teachers in eval mode with their own data configs; gradients off."""
    teachers = []
    for spec in specs:
        model, extra = create(spec, num_classes, pretrained_head="keep")
        model.eval().requires_grad_(False).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        teachers.append((model, extra))
    return teachers


def normalize(images, mean, std):
    """uint8 NCHW on the training device -> float, normalized."""
    mean = torch.tensor(mean, device=images.device).view(1, -1, 1, 1) * 255
    std = torch.tensor(std, device=images.device).view(1, -1, 1, 1) * 255
    out = (images.float() - mean) / std
    return out.contiguous(memory_format=torch.channels_last) if images.is_cuda else out


def param_groups(model, weight_decay):
    """No weight decay on biases and normalization parameters (1-d tensors)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(name, groups, lr, momentum=0.9, nesterov=False):
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; choose sgd or adamw")


class FeaturesAndLogits(nn.Module):
    """Wrap a timm classifier so one forward returns (pooled penultimate features, logits).

    A module (not a helper function) so DistributedDataParallel sees the whole forward.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        pooled = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return pooled, self.model.get_classifier()(pooled)


@torch.no_grad()
def teacher_logits(teachers, views_per_teacher, amp=False):
    """Each teacher's logits on the same crops; views_per_teacher[t] holds the crops resized for
    teacher t (uint8 NCHW on the device), normalized here with teacher t's mean and std."""
    outputs = []
    for (teacher, extra), images in zip(teachers, views_per_teacher):
        cfg = extra["data_config"]
        with torch.autocast(images.device.type, enabled=amp and images.is_cuda):
            outputs.append(teacher(normalize(images, cfg["mean"], cfg["std"])).float())
    return outputs


def ensemble_probs(logits_per_teacher, temperature=1.0):
    """P_i = T(R_i) (Sec. 3.1); several teachers: the exact mean of their softmax on the same crop."""
    return torch.stack([F.softmax(z / temperature, dim=1) for z in logits_per_teacher]).mean(dim=0)
