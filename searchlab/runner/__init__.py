"""The session loop: one place that runs a study, whichever engine proposes the params.

A session (one ``searchlab run``, or one worker of it) goes:

1. ``prepare`` then ``Session.open``: check the engine's settings and the budget, load the
   data and find a transfer backbone's weights (a missing dataset or weights file fails
   before any store is touched: a run that cannot train writes nothing), open the Optuna study (``store``) and the
   MLflow session run (``tracking``), close what a crashed session left open
   (``Session.reconcile``), and let the engine open its own state.
2. ``Session.work``: claim a trial under the study lock (``coordination.claim_trial``: stale trials
   failed, budget checked, the engine's proposal asked for in the storage), run it
   (``trials.TrialRun``: a heartbeat, the MLflow child run, ``training.run_trial`` with a
   per-epoch callback that logs, reports and may prune), and record it exactly once: MLflow
   first, then Optuna (``finish``), then the engine (``Engine.tell``).  Failed trials in a row
   stop the study at ``--max-failures``; a worker that grew by ``--recycle-mb`` returns so
   its launcher can start a fresh one.
3. ``Session.close`` (through ``Session.end``, which leaves a shared session to its last
   process): reconcile again, write the summary, the trials table and the best model on
   the parent run, close it.  ``--reeval-top`` re-trains the best configurations before
   that (``reeval``).

``Session.lifecycle`` is steps 2 and 3 for both callers: ``run`` here, and ``workers.run``,
whose search is its worker processes (each a ``run`` that only works:
``Session.work_for_launcher``).  The package: ``setup`` (what a session is built from),
``session`` (the ``Session`` and its lifecycle), ``trials`` (the trials' loop and one trial),
``artifacts`` (the trials table and the best model on the parent run).

The study itself lives in the stores, so a study survives a SIGKILL at any moment: the next
session fails what the dead one was running and runs it again -- or, on the Optuna engine,
goes on with it from its last finished epoch.  Resume: each trial keeps a checkpoint
(``trial``, ``checkpoint``) in ``<SEARCHLAB_HOME>/checkpoints/<its MLflow run id>``, named by
its Optuna trial's ``searchlab.checkpoint`` attr; a trial whose process died
(``coordination``: resumable trials) is taken over by the next claim: the same Optuna trial,
the same MLflow run opened again (``Tracker.resume_trial``), epochs the run already has not
logged twice.  Ctrl-C or SIGTERM during a trial with a checkpoint pauses it rather than
failing it: its run ends KILLED (tag ``searchlab.paused``), its Optuna trial stays RUNNING,
and the next session goes on with it.  The folder is removed once the trial is recorded.
``workers`` runs the same session with the trials in child processes (``searchlab run`` by
default, ``--workers N``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from searchlab import engines, interrupts
from searchlab.runner.artifacts import MODEL_SAMPLE
from searchlab.runner.session import SHARED_ATTR, Session, no_counts
from searchlab.runner.setup import (
    TrainFn,
    data_inputs,
    prepare,
    result_settings,
    session_info,
    trial_spec,
    trial_tags,
)
from searchlab.runner.trials import (
    TrialRun,
    checkpoint_root,
    fail_fast,
    failure_streak,
    finish,
)

if TYPE_CHECKING:
    from searchlab.engines import RunOptions, SearchListener
    from searchlab.study import Study
    from searchlab.tracking import Tracker


def run(
    study: Study,
    options: RunOptions,
    tracker: Tracker,
    listener: SearchListener | None = None,
    *,
    train: TrainFn | None = None,
) -> dict[str, Any]:
    """Run (or continue) ``study`` in this process until its budget is met; return the
    session summary.  ``train`` replaces ``training.run_trial`` (tests).

    With ``options.parent_run_id`` this process is one worker of a session another process
    opened: it runs trials until the budget is met and leaves the parent run to its owner;
    its summary has ``recycle``: True when it stopped to shed memory (``--recycle-mb``).
    """
    from searchlab.tracking import user_mlflow

    listener = listener or engines.NullListener()
    # the stand-in trainers of tests train nothing: nothing to check before the search
    check = train is None and not options.parent_run_id
    with user_mlflow(tracker):  # before any user code: its own MLflow calls stay in the study
        engine, target, spec = prepare(study, options, check=check)
        interrupts.check()  # one dropped while the data loaded: stop before a store is touched
        settings = result_settings(study, options, spec.data)
        session = Session.open(study, options, tracker, engine, target, spec.data.source, settings)
        if options.parent_run_id:
            try:
                return session.work_for_launcher(spec, listener, train)
            finally:
                engine.close()
        counts = no_counts()
        return session.lifecycle(
            listener,
            lambda: session.work(spec, listener, counts, train),
            spec=lambda: spec,
            counts=lambda: counts,
        )


__all__ = [
    "MODEL_SAMPLE",
    "SHARED_ATTR",
    "Session",
    "TrainFn",
    "TrialRun",
    "checkpoint_root",
    "data_inputs",
    "fail_fast",
    "failure_streak",
    "finish",
    "no_counts",
    "prepare",
    "result_settings",
    "run",
    "session_info",
    "trial_spec",
    "trial_tags",
]
