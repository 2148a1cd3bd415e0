"""From ``nn.Module`` to a pure function F(w; x) of the trainable parameters.

Every core routine goes through :func:`make_functional`, so the refusals of ill-defined input
live in one place: a model whose output is not a function of ``w`` alone (Dropout, train-mode
BatchNorm, randomness, samples that interact), no trainable parameters, non-finite numbers, and
data whose type or shape does not fit (:mod:`plstar.model_checks` runs the model over the data).

A measurement never changes the module: F(w; x) swaps detached tensors in for the module's own
during a call and puts the originals back, once per (owning module, attribute) — a module used
at two positions is swapped once, a Parameter shared by two modules in each of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from plstar import model_checks
from plstar.errors import DataError, IllDefinedModelError, PlstarInputError
from plstar.validation import describe

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - older torch: its fused kernels are not chosen on the CPU
    sdpa_kernel = None

Params = dict[str, Tensor]
ProgressCallback = Callable[[str, float, float], None]
"""``progress(phase, done, total)``: called by every long loop; the CLI turns it into a bar."""
OutputSelector = Callable[[Any], Tensor]
"""``output(raw)``: F among what the model returns, e.g. ``lambda out: out.logits[:, -1]``."""


@dataclass(frozen=True)
class FunctionalModel:
    """A module seen as F(w; x) ∈ ℝ^{n×k}, with w the trainable parameters only.

    ``params`` are detached views of the module's trainable parameters, each Parameter once under
    its first name; ``aliases`` lists (name, first name) for every other module that owns one of
    them (weights tied across modules); ``buffers`` are held fixed, one entry per owning module.
    ``k`` is the flattened output size per sample. ``select`` picks F from what the module
    returns (default: :func:`default_output`).
    """

    module: nn.Module
    params: Params
    buffers: dict[str, Tensor]
    k: int
    aliases: tuple[tuple[str, str], ...] = ()
    select: Callable[[Any], Any] | None = None

    @property
    def m(self) -> int:
        """Number of trainable parameters (tied ones counted once)."""
        return sum(p.numel() for p in self.params.values())

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype the model computes in (that of its first parameter)."""
        return next(iter(self.params.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def output(self, params: Params, x: Tensor) -> Tensor:
        """The module's raw output with ``params`` in place of its trainable parameters.

        tie_weights=False with one entry per owning module: torch's tying would expand a module
        used twice into two swaps of the same attribute and restore them in the wrong order,
        leaving a plain tensor where the user's Parameter was.
        """
        bound = {**params, **{alias: params[name] for alias, name in self.aliases}}
        return functional_call(self.module, (bound, self.buffers), (x,), tie_weights=False)

    def pick(self, raw: Any) -> Any:
        """F among what the module returned: ``select(raw)`` when given, else
        :func:`default_output`. Every path that runs the module goes through here."""
        return default_output(raw) if self.select is None else self.select(raw)

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        """F(w; x) for a batch: x (c, ...) -> (c, k)."""
        out = self.pick(self.output(params, x))
        return out.reshape(out.shape[0], -1)

    def single(self, params: Params, xi: Tensor) -> Tensor:
        """f(w; x_i) for one sample (no batch dimension): xi (...) -> (k,)."""
        return self(params, xi.unsqueeze(0)).reshape(-1)

    def flatten(self, tree: Params, batch: int | None = None) -> Tensor:
        """Concatenate a parameter-shaped dict into (m,), or (batch, m) when entries lead with batch."""
        lead = () if batch is None else (batch,)
        return torch.cat([tree[name].reshape(*lead, -1) for name in self.params], dim=-1)

    def unflatten(self, vector: Tensor) -> Params:
        """Inverse of :meth:`flatten`, cast to the model's dtype: (m,) or (b, m) -> dict."""
        lead = vector.shape[:-1]
        tree, start = {}, 0
        for name, p in self.params.items():
            stop = start + p.numel()
            tree[name] = vector[..., start:stop].reshape(*lead, *p.shape).to(p.dtype)
            start = stop
        return tree


def default_output(raw: Any) -> Any:
    """The tensor a model's output stands for: a Tensor itself; the ``logits`` entry of a dict or
    a Hugging Face ``ModelOutput`` (an OrderedDict) where present, else its first tensor value;
    the first tensor of a tuple or list. Anything else is returned as it is, to be refused by the
    checks with its type named. Every entry point's ``output=None`` means this."""
    if isinstance(raw, Tensor):
        return raw
    if isinstance(raw, Mapping):
        if isinstance(raw.get("logits"), Tensor):
            return raw["logits"]
        raw = list(raw.values())
    if isinstance(raw, tuple | list):
        return next((item for item in raw if isinstance(item, Tensor)), raw)
    return raw


def output_selector(output: object) -> OutputSelector | None:
    """Check the ``output=`` argument of every entry point: None (:func:`default_output`) or a
    callable applied to what the model returns; anything else is a PlstarInputError."""
    if output is None or callable(output):
        return output  # type: ignore[return-value]
    raise PlstarInputError(
        "output must be None (the default: logits, else the first tensor) or a callable that "
        f"takes what the model returns and gives F, e.g. lambda out: out.logits[:, -1]; got "
        f"{describe(output)}"
    )


@contextlib.contextmanager
def differentiable_attention() -> Iterator[None]:
    """Run ``F.scaled_dot_product_attention`` on its math backend inside the block.

    PyTorch's fused CPU kernels (flash attention, the default of Hugging Face and timm) have no
    forward-mode AD, no double backward and no vmap batching rule; the math backend has all three
    and computes the same function, to round-off. ``nn.MultiheadAttention``'s fused eval path is
    switched off for the same reason (and restored after). Every forward-mode and second-order
    pass runs under this, so models that call the fused attention need no change.
    """
    mha = getattr(torch.backends, "mha", None)
    fast_path = mha.get_fastpath_enabled() if mha is not None else None
    if mha is not None:  # nn.MultiheadAttention's fused eval path has no forward-mode AD either
        mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH) if sdpa_kernel is not None else contextlib.nullcontext():
            yield
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fast_path)


def jacobian_rows(
    fmodel: FunctionalModel, x: Tensor, dtype: torch.dtype, names: list[str] | None = None
) -> Params:
    """Per-sample Jacobian rows: dict name -> (c·k, numel of that parameter), in ``dtype``.

    Row ``i*k + a`` is ∇f_a(w; x_i) restricted to that parameter; ``names`` restricts the
    parameters (default all). Cost: k reverse passes per sample, vectorised over samples by vmap
    (attention on its math backend); a module whose backward has no batching rule (PReLU in torch
    2.13) is done sample by sample.
    """
    chosen = list(fmodel.params) if names is None else names
    fixed = {n: p for n, p in fmodel.params.items() if n not in chosen}
    free = {n: fmodel.params[n] for n in chosen}

    def single(params: Params, xi: Tensor) -> Tensor:
        return fmodel.single({**fixed, **params}, xi)

    c = x.shape[0]
    # torch 2.13: PReLU's batched backward raises for most block sizes but returns wrong rows,
    # silently, when the block size equals k (the inner vmap's size); one extra sample avoids that.
    padded = torch.cat([x, x[:1]]) if c == fmodel.k > 1 else x
    # Fused attention's backward has no batching rule: vmap would loop over it, slower than the
    # math backend's batched ops (2× measured on a small GPT-2) and warning at every call.
    with differentiable_attention():
        try:
            batched = vmap(jacrev(single), in_dims=(None, 0))(free, padded)
            rows = {n: r[:c] for n, r in batched.items()}
        except RuntimeError:
            per_sample = [jacrev(single)(free, xi) for xi in x]
            rows = {n: torch.stack([r[n] for r in per_sample]) for n in chosen}
    return {n: rows[n].reshape(c * fmodel.k, -1).to(dtype) for n in chosen}


def jacobian_matrix(
    fmodel: FunctionalModel, x: Tensor, dtype: torch.dtype, names: list[str] | None = None
) -> Tensor:
    """DF as one matrix (c·k, Σ numel of ``names``, default all), sample-major rows, columns in
    the parameters' order: :func:`jacobian_rows` concatenated."""
    return torch.cat(list(jacobian_rows(fmodel, x, dtype, names).values()), dim=1)


def chunks(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` of length ``size`` (the last may be shorter)."""
    size = max(1, int(size))
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def check_finite(name: str, tensor: Tensor) -> None:
    """Refuse NaN or Inf in a floating tensor, naming it."""
    if tensor.is_floating_point() or tensor.is_complex():
        # A finite sum proves every entry finite (NaN and ±Inf propagate) in one read without a
        # mask the size of the tensor; only an overflow or a real NaN/Inf takes the full count.
        if tensor.numel() == 0 or bool(torch.isfinite(tensor.sum())):
            return
        bad = ~torch.isfinite(tensor)
        if bool(bad.any()):
            raise DataError(
                f"{name} contains {int(bad.sum())} non-finite value(s) (NaN or Inf); "
                "clean or impute the data before measuring."
            )


def check_data(name: str, tensor: object) -> Tensor:
    """Refuse, as a one-line DataError, data that plstar cannot read as samples; return it.

    Accepted: a dense (strided), non-meta, real torch.Tensor with a batch dimension first and at
    least one sample, floating values finite (integer and bool tensors pass: token ids, masks).
    Cost: one read of a floating tensor (its sum), nothing more unless it is not finite.
    """
    if not isinstance(tensor, Tensor):
        kind = f"{type(tensor).__module__}.{type(tensor).__name__}".removeprefix("builtins.")
        dense = f"{name}.toarray()" if hasattr(tensor, "toarray") else name  # scipy.sparse
        raise DataError(
            f"{name} must be a torch.Tensor, got {kind}; convert it with torch.as_tensor({dense})"
        )
    if tensor.is_meta:
        raise DataError(f"{name} is a meta tensor (a shape without values); load its data first")
    if tensor.is_nested:
        raise DataError(f"{name} is a nested tensor; pad it ({name}.to_padded_tensor(0)) first")
    if tensor.is_quantized:
        raise DataError(f"{name} is quantized; pass {name}.dequantize()")
    if tensor.layout != torch.strided:
        raise DataError(f"{name} has layout {tensor.layout}; pass a dense {name}.to_dense()")
    if tensor.is_inference():
        raise DataError(
            f"{name} was made under torch.inference_mode, which autograd cannot use; pass "
            f"{name}.clone() made outside it, or use torch.no_grad() instead"
        )
    if tensor.is_complex():
        raise DataError(f"{name} is complex ({tensor.dtype}); plstar measures real-valued data")
    if tensor.ndim == 0:
        raise DataError(f"{name} is a 0-d tensor (a scalar); it needs a batch dimension (n, ...)")
    if tensor.shape[0] == 0:
        raise DataError(f"{name} is empty: at least one sample is needed")
    check_finite(name, tensor)
    return tensor


def _owned(model: nn.Module, store: str) -> list[tuple[str, Tensor]]:
    """(path, tensor) once per (owning module object, attribute) of ``_parameters``/``_buffers``."""
    seen: set[tuple[int, str]] = set()
    found = []
    for prefix, module in model.named_modules(remove_duplicate=False):
        for attribute, tensor in getattr(module, store).items():
            if tensor is None or (id(module), attribute) in seen:
                continue
            seen.add((id(module), attribute))
            found.append((f"{prefix}.{attribute}" if prefix else attribute, tensor))
    return found


def make_functional(
    model: nn.Module,
    x: Tensor,
    *,
    memory_budget: int | None = None,
    output: OutputSelector | None = None,
) -> FunctionalModel:
    """Check ``model`` and ``x`` and return the pure form F(w; x).

    ``output`` picks F from what the model returns (``FunctionalModel.select``): None takes
    :func:`default_output` (a Tensor as it is; ``logits`` of a dict or ``ModelOutput``, else its
    first tensor; the first tensor of a tuple), a callable is applied to the raw output, e.g.
    ``lambda out: out.logits[:, -1]`` for a causal LM's last position.

    Refuses, with a one-line message naming the problem and the first offending sample:
    :class:`DataError` for x that is not a dense real tensor with samples, or not finite;
    :class:`IllDefinedModelError` for Dropout/BatchNorm (or InstanceNorm tracking statistics) in
    train mode, no trainable parameters, a forward that is random, mixes samples (batch-coupled),
    changes the module's buffers or parameters, or gives NaN/Inf; :class:`PlstarInputError` when
    the model cannot run on a sample or does not return its outputs batch first.
    Cost: one forward pass over all of x without gradients, in sample blocks sized to
    ``memory_budget`` (default :func:`plstar.default_memory_budget`), plus about 3·min(n, 8)
    single-sample passes; remembered for the same module and x (both unchanged but for in-place
    parameter updates), so the seven calls of one :func:`plstar.analyze`, a training loop's steps
    and certify's points check the data once. Non-finite parameters are refused on every call.
    The user's model is left as it was: its buffers are replaced by copies while checking, and
    the global random state is restored.
    """
    if not isinstance(model, nn.Module):
        raise PlstarInputError(f"expected a torch.nn.Module, got {type(model).__name__}")
    select = output_selector(output)
    x = check_data("x", x)
    model_checks.refuse_ill_defined(model)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise IllDefinedModelError(
            "the model has no trainable parameters (requires_grad=True); there is no tangent kernel"
        )
    for name, p in params.items():
        if not p.is_floating_point():
            raise IllDefinedModelError(f"parameter {name} is not floating point ({p.dtype})")
        check_finite(f"parameter {name}", p)
    check_device("x", x, params)
    first_name = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    aliases = tuple(
        (path, first_name[id(p)])
        for path, p in _owned(model, "_parameters")
        if id(p) in first_name and path != first_name[id(p)]
    )
    buffers = {n: b.detach() for n, b in _owned(model, "_buffers")}
    probe = FunctionalModel(model, params, buffers, 0, aliases, select)
    k = model_checks.check_forward(probe, x, memory_budget)
    return FunctionalModel(model, params, buffers, k, aliases, select)


def check_device(name: str, tensor: Tensor, params: dict[str, Tensor]) -> None:
    """Refuse parameters spread over several devices, and data on another device than them: plstar
    computes where the model lives and never moves data across the bus behind the user's back."""
    devices = {p.device for p in params.values()}
    if len(devices) > 1:
        raise PlstarInputError(
            f"the model's parameters lie on several devices ({', '.join(sorted(map(str, devices)))})"
            "; plstar measures a model on one device: move it there with model.to(device)"
        )
    (device,) = devices
    if tensor.device != device:
        raise DataError(
            f"{name} is on {tensor.device} but the model's parameters are on {device}: move it "
            f"with {name}.to({str(device)!r}) (plstar computes on the model's device)"
        )


def check_targets(fmodel: FunctionalModel, x: Tensor, y: Tensor) -> Tensor:
    """Validate targets against the model's outputs and return them as (n, k) in the model dtype."""
    y = check_data("y", y)
    check_device("y", y, fmodel.params)
    n = x.shape[0]
    if y.shape[0] != n:
        raise DataError(f"x has {n} samples but y has shape {tuple(y.shape)}")
    y2 = y.reshape(n, -1)
    if y2.shape[1] != fmodel.k:
        raise DataError(
            f"the model gives k={fmodel.k} output(s) per sample but y has {y2.shape[1]} per sample "
            f"(y shape {tuple(y.shape)})"
        )
    y2 = y2.to(fmodel.dtype)
    # L = ½‖F − y‖² is summed in the model's dtype: targets whose squares overflow it would give
    # an infinite loss and NaN ratios, not a measurement.
    if not bool(torch.isfinite((y2 * y2).sum())):
        raise DataError(
            f"y is too large for the model's dtype {fmodel.dtype} (max |y| = "
            f"{float(y.double().abs().max()):.3g}; the loss ½‖F − y‖² overflows): rescale y"
        )
    return y2
