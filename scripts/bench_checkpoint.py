#!/usr/bin/env python
"""What a trial's per-epoch checkpoint costs, next to the epoch it follows.

    PYTHONPATH=. python scripts/bench_checkpoint.py [--epochs 3] [--cifar-train 2000]

Runs trials of ``studies/mnist_dense.py`` (the whole of MNIST's training split, as the study
has it) and of ``studies/cifar_vgg.py`` (cached features; ``CIFAR_VGG_WEIGHTS=none``: a fixed
random VGG16, no download) in ``--repeats`` interleaved pairs: without a checkpoint, then
with one.  It times what each checkpoint costs the
training thread (``training.Checkpointer.save``: waiting for the previous file, copying the
variables; the file is written, fsynced and renamed in a thread meanwhile) and prints, per
configuration, the mean epoch time without and with checkpoints (``epoch_s``: training and
validation; the second includes the writing thread's competition for the CPU), the mean
checkpoint time, its ratio to the epoch (target: under 5%), how much longer the epoch is
with checkpoints (``epoch +%``: all they cost, the writing thread's CPU too, and the noise
of the machine), and the checkpoint's size; each a median over the pairs.  The
first epoch (tracing) is left out of the means.  Prints
``uptime`` first: on a shared machine the figures move with the load.
"""

from __future__ import annotations

import argparse
import os
import runpy
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _epochs(study: Any, params: dict[str, Any], epochs: int, data: Any, folder: Any) -> Any:
    from searchlab.training import TrialSpec, run_trial

    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        spec = TrialSpec(
            build=study.model,
            data=data,
            epochs=epochs,
            objective=study.objective,
            direction=study.goal,
            batch_size=study.batch_size,
            checkpoint=folder,
        )
        result = run_trial(0, params, spec, Path(tmp) / "work")
    assert result.error is None, result.error
    return result


def _mean(values: list[float]) -> float:
    values = values[1:] or values  # the first epoch traces
    return sum(values) / len(values)


def _bench(
    name: str, study: Any, params: dict[str, Any], epochs: int, data: Any, repeats: int
) -> dict:
    """``repeats`` pairs of trials, without and with checkpoints, interleaved (so a change of
    the machine's load falls on both alike); medians over the pairs."""
    from searchlab import training as trial_mod

    plain_s: list[float] = []
    epoch_s: list[float] = []
    ckpt_s: list[float] = []
    size = 0.0
    save = trial_mod.Checkpointer.save
    for _ in range(repeats):
        plain_s.append(_mean(_epochs(study, params, epochs, data, None).history["epoch_s"]))
        times: list[float] = []

        def timed(
            self: Any, monitor: Any, epoch: int, improved: bool, times: list[float] = times
        ) -> None:
            started = time.perf_counter()
            save(self, monitor, epoch, improved)
            times.append(time.perf_counter() - started)

        trial_mod.Checkpointer.save = timed  # type: ignore[method-assign]
        try:
            with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
                folder = Path(tmp) / "ckpt"
                result = _epochs(study, params, epochs, data, folder)
                size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
        finally:
            trial_mod.Checkpointer.save = save  # type: ignore[method-assign]
        epoch_s.append(_mean(result.history["epoch_s"]))
        ckpt_s.append(_mean(times))
    plain, with_ckpt, ckpt = map(statistics.median, (plain_s, epoch_s, ckpt_s))
    return {
        "name": name,
        "plain_s": plain,
        "epoch_s": with_ckpt,
        "ckpt_s": ckpt,
        "ratio": ckpt / with_ckpt,
        "overhead": (with_ckpt - plain) / plain,
        "mb": size,
        "cache": result.tags.get("searchlab.cache", "-"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cifar-train", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3, help="pairs of trials per row")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ["CIFAR_VGG_WEIGHTS"] = "none"
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())

    from searchlab.data import Dataset, load

    rows = []
    mnist = runpy.run_path(str(REPO / "studies" / "mnist_dense.py"))["study"]
    data = load(mnist.dataset)
    for params in (
        {"layers": 2, "units": 256, "dropout": 0.3, "learning_rate": 1e-3, "batch_size": 128},
        {"layers": 1, "units": 64, "dropout": 0.0, "learning_rate": 1e-3, "batch_size": 256},
    ):
        label = f"mnist-dense {params['layers']}x{params['units']} batch {params['batch_size']}"
        rows.append(_bench(label, mnist, params, args.epochs, data, args.repeats))

    cifar = runpy.run_path(str(REPO / "studies" / "cifar_vgg.py"))["study"]
    data = load(
        Dataset(
            "cifar10",
            validation="test",
            scale=False,
            subset={"train": args.cifar_train, "val": args.cifar_train // 4},
        )
    )
    for frozen in (18, 14):  # the head only; block5 and the head (7.1M parameters)
        params = {
            "frozen_layers": frozen,
            "head_width": 256,
            "dropout": 0.3,
            "learning_rate": 1e-3,
            "batch_size": 64,
        }
        label = f"cifar-vgg16 cached, frozen_layers={frozen}, {args.cifar_train} images"
        rows.append(_bench(label, cifar, params, args.epochs, data, args.repeats))

    print(
        f"{'trial':58} {'epoch s':>8} {'w/ ckpt':>8} {'ckpt s':>8} {'ckpt %':>7} "
        f"{'epoch +%':>8} {'MB':>7}  cache"
    )
    for r in rows:
        print(
            f"{r['name']:58} {r['plain_s']:8.3f} {r['epoch_s']:8.3f} {r['ckpt_s']:8.4f} "
            f"{100 * r['ratio']:6.2f}% {100 * r['overhead']:7.1f}% {r['mb']:7.1f}  {r['cache']}"
        )
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
