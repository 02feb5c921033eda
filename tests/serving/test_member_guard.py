"""``MemberGuard``: Grad-CAM (exclusive) never overlaps another use of the members; other uses overlap."""

from __future__ import annotations

import threading
import time

from mammo_ray.serving.runtime import MemberGuard


def test_shared_users_overlap_and_an_exclusive_one_runs_alone():
    guard, lock = MemberGuard(), threading.Lock()
    active = {"shared": 0, "exclusive": 0}
    seen = {"max_shared": 0, "overlap_with_exclusive": 0}

    def use(kind: str) -> None:
        with guard.exclusive() if kind == "exclusive" else guard.shared():
            with lock:
                active[kind] += 1
                seen["max_shared"] = max(seen["max_shared"], active["shared"])
                if active["exclusive"] and (active["shared"] or active["exclusive"] > 1):
                    seen["overlap_with_exclusive"] += 1
            time.sleep(0.02)
            with lock:
                active[kind] -= 1

    threads = [threading.Thread(target=use, args=("exclusive" if i % 5 == 2 else "shared",)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()  # a deadlock hangs here, and the suite timeout reports it
    assert seen["overlap_with_exclusive"] == 0
    assert seen["max_shared"] >= 2  # predictions and dense maps still run side by side
