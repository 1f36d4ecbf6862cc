"""The structural fields of the released DeepSeek-V4 `config.json` files, written down from public sources (test
data for the layout inventory; only the fields that decide the tensor list are kept).

* Flash: https://huggingface.co/deepseek-ai/DeepSeek-V4-Flash `config.json`, as reproduced inline ("Authoritative
  DeepSeek-V4-Flash-Base config (as published on HF)") in alibaba/rtp-llm's DeepSeek-V4 unit test; the instruct
  release adds `expert_dtype: fp4` and the `quantization_config` below (as in NVIDIA TensorRT-LLM's DeepSeek-V4
  checkpoint-layout test and DeepSeek's inference README).
* Pro: https://huggingface.co/deepseek-ai/DeepSeek-V4-Pro `config.json` as reproduced in third-party code (see
  /work/shared/design/dsv4-model-and-cache.md §2.1, [PRO-CFG]); agrees with transformers' `deepseek_v4` docstrings
  and vLLM's V4 blog (30 CSA / 31 HCA layers).
* Released tensor counts: 69,187 (Flash) and 145,116 (Pro), from the released `model.safetensors.index.json`
  weight maps (design notes, "Published checkpoints and chat format").
"""

QUANTIZATION = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
                "weight_block_size": [128, 128]}

FLASH = {
    "model_type": "deepseek_v4", "vocab_size": 129280, "hidden_size": 4096, "num_hidden_layers": 43,
    "num_attention_heads": 64, "num_key_value_heads": 1, "head_dim": 512, "qk_rope_head_dim": 64,
    "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 6, "moe_intermediate_size": 2048, "num_hash_layers": 3, "num_nextn_predict_layers": 1,
    "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "hc_mult": 4, "hc_sinkhorn_iters": 20,
    "sliding_window": 128, "scoring_func": "sqrtsoftplus", "routed_scaling_factor": 1.5,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0], "compress_rope_theta": 160000, "rope_theta": 10000,
    "expert_dtype": "fp4", "quantization_config": QUANTIZATION, "torch_dtype": "bfloat16",
}
FLASH_TENSORS = 69_187

PRO = {
    "model_type": "deepseek_v4", "vocab_size": 129280, "hidden_size": 7168, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 1, "head_dim": 512, "qk_rope_head_dim": 64,
    "q_lora_rank": 1536, "o_groups": 16, "o_lora_rank": 1024, "n_routed_experts": 384, "n_shared_experts": 1,
    "num_experts_per_tok": 6, "moe_intermediate_size": 3072, "num_hash_layers": 3, "num_nextn_predict_layers": 1,
    "index_n_heads": 64, "index_head_dim": 128, "index_topk": 1024, "hc_mult": 4, "hc_sinkhorn_iters": 20,
    "sliding_window": 128, "scoring_func": "sqrtsoftplus", "routed_scaling_factor": 2.5,
    "compress_ratios": [128, 128] + [4, 128] * 29 + [4, 0], "compress_rope_theta": 160000, "rope_theta": 10000,
    "expert_dtype": "fp4", "quantization_config": QUANTIZATION, "torch_dtype": "bfloat16",
}
PRO_TENSORS = 145_116
