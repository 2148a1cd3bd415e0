"""The architectures people train (tests/architectures.py), measured by every implementation.

For each zoo entry (a torchvision-style ResNet with in-place ReLU and residuals, GPT-2-, BERT-,
ViT-, Mixer-like transformers in plain PyTorch, a 1-D CNN with padding='same' and a depthwise
convolution, nn.MultiheadAttention, and Hugging Face GPT-2/BERT/ViT built from configs when
``transformers`` is installed), in float64:
- the tangent kernel of "auto", "structured", "jacobian" and "ntvp" agrees with the dense jacrev
  oracle to 1e-10 relative, and the model is left exactly as it was;
- the matrix-free kernel operator's products agree with the oracle's;
- ``plstar.analyze`` runs end to end (β and ‖H_F‖ need forward-mode and second-order passes
  through scaled_dot_product_attention) and its λ_max is the oracle's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from architectures import ARCHITECTURES, Selected, build
from conftest import dense_kernel
from test_model_unchanged import assert_unchanged, snapshot
from torch import Tensor, nn

import plstar

TOLERANCE = 1e-10
NAMES = sorted(ARCHITECTURES)


def _case(name: str) -> tuple[nn.Module, Tensor, dict[str, Any], Tensor]:
    """(float64 model, inputs, the keywords selecting F, the dense oracle's kernel)."""
    requires = ARCHITECTURES[name].requires
    if requires is not None:
        pytest.importorskip(requires)
    model, x, output = build(name, torch.float64)
    expected = dense_kernel(Selected(model, output), x)
    return model, x, ({} if output is None else {"output": output}), expected


def assert_close(found: Tensor, expected: Tensor, what: str) -> None:
    """Relative max-norm error within TOLERANCE; the message names the worst entry."""
    error = (found - expected).abs()
    flat = int(error.argmax())
    relative = error.max().item() / expected.abs().max().item()
    assert relative <= TOLERANCE, (
        f"{what}: relative error {relative:.2e} > {TOLERANCE:.0e}, worst at "
        f"{divmod(flat, error.shape[-1])}: {found.flatten()[flat].item():.6e} vs "
        f"{expected.flatten()[flat].item():.6e}"
    )


def _measured(model: nn.Module, call: Callable[[], Any]) -> Any:
    """call(), then check the model and global torch state are exactly as before."""
    before = snapshot(model)
    result = call()
    assert_unchanged(before, model)
    return result


@pytest.mark.parametrize("implementation", ["auto", "structured", "jacobian", "ntvp"])
@pytest.mark.parametrize("name", NAMES)
def test_kernel_matches_dense_oracle(name: str, implementation: str) -> None:
    model, x, output, expected = _case(name)
    kernel = _measured(
        model,
        lambda: plstar.tangent_kernel(model, x, implementation=implementation, **output),
    )
    assert kernel.shape == expected.shape
    assert_close(kernel, expected, f"{name}, implementation={implementation!r}")


@pytest.mark.parametrize("implementation", ["auto", "structured", "ntvp"])
@pytest.mark.parametrize("name", NAMES)
def test_operator_products_match_dense_oracle(name: str, implementation: str) -> None:
    model, x, output, expected = _case(name)
    v = torch.randn(expected.shape[0], 3, generator=torch.Generator().manual_seed(2)).double()

    def products() -> Tensor:
        op = plstar.kernel_operator(model, x, implementation=implementation, **output)
        return op @ v

    assert_close(_measured(model, products), expected @ v, f"{name}, operator {implementation!r}")


@pytest.mark.parametrize("name", NAMES)
def test_analyze_runs_end_to_end(name: str) -> None:
    model, x, output, expected = _case(name)
    k = expected.shape[0] // x.shape[0]
    y = torch.randn(x.shape[0], k, generator=torch.Generator().manual_seed(3)).double()
    analysis = _measured(model, lambda: plstar.analyze(model, x, y, hessian_outputs=2, **output))
    assert (analysis.n, analysis.k) == (x.shape[0], k)
    top = torch.linalg.eigvalsh(expected)[-1].item()
    assert analysis.kernel.lambda_max == pytest.approx(top, rel=1e-8)
    assert math.isfinite(analysis.loss0) and analysis.loss0 > 0
    assert math.isfinite(analysis.beta.value)
    assert math.isfinite(analysis.hessian_norm.value) and analysis.hessian_norm.value > 0
    assert analysis.hessian_norm.outputs_examined == 2


BROADCAST = {
    "vit": ("cls_token", "pos_embed"),
    "vit-mha": ("class_token", "pos_embedding"),
    "hf-vit": ("vit.embeddings.cls_token", "vit.embeddings.position_embeddings"),
}


@pytest.mark.parametrize("name", NAMES)
def test_structured_serves_every_parameter_without_jacobian_rows(name: str) -> None:
    """No zoo model needs per-sample Jacobian rows any more: the ViTs' class token and position
    embedding ride on the recording (broadcast parameters), everything else has a rule."""
    from plstar import structured
    from plstar.functional import make_functional

    model, x, selecting, _ = _case(name)
    found = structured.probe(make_functional(model, x, **selecting), x)
    assert found.fallback == [] and found.rows_reasons == {}
    assert found.broadcast == BROADCAST.get(name, ())
