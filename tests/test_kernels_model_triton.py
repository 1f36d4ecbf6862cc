"""The whole model on the Triton kernels (interpreted): a tiny checkpoint with every layer kind (sliding, CSA
with the indexer, HCA) run with DSV4_KERNEL_BACKEND=triton gives the logits of the torch-reference run, for
a prefill that completes several compression blocks and decode steps that cross block boundaries."""

from __future__ import annotations

import pytest
import torch
from dsv4.kernels import dispatch
from dsv4.runtime.model import load_model

from tests.kernel_env import kernel_env
from tests.model_utils import PagedRunner, save_hf_twin, tiny_configs

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def mix_model(tmp_path_factory):
    cfg = tiny_configs()["mix"]  # layers: sliding, CSA, HCA, CSA; CSA ratio 4, HCA ratio 8, top-k 2
    out = tmp_path_factory.mktemp("twin_mix_triton")
    save_hf_twin(cfg, out, seed=5)
    model, loaded, _ = load_model(out, progress=False)
    return model, loaded


def _run(model, cfg, kv_dtype: str, ids: list[int], n_prefill: int) -> torch.Tensor:
    r = PagedRunner(model, cfg, kv_dtype=kv_dtype, max_tokens=len(ids), seed=2)
    outs = [r.step([(0, ids[:n_prefill], 0)])]
    for p in range(n_prefill, len(ids)):
        outs.append(r.step([(0, ids[p:p + 1], p)]))
    return torch.cat(outs)


# measured differences: 3e-6 (fp32) and 4e-6 (fp8) with max |logit| ~4; fp8 allows a one-step quantisation flip
@pytest.mark.parametrize(("kv_dtype", "tol"), [("fp32", 1e-4), ("fp8", 1e-2)])
def test_model_logits_on_triton_kernels(mix_model, kv_dtype, tol):
    model, cfg = mix_model
    ids = torch.randint(0, cfg.vocab_size, (19,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        with kernel_env({dispatch.BACKEND_ENV: "torch"}):
            ref = _run(model, cfg, kv_dtype, ids, 14)  # prefill to 14 (3 CSA blocks, 1 HCA block), 5 decode steps
        with kernel_env({dispatch.BACKEND_ENV: "triton"}):
            assert dispatch.choose_backend(torch.zeros(1)) == "interpret"
            out = _run(model, cfg, kv_dtype, ids, 14)
    diff = (out - ref).abs().max().item()
    assert diff <= tol * max(1.0, ref.abs().max().item()), f"{kv_dtype}: logits differ by {diff}"
