"""Fault injection for tests/dist/test_resume.py, loaded through PYTHONPATH by every process of
a test run (Python imports `sitecustomize` at start-up).

When `HANG_BEFORE_COMMIT` names a checkpoint tag, the process that opens that tag's commit file
touches `HANG_MARKER` and sleeps for good: every shard of the tag is on disk, nothing is committed,
and the test can SIGKILL the job at exactly that point instead of racing a fast save.
"""

import os
import sys
import time

_TAG = os.environ.get("HANG_BEFORE_COMMIT")
_MARKER = os.environ.get("HANG_MARKER")


def _hang_at_commit(event: str, args: tuple) -> None:
    if event != "open" or not isinstance(args[0], (str, os.PathLike)):
        return
    path = os.fspath(args[0])
    if isinstance(path, str) and f"{os.sep}{_TAG}{os.sep}.commit.json" in path:
        with open(_MARKER, "w") as f:
            f.write(f"{os.getpid()} {path}\n")
        while True:
            time.sleep(3600)


if _TAG and _MARKER:
    sys.addaudithook(_hang_at_commit)
