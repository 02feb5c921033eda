"""Run pytest for ``make test``, then leave without tearing down the interpreter's native libraries.

A 44-minute suite passed 1085 tests in CI, printed its summary, and then the interpreter died with
SIGSEGV while it finalized (``make: *** [test] Segmentation fault``), so CI reported a failure. By then
every fixture had been torn down and Ray shut down; what was left were the C++ destructors of the
libraries that one process had loaded over 40 minutes (Ray's core worker and gRPC, torch, pyarrow) and
daemon threads of other libraries (schemathesis' ASGI portal, tqdm's monitor). A crash there says
nothing about the code under test, and it is rare: the first in this project's CI runs.

So this runner returns pytest's own exit status: it runs pytest, then the ``atexit`` handlers (Ray's
shutdown and schemathesis' portal among them, with the fault handler on, so a crash there still prints
every thread's stack and fails), flushes the output, and exits with ``os._exit``, which skips the
finalization where the crash happened. A failure or an error in a test still fails the run.

Usage: ``python -X faulthandler scripts/run_tests.py [pytest arguments]``
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import sys

import pytest


def main() -> None:
    code = int(pytest.main(sys.argv[1:]))
    faulthandler.enable(all_threads=True)  # pytest turns its own off when it ends
    atexit._run_exitfuncs()  # what a normal exit would run first: nothing the handlers do is skipped
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
