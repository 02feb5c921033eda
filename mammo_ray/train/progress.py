"""Epoch lines from wherever training runs, printed by the command's own process.

A Ray Train worker, or a cross-validation fold's Ray task, runs in another process, perhaps on
another node, and the CLI starts Ray without forwarding its workers' output (``cli.console``: it
also carries Ray Train's internal chatter). So the trainer sends its one line per epoch over a
Ray queue (``ray.util.queue.Queue``, an actor that takes no CPU) and ``EpochLines`` prints it
here. ``announce`` also prints the line where it runs, so the worker's log keeps it too.
"""

from __future__ import annotations

import sys
import threading
from types import TracebackType
from typing import Any

from ray.util.queue import Empty, Queue

QUEUE_KEY = "progress_queue"  # in a train loop config: the queue that takes this run's lines
PREFIX_KEY = "progress_prefix"  # in a train loop config: what each line starts with ("[fold 2] ")


def announce(cfg: dict[str, Any], line: str) -> None:
    """Print one progress line here and, when the driver listens (``cfg[QUEUE_KEY]``), send it there."""
    line = f"{cfg.get(PREFIX_KEY) or ''}{line}"
    print(line, flush=True)
    queue = cfg.get(QUEUE_KEY)
    if queue is not None:
        try:
            queue.put_nowait(line)
        except Exception:  # noqa: BLE001 - progress is best effort: a full or gone queue never stops training
            pass


class EpochLines:
    """A queue whose lines a background thread prints to ``stream`` until the block ends.

    Use as ``with EpochLines() as lines: cfg[QUEUE_KEY] = lines.queue; ...``. Lines still queued
    when the block ends are printed before it returns.
    """

    def __init__(self, stream: Any = None, poll_s: float = 0.5) -> None:
        self.stream, self.poll_s = stream or sys.stdout, poll_s
        self.queue: Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> EpochLines:
        self.queue = Queue(actor_options={"num_cpus": 0})
        self._thread = threading.Thread(target=self._print, name="mammo-ray-epoch-lines", daemon=True)
        self._thread.start()
        return self

    def _print(self) -> None:
        assert self.queue is not None
        while not self._stop.is_set():
            try:
                line = self.queue.get(timeout=self.poll_s)
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - the queue's actor is gone (Ray shut down): stop printing
                return
            print(line, file=self.stream, flush=True)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.queue is not None:
            try:
                for line in self.queue.get_nowait_batch(self.queue.qsize()):
                    print(line, file=self.stream, flush=True)
                self.queue.shutdown()
            except Exception:  # noqa: BLE001 - Ray went away with the block's error: that error is the news
                pass
