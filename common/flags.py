"""argparse types (`type=flags.positive_float`) that check a flag's value when it is parsed, before
any work starts: a bad value stops the run with one sentence naming the flag, the value and what is
expected ("argument --lr: must be a finite number > 0, got 'nan'"), so a derived value is never
blamed for a flag the user did not pass. NaN and inf are refused everywhere."""
import argparse
import math

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


def _number(cast, what, ok=lambda value: True):
    def parse(text):
        try:
            value = cast(text)
        except (TypeError, ValueError):
            value = math.nan
        if not (abs(value) < math.inf and ok(value)):  # NaN, inf fail here (`x <= 0` lets NaN through)
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _number(int, "an integer >= 1", lambda v: v >= 1)
nonneg_int = _number(int, "an integer >= 0", lambda v: v >= 0)
positive_float = _number(float, "a finite number > 0", lambda v: v > 0)
nonneg_float = _number(float, "a finite number >= 0", lambda v: v >= 0)
finite_float = _number(float, "a finite number")
fraction = _number(float, "a number in [0, 1]", lambda v: 0 <= v <= 1)
open_fraction = _number(float, "a number in (0, 1]", lambda v: 0 < v <= 1)
fraction_below_one = _number(float, "a number in [0, 1)", lambda v: 0 <= v < 1)


def interpolation(text):
    """A PIL/torchvision interpolation name."""
    if text not in INTERPOLATIONS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(INTERPOLATIONS)}, got {text!r}")
    return text


def given(parser, argv):
    """The dest names of the flags present on the command line `argv` (None: sys.argv), so that a
    recipe, a switch or a demo default never overrides a value the user typed."""
    saved, defaults = [(action, action.default) for action in parser._actions], parser._defaults
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        parser._defaults = {}  # set_defaults() keys that are no flag (a recipe's name) were never typed
        return set(vars(parser.parse_args(argv)))
    finally:
        parser._defaults = defaults
        for action, default in saved:
            action.default = default


def fill_from(args, recipe, skip=()):
    """The recipe's value for every flag left at None (not typed, no default), lists copied; keys that
    are no flag of `args` (or in `skip`) are left out."""
    for key, value in recipe.items():
        if key not in skip and vars(args).get(key, 0) is None:
            setattr(args, key, list(value) if isinstance(value, list) else value)


def build_parser(description, table, network="the network"):
    """An ArgumentParser from a table of (flag, kind, help[, argparse extras]) rows plus the run
    flags. kind: a parser of this module (it checks the value; its range is added to the help),
    another type, a list of choices, or an action ("store_true", "append", BooleanOptionalAction).
    A default given in the extras is shown in the help; flags without one take the recipe's value."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, kind, text, *more in table:
        more = more[0] if more else {}
        how = (dict(action=kind) if kind in ("store_true", "append", argparse.BooleanOptionalAction)
               else dict(choices=kind) if isinstance(kind, (list, tuple)) else dict(type=kind))
        if text is not argparse.SUPPRESS:
            ranged = "_number" in getattr(kind, "__qualname__", "") and kind.__name__
            fixed = more.get("default") not in (None, [], False) and f"default {more['default']}"
            text = "; ".join(filter(None, [text, ranged, fixed])).replace("%", "%%")
        p.add_argument(flag, help=text or None, **how, **more)
    add = p.add_argument  # the run flags: how a run runs, not what it trains
    add("--workers", type=nonneg_int, help="DataLoader workers per process (default: the recipe's)")
    add("--amp", action="store_true", help="mixed precision (CUDA only)")
    add("--amp-dtype", default="float16", choices=["float16", "bfloat16"],
        help="autocast dtype with --amp (bfloat16 needs no loss scaling)")
    add("--compile", action="store_true", help=f"torch.compile {network}")
    add("--seed", type=nonneg_int, default=0)
    add("--resume", help="checkpoint to continue, or 'auto' (OUT/last.pth; without --out the newest run)")
    add("--overwrite", action="store_true", help="start over in an --out that holds a run")
    add("--stop-epoch", type=positive_int, help="stop after this epoch as if interrupted (split a run into "
        "time-limited jobs; continue with --resume auto)")
    add("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add("--threads", type=positive_int, help="CPU threads per process (default: the idle cores at start)")
    return p


def refuse_ignored(given, rules):
    """One sentence for a flag the user typed that a switch would ignore or override: rules are
    (switch is on, the switch as the user knows it, dest names it leaves without effect)."""
    for active, switch, dests in rules:
        typed = [d for d in dests if d in given]
        if active and typed:
            names = " ".join("--" + d.replace("_", "-") for d in typed)
            raise SystemExit(f"error: {names} has no effect with {switch}; drop one of them")

