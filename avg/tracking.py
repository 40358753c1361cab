"""The one place that builds Sacred experiments (design.md §4).

Every step that computes something runs inside :func:`run_step`: Sacred records the step's params
slice (plus the paths it read and wrote) as its config, the git commit and dirty flag, host, start and
stop times, per-epoch figures through ``log_scalar`` and the step's final metrics as its result.

Observers: a FileStorageObserver under ``<runs_dir>/<step>/`` always; a MongoObserver as well when
``AVG_SACRED_MONGO_URL`` is set (database name from ``AVG_SACRED_MONGO_DB``, default ``avg``).

Run ids: the file observer decides them (``<step>/<n>``, the next free folder, what every output's
``sacred_run_id`` names). Sacred starts observers by priority and hands the first one's id to the rest,
and Mongo's priority (30) is above the file observer's (20): a fresh database would then say "run 1"
to a runs folder that already holds ``1`` and the step would die with ``FileExistsError``. So the file
observer goes first (:data:`FILE_PRIORITY`), and Mongo numbers its own documents, recording the file
run id in the run's ``meta.file_run_id``.
"""
from __future__ import annotations

import contextlib

import logging
import math
import os
from pathlib import Path
from typing import Any, Callable

LogFn = Callable[[str, float, "int | None"], None]
ARTIFACTS = "_artifacts"   # a step's result key: output files (not checkpoints) to attach to its run
FILE_PRIORITY = 100     # above every Sacred observer's default: the file observer names the run
logger = logging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
    """Sacred stores config and results as JSON; NaN/inf become strings rather than failing."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _jsonable(value.item())
    return value


def build_experiment(step: str, runs_dir: str | os.PathLike):
    """A Sacred Experiment named after the step, with its observers attached."""
    import warnings

    with warnings.catch_warnings():  # sacred 0.8.7 imports the deprecated pkg_resources
        warnings.simplefilter("ignore", UserWarning)
        from sacred import Experiment, SETTINGS
        from sacred.observers import FileStorageObserver

    # Capture through sys so tqdm/logging keep working in the terminal while Sacred records them.
    SETTINGS.CAPTURE_MODE = "sys"
    ex = Experiment(f"avg.{step}", save_git_info=True)
    # cout.txt keeps what the terminal finally shows (each progress bar's last state), not every redraw
    from sacred.utils import apply_backspaces_and_linefeeds
    ex.captured_out_filter = apply_backspaces_and_linefeeds
    ex.logger = logging.getLogger(f"sacred.avg.{step}")
    ex.observers.append(FileStorageObserver(str(Path(runs_dir) / step), priority=FILE_PRIORITY))
    mongo_url = os.environ.get("AVG_SACRED_MONGO_URL")
    if mongo_url:
        from sacred import observers

        class OwnIdMongoObserver(observers.MongoObserver):
            """Mongo numbering its own documents: the file run id it is handed is kept in meta, not reused
            as ``_id`` (another checkout's runs in the same database may hold it already)."""

            def started_event(self, ex_info, command, host_info, start_time, config, meta_info, _id):
                meta = {**(meta_info or {}), "file_run_id": f"{step}/{_id}" if _id is not None else None}
                return super().started_event(ex_info, command, host_info, start_time, config, meta, None)

        ex.observers.append(OwnIdMongoObserver(url=mongo_url, db_name=os.environ.get("AVG_SACRED_MONGO_DB", "avg")))
    return ex


def run_step(step: str, config: dict, fn: Callable[[LogFn, str], dict], runs_dir: str | os.PathLike = "runs") -> tuple[str, dict]:
    """Run ``fn(log, run_id)`` as one Sacred run; return ``(run_id, metrics)``.

    ``run_id`` is ``<step>/<sacred id>``, the name every output's metadata records so a report can
    trace each number to the run that produced it. Paths ``fn`` lists under the result key
    :data:`ARTIFACTS` are attached to the run as artifacts (and left out of the result).
    """
    ex = build_experiment(step, runs_dir)
    ex.add_config(_jsonable(config))
    outcome: dict[str, Any] = {}

    @ex.main
    def _main(_run):
        run_id = f"{step}/{_run._id}"

        def log(name: str, value: float, step_: int | None = None) -> None:
            _run.log_scalar(name, float(value), step_)

        metrics = dict(fn(log, run_id))
        # small outputs travel with the run (runs/<step>/<id>/, Mongo's GridFS), so Omniboard shows them
        for path in metrics.pop(ARTIFACTS, []):
            if Path(path).is_file():
                _run.add_artifact(str(path), name=Path(path).name)
        outcome["run_id"], outcome["metrics"] = run_id, metrics
        return _jsonable(metrics)

    with _signals_interrupt():
        ex.run(options={"--loglevel": "WARNING"})
    return outcome["run_id"], outcome["metrics"]


class Interrupted(KeyboardInterrupt):
    """The step was stopped by a signal (SIGTERM from Snakemake/DVC/Slurm, SIGHUP, Ctrl-C)."""

    def __init__(self, signum: int):
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _signals_interrupt():
    """SIGTERM and SIGHUP raise :class:`Interrupted` (a KeyboardInterrupt) for the run's duration, so Sacred
    records the run as INTERRUPTED (with its stop time) instead of leaving it RUNNING forever; outputs are
    written atomically, so nothing half-written remains. SIGKILL cannot be caught: such a run keeps
    RUNNING and its heartbeat stops (``run.json: heartbeat``)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, prev in old.items():
            signal.signal(sig, prev)
