"""The MNIST study end to end under ``KERAS_BACKEND=jax`` (on the CPU), in a subprocess: the
backend is chosen when Keras is first imported, and this test process already runs on another.

JAX is installed by the test setup (the ``dev`` extra); in CI a missing JAX is a failure.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from searchlab import config
from searchlab.tracking import client
from tests.conftest import REPO, STUDIES

pytestmark = pytest.mark.slow
MNIST = STUDIES / "mnist_dense.py"


@pytest.fixture
def jax_env(project: Path) -> dict[str, str]:
    if importlib.util.find_spec("jax") is None:
        if os.environ.get("SEARCHLAB_CI"):
            pytest.fail("JAX must be installed in CI: pip install -e '.[dev]' brings it")
        pytest.skip("JAX is not installed: pip install 'searchlab[jax]'")
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": path}


def searchlab(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "searchlab.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_mnist_study_under_jax_with_mixed_precision(jax_env, project: Path) -> None:
    run = searchlab(
        jax_env,
        project,
        "run",
        MNIST,
        "--trials",
        "2",
        "--epochs",
        "1",
        "--subset",
        "512,128",
        "--precision",
        "mixed_bfloat16",  # whole batches: one compile
    )
    assert "backend jax " in run.stdout and "precision mixed_bfloat16" in run.stdout
    assert "trials: 2 complete, 0 pruned, 0 failed" in run.stdout

    c = client(config.default_tracking_uri())
    exp = c.get_experiment_by_name("mnist-dense")
    runs = c.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert parent.data.tags["searchlab.backend"] == "jax"
    assert parent.data.tags["searchlab.backend_version"] == importlib.metadata.version("jax")
    assert parent.data.params["precision"] == "mixed_bfloat16"
    assert len(children) == 2
    for child in children:
        tags = child.data.tags
        assert child.info.status == "FINISHED"
        assert tags["searchlab.backend"] == "jax"
        assert tags["searchlab.device"] == "cpu:0"  # the CI machine has no GPU
        assert tags["searchlab.precision"] == "mixed_bfloat16"
        assert 0.0 <= child.data.metrics["objective"] <= 1.0

    # export under JAX; the .h5 it writes loads on this process's backend and predicts
    searchlab(jax_env, project, "export", MNIST, "-o", project / "best.h5")
    model = keras.models.load_model(project / "best.h5", compile=False)
    probs = keras.ops.convert_to_numpy(model.predict(np.zeros((2, 28, 28), "float32"), verbose=0))
    assert probs.shape == (2, 10) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-3)


def test_dropout_at_a_rate_in_variables_draws_jax_dropouts_masks(jax_env, tmp_path: Path) -> None:
    """``backend.dropout_at`` (the feature cache's ``RateDropout``) equals JAX's Keras
    dropout bit for bit for the same seed state."""
    code = (
        "import keras, numpy as np\n"
        "from searchlab import backend\n"
        "assert keras.backend.backend() == 'jax'\n"
        "for dtype in ('float32', 'bfloat16'):  # masks drawn in float32 for any inputs\n"
        "  x = keras.ops.cast(keras.random.normal((64, 8), seed=1), dtype)\n"
        "  for rate in (0.1, 0.37, 0.5):\n"
        "    want = keras.random.dropout(x, rate, seed=keras.random.SeedGenerator(7))\n"
        "    held = [keras.Variable(v, trainable=False) for v in (rate, 1 - rate, 1 / (1 - rate))]\n"
        "    got = backend.dropout_at(x, *held, None, keras.random.SeedGenerator(7))\n"
        "    np.testing.assert_array_equal(np.asarray(got, 'float32'), np.asarray(want, 'float32'))\n"
        "print('same')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=jax_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "same" in done.stdout, done.stdout + done.stderr
