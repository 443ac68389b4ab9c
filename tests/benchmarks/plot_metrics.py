"""Plot the per-epoch curves of one or several runs' OUT/metrics.jsonl, overlaid.

    python tests/benchmarks/plot_metrics.py runs/fkd_demo/20260101-120000                # val top-1
    python tests/benchmarks/plot_metrics.py fkd=runs/a ce=runs/b --key val_top1 --key train_top1
    python tests/benchmarks/plot_metrics.py fkd=runs/s0 fkd=runs/s1 ce=runs/c0 ce=runs/c1 -o cmp.png

Each argument is a run folder or a metrics.jsonl file, optionally named `LABEL=PATH`; runs that
share a label are drawn as their mean with a min-max band (seeds of one configuration). One panel
per `--key`. tests/benchmarks/evidence.py draws its figure with the same functions.
"""
import argparse
import json
import os
import statistics

MEAN_LINE, BAND_ALPHA = 1.8, 0.18


def metrics_path(path):
    return os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path


def read_metrics(path):
    """The records of a run's metrics.jsonl (a folder or the file), one per epoch, in epoch order.

    A later line for the same epoch replaces an earlier one (a resumed run appends again).
    """
    by_epoch = {}
    with open(metrics_path(path)) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                by_epoch[record["epoch"]] = record
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def curve(records, key):
    """(epochs, values) of `key` over the records that have it."""
    points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
    return [e for e, _ in points], [v for _, v in points]


def band(curves):
    """Mean, min and max over several (epochs, values) curves, at the epochs all of them reach."""
    common = sorted(set.intersection(*(set(epochs) for epochs, _ in curves))) if curves else []
    columns = [[dict(zip(*c))[epoch] for c in curves] for epoch in common]
    return (common, [statistics.mean(col) for col in columns], [min(col) for col in columns],
            [max(col) for col in columns])


def draw(ax, curves, label, color=None, style="-"):
    """One configuration on `ax`: its mean curve and, over several runs, the min-max band."""
    epochs, mean, low, high = band(curves)
    if not epochs:
        return
    suffix = f" ({len(curves)} runs)" if len(curves) > 1 else ""
    line, = ax.plot(epochs, mean, style, color=color, lw=MEAN_LINE, label=label + suffix,
                    marker="." if len(epochs) < 40 else None)
    if len(curves) > 1:
        ax.fill_between(epochs, low, high, color=line.get_color(), alpha=BAND_ALPHA, lw=0)


def new_figure(columns, width=5.2, height=3.8, rows=1):
    """A figure of rows x columns panels; returns (figure, the axes in reading order)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows),
                                squeeze=False)
    return figure, [ax for row in axes for ax in row]


def save(figure, path, dpi=100):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    import matplotlib.pyplot as plt
    plt.close(figure)


def parse_run(arg):
    label, sep, path = arg.partition("=")
    if not sep or os.path.exists(arg):
        label, path = os.path.basename(os.path.normpath(arg)) or arg, arg
    return label, path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run folder or metrics.jsonl, optionally LABEL=PATH")
    p.add_argument("--key", action="append", help="metric to plot, repeatable (default val_top1)")
    p.add_argument("-o", "--out", default="metrics.png", help="PNG to write")
    args = p.parse_args(argv)
    keys = args.key or ["val_top1"]
    groups = {}
    for arg in args.runs:
        label, path = parse_run(arg)
        if not os.path.isfile(metrics_path(path)):
            raise SystemExit(f"error: {metrics_path(path)} does not exist; pass a run folder (the "
                             f"--out of a method file) or its metrics.jsonl")
        groups.setdefault(label, []).append(read_metrics(path))
    figure, axes = new_figure(len(keys))
    for ax, key in zip(axes, keys):
        for label, runs in groups.items():
            curves = [c for c in (curve(records, key) for records in runs) if c[0]]
            if not curves:
                print(f"note: no '{key}' in the metrics of {label}")
            draw(ax, curves, label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    save(figure, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
