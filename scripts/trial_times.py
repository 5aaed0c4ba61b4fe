"""Per-trial times of a study, read from its MLflow runs: one row per trial and a summary.

    python scripts/trial_times.py mnist-dense [--tracking-uri URI] [--label cpu-jax-float32]

Each trial compiles its own model in its first epoch (XLA under JAX, tf.function under
TensorFlow), so the summary gives first epochs apart from the later ones (``epoch_s``, the
per-epoch wall time every trial logs).
"""

from __future__ import annotations

import argparse
import statistics

from searchlab import config
from searchlab.tracking import MlflowTracker, client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", help="the study's name (its MLflow experiment)")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--label", default="", help="a label printed on every line")
    args = parser.parse_args()
    tracker = MlflowTracker(args.tracking_uri or config.default_tracking_uri())
    rows = []
    for run in tracker.runs(args.study):
        tags, metrics = run.tags, run.metrics
        if "searchlab.trial" not in tags or "fit_s" not in metrics:
            continue
        epochs = max(metrics.get("epochs_run", 1.0), 1.0)
        history = client(tracker.uri).get_metric_history(run.run_id, "epoch_s")
        epoch_s = [m.value for m in sorted(history, key=lambda m: m.step)]
        rows.append(
            {
                "trial": int(tags["searchlab.trial"]),
                "state": tags.get("searchlab.state", "?"),
                "backend": tags.get("searchlab.backend", "?"),
                "device": tags.get("searchlab.device_name") or tags.get("searchlab.device", "?"),
                "precision": tags.get("searchlab.precision")
                or run.data.params.get("searchlab.precision", "?"),
                "fit_s": metrics["fit_s"],
                "s_per_epoch": metrics["fit_s"] / epochs,
                "first_epoch_s": epoch_s[0] if epoch_s else float("nan"),
                "later_epoch_s": epoch_s[1:],
                "epochs": int(epochs),
                "objective": metrics.get("objective", float("nan")),
            }
        )
    rows.sort(key=lambda r: r["trial"])
    if not rows:
        raise SystemExit(f"no trial runs of {args.study!r} in {tracker.uri}")
    print(
        f"{'label':<22} {'trial':>5} {'backend':<10} {'precision':<15} {'fit_s':>7} "
        f"{'epoch1_s':>8} {'later_s':>7} {'objective':>9}  device"
    )
    for r in rows:
        later = statistics.median(r["later_epoch_s"]) if r["later_epoch_s"] else float("nan")
        print(
            f"{args.label:<22} {r['trial']:>5} {r['backend']:<10} {r['precision']:<15} "
            f"{r['fit_s']:>7.2f} {r['first_epoch_s']:>8.2f} {later:>7.2f} "
            f"{r['objective']:>9.4f}  {r['device']}"
        )
    later_all = [v for r in rows for v in r["later_epoch_s"]]
    later_text = f"{statistics.median(later_all):.2f}s" if later_all else "n/a"
    print(
        f"SUMMARY {args.label}: {len(rows)} trials, median fit {statistics.median(r['fit_s'] for r in rows):.2f}s "
        f"per trial, median first epoch {statistics.median(r['first_epoch_s'] for r in rows):.2f}s "
        f"(includes compiling), median later epoch {later_text}, "
        f"total fit {sum(r['fit_s'] for r in rows):.1f}s"
    )


if __name__ == "__main__":
    main()
