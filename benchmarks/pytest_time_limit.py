"""pytest plugin of the GPU session (scripts/gpu_session.py): a time limit per test and a record of each test
as it happens, so that a run killed half way still says what passed, what failed and which test it was in.

Load it with `python -m pytest -p benchmarks.pytest_time_limit` from the repository root. Environment:
  ABFT_TEST_TIME_LIMIT_S  seconds each phase of a test (setup, call, teardown) may take; past it the phase
                          fails with TestTimeLimit. SIGALRM interrupts Python code only: a test stuck inside
                          one native call (a kernel that never ends) is only stopped by the caller's own
                          time limit, and `-o faulthandler_timeout` shows where it hung.
  ABFT_TEST_RECORD        a file that gets one JSON line per event: {"event": "collected", "nodeids": [...]},
                          {"event": "start", "nodeid"}, {"event": "report", "nodeid", "when", "outcome",
                          "duration", "message"}.
Without them it does nothing. Under pytest-xdist the workers keep time (those that run tests outside the main
thread, as xdist before 3.6 could, keep none) and the controller writes the record.
"""
from __future__ import annotations

import json
import os
import signal
import threading

import pytest

LIMIT_S = float(os.environ.get("ABFT_TEST_TIME_LIMIT_S", "0") or 0)
RECORD = os.environ.get("ABFT_TEST_RECORD")
TIMEOUT_MESSAGE = "ran past its time limit"


class TestTimeLimit(Exception):
    """A test phase ran past ABFT_TEST_TIME_LIMIT_S."""

    __test__ = False  # not a test class, whatever its name


def _record(config, event: dict) -> None:
    if RECORD and not hasattr(config, "workerinput"):  # xdist workers report to the controller, which records
        with open(RECORD, "a") as f:
            f.write(json.dumps(event) + "\n")


def _limited(item, when: str):
    if LIMIT_S <= 0 or threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return

    def on_alarm(signum, frame):
        raise TestTimeLimit(f"{item.nodeid} ({when}) {TIMEOUT_MESSAGE} of {LIMIT_S:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, LIMIT_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    yield from _limited(item, "setup")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield from _limited(item, "call")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    yield from _limited(item, "teardown")


_config = None  # the session's config, for the hooks that are not given it


def pytest_configure(config):
    global _config
    _config = config


def pytest_collection_finish(session):
    _record(session.config, {"event": "collected", "nodeids": [item.nodeid for item in session.items]})


def pytest_runtest_logstart(nodeid, location):
    _record(_config, {"event": "start", "nodeid": nodeid})


def _message(report) -> str:
    """The error lines of a failure ("E   ..."; else its last line), or a skip's reason."""
    if report.failed:
        lines = report.longreprtext.strip().splitlines()
        errors = [line[1:].strip() for line in lines if line.startswith("E ")]
        return " | ".join(errors[:3])[:500] if errors else (lines[-1][:500] if lines else "failed")
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])[:300]
    return ""


def pytest_runtest_logreport(report):
    _record(_config, {"event": "report", "nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                      "duration": round(report.duration, 2), "message": _message(report)})
