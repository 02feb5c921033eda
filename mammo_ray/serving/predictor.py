"""``mammo_ray.load``: a trained model in this process, without Ray or HTTP.

    import mammo_ray
    model = mammo_ray.load("models:/mammo-ray-demo-ensemble@champion")  # or a checkpoint, a run id
    model.predict("scan.dcm", box=(120, 80, 200, 160))         # one view (DICOM, PNG, TIFF, bytes, array)
    model.predict(cc="cc.dcm", mlo="mlo.dcm")                   # a CC+MLO pair: the mean of the views
    model.localize("full.dcm")                                  # heatmap array and boxes, original pixels
    model.info()                                                # lineage: runs, members, config, metrics

A ``Predictor`` holds the same ``ModelRuntime`` one Serve replica holds, and a request goes through
the same steps: ``predict`` returns exactly the fields of ``POST /v1/predict`` (the HTTP app builds
a ``PredictItem`` from the form, this builds it from the arguments), so a probability from Python
equals the served one, which equals ``mammo-ray evaluate``'s for the same lesion. Bad input raises
``UploadError`` (a ``ValueError``) that names the argument and the reason, as the app's 4xx does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from mammo_ray.constants import DISCLAIMER
from mammo_ray.data.images import DecodedImage, decode_array, read_image
from mammo_ray.localize.whole_image import Localization
from mammo_ray.serving.runtime import ModelRuntime, PredictItem, ServeSettings
from mammo_ray.serving.uploads import UploadError, upload_errors

ImageInput = str | os.PathLike[str] | bytes | bytearray | memoryview | np.ndarray
Coordinates = Sequence[int] | str | None  # (x0, y0, x1, y1) / (x, y), or the HTTP form's "x0,y0,x1,y1" text


def _coordinates(value: Coordinates, field: str) -> str | None:
    """A box or point as the HTTP form's text, so that one parser (``parse_box`` / ``parse_point``) checks both."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, Sequence):
        raise UploadError(422, f"expected a sequence of integers, got {type(value).__name__}", field)
    return ",".join(str(v) for v in value)


class Predictor:
    """One trained model (a checkpoint, a run's model, or a registered ensemble), ready to predict.

    Build it with ``mammo_ray.load`` (or ``Predictor.load``). Everything runs in this process, on
    the device the settings choose (``device="auto"``: CUDA when there is one).
    """

    def __init__(self, runtime: ModelRuntime) -> None:
        self.runtime = runtime

    @classmethod
    def load(
        cls,
        model: str | os.PathLike[str],
        *,
        tracking_uri: str | None = None,
        workdir: str | os.PathLike[str] | None = None,
        device: str = "auto",
        **settings: Any,
    ) -> Predictor:
        """Load ``model``: a checkpoint file or folder, a run id (``runs:/<id>``), ``models:/<name>/<version>``
        or ``models:/<name>@<alias>``. ``settings`` are ``ServeSettings`` fields (``threshold``,
        ``execution``, ``roi_default``, ``localize_tile``, ...), as ``mammo-ray serve --set`` takes them."""
        values = {"model": os.fspath(model), "tracking_uri": tracking_uri, "device": device, **settings}
        if workdir is not None:
            values["workdir"] = os.fspath(workdir)
        return cls(ModelRuntime(ServeSettings(**values)))

    def decode(self, value: ImageInput | None, field: str = "image") -> tuple[str, DecodedImage]:
        """An image argument as (its name, the decoded image), under the settings' caps; bad input
        raises ``UploadError`` naming ``field``. A local file missing its DICOM preamble (an old
        export) is still read as DICOM."""
        s = self.runtime.settings
        decode: Callable[[], DecodedImage]
        if isinstance(value, (bytes, bytearray, memoryview)):
            name, data = f"<{field} bytes>", bytes(value)

            def decode() -> DecodedImage:  # under the upload caps, as the HTTP app decodes bytes
                return read_image(data, name=name, max_bytes=s.max_bytes, max_dim=s.max_dim)

        elif isinstance(value, np.ndarray):
            name = f"<{field} array>"
            array = value

            def decode() -> DecodedImage:
                return decode_array(array, name=name, max_dim=s.max_dim)

        elif isinstance(value, (str, os.PathLike)):
            name = os.fspath(value)

            def decode() -> DecodedImage:
                return read_image(name, max_dim=s.max_dim, force_dicom=True)  # a local file: no upload size cap

        else:
            raise UploadError(
                422, f"expected a file path, bytes or a 2-D numpy array, got {type(value).__name__}", field
            )
        with upload_errors(field, name):
            return name, decode()

    def predict(
        self,
        image: ImageInput | None = None,
        box: Coordinates = None,
        seed: Coordinates = None,
        *,
        cc: ImageInput | None = None,
        mlo: ImageInput | None = None,
        cc_box: Coordinates = None,
        cc_seed: Coordinates = None,
        mlo_box: Coordinates = None,
        mlo_seed: Coordinates = None,
    ) -> dict[str, Any]:
        """The probability of class 1 (malignant for the pathology task) of one view, or of a CC+MLO pair.

        Args:
            image: one view: a DICOM, PNG or TIFF path, the file's bytes, or a 2-D array (H, W).
            box: the ROI (x0, y0, x1, y1) in pixels of the image as given, x1/y1 exclusive.
            seed: an ROI seed point (x, y) instead of a box; neither: ``roi_default`` (the whole image).
            cc, mlo: a pair instead of ``image`` (with ``cc_box`` / ``cc_seed``, ``mlo_box`` / ``mlo_seed``).

        Returns:
            The fields of ``POST /v1/predict``: ``probability``, ``label`` at ``threshold``, the
            members' ``mean``/``std``/``quantiles``, per-view probabilities, ``model_version`` and
            the disclaimer.

        Raises:
            UploadError: a bad image, ROI or argument combination (the argument and the reason).
        """
        if image is not None and (cc is not None or mlo is not None):
            raise UploadError(422, "give either an image or the pair cc= and mlo=, not both", "image")
        rois: dict[str, str | None]
        if image is not None:
            files = {"file": self.decode(image, "image")}
            rois = {"box": _coordinates(box, "box"), "seed": _coordinates(seed, "seed")}
        elif cc is not None and mlo is not None:
            if box is not None or seed is not None:
                raise UploadError(422, "a pair takes cc_box/cc_seed and mlo_box/mlo_seed, not box/seed", "box")
            files = {"cc": self.decode(cc, "cc"), "mlo": self.decode(mlo, "mlo")}
            rois = {
                "cc_box": _coordinates(cc_box, "cc_box"),
                "cc_seed": _coordinates(cc_seed, "cc_seed"),
                "mlo_box": _coordinates(mlo_box, "mlo_box"),
                "mlo_seed": _coordinates(mlo_seed, "mlo_seed"),
            }
        else:
            missing = "image" if cc is None and mlo is None else ("mlo" if mlo is None else "cc")
            raise UploadError(422, f"missing {missing!r}: give one image, or cc= and mlo=", missing)
        item = PredictItem(files=files, rois={k: v for k, v in rois.items() if v})
        result = self.runtime.predict_items([item])[0]
        if isinstance(result, UploadError):
            raise result
        return result

    def tensor(self, image: ImageInput, box: Coordinates = None, seed: Coordinates = None) -> torch.Tensor:
        """One view as the members take it, (1, C, H, W) on the CPU: decoded, cropped around ``box`` or
        ``seed`` as ``predict`` crops it, and transformed (``explain`` and ``dream`` start from it)."""
        name, decoded = self.decode(image, "image")
        rois = {"box": _coordinates(box, "box"), "seed": _coordinates(seed, "seed")}
        x, _ = self.runtime.view_tensor(name, decoded, rois)
        return x[None]

    def locate(
        self, image: ImageInput, method: str | None = None, *, threshold: float | None = None
    ) -> tuple[Localization, DecodedImage]:
        """``localize`` as objects: the ``Localization`` (map, boxes, scores) and the decoded image."""
        name, decoded = self.decode(image, "image")
        return self.runtime.locate(name, decoded, threshold=threshold, method=method)

    def localize(
        self, image: ImageInput, method: str | None = None, *, threshold: float | None = None
    ) -> dict[str, Any]:
        """The map of one whole mammogram and its boxes, in pixels of the image as given.

        Args:
            image: a whole mammogram (path, bytes or 2-D array).
            method: ``dense`` (patch classifiers, paper 003), ``cam`` (paper 004) or ``gradcam``;
                None: the model's default.
            threshold: the box threshold (default: the settings' ``localize_threshold``).

        Returns:
            The fields of ``POST /v1/localize`` (``boxes``, ``image_score``, ``method``, ...) plus
            ``heatmap``, the map at the image's size (H, W) as float32, and ``spread``, the members'
            standard deviation at the same size; both in the image's own orientation.
        """
        found, _ = self.locate(image, method, threshold=threshold)
        return {
            **found.to_dict(),
            "heatmap": found.heatmap().astype(np.float32),
            "spread": found.heatmap(spread=True).astype(np.float32),
            "model_version": self.runtime.version,
            "disclaimer": DISCLAIMER,
        }

    def info(self) -> dict[str, Any]:
        """The lineage (``GET /v1/model``): version, member runs, config, metrics, execution, device."""
        return self.runtime.info()

    def __repr__(self) -> str:
        r = self.runtime
        return (
            f"Predictor({r.version!r}: {len(r.members)} x {r.config.model.name} {r.view_mode}, "
            f"task {r.config.data.task}, {r.device}; {DISCLAIMER})"
        )
