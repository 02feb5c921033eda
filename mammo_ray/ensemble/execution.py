"""How the ensemble runs: all members batched in one call, or one member after another.

An ensemble of M seed-members (paper 000) can run two ways, with the same outputs:

    loop      member 1 on the whole batch, then member 2, ...: M small computations. Wins on
              CPUs (measured here: about 1.5x faster than stacked for 10 x resnet18).
    stacked   every parameter and buffer stacked on a leading member axis
              (``torch.func.stack_module_state``) and one ``torch.vmap`` of
              ``torch.func.functional_call`` over that axis: one computation for all members,
              in which every convolution becomes one grouped convolution. Should win on GPUs,
              where M small per-member launches leave the device idle.

Which is faster depends on the device, the member count and the batch, so it is measured,
not assumed: ``choose_execution(ensemble, example)`` times both on an example batch on the
ensemble's device and returns the faster one (if their outputs agree) with a JSON-safe
report of both timings, which the Serve app exposes under ``/v1/model``.

Stacking copies the weights (the stacked module holds its own tensors): keep only the module
``choose_execution`` returns to hold one copy. ``member_chunk`` bounds how many members one
``vmap`` call runs, so activations for 100 members fit in memory.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state

from mammo_ray.config import Config
from mammo_ray.data.transforms import TransformSpec
from mammo_ray.ensemble.model import Ensemble, member_inputs, member_name

__all__ = [
    "EXECUTION_MODES",
    "LoopEnsemble",
    "StackedEnsemble",
    "StackedExecutionError",
    "check_stackable",
    "choose_execution",
    "measure_execution",
]

EXECUTION_MODES = ("auto", "loop", "stacked")
TOLERANCE = 1e-4  # max |loop - stacked| probability for "auto" to accept stacked (measured: ~1e-6)


class StackedExecutionError(RuntimeError):
    """``torch.vmap`` could not run the members stacked (e.g. an op without a batching rule)."""


def _architecture(model: nn.Module) -> str:
    info = getattr(model, "info", None)
    name = getattr(info, "name", None) or type(model).__name__
    view_mode = getattr(model, "view_mode", None)
    return f"{name} ({view_mode})" if view_mode else name


def _state_shapes(model: nn.Module) -> dict[str, tuple[str, tuple[int, ...], torch.dtype]]:
    return {
        **{k: ("parameter", tuple(v.shape), v.dtype) for k, v in model.named_parameters()},
        **{k: ("buffer", tuple(v.shape), v.dtype) for k, v in model.named_buffers()},
    }


def _describe(entry: tuple[str, tuple[int, ...], torch.dtype] | None) -> str:
    if entry is None:
        return "missing"
    kind, shape, dtype = entry
    return f"{kind} {list(shape)} {str(dtype).removeprefix('torch.')}"


def _structure(model: nn.Module) -> dict[str, str]:
    """Each submodule's type and hyperparameters (stride, padding, ...), which no weight shape shows.

    Dropout is left out: inactive in eval, it may differ between members without changing outputs.
    """
    return {
        name: f"{type(m).__name__}({m.extra_repr()})"
        for name, m in model.named_modules()
        if not isinstance(m, nn.modules.dropout._DropoutNd)
    }


def check_stackable(members: Sequence[nn.Module]) -> None:
    """Raise ValueError naming the first member whose parameters, buffers or modules differ from member 0's."""
    if len(members) == 0:
        raise ValueError("a stacked ensemble needs at least one member")
    ref_state, ref_modules = _state_shapes(members[0]), _structure(members[0])
    for index, member in enumerate(members[1:], start=1):
        if type(member) is not type(members[0]):
            raise ValueError(
                f"{member_name(index)} is a {type(member).__name__}, {member_name(0)} a "
                f"{type(members[0]).__name__}: stacked members must share one architecture"
            )
        state = _state_shapes(member)
        for key in [*ref_state, *(k for k in state if k not in ref_state)]:
            ours, theirs = ref_state.get(key), state.get(key)
            if ours != theirs:
                raise ValueError(
                    f"{member_name(index)} differs from {member_name(0)} in {key!r} "
                    f"({_describe(theirs)} vs {_describe(ours)}): stacked members must share one "
                    "architecture"
                )
        modules = _structure(member)
        for key in [*ref_modules, *(k for k in modules if k not in ref_modules)]:
            if ref_modules.get(key) != modules.get(key):
                raise ValueError(
                    f"{member_name(index)} differs from {member_name(0)} in module {key or '<root>'!r} "
                    f"({modules.get(key)} vs {ref_modules.get(key)})"
                )


class StackedEnsemble(nn.Module):
    """All members in one ``vmap`` over stacked weights; ``forward`` is ``Ensemble.forward``'s.

    Args:
        members: view models of one architecture (same parameter and buffer names, shapes and
            dtypes, same module hyperparameters), in eval mode, all on one device.
        view_mode: their view mode (default: member 0's ``view_mode``); decides the inputs.
        member_chunk: members per ``vmap`` call (None: all at once). Smaller chunks bound the
            activations (chunk x batch images at a time) at the cost of more calls.

    Raises:
        ValueError: naming the first member (``member_XXX``) and key that differ from member 0.
    """

    mode = "stacked"

    def __init__(
        self, members: Sequence[nn.Module], *, view_mode: str | None = None, member_chunk: int | None = None
    ) -> None:
        super().__init__()
        members = list(members)
        check_stackable(members)
        if member_chunk is not None and member_chunk < 1:
            raise ValueError(f"member_chunk must be >= 1 or None, got {member_chunk}")
        self.view_mode: str = view_mode or str(getattr(members[0], "view_mode", "single"))
        self.num_members = len(members)
        self.member_chunk = member_chunk
        self.architecture = _architecture(members[0])
        with torch.no_grad():
            params, buffers = stack_module_state(members)
        # The "stateless" copy functional_call runs: its structure, no data (the documented pattern).
        # Kept out of the module tree (a tuple is not registered), so .to(device) never touches meta.
        self._base = (copy.deepcopy(members[0]).to("meta").eval(),)
        # Stacked tensors as buffers (no gradients: inference only), so .to(device) moves them.
        # Indexed names: parameter names hold dots, which buffer names may not.
        self._param_keys, self._buffer_keys = list(params), list(buffers)
        for i, key in enumerate(self._param_keys):
            self.register_buffer(f"param_{i}", params[key].detach(), persistent=False)
        for i, key in enumerate(self._buffer_keys):
            self.register_buffer(f"buffer_{i}", buffers[key], persistent=False)
        self.spec: TransformSpec | None = None  # set by from_ensemble
        self.config: Config | None = None

    @classmethod
    def from_ensemble(cls, ensemble: Ensemble, *, member_chunk: int | None = None) -> StackedEnsemble:
        """Stack an ``Ensemble``'s members; its ``spec`` and ``config`` come along."""
        stacked = cls(list(ensemble.members), view_mode=ensemble.view_mode, member_chunk=member_chunk)
        stacked.spec, stacked.config = ensemble.spec, ensemble.config
        return stacked

    def _stacked(self, start: int, stop: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        # Leading-axis slices are views: chunking copies nothing.
        params = {key: getattr(self, f"param_{i}")[start:stop] for i, key in enumerate(self._param_keys)}
        buffers = {key: getattr(self, f"buffer_{i}")[start:stop] for i, key in enumerate(self._buffer_keys)}
        return params, buffers

    def forward(self, x: Tensor | Sequence[Tensor]) -> Tensor:
        """Member probabilities of class 1 (malignant), ``(N, M)``: the inputs of ``Ensemble.forward``.

        Raises:
            StackedExecutionError: vmap failed for this architecture (the message names it).
        """
        inputs = member_inputs(self.view_mode, x)  # the same input contract as the loop
        base = self._base[0]

        def member_probs(params: dict[str, Tensor], buffers: dict[str, Tensor], *args: Tensor) -> Tensor:
            return torch.softmax(functional_call(base, (params, buffers), args).float(), dim=1)[:, 1]

        batched = torch.vmap(member_probs, in_dims=(0, 0, *(None for _ in inputs)))  # inputs shared by all
        chunk = self.member_chunk or self.num_members
        out = []
        with torch.inference_mode():
            for start in range(0, self.num_members, chunk):
                params, buffers = self._stacked(start, min(start + chunk, self.num_members))
                try:
                    out.append(batched(params, buffers, *inputs))  # (chunk, N)
                except (RuntimeError, NotImplementedError) as exc:
                    raise StackedExecutionError(
                        f"{self.architecture}: torch.vmap over {self.num_members} stacked "
                        f"members failed: {type(exc).__name__}: {exc}"
                    ) from exc
        return torch.cat(out).T


class LoopEnsemble(nn.Module):
    """The members one after another on the whole batch (``Ensemble.forward``), beside ``StackedEnsemble``."""

    mode = "loop"

    def __init__(self, ensemble: Ensemble) -> None:
        super().__init__()
        self.ensemble = ensemble
        self.view_mode, self.spec, self.config = ensemble.view_mode, ensemble.spec, ensemble.config
        self.num_members = len(ensemble.members)

    def forward(self, x: Tensor | Sequence[Tensor]) -> Tensor:
        return self.ensemble(x)


def _device(module: nn.Module) -> torch.device:
    tensor: Tensor | None = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _to(example: Tensor | Sequence[Tensor], device: torch.device) -> Tensor | tuple[Tensor, ...]:
    return example.to(device) if isinstance(example, Tensor) else tuple(t.to(device) for t in example)


def _batch_shape(example: Tensor | Sequence[Tensor]) -> list:
    return list(example.shape) if isinstance(example, Tensor) else [list(t.shape) for t in example]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _timed(fn: Callable[[], Tensor], device: torch.device) -> tuple[float, Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # time this call only, not work queued before it
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously: wait for them
    return time.perf_counter() - start, out


def _measure(
    loop: LoopEnsemble,
    stacked: StackedEnsemble | None,
    stacked_error: str | None,
    example: Tensor | Sequence[Tensor],
    repeats: int,
    warmup: int,
) -> dict[str, Any]:
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    device = _device(loop)
    example = _to(example, device)
    runs: dict[str, Callable[[], Tensor]] = {"loop": lambda: loop(example)}
    if stacked is not None:
        runs["stacked"] = lambda: stacked(example)
    times: dict[str, list[float]] = {name: [] for name in runs}
    outputs: dict[str, Tensor] = {}
    caught: list[str] = []
    for i in range(warmup + repeats):
        order = list(runs) if i % 2 == 0 else list(runs)[::-1]  # alternate: drift hits both
        for name in order:
            if name not in runs:  # stacked failed earlier in this measurement
                continue
            try:
                with warnings.catch_warnings(record=True) as record:
                    warnings.simplefilter("always")
                    seconds, out = _timed(runs[name], device)
                caught += [str(w.message) for w in record if str(w.message) not in caught]
            except StackedExecutionError as exc:
                stacked_error = str(exc)
                del runs[name], times[name]
                continue
            outputs.setdefault(name, out.detach().cpu())
            if i >= warmup:
                times[name].append(seconds)
    report: dict[str, Any] = {
        "loop_s": statistics.median(times["loop"]),
        "stacked_s": statistics.median(times["stacked"]) if "stacked" in times else None,
        "max_abs_diff": (float((outputs["loop"] - outputs["stacked"]).abs().max()) if "stacked" in outputs else None),
        "stacked_error": stacked_error,
        "loop_times_s": times["loop"],
        "stacked_times_s": times.get("stacked"),
        "device": str(device),
        "device_name": _device_name(device),
        "members": loop.num_members,
        "member_chunk": stacked.member_chunk if stacked is not None else None,
        "batch_shape": _batch_shape(example),
        "repeats": repeats,
        "warmup": warmup,
        "torch": torch.__version__,
        "warnings": caught,  # e.g. vmap's "performance drop" fallbacks
    }
    if report["stacked_s"] is not None:
        report["ratio_loop_to_stacked"] = report["loop_s"] / report["stacked_s"]
    return report


def _try_stack(ensemble: Ensemble, member_chunk: int | None) -> tuple[StackedEnsemble | None, str | None]:
    try:
        return StackedEnsemble.from_ensemble(ensemble, member_chunk=member_chunk), None
    except ValueError as exc:  # members of different architectures: only the loop can run them
        return None, f"cannot stack: {exc}"


def measure_execution(
    ensemble: Ensemble,
    example: Tensor | Sequence[Tensor],
    *,
    repeats: int = 3,
    warmup: int = 1,
    member_chunk: int | None = None,
) -> dict[str, Any]:
    """Time the loop and the stacked execution of ``ensemble`` on ``example``, on the ensemble's device.

    Each of ``warmup + repeats`` rounds runs both, in alternating order; the first ``warmup``
    rounds are not timed. CUDA is synchronised around each call.

    Returns:
        JSON-safe: ``loop_s`` and ``stacked_s`` (median seconds per forward of the batch;
        ``stacked_s`` None if stacking failed), ``max_abs_diff`` (probabilities, loop vs stacked),
        ``stacked_error`` (None, or why stacking or vmap failed), each run's times, the device,
        member count, batch shape and any warnings raised (vmap's slow fallbacks show there).
    """
    stacked, error = _try_stack(ensemble, member_chunk)
    return _measure(LoopEnsemble(ensemble), stacked, error, example, repeats, warmup)


def choose_execution(
    ensemble: Ensemble,
    example: Tensor | Sequence[Tensor],
    *,
    mode: str = "auto",
    repeats: int = 3,
    warmup: int = 1,
    member_chunk: int | None = None,
    tolerance: float = TOLERANCE,
    measure: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """The ensemble as the faster of loop and stacked on its device, and the report of why.

    Args:
        ensemble: the members (on the device they will be served on).
        example: a batch like the ones to be served (size matters: it decides which wins).
        mode: ``auto`` (measure, take the faster if outputs agree within ``tolerance``, else the
            loop), ``loop`` or ``stacked`` (forced; still measured for the report unless
            ``measure=False``).
        repeats, warmup, member_chunk: as in ``measure_execution``.
        measure: False skips timing for a forced mode (the report's timings are then None).

    Returns:
        ``(module, report)``: a ``LoopEnsemble`` or ``StackedEnsemble`` (``forward(x) -> (N, M)``,
        with ``spec``, ``config``, ``view_mode``), and the JSON-safe ``measure_execution`` report
        plus ``mode``, ``chosen``, ``reason`` and ``tolerance``.

    Raises:
        StackedExecutionError: ``mode="stacked"`` and the members cannot run stacked.
    """
    if mode not in EXECUTION_MODES:
        raise ValueError(f"unknown execution mode {mode!r}; expected one of {EXECUTION_MODES}")
    if mode == "auto" and not measure:
        raise ValueError("mode='auto' chooses by measuring: measure=False needs mode='loop' or 'stacked'")
    loop = LoopEnsemble(ensemble)
    stacked, error = _try_stack(ensemble, member_chunk) if mode != "loop" or measure else (None, None)
    if measure:
        report = _measure(loop, stacked, error, example, repeats, warmup)
    else:
        device = _device(loop)
        report = {
            "loop_s": None,
            "stacked_s": None,
            "max_abs_diff": None,
            "stacked_error": error,
            "device": str(device),
            "device_name": _device_name(device),
            "members": loop.num_members,
            "member_chunk": member_chunk,
            "batch_shape": _batch_shape(example),
            "torch": torch.__version__,
        }
    error = report["stacked_error"]
    if mode == "stacked":
        if error is not None:
            raise StackedExecutionError(f"mode='stacked' was asked for, but {error}")
        chosen, reason = "stacked", "requested (mode='stacked')"
    elif mode == "loop":
        chosen, reason = "loop", "requested (mode='loop')"
    elif error is not None:
        chosen, reason = "loop", f"stacked cannot run: {error}"
    elif not report["max_abs_diff"] <= tolerance:  # also catches NaN
        chosen = "loop"
        reason = f"outputs disagree: max |loop - stacked| = {report['max_abs_diff']:.3g} > {tolerance:g}"
    else:
        chosen = "stacked" if report["stacked_s"] < report["loop_s"] else "loop"
        reason = (
            f"faster on {report['device_name']}: loop {report['loop_s']:.4g} s, "
            f"stacked {report['stacked_s']:.4g} s per batch of {report['batch_shape']}"
        )
    report.update({"mode": mode, "chosen": chosen, "reason": reason, "tolerance": tolerance})
    if chosen == "stacked":
        assert stacked is not None  # chosen only when stacking succeeded (no stacked_error)
        return stacked, report
    return loop, report
