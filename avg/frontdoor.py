"""One front door at a time: Snakemake and DVC share a lock on the project.

Both tools lock only themselves (``.snakemake/locks``, ``.dvc/tmp/lock``, and DVC releases its lock while
a stage's command runs), so ``snakemake`` started while ``dvc repro`` runs would read outputs DVC is
deleting, and ``dvc.lock`` would end up disagreeing with itself. Here the front door that runs steps
claims the project in ``.avg-frontdoor.json`` (tool, pid, process start time):

* Snakemake's main process claims it when the Snakefile is read (not for a dry run);
* every ``avg <step>`` whose ancestor process is ``dvc`` or ``snakemake`` claims it for that ancestor, so a
  ``dvc repro`` holds the claim from its first stage to its last.

A claim by another tool's process that is still alive (same pid *and* start time, so a reused pid does not
count) refuses the newcomer with a message naming it; a claim by a process that has exited is stale and
taken over. Updates happen under an ``flock`` on ``.avg-frontdoor.lock``, so two claims never interleave.
Steps run by hand (no front door above them) neither claim nor check.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from datetime import datetime
from pathlib import Path

from avg.errors import UserError

RECORD = ".avg-frontdoor.json"
MUTEX = ".avg-frontdoor.lock"
TOOLS = ("snakemake", "dvc")


def _tool_of(cmdline: list[str]) -> str | None:
    """``snakemake`` / ``dvc`` when the command line runs one of them (as a script or ``python -m``)."""
    args = [os.path.basename(a) for a in cmdline[:3]]
    for i, a in enumerate(args):
        if a in TOOLS:
            return a
        if a == "-m" and i + 1 < len(args) and args[i + 1] in TOOLS:
            return args[i + 1]
    return None


def front_door(pid: int | None = None) -> tuple[str, int, float] | None:
    """``(tool, pid, create_time)`` of the nearest ancestor that is Snakemake or DVC, or None."""
    import psutil

    try:
        proc = psutil.Process(pid or os.getpid()).parent()
        while proc is not None:
            tool = _tool_of(proc.cmdline())
            if tool:
                return tool, proc.pid, proc.create_time()
            proc = proc.parent()
    except (psutil.Error, OSError):
        return None
    return None


def _alive(pid: int, created: float) -> bool:
    import psutil

    try:
        return abs(psutil.Process(pid).create_time() - created) < 1e-3
    except (psutil.Error, OSError):
        return False


@contextlib.contextmanager
def _mutex(root: Path):
    with open(root / MUTEX, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def claim(root: str | Path, tool: str, pid: int, created: float) -> None:
    """Claim the project at ``root`` for ``tool`` (process ``pid`` started at ``created``), or raise
    :class:`UserError` naming the other front door that holds it."""
    root = Path(root)
    record = root / RECORD
    with _mutex(root):
        try:
            held = json.loads(record.read_text())
        except (OSError, ValueError):
            held = None
        if isinstance(held, dict) and (held.get("pid"), held.get("created")) != (pid, created) \
                and _alive(int(held.get("pid", -1)), float(held.get("created", 0))):
            since = datetime.fromtimestamp(float(held["created"])).strftime("%Y-%m-%d %H:%M:%S")
            other = held.get("tool", "another front door")
            raise UserError(f"{other} (pid {held['pid']}, started {since}) is running steps in this project "
                            f"({root.resolve()}); {tool} must not run beside it (one would read outputs the other "
                            f"is rewriting). Wait for it to finish or stop it; the claim is in {record}")
        if not (isinstance(held, dict) and (held.get("pid"), held.get("created")) == (pid, created)):
            tmp = record.with_name(record.name + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"tool": tool, "pid": pid, "created": created}) + "\n")
            os.replace(tmp, record)


def claim_for_this_process(root: str | Path, tool: str) -> None:
    """The front door's own claim (Snakemake's main process)."""
    import psutil

    me = psutil.Process(os.getpid())
    claim(root, tool, me.pid, me.create_time())


def claim_for_step(root: str | Path = ".") -> None:
    """A step's claim on behalf of the front door above it; nothing when run by hand."""
    door = front_door()
    if door is not None:
        claim(root, *door)
