"""An inductor pass for the CPU decode graphs: one-row matrix products become inductor's own reductions.

At batch 1 every linear of the decode step is a matrix-vector product ([1, K] x [K, N]; a gathered expert's
`w[e] @ x` is [M, K] x [K, 1]). Inductor hands an `mm` / `addmm` / `bmm` to the BLAS library as an extern call —
a fixed dispatch cost per call, tens per block, and a kernel boundary nothing fuses across. Written as a product
and a sum over K,

    y[0, n] = sum_k x[0, k] * w[k, n]        (one row;    bmm: the same per batch b)
    y[m, 0] = sum_k x[m, k] * w[k, 0]        (one column)

inductor generates one vectorised reduction loop per product (the weight read once, in its own storage order,
as the GEMV is memory-bound anyway) and can fuse the input's producer and the output's consumer into it. Only
products whose row (or column) count is the literal 1 in the graph change (the batch-1 graph: dynamo
specialises size 1; larger batches keep the BLAS call), in fp32 / bf16 / fp16. `compiled.use_compiled` installs
it on CPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

aten = torch.ops.aten
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _size_one(node: Any, dim: int) -> bool:
    """Whether `node`'s size along `dim` is the literal 1 (not a symbol), in a float dtype."""
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return (isinstance(val, torch.Tensor) and val.dtype in _FLOATS and isinstance(val.shape[dim], int)
            and val.shape[dim] == 1)


def _call(graph: torch.fx.Graph, op: Any, *args: Any) -> torch.fx.Node:
    """A new node with its fake value (later passes and the lowering read `meta["val"]`)."""
    node = graph.call_function(op, args)
    fake = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args]
    node.meta["val"] = op(*fake)
    return node


def rewrite_one_row_products(graph: torch.fx.Graph) -> int:
    """Replace every mm / addmm (alpha = beta = 1) / bmm in `graph` with one row on the left or one column on the
    right (a gathered expert's `w[e] @ x`); returns how many."""
    changed = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in (aten.mm.default, aten.bmm.default) and len(node.args) == 2 and not node.kwargs:
            (x, w), bias = node.args, None
        elif node.target is aten.addmm.default and len(node.args) == 3 and not node.kwargs:
            bias, x, w = node.args
        else:
            continue
        batched = node.target is aten.bmm.default
        row, col = _size_one(x, -2), _size_one(w, -1)
        if not (row or col):
            continue
        swap = [0, 2, 1] if batched else [1, 0]
        with graph.inserting_before(node):
            if row:  # x [1, K] -> [K, 1] (bmm: [B, K, 1]), times w [K, N], summed over K
                prod = _call(graph, aten.mul.Tensor, _call(graph, aten.permute.default, x, swap), w)
                out = _call(graph, aten.sum.dim_IntList, prod, [-2], True)
            else:  # w [K, 1] -> [1, K] (bmm: [B, 1, K]), times x [M, K], summed over K
                prod = _call(graph, aten.mul.Tensor, x, _call(graph, aten.permute.default, w, swap))
                out = _call(graph, aten.sum.dim_IntList, prod, [-1], True)
            if bias is not None:
                out = _call(graph, aten.add.Tensor, out, bias)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        changed += 1
    return changed


class OneRowProducts(CustomGraphPass):
    """`rewrite_one_row_products` as inductor's `post_grad_custom_pre_pass` (the uuid keys inductor's cache)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        rewrite_one_row_products(graph)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))
