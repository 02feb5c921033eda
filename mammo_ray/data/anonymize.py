"""Pseudonymised manifests (``mammo-ray index --anonymize``): shareable without patient identifiers.

A manifest names its patients twice: in ``patient_id`` and the keys built from it (``lesion_id``,
``exam_key``, ``image_id``), and in its file paths, because CBIS-DDSM's folders carry the patient
ID (``Mass-Training_P_00001_LEFT_CC/...``). Anonymisation replaces both, with a keyed hash that
only the holder of the key can reproduce:

- every patient ID becomes ``anon_<16 hex>``, the first 64 bits of HMAC-SHA256(key, ID). The same
  key gives the same pseudonym on every run, so a later index of the same patients links up; without
  the key a pseudonym cannot be traced back or recomputed from a guessed ID;
- every occurrence of an original ID in any other text column (keys, reasons) is replaced by its
  pseudonym, so a reason that quotes a path names no patient either;
- each image, mask and crop path becomes a symbolic link ``<private>/links/<hash>_<SIDE>_<VIEW>.dcm``
  to the original file: the link's name is a keyed hash of the original path, plus the side and view
  tokens the path held (laterality is read from the path where a header lacks it). ``prepare`` and
  every later step read the images through the links unchanged.

The private folder holds the key (``hmac.key``, mode 0600, made on first use) and the links. It
must lie outside the work directory: manifests, crop caches, MLflow parameters and artifacts then
carry pseudonyms and link paths only, and the work directory can be shared. Keep the private
folder on the machine (or shared volume) that holds the images, like the images themselves.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mammo_ray.data.dicom import parse_side_view_from_path

KEY_FILE = "hmac.key"
LINKS = "links"
PREFIX = "anon_"
PRIVATE_ENV = "MAMMO_RAY_PRIVATE_DIR"
PATH_COLUMNS = ("image_path", "roi_mask_path", "crop_path")
ID_COLUMN = "patient_id"
_KEY_BYTES = 32


class AnonymizeError(ValueError):
    """A private folder that cannot hold the key (inside the work directory, or an unusable key file)."""


def default_private_dir() -> Path:
    """``$MAMMO_RAY_PRIVATE_DIR``, else ``~/.mammo-ray/private``."""
    return Path(os.environ.get(PRIVATE_ENV) or "~/.mammo-ray/private").expanduser().resolve()


@dataclass(frozen=True)
class Pseudonymizer:
    """Keyed pseudonyms of patient IDs and paths; ``links`` is where the path links go."""

    key: bytes
    links: Path

    def patient(self, patient_id: str) -> str:
        digest = hmac.new(self.key, b"patient\0" + patient_id.encode(), hashlib.sha256).hexdigest()
        return PREFIX + digest[:16]

    def link_for(self, path: str) -> Path:
        """The link that stands for ``path``: a keyed hash of it, with the side and view it names."""
        digest = hmac.new(self.key, b"path\0" + path.encode(), hashlib.sha256).hexdigest()[:24]
        side, view = parse_side_view_from_path(path)
        tags = "".join(f"_{v.value}" for v in (side, view) if v is not None)
        return self.links / f"{digest}{tags}{Path(path).suffix.lower() or '.dcm'}"


def open_private_dir(private: str | Path, workdir: str | Path, *also_outside: str | Path) -> Pseudonymizer:
    """The private folder's pseudonymizer; the folder and its key are made on first use.

    Raises:
        AnonymizeError: ``private`` lies inside ``workdir`` (or one of ``also_outside``, e.g. the
            manifest's folder): the key would travel with what is shared. Or the key file is not a key.
    """
    private = Path(private).expanduser().resolve()
    for shared in (workdir, *also_outside):
        shared = Path(shared).expanduser().resolve()
        if private == shared or shared in private.parents:
            raise AnonymizeError(
                f"--anonymize-dir {private}: lies inside {shared}, which is meant to be shared; "
                f"keep the key outside it (default: ~/.mammo-ray/private, or ${PRIVATE_ENV})"
            )
    private.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_file = private / KEY_FILE
    if not key_file.exists():
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(_KEY_BYTES) + "\n")
    text = key_file.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise AnonymizeError(f"{key_file}: not a key (expected at least 32 hex digits on one line)")
    links = private / LINKS
    links.mkdir(mode=0o700, exist_ok=True)
    return Pseudonymizer(key, links)


def _scrubber(mapping: dict[str, str]) -> Callable[[str], str]:
    """A function replacing every original ID in a text by its pseudonym (longest IDs first)."""
    if not mapping:
        return lambda text: text
    pattern = re.compile("|".join(re.escape(k) for k in sorted(mapping, key=len, reverse=True)))
    return lambda text: pattern.sub(lambda m: mapping[m[0]], text)


def anonymize_manifest(
    manifest: pd.DataFrame, pseudo: Pseudonymizer, report: dict[str, Any]
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The manifest and its index report with patient IDs pseudonymised and paths replaced by links.

    The links are (re)made here. Unresolved rows keep empty paths; a path given but missing on disk
    still gets its link name (a dangling link), so the row's reason and its path stay consistent.
    """
    ids = sorted({str(v) for v in manifest[ID_COLUMN] if str(v)})
    mapping = {pid: pseudo.patient(pid) for pid in ids}
    scrub = _scrubber(mapping)
    out = manifest.copy()
    out[ID_COLUMN] = out[ID_COLUMN].map(lambda v: mapping.get(str(v), str(v)))
    for column in PATH_COLUMNS:
        out[column] = out[column].map(lambda p: _link(pseudo, str(p)) if str(p) else "")
    for column in out.columns:
        if column not in PATH_COLUMNS and column != ID_COLUMN and pd.api.types.is_string_dtype(out[column]):
            out[column] = out[column].map(lambda v: scrub(str(v))).astype(manifest[column].dtype)
    # The report is JSON of the same rows (lesion IDs, reasons quoting paths): scrub it as text.
    scrubbed = json.loads(scrub(json.dumps(report, default=str)))
    scrubbed["anonymized"] = {"patients": len(ids), "links": str(pseudo.links), "pseudonym": f"{PREFIX}<16 hex>"}
    return out, scrubbed


def _link(pseudo: Pseudonymizer, path: str) -> str:
    link = pseudo.link_for(path)
    target = os.path.abspath(path)
    if os.path.islink(link):
        if os.readlink(link) == target:
            return str(link)
        link.unlink()
    os.symlink(target, link)
    return str(link)
