"""Users' own data: image folders, tf.data and PyDataset loaders, inputs that stream from
disk (larger than the memory bound), and the folder study end to end."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from searchlab import config
from searchlab.data import Dataset, DiskArray, batches, forget, in_validation, load
from searchlab.errors import DataError, StudyDefinitionError
from searchlab.study import Study
from tests.conftest import REPO, STUDIES, mlflow_runs

FOLDER_STUDY = STUDIES / "folder_transfer.py"
NAMES = ("airplane", "automobile", "bird", "cat")


@pytest.fixture(scope="module")
def cifar(data_dir: Path) -> dict[str, np.ndarray]:
    path = data_dir / "cifar10_subset_small.npz"
    if not path.is_file():
        pytest.skip("no cifar10_subset_small.npz in the data directory")
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def write_folder(root: Path, cifar: dict, per_class: int = 40, classes: int = 4) -> Path:
    """A class-per-subfolder image folder from the CIFAR subset: PNG and JPEG (and one BMP,
    one GIF per class)."""
    formats = ("png", "jpeg", "png", "jpeg", "bmp", "gif")
    for c in range(classes):
        folder = root / NAMES[c]
        folder.mkdir(parents=True)
        rows = np.flatnonzero(cifar["y_train"] == c)[:per_class]
        for k, i in enumerate(rows):
            fmt = formats[k % len(formats)] if k < len(formats) else ("png", "jpeg")[k % 2]
            ext = {"jpeg": "jpg"}.get(fmt, fmt)
            keras.utils.save_img(folder / f"{k:03d}.{ext}", cifar["x_train"][i], file_format=fmt)
    return root


@pytest.fixture
def photos(project: Path, cifar: dict) -> Path:
    forget()
    yield write_folder(project / "photos", cifar)
    forget()


def folder_data(photos: Path, **kwargs):
    forget()
    args = {"directory": str(photos), "image_size": (32, 32), "validation": 0.2, **kwargs}
    return load(Dataset(**args))


# -- image folders ------------------------------------------------------------------------


def test_a_folder_gives_class_names_labels_and_every_format(photos: Path) -> None:
    data = folder_data(photos)
    assert data.class_names == NAMES
    assert len(data.x_train) + len(data.x_val) == 4 * 40  # png, jpeg, bmp and gif all read
    assert data.x_train.shape[1:] == (32, 32, 3) and data.x_train.dtype == np.float32
    assert data.num_classes == 4 and set(np.unique(data.y_train)) == {0, 1, 2, 3}
    # the first PNG of class "bird" decodes to the CIFAR image it was written from
    first = keras.utils.img_to_array(keras.utils.load_img(photos / "bird" / "000.png")) / 255.0
    hits = [i for i in range(len(data.x_train)) if np.array_equal(data.x_train[i], first)]
    hits += [-1 - i for i in range(len(data.x_val)) if np.array_equal(data.x_val[i], first)]
    assert len(hits) == 1
    label = data.y_train[hits[0]] if hits[0] >= 0 else data.y_val[-1 - hits[0]]
    assert NAMES[label] == "bird"


def test_label_and_color_modes(photos: Path) -> None:
    onehot = folder_data(photos, label_mode="categorical", color_mode="grayscale")
    assert onehot.x_train.shape[1:] == (32, 32, 1)
    assert onehot.y_train.shape == (len(onehot.x_train), 4)
    assert set(onehot.y_train.sum(axis=1)) == {1.0}
    ids = folder_data(photos, image_size=(20, 24))
    assert ids.x_train.shape[1:] == (20, 24, 3)
    assert np.array_equal(onehot.y_train.argmax(1), ids.y_train)


def _val_files(photos: Path, seed: int = 0) -> list[str]:
    files = sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*.*"))
    return [f for f in files if in_validation(f, 0.2, seed)]


def test_the_split_is_the_same_on_every_run_and_worker(photos: Path) -> None:
    held = _val_files(photos)
    assert 0.1 < len(held) / 160 < 0.3
    a, b = folder_data(photos), folder_data(photos)  # two runs (the per-process cache dropped)
    assert np.array_equal(a.x_val, b.x_val) and np.array_equal(a.y_val, b.y_val)
    assert len(a.x_val) == len(held)
    # another worker: another process, another hash seed, files listed in another order
    # (_val_files's lines, without this module's Keras import: the process starts in 1 s)
    code = (
        "import sys; from pathlib import Path; from searchlab.data import in_validation;"
        "root = Path(sys.argv[1]);"
        "files = sorted(p.relative_to(root).as_posix() for p in root.rglob('*.*'));"
        "print('\\n'.join(f for f in files if in_validation(f, 0.2, 0)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": str(REPO)}
    other = subprocess.run(
        [sys.executable, "-c", code, str(photos)], env=env, capture_output=True, text=True
    )
    assert other.returncode == 0, other.stderr
    assert other.stdout.split() == held
    # adding files moves none of the others; another seed picks other files
    keras.utils.save_img(photos / "cat" / "new.png", np.zeros((32, 32, 3), "uint8"))
    assert set(held) <= set(_val_files(photos))
    assert _val_files(photos, seed=1) != held


def test_a_separate_validation_folder(photos: Path, cifar: dict, project: Path) -> None:
    val = write_folder(project / "val", cifar, per_class=5, classes=3)  # a class missing
    data = folder_data(photos, validation="test", validation_directory=str(val))
    assert len(data.x_train) == 160 and len(data.x_val) == 15
    assert data.class_names == NAMES and set(data.y_val) == {0, 1, 2}


def test_a_corrupt_image_is_skipped_with_one_warning_line(photos: Path, caplog) -> None:
    (photos / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (photos / "cat" / "empty.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="searchlab.data"):
        data = folder_data(photos)
    assert len(data.x_train) + len(data.x_val) == 160
    lines = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(lines) <= 2 and all("\n" not in line for line in lines)  # one per split
    assert sum(int(line.split("skipped ")[1].split()[0]) for line in lines) == 2
    assert any("cat/broken.jpg" in line or "cat/empty.png" in line for line in lines)


def test_an_empty_class_folder_and_other_mistakes_are_one_line(photos: Path) -> None:
    (photos / "dog").mkdir()
    with pytest.raises(DataError, match=r"Class folder .*dog holds no images") as exc:
        folder_data(photos)
    assert "\n" not in str(exc.value)
    with pytest.raises(StudyDefinitionError, match="validation=0.2"):
        Study(name="x", space={}, model=lambda p: None, data=Dataset(directory="photos"))
    with pytest.raises(StudyDefinitionError, match=r"is a folder.*Dataset\(directory="):
        Study(name="x", space={}, model=lambda p: None, data="photos")
    with pytest.raises(DataError, match="not found"):
        folder_data(photos.parent / "nope")
    with pytest.raises(DataError, match="label_mode"):
        Dataset(directory="photos", validation=0.2, label_mode="binary").check()


# -- loaders returning datasets -----------------------------------------------------------


def _arrays(cifar: dict, n: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    return cifar[f"x_{split}"][:n], cifar[f"y_{split}"][:n].astype("int32")


def test_a_loader_may_return_a_batched_tf_data_pair(project: Path, cifar: dict) -> None:
    import tensorflow as tf  # the user's own pipeline

    (x, y), (xv, yv) = _arrays(cifar, 100), _arrays(cifar, 30, "test")

    def loader():
        train = tf.data.Dataset.from_tensor_slices((x, y)).batch(7)  # batched: unbatched
        val = tf.data.Dataset.from_tensor_slices((xv, yv))  # unbatched
        return train, val

    data = load(Dataset(loader=loader))
    assert np.allclose(data.x_train, x / 255.0) and np.array_equal(data.y_train, y)
    assert np.allclose(data.x_val, xv / 255.0) and np.array_equal(data.y_val, yv)
    assert data.num_classes == 10


def test_a_loader_may_return_one_pydataset_split_by_fraction(project: Path, cifar: dict) -> None:
    x, y = _arrays(cifar, 90)

    class Seq(keras.utils.PyDataset):
        def __len__(self) -> int:
            return 9

        def __getitem__(self, i: int):
            return x[i * 10 : (i + 1) * 10], y[i * 10 : (i + 1) * 10]

    data = load(Dataset(loader=Seq, validation=0.2))
    assert len(data.x_train) == 72 and len(data.x_val) == 18
    assert np.array_equal(data.y_val, y[72:])
    with pytest.raises(DataError, match="returns one dataset"):
        load(Dataset(loader=Seq))


def test_a_pydataset_pair_and_its_bad_elements(project: Path, cifar: dict) -> None:
    x, y = _arrays(cifar, 40)

    class Seq(keras.utils.PyDataset):
        def __init__(self, triple: bool = False) -> None:
            super().__init__()
            self.triple = triple

        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int):
            rows = slice(i * 10, (i + 1) * 10)
            return (x[rows], y[rows], y[rows]) if self.triple else (x[rows], y[rows])

    data = load(Dataset(loader=lambda: (Seq(), Seq())))
    assert len(data.x_train) == len(data.x_val) == 40
    with pytest.raises(DataError, match=r"\(inputs, labels\) pairs"):
        load(Dataset(loader=lambda: (Seq(True), Seq())))


def test_numpy_loaders_still_work(project: Path, cifar: dict) -> None:
    (x, y), (xv, yv) = _arrays(cifar, 50), _arrays(cifar, 20, "test")
    data = load(Dataset(loader=lambda: (x, y, xv, yv)))
    assert not data.streamed and data.num_classes == 10
    assert data.x_train.dtype == np.float32 and data.x_train.shape == x.shape
    np.testing.assert_array_equal(data.x_train, x.astype("float32") / 255.0)  # uint8 scaled
    np.testing.assert_array_equal(data.x_val, xv.astype("float32") / 255.0)
    np.testing.assert_array_equal(data.y_train, y)  # labels as the loader gave them, in order
    np.testing.assert_array_equal(data.y_val, yv)


# -- larger than memory -------------------------------------------------------------------


def test_inputs_above_the_bound_stream_from_disk_with_the_same_values(photos: Path) -> None:
    memory = folder_data(photos)
    disk = folder_data(photos, memory_mb=0)
    assert not memory.streamed and disk.streamed and isinstance(disk.x_train, DiskArray)
    assert disk.x_train.shape == memory.x_train.shape
    assert np.array_equal(disk.x_train[:], memory.x_train)
    rows = np.array([5, 1, 2, 3, 40])
    assert np.array_equal(disk.x_train[rows], memory.x_train[rows])
    assert np.array_equal(disk.y_val, memory.y_val)
    files = list(config.data_cache_dir().glob("*.u8"))
    assert len(files) == 2  # train and validation, decoded once, reused by the next load
    again = folder_data(photos, memory_mb=0)
    # the data's digests do not depend on the bound (a resumed study is the same study) ...
    assert again.fingerprint == disk.fingerprint == memory.fingerprint
    assert disk.digest("val") == memory.digest("val") != memory.digest("train")
    # nor on where the folder is or its files' times (another machine's copy)
    import shutil

    copy = shutil.copytree(photos, photos.parent / "copy", copy_function=shutil.copy)
    assert folder_data(copy).fingerprint == memory.fingerprint
    # ... but on the files and how they are read
    assert folder_data(photos, scale=False).fingerprint != memory.fingerprint
    keras.utils.save_img(photos / "cat" / "000.png", np.zeros((32, 32, 3), "uint8"))
    assert folder_data(photos).fingerprint != memory.fingerprint
    with pytest.raises(DataError, match="stream from disk"):
        np.asarray(disk.x_train)


def test_a_loader_larger_than_the_bound_spills_to_disk(project: Path, cifar: dict) -> None:
    x, y = _arrays(cifar, 64)

    class Seq(keras.utils.PyDataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int):
            return x[i * 8 : (i + 1) * 8], y[i * 8 : (i + 1) * 8]

    data = load(Dataset(loader=Seq, validation=0.25, memory_mb=0))
    assert data.streamed and np.allclose(data.x_train[:], x[:48] / 255.0)
    in_memory = load(Dataset(loader=Seq, validation=0.25))
    assert not in_memory.streamed and in_memory.fingerprint == data.fingerprint
    assert load(Dataset(loader=Seq, validation=0.5)).fingerprint != data.fingerprint


def test_batches_cover_every_row_once_per_epoch_in_a_seeded_order(photos: Path) -> None:
    data = folder_data(photos, memory_mb=0)
    seq = batches(data.x_train, data.y_train, 16, shuffle=True, seed=3)
    seen = np.concatenate([seq[i][1] for i in range(len(seq))])
    assert sorted(seen) == sorted(data.y_train)
    first = [seq[i][0] for i in range(2)]
    seq.on_epoch_end()
    assert not np.array_equal(seq[0][0], first[0])  # another order next epoch
    again = batches(data.x_train, data.y_train, 16, shuffle=True, seed=3)
    assert np.array_equal(again[1][0], first[1])


def _run(cli, *args: str) -> None:
    result = cli("run", *args)
    assert result.exit_code == 0, result.output


def _trial_values(experiment: str) -> list[float]:
    runs = mlflow_runs(config.default_tracking_uri(), experiment)
    trials = sorted(
        (r for r in runs if r.data.tags.get("searchlab.role") != "session"),
        key=lambda r: int(r.data.tags["searchlab.trial"]),
    )
    return [r.data.metrics["objective"] for r in trials]


@pytest.fixture
def folder_study(photos: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FOLDER_TRANSFER_DIR", str(photos))
    monkeypatch.setenv("FOLDER_TRANSFER_SIZE", "32")
    monkeypatch.setenv("FOLDER_TRANSFER_WEIGHTS", "none")  # no ImageNet weights offline
    return photos


@pytest.mark.slow
def test_in_memory_and_streamed_give_the_same_trial_values(
    folder_study: Path, cli, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = (FOLDER_STUDY, "--trials", "3", "--epochs", "2", "--strategy", "random")
    monkeypatch.setenv("SEARCHLAB_DATA_MEMORY_MB", "2048")
    _run(cli, *args)
    in_memory = _trial_values("folder-transfer")
    monkeypatch.setenv("SEARCHLAB_HOME", str(project / "streamed"))  # other stores, no cache
    monkeypatch.setenv("SEARCHLAB_DATA_MEMORY_MB", "0")
    forget()
    _run(cli, *args)
    assert list((project / "streamed" / "data-cache").glob("*.u8"))  # it did stream
    features = list((project / "streamed" / "feature-cache").glob("*.npy"))
    assert features  # and the cache kept the prefix's outputs memory-mapped on disk
    streamed = _trial_values("folder-transfer")
    assert len(streamed) == len(in_memory) == 3
    assert streamed == pytest.approx(in_memory, abs=1e-5)


@pytest.mark.slow
def test_the_folder_study_runs_and_exports_a_model_with_its_class_names(
    folder_study: Path, cli, project: Path
) -> None:
    _run(cli, FOLDER_STUDY, "--trials", "2", "--epochs", "1", "--strategy", "random")
    runs = mlflow_runs(config.default_tracking_uri(), "folder-transfer")
    parent = [r for r in runs if r.data.tags.get("searchlab.role") == "session"]
    trials = [r for r in runs if r.data.tags.get("searchlab.role") != "session"]
    assert len(parent) == 1 and len(trials) == 2
    assert json.loads(parent[0].data.tags["searchlab.class_names"]) == list(NAMES)
    assert json.loads(parent[0].data.params["class_names"]) == list(NAMES)
    assert all(r.info.status == "FINISHED" for r in trials)
    assert all(r.data.tags["searchlab.cache"] == "used" for r in trials)

    result = cli("export", FOLDER_STUDY, "-o", project / "best.h5")
    assert result.exit_code == 0, result.output
    names = json.loads((project / "best.class_names.json").read_text())
    assert names == list(NAMES)
    model = keras.models.load_model(project / "best.h5")
    data = folder_data(folder_study, scale=False)
    predicted = model.predict(data.x_val, verbose=0).argmax(1)
    best = max(r.data.metrics["objective"] for r in trials)
    assert float(np.mean(predicted == data.y_val)) == pytest.approx(best, abs=1e-6)
    # the ids map to the folder's names: the images of folder "bird" are labelled "bird"
    assert {names[i] for i in data.y_val} <= set(NAMES)
    # the best model, an MLflow Model, carries them too (and a registered version with it)
    from searchlab.tracking import client

    c = client(config.default_tracking_uri())
    (logged,) = c.search_logged_models(experiment_ids=[parent[0].info.experiment_id])
    assert json.loads(logged.tags["searchlab.class_names"]) == list(NAMES)


@pytest.mark.slow
def test_a_streamed_folder_and_a_pydataset_loader_under_jax(photos: Path, project: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("jax") is None:
        pytest.skip("JAX is not installed")
    study = project / "dense_folder.py"
    study.write_text(
        "import keras\n"
        "from searchlab import Study, Dataset, Int\n"
        "def build(params, info):\n"
        "    m = keras.Sequential([keras.Input(info.input_shape), keras.layers.Flatten(),\n"
        "        keras.layers.Dense(params['units'], activation='relu'),\n"
        "        keras.layers.Dense(info.num_classes, activation='softmax')])\n"
        "    m.compile('adam', 'sparse_categorical_crossentropy', metrics=['accuracy'])\n"
        "    return m\n"
        f"study = Study(name='dense-folder', space={{'units': Int(8, 16)}}, model=build,\n"
        f"    data=Dataset(directory={str(photos)!r}, image_size=(16, 16), validation=0.2,\n"
        "    memory_mb=0), trials=2, epochs=2, strategy='random')\n"
    )
    # and a loader returning the user's own PyDataset pair, under JAX too
    text = study.read_text().replace("dense-folder", "dense-pydataset")
    text = text.split("study = Study(")[0] + (
        "import numpy as np\n"
        "class Seq(keras.utils.PyDataset):\n"
        "    def __init__(self, x, y):\n"
        "        super().__init__()\n"
        "        self.x, self.y = x, y\n"
        "    def __len__(self):\n"
        "        return len(self.x) // 10\n"
        "    def __getitem__(self, i):\n"
        "        return self.x[i * 10:(i + 1) * 10] / 255.0, self.y[i * 10:(i + 1) * 10]\n"
        "def loader():\n"
        f"    f = np.load({str(project / 'cifar.npz')!r})\n"
        "    return Seq(f['x'][:80], f['y'][:80]), Seq(f['x'][80:120], f['y'][80:120])\n"
        "study = Study(name='dense-pydataset', space={'units': Int(8, 16)}, model=build,\n"
        "    data=Dataset(loader=loader), trials=2, epochs=2, strategy='random')\n"
    )
    from searchlab.data import data_dir

    with np.load(data_dir() / "cifar10_subset_small.npz") as f:
        np.savez(project / "cifar.npz", x=f["x_train"][:120], y=f["y_train"][:120])
    other = project / "dense_pydataset.py"
    other.write_text(text)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": path}
    for file, name in ((study, "dense-folder"), (other, "dense-pydataset")):
        done = subprocess.run(
            [sys.executable, "-m", "searchlab.cli", "run", str(file)],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        runs = mlflow_runs(config.default_tracking_uri(), name)
        trials = [r for r in runs if r.data.tags.get("searchlab.role") != "session"]
        assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
        assert all(r.data.tags["searchlab.backend"] == "jax" for r in trials)
    assert list(config.data_cache_dir().glob("*.u8"))  # the folder streamed


AUGMENTED_STUDY = """
import keras
from searchlab import Study, Dataset, Choice

def build(params, info):
    inputs = keras.Input(info.input_shape)
    x = keras.layers.RandomFlip("horizontal", seed=1)(inputs) if AUGMENT else inputs
    backbone = keras.layers.Conv2D(8, 3, strides=2, name="frozen_conv", trainable=False)
    x = keras.layers.GlobalAveragePooling2D()(backbone(x))
    outputs = keras.layers.Dense(info.num_classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model

study = Study(name=NAME, space={"batch_size": Choice([16])}, model=build,
    data=Dataset(directory=FOLDER, image_size=(32, 32), validation=0.2, memory_mb=MEMORY),
    trials=TRIALS, epochs=2, strategy="random", objective="val_loss")
"""


def _study_text(name: str, photos: Path, *, augment: bool, memory: int, trials: int) -> str:
    text = AUGMENTED_STUDY.replace("AUGMENT", str(augment)).replace("NAME", repr(name))
    text = text.replace("MEMORY", str(memory)).replace("TRIALS", str(trials))
    return text.replace("FOLDER", repr(str(photos)))


@pytest.mark.slow
def test_augmentation_before_a_frozen_prefix_is_not_dropped(photos: Path, cli, project) -> None:
    """A random flip before a frozen layer, on streamed folder images: the trial trains on
    augmented images (not on cached features of unflipped ones), so its value differs from
    the same model without the flip; and its run says the cache was not used."""
    values = {}
    for augment in (True, False):
        name = f"aug-{augment}".lower()
        path = project / f"{name}.py"
        path.write_text(_study_text(name, photos, augment=augment, memory=0, trials=1))
        _run(cli, path)
        runs = mlflow_runs(config.default_tracking_uri(), name)
        (trial,) = [r for r in runs if r.data.tags.get("searchlab.role") != "session"]
        assert trial.info.status == "FINISHED"
        if augment:
            # issue 17 tags this off with a reason; without automatic detection: no tag
            assert trial.data.tags.get("searchlab.cache", "off") == "off"
        values[augment] = trial.data.metrics["objective"]
    assert values[True] != pytest.approx(values[False], abs=1e-6)


@pytest.mark.slow
def test_a_whole_model_trains_alike_on_a_folder_in_memory_and_streamed(
    photos: Path, cli, project: Path
) -> None:
    """Without the cache too: a folder's images go through the same seeded batches whether
    they sit in memory or stream from disk."""
    values = {}
    for memory in (2048, 0):
        name = f"whole-{memory}"
        path = project / f"{name}.py"
        path.write_text(_study_text(name, photos, augment=True, memory=memory, trials=2))
        forget()
        _run(cli, path)
        runs = mlflow_runs(config.default_tracking_uri(), name)
        trials = sorted(
            (r for r in runs if r.data.tags.get("searchlab.role") != "session"),
            key=lambda r: int(r.data.tags["searchlab.trial"]),
        )
        values[memory] = [r.data.metrics["objective"] for r in trials]
    assert len(values[0]) == 2
    assert values[0] == pytest.approx(values[2048], abs=1e-6)
    assert list(config.data_cache_dir().glob("*.u8"))  # the second one streamed
