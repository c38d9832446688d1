"""Packaging hook for the optional compiled build (README: "Compiled build").

By default respworkers installs as pure Python, everywhere. With ``RESPWORKERS_COMPILE=1``
the broker's hot modules (:data:`HOT`) are compiled with mypyc, which turns typed Python
into C extensions: the same code, about half the CPU per job in the broker core. It needs
mypy and a C compiler at build time:

    RESPWORKERS_COMPILE=1 pip install --no-build-isolation .     # or pip wheel

``make compiled`` builds them into build/compiled for ``make test-compiled`` and the
benchmarks, leaving the source tree pure.
"""

from __future__ import annotations

import os

from setuptools import setup

#: What the broker runs for every message: the wire codec, the sockets and the core.
HOT = [
    "respworkers/protocol.py",
    "respworkers/sockets.py",
    "respworkers/broker/channel.py",
    "respworkers/broker/commits.py",
    "respworkers/broker/core.py",
    "respworkers/broker/deadlines.py",
    "respworkers/broker/journal.py",
    "respworkers/broker/model.py",
    "respworkers/broker/notify.py",
    "respworkers/broker/policy.py",
    "respworkers/broker/queues.py",
    "respworkers/broker/registry.py",
    "respworkers/broker/requests.py",
    "respworkers/broker/server.py",
    "respworkers/broker/timers.py",
    "respworkers/broker/timetable.py",
    "respworkers/broker/workers.py",
]


def ext_modules() -> list:
    if os.environ.get("RESPWORKERS_COMPILE") != "1":
        return []
    from mypyc.build import mypycify

    return mypycify(HOT, opt_level=os.environ.get("RESPWORKERS_OPT_LEVEL", "3"))


setup(ext_modules=ext_modules())
