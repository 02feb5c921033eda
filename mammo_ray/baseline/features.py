"""Hand-crafted lesion features for the non-deep-learning baseline (paper 000 §2.4; see docs/papers.md).

Paper 000 compares its CNNs with two classical methods: Sahiner's texture, morphological
and run-length features fed to linear discriminant analysis, and Huo's spiculation,
sharpness, gray level, contrast and texture features. ``lesion_features`` computes one
fixed-order vector in that spirit for a lesion crop and its ROI mask:

    glcm_*      Haralick / GLCM statistics inside the lesion, averaged over 4 angles
    glrlm_*     gray-level run-length statistics inside the lesion, averaged over 4 directions
    int_*       intensity statistics inside the lesion, its contrast against a surrounding
                ring and the sharpness of its margin
    shape_*     area, perimeter, eccentricity, solidity, compactness, extent, and two
                spiculation measures of the radial profile of the outline

Simplifications against the papers: no rubber-band straightening transform, and texture is
measured inside the lesion rather than on the straightened margin band. The lesion is the
mask as given, all of its components: the crop cache stores each lesion's own ROI mask, so a
neighbouring lesion in the same crop is not in it (an earlier cache stored the union of the
film's ROIs, and the largest component could then be the neighbour). Everything here is plain
numpy / scipy / scikit-image, deterministic, and for research use only.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, signal, stats
from skimage.feature import graycomatrix, graycoprops
from skimage.measure import find_contours, label, regionprops

GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")
GLCM_DISTANCES = (1, 2, 4)  # pixels of the stored crop
ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)  # the 4 GLCM / run directions
GLRLM_NAMES = ("sre", "lre", "gln", "rln", "rp")
PERCENTILES = (10, 25, 50, 75, 90)

FEATURE_NAMES: list[str] = [
    *(f"glcm_{prop.lower()}_d{d}" for prop in GLCM_PROPS for d in GLCM_DISTANCES),
    *(f"glrlm_{name}" for name in GLRLM_NAMES),
    "int_mean",
    "int_std",
    "int_skewness",
    "int_kurtosis",
    *(f"int_p{q}" for q in PERCENTILES),
    "int_ring_contrast",
    "int_margin_sharpness",
    "shape_area",
    "shape_perimeter",
    "shape_eccentricity",
    "shape_solidity",
    "shape_compactness",
    "shape_extent",
    "shape_radial_cv",
    "shape_radial_peaks",
]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of ``mask > 0``; ValueError when the mask is empty.

    Not used by ``lesion_features`` (which takes a lesion's own mask whole); kept for masks that
    hold several lesions, e.g. a ``whole`` cache entry.
    """
    labels = label(np.asarray(mask) > 0, connectivity=2)
    if labels.max() == 0:
        raise ValueError("mask is empty (no pixel > 0): there is no lesion to describe")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def quantize(image: np.ndarray, region: np.ndarray, levels: int) -> np.ndarray:
    """Gray levels ``0..levels-1`` over the intensity range inside ``region``; -1 outside it.

    A region of one intensity maps to level 0.
    """
    if levels < 2:
        raise ValueError(f"levels must be at least 2, got {levels}")
    values = image.astype(np.float64)
    lo, hi = float(values[region].min()), float(values[region].max())
    scale = levels / (hi - lo) if hi > lo else 0.0
    q = np.clip(np.floor((values - lo) * scale), 0, levels - 1).astype(np.int64)
    return np.where(region, q, -1)


def glcm_features(q: np.ndarray, levels: int) -> np.ndarray:
    """Haralick statistics (``GLCM_PROPS`` x ``GLCM_DISTANCES``), each averaged over ``ANGLES``.

    Pairs with a pixel outside the region (level -1) are left out: the region is shifted to
    levels 1..L, outside becomes 0, and row and column 0 of the co-occurrence matrix are dropped.
    """
    shifted = (q + 1).astype(np.uint16)
    glcm = graycomatrix(shifted, GLCM_DISTANCES, ANGLES, levels=levels + 1, symmetric=True)[1:, 1:]
    # graycoprops normalises each (distance, angle) matrix; an empty one (no pairs at that
    # distance in a tiny lesion) gives 0, or 1 for correlation.
    return np.stack([graycoprops(glcm, prop).mean(axis=1) for prop in GLCM_PROPS]).ravel()


def _direction_lines(q: np.ndarray, angle_index: int) -> np.ndarray:
    """``q`` rearranged so that the lines of direction ``ANGLES[angle_index]`` are its rows,
    padded with -1 where a skewed line has no pixel."""
    h, w = q.shape
    if angle_index == 0:
        return q
    if angle_index == 2:
        return q.T
    # Diagonals: shift row i by i (45 deg: r + c constant) or by h-1-i (135 deg: c - r
    # constant); the columns are then the lines.
    rows = np.arange(h)[:, None]
    shift = rows if angle_index == 1 else (h - 1 - rows)
    skewed = np.full((h, h + w - 1), -1, dtype=q.dtype)
    skewed[rows, shift + np.arange(w)[None, :]] = q
    return skewed.T


def run_lengths(q: np.ndarray, angle_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Gray level and length of every maximal run of equal levels along one direction.

    Runs never cross a pixel outside the region (level -1), which is not itself a run.

    Returns:
        ``(levels, lengths)``, two int arrays with one element per run.
    """
    lines = _direction_lines(q, angle_index)
    padded = np.pad(lines, ((0, 0), (0, 1)), constant_values=-1)  # a -1 ends every line's last run
    flat = padded.ravel()
    starts = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]])
    lengths = np.diff(np.r_[starts, flat.size])
    values = flat[starts]
    keep = values >= 0
    return values[keep], lengths[keep]


def run_length_matrix(q: np.ndarray, levels: int, angle_index: int) -> np.ndarray:
    """The gray-level run-length matrix ``P[i, j-1]``: how many runs of level i have length j."""
    values, lengths = run_lengths(q, angle_index)
    max_len = max(q.shape)
    counts = np.bincount(values * max_len + (lengths - 1), minlength=levels * max_len)
    return counts.reshape(levels, max_len)


def glrlm_features(q: np.ndarray, levels: int) -> np.ndarray:
    """Galloway's run-length statistics, averaged over the 4 directions of ``ANGLES``.

    With ``P(i, j)`` the number of runs of gray level i and length j in one direction,
    ``N_r = sum P`` the number of runs and ``N_p`` the number of region pixels
    (M. M. Galloway, "Texture analysis using gray level run lengths", CGIP 4, 1975; the
    pyradiomics GLRLM documentation uses the same definitions):

        SRE = sum_ij P(i,j) / j^2 / N_r          short-run emphasis
        LRE = sum_ij P(i,j) * j^2 / N_r          long-run emphasis
        GLN = sum_i (sum_j P(i,j))^2 / N_r       gray-level non-uniformity
        RLN = sum_j (sum_i P(i,j))^2 / N_r       run-length non-uniformity
        RP  = N_r / N_p                          run percentage

    Returns:
        ``[SRE, LRE, GLN, RLN, RP]``.
    """
    n_pixels = int((q >= 0).sum())
    per_direction = []
    for angle_index in range(len(ANGLES)):
        p = run_length_matrix(q, levels, angle_index).astype(np.float64)
        j = np.arange(1, p.shape[1] + 1, dtype=np.float64)
        n_runs = p.sum()
        per_direction.append(
            [
                (p / j**2).sum() / n_runs,
                (p * j**2).sum() / n_runs,
                (p.sum(axis=1) ** 2).sum() / n_runs,
                (p.sum(axis=0) ** 2).sum() / n_runs,
                n_runs / n_pixels,
            ]
        )
    return np.asarray(per_direction).mean(axis=0)


def intensity_features(image: np.ndarray, lesion: np.ndarray, any_lesion: np.ndarray) -> np.ndarray:
    """Statistics of the crop-standardised intensities inside the lesion, plus:

    ``ring_contrast``: (lesion mean - ring mean) / crop std, the ring being a band around the
    lesion (width a third of its equivalent radius, at least 2 px) outside every lesion mask;
    0 when no such band fits in the crop. ``margin_sharpness``: mean gradient magnitude on the
    lesion's boundary pixels, in crop standard deviations per pixel.
    """
    values = image.astype(np.float64)
    std = values.std()
    z = (values - values.mean()) / std if std > 0 else np.zeros_like(values)  # as the CNN's meanvar
    inside = z[lesion]
    radius = np.sqrt(lesion.sum() / np.pi)
    width = max(2, int(round(radius / 3)))
    ring = ndimage.binary_dilation(lesion, iterations=width) & ~any_lesion
    ring_contrast = float(inside.mean() - z[ring].mean()) if ring.any() else 0.0
    boundary = lesion & ~ndimage.binary_erosion(lesion)
    gradient = np.hypot(ndimage.sobel(z, axis=0), ndimage.sobel(z, axis=1)) / 8.0  # sobel sums 8 weights
    moments = [inside.mean(), inside.std()]
    if inside.std() > 0:
        moments += [stats.skew(inside), stats.kurtosis(inside)]
    else:  # a flat lesion: skewness and kurtosis are undefined, call them 0
        moments += [0.0, 0.0]
    return np.asarray([*moments, *np.percentile(inside, PERCENTILES), ring_contrast, float(gradient[boundary].mean())])


def radial_profile(lesion: np.ndarray) -> np.ndarray:
    """Distances from the centroid to the points of the lesion's outline, in outline order."""
    padded = np.pad(lesion.astype(np.float64), 1)  # closes outlines that touch the crop border
    contour = max(find_contours(padded, 0.5), key=len) - 1.0
    cy, cx = np.argwhere(lesion).mean(axis=0)
    return np.hypot(contour[:, 0] - cy, contour[:, 1] - cx)


def spiculation(profile: np.ndarray, *, prominence: float = 0.1) -> tuple[float, int]:
    """Margin roughness from the radial profile: its coefficient of variation, and how many
    local maxima rise more than ``prominence`` x the mean radius above their surroundings.

    The outline is circular, so the profile is smoothed and searched wrapped around; the
    smoothing (2 outline points) merges the twin maxima of a spicule tip that is 2 px wide.
    """
    mean = float(profile.mean())
    if mean == 0:
        return 0.0, 0
    n = profile.size
    smooth = ndimage.gaussian_filter1d(profile, 2.0, mode="wrap")
    peaks, _ = signal.find_peaks(np.r_[smooth, smooth, smooth], prominence=prominence * mean)
    return float(profile.std() / mean), int(((peaks >= n) & (peaks < 2 * n)).sum())


def shape_features(lesion: np.ndarray) -> np.ndarray:
    """Morphology of the lesion (sizes relative to the crop, so independent of ``cache_px``)."""
    props = regionprops(lesion.astype(np.uint8))[0]
    side = float(np.sqrt(lesion.size))
    area, perimeter = float(props.area), float(props.perimeter)
    compactness = perimeter**2 / (4 * np.pi * area) if perimeter > 0 else 1.0  # one pixel: call it round
    radial_cv, peaks = spiculation(radial_profile(lesion))
    return np.asarray(
        [
            area / lesion.size,
            perimeter / side,
            props.eccentricity,
            props.solidity,
            compactness,
            props.extent,
            radial_cv,
            peaks,
        ],
        dtype=np.float64,
    )


def lesion_features(image: np.ndarray, mask: np.ndarray, *, levels: int = 32) -> np.ndarray:
    """The ``FEATURE_NAMES`` vector of one lesion crop.

    Args:
        image: the 2-D crop (any numeric dtype, e.g. the cache's uint16).
        mask: the lesion's own ROI mask, same shape; > 0 marks lesion pixels, all of which
            (every component) are the lesion.
        levels: gray levels texture is quantised to, over the lesion's intensity range.

    Raises:
        ValueError: when the shapes differ or are not 2-D, or when the mask is empty.
    """
    image, mask = np.asarray(image), np.asarray(mask)
    if image.ndim != 2 or image.shape != mask.shape:
        raise ValueError(f"image {image.shape} and mask {mask.shape} must be 2-D arrays of one shape")
    lesion = mask > 0
    if not lesion.any():
        raise ValueError("mask is empty (no pixel > 0): there is no lesion to describe")
    rows, cols = np.flatnonzero(lesion.any(axis=1)), np.flatnonzero(lesion.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))  # texture: the lesion's bounding box
    q = quantize(image[box], lesion[box], levels)
    vector = np.concatenate(
        [
            glcm_features(q, levels),
            glrlm_features(q, levels),
            intensity_features(image, lesion, lesion),
            shape_features(lesion),
        ]
    )
    if not np.all(np.isfinite(vector)):
        bad = [name for name, v in zip(FEATURE_NAMES, vector, strict=True) if not np.isfinite(v)]
        raise ValueError(f"non-finite lesion features {bad}")
    return vector
