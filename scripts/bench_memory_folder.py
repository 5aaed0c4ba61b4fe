#!/usr/bin/env python
"""Peak memory of a cached transfer search over an image folder larger than the memory bound.

    PYTHONPATH=. python scripts/bench_memory_folder.py [--bound-mb 300] [--factor 3.5]
        [--size 160] [--trials 4] [--epochs 2] [--compare]

Writes a class-per-subfolder folder of JPEGs from the CIFAR subset in the data directory
(``$SEARCHLAB_DATA_DIR``), upsampled to --size pixels, with enough images that their decoded
float32 size is --factor times the bound.  Then, in a fresh process, runs a cached transfer
search over it in-process (``Transfer("mobilenet_v2", weights=None)`` and a head; the head's
width, learning rate and batch size searched) with ``Dataset(directory=..., memory_mb=BOUND)``:
the images stream from disk and the feature cache computes the backbone's outputs by reading
them once into memory-mapped files.  The baseline is the peak RSS (``ru_maxrss``) of the same
search, in a fresh process too, over a small folder of the same kind (--baseline-images
images) streamed with a bound of 0: what the process costs apart from holding the data (Keras and
TensorFlow, the backbone, traced steps, MLflow).  Prints both peaks and whether the large
folder's peak stayed under baseline + bound.  ``--compare`` also runs the large folder with
the bound raised above its decoded size (everything in memory), for contrast.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def rss_mb() -> tuple[float, float]:
    """(peak RSS, current RSS) of this process in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return peak, current


def write_folder(root: Path, n: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    data_dir = Path(os.environ.get("SEARCHLAB_DATA_DIR", "../shared/data"))
    with np.load(data_dir / "cifar10_subset_small.npz") as f:
        x, y = f["x_train"], f["y_train"]
    for name in NAMES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = Image.fromarray(x[i % len(x)]).resize((size, size), Image.BILINEAR)
        image.save(root / NAMES[int(y[i % len(y)])] / f"{i:05d}.jpg", quality=90)


def child(args: argparse.Namespace) -> None:
    """The search, in this process: prints one JSON line of figures."""
    import keras  # noqa: F401 - part of the baseline, as in any search

    from searchlab import Choice, Dataset, Float, Study, engines, runner
    from searchlab.engines import NullListener
    from searchlab.models import Transfer
    from searchlab.tracking import MlflowTracker

    _, baseline = rss_mb()
    home = Path(args.home)
    os.environ["SEARCHLAB_HOME"] = str(home)
    study = Study(
        name="bench-memory-folder",
        space={
            "head_width": Choice([64, 128]),
            "learning_rate": Float(1e-4, 1e-2, log=True),
            "batch_size": Choice([32, 64]),
        },
        model=Transfer("mobilenet_v2", weights=None, pooling="avg"),
        data=Dataset(
            directory=args.child,
            image_size=(args.size, args.size),
            validation=0.2,
            scale=False,
            memory_mb=args.bound_mb,
        ),
        strategy="random",
        trials=args.trials,
        epochs=args.epochs,
    )
    values: list[float] = []
    tags: list[str] = []

    class Listener(NullListener):
        def trial_finished(self, result, best) -> None:  # noqa: ANN001 - protocol signature
            values.append(result.value)
            tags.append(f"{result.tags.get('searchlab.cache_phases')}")

    options = engines.RunOptions(
        strategy="random",
        trials=args.trials,
        timeout=None,
        epochs=args.epochs,
        seed=0,
        storage=f"sqlite:///{home / 'optuna.db'}",
    )
    tracker = MlflowTracker(f"sqlite:///{home / 'mlflow.db'}", home / "mlartifacts")
    started = time.perf_counter()
    runner.run(study, options, tracker, Listener())
    peak, current = rss_mb()
    print(
        json.dumps(
            {
                "baseline_mb": baseline,
                "peak_mb": peak,
                "end_mb": current,
                "seconds": time.perf_counter() - started,
                "values": values,
                "cache": tags,
                "data_cache_mb": sum(p.stat().st_size for p in (home / "data-cache").glob("*"))
                / 2**20
                if (home / "data-cache").is_dir()
                else 0.0,
                "feature_cache_files": sorted(
                    p.name.split(".", 1)[1] for p in (home / "feature-cache").glob("*.np*")
                ),
            }
        )
    )


def run(args: argparse.Namespace, folder: Path, bound: int) -> dict:
    home = tempfile.mkdtemp(prefix="bench-folder-home-")
    cmd = [sys.executable, __file__, "--child", str(folder), "--home", home]
    cmd += ["--bound-mb", str(bound), "--size", str(args.size)]
    cmd += ["--trials", str(args.trials), "--epochs", str(args.epochs)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        shutil.rmtree(home, ignore_errors=True)  # its decoded images and features
    if done.returncode != 0:
        sys.exit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--bound-mb", type=int, default=300)
    parser.add_argument("--factor", type=float, default=3.5)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--baseline-images", type=int, default=400)
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--home", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    per_image = args.size * args.size * 3 * 4
    n = math.ceil(args.factor * args.bound_mb * 2**20 / per_image)
    base = Path(tempfile.mkdtemp(prefix="bench-folder-"))
    folder, small = base / "photos", base / "small"
    started = time.perf_counter()
    write_folder(folder, n, args.size)
    write_folder(small, args.baseline_images, args.size)
    on_disk = sum(p.stat().st_size for p in folder.rglob("*.jpg")) / 2**20
    decoded = n * per_image / 2**20
    print(
        f"folder: {n} JPEGs {args.size}x{args.size} ({on_disk:.0f} MB on disk), decoded "
        f"float32 {decoded:.0f} MB = {decoded / args.bound_mb:.1f} x the bound "
        f"({time.perf_counter() - started:.0f} s to write); baseline folder: "
        f"{args.baseline_images} images ({args.baseline_images * per_image / 2**20:.0f} MB decoded)"
    )
    try:
        rows = [
            ("baseline", 0, run(args, small, 0)),  # streamed too: no data held in memory
            ("streamed", args.bound_mb, run(args, folder, args.bound_mb)),
        ]
        if args.compare:
            rows.append(("in memory", int(decoded * 2), run(args, folder, int(decoded * 2))))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"{'run':<10} {'bound MB':>9} {'imports':>8} {'peak MB':>8} {'s':>6}")
    for mode, bound, r in rows:
        print(
            f"{mode:<10} {bound:>9} {r['baseline_mb']:>8.0f} {r['peak_mb']:>8.0f} "
            f"{r['seconds']:>6.0f}"
        )
    baseline = rows[0][2]["peak_mb"]
    s = rows[1][2]
    under = s["peak_mb"] <= baseline + args.bound_mb
    print(
        f"streamed: peak {s['peak_mb']:.0f} MB {'<=' if under else '>'} baseline "
        f"{baseline:.0f} + bound {args.bound_mb} = {baseline + args.bound_mb:.0f} MB "
        f"(the data added {s['peak_mb'] - baseline:.0f} MB)"
    )
    print(f"streamed trial values: {s['values']}")
    print(f"streamed cache per trial: {s['cache']}; decoded file {s['data_cache_mb']:.0f} MB")
    print(f"feature cache files: {s['feature_cache_files']}")
    if args.compare:
        print(f"in-memory trial values: {rows[2][2]['values']}")


if __name__ == "__main__":
    main()
