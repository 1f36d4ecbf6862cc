"""`runtime/model/gemv_pass.py`: in a compiled graph, mm / addmm / bmm with the literal 1 row (or column) become
inductor reductions (no BLAS call left in the generated code) with the same values; graphs for more rows keep
the BLAS calls."""

from __future__ import annotations

import re

import pytest
import torch
from dsv4.runtime.model.gemv_pass import OneRowProducts, rewrite_one_row_products
from torch._inductor.utils import run_and_get_code

BLAS = re.compile(r"extern_kernels\.(mm|addmm|bmm)\(")


@pytest.fixture
def one_row_pass():
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    with inductor_config.patch(post_grad_custom_pre_pass=OneRowProducts()):
        yield
    torch._dynamo.reset()


def _block(x: torch.Tensor, lin: torch.nn.Linear, w2: torch.Tensor, w3: torch.Tensor, w4: torch.Tensor
           ) -> torch.Tensor:
    h = torch.relu(lin(x)) @ w2  # addmm (bias), then mm
    experts = torch.bmm(x.unsqueeze(0).expand(w3.shape[0], -1, -1), w3)  # bmm, one row per expert
    gathered = torch.bmm(w4, x.t().unsqueeze(0).expand(w4.shape[0], -1, -1))  # w[e] @ x: one column
    return h + experts.sum(0) + gathered.sum(0).t()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_one_row_products_become_reductions_with_the_same_values(one_row_pass, dtype, tol):
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(256, 192).to(dtype)
    w2 = torch.randn(192, 96, generator=g).to(dtype) / 16
    w3 = torch.randn(2, 256, 96, generator=g).to(dtype) / 16
    w4 = torch.randn(2, 96, 256, generator=g).to(dtype) / 16
    x = torch.randn(1, 256, generator=g).to(dtype)
    with torch.no_grad():
        want = _block(x, lin, w2, w3, w4)
        got, code = run_and_get_code(torch.compile(_block), x, lin, w2, w3, w4)
    assert not BLAS.findall("\n".join(code))
    assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol), (got - want).abs().max()


def test_more_rows_keep_the_blas_calls(one_row_pass):
    lin = torch.nn.Linear(64, 32)
    w2, w3, w4 = torch.randn(32, 16), torch.randn(2, 64, 16), torch.randn(2, 16, 64)
    x = torch.randn(3, 64)
    with torch.no_grad():
        got, code = run_and_get_code(torch.compile(_block, dynamic=True), x, lin, w2, w3, w4)
        assert torch.allclose(got, _block(x, lin, w2, w3, w4), atol=1e-5)
    calls = BLAS.findall("\n".join(code))
    assert len(calls) >= 3 and {"addmm", "bmm"} <= set(calls)  # inductor may fold the sum into an addmm


def test_the_rewrite_counts_only_one_row_or_one_column_products():
    def f(x, y, w):
        return x @ w, y @ w, w.t() @ x.t()  # one row, three rows, one column

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    with FakeTensorMode(allow_non_fake_inputs=True):
        gm = make_fx(f, tracing_mode="fake")(torch.randn(1, 8), torch.randn(4, 8), torch.randn(8, 5))
    assert rewrite_one_row_products(gm.graph) == 2
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.aten.mm.default) == 1 and torch.ops.aten.sum.dim_IntList in targets
