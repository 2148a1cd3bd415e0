"""Is F(w; x) a well-defined function of w, sample by sample? Checks before anything is measured.

plstar's kernels, Hessians and bounds assume that the model maps each sample x_i to f(w; x_i) on its
own: the same numbers on every call, whatever batch the sample sits in, finite, laid out batch
first. :func:`refuse_ill_defined` reads the module tree (train-mode Dropout and normalisation);
:func:`check_forward` runs the model over all of the data without gradients and refuses, with
one line naming the first offending sample, what the tree cannot show: an exception on a later
sample, NaN/Inf outputs, outputs not laid out (c, ...) for c samples, randomness (two runs of
the first samples differ), batch coupling (a sample's output depends on the rest of its batch),
and a forward that writes to the module's buffers or parameters. Tolerances for "the same
numbers" come from round-off, never bitwise equality.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from plstar.errors import DataError, IllDefinedModelError, PlstarInputError

if TYPE_CHECKING:
    from plstar.functional import FunctionalModel

SMALL_BATCH = 8
"""Samples run twice (randomness) and one at a time (batch coupling) at the start of the data."""

# Modules whose data check passed, with what it was checked for: the several make_functional
# calls of one measurement (analyze makes seven) then run the model over the data once.
_PASSED: weakref.WeakKeyDictionary[nn.Module, tuple[weakref.ref, tuple, int]] = (
    weakref.WeakKeyDictionary()
)


def refuse_ill_defined(module: nn.Module) -> None:
    """Refuse modules that make F random or batch-coupled by their type and mode alone, and
    backward hooks (they may rewrite gradients, and torch.func transforms cannot run them)."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks:
        raise IllDefinedModelError(
            "a global module backward hook is registered (register_module_full_backward_hook); "
            "gradients through it need not be DF; remove it while measuring"
        )
    for name, sub in module.named_modules():
        where = f"{name} ({type(sub).__name__})" if name else type(sub).__name__
        if sub._backward_hooks or sub._backward_pre_hooks:
            raise IllDefinedModelError(
                f"{where} has a backward hook, which may rewrite gradients (then they are not "
                "DF) and which torch.func cannot run; remove it (handle.remove()) while measuring"
            )
        if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.training and sub.p > 0:
            raise IllDefinedModelError(
                f"{where} is in train mode, so F is random, not a function of the parameters; "
                "call model.eval() before measuring."
            )
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            if sub.training:
                raise IllDefinedModelError(
                    f"{where} is in train mode, so each output depends on the whole batch; "
                    "call model.eval() to use its running statistics."
                )
            if sub.running_mean is None:
                raise IllDefinedModelError(
                    f"{where} has no running statistics (track_running_stats=False), so it "
                    "normalises with batch statistics even in eval mode; F is not per-sample."
                )
        if (
            isinstance(sub, nn.modules.instancenorm._InstanceNorm)
            and sub.training
            and sub.track_running_stats
        ):
            raise IllDefinedModelError(
                f"{where} is in train mode with track_running_stats=True, so every forward "
                "updates its running statistics; call model.eval() before measuring."
            )


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _span(rows: slice) -> str:
    last = rows.stop - 1
    return f"sample {rows.start}" if last == rows.start else f"samples {rows.start}-{last}"


def _unit(dtype: torch.dtype, device: torch.device) -> float:
    """Round-off unit of the model's arithmetic: float32 products may run in TF32 or bfloat16."""
    if not dtype.is_floating_point:
        return 0.0
    eps = float(torch.finfo(dtype).eps)
    if dtype == torch.float32:
        precision = torch.get_float32_matmul_precision()
        if precision == "medium":
            eps = float(torch.finfo(torch.bfloat16).eps)
        elif precision == "high" or (device.type == "cuda" and torch.backends.cudnn.allow_tf32):
            eps = 2.0**-10  # TF32 keeps 10 mantissa bits
    return eps


def _gaps(a: Tensor, b: Tensor) -> Tensor:
    """Per sample, max |a_i − b_i| relative to the largest |output| of both blocks (0 when all
    are 0): round-off scales with the outputs' magnitude, not with each entry's."""
    a, b = a.double(), b.double()
    scale = float(torch.maximum(a.abs().max(), b.abs().max()))
    gaps = (a - b).abs().amax(dim=1)
    return gaps / scale if scale > 0 else torch.where(gaps > 0, math.inf, 0.0)


class _Runner:
    """Forward passes over blocks of x that refuse, naming the sample, what does not fit."""

    def __init__(self, fmodel: FunctionalModel, x: Tensor) -> None:
        self.fmodel, self.x, self.k = fmodel, x, 0
        self.shape = tuple(x.shape)

    def cast(self, rows: slice) -> Tensor:
        block = self.x[rows]
        if not block.is_floating_point():
            return block
        cast = block.to(self.fmodel.dtype)
        # A first layer's kernel holds the Gram x_i·x_j: a sample whose |x|² overflows the
        # model's dtype (or that overflows on the cast itself) gives an infinite kernel.
        squares = (cast.reshape(cast.shape[0], -1) ** 2).sum(dim=1)
        if not bool(torch.isfinite(squares.sum())) and not bool(torch.isfinite(squares).all()):
            first = rows.start + int((~torch.isfinite(squares)).nonzero()[0, 0])
            raise DataError(
                f"x[{first}] is too large for the model's dtype {self.fmodel.dtype} (|x|² "
                "overflows to Inf): rescale x"
            )
        return cast

    def raw(self, rows: slice) -> object:
        try:
            returned = self.fmodel.output(self.fmodel.params, self.cast(rows))
        except (DataError, KeyboardInterrupt):
            raise
        except Exception as error:  # a user's model can raise anything: name the sample
            raise self._failure(rows, error) from error
        try:  # the default selection never raises; a user's selector may
            return self.fmodel.pick(returned)
        except (PlstarInputError, KeyboardInterrupt):  # a selector's own refusal says it all
            raise
        except Exception as error:  # the user's selector, not the model: say so
            raise PlstarInputError(
                f"output= could not pick F from what the model returned on {_span(rows)} of x "
                f"({type(returned).__name__}): {one_line(error)}"
            ) from error

    def _failure(self, rows: slice, error: Exception) -> PlstarInputError:
        where = f"x of shape {self.shape}"
        for i in range(rows.start, rows.stop) if rows.stop - rows.start > 1 else ():
            try:
                self.fmodel.output(self.fmodel.params, self.cast(slice(i, i + 1)))
            except Exception as alone:  # the first sample that fails on its own
                return PlstarInputError(
                    f"the model could not run on sample {i} of {where}: {one_line(alone)}"
                )
        if rows.stop - rows.start > 1:
            return IllDefinedModelError(
                f"the model is batch-coupled: it fails on {_span(rows)} of {where} together "
                f"({one_line(error)}) but runs on each alone"
            )
        return PlstarInputError(
            f"the model could not run on sample {rows.start} of {where}: {one_line(error)}"
        )

    def refuse_if_runs_together(self, rows: slice, alone: PlstarInputError) -> None:
        """After sample ``rows.start`` failed alone: refuse as batch-coupled if ``rows`` run."""
        if alone.__cause__ is None or rows.stop - rows.start < 2:
            return  # not an exception of the model's own, or no batch to try
        try:
            self.outputs(rows)
        except PlstarInputError:  # fails or is mis-shaped in a batch too: not a coupling
            return
        raise IllDefinedModelError(
            f"the model is batch-coupled: it runs on {_span(rows)} of x together but not on "
            f"sample {rows.start} alone ({one_line(alone.__cause__)}); plstar needs per-sample "
            "outputs (batch statistics in train mode?)"
        ) from alone

    def outputs(self, rows: slice) -> Tensor:
        """The block's outputs as (c, k), refused unless batch first, k per sample and finite."""
        out, c = self.raw(rows), rows.stop - rows.start
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        if not isinstance(out, Tensor) and self.fmodel.select is not None:
            raise PlstarInputError(
                f"output= must give F as a tensor, batch first (c, ...) for c samples; it gave "
                f"{shape} on {_span(rows)} of x"
            )
        if (
            not isinstance(out, Tensor)
            or out.ndim == 0
            or out.shape[0] != c
            or (self.k and out.numel() != c * self.k)
        ):
            alone = f" (one sample gave {self.k} number(s))" if self.k else ""
            if not isinstance(out, Tensor):
                alone = " with no tensor in it; pass output=, a callable that picks F from it"
            raise PlstarInputError(
                "the model must return its outputs batch first, (c, ...) for c samples: "
                f"{_span(rows)} of x ({c}) gave {shape}{alone}"
            )
        if not out.is_floating_point():
            raise IllDefinedModelError(
                f"the model's output is {out.dtype}, not floating point; F must be differentiable"
            )
        if out.numel() == 0:
            raise IllDefinedModelError(f"the model returns no outputs (shape {shape})")
        out = out.reshape(c, -1)
        if not bool(torch.isfinite(out.sum())) and not bool(torch.isfinite(out).all()):
            first = rows.start + int((~torch.isfinite(out)).any(1).nonzero()[0, 0])
            raise IllDefinedModelError(
                f"the model's output is NaN or Inf at sample {first} of x; F must be finite on "
                f"every sample (check x[{first}] and the model's numerics)"
            )
        return out


def _refuse_writes(fmodel: FunctionalModel, versions: dict[str, int]) -> None:
    """Refuse a forward that wrote to a buffer (a copy here) or to a parameter (the user's)."""
    for kind, tensors in (("buffer", fmodel.buffers), ("parameter", fmodel.params)):
        for name, tensor in tensors.items():
            if tensor._version != versions[f"{kind} {name}"]:
                raise IllDefinedModelError(
                    f"the model's forward changes its {kind} {name} in place (running statistics "
                    "or another state), so F changes from call to call; call model.eval() or "
                    "remove the update before measuring"
                )


def _signature(fmodel: FunctionalModel, x: Tensor) -> tuple | None:
    """What the data check depends on: x (its version), the module's structure (which tensors
    are trainable, their storage, the buffers' versions, every submodule's mode). Not the
    parameters' values: a training loop or certify's points move them in place, and re-running
    the data at every step would double a step's cost. And the output selection (weakly held).
    None (not remembered) for tensors made in inference mode, which keep no version counter, or a
    selector that takes no weak reference."""
    params, buffers = fmodel.params.values(), fmodel.buffers.values()
    if x.is_inference() or any(t.is_inference() for t in [*params, *buffers]):
        return None
    # A weak reference: a selector that closes over the model must not keep it alive here.
    try:
        selection = None if fmodel.select is None else weakref.ref(fmodel.select)
    except TypeError:  # a callable that takes no weak reference: checked on every call
        return None
    return (
        x._version, tuple(x.shape), x.dtype, x.device,
        tuple((t.data_ptr(), tuple(t.shape), t.dtype) for t in params),
        tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in buffers),
        tuple(sub.training for sub in fmodel.module.modules()),
        tuple(fmodel.params), fmodel.aliases, torch.get_float32_matmul_precision(),
        selection,  # another selection is another F (and k)
    )  # fmt: skip


def check_forward(fmodel: FunctionalModel, x: Tensor, memory_budget: int | None = None) -> int:
    """Run F over every sample of x and return k, the outputs per sample; refuse ill-defined F.

    Order: sample 0 alone (k; and a forward that writes to a buffer), the first
    ``SMALL_BATCH`` samples twice (random forward: the runs differ by more than √(round-off unit)
    relative to the largest output) and one at a time (batch-coupled: a sample's output differs
    alone and in the batch by as much), then all of x in blocks that fit ``memory_budget``
    (exceptions, layout, NaN/Inf; the first block is compared with the small batch, so coupling
    through a larger batch is caught too). No gradients; the module's buffers are replaced by
    copies, and the global random state is restored afterwards. Remembered per module for the
    same x (unchanged in place) and module structure, buffers and modes, across in-place
    parameter updates (see :func:`_signature`).
    Cost: one forward pass over x plus ≈ 3·SMALL_BATCH samples' passes and one sample's
    backward-ready pass (the block size).
    """
    from plstar.planning import activation_bytes_per_sample, default_memory_budget

    signature = _signature(fmodel, x)
    remembered = _PASSED.get(fmodel.module)
    if (
        signature is not None
        and remembered is not None
        and remembered[0]() is x
        and remembered[1] == signature
    ):
        return remembered[2]
    copies = dataclasses.replace(
        fmodel, buffers={name: b.clone() for name, b in fmodel.buffers.items()}
    )
    versions = {f"buffer {n}": b._version for n, b in copies.buffers.items()}
    versions |= {f"parameter {n}": p._version for n, p in copies.params.items()}
    devices = [fmodel.device] if fmodel.device.type == "cuda" else []
    runner, n = _Runner(copies, x), x.shape[0]
    tolerance = math.sqrt(_unit(fmodel.dtype, fmodel.device))
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        s = min(n, SMALL_BATCH)
        try:
            first = runner.outputs(slice(0, 1))
        except PlstarInputError as alone:
            runner.refuse_if_runs_together(slice(0, s), alone)
            raise
        _refuse_writes(copies, versions)
        runner.k = first.shape[1]
        small = runner.outputs(slice(0, s))
        again = runner.outputs(slice(0, s))
        gap = float(_gaps(small, again).max())
        if gap > tolerance:
            raise IllDefinedModelError(
                f"the model's forward is random: two runs on samples 0-{s - 1} differ by "
                f"{gap:.1e} (relative); F must be a function of the parameters (remove dropout or "
                "noise, or call model.eval())"
            )
        alone = [first, *(runner.outputs(slice(i, i + 1)) for i in range(1, s))]
        _refuse_coupling(torch.cat(alone), small, f"in a batch of {s}", tolerance)
        size = default_memory_budget(copies.device) if memory_budget is None else memory_budget
        per_sample = activation_bytes_per_sample(copies, runner.cast(slice(0, 1)))
        block = max(s, min(n, size // per_sample))
        for start in range(0, n, block):
            out = runner.outputs(slice(start, min(n, start + block)))
            if start == 0 and block > s:
                _refuse_coupling(
                    small, out[:s], f"in a batch of {out.shape[0]}", tolerance, f"in one of {s}"
                )
        _refuse_writes(copies, versions)
    if signature is not None:
        _PASSED[fmodel.module] = (weakref.ref(x), signature, runner.k)
    return runner.k


def _refuse_coupling(
    reference: Tensor, batched: Tensor, how: str, tolerance: float, where: str = "alone"
) -> None:
    """Refuse when a sample's output in a batch differs from ``reference`` beyond round-off."""
    gaps = _gaps(reference, batched)
    bad = (gaps > tolerance).nonzero()
    if len(bad):
        i = int(bad[0, 0])
        raise IllDefinedModelError(
            f"the model is batch-coupled: sample {i}'s output differs by {float(gaps[i]):.1e} "
            f"(relative) {how} and {where}, so F mixes samples (batch statistics, batch-mean "
            "subtraction); plstar needs per-sample outputs"
        )
