"""Drawing synthetic mammograms: breast outline, pectoral muscle, parenchyma, lesions.

Everything is drawn in a canonical frame with the chest wall at column 0 and the nipple
towards +x; ``synth.py`` mirrors the result for right breasts. Values are a relative
attenuation in float32 (fat ~0.3, dense tissue ~0.7, calcium above 1) that
``to_pixels`` turns into 16-bit pixels. Lesion sizes are given in millimetres, so an
(832, 512) image and a (5000, 3000) one show the same anatomy at different resolution.
Large fields (texture) are drawn on a coarse grid and interpolated up, which keeps a
full-size image to a few hundred MB of float32 temporaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.special import expit
from skimage.draw import polygon as draw_polygon

_P = 2.2  # superellipse exponent of the breast outline (2 would be a half ellipse)
GLAND_FRACTION = {1: (0.08, 0.2), 2: (0.25, 0.45), 3: (0.5, 0.68), 4: (0.72, 0.9)}  # by BI-RADS density
GLAND_LEVEL = {1: 0.26, 2: 0.32, 3: 0.37, 4: 0.42}  # attenuation added by dense tissue


@dataclass(frozen=True)
class BreastGeometry:
    """Outline of one compressed breast in the canonical frame (pixels)."""

    height: int
    width: int
    mlo: bool
    yc: float  # row where the breast's axis meets the chest wall
    a: float  # depth from chest wall to nipple
    b: float  # half height at the chest wall
    tilt: float  # radians; positive when the nipple points down (MLO droop)
    pect_w: float = 0.0  # pectoral triangle: width along the top edge (MLO only)
    pect_h: float = 0.0  # ... and height along the chest wall
    pect_k: float = 1.0  # curvature of its edge

    def coords(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Breast coordinates (u along the axis, v across, s=1 on the skin) of pixel rows/cols."""
        c, sn = np.float32(np.cos(self.tilt)), np.float32(np.sin(self.tilt))
        dy = y - np.float32(self.yc)
        u = (x * c + dy * sn) / np.float32(self.a)
        v = (dy * c - x * sn) / np.float32(self.b)
        s = (np.maximum(u, 0) ** _P + np.abs(v) ** _P) ** np.float32(1 / _P)
        return u, v, s

    def pectoral_depth(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Signed distance (px, along x) inside the pectoral edge; negative outside."""
        if not self.mlo:
            return np.full(np.broadcast(y, x).shape, -1e6, np.float32)
        frac = np.clip(1 - y / np.float32(self.pect_h), 0, None) ** np.float32(self.pect_k)
        return np.float32(self.pect_w) * frac - x

    def point(self, u: float, w: float) -> tuple[float, float]:
        """(row, col) of breast coordinate u (0 chest wall .. 1 nipple) and w (-1..1 across)."""
        v = w * (1 - min(max(u, 0.0), 0.999) ** _P) ** (1 / _P)
        xr, yr = u * self.a, v * self.b
        c, s = np.cos(self.tilt), np.sin(self.tilt)
        return self.yc + xr * s + yr * c, xr * c - yr * s


def breast_geometry(rng: np.random.Generator, size: tuple[int, int], mlo: bool) -> BreastGeometry:
    """Draw a plausible breast outline for a CC or MLO view of an image of ``size``."""
    h, w = size
    if not mlo:
        return BreastGeometry(
            h,
            w,
            False,
            h * rng.uniform(0.45, 0.55),
            w * rng.uniform(0.58, 0.82),
            h * rng.uniform(0.3, 0.4),
            rng.uniform(-0.05, 0.05),
        )
    return BreastGeometry(
        h,
        w,
        True,
        h * rng.uniform(0.44, 0.52),
        w * rng.uniform(0.62, 0.85),
        h * rng.uniform(0.46, 0.54),
        rng.uniform(0.15, 0.3),
        w * rng.uniform(0.24, 0.4),
        h * rng.uniform(0.32, 0.5),
        rng.uniform(0.8, 1.25),
    )


def _fractal_noise(rng: np.random.Generator, shape: tuple[int, int], beta: float, stretch: float = 1.0) -> np.ndarray:
    """Zero-mean unit-variance 1/f^beta noise; ``stretch`` > 1 elongates structures along x."""
    fy = np.fft.fftfreq(shape[0]).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(shape[1]).astype(np.float32)[None, :] * np.float32(stretch)
    f = np.sqrt(fy**2 + fx**2)
    f[0, 0] = 1.0
    spec = rng.standard_normal(f.shape, np.float32) + 1j * rng.standard_normal(f.shape, np.float32)
    spec *= f ** np.float32(-beta / 2)
    spec[0, 0] = 0
    out = np.fft.irfft2(spec, s=shape).astype(np.float32)
    return (out - out.mean()) / (out.std() + 1e-12)


def _upsample(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Linear interpolation of a coarse grid to exactly ``shape`` (float32)."""
    if a.shape == tuple(shape):
        return a
    out = ndimage.zoom(a, (shape[0] / a.shape[0], shape[1] / a.shape[1]), order=1, mode="nearest", grid_mode=True)
    return np.pad(out, [(0, max(0, n - m)) for n, m in zip(shape, out.shape, strict=True)], mode="edge")[
        : shape[0], : shape[1]
    ]


def _coarse(geom: BreastGeometry, max_dim: int) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
    """Shape of a coarse grid and its pixel-centre rows/cols in full-image pixels."""
    scale = max(1.0, max(geom.height, geom.width) / max_dim)
    shape = (int(np.ceil(geom.height / scale)), int(np.ceil(geom.width / scale)))
    y = ((np.arange(shape[0], dtype=np.float32) + 0.5) * (geom.height / shape[0]) - 0.5)[:, None]
    x = ((np.arange(shape[1], dtype=np.float32) + 0.5) * (geom.width / shape[1]) - 0.5)[None, :]
    return shape, y, x


def render_breast(rng: np.random.Generator, geom: BreastGeometry, density: int, spacing_mm: float) -> np.ndarray:
    """Attenuation image of the breast (0 outside): parenchyma, skin falloff, pectoral muscle."""
    density = int(min(max(density, 1), 4))
    # Fibroglandular tissue: thresholded 1/f noise, denser behind the nipple than at the edges.
    cshape, cy, cx = _coarse(geom, 256)
    u, v, s = geom.coords(cy, cx)
    prior = np.exp(-(((u - 0.45) / 0.45) ** 2) - (v / 0.8) ** 2).astype(np.float32)
    field = _fractal_noise(rng, cshape, 3.0, stretch=1.6) + 1.2 * prior
    inside = s < 1
    lo, hi = GLAND_FRACTION[density]
    q = np.quantile(field[inside], 1 - rng.uniform(lo, hi)) if inside.any() else 0.0
    gland = expit((field - q) / 0.5)
    level = GLAND_LEVEL[density] * rng.uniform(0.9, 1.1)
    tissue = _upsample((0.27 + level * gland).astype(np.float32), (geom.height, geom.width))
    # Fine strands (ducts, ligaments) converging on the nipple, strongest in dense tissue.
    fshape, _, _ = _coarse(geom, 1024)
    fine = _fractal_noise(rng, fshape, 2.0, stretch=3.0) * np.float32(rng.uniform(0.035, 0.055))
    tissue += _upsample(fine, tissue.shape) * (0.4 + tissue)
    del fine
    y = np.arange(geom.height, dtype=np.float32)[:, None]
    x = np.arange(geom.width, dtype=np.float32)[None, :]
    _, _, s = geom.coords(y, x)
    thickness = np.sqrt(np.clip(1 - np.minimum(s, 1) ** 6, 0, 1))  # compressed breast rounds off at the skin
    del s
    if geom.mlo:
        depth = geom.pectoral_depth(y, x)
        weight = expit(depth / np.float32(1.5 / spacing_mm))
        muscle = 0.72 + 0.1 * np.clip(depth / np.float32(geom.pect_w), 0, 1) + 0.02 * (tissue - 0.5)
        tissue += weight * (muscle * rng.uniform(0.95, 1.08) - tissue)
        thickness = np.maximum(thickness, weight)
    tissue *= thickness
    return tissue


def lesion_center(geom: BreastGeometry, u: float, w: float, radius_px: float) -> tuple[float, float]:
    """Pixel centre of a lesion at breast coordinates (u, w), kept off the pectoral muscle."""
    for _ in range(20):
        y, x = geom.point(u, w)
        clear = -geom.pectoral_depth(np.asarray(y, np.float32), np.asarray(x, np.float32)) - 1.3 * radius_px
        if clear >= 0 or u > 0.85:
            break
        u += 0.05
    y = float(np.clip(y, radius_px, geom.height - 1 - radius_px))
    return y, float(np.clip(x, radius_px, geom.width - 1 - radius_px))


def _wrap(angle: np.ndarray) -> np.ndarray:
    """Angle difference wrapped to [-pi, pi)."""
    return (angle + np.float32(np.pi)) % np.float32(2 * np.pi) - np.float32(np.pi)


def _window(shape: tuple[int, int], cy: float, cx: float, half: float):
    """Slices of a square window around (cy, cx) and its pixel offsets from the centre."""
    y0, y1 = max(0, int(cy - half)), min(shape[0], int(cy + half) + 2)
    x0, x1 = max(0, int(cx - half)), min(shape[1], int(cx + half) + 2)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
    return (slice(y0, y1), slice(x0, x1)), dy, dx


@dataclass(frozen=True)
class MassLook:
    """How one mass looks; ``seed`` fixes its lobes and spicules so CC and MLO agree."""

    shape: str  # CSV "mass shape", e.g. "IRREGULAR-ARCHITECTURAL_DISTORTION"
    margins: str  # CSV "mass margins", e.g. "SPICULATED"
    diameter_mm: float
    contrast: float  # attenuation added at the core
    seed: int


def draw_mass(
    att: np.ndarray, center: tuple[float, float], look: MassLook, spacing_mm: float, angle: float, scale: float = 1.0
) -> tuple[tuple[slice, slice], np.ndarray]:
    """Add a mass to ``att`` in place; return its window and the binary outline inside it.

    Shape sets the outline (round/oval ellipse, lobulated, irregular harmonics, distortion),
    margins set the edge (sharp, blurred, obscured sectors, microlobules, spicules).
    """
    rng = np.random.default_rng(look.seed)
    shape, margins = set(look.shape.upper().split("-")), set(look.margins.upper().split("-"))
    radius = look.diameter_mm * scale / 2 / spacing_mm
    distortion = "ARCHITECTURAL_DISTORTION" in shape and not shape & {"ROUND", "OVAL", "LOBULATED", "IRREGULAR"}
    asym = bool(shape & {"ASYMMETRIC_BREAST_TISSUE", "FOCAL_ASYMMETRIC_DENSITY"})
    aspect = rng.uniform(1.0, 1.35)
    for name, lims in (
        ("LOBULATED", (1.05, 1.45)),
        ("OVAL", (1.35, 1.8)),
        ("LYMPH_NODE", (1.4, 1.9)),
        ("ROUND", (1.0, 1.12)),
    ):
        aspect = rng.uniform(*lims) if name in shape else aspect
    harm = [(k, 0.015, rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)]
    edge, n_spic, spic_len = 0.035, 0, (0.6, 1.6)
    if "LOBULATED" in shape:
        harm.append((int(rng.integers(3, 6)), rng.uniform(0.08, 0.14), rng.uniform(0, 2 * np.pi)))
    if shape & {"IRREGULAR", "ARCHITECTURAL_DISTORTION"} or asym:
        harm += [(k, rng.uniform(0.06, 0.15) / k**0.4, rng.uniform(0, 2 * np.pi)) for k in range(2, 13)]
    if "MICROLOBULATED" in margins:
        harm += [
            (int(k), rng.uniform(0.025, 0.045), rng.uniform(0, 2 * np.pi))
            for k in rng.choice(np.arange(10, 19), 4, replace=False)
        ]
        edge = max(edge, 0.05)
    if "ILL_DEFINED" in margins or asym:
        edge = max(edge, rng.uniform(0.16, 0.3))
        harm += [(k, rng.uniform(0.02, 0.05), rng.uniform(0, 2 * np.pi)) for k in range(6, 15)]
    if not margins & {"CIRCUMSCRIBED", "OBSCURED", "MICROLOBULATED", "ILL_DEFINED", "SPICULATED"}:
        edge = max(edge, 0.08)  # NA / unknown margins
    n_sectors = int(rng.integers(1, 3)) if "OBSCURED" in margins else 0  # arcs of the edge hidden by tissue
    sectors = [(rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 1.3)) for _ in range(n_sectors)]
    if "SPICULATED" in margins or distortion:
        n_spic = int(rng.integers(18, 30) if distortion else rng.integers(10, 22))
        spic_len = (1.0, 2.0) if distortion else spic_len
    spicules = [
        (rng.uniform(0, 2 * np.pi), rng.uniform(*spic_len), rng.uniform(0.25, 0.6), rng.uniform(0.45, 0.85))
        for _ in range(n_spic)
    ]  # (angle, length / radius, width mm, amplitude)
    # Infiltrating margins come with a heterogeneous interior; circumscribed masses are homogeneous.
    infiltrating = bool(margins & {"ILL_DEFINED", "SPICULATED", "MICROLOBULATED"}) or distortion
    hetero = 0.45 if infiltrating else 0.05
    texture_seed = int(rng.integers(2**31))
    half = radius * (np.sqrt(aspect) * 1.4 + (spic_len[1] if n_spic else 0) + 4 * max(edge, 0.25 if sectors else 0)) + 3
    sl, dy, dx = _window(att.shape, center[0], center[1], half)
    rho = np.hypot(dy, dx)
    theta = np.arctan2(dy, dx) - np.float32(angle)

    def outline(t):
        ell = np.sqrt(aspect) / np.sqrt(np.cos(t) ** 2 + aspect**2 * np.sin(t) ** 2)
        return radius * ell * (1 + sum(a * np.cos(k * t + p) for k, a, p in harm))

    r = outline(theta).astype(np.float32)
    edge_t = np.full_like(r, edge)
    for mid, width in sectors:
        edge_t += 0.25 * np.exp(-((_wrap(theta - mid) / width) ** 2))
    core_r = r * (0.3 if distortion else 1.0)
    core = expit((core_r - rho) / np.maximum(edge_t * radius, 0.7))
    val = core * (1 + 0.3 * np.clip(1 - rho / core_r, 0, 1)) * (0.6 if distortion else 0.75 if asym else 1.0)
    grain = _fractal_noise(np.random.default_rng(texture_seed), (max(int(2 * half / radius * 12), 8),) * 2, 2.0)
    val *= 1 + np.float32(hetero) * np.clip(_upsample(grain, val.shape), -1.5, 2.0)
    spikes = sum(np.exp(-((_wrap(theta - a) / 0.12) ** 2)) for a, *_ in spicules) if spicules else 0
    mask = rho < r * (1 + 0.3 * np.minimum(spikes, 1.5))  # outlines of spiculated masses take in the spicule roots
    if "LYMPH_NODE" in shape:  # fatty hilum notch on one side
        hx = dx * np.cos(angle) + dy * np.sin(angle) - 0.7 * radius * np.sqrt(aspect)
        val -= 0.6 * np.exp(-(hx**2 + (dy * np.cos(angle) - dx * np.sin(angle)) ** 2) / (2 * (0.3 * radius) ** 2))
    for alpha, length, width_mm, amp in spicules:
        ca, sa = np.cos(alpha + angle), np.sin(alpha + angle)
        along, perp = dx * ca + dy * sa, -dx * sa + dy * ca
        r_a = float(outline(np.float32(alpha))) * (0.15 if distortion else 0.85)
        t = (along - r_a) / (length * radius + (0.85 * radius if distortion else 0.15 * r_a))
        w = max(width_mm / spacing_mm, 0.6) * (1 - 0.6 * np.clip(t, 0, 1))
        val = np.maximum(val, amp * np.where((t >= 0) & (t <= 1), (1 - t) * np.exp(-(perp**2) / (2 * w**2)), 0))
    if not infiltrating:  # a homogeneous (fluid / fibroadenoma-like) mass hides the tissue texture behind it
        hide = np.float32(0.8) * core
        att[sl] += hide * (ndimage.gaussian_filter(att[sl], max(0.25 * radius, 1.0)) - att[sl])
    att[sl] += np.float32(look.contrast) * val.astype(np.float32)
    return sl, mask


@dataclass(frozen=True)
class CalcLook:
    """How one calcification cluster looks; ``seed`` fixes its specks for both views."""

    calc_type: str  # CSV "calc type", e.g. "PLEOMORPHIC-FINE_LINEAR_BRANCHING"
    distribution: str  # CSV "calc distribution", e.g. "CLUSTERED"
    extent_mm: float
    contrast: float  # scales each speck's attenuation
    seed: int


_CALC_COUNT = {
    "PLEOMORPHIC": (12, 30),
    "FINE_LINEAR_BRANCHING": (5, 10),
    "AMORPHOUS": (15, 35),
    "PUNCTATE": (6, 15),
    "ROUND_AND_REGULAR": (4, 10),
    "LUCENT_CENTER": (3, 8),
    "EGGSHELL": (2, 5),
    "COARSE": (1, 4),
    "DYSTROPHIC": (2, 5),
    "VASCULAR": (1, 3),
    "LARGE_RODLIKE": (2, 5),
    "SKIN": (3, 6),
}
_CALC_ALIAS = {"LUCENT_CENTERED": "LUCENT_CENTER", "MILK_OF_CALCIUM": "PUNCTATE"}


def _line(y, x, length, orient, step):
    n = max(2, int(length / step))
    t = np.linspace(0, length, n)
    return y + t * np.sin(orient), x + t * np.cos(orient)


def _speck(rng: np.random.Generator, kind: str, y: float, x: float, step: float) -> list[tuple]:
    """Stamps (y, x, sigma_major, sigma_minor, orientation, ring radius, amplitude), in mm."""
    o = rng.uniform(0, np.pi)
    if kind == "PLEOMORPHIC":
        s = rng.uniform(0.08, 0.25)
        return [(y, x, s, s / rng.uniform(1, 2.5), o, 0, rng.uniform(0.4, 0.9))]
    if kind == "AMORPHOUS":
        return [(y, x, rng.uniform(0.07, 0.12), rng.uniform(0.07, 0.12), o, 0, rng.uniform(0.2, 0.35))]
    if kind == "ROUND_AND_REGULAR":
        s = 0.25 * rng.uniform(0.92, 1.08)
        return [(y, x, s, s, o, 0, 0.7)]
    if kind in ("LUCENT_CENTER", "SKIN", "EGGSHELL"):
        return [(y, x, 0.12, 0.12, o, rng.uniform(1, 2) if kind == "EGGSHELL" else rng.uniform(0.4, 1.0), 0.55)]
    if kind in ("COARSE", "DYSTROPHIC"):
        return [
            (
                y + rng.normal(0, 0.6),
                x + rng.normal(0, 0.6),
                rng.uniform(0.3, 0.6),
                rng.uniform(0.3, 0.6),
                o,
                0,
                rng.uniform(0.7, 1.0),
            )
            for _ in range(int(rng.integers(3, 7)))
        ]  # popcorn
    if kind == "LARGE_RODLIKE":
        return [(y, x, rng.uniform(0.8, 1.8), rng.uniform(0.2, 0.35), rng.normal(0, 0.3), 0, 0.8)]
    if kind == "FINE_LINEAR_BRANCHING":  # a duct cast with one side branch, broken in places
        sig, o, length = rng.uniform(0.06, 0.1), rng.normal(0, 0.5), rng.uniform(1.5, 4)
        ys, xs = _line(y, x, length, o, step)
        fork = o + rng.choice([-1, 1]) * rng.uniform(0.4, 0.8)
        by, bx = _line(ys[len(ys) // 2], xs[len(xs) // 2], length / 2, fork, step)
        pts = [p for p in zip(np.r_[ys, by], np.r_[xs, bx], strict=True) if rng.random() > 0.15]
        return [(py, px, sig, sig, o, 0, rng.uniform(0.4, 0.7)) for py, px in pts]
    if kind == "VASCULAR":  # tram-track calcified vessel walls
        gap, length = rng.uniform(0.8, 1.6), rng.uniform(6, 12)
        out = []
        for side in (-0.5, 0.5):
            ys, xs = _line(y + side * gap * np.cos(o), x - side * gap * np.sin(o), length, o, step)
            out += [(py, px, 0.1, 0.1, o, 0, 0.45) for py, px in zip(ys, xs, strict=True) if rng.random() > 0.2]
        return out
    s = rng.uniform(0.1, 0.17)  # PUNCTATE and anything unknown
    return [(y, x, s, s, o, 0, rng.uniform(0.5, 0.8))]


def _distribute(rng: np.random.Generator, dist: str, n: int, ext: float) -> np.ndarray:
    """Speck centres (mm, n x 2) for a CSV calc distribution of extent ``ext`` mm."""
    if dist == "LINEAR":
        t = rng.uniform(-ext / 2, ext / 2, n)
        return np.c_[rng.normal(0, 0.06 * ext, n), t]
    if dist == "SEGMENTAL":  # a wedge of ducts fanning out from an apex
        t, a = rng.uniform(0, ext, n), rng.normal(0, 0.3, n)
        return np.c_[t * np.sin(a), t * np.cos(a) - ext / 2]
    reach = {"REGIONAL": 0.75, "DIFFUSELY_SCATTERED": 1.0}.get(dist)
    if reach:
        r, a = reach * ext * np.sqrt(rng.uniform(0, 1, n)), rng.uniform(0, 2 * np.pi, n)
        return np.c_[r * np.sin(a), r * np.cos(a)]
    return np.clip(rng.normal(0, ext / 4, (n, 2)), -ext / 2, ext / 2)  # CLUSTERED / NA


def draw_calcs(
    att: np.ndarray, center: tuple[float, float], look: CalcLook, spacing_mm: float, angle: float, scale: float = 1.0
) -> tuple[tuple[slice, slice], np.ndarray]:
    """Add a calcification cluster to ``att`` in place; return its window and ROI (hull + margin)."""
    rng = np.random.default_rng(look.seed)
    kinds = [_CALC_ALIAS.get(k, k) for k in look.calc_type.upper().split("-")]
    kinds = [k if k in _CALC_COUNT else "PUNCTATE" for k in kinds]
    dist = look.distribution.upper().split("-")[0]
    n = int(rng.integers(*_CALC_COUNT[kinds[0]]) * (1.4 if dist in ("REGIONAL", "DIFFUSELY_SCATTERED") else 1))
    centres = _distribute(rng, dist, max(n, 1), look.extent_mm * scale)
    step = max(0.5 * spacing_mm, 0.05)
    stamps = np.array([st for y, x in centres for st in _speck(rng, kinds[int(rng.integers(len(kinds)))], y, x, step)])
    c, s = np.cos(angle), np.sin(angle)
    py = (stamps[:, 0] * c + stamps[:, 1] * s) / spacing_mm  # rotate the cluster with the view
    px = (stamps[:, 1] * c - stamps[:, 0] * s) / spacing_mm
    margin = 1.5 / spacing_mm + 2
    reach = 4 * float(stamps[:, 2].max() + stamps[:, 5].max()) / spacing_mm
    half = float(np.max(np.abs(np.r_[py, px]))) + margin + reach + 4
    sl, dy, dx = _window(att.shape, center[0], center[1], half)
    patch = np.zeros((dy.shape[0], dx.shape[1]), np.float32)
    oy, ox = center[0] - sl[0].start, center[1] - sl[1].start
    for (_, _, smaj, smin, orient, ring, amp), yy, xx in zip(stamps, py + oy, px + ox, strict=True):
        sa, sb, rr = max(smaj / spacing_mm, 0.6), max(smin / spacing_mm, 0.6), ring / spacing_mm
        amp *= min(1.0, smaj / spacing_mm / 0.6) ** 0.5 * min(1.0, smin / spacing_mm / 0.6) ** 0.5  # partial volume
        h = int(4 * sa + rr) + 2
        y0, y1 = max(0, int(yy) - h), min(patch.shape[0], int(yy) + h + 1)
        x0, x1 = max(0, int(xx) - h), min(patch.shape[1], int(xx) + h + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        ly, lx = np.arange(y0, y1)[:, None] - yy, np.arange(x0, x1)[None, :] - xx
        a, b = lx * np.cos(orient) + ly * np.sin(orient), -lx * np.sin(orient) + ly * np.cos(orient)
        d2 = (np.hypot(a, b) - rr) ** 2 / sa**2 if rr else a**2 / sa**2 + b**2 / sb**2
        patch[y0:y1, x0:x1] += amp * np.exp(-0.5 * d2)
    att[sl] += np.float32(look.contrast) * patch
    pts = np.c_[py + oy, px + ox]
    circle = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    ring = np.c_[np.sin(circle), np.cos(circle)]
    pts = (pts[:, None, :] + margin * ring[None]).reshape(-1, 2)
    try:
        hull = pts[ConvexHull(pts).vertices]
    except QhullError:
        hull = pts
    mask = np.zeros(patch.shape, bool)
    mask[draw_polygon(hull[:, 0], hull[:, 1], patch.shape)] = True
    return sl, mask


def to_pixels(att: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Attenuation to 16-bit MONOCHROME2 pixels with detector noise; background stays near 0."""
    noise = rng.standard_normal(att.shape, np.float32)
    noise *= np.float32(40000 * rng.uniform(0.004, 0.012)) * np.sqrt(att + np.float32(0.02))
    noise += att * np.float32(40000) + np.float32(60)
    return np.clip(noise, 0, 65535).astype(np.uint16)
