"""Val loss against wall time and against steps, for several train.py runs in one figure.

    python docs/optimizer_curves.py --out docs/muon_vs_adamw.png adamw=out/small-adamw muon=out/small-muon

Each LABEL=OUT_DIR is a run's out_dir; its log.jsonl gives the val losses (one per eval) and the
wall time (`elapsed_sec` of the log record at the same step; step 0 is at 0 s). Give the runs the
same log_interval and eval_interval, with every eval on a logged step. Prints the points as a
table too (the plot leaves out step 0, whose loss would squash the rest). Needs matplotlib (pip install -e ".[plot]").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import atomic  # noqa: E402
from errors import ConfigError, exit_status  # noqa: E402
from run_dir import read_log  # noqa: E402


def curve(out_dir: Path) -> list[tuple[int, float, float]]:
    """(step, seconds, val_loss) for every eval of the run in out_dir."""
    log = out_dir / "log.jsonl"
    if not log.is_file():
        raise ConfigError(f"{log} does not exist: give the out_dir of a train.py run")
    records = read_log(log)
    seconds = {0: 0.0} | {r["step"]: r["elapsed_sec"] for r in records if "elapsed_sec" in r}
    points = []
    for r in records:
        if "val_loss" in r:
            if r["step"] not in seconds:
                raise ConfigError(f"{log}: the eval at step {r['step']} has no log record at that step "
                                  f"(make eval_interval a multiple of log_interval)")
            points.append((r["step"], seconds[r["step"]], r["val_loss"]))
    return points


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="val loss vs wall time and vs steps, several runs in one plot")
    parser.add_argument("runs", nargs="+", metavar="LABEL=OUT_DIR")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--title", default="", help="a title for the figure")
    args = parser.parse_args(argv)
    curves = {}
    for run in args.runs:
        label, sep, out_dir = run.partition("=")
        if not sep:
            raise ConfigError(f"expected LABEL=OUT_DIR, got {run!r}")
        curves[label] = curve(Path(out_dir))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_step) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for label, points in curves.items():
        steps, seconds, losses = zip(*[p for p in points if p[0] > 0])  # step 0 (ln 50257 or so) would squash the rest
        by_time.plot([s / 60 for s in seconds], losses, "o-", label=label)
        by_step.plot(steps, losses, "o-", label=label)
        print(f"{label}: " + ", ".join(f"step {st} ({se:.0f} s) {lo:.3f}" for st, se, lo in points))
    by_time.set_xlabel("wall time (minutes)")
    by_step.set_xlabel("step")
    by_time.set_ylabel("val loss (nats/token)")
    for ax in (by_time, by_step):
        ax.grid(alpha=0.3)
        ax.legend()
    if args.title:
        fig.suptitle(args.title, fontsize=10)
    fig.tight_layout()
    with atomic.atomic_path(Path(args.out)) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(exit_status(main))
