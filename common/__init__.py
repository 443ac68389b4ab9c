"""Plumbing shared by fkd.py, bake.py, meal_v2.py and frskd.py, one module per concern (README, "Layout")."""
import torch

# torch.serialization.safe_globals (released labels) is 2.5+; GradScaler("cuda") and
# init_process_group(device_id=) are 2.3+
MIN_TORCH = (2, 5)


def torch_too_old(version):
    """A sentence when `version` (e.g. torch.__version__) is older than MIN_TORCH, else None."""
    found = tuple(int(part) for part in version.split("+")[0].split(".")[:2])
    return None if found >= MIN_TORCH else (
        f"this code needs torch >= {'.'.join(map(str, MIN_TORCH))}, found {version}; "
        f"pip install -r requirements.txt")


if torch_too_old(torch.__version__):
    raise SystemExit(f"error: {torch_too_old(torch.__version__)}")
