"""Where plstar computes: the model's device, and the few things that stay on the host, and why.

The rule: every tensor plstar creates lives on the device of the model's parameters (kernel
blocks, Lanczos bases, HVP accumulators, search directions). Three exceptions, each on purpose:

* **Random draws** (Lanczos start vectors, certify's directions, sample subsets) are drawn on the
  host from a seeded CPU generator and then moved: the same seed gives the same numbers on every
  device, so a GPU run can be compared with a CPU run to rounding rather than to the solver's
  tolerance. A draw is one vector of m or N numbers; its transfer is negligible beside a product.
* **Tridiagonal eigenproblems** of Lanczos (at most a few hundred entries) are solved on the host
  by LAPACK (scipy): there is nothing to gain on a device.
* **A kernel larger than the device's free memory** is assembled in host memory, block by block
  (each block is computed on the device and copied): :func:`result_device`.

Memory plans budget the device's memory on a GPU (:func:`free_memory`) and host memory on the CPU.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from plstar.errors import PlstarInputError

HOST = torch.device("cpu")
_DEVICE_SHARE = 0.5
"""Share of a GPU's free memory a plan may use by default: the rest is the caching allocator's
slack and whatever else the process keeps there (the model, its data, the kernel)."""


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or ``"auto"`` (the first CUDA device when
    there is one, else the CPU) as a :class:`torch.device`; :class:`PlstarInputError` when the
    device asked for does not exist here."""
    if name is None or name == "auto":
        return (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else HOST
        )
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise PlstarInputError(
            f"device must be cpu, cuda, cuda:N, mps or auto; got {name!r}"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise PlstarInputError(
                f"device {name!r} was asked for, but this torch ({torch.__version__}) sees no CUDA "
                "device; use --device cpu (or auto)"
            )
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= count:
            raise PlstarInputError(
                f"device {name!r}: only {count} CUDA device(s) here (0…{count - 1})"
            )
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise PlstarInputError(f"device {name!r} was asked for, but MPS is not available here")
    if device.type not in ("cpu", "cuda", "mps", "meta"):
        raise PlstarInputError(f"device must be cpu, cuda, cuda:N, mps or auto; got {name!r}")
    return device


def free_memory(device: torch.device) -> int | None:
    """Free bytes of a CUDA device (``torch.cuda.mem_get_info``); None for the host and others."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[0])


def physical_memory() -> int:
    """Physical RAM in bytes (8 GiB where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


def device_budget(device: torch.device) -> int | None:
    """Working memory a plan may use on a GPU by default (half its free memory); None on the host,
    whose budget :func:`plstar.planning.default_memory_budget` sets."""
    free = free_memory(device)
    return None if free is None else int(_DEVICE_SHARE * free)


def result_device(device: torch.device, result_bytes: int, working_bytes: int) -> torch.device:
    """Where a kernel of ``result_bytes`` is assembled: on ``device`` when it fits beside the plan's
    working memory in the device's free memory, else in host memory (blocks are copied there)."""
    free = free_memory(device)
    if free is None or result_bytes + working_bytes <= free:
        return device
    return HOST


DIRECTION_STREAM = 0x6C616E64
"""Tag of the random directions' stream (landscape, certify, the region search)."""


def direction_generator(seed: int) -> torch.Generator:
    """The host generator of random directions for ``seed``: seeded from numpy's
    SeedSequence((seed, DIRECTION_STREAM)), never with ``seed`` itself. plstar's NTK models draw
    their N(0, 1) weights from ``manual_seed(seed)``: a direction drawn from that stream would
    repeat the first layer's weight entry for entry (with the default seed 0 of every command)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise PlstarInputError(f"seed must be a non-negative integer, got {seed!r}")
    mixed = np.random.SeedSequence([seed, DIRECTION_STREAM]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=HOST).manual_seed(int(mixed))


def host_normal(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Standard normal draws from a host ``generator``, moved to ``device`` (the same numbers on
    every device for the same seed)."""
    return torch.randn(shape, generator=generator, dtype=dtype, device=HOST).to(device)


def host_permutation(n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """A random permutation of range(n) from a host ``generator``, moved to ``device``."""
    return torch.randperm(n, generator=generator, device=HOST).to(device)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (the host for a model without parameters)."""
    return next((p.device for p in model.parameters()), HOST)
