"""The ``searchlab`` command: parses flags, wires the layers, and owns what the user sees.

Every mistake a user can make -- a ``SearchlabError``, a flag click refuses, a file the
system will not read or write -- becomes one ``error: ...`` line on stderr and exit code 1,
never a traceback (``-v`` logs it).  Ctrl-C and SIGTERM exit 130 (``interrupts``).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from searchlab import backend, config, engines, interrupts
from searchlab.data import DATA_DIR_ENV
from searchlab.errors import SearchlabError, disk_full, disk_full_line
from searchlab.outcome import TrialState
from searchlab.study import STRATEGIES

if TYPE_CHECKING:
    from searchlab.outcome import TrialResult
    from searchlab.study import Study


def _quiet_backends(load: bool = True) -> None:
    """No backend chatter on the command's output: TensorFlow's C++ logging at warnings and
    up, its start-up lines dropped (``backend.import_quietly``, which imports Keras now:
    ``load=False`` for a command that never needs it), Python warnings we cannot act on."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="keras")
    if load:
        backend.import_quietly()


def _fail(message: str, code: int = 1) -> None:
    try:
        click.echo(f"error: {message}", err=True)
    except (OSError, ValueError):  # stderr is gone: the exit code still says it
        pass
    sys.exit(code)


INTERRUPTED = "interrupted; finished trials are kept, run the same command to continue."


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn searchlab's errors into one line and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            _check_home()
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            interrupts.acknowledge()
            _fail(INTERRUPTED, interrupts.EXIT_CODE)
        except Exception as exc:
            if disk_full(exc):  # however a store wraps it (SQLite, Optuna, MLflow): one line
                logging.getLogger(__name__).info("%s", exc, exc_info=True)
                _fail(disk_full_line(exc, _disk_candidates()))
            if isinstance(exc, SearchlabError):
                _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            if not isinstance(exc, OSError):
                raise
            # a file the system would not read or write: the user's to fix
            logging.getLogger(__name__).info("%s", exc, exc_info=True)
            _fail(os_error_line(exc))

    return wrapper


def _disk_candidates() -> list[str]:
    """Where a full disk may be, for its error line: the local stores' folders (the
    variables' or the defaults'), the project's ``.searchlab`` and the temporary folder."""
    import tempfile

    from searchlab import tracking

    uris = [config.default_storage(), config.default_tracking_uri()]
    paths = [tracking.local_path(u) for u in uris]
    folders = [str(p.parent) for p in paths if p is not None]
    return list(dict.fromkeys([*folders, str(config.home()), tempfile.gettempdir()]))


def os_error_line(exc: OSError) -> str:
    """One line for an ``OSError``: what failed, on which file, and what to do about it."""
    import re

    what = (exc.strerror or str(exc) or type(exc).__name__).splitlines()[0]
    where = f": {exc.filename}" if exc.filename else ""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(exc)
    if full:
        what = "No space left on device"
        named = re.search(r"filename = '([^']+)'", str(exc))  # HDF5 says it in its message
        where = where or (f": {named.group(1)}" if named else "")
        fix = (
            "Free some space (or move $SEARCHLAB_HOME, $TMPDIR to a larger disk), then run the "
            "same command again; finished trials are kept."
        )
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "Choose a file or folder you may write to (or fix its permissions)."
    elif exc.errno in (errno.ENOENT, errno.ENOTDIR):
        fix = "Check the path: create the folder first, or pass another one."
    else:
        fix = "Check the path and try again (searchlab -v ... shows where it happened)."
    return f"{what}{where}. {fix}"


class SearchlabGroup(click.Group):
    """The ``searchlab`` group: Ctrl-C and SIGTERM handled from the first moment on
    (``interrupts``), and click's own refusals (a bad flag value, an unknown option, a
    missing argument) said as every other mistake is: one ``error:`` line, exit code 1."""

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        restore = interrupts.install()
        try:
            try:
                value = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            except click.exceptions.NoArgsIsHelpError as exc:  # bare `searchlab`: its help
                exc.show()
                value = 0
            except click.ClickException as exc:
                ctx = getattr(exc, "ctx", None)  # a UsageError knows its command
                command = ctx.command_path if ctx is not None else "searchlab"
                _fail(f"{exc.format_message()} See '{command} --help'.")
            except click.exceptions.Abort as exc:  # Ctrl-C before a command started
                interrupted = isinstance(exc.__context__, KeyboardInterrupt)
                _fail(INTERRUPTED if interrupted else "aborted.", interrupts.EXIT_CODE)
            except KeyboardInterrupt:
                _fail(INTERRUPTED, interrupts.EXIT_CODE)
        finally:
            restore(exiting=interrupts.is_command())  # in-process callers go on
        if not standalone_mode:
            return value
        sys.exit(value if isinstance(value, int) else 0)


def _fmt(params: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


def _terminal() -> bool:
    """Whether what this process prints reaches a terminal: its own stdout, or a launcher's
    that said so to its one worker (``config.TTY_ENV``)."""
    if os.environ.get(config.TTY_ENV) == "1":
        return True
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ConsoleProgress:
    """Prints trial N of M, its params, its result and the best so far; at the end the best
    model's MLflow URI and what ``--register`` did.

    While a trial trains it shows each epoch (numbered from 1, as in MLflow and Optuna):
    epoch k of E, the last metrics, the trial's elapsed time and an estimate of the time the
    study has left (this process's mean epoch time, times the epochs left in this trial and
    in the trials after it, shared by ``workers``).  On a terminal (``live``) that is one
    line per trial, rewritten each epoch; otherwise one plain line per epoch.
    """

    def __init__(
        self,
        objective: str,
        prefix: str = "",
        direction_note: str = "",
        *,
        live: bool | None = None,
        workers: int = 1,
    ) -> None:
        self.objective = objective
        self.prefix = prefix
        self.direction_note = direction_note  # e.g. "inferred from its name"
        self.live = _terminal() if live is None else live
        self.workers = max(1, workers)
        self._index = 0
        self._total: int | None = None
        self._trial_started = self._epoch_ended = 0.0
        self._epoch_seconds: list[float] = []
        self._open_line = False

    def started(self, name: str, done: int, total: int | None, info: Mapping[str, Any]) -> None:
        budget = f"{total} trials" if total is not None else "until the time limit"
        resumed = f", {done} already finished" if done else ""
        note = f", {self.direction_note}" if self.direction_note else ""
        click.echo(
            f"study {name}: {info['strategy']} search, {budget}{resumed}; "
            f"objective {info['objective']} ({info['direction']}{note}); data {info['data']}"
        )
        if "backend" in info:
            click.echo(
                f"backend {info['backend']} {info.get('backend_version', '')} on "
                f"{info.get('devices', '?')}; precision {info.get('precision', 'float32')}"
            )

    def trial_started(
        self, number: int, index: int, total: int | None, params: Mapping[str, Any]
    ) -> None:
        self._index, self._total = index, total
        self._trial_started = self._epoch_ended = time.monotonic()
        # a trial after failed ones may be past the budget's count: failed trials do not count
        of = f" of {total}" if total is not None and index <= total else ""
        click.echo(f"{self.prefix}trial {index}{of} (#{number}): {_fmt(params)}")

    def epoch(self, number: int, epoch: int, epochs: int, logs: Mapping[str, float]) -> None:
        now = time.monotonic()
        self._epoch_seconds.append(now - self._epoch_ended)
        self._epoch_ended = now
        names = ["loss", "accuracy", "val_loss", self.objective]
        shown = " ".join(
            f"{k}={logs[k]:.4g}" for k in dict.fromkeys(names) if isinstance(logs.get(k), float)
        )
        of = f" of {epochs}" if epoch <= epochs else ""
        text = f"  epoch {epoch}{of}: {shown} ({now - self._trial_started:.1f}s"
        eta = self._eta(epoch, epochs)
        text += f"; study ETA {eta})" if eta else ")"
        if self.live:
            # color=True: the escape that clears the line's rest survives a worker's pipe
            click.echo(f"\r\x1b[K{self.prefix}{text}", nl=False, color=True)
            self._open_line = True
        else:
            click.echo(self.prefix + text)

    def _eta(self, epoch: int, epochs: int) -> str | None:
        if self._total is None or not self._epoch_seconds:
            return None
        per_epoch = sum(self._epoch_seconds) / len(self._epoch_seconds)
        left = max(0, epochs - epoch) + max(0, self._total - self._index) * epochs
        return _duration(per_epoch * left / self.workers)

    def trial_finished(self, result: TrialResult, best: Mapping[str, Any] | None) -> None:
        if self._open_line:  # the trial's epoch line stays, as it ended
            click.echo("")
            self._open_line = False
        if result.state is TrialState.COMPLETE:
            line = (
                f"  complete: {self.objective}={result.value:.4f} at epoch {result.best_epoch} "
                f"({result.duration:.1f}s)"
            )
        elif result.state is TrialState.PRUNED:
            line = f"  pruned after {result.epochs_run} epochs ({result.duration:.1f}s)"
        else:
            line = f"  failed: {(result.error or '').splitlines()[0]}"
        if best:
            line += f" | best so far {best['value']:.4f} (#{best['number']})"
        click.echo(self.prefix + line)

    def finished(self, summary: Mapping[str, Any]) -> None:
        if summary.get("best_value") is None:
            click.echo("no complete trial yet.")
            return
        click.echo(
            f"best: #{summary['best_trial']} {self.objective}={summary['best_value']:.4f} "
            f"with {_fmt(summary['best_params'])}"
        )
        click.echo(
            f"trials: {summary['n_complete']} complete, {summary['n_pruned']} pruned, "
            f"{summary['n_failed']} failed"
        )
        self.model_lines(summary)
        if summary.get("selected_trial") is not None:
            click.echo(
                f"re-evaluated: #{summary['selected_trial']} has the best mean "
                f"{self.objective}={summary['reeval_mean']:.4f} ± {summary['reeval_std']:.4f} "
                f"over {summary['reeval_n']} seeds; export uses it"
            )

    def model_lines(self, summary: Mapping[str, Any]) -> None:
        if summary.get("model_uri"):
            click.echo(f"best model: {summary['model_uri']} (an MLflow Model on the parent run)")
        reg = summary.get("registered")
        if reg is None:
            return
        if reg.champion and reg.previous_version == reg.version:
            click.echo(
                f"registered model {reg.name}: version {reg.version} stays '{CHAMPION}' ({reg.reason})"
            )
        elif reg.champion:
            click.echo(
                f"registered model {reg.name} version {reg.version}: now '{CHAMPION}' ({reg.reason})"
            )
        else:
            click.echo(
                f"registered model {reg.name} version {reg.version}; '{CHAMPION}' stays on "
                f"version {reg.previous_version} ({reg.reason})"
            )


#: the alias ``--register`` moves (``tracking.CHAMPION``; said here so the CLI need not
#: import tracking to print it)
CHAMPION = "champion"


def _tracker(uri: str | None, source: str | None = None, *, create: bool = True) -> Any:
    """The MLflow tracker of ``--tracking-uri``; ``source``: the study file its runs come from
    (``mlflow.source.*``); ``create=False`` for the commands that only read results, which
    must not create a store where there is none."""
    from searchlab.tracking import MlflowTracker

    return MlflowTracker(
        uri or config.default_tracking_uri(),
        config.default_artifact_root(),
        source=source,
        create=create,
    )


def _check_home() -> None:
    """``$SEARCHLAB_HOME`` (or ``./.searchlab``) must be a folder, or not exist yet."""
    home = config.home()
    if home.exists() and not home.is_dir():
        given = os.environ.get(config.HOME_ENV)
        where = f"{config.HOME_ENV}={given}" if given else str(home)
        raise SearchlabError(
            f"{where} is a file, not a folder: searchlab keeps its stores in that folder. "
            f"Point {config.HOME_ENV} at a folder (it is created if missing), or move the file."
        )


def _check_output(path: str | None, flag: str) -> None:
    """An output file's folder must exist before anything is read or written."""
    if not path:
        return
    from pathlib import Path

    folder = Path(path).parent
    if not folder.is_dir():
        raise SearchlabError(
            f"Cannot write {path} ({flag}): folder {folder} does not exist. Create it first, "
            f"or pass another {flag}."
        )


def _subset(subset: str | None) -> dict[str, int] | None:
    """``--subset TRAIN[,VAL]`` as the sizes ``Dataset(subset=...)`` takes (checked before the
    study file is even loaded)."""
    from searchlab.errors import StudyDefinitionError

    if not subset:
        return None
    try:
        parts = [int(p) for p in subset.split(",")]
    except ValueError:
        parts = []
    if not parts or len(parts) > 2 or min(parts) <= 0:
        raise StudyDefinitionError(
            f"--subset must be TRAIN or TRAIN,VAL (positive ints, e.g. 2000,500), got {subset!r}."
        )
    sizes = {"train": parts[0]}
    if len(parts) == 2:
        sizes["val"] = parts[1]
    return sizes


#: ``run --try``: its trials, epochs and data rows (train, validation), unless flags say
TRY_TRIALS, TRY_EPOCHS, TRY_SUBSET = 2, 1, "512,128"
#: ``run --try`` runs the study under this name: its own Optuna study and MLflow experiment
TRY_SUFFIX = "-try"


def _load(study_file: str, subset: str | None, try_run: bool = False) -> tuple[Study, Study]:
    """The study of ``study_file`` as the file defines it, and with ``--subset`` applied;
    ``try_run``: the second one is the throwaway ``<name>-try`` (``--try``)."""
    from searchlab.study import load_study

    sizes = _subset(subset or (TRY_SUBSET if try_run else None))
    loaded = load_study(study_file)
    study = loaded
    if sizes is not None:
        study = dataclasses.replace(study, data=dataclasses.replace(study.dataset, subset=sizes))
    if try_run:
        study = dataclasses.replace(study, name=study.name + TRY_SUFFIX, register=None)
    return loaded, study


storage_option = click.option(
    "--storage",
    metavar="URL",
    envvar=config.STORAGE_ENV,
    show_envvar=True,
    help="Optuna storage URL [default: sqlite:///.searchlab/optuna.db].",
)
tracking_option = click.option(
    "--tracking-uri",
    metavar="URI",
    envvar=config.TRACKING_ENV,
    show_envvar=True,
    help="MLflow tracking URI [default: sqlite:///.searchlab/mlflow.db].",
)
data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    envvar=DATA_DIR_ENV,
    show_envvar=True,
    help="Where datasets and ImageNet weights files are [default: data_dir of [tool.searchlab] "
    "in the nearest pyproject.toml (or of a searchlab.toml) from here up, else Keras's cache].",
)


@click.group(cls=SearchlabGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="searchlab")
@click.option("-v", "--verbose", is_flag=True, help="Log what happens inside, to stderr.")
def main(verbose: bool) -> None:
    """searchlab: hyperparameter search for Keras models, tracked in MLflow."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


def _default(field: str) -> Any:
    """The default of a ``RunOptions`` field, which is its flag's default too."""
    return next(f.default for f in dataclasses.fields(engines.RunOptions) if f.name == field)


def _parse_worker_options(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> engines.RunOptions | None:
    if value is None:
        return None
    try:
        return engines.RunOptions.from_json(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


#: Said in a worker's command line in place of the storage URL, which may hold a password:
#: the worker reads the URL from this variable, which ``workers.worker_env`` sets.
STORAGE_FROM_ENV = f"${config.STORAGE_ENV}"
#: --recycle-mb's default: a worker grows about 5 MB per trial on TensorFlow (workers.py)
RECYCLE_MB = 100


@dataclass(frozen=True)
class RunFlags:
    """What ``searchlab run`` was given: one field per flag (None where a flag was not given
    and has no default), and the names of the flags given on the command line."""

    study_file: str
    strategy: str | None
    trials: int | None
    timeout: float | None
    epochs: int | None
    seed: int | None
    subset: str | None
    max_failures: int
    precision: str
    engine: str
    pruner: str
    prune_min_epochs: int | None
    prune_factor: int | None
    reeval_top: int
    reeval_seeds: int
    executions_per_trial: int | None
    workers: int
    gpus: str | None
    recycle_mb: float
    in_process: bool
    register: str | None
    allow_changed_settings: bool
    try_run: bool
    session: str | None
    worker_options: engines.RunOptions | None
    storage: str | None
    tracking_uri: str | None
    data_dir: str | None
    from_command_line: frozenset[str] = frozenset()


@main.command()
@click.argument("study_file", type=click.Path(dir_okay=False))
@click.option(
    "--strategy",
    metavar=f"[{'|'.join(STRATEGIES)}]",
    help="How the params are picked (bayesian: Optuna's TPE) [default: the study's].",
)
@click.option(
    "--trials", type=click.IntRange(min=1), help="Trials to complete [default: the study's]."
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="Stop starting trials after this many seconds.",
)
@click.option(
    "--epochs", type=click.IntRange(min=1), help="Epochs per trial [default: the study's]."
)
@click.option(
    "--seed", type=int, help="Seed for the sampler and the trials [default: the study's]."
)
@click.option(
    "--subset",
    metavar="TRAIN[,VAL]",
    help="Use at most this many training (and validation) examples.",
)
@click.option(
    "--max-failures",
    type=click.IntRange(min=1),
    default=_default("max_failures"),
    show_default=True,
    help="Stop after this many failed trials in a row.",
)
@click.option(
    "--precision",
    type=click.Choice(backend.PRECISIONS),
    default=_default("precision"),
    show_default=True,
    help="Keras dtype policy for the trials (mixed: 16-bit compute, float32 weights and output).",
)
@click.option(
    "--engine",
    type=click.Choice(engines.ENGINES),
    default=_default("engine"),
    show_default=True,
    help="Who picks the params: Optuna's samplers or KerasTuner's oracles.",
)
@click.option(
    "--pruner",
    type=click.Choice(engines.PRUNERS),
    default=_default("pruner"),
    show_default=True,
    help="Stop bad trials early after an epoch (Optuna engine).",
)
@click.option(
    "--prune-min-epochs",
    type=click.IntRange(min=1),
    help="Epochs a trial trains before the pruner may stop it [default: 1].",
)
@click.option(
    "--prune-factor",
    type=click.IntRange(min=2),
    help="asha/hyperband: about 1/F of the trials reaching a rung go on; rungs at MIN*F**k epochs [default: 3].",
)
@click.option(
    "--reeval-top",
    type=click.IntRange(min=0),
    default=_default("reeval_top"),
    show_default=True,
    help="After the search, re-train the K best configurations and export by mean objective.",
)
@click.option(
    "--reeval-seeds",
    type=click.IntRange(min=1),
    default=_default("reeval_seeds"),
    show_default=True,
    help="Seeds per re-evaluated configuration.",
)
@click.option(
    "--executions-per-trial",
    type=click.IntRange(min=1),
    help="Fit each configuration N times; its value is the mean (KerasTuner's option) [default: the study's].",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes sharing the study on this machine.",
)
@click.option(
    "--gpus",
    metavar="auto|0,1,...",
    help="Pin one worker per GPU (CUDA_VISIBLE_DEVICES); sets --workers to the GPU count unless given.",
)
@click.option(
    "--recycle-mb",
    type=click.FloatRange(min=0),
    default=RECYCLE_MB,
    show_default=True,
    help="Restart a worker whose memory grew by this many MB since its first trial.",
)
@click.option(
    "--in-process",
    is_flag=True,
    help="Run the trials in this process, not in a worker (for a debugger; memory then grows a few MB per trial on TensorFlow).",
)
@click.option(
    "--register",
    metavar="NAME",
    help="Register the best model as NAME in MLflow's model registry; alias 'champion' moves to it only when it is better [default: the study's register=].",
)
@click.option(
    "--allow-changed-settings",
    is_flag=True,
    help="Continue a study although its epochs, data, precision or backbone settings changed (the session is tagged searchlab.changed_settings).",
)
@click.option(
    "--try",
    "try_run",
    is_flag=True,
    help=f"Try the whole path small first: {TRY_TRIALS} trials of {TRY_EPOCHS} epoch on "
    f"{TRY_SUBSET.replace(',', ' train / ')} validation rows (unless --trials, --epochs or "
    f"--subset say), in a throwaway study NAME{TRY_SUFFIX} (its own Optuna study and MLflow "
    "experiment, started over each time; nothing registered, no re-evaluation); the real "
    "study is untouched.",
)
@click.option(
    "--session",
    metavar="KEY",
    envvar=config.SESSION_ENV,
    show_envvar=True,
    help="Share one session (one MLflow parent run) with every process given this key, on any machine (a SLURM job array, a Kubernetes Job); the last one to finish closes it.",
)
@click.option(
    "--worker-options",
    metavar="JSON",
    hidden=True,
    callback=_parse_worker_options,
    help="(internal) run as a worker of a launcher, with these RunOptions.",
)
@storage_option
@tracking_option
@data_dir_option
@friendly
def run(**flags: Any) -> None:  # click hands over every flag: RunFlags names and types them
    """Run (or continue) the study defined in STUDY_FILE until its budget is met."""
    _quiet_backends()
    source = click.get_current_context().get_parameter_source
    given = frozenset(name for name in flags if source(name) is ParameterSource.COMMANDLINE)
    run_flags = RunFlags(**flags, from_command_line=given)
    if run_flags.data_dir:  # library code (a backbone's weights) and workers find it too
        os.environ[DATA_DIR_ENV] = os.path.abspath(run_flags.data_dir)
    if run_flags.worker_options is not None:
        _work(run_flags, run_flags.worker_options)
    else:
        _launch(run_flags)


def _launch(flags: RunFlags) -> None:
    """Open the session and run its trials in worker processes (here with ``--in-process``
    or the keras-tuner engine); then say where the results are."""
    from searchlab import workers as workers_mod

    gpus = workers_mod.parse_gpus(flags.gpus)
    workers_given = "workers" in flags.from_command_line
    workers = len(gpus) if gpus and not workers_given else flags.workers
    if (workers_given or gpus) and (flags.engine != "optuna" or flags.in_process):
        raise SearchlabError(
            "--workers/--gpus start Optuna-engine worker processes: drop "
            + ("--engine keras-tuner" if flags.engine != "optuna" else "--in-process")
            + ", or drop --workers/--gpus."
        )
    loaded, study = _load(flags.study_file, flags.subset, flags.try_run)
    options = _run_options(flags, study)
    tracker = _tracker(flags.tracking_uri, flags.study_file)
    if flags.try_run:
        _start_try_over(study, options, tracker, real=loaded.name)
    progress = ConsoleProgress(study.objective, direction_note=_direction_note(loaded))
    # Trials run in worker processes (one unless --workers says more) that are replaced when
    # they have grown by --recycle-mb, so memory stays flat over a long search.  The
    # keras-tuner engine keeps its oracle in this process, so it runs its trials here.
    from searchlab.errors import SessionOver
    from searchlab.tracking import user_mlflow

    try:
        if flags.engine == "optuna" and not flags.in_process:
            with user_mlflow(tracker):  # the launcher's checks run the study's code
                summary = workers_mod.run(
                    study,
                    options,
                    tracker,
                    progress,
                    workers=workers,
                    gpus=gpus,
                    worker_command=_worker_command(flags, options, workers),
                )
        else:
            from searchlab import runner

            summary = runner.run(study, options, tracker, progress)
    except SessionOver as exc:  # a late process of a shared session: not an error
        click.echo(str(exc))
        return
    if summary.get("left_open"):
        click.echo(
            f"session {summary['shared_session']!r} goes on in its other processes; the last "
            "one to finish closes it."
        )
    if flags.try_run:
        given = " ".join(f"{s.name}={s.value}" for s in config.settings_read() if s.from_env)
        click.echo(
            f"try run done (study {study.name!r}); the real study {loaded.name!r} is untouched: "
            f"run it with: {given + ' ' if given else ''}searchlab run {flags.study_file}"
        )
        return
    _say_where_results_are(flags, study, tracker.uri)


def _start_try_over(study: Study, options: engines.RunOptions, tracker: Any, real: str) -> None:
    """``run --try``: say so, and delete what an earlier try left (the Optuna study
    ``<name>-try``, its MLflow runs) so each try starts over; the real study is not read."""
    from searchlab import tracking
    from searchlab.store import sqlite_path, study_names

    click.echo(
        f"try run: {_count(options.trials, 'trial')} x {_count(options.epochs, 'epoch')} on "
        f"{_subset_words(study)} in the throwaway study {study.name!r}, started over; the real "
        f"study {real!r} is untouched."
    )
    path = sqlite_path(options.storage)
    if (path is None or path.is_file()) and study.name in study_names(options.storage):
        import optuna

        optuna.delete_study(study_name=study.name, storage=options.storage)
    uri_path = sqlite_path(tracker.uri)
    if uri_path is None or uri_path.is_file():
        # soft-deleted runs: MLflow's searches (and so the try's reconcile) no longer see them
        client = tracking.client(tracker.uri, create=False)
        for run in tracker.runs(study.name):
            client.delete_run(run.run_id)


def _count(n: int | None, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _subset_words(study: Study) -> str:
    sizes = dict(study.dataset.subset or ())  # type: ignore[arg-type]
    train, val = sizes.get("train"), sizes.get("val")
    return f"{train or 'all'} train / {val or 'all'} validation rows"


def _direction_note(study: Study) -> str:
    """How the direction was chosen when the study file did not say (from the file's own
    study: a copy made with ``--subset`` has the direction as given)."""
    return "" if study.direction_source == "given" else study.direction_source


def _run_options(flags: RunFlags, study: Study) -> engines.RunOptions:
    """The session's options: each flag given, else the study's own value."""
    from searchlab.study import check_strategy

    return engines.RunOptions(
        strategy=check_strategy(flags.strategy or study.strategy),
        trials=flags.trials or (TRY_TRIALS if flags.try_run else study.trials),
        timeout=flags.timeout if flags.timeout is not None else study.timeout,
        epochs=flags.epochs or (TRY_EPOCHS if flags.try_run else study.epochs),
        seed=flags.seed if flags.seed is not None else study.seed,
        storage=flags.storage or config.default_storage(),
        data_dir=flags.data_dir,
        max_failures=flags.max_failures,
        precision=flags.precision,
        engine=flags.engine,
        pruner=flags.pruner,
        prune_min_epochs=flags.prune_min_epochs,
        prune_factor=flags.prune_factor,
        reeval_top=0 if flags.try_run else flags.reeval_top,
        reeval_seeds=flags.reeval_seeds,
        register=None if flags.try_run else flags.register or study.register,
        allow_changed_settings=flags.allow_changed_settings or flags.try_run,
        session_key=flags.session or None,
        executions_per_trial=flags.executions_per_trial,
    )


def _worker_command(
    flags: RunFlags, options: engines.RunOptions, workers: int
) -> Callable[[int, str], list[str]]:
    """``worker_command(index, parent_run_id)`` for ``workers.run``: ``searchlab run`` on the
    same study file (and ``--subset``) with the session's options as JSON.  The storage URL
    is not on it (a password would show in the process list): ``workers.worker_env`` hands
    the worker the stores' URLs in its environment."""
    study_file = os.path.abspath(flags.study_file)
    subset = ["--subset", flags.subset] if flags.subset else []
    if flags.try_run:
        subset.append("--try")

    def command(index: int, parent_run_id: str) -> list[str]:
        worker = dataclasses.replace(
            options,
            storage=STORAGE_FROM_ENV,
            parent_run_id=parent_run_id,
            worker=f"{index + 1}/{workers}",
            recycle_mb=flags.recycle_mb,
            reeval_top=0,  # re-evaluation is the launcher's, once every worker has ended
        )
        verbose = ["-v"] if logging.getLogger().isEnabledFor(logging.INFO) else []
        return [
            sys.executable,
            "-m",
            "searchlab.cli",
            *verbose,
            "run",
            study_file,
            *subset,
            "--worker-options",
            worker.to_json(),
        ]

    return command


def _work(flags: RunFlags, given: engines.RunOptions) -> None:
    """Be one worker of a launcher's session (``--worker-options``): run trials under its
    parent run until the budget is met, or exit ``RECYCLE`` to be replaced by a fresh one."""
    from searchlab import runner
    from searchlab import workers as workers_mod

    workers_mod.bind_to_launcher()  # a worker must not outlive the launcher that started it
    options = dataclasses.replace(given, storage=flags.storage or config.default_storage())
    _, study = _load(flags.study_file, flags.subset, flags.try_run)
    from searchlab.training import freeze_imports

    freeze_imports()  # this process has only imported so far
    tracker = _tracker(flags.tracking_uri, flags.study_file)
    prefix = f"[worker {options.worker}] " if options.one_of_several else ""
    workers = int((options.worker or "1/1").rpartition("/")[2] or 1)
    progress = ConsoleProgress(study.objective, prefix, workers=workers)
    if runner.run(study, options, tracker, progress).get("recycle"):
        sys.exit(workers_mod.RECYCLE)


def _say_where_results_are(flags: RunFlags, study: Study, tracking_uri: str) -> None:
    from searchlab.store import redact

    # A --tracking-uri from the environment is in force in the next command too: not repeated.
    again = (
        f" --tracking-uri {redact(flags.tracking_uri)}"
        if flags.tracking_uri and "tracking_uri" in flags.from_command_line
        else ""
    )
    click.echo(
        f"results: MLflow experiment {study.name!r} in {redact(tracking_uri)}; "
        f"compare them with: searchlab ui {flags.study_file}{again}"
    )
    click.echo(f"export the best model with: searchlab export {flags.study_file} -o best.keras")


def _as_trained(study: Study, storage_url: str) -> Study:
    """``study`` with its model builder as the stored study trained it (``Transfer.as_trained``:
    the backbone weights its sessions recorded), so a study file that reads its weights from
    an environment variable exports without it set again."""
    again = getattr(study.model, "as_trained", None)
    if again is None:
        return study
    from searchlab.store import SETTINGS_KEY, SPACE_ATTR, StudyStore

    try:
        kept = StudyStore.load(study.name, storage_url).attr(SPACE_ATTR) or {}
    except SearchlabError:
        return study  # export_model says what is missing
    settings = kept.get(SETTINGS_KEY) or {}
    model = {k.removeprefix("model."): v for k, v in settings.items() if k.startswith("model.")}
    return dataclasses.replace(study, model=again(model))


@main.command()
@click.argument("study_file", type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="Where to write the model: a .h5 or .keras file.",
)
@click.option("--trial", "number", type=int, help="Export this trial number instead of the best.")
@storage_option
@tracking_option
@friendly
def export(
    study_file: str,
    output: str,
    number: int | None,
    storage: str | None,
    tracking_uri: str | None,
) -> None:
    """Export the best trial of STUDY_FILE (from the stores) as a complete Keras model.

    STUDY_FILE may also be an MLflow model URI: models:/NAME@champion (a registered model,
    see run --register), models:/NAME/VERSION, or a session's models:/<model id>.
    """
    _quiet_backends()
    from pathlib import Path

    from searchlab import export as export_mod
    from searchlab.study import load_study

    if study_file.startswith(export_mod.MODEL_URI_PREFIXES):
        if number is not None:
            raise click.UsageError("--trial applies to a study file, not to a model URI.")
        written = export_mod.export_logged(
            study_file, _tracker(tracking_uri, create=False), Path(output)
        )
        click.echo(f"wrote {written['path']}: {study_file}")
        return
    study = _as_trained(load_study(study_file), storage or config.default_storage())
    done = export_mod.export_model(
        study,
        storage or config.default_storage(),
        _tracker(tracking_uri, create=False),
        Path(output),
        number,
    )
    value = f"{done['value']:.4f}" if done["value"] is not None else "?"
    click.echo(
        f"wrote {done['path']}: trial #{done['trial']} ({study.objective}={value}, "
        f"{_fmt(done['params'])})"
    )
    if "class_names" in done:  # an image folder's study: class id i is the i-th name
        click.echo(f"wrote {done['class_names']}: the class names, by class id")


@main.command()
@click.argument("study_file", type=click.Path(dir_okay=False))
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(dir_okay=False, allow_dash=True),
    help="Also write the table as CSV ('-': to stdout, instead of the text table).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the study and its trials as one JSON object instead of the text table.",
)
@click.option(
    "--parquet",
    "parquet_path",
    type=click.Path(dir_okay=False),
    help="Also write the table as Parquet.",
)
@click.option(
    "--plots",
    "plots_dir",
    type=click.Path(file_okay=False),
    help="Write plots (PNG and HTML) into this folder and log them on the latest parent run.",
)
@click.option(
    "--top",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Learning curves of this many best trials.",
)
@storage_option
@tracking_option
@friendly
def report(
    study_file: str,
    csv_path: str | None,
    as_json: bool,
    parquet_path: str | None,
    plots_dir: str | None,
    top: int,
    storage: str | None,
    tracking_uri: str | None,
) -> None:
    """Print the trials of STUDY_FILE best first (from the stores); write tables and plots.

    With --json or --csv -, stdout holds only that data; what else is said goes to stderr.
    """
    _check_output(csv_path if csv_path != "-" else None, "--csv")
    _check_output(parquet_path, "--parquet")
    _quiet_backends()
    os.environ.setdefault("MPLBACKEND", "Agg")
    from pathlib import Path

    from searchlab import report as report_mod
    from searchlab import table
    from searchlab.study import load_study

    if as_json and csv_path == "-":
        raise click.UsageError("--json and --csv - both print to stdout: choose one.")
    results = report_mod.open_results(
        load_study(study_file),
        storage or config.default_storage(),
        _tracker(tracking_uri, create=False),
    )
    frame = report_mod.frame(results)
    data_out = as_json or csv_path == "-"

    def say(text: str) -> None:
        click.echo(text, err=data_out)

    if as_json:
        click.echo(report_mod.to_json(results, frame))
    elif csv_path == "-":
        click.echo(table.to_csv(frame), nl=False)
    else:
        click.echo(report_mod.summary_line(results))
        click.echo(table.to_text(frame))
    if csv_path and csv_path != "-":
        say(f"wrote {table.write_csv(frame, Path(csv_path))}")
    if parquet_path:
        say(f"wrote {table.write_parquet(frame, Path(parquet_path))}")
    if plots_dir:
        files, skipped = report_mod.write_plots(results, Path(plots_dir), top=top)
        names = sorted({f.stem for f in files if f.suffix in (".png", ".html")})
        say(f"wrote plots to {plots_dir}: {', '.join(names)} (.png and .html, one plotly.min.js)")
        for name, why in skipped.items():
            say(f"skipped {name}: {why}")
        run_id = report_mod.log_plots(results, files)
        if run_id:
            say(f"logged the plots on MLflow run {run_id} (artifacts/plots)")


@main.command()
@click.argument("study_file", required=False, type=click.Path(dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface the UI listens on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=5000,
    show_default=True,
    help="Port of the UI (0: any free port).",
)
@tracking_option
@friendly
def ui(study_file: str | None, host: str, port: int, tracking_uri: str | None) -> None:
    """Start the MLflow UI on the study's tracking store and print the page to open.

    With an http(s) --tracking-uri, the server is already there: print its page instead.
    """
    _quiet_backends(load=False)  # the server starts first; a study file loads Keras later
    from searchlab import tracking
    from searchlab.store import redact

    tracker = _tracker(tracking_uri, create=False)
    if tracking.is_remote(tracker.uri):
        tracker.connect()
        page = _compare_page(tracker, study_file)
        click.echo(f"MLflow server: {tracking.page_url(tracker.uri)}{page}")
        return
    tracking.check_exists(tracker.uri)
    if study_file:
        from pathlib import Path

        if not Path(study_file).is_file():
            _compare_page(tracker, study_file)  # says the file is missing, starts nothing
    import signal
    import subprocess

    port = _free_port(host, port)
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    argv, env = tracking.ui_command(tracker.uri, host, port, config.default_artifact_root())
    quiet = not logging.getLogger().isEnabledFor(logging.INFO)
    process = subprocess.Popen(  # started first: it boots while the study file loads
        argv,
        env=env,
        stdout=subprocess.DEVNULL if quiet else None,
        stderr=subprocess.DEVNULL if quiet else None,
        start_new_session=True,  # its workers are in its process group, stopped together
    )

    def stop(*_: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        page = _compare_page(tracker, study_file)
        click.echo(f"starting the MLflow UI on {url} (it may take a minute on a busy machine)...")

        def waiting(seconds: float) -> None:
            click.echo(f"waiting for the MLflow UI to answer ({seconds:.0f} s)...")

        tracking.wait_for_ui(process, url, progress=waiting)
        click.echo(f"MLflow UI: {url}{page}, serving {redact(tracker.uri)}")
        click.echo("Ctrl-C stops it.")
        code = process.wait()
        if code != 0:
            raise SearchlabError(f"The MLflow UI stopped with exit code {code}.")
    except KeyboardInterrupt:
        click.echo("stopped the MLflow UI.")
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop_group(process)


def _compare_page(tracker: Any, study_file: str | None) -> str:
    """The UI page that compares a study's trials (``""``: the UI's home), and its name."""
    if not study_file:
        return ""
    from searchlab.errors import NotRunError
    from searchlab.store import redact
    from searchlab.study import load_study

    backend.import_quietly()  # a study file imports Keras
    study = load_study(study_file)
    exp_id = tracker.find_experiment(study.name)
    if exp_id is None:
        raise NotRunError(
            f"Study {study.name!r} was never run: {redact(tracker.uri)} has no MLflow experiment of "
            "that name. Run it first (searchlab run STUDY_FILE), or pass the --tracking-uri "
            "it ran with."
        )
    key = tracker.set_compare_view(exp_id, study.search_space.names, study.goal)
    return f"/#/experiments/{exp_id}/runs?viewStateShareKey={key} (experiment {study.name!r})"


def _free_port(host: str, port: int) -> int:
    """``port`` if nothing listens on it (0: pick a free one); else one line that says so."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise SearchlabError(
                f"Cannot listen on {host}:{port} ({exc.strerror}): pass another --port or --host."
            ) from None
        return int(sock.getsockname()[1])


def _stop_group(process: Any, timeout: float = 10.0) -> None:
    import signal
    import subprocess

    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


@main.command()
@click.argument("study_file", required=False, type=click.Path(dir_okay=False))
@storage_option
@tracking_option
@data_dir_option
@friendly
def doctor(
    study_file: str | None, storage: str | None, tracking_uri: str | None, data_dir: str | None
) -> None:
    """Check the Keras backend, its devices, the data directory and the stores (and what
    STUDY_FILE needs); exit 1 when something a run needs is missing."""
    # Keras refuses a backend it does not know on import: the doctor judges it first
    _quiet_backends(load=backend.requested() in backend.BACKENDS)
    from searchlab.doctor import Status, run_checks

    given = click.get_current_context().get_parameter_source("data_dir")
    source = f"${DATA_DIR_ENV}" if given is ParameterSource.ENVIRONMENT else "--data-dir"
    problems, downloads = [], []
    for check in run_checks(study_file, data_dir, storage, tracking_uri, source):
        click.echo(f"{check.status.value:<4}  {check.label:<15} {check.detail}")
        if check.status is Status.FAIL:
            problems.append(check.label)
        if check.downloads:
            downloads.append(check.label)
    if problems:
        _fail(f"{len(problems)} problem(s): {', '.join(problems)}; see the FAIL lines above.")
    if downloads:
        click.echo(
            f"ready if online: a run downloads what the warn lines name ({', '.join(downloads)}); "
            "offline, do what they say first."
        )
        return
    click.echo("ready: nothing a run needs is missing.")


if __name__ == "__main__":  # pragma: no cover
    main()
