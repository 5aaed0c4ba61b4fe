"""``searchlab.training``'s light half: ``spec`` (what a trial is handed) imports no Keras, so
code that only describes trials (engines, their contract suite, the CLI) stays fast; the
package's curated names all resolve."""

from __future__ import annotations

import subprocess
import sys


def test_the_spec_imports_no_keras():
    code = (
        "import sys\n"
        "import searchlab.training.spec\n"
        "from searchlab.training import TrialSpec, WEIGHTS_FILES, batch_size_of\n"
        "heavy = sorted(m for m in ('keras', 'tensorflow', 'jax', 'torch') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "", f"importing the spec imported {done.stdout.strip()}"


def test_every_exported_name_resolves():
    import searchlab.training as training

    missing = [name for name in training.__all__ if not hasattr(training, name)]
    assert missing == []
    assert set(training.__all__) >= {"TrialSpec", "run_trial", "load_trained", "cache"}
