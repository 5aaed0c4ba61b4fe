"""SIGKILL at random moments, on both engines, then run the studies to their end: the stores
must hold exactly the budget, nothing RUNNING or WAITING, no MLflow run RUNNING, no trial run
twice, and every complete trial's weights must load into its model.

Each engine is a lane of its own (its own project folder), and the two lanes run side by side
to keep the test's time down.  A lane alternates a grid study and a random one; the Optuna
lane also takes turns with one worker, none (``--in-process``) and two (``--workers 2``), and
now and then kills a worker instead of the launcher.  The keras-tuner engine runs one process per study (its oracle lives
in it; a second is refused, see ``test_engine_contract``), so its lane runs ``searchlab run``
alone.  A kill lands a random time after the session opened (its "study ..." line): in a
worker's start-up, a claim, a fit, an upload, between trials, or while the session closes.
``$SEARCHLAB_TEST_SEED`` replays a sequence of kills.
"""

from __future__ import annotations

import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from reliability_helpers import STUDY, Session, check_consistent, env_for, searchlab_cmd

pytestmark = pytest.mark.slow
KILLS = 10  # per engine
#: 12 grid points (units x learning_rate); both studies stop at their budget
SPACE = '{"units": Choice([8, 16, 32, 64]), "learning_rate": Choice([0.001, 0.003, 0.01])}'
BUDGET = {
    "optuna": {"grid": 10, "random": 10},
    # in one process, trials follow each other sooner: more of them finish between kills
    "keras-tuner": {"grid": 12, "random": 10},
}
#: the Optuna lane's modes, in turn: a worker, the launcher itself, two workers
OPTUNA_MODES = (["--workers", "1"], ["--in-process"], ["--workers", "2"])


def _study(folder: Path, strategy: str) -> Path:
    text = STUDY.replace('name="tiny"', f'name="kill-{strategy}"')
    text = text.replace(
        'space={"units": Choice([8, 16, 32]), "learning_rate": Choice([0.001, 0.01])}',
        f"space={SPACE}",
    )
    text = text.replace('strategy="grid"', f'strategy="{strategy}"')
    path = folder / f"kill_{strategy}.py"
    path.write_text(text)
    return path


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _lane(engine: str, folder: Path, rng: random.Random) -> dict[str, Any]:
    """Kill ``KILLS`` sessions of ``engine`` at random moments, then finish both studies."""
    folder.mkdir()
    home = folder / ".searchlab"
    studies = {s: _study(folder, s) for s in ("grid", "random")}
    log: list[str] = []
    kills = 0
    round_ = 0
    while kills < KILLS:
        strategy = ("grid", "random")[round_ % 2]
        args = ["--trials", BUDGET[engine][strategy], "--engine", engine]
        mode = ["--in-process"]  # what the keras-tuner engine does anyway
        if engine == "optuna":
            mode = OPTUNA_MODES[(round_ // 2) % len(OPTUNA_MODES)]
        args += mode
        workers = int(mode[1]) if mode[0] == "--workers" else 0
        round_ += 1
        s = Session(searchlab_cmd(studies[strategy], *args), env_for(home), folder)
        # after the session opened (its reconcile done): in a worker's start-up, or, from
        # its first trial on, in a fit, an upload, a claim, between trials, in the close
        first = "trial " if workers and rng.random() < 0.6 else "study "
        try:
            s.wait_for(lambda line, first=first: line.lstrip().startswith(first), timeout=120)
        except AssertionError:  # it ended first: nothing left to do in that study
            s.finish()
            continue
        time.sleep(rng.uniform(0.0, 5.0 if first == "study " and workers else 4.0))
        target, who = s.proc.pid, "launcher"
        if workers and rng.random() < 0.3 and (kids := _children(s.proc.pid)):
            target, who = rng.choice(kids), "worker"  # as the kernel's OOM killer would
        killed = False
        if s.proc.poll() is None:
            try:
                os.kill(target, signal.SIGKILL)
                killed = True
            except ProcessLookupError:
                pass
        out = s.finish(timeout=120)
        if killed:
            kills += 1
            said = [
                ln.strip()
                for ln in out.splitlines()
                if ln.lstrip().startswith(("trial", "complete:"))
            ]
            log.append(
                f"{strategy} {' '.join(mode)}: {who} killed after "
                f"[{said[-1] if said else 'start-up'}]"
            )
    finals = {}
    for strategy, path in studies.items():
        args = ["--trials", BUDGET[engine][strategy], "--engine", engine]
        s = Session(searchlab_cmd(path, *args), env_for(home), folder)
        out = s.finish(timeout=300)
        finals[strategy] = (s.proc.returncode, out)
    return {"home": home, "kills": kills, "log": log, "finals": finals, "studies": studies}


def _weights_load(home: Path, study_file: Path, name: str, complete: list[Any]) -> None:
    import keras
    from mlflow.tracking import MlflowClient

    from searchlab.data import DataInfo
    from searchlab.study import load_study
    from searchlab.training import load_trained

    study = load_study(study_file)
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    info = DataInfo(input_shape=(28, 28), num_classes=10)
    for t in complete:
        folder = client.download_artifacts(t.user_attrs["mlflow_run_id"], "weights")
        model = load_trained(study.model, t.params, info, Path(folder))
        assert model.predict(keras.ops.zeros((1, 28, 28)), verbose=0).shape == (1, 10)


def test_random_sigkills_on_both_engines_lose_nothing(tmp_path: Path, data_dir: Path) -> None:
    seed = int(os.environ.get("SEARCHLAB_TEST_SEED") or time.time())
    print(f"SEARCHLAB_TEST_SEED={seed}")
    os.environ["SEARCHLAB_DATA_DIR"] = str(data_dir)
    with ThreadPoolExecutor(2) as pool:
        lanes = {
            engine: pool.submit(_lane, engine, tmp_path / engine, random.Random(f"{seed}{engine}"))
            for engine in ("optuna", "keras-tuner")
        }
        results = {engine: lane.result() for engine, lane in lanes.items()}
    for engine, found in results.items():
        print(f"{engine}: {found['kills']} kills: " + "; ".join(found["log"]))
        assert found["kills"] >= KILLS
        home = found["home"]
        for strategy, (code, out) in found["finals"].items():
            name = f"kill-{strategy}"
            assert code == 0, f"{engine} {strategy} (seed {seed}):\n{out}"
            budget = BUDGET[engine][strategy]
            assert f"trials: {budget} complete" in out, out
            stores = check_consistent(
                f"sqlite:///{home / 'optuna.db'}",
                f"sqlite:///{home / 'mlflow.db'}",
                name,
                budget,
                grid=strategy == "grid",
            )
            complete = [t for t in stores["trials"] if t.state.name == "COMPLETE"]
            if engine == "keras-tuner" and strategy == "random":  # no oracle trial ran twice
                ids = [t.user_attrs["kerastuner_trial_id"] for t in complete]
                assert len(set(ids)) == len(ids), ids
            _weights_load(home, found["studies"][strategy], name, complete)
