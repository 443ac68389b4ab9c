"""Students and teachers by timm name. A spec (docs/conventions.md) is `NAME` (timm's pretrained weights) or
`NAME=PATH` (a state_dict, timm/torchvision checkpoint or one of ours, read with torch.load(weights_only=True)),
optionally with the data config its weights expect (`?input_size=32&interpolation=bicubic&...`). Precedence: the
query, then the config our checkpoints record, then timm's default; extra["data_config_source"] says which."""
import contextlib
import hashlib
import math
import os
import pickle
import pickletools
import zipfile

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from timm.models import clean_state_dict, get_pretrained_cfg_value

from .flags import INTERPOLATIONS


class ModelError(ValueError):
    """A model or weights file that cannot be used as asked."""


DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct")


def split_query(spec):
    """'NAME=PATH?input_size=32' -> ('NAME=PATH', 'input_size=32'); no query -> (spec, '')."""
    head, mark, query = spec.rpartition("?")
    return (head, query) if mark and "=" in query and head else (spec, "")


def parse_spec(spec):
    """'resnet50' -> ('resnet50', None); 'resnet50=w.pth?input_size=32' -> ('resnet50', 'w.pth')."""
    name, _, path = split_query(spec)[0].partition("=")
    return name.strip(), (path.strip() or None)


def _query_numbers(spec, key, text, count, positive):
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count or not all(math.isfinite(v) and (v > 0 or not positive) for v in values):
        raise ModelError(f"{key}={text} in {spec!r} must be {count} comma-separated "
                         f"{'positive ' if positive else ''}numbers, e.g. {key}=0.5,0.5,0.5")
    return values


def spec_data_config(spec):
    """The data-config entries given in a spec's query (validated), e.g. {'input_size': 32}."""
    config = {}
    for item in filter(None, split_query(spec)[1].split("&")):
        key, _, text = (part.strip() for part in item.partition("="))
        if key not in DATA_CONFIG_KEYS:
            raise ModelError(f"unknown data-config key {key!r} in {spec!r}; use {', '.join(DATA_CONFIG_KEYS)}")
        if key == "input_size":
            if not text.isdigit() or int(text) < 1:
                raise ModelError(f"input_size={text} in {spec!r} must be a whole number of pixels >= 1")
            config[key] = int(text)
        elif key == "interpolation":
            if text not in INTERPOLATIONS:
                raise ModelError(f"interpolation={text} in {spec!r} must be one of {', '.join(INTERPOLATIONS)}")
            config[key] = text
        elif key == "crop_pct":
            value = _query_numbers(spec, key, text, 1, positive=True)[0]
            if value > 1:
                raise ModelError(f"crop_pct={text} in {spec!r} must be in (0, 1]")
            config[key] = value
        else:
            config[key] = _query_numbers(spec, key, text, 3, positive=(key == "std"))
    return config


def init_spec(init, arch):
    """The spec to build a student from: `arch` alone (no --init), or --init checked against
    --arch. `--init PATH` (a file, no NAME=) means `ARCH=PATH`."""
    if init is None or init in ("", "none"):
        return arch
    name, path = parse_spec(init)
    if path is None and (os.path.isfile(name) or name.endswith((".pth", ".pt", ".bin", ".safetensors"))):
        return f"{arch}={init}"
    if name.split(".")[0] != arch.split(".")[0]:
        raise ModelError(f"--init {init} holds {name} weights but --arch is {arch}; pass --arch {name}, "
                         f"or an --init of {arch}")
    return init


def describe_data_config(extra):
    """One line: "NAME: 224 px bicubic, mean (0.485, ...), std (...), crop 0.875, from SOURCE"."""
    cfg = extra["data_config"]
    numbers = lambda values: "(" + ", ".join(f"{v:.4g}" for v in values) + ")"  # noqa: E731
    return (f"{extra['name']}: {cfg['input_size']} px {cfg['interpolation']}, mean {numbers(cfg['mean'])}, "
            f"std {numbers(cfg['std'])}, crop {cfg.get('crop_pct', 0.875):.4g}, "
            f"from {extra.get('data_config_source', 'unknown')}")


_FILE_HASHES = {}


def file_sha256(path):
    """sha256 of a file, remembered per (path, size, mtime) so a teacher file is read once."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _FILE_HASHES[key] = digest.hexdigest()
    return _FILE_HASHES[key]


def needs_pickled_code(path, error):
    """True when torch's weights-only loader refused a real pickle that imports code (a global),
    False for damaged files (random bytes, truncated) that merely fail to parse."""
    if "global" in str(error).lower():  # "Unsupported global: GLOBAL os.system ..." and variants
        return True
    if zipfile.is_zipfile(path):
        return False
    code_ops = {"GLOBAL", "STACK_GLOBAL", "REDUCE", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX"}
    try:
        with open(path, "rb") as f:  # parse the opcodes only: nothing is executed
            return any(op.name in code_ops for op, _, _ in pickletools.genops(f))
    except Exception:  # not a well-formed pickle: damaged, not hostile
        return False


def read_checkpoint(path):
    """torch.load with weights_only=True and one-sentence errors."""
    if os.path.isdir(path):
        raise ModelError(f"{path} is a folder, not a weights file; pass the .pth file inside it "
                         f"(e.g. {os.path.join(path, 'best.pth')})")
    if not os.path.isfile(path):
        raise ModelError(f"weights file {path} does not exist; check the path after '='")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if needs_pickled_code(path, error):
            raise ModelError(f"{path} is not a plain weights file: loading it would execute pickled "
                             f"code, which is refused; re-save it as a state_dict") from None
        raise ModelError(f"cannot read weights file {path}: the file is damaged or not a PyTorch "
                         f"checkpoint; replace it") from None
    except Exception as error:  # truncated zip, random bytes, ...
        first = str(error).strip().splitlines()[0][:120] if str(error).strip() else ""
        raise ModelError(f"cannot read weights file {path} ({type(error).__name__}: {first}); "
                         f"the file is damaged or not a PyTorch checkpoint") from None


def state_dict_of(checkpoint):
    """The weights of a checkpoint: its EMA weights first, then its state_dict or model."""
    if isinstance(checkpoint, dict):
        keys = ("state_dict_ema", "model_ema", "state_dict", "model")
        checkpoint = next((checkpoint[k] for k in keys if isinstance(checkpoint.get(k), dict)), checkpoint)
    return clean_state_dict(checkpoint)


def create(spec, num_classes, pretrained_head="keep", adapt=None, **kwargs):
    """(timm model of `spec` with weights, extra: name, source, sha256, data_config[_source]). pretrained_head
    "keep": the weights must predict `num_classes` (teachers); "reset": a new classifier if the counts differ
    (students); "none": random init, `spec` must not name weights. adapt: model -> model applied before the
    weights load (e.g. frskd.py's CIFAR stem), so a local file saved from the adapted model fits."""
    name, path = parse_spec(spec)
    query_config = spec_data_config(spec)
    if name not in timm.list_models(pretrained=False) and not timm.is_model(name.split(".")[0]):
        raise ModelError(f"unknown timm model {name!r}; see timm.list_models()")
    extra = dict(name=name, source=path or name, sha256=None, data_config=None, data_config_source=None)
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
            saved_arch = checkpoint.get("arch") if isinstance(checkpoint, dict) else None
            if isinstance(saved_arch, str) and saved_arch.split(".")[0] != name.split(".")[0]:
                raise ModelError(f"weights {path} were saved for {saved_arch} and do not fit architecture {name}; "
                                 f"pass {saved_arch}={path}")
            state = state_dict_of(checkpoint)
            extra["sha256"] = file_sha256(path)
            if isinstance(checkpoint, dict) and isinstance(checkpoint.get("data_config"), dict):
                extra["data_config"] = dict(checkpoint["data_config"])
                extra["data_config_source"] = f"the checkpoint {path}"
            head_key = f"{get_pretrained_cfg_value(name, 'classifier') or 'fc'}.weight"
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
        cfg = resolve_model_data_config(model)
        extra.update(data_config_source=f"timm's default for {name}", data_config={
            "input_size": int(cfg["input_size"][-1]), "interpolation": cfg["interpolation"],
            "mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]],
            "crop_pct": float(cfg.get("crop_pct", 0.875))})
    if query_config:
        extra.update(data_config={**extra["data_config"], **query_config}, data_config_source=(
            f"the spec ({', '.join(query_config)}) over {extra['data_config_source']}"))
    extra["data_config"].setdefault("crop_pct", 0.875)
    return model, extra


def load_teachers(specs, num_classes, device):
    """Teachers in eval mode with their own data configs; gradients off."""
    layout = torch.channels_last if device.type == "cuda" else torch.preserve_format
    return [(model.eval().requires_grad_(False).to(device, memory_format=layout), extra)
            for model, extra in (create(spec, num_classes, pretrained_head="keep") for spec in specs)]


_norm_cache = {}  # (mean, std, device) -> (mean*255, std*255) tensors: no host-to-device copy per step


def normalize(images, mean, std):
    """uint8 NCHW (0-255) on the training device -> float32, normalized with mean/std in 0-1 units."""
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize() takes uint8 images (0-255), got {images.dtype}; normalize each "
                        f"batch once, straight from the loader")
    key = (tuple(mean), tuple(std), images.device)
    if key not in _norm_cache:
        _norm_cache[key] = tuple(torch.tensor(v, dtype=torch.float32, device=images.device).view(1, -1, 1, 1) * 255
                                 for v in (mean, std))
    mean_255, std_255 = _norm_cache[key]
    out = (images.float() - mean_255) / std_255
    return out.contiguous(memory_format=torch.channels_last) if images.is_cuda else out


def param_groups(model, weight_decay, rule="weights"):
    """The one weight-decay rule, per recipe: 'all' decays every parameter (train_FKD.py, the BAKE,
    FRSKD and MEAL V2 official code: SGD(model.parameters(), weight_decay)); 'weights' exempts
    biases, normalization parameters (1-d) and the model's no_weight_decay() tokens (timm's rule)."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if rule == "all":
        return [{"params": [p for _, p in params], "weight_decay": weight_decay}]
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    exempt = {name for name, p in params if p.ndim <= 1 or name in skip}
    return [{"params": [p for n, p in params if n not in exempt], "weight_decay": weight_decay},
            {"params": [p for n, p in params if n in exempt], "weight_decay": 0.0}]


def make_optimizer(name, groups, lr, momentum=0.9, nesterov=False):
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; choose sgd or adamw")


@torch.no_grad()
def teacher_logits(teachers, views_per_teacher, autocast=None):
    """Each teacher's outputs z (fp32) on the same crops: views_per_teacher[t], uint8 NCHW at teacher t's size,
    normalized here with its mean and std. `autocast`: the run's (`ctx.autocast(args)`), or None."""
    with autocast if autocast is not None else contextlib.nullcontext():
        return [teacher(normalize(images, extra["data_config"]["mean"], extra["data_config"]["std"])).float()
                for (teacher, extra), images in zip(teachers, views_per_teacher)]


def ensemble_probs(logits_per_teacher, temperature=1.0):
    """P_i = T(R_i) (Sec. 3.1); several teachers: the exact mean of their softmax on the same crop."""
    return torch.stack([F.softmax(z / temperature, dim=1) for z in logits_per_teacher]).mean(dim=0)
