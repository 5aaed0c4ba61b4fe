"""Several searchlab processes on one study: who may start the next trial, and which trials died.

Three pieces, used by the runner whichever engine proposes the params:

- ``StudyLock``: one process at a time claims a trial.  On SQLite (one machine) it is an
  exclusive ``flock`` on a file beside the database; on PostgreSQL (many machines) a
  session-level ``pg_advisory_lock`` keyed by the study name.  Both are released by the
  operating system or the server when the holder dies, so a SIGKILL never leaves it held.
- ``Heartbeat``: a thread that records the running trial's heartbeat in the Optuna storage
  (Optuna's own ``RDBStorage`` heartbeat table) every ``interval`` seconds.
- ``fail_stale_trials``: marks FAILED every RUNNING trial whose process is gone: its heartbeat
  is older than the grace period (any machine), its process id no longer exists (this
  machine, where a process is its pid and its start time, as a pid is reused: no need to
  wait for the grace period), or, seen while holding the lock, it never
  got its owner recorded (its claimer died inside the claim).  Seen while holding the lock,
  a WAITING trial is one a claimer enqueued and died before asking for (every claim does
  both under the lock): it is failed too, and its point is free again.

A claim (``claim_trial``) happens under the lock: fail stale trials, count finished and
running trials against the budget, take the engine's proposal (the next free grid point, an
oracle's pick, or "let the sampler choose"), ``ask`` Optuna, record the owner and a first
heartbeat, and give the trial its params.  So two workers never start the same grid point
and never start more trials than the budget needs.

Resume (the Optuna engine, ``resume=True``): a RUNNING trial whose process on this machine is
gone but that left a checkpoint (``checkpoint_folder``) is *resumable*: instead of failing
it, ``fail_stale_trials`` gives it a fresh heartbeat (so that no process fails it as stale
meanwhile), and the next ``claim_trial`` takes it over before it asks for a new trial -- the
same Optuna trial, still RUNNING (Optuna lets no trial leave FAIL, so it is never failed),
with this process as its owner and ``searchlab.resumes`` counted up.  A trial whose worker
ran on another machine is failed when its heartbeat goes stale, as before: its checkpoint
is on that machine's disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import socket
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState as OptunaState

from searchlab import config
from searchlab.outcome import Claim, Proposal
from searchlab.store import stale_reason

if TYPE_CHECKING:
    from searchlab.store import StudyStore

log = logging.getLogger(__name__)

HOST_ATTR = "searchlab.host"
PID_ATTR = "searchlab.pid"
#: when that process started (``process_start``): with the pid it names one process
START_ATTR = "searchlab.pid_start"
SESSION_ATTR = "searchlab.session"
ERROR_ATTR = "error"
#: the folder of a running trial's checkpoint (``searchlab.checkpoint``), and how many times
#: the trial was taken over from a dead process
CHECKPOINT_ATTR = "searchlab.checkpoint"
RESUMES_ATTR = "searchlab.resumes"
FINISHED = (OptunaState.COMPLETE, OptunaState.PRUNED)
heartbeat_interval = config.heartbeat_interval
grace_period = config.grace_period


def hostname() -> str:
    return socket.gethostname()


def rss_mb() -> float:
    """This process's resident memory in MB (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def process_start(pid: int | None = None) -> str | None:
    """When process ``pid`` (default: this one) started: the machine's boot id and the
    process's start time in clock ticks since boot (``/proc/<pid>/stat``); None where there
    is no ``/proc``.

    A pid alone does not name a process: it is reused, and a container's entrypoint is
    always PID 1 -- in its own PID namespace, on a host (same hostname) where PID 1 is alive
    for ever.  A pid and its start time name one process for as long as the machine runs.
    """
    try:
        with open(f"/proc/{pid or 'self'}/stat") as f:
            started = f.read().rsplit(")", 1)[1].split()[19]  # field 22, after the name
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()[:8]
    except (OSError, IndexError):
        return None
    return f"{boot}:{started}"


def process_alive(pid: int, started: str | None) -> bool:
    """Whether the process that recorded ``pid`` and ``process_start()`` on this machine
    still runs (``started`` None: recorded without it, the pid alone decides)."""
    if not pid_alive(pid):
        return False
    if not started:
        return True
    now = process_start(pid)
    return now is None or now == started


def is_me(pid: Any, started: str | None) -> bool:
    """Whether ``pid`` and ``started`` were recorded by this very process."""
    return pid == os.getpid() and (not started or started == process_start())


# ---------------------------------------------------------------------------------- the lock


class StudyLock:
    """An exclusive lock over one study, shared by every process that runs it.

    Use as a context manager around a claim.  ``storage_url`` decides the kind: a
    ``flock`` file for SQLite (and any other local URL), ``pg_advisory_lock`` for PostgreSQL.
    """

    def __init__(self, *, storage: Any, storage_url: str, study_name: str, lock_dir: Path) -> None:
        self.storage = storage
        self.study_name = study_name
        self.dialect = storage_url.split(":", 1)[0].split("+", 1)[0]
        if storage_url.startswith("sqlite:///"):
            db = Path(storage_url[len("sqlite:///") :])
            self.path = db.with_name(f"{db.name}.{_digest(study_name)}.lock")
        else:
            self.path = lock_dir / f"study-{_digest(study_name)}.lock"
        if self.dialect not in ("sqlite", "postgresql"):
            log.warning(
                "%s storage: claims are locked on this machine only; run workers on several "
                "machines with a PostgreSQL storage",
                self.dialect,
            )

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        if self.dialect == "postgresql":
            with self._pg_lock():
                yield
        else:
            with self._file_lock():
                yield

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _pg_lock(self) -> Iterator[None]:
        import sqlalchemy

        key = int.from_bytes(
            hashlib.sha256(self.study_name.encode()).digest()[:8], "big", signed=True
        )
        with self.storage.engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------ heartbeats


class Heartbeat:
    """Records ``trial_id``'s heartbeat every ``interval`` seconds until ``stop()``."""

    def __init__(self, storage: Any, trial_id: int, interval: int) -> None:
        self.storage = storage
        self.trial_id = trial_id
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, name=f"heartbeat-{trial_id}", daemon=True
        )

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as exc:  # a store hiccup: the next beat retries
                log.warning("heartbeat of trial id %s not recorded: %s", self.trial_id, exc)


# ----------------------------------------------------------------------------- stale trials


def _fail(storage: Any, trial_id: int, reason: str) -> bool:
    try:
        storage.set_trial_user_attr(trial_id, ERROR_ATTR, reason)
        return bool(storage.set_trial_state_values(trial_id, state=OptunaState.FAIL))
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # another process failed (or finished) it first


def checkpoint_folder(trial: optuna.trial.FrozenTrial) -> Path | None:
    """The folder of ``trial``'s checkpoint when it holds one here, else None."""
    from searchlab import checkpoint

    folder = trial.user_attrs.get(CHECKPOINT_ATTR)
    return Path(folder) if folder and checkpoint.exists(Path(folder)) else None


def _resumable(trial: optuna.trial.FrozenTrial) -> bool:
    """A RUNNING ``trial`` of a process of this machine that is gone, with a checkpoint."""
    attrs = trial.user_attrs
    if PID_ATTR not in attrs or attrs.get(HOST_ATTR) != hostname():
        return False
    if is_me(attrs[PID_ATTR], attrs.get(START_ATTR)):
        return False
    if checkpoint_folder(trial) is None:
        return False
    return not process_alive(int(attrs[PID_ATTR]), attrs.get(START_ATTR))


def resumable_trials(store: StudyStore) -> list[optuna.trial.FrozenTrial]:
    """The RUNNING trials this process may take over (module doc), oldest first."""
    running = store.ostudy.get_trials(deepcopy=False, states=(OptunaState.RUNNING,))
    return [t for t in running if CHECKPOINT_ATTR in t.user_attrs and _resumable(t)]


def fail_stale_trials(
    store: StudyStore, *, locked: bool = False, resume: bool = False
) -> list[int]:
    """Fail every RUNNING trial whose process is gone; return their numbers.

    Optuna's own ``fail_stale_trials`` fails those whose heartbeat is older than the grace
    period (any machine); then a trial whose process id no longer exists on this machine is
    failed without waiting for the grace period, and, with ``locked`` (the caller holds the
    study lock), a RUNNING trial without an owner, left by a claimer that died inside its
    claim, and every WAITING trial (see the module doc).  The last ones carry their reason in
    the trial's ``error`` attr; the first cannot (``store.stale_reason``).

    With ``resume``, a resumable trial (module doc) is spared: it gets a fresh heartbeat
    and stays RUNNING for ``claim_trial`` to take over.
    """
    ostudy = store.ostudy
    spared: set[int] = set()
    if resume:
        for trial in resumable_trials(store):
            store.storage.record_heartbeat(trial._trial_id)
            spared.add(trial._trial_id)
    orphans: list[int] = []
    if locked:  # enqueued by a claimer that died before it asked for the trial
        for trial in ostudy.get_trials(deepcopy=False, states=(OptunaState.WAITING,)):
            why = "interrupted: its claimer stopped between enqueueing and starting it"
            if _fail(store.storage, trial._trial_id, why):
                log.warning("trial %s: %s", trial.number, why)
                orphans.append(trial.number)
    running = (OptunaState.RUNNING,)
    before = {t._trial_id: t for t in ostudy.get_trials(deepcopy=False, states=running)}
    if not before:
        return orphans
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks heartbeats experimental
        optuna.storages.fail_stale_trials(ostudy)
    still = {t._trial_id for t in ostudy.get_trials(deepcopy=False, states=running)}
    failed: list[int] = []
    for trial_id in sorted(set(before) - still):
        trial = before[trial_id]
        log.warning("trial %s (worker %s): %s", trial.number, _owner(trial), stale_reason())
        failed.append(trial.number)
    me = hostname()
    for trial_id in sorted((still & set(before)) - spared):
        trial = before[trial_id]
        attrs = trial.user_attrs
        reason = None
        if PID_ATTR not in attrs:
            if locked:
                reason = "interrupted: its worker died while claiming it"
        elif (
            attrs.get(HOST_ATTR) == me
            and not is_me(attrs[PID_ATTR], attrs.get(START_ATTR))
            and not process_alive(int(attrs[PID_ATTR]), attrs.get(START_ATTR))
        ):
            reason = f"interrupted: its worker ({_owner(trial)}) is gone (killed or crashed)"
        if reason and _fail(store.storage, trial_id, reason):
            log.warning("trial %s: %s", trial.number, reason)
            failed.append(trial.number)
    return sorted(failed + orphans)


def _owner(trial: optuna.trial.FrozenTrial) -> str:
    return f"pid {trial.user_attrs.get(PID_ATTR)} on {trial.user_attrs.get(HOST_ATTR)}"


# ---------------------------------------------------------------------------------- claims


@dataclass
class Claimed:
    state: Claim
    trial: optuna.Trial | None = None
    params: dict[str, Any] = field(default_factory=dict)
    proposal: Proposal | None = None
    failed_stale: tuple[int, ...] = ()
    #: a trial taken over from a dead process, to go on from its checkpoint
    resumed: bool = False


def key(params: Mapping[str, Any]) -> tuple:
    """A hashable form of ``params`` in which floats equal to 12 digits are equal."""

    def norm(v: Any) -> Any:
        return float(f"{v:.12g}") if isinstance(v, float) else v

    return tuple(sorted((k, norm(v)) for k, v in params.items()))


def claim_trial(
    store: StudyStore,
    lock: StudyLock,
    *,
    target: int | None,
    session: str,
    propose: Callable[[], Proposal | Claim],
    suggest: Callable[[Any], dict[str, Any]],
    resume: bool = False,
) -> Claimed:
    """Under the study lock: fail stale trials, check the budget, ask for a trial and own it.

    ``propose()`` is the engine's: a ``Proposal``, or ``Claim.DONE``/``Claim.WAIT`` when it
    has nothing to propose.  ``suggest(trial)`` gives the trial its params (they reach the
    storage while the lock is held).  Returns ``DONE`` when the budget is met, ``WAIT`` when
    running trials of other live workers cover it (one of them may still fail), else
    ``TRIAL`` with a RUNNING trial owned by this process and its params.  With ``resume``, a
    resumable trial comes first, whatever the budget says (it counted as running when it
    was claimed): ``resumed`` is then True, and ``params`` are the trial's own.
    """
    ostudy = store.ostudy
    with lock.held():
        failed = tuple(fail_stale_trials(store, locked=True, resume=resume))
        if resume:
            for frozen in resumable_trials(store):
                trial = optuna.Trial(ostudy, frozen._trial_id)  # public class, an existing trial
                _own(store, frozen._trial_id, session)
                count = int(frozen.user_attrs.get(RESUMES_ATTR, 0)) + 1
                store.storage.set_trial_user_attr(frozen._trial_id, RESUMES_ATTR, count)
                log.warning("trial %s: resumed from its checkpoint", frozen.number)
                params = suggest(trial)  # the values it has: Optuna samples none again
                return Claimed(Claim.TRIAL, trial, params, Proposal(), failed, resumed=True)
        trials = ostudy.get_trials(deepcopy=False)
        finished = sum(t.state in FINISHED for t in trials)
        running = sum(t.state == OptunaState.RUNNING for t in trials)
        if target is not None and finished >= target:
            return Claimed(Claim.DONE, failed_stale=failed)
        if target is not None and finished + running >= target:
            return Claimed(Claim.WAIT, failed_stale=failed)
        proposal = propose()
        if isinstance(proposal, Claim):
            return Claimed(proposal, failed_stale=failed)
        if proposal.params is not None:
            ostudy.enqueue_trial(proposal.params, skip_if_exists=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "heartbeat is supposed to be used with optimize"
            trial = ostudy.ask()
        storage = store.storage
        trial_id = trial._trial_id
        _own(store, trial_id, session)
        params = suggest(trial)
        if proposal.unique:
            others = {
                key(t.params)
                for t in ostudy.get_trials(deepcopy=False)
                if t._trial_id != trial_id
                and t.state in (*FINISHED, OptunaState.RUNNING, OptunaState.WAITING)
            }
            if key(trial.params) in others:  # what Optuna holds: not the fixed values shown
                reason = f"duplicate grid point {dict(params)}: dropped before training"
                log.warning("trial %s: %s", trial.number, reason)
                _fail(storage, trial_id, reason)
                return Claimed(Claim.WAIT, failed_stale=failed)
        return Claimed(Claim.TRIAL, trial, params, proposal, failed_stale=failed)


def _own(store: StudyStore, trial_id: int, session: str) -> None:
    """Record this process as the owner of ``trial_id``, and a first heartbeat."""
    storage = store.storage
    storage.set_trial_user_attr(trial_id, HOST_ATTR, hostname())
    storage.set_trial_user_attr(trial_id, PID_ATTR, os.getpid())
    started = process_start()
    if started is not None:
        storage.set_trial_user_attr(trial_id, START_ATTR, started)
    storage.set_trial_user_attr(trial_id, SESSION_ATTR, session)
    storage.record_heartbeat(trial_id)


def wait_seconds() -> float:
    """How long a worker sleeps before claiming again after ``Claim.WAIT``."""
    return min(2.0, float(heartbeat_interval()))
