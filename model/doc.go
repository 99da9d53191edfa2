// Package model describes decoder-only LLMs (Llama, Mistral, Qwen2, OPT):
// their Hugging Face config.json, presets, safetensors weights, a model
// fingerprint used as the store's identity, and a
// plain float32 reference forward pass that emits the hidden state entering
// each layer's K/V projection and the K/V it computed.
//
// # Configs, presets, weights
//
// `model` parses HF `config.json` for Llama, Mistral, Qwen2 and OPT (GQA,
// head_dim, rope_theta, rope_scaling none/linear/llama3, rotary layout —
// `rotary_interleaved`, an hcache extension — biases, norm, dtype), has presets
// (`llama2-7b`, `llama2-13b`, `llama3-8b`, `opt-30b`, `qwen2.5-7b`, tiny ones),
// reads safetensors (F16/BF16/F32, sharded index; only the tensors asked for:
// `WeightsKV` reads just norms and K/V projections), and writes seeded synthetic
// models (`hcache model synth`), which then go through the same loader.
//
// # The reference forward pass
//
// The reference forward pass is plain float32 over the model's weights, with
// the model dtype's rounding where a GPU would round: the normed hidden state
// (what hcache saves) and K/V (what the cache holds). It was checked against an
// independent PyTorch implementation (`model/testdata/torch_ref.py`, Debian's
// python3-torch) on the same synthetic weights (three seeds): logits within
// 2e-4 (fp16) and 6e-4 (bf16) of the logit scale, K/V within 7e-4 (fp16) and
// 5e-3 (bf16) of their scale; the test allows 2e-3 / 8e-3 and four ulps of the
// dtype.
//
// # One projection
//
// `model.ProjectKV` is the one projection both the forward pass and the CPU
// backend run (`internal/tensor`: each output element is one fixed-order dot
// product whatever the goroutine split; workers claim blocks of rows from a
// shared counter, eight per worker, so one that loses its CPU for a while
// delays the product only by its share of that time), so restore from hidden states is
// bit-exact on CPU; tests check it per architecture and end to end (32 decode
// steps, evict, restore, 32 more: identical tokens). The backend writes a paged
// KV cache `[blocks, block_tokens, kv_heads, head_dim]` through a block table,
// as vLLM lays it out.
package model
