// hcache's CUDA kernels. This file is compiled twice:
//   - for the GPU, to PTX, by clang without any CUDA installation
//     (go generate in gpu/cuda; -nocudainc -nocudalib, so nothing is
//     predefined and no libdevice math is linked: the RoPE angles come in as a
//     cos/sin table computed in Go exactly as the CPU reference computes them);
//   - for the host, as a shared library the tests load with purego and check
//     against the Go reference without a GPU (HCACHE_HOST defined).
// Both builds use -ffp-contract=off, so the float arithmetic is the CPU
// reference's to the bit: a*b - c*d is two roundings of products and one of
// the difference, never a fused multiply-add.

#ifdef HCACHE_HOST
#define HC_KERNEL_BODY static inline
#define HC_DEVICE static inline
#else
#define HC_KERNEL extern "C" __attribute__((global))
#define HC_DEVICE static __attribute__((device)) inline
#define HC_KERNEL_BODY HC_DEVICE
#endif

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

// Element types of the KV cache (the model dtype).
#define HC_F16 0
#define HC_BF16 1
#define HC_F32 2

HC_DEVICE u32 f2u(float f) { return __builtin_bit_cast(u32, f); }

// f32 -> fp16, round to nearest even; overflow to infinity; NaN -> 0x7e00
// with the sign kept. The same algorithm as internal/half.FromFloat32.
HC_DEVICE u16 f32_to_f16(float f) {
	u32 b = f2u(f);
	u16 sign = (u16)((b >> 16) & 0x8000u);
	int exp = (int)((b >> 23) & 0xffu);
	u32 man = b & 0x7fffffu;
	if (exp == 0xff) {
		return man != 0 ? (u16)(sign | 0x7e00u) : (u16)(sign | 0x7c00u);
	}
	int e = exp - 127 + 15;
	if (e >= 0x1f) {
		return (u16)(sign | 0x7c00u);
	}
	if (e <= 0) {
		if (e < -10) {
			return sign;
		}
		man |= 0x800000u;
		u32 shift = (u32)(14 - e);
		u32 half = 1u << (shift - 1);
		u32 r = man >> shift;
		u32 rem = man & ((1u << shift) - 1);
		if (rem > half || (rem == half && (r & 1u))) {
			r++;
		}
		return (u16)(sign | r);
	}
	u32 r = ((u32)e << 10) | (man >> 13);
	u32 rem = man & 0x1fffu;
	if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) {
		r++;
	}
	return (u16)(sign | r);
}

// f32 -> bfloat16, round to nearest even; NaN stays a quiet NaN. As
// internal/half.BF16FromFloat32.
HC_DEVICE u16 f32_to_bf16(float f) {
	u32 b = f2u(f);
	if ((b & 0x7fffffffu) > 0x7f800000u) {
		return (u16)((b >> 16) | 0x40u);
	}
	b += 0x7fffu + ((b >> 16) & 1u);
	return (u16)(b >> 16);
}

HC_DEVICE void store_elem(void *base, u64 idx, float v, int dtype) {
	if (dtype == HC_F32) {
		((float *)base)[idx] = v;
	} else if (dtype == HC_BF16) {
		((u16 *)base)[idx] = f32_to_bf16(v);
	} else {
		((u16 *)base)[idx] = f32_to_f16(v);
	}
}

// The cache slot (in elements of one K or V token row) of position pos, or -1
// when the block table does not cover it.
HC_DEVICE long long slot_of(int pos, const int *block_table, int nblocks, int block_tokens, int kv_dim) {
	int lb = pos / block_tokens;
	if (pos < 0 || lb >= nblocks) {
		return -1;
	}
	long long pb = block_table[lb];
	if (pb < 0) {
		return -1;
	}
	return (pb * block_tokens + pos % block_tokens) * (long long)kv_dim;
}

// project_token: one token of a hidden layer. gemm holds the token's K then V
// ([2 x kv_dim] float32, the GEMM of the hidden row by the K||V weights);
// bias ([2 x kv_dim]) is added, RoPE (neox halves or interleaved pairs, from
// the cos/sin table [positions x head_dim/2 x 2]) rotates K, and both are
// rounded to the cache dtype and written to the token's slot. Threads
// tid, tid+nthreads, ... take pairs of elements.
HC_KERNEL_BODY void project_token(int tok, int tid, int nthreads, const float *gemm, const float *bias,
	const float *rope, const int *positions, const int *block_table, int nblocks, int block_tokens,
	int kv_heads, int head_dim, int interleaved, int dtype, void *kcache, void *vcache) {
	int kv_dim = kv_heads * head_dim;
	int half = head_dim / 2;
	int pos = positions[tok];
	long long slot = slot_of(pos, block_table, nblocks, block_tokens, kv_dim);
	if (slot < 0) {
		return;
	}
	const float *k = gemm + (u64)tok * 2 * kv_dim;
	const float *v = k + kv_dim;
	int pairs = kv_dim / 2;
	for (int p = tid; p < pairs; p += nthreads) {
		int h = p / half, i = p % half;
		int a = h * head_dim + i, b = a + half;
		if (interleaved) {
			a = h * head_dim + 2 * i;
			b = a + 1;
		}
		float x1 = k[a], x2 = k[b];
		if (bias) {
			x1 = x1 + bias[a];
			x2 = x2 + bias[b];
		}
		if (rope) {
			float c = rope[((u64)pos * half + i) * 2];
			float s = rope[((u64)pos * half + i) * 2 + 1];
			float y1 = x1 * c - x2 * s;
			float y2 = x2 * c + x1 * s;
			x1 = y1;
			x2 = y2;
		}
		store_elem(kcache, (u64)slot + a, x1, dtype);
		store_elem(kcache, (u64)slot + b, x2, dtype);
		int va = 2 * p, vb = 2 * p + 1;
		float v1 = v[va], v2 = v[vb];
		if (bias) {
			v1 = v1 + bias[kv_dim + va];
			v2 = v2 + bias[kv_dim + vb];
		}
		store_elem(vcache, (u64)slot + va, v1, dtype);
		store_elem(vcache, (u64)slot + vb, v2, dtype);
	}
}

// kv_token: one token of a layer saved as KV. rows holds the token's K then V
// in the cache dtype, row_words 32-bit words each; they are copied to the
// token's slot.
HC_KERNEL_BODY void kv_token(int tok, int tid, int nthreads, const u32 *rows, const int *positions,
	const int *block_table, int nblocks, int block_tokens, int row_words, u32 *kcache, u32 *vcache) {
	long long slot = slot_of(positions[tok], block_table, nblocks, block_tokens, row_words);
	if (slot < 0) {
		return;
	}
	const u32 *k = rows + (u64)tok * 2 * row_words;
	const u32 *v = k + row_words;
	for (int w = tid; w < row_words; w += nthreads) {
		kcache[slot + w] = k[w];
		vcache[slot + w] = v[w];
	}
}

#ifndef HCACHE_HOST
HC_DEVICE int hc_tid() { return __nvvm_read_ptx_sreg_tid_x(); }
HC_DEVICE int hc_ntid() { return __nvvm_read_ptx_sreg_ntid_x(); }
HC_DEVICE int hc_block() { return __nvvm_read_ptx_sreg_ctaid_x() + __nvvm_read_ptx_sreg_ctaid_y() * __nvvm_read_ptx_sreg_nctaid_x(); }

// One block per token (grid x*y >= n), threads over the token's elements.
HC_KERNEL void hc_project_scatter(const float *gemm, const float *bias, const float *rope, const int *positions,
	const int *block_table, int n, int nblocks, int block_tokens, int kv_heads, int head_dim, int interleaved,
	int dtype, void *kcache, void *vcache) {
	int tok = hc_block();
	if (tok >= n) {
		return;
	}
	project_token(tok, hc_tid(), hc_ntid(), gemm, bias, rope, positions, block_table, nblocks, block_tokens,
		kv_heads, head_dim, interleaved, dtype, kcache, vcache);
}

HC_KERNEL void hc_kv_scatter(const u32 *rows, const int *positions, const int *block_table, int n, int nblocks,
	int block_tokens, int row_words, u32 *kcache, u32 *vcache) {
	int tok = hc_block();
	if (tok >= n) {
		return;
	}
	kv_token(tok, hc_tid(), hc_ntid(), rows, positions, block_table, nblocks, block_tokens, row_words, kcache, vcache);
}
#else
// Host entry points: the same bodies, looping over the grid.
extern "C" void hc_host_project_scatter(const float *gemm, const float *bias, const float *rope,
	const int *positions, const int *block_table, int n, int nblocks, int block_tokens, int kv_heads,
	int head_dim, int interleaved, int dtype, void *kcache, void *vcache, int nthreads) {
	for (int tok = 0; tok < n; tok++) {
		for (int tid = 0; tid < nthreads; tid++) {
			project_token(tok, tid, nthreads, gemm, bias, rope, positions, block_table, nblocks, block_tokens,
				kv_heads, head_dim, interleaved, dtype, kcache, vcache);
		}
	}
}

extern "C" void hc_host_kv_scatter(const u32 *rows, const int *positions, const int *block_table, int n,
	int nblocks, int block_tokens, int row_words, u32 *kcache, u32 *vcache, int nthreads) {
	for (int tok = 0; tok < n; tok++) {
		for (int tid = 0; tid < nthreads; tid++) {
			kv_token(tok, tid, nthreads, rows, positions, block_table, nblocks, block_tokens, row_words, kcache,
				vcache);
		}
	}
}

extern "C" u16 hc_host_f16(float f) { return f32_to_f16(f); }
extern "C" u16 hc_host_bf16(float f) { return f32_to_bf16(f); }
#endif
