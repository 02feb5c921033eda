"""Ensemble members that disagree by a known amount, made from one trained checkpoint.

Two copies of one checkpoint make an ensemble whose mean, max, median and first member all agree, so
a test of the averaging passes whatever the code combines. A member here is the trained network with
its class-1 logit moved by ``shift``: the same features, a different probability everywhere.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mammo_ray.train.checkpoint import checkpoint_payload, load_checkpoint, restore_model, save_checkpoint


def shifted_member(checkpoint: str | Path, out_dir: Path, shift: float) -> Path:
    """A copy of ``checkpoint`` whose classifier adds ``shift`` to the class-1 logit; returns its file."""
    payload = load_checkpoint(checkpoint)
    model, spec, config = restore_model(payload)
    with torch.no_grad():
        model.get_classifier().bias[1] += shift
    shifted = checkpoint_payload(
        model=model, config=config, spec=spec, epoch=payload["epoch"], history=payload["history"]
    )
    return save_checkpoint(shifted, out_dir)


def shifted_members(checkpoint: str | Path, out_dir: Path, shifts: tuple[float, ...]) -> list[Path]:
    """One ``shifted_member`` per shift, in ``out_dir/member_<i>``."""
    return [shifted_member(checkpoint, out_dir / f"member_{i}", shift) for i, shift in enumerate(shifts)]
