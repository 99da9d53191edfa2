"""Minimal stand-ins for the vLLM objects a KVConnectorBase_V1 receives.

vLLM cannot be installed here. These carry only the fields and methods the
hcache connector reads, named and typed as in vLLM's source (fetched from
github.com/vllm-project/vllm for this file):

  Request            vllm/v1/request.py: request_id, prompt_token_ids,
                     all_token_ids (prompt + outputs), num_computed_tokens,
                     cache_salt, num_tokens, append_output_token_ids
  KVCacheBlocks      vllm/v1/core/kv_cache_manager.py: get_block_ids() ->
                     tuple[list[int], ...] (one list per KV cache group)
  NewRequestData, CachedRequestData, SchedulerOutput
                     vllm/v1/core/sched/output.py (the fields used here)
  ForwardContext     vllm/forward_context.py: no_compile_layers, attn_metadata
  KVTransferConfig   vllm/config/kv_transfer.py: kv_connector_extra_config,
                     get_from_extra_config(key, default)
  ModelConfig        get_num_layers(parallel_config), get_num_kv_heads(
                     parallel_config), get_head_size(), dtype
  ParallelConfig     tensor_parallel_size, rank
  CacheConfig        block_size
The paged KV cache of one layer has FlashAttention's layout,
[2, num_blocks, block_size, num_kv_heads, head_size].

Used by test_connectors.py and torch_engine.py (which drives the connector in
vLLM's call order: scheduler, then worker, every step).
"""
from dataclasses import dataclass, field


class Request:
    def __init__(self, request_id, prompt_token_ids, cache_salt=None):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self._all_token_ids = list(prompt_token_ids)
        self.all_token_ids = self._all_token_ids  # vLLM: a read-only ConstantList view
        self.num_computed_tokens = 0
        self.cache_salt = cache_salt

    @property
    def num_tokens(self):
        return len(self._all_token_ids)

    def append_output_token_ids(self, token_ids):
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        self._all_token_ids.extend(token_ids)


@dataclass
class KVCacheBlocks:
    block_ids: list

    def get_block_ids(self):
        return (list(self.block_ids),)


@dataclass
class NewRequestData:
    req_id: str
    prompt_token_ids: list
    block_ids: tuple
    num_computed_tokens: int
    mm_features: list = field(default_factory=list)


@dataclass
class CachedRequestData:
    req_ids: list = field(default_factory=list)
    resumed_req_ids: set = field(default_factory=set)
    new_token_ids: list = field(default_factory=list)
    new_block_ids: list = field(default_factory=list)
    num_computed_tokens: list = field(default_factory=list)


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list = field(default_factory=list)
    scheduled_cached_reqs: CachedRequestData = field(default_factory=CachedRequestData)
    num_scheduled_tokens: dict = field(default_factory=dict)
    finished_req_ids: set = field(default_factory=set)
    kv_connector_metadata: object = None

    @property
    def total_num_scheduled_tokens(self):
        return sum(self.num_scheduled_tokens.values())


@dataclass
class ForwardContext:
    no_compile_layers: dict = field(default_factory=dict)
    attn_metadata: object = None


@dataclass
class KVTransferConfig:
    kv_connector: str = "HCacheConnector"
    kv_role: str = "kv_both"
    kv_connector_extra_config: dict = field(default_factory=dict)

    def get_from_extra_config(self, key, default):
        return self.kv_connector_extra_config.get(key, default)

    @property
    def is_kv_producer(self):
        return self.kv_role in ("kv_producer", "kv_both")


class ModelConfig:
    def __init__(self, num_layers, num_kv_heads, head_size, dtype):
        self._l, self._h, self._d, self.dtype = num_layers, num_kv_heads, head_size, dtype

    def get_num_layers(self, parallel_config):
        return self._l

    def get_num_kv_heads(self, parallel_config):
        return self._h // parallel_config.tensor_parallel_size

    def get_head_size(self):
        return self._d


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    rank: int = 0


@dataclass
class CacheConfig:
    block_size: int = 16


@dataclass
class VllmConfig:
    model_config: ModelConfig
    cache_config: CacheConfig
    kv_transfer_config: KVTransferConfig
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
