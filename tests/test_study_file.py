"""Loading study files: every mistake is one StudyDefinitionError naming file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from searchlab import StudyDefinitionError, load_study
from tests.conftest import STUDIES

HEADER = "from searchlab import Study, Int, Float, Choice\n"
BUILD = "def build(params):\n    raise RuntimeError('not called')\n"


def write(tmp_path: Path, body: str, name: str = "study.py") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


def refusal(path: Path) -> str:
    """The message of the one StudyDefinitionError that loading ``path`` raises."""
    with pytest.raises(StudyDefinitionError) as info:
        load_study(path)
    return str(info.value)


def test_the_shipped_mnist_study_loads() -> None:
    study = load_study(STUDIES / "mnist_dense.py")
    assert study.name == "mnist-dense"
    assert set(study.space) == {"layers", "units", "dropout", "learning_rate", "batch_size"}
    assert study.objective == "val_accuracy" and study.direction == "maximize"
    assert study.search_space.grid_size() == 3 * 2 * 2 * 2 * 3


def test_missing_file(tmp_path: Path) -> None:
    assert f"Study file {tmp_path / 'nope.py'} not found" in refusal(tmp_path / "nope.py")


def test_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + "study = Study(\n  name='x',,\n)\n")
    assert refusal(path).startswith(f"{path}, line 3: syntax error")


def test_exception_in_the_file_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + "x = 1\nraise ValueError('boom')\n")
    assert refusal(path).startswith(f"{path}, line 3: ValueError: boom")


def test_file_without_a_study(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + "x = 1\n")
    assert refusal(path).startswith(f"{path} defines no Study")


def test_impossible_space_in_a_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        HEADER
        + BUILD
        + "study = Study(name='s', space={'u': Int(5, 1)}, model=build, data='mnist')\n",
    )
    assert refusal(path).startswith(f"{path}, line 4: Int 'u': low <= high must hold")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ("strategy='annealing'", "Unknown strategy 'annealing'"),
        ("direction='up'", "direction must be 'maximize' or 'minimize'"),
        ("trials=0", "trials must be a positive int"),
        ("data='imagenet'", "Unknown dataset 'imagenet'"),
        ("model=3", "model must be a function"),
    ],
)
def test_bad_study_fields(tmp_path: Path, kwargs: str, message: str) -> None:
    fields = {"name": "'s'", "space": "{'u': Int(1, 2)}", "model": "build", "data": "'mnist'"}
    key, value = kwargs.split("=", 1)
    fields[key] = value
    args = ", ".join(f"{k}={v}" for k, v in fields.items())
    path = write(tmp_path, HEADER + BUILD + f"study = Study({args})\n")
    text = refusal(path)
    assert text.startswith(f"{path}, line 4: ") and message in text, text
