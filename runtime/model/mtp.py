"""The multi-token-prediction (MTP) head: a draft of the token after next, for speculative decoding.

For a token at position p with main-model hc streams h_p [hc, H] (`DeepseekV4Model.hidden_states`, before the
final hc_head fold) and the *next* token t_{p+1} (sampled or known):

    e   = enorm(embed(t_{p+1}))                                    [H]     (embedding shared with the main model)
    x_k = e_proj(e) + h_proj(hnorm(h_{p,k}))     for each stream k [hc, H]
    x'  = Block_mtp(x)                                             (sliding-window attention at position p + MoE)
    y   = hc_head(x'; mtp.hc_head_*);  logits = head(norm_mtp(y))  (output head shared with the main model)

`x'` is returned too, so drafts can be chained (x' plays the role of h for the next depth). The MTP block's
attention keeps its own K=V rows in a `swa` pool at layer index `num_hidden_layers + k`; `mtp_pools` builds that
pool with the main spec's swa row format and block size, so the MTP step reuses the sequence's swa block table.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from dsv4.runtime.model.batch import ForwardBatch
from dsv4.runtime.model.context import StepContext
from dsv4.runtime.model.kv_pools import KVPools
from dsv4.runtime.model.layers import hc_head


@dataclass(frozen=True)
class MTPSpec:
    """A cache spec with only the `swa` pool, for the MTP layer(s) (StepContext reads `pools` only)."""

    pools: dict


def mtp_layer(cfg: Any, depth: int = 0) -> int:
    """The cache layer index of MTP block `depth` (after the main layers)."""
    return cfg.num_hidden_layers + depth


def mtp_pools(cfg: Any, spec: Any, num_blocks: int, device: torch.device | str = "cpu") -> KVPools:
    """The MTP blocks' own swa pool: same rows and tokens per block as the main `spec`'s swa pool, layers
    `num_hidden_layers .. + num_nextn_predict_layers - 1`, `num_blocks` blocks (use the main swa block ids)."""
    if cfg.num_nextn_predict_layers < 1:
        raise ValueError("config has num_nextn_predict_layers = 0: the checkpoint has no MTP block")
    layers = tuple(mtp_layer(cfg, d) for d in range(cfg.num_nextn_predict_layers))
    mspec = MTPSpec({"swa": replace(spec.pools["swa"], layers=layers)})
    return KVPools.for_model(cfg, mspec, {"swa": num_blocks}, device)


@torch.inference_mode()
def mtp_forward(model: Any, h: torch.Tensor, batch: ForwardBatch, pools: KVPools,
                depth: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Run MTP block `depth`. `batch` has the *next* tokens as `input_ids` at the positions of `h`'s tokens
    (same positions, query_start and swa block table as the main step); `h` [T, hc, H] are the main model's
    streams of those tokens; `pools` from `mtp_pools`. Returns (logits [len(logits_indices), vocab] fp32,
    the MTP streams [T, hc, H] for a further depth)."""
    if depth >= len(model.mtp):
        raise ValueError(f"MTP depth {depth} out of range: the model has {len(model.mtp)} MTP block(s)")
    cfg = model.cfg
    T = batch.num_tokens
    if h.shape != (T, cfg.hc_mult, cfg.hidden_size):
        raise ValueError(f"h must be [T={T}, hc_mult={cfg.hc_mult}, hidden={cfg.hidden_size}], "
                         f"got {tuple(h.shape)}")
    blk = model.mtp[depth]
    ctx = StepContext.build(batch, cfg, pools.spec)
    e = blk.enorm(model.embed_tokens(batch.input_ids))
    x = blk.e_proj(e).unsqueeze(1) + blk.h_proj(blk.hnorm(h.to(e.dtype)))
    x = blk(x, ctx, pools, mtp_layer(cfg, depth), model.inv_freq_main, batch.input_ids)  # Block.forward
    y = x[batch.logits_indices]
    y = hc_head(y, blk.hc_head_fn, blk.hc_head_base, blk.hc_head_scale, cfg.hc_eps, cfg.rms_norm_eps)
    return model.head(blk.norm(y)).float(), x
