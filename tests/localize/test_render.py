"""Heatmap overlays without pyplot: the Serve replica renders the overlays of concurrent /v1/localize
requests in threads, and pyplot's one global registry of figures would let them mix."""

from __future__ import annotations

import base64
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mammo_ray.localize.findings import Finding
from mammo_ray.localize.render import overlay_base64


def _case(k: int) -> tuple[np.ndarray, np.ndarray, list[Finding]]:
    rng = np.random.default_rng(k)
    image = rng.normal(1000, 50, (120, 80)).astype(np.float32)
    y, x = np.mgrid[0:120, 0:80]
    heat = np.exp(-((x - 10 - 6 * k) ** 2 + (y - 20 - 8 * k) ** 2) / 200.0)
    box = Finding(x0=5 + 6 * k, y0=15 + 8 * k, x1=20 + 6 * k, y1=30 + 8 * k, score=float(heat.max()), area=225.0)
    return image, heat, [box]


def test_overlays_rendered_at_once_in_threads_equal_those_rendered_one_by_one():
    cases = [_case(k) for k in range(6)]

    def render(k: int) -> str:
        image, heat, boxes = cases[k]
        return overlay_base64(image, heat, boxes, title=f"case {k}", max_side=200)

    alone = [render(k) for k in range(6)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        together = list(pool.map(render, [k for _ in range(3) for k in range(6)]))
    assert together == alone * 3  # byte for byte: no figure drew into another
    assert len(set(alone)) == 6 and all(base64.b64decode(a)[:4] == b"\x89PNG" for a in alone)


def test_rendering_never_imports_pyplot():
    code = (
        "import sys, numpy as np\n"
        "from mammo_ray.localize.render import overlay_base64\n"
        "overlay_base64(np.ones((40, 30), np.float32), np.zeros((40, 30)), [], title='t')\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
