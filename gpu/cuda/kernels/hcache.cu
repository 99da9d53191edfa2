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

// The thread model. On the device, the usual CUDA indices and barrier. On
// the host, hc_host_grid runs a launch's blocks one after another, each
// block's threads as real threads (pthreads) meeting at a real barrier,
// with a per-block shared-memory buffer filled with NaNs: a kernel that
// forgets a barrier or reads shared memory nobody wrote shows it here.
#ifdef HCACHE_HOST
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
struct hc_thread {
	int block, nblocks, tid, ntid;
	pthread_barrier_t *bar;
	float *smem;
};
static thread_local hc_thread hc_self;
HC_DEVICE int hc_tid() { return hc_self.tid; }
HC_DEVICE int hc_ntid() { return hc_self.ntid; }
HC_DEVICE int hc_block() { return hc_self.block; }
HC_DEVICE int hc_nblocks() { return hc_self.nblocks; }
HC_DEVICE void hc_sync() {
	if (hc_self.bar) {
		pthread_barrier_wait(hc_self.bar);
	}
}
#define HC_SMEM (hc_self.smem)
#else
HC_DEVICE int hc_tid() { return __nvvm_read_ptx_sreg_tid_x(); }
HC_DEVICE int hc_ntid() { return __nvvm_read_ptx_sreg_ntid_x(); }
HC_DEVICE int hc_block() { return __nvvm_read_ptx_sreg_ctaid_x() + __nvvm_read_ptx_sreg_ctaid_y() * __nvvm_read_ptx_sreg_nctaid_x(); }
HC_DEVICE int hc_nblocks() { return __nvvm_read_ptx_sreg_nctaid_x() * __nvvm_read_ptx_sreg_nctaid_y(); }
HC_DEVICE void hc_sync() { __syncthreads(); }
extern __attribute__((shared)) float hc_smem[];
#define HC_SMEM hc_smem
#endif

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

// project_scatter_grid is hc_project_scatter's grid mapping: one block per
// token (grid x*y >= n), threads over the token's elements.
HC_KERNEL_BODY void project_scatter_grid(const float *gemm, const float *bias, const float *rope,
	const int *positions, const int *block_table, int n, int nblocks, int block_tokens, int kv_heads, int head_dim,
	int interleaved, int dtype, void *kcache, void *vcache) {
	int tok = hc_block();
	if (tok >= n) {
		return;
	}
	project_token(tok, hc_tid(), hc_ntid(), gemm, bias, rope, positions, block_table, nblocks, block_tokens,
		kv_heads, head_dim, interleaved, dtype, kcache, vcache);
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

// ---------------------------------------------------------------------------
// The forward pass of the layers a plan recomputes (model/forward.go on the
// device). The GEMMs are cuBLAS's (model-dtype inputs, float32 outputs); these
// kernels do everything between them. The residual stream and the GEMM
// outputs are float32; what feeds a GEMM is stored in the model dtype.
//
// Each kernel takes one argument, a struct, so the launch passes one pointer
// to a Go struct of the same layout. The fields are listed once (the
// HC_*_FIELDS macros); the host build exports each struct's field offsets
// and sizes (hc_host_layout_*), and a test checks them against the Go
// structs, field by field.

#define HC_FIELD(T, name) T name;

#define HC_EMBED_FIELDS(F)                                                                           \
	F(const void *, embed)     /* [vocab x hidden], model dtype */                                     \
	F(const void *, pos_embed) /* OPT: [positions + offset x hidden], model dtype; else null */        \
	F(const int *, tokens)     /* [n] */                                                               \
	F(const int *, positions)  /* [n] */                                                               \
	F(float *, x)              /* out: [n x hidden] float32 */                                         \
	F(int, n) F(int, hidden) F(int, dtype) F(int, pos_offset)
struct hc_embed_args {
	HC_EMBED_FIELDS(HC_FIELD)
};

#define HC_NORM_FIELDS(F)                                                                            \
	F(const float *, x)  /* [n x hidden] float32 */                                                    \
	F(const float *, w)  /* [hidden] */                                                                \
	F(const float *, b)  /* [hidden] (LayerNorm) or null */                                            \
	F(void *, out)       /* [n x hidden], model dtype */                                               \
	F(int, n) F(int, hidden) F(int, layernorm) F(int, dtype) F(float, eps)
struct hc_norm_args {
	HC_NORM_FIELDS(HC_FIELD)
};

#define HC_QROPE_FIELDS(F)                                                                           \
	F(float *, q)              /* [n x heads x head_dim] float32, in place */                          \
	F(const float *, bias)     /* [heads x head_dim] or null */                                        \
	F(const float *, rope)     /* [positions x head_dim/2 x 2] cos, sin or null */                     \
	F(const int *, positions)  /* [n] */                                                               \
	F(int, n) F(int, heads) F(int, head_dim) F(int, interleaved)
struct hc_qrope_args {
	HC_QROPE_FIELDS(HC_FIELD)
};

#define HC_ATTN_FIELDS(F)                                                                            \
	F(const float *, q)          /* [n x heads x head_dim] float32 (biased, rotated) */                \
	F(const void *, kcache)      /* paged [blocks x block_tokens x kv_heads x head_dim], model dtype */ \
	F(const void *, vcache)                                                                            \
	F(const int *, positions)    /* [n]: query i attends to cache positions 0..positions[i] */        \
	F(const int *, block_table)  /* [nblocks] */                                                       \
	F(void *, out)               /* [n x heads x head_dim], model dtype */                             \
	F(int, n) F(int, nblocks) F(int, block_tokens) F(int, heads) F(int, kv_heads) F(int, head_dim)     \
	F(int, dtype) F(float, scale)
struct hc_attn_args {
	HC_ATTN_FIELDS(HC_FIELD)
};

#define HC_RESIDUAL_FIELDS(F)                                                                        \
	F(float *, x)           /* [n x hidden] float32, x += y + bias */                                  \
	F(const float *, y)     /* [n x hidden] float32 (a GEMM output) */                                 \
	F(const float *, bias)  /* [hidden] or null */                                                     \
	F(int, n) F(int, hidden)
struct hc_residual_args {
	HC_RESIDUAL_FIELDS(HC_FIELD)
};

#define HC_SWIGLU_FIELDS(F)                                                                          \
	F(const float *, gu)  /* [n x 2 inter] float32: gate then up, per token */                         \
	F(void *, out)        /* [n x inter], model dtype: silu(gate) * up */                              \
	F(int, n) F(int, inter) F(int, dtype)
struct hc_swiglu_args {
	HC_SWIGLU_FIELDS(HC_FIELD)
};

#define HC_ACT_NONE 0
#define HC_ACT_RELU 1
#define HC_ACT_GELU_TANH 2
#define HC_BIAS_ACT_FIELDS(F)                                                                        \
	F(const float *, a)     /* [n x cols] float32 */                                                   \
	F(const float *, bias)  /* [cols] or null */                                                       \
	F(void *, out)          /* [n x cols], model dtype: act(a + bias) */                               \
	F(int, n) F(int, cols) F(int, act) F(int, dtype)
struct hc_bias_act_args {
	HC_BIAS_ACT_FIELDS(HC_FIELD)
};

HC_DEVICE float f16_to_f32(u16 h) {
	u32 sign = (u32)(h & 0x8000u) << 16;
	u32 exp = (h >> 10) & 0x1fu;
	u32 man = h & 0x3ffu;
	if (exp == 0x1f) {
		return __builtin_bit_cast(float, sign | 0x7f800000u | (man << 13));
	}
	if (exp == 0) {
		// Zero or subnormal: man x 2^-24, exact in float32.
		float v = (float)man * 5.9604644775390625e-8f;
		return sign ? -v : v;
	}
	return __builtin_bit_cast(float, sign | ((exp + 127 - 15) << 23) | (man << 13));
}

HC_DEVICE float load_elem(const void *base, u64 idx, int dtype) {
	if (dtype == HC_F32) {
		return ((const float *)base)[idx];
	}
	u16 h = ((const u16 *)base)[idx];
	if (dtype == HC_BF16) {
		return __builtin_bit_cast(float, (u32)h << 16);
	}
	return f16_to_f32(h);
}

// hc_exp is Go's math.Exp algorithm (FreeBSD's e_exp.c) in float64: no
// libdevice is linked, and a float32 result rounded from it equals
// float32(math.Exp(float64(x))) of the CPU reference (Go's assembly exp and
// this one agree to within an ulp of float64, far below float32 rounding).
HC_DEVICE double hc_ldexp(double y, int k) {
	// y in [0.5, 2); 2^k built from bits in two steps so no factor
	// overflows or underflows on its own.
	int k1 = k / 2, k2 = k - k1;
	double f1 = __builtin_bit_cast(double, (u64)(k1 + 1023) << 52);
	double f2 = __builtin_bit_cast(double, (u64)(k2 + 1023) << 52);
	return y * f1 * f2;
}

HC_DEVICE double hc_exp(double x) {
	const double Ln2Hi = 6.93147180369123816490e-01, Ln2Lo = 1.90821492927058770002e-10,
				 Log2e = 1.44269504088896338700e+00, Overflow = 7.09782712893383973096e+02,
				 Underflow = -7.45133219101941108420e+02, NearZero = 1.0 / (1 << 28);
	const double P1 = 1.66666666666666657415e-01, P2 = -2.77777777770155933842e-03, P3 = 6.61375632143793436117e-05,
				 P4 = -1.65339022054652515390e-06, P5 = 4.13813679705723846039e-08;
	if (x != x) {
		return x;
	}
	if (x > Overflow) {
		return __builtin_bit_cast(double, 0x7ff0000000000000ull);
	}
	if (x < Underflow) {
		return 0;
	}
	if (-NearZero < x && x < NearZero) {
		return 1 + x;
	}
	int k = 0;
	if (x < 0) {
		k = (int)(Log2e * x - 0.5);
	} else if (x > 0) {
		k = (int)(Log2e * x + 0.5);
	}
	double hi = x - (double)k * Ln2Hi;
	double lo = (double)k * Ln2Lo;
	double r = hi - lo;
	double t = r * r;
	double c = r - t * (P1 + t * (P2 + t * (P3 + t * (P4 + t * P5))));
	double y = 1 - ((lo - (r * c) / (2 - c)) - hi);
	return hc_ldexp(y, k);
}

// silu is tensor.SiLU: x / (1 + float32(exp(-x))).
HC_DEVICE float hc_silu(float x) { return x / (1 + (float)hc_exp(-(double)x)); }

// gelu_tanh is GELU's tanh approximation, 0.5 x (1 + tanh(u)), written as
// x * sigmoid(2u) (no cancellation where tanh(u) is near -1), in float64.
HC_DEVICE float hc_gelu_tanh(float x) {
	double v = x;
	double u = 0.7978845608028654 * (v + 0.044715 * v * v * v);
	return (float)(v / (1 + hc_exp(-2 * u)));
}

// dot is tensor.Dot: eight float32 partial sums, combined in a fixed tree.
HC_DEVICE float hc_dot(const float *a, const float *b, int n) {
	float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
	int i = 0;
	for (; i + 8 <= n; i += 8) {
		s0 = s0 + a[i] * b[i];
		s1 = s1 + a[i + 1] * b[i + 1];
		s2 = s2 + a[i + 2] * b[i + 2];
		s3 = s3 + a[i + 3] * b[i + 3];
		s4 = s4 + a[i + 4] * b[i + 4];
		s5 = s5 + a[i + 5] * b[i + 5];
		s6 = s6 + a[i + 6] * b[i + 6];
		s7 = s7 + a[i + 7] * b[i + 7];
	}
	for (; i < n; i++) {
		s0 = s0 + a[i] * b[i];
	}
	return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7));
}

// The index of this thread's first element and the stride of a grid-stride
// loop over a flat array.
HC_DEVICE u64 hc_first() { return (u64)hc_block() * (u64)hc_ntid() + (u64)hc_tid(); }
HC_DEVICE u64 hc_stride() { return (u64)hc_nblocks() * (u64)hc_ntid(); }

// embed: x[t] = embed[tokens[t]] (+ pos_embed[positions[t] + pos_offset]).
// Any grid; bit-exact with the CPU (a widening and one float32 add).
HC_KERNEL_BODY void embed_body(struct hc_embed_args a) {
	u64 total = (u64)a.n * (u64)a.hidden;
	for (u64 i = hc_first(); i < total; i += hc_stride()) {
		int t = (int)(i / (u64)a.hidden), j = (int)(i % (u64)a.hidden);
		float v = load_elem(a.embed, (u64)a.tokens[t] * (u64)a.hidden + (u64)j, a.dtype);
		if (a.pos_embed) {
			v = v + load_elem(a.pos_embed, (u64)(a.positions[t] + a.pos_offset) * (u64)a.hidden + (u64)j, a.dtype);
		}
		a.x[i] = v;
	}
}

// block_sum adds v over the block's threads (a tree in shared memory; any
// thread count) and returns the total to every thread.
HC_DEVICE float block_sum(float v) {
	float *s = HC_SMEM;
	int tid = hc_tid(), nt = hc_ntid();
	s[tid] = v;
	hc_sync();
	int p = 1;
	while (p < nt) {
		p <<= 1;
	}
	for (int st = p >> 1; st > 0; st >>= 1) {
		if (tid < st && tid + st < nt) {
			s[tid] = s[tid] + s[tid + st];
		}
		hc_sync();
	}
	float r = s[0];
	hc_sync();
	return r;
}

// norm: one block per row (grid >= n), ntid floats of shared memory. RMSNorm
// (x * inv * w) or LayerNorm ((x - mean) * inv * w + b), the sums in float32
// over the block (so not in the CPU's order: within a tolerance), inv as
// the CPU computes it from them; the result rounded to the model dtype.
HC_KERNEL_BODY void norm_body(struct hc_norm_args a) {
	int row = hc_block();
	if (row >= a.n) {
		return; // the whole block: no barrier is skipped by some threads only
	}
	const float *x = a.x + (u64)row * (u64)a.hidden;
	int tid = hc_tid(), nt = hc_ntid();
	float part = 0;
	for (int j = tid; j < a.hidden; j += nt) {
		part = part + (a.layernorm ? x[j] : x[j] * x[j]);
	}
	float total = block_sum(part);
	float mean = 0;
	if (a.layernorm) {
		mean = total / (float)a.hidden;
		part = 0;
		for (int j = tid; j < a.hidden; j += nt) {
			float d = x[j] - mean;
			part = part + d * d;
		}
		total = block_sum(part);
	}
	float inv = (float)(1.0 / __builtin_sqrt((double)(total / (float)a.hidden + a.eps)));
	for (int j = tid; j < a.hidden; j += nt) {
		float y;
		if (a.layernorm) {
			y = (x[j] - mean) * inv * a.w[j];
			if (a.b) {
				y = y + a.b[j];
			}
		} else {
			y = x[j] * inv * a.w[j];
		}
		store_elem(a.out, (u64)row * (u64)a.hidden + (u64)j, y, a.dtype);
	}
}

// qrope: Q's bias and RoPE, in place, in float32: one block per token, threads
// over pairs, the arithmetic of project_token (bit-exact with the CPU).
HC_KERNEL_BODY void qrope_body(struct hc_qrope_args a) {
	int tok = hc_block();
	if (tok >= a.n) {
		return;
	}
	int half = a.head_dim / 2, qd = a.heads * a.head_dim;
	int pos = a.positions[tok];
	float *q = a.q + (u64)tok * (u64)qd;
	for (int p = hc_tid(); p < a.heads * half; p += hc_ntid()) {
		int h = p / half, i = p % half;
		int ia = h * a.head_dim + i, ib = ia + half;
		if (a.interleaved) {
			ia = h * a.head_dim + 2 * i;
			ib = ia + 1;
		}
		float x1 = q[ia], x2 = q[ib];
		if (a.bias) {
			x1 = x1 + a.bias[ia];
			x2 = x2 + a.bias[ib];
		}
		if (a.rope) {
			float c = a.rope[((u64)pos * half + i) * 2];
			float s = a.rope[((u64)pos * half + i) * 2 + 1];
			float y1 = x1 * c - x2 * s;
			float y2 = x2 * c + x1 * s;
			x1 = y1;
			x2 = y2;
		}
		q[ia] = x1;
		q[ib] = x2;
	}
}

// Keys per shared-memory tile of the attention kernel.
#define HC_ATTN_BK(HD) ((HD) >= 128 ? 16 : 32)

// attention: causal attention of n queries over the paged cache, in the
// style of FlashAttention-2. A block takes ntid consecutive queries of one
// head (grid = ceil(n / ntid) x heads, the head fastest); each thread owns
// one query: q and a float32 accumulator of head_dim in registers, a running
// maximum and sum. Key/value tiles of HC_ATTN_BK positions are read from the
// cache through the block table into shared memory (2 x BK x HD floats) by
// the whole block, and each thread folds the tile's positions up to its own
// into its online softmax: scores as the CPU computes them (tensor.Dot, then
// the scale: bit-exact), the maximum, the sum and the output in another
// order (within a tolerance). No n x n buffer; GQA maps head h to KV head
// h / (heads / kv_heads).
template <int HD>
HC_DEVICE void attention_hd(const struct hc_attn_args &a) {
	const int BK = HC_ATTN_BK(HD);
	int tid = hc_tid(), nt = hc_ntid();
	int blk = hc_block();
	int head = blk % a.heads, tile = blk / a.heads;
	if (tile * nt >= a.n) {
		return; // the whole block
	}
	int kvh = head / (a.heads / a.kv_heads);
	int kv_dim = a.kv_heads * HD;
	int qi = tile * nt + tid;
	int live = qi < a.n;
	int qpos = live ? a.positions[qi] : -1;
	int maxpos = -1;
	for (int i = tile * nt; i < a.n && i < (tile + 1) * nt; i++) {
		maxpos = a.positions[i] > maxpos ? a.positions[i] : maxpos;
	}
	float qv[HD], acc[HD];
#pragma unroll
	for (int d = 0; d < HD; d++) {
		qv[d] = live ? a.q[((u64)qi * a.heads + head) * HD + d] : 0;
		acc[d] = 0;
	}
	const float neg_inf = __builtin_bit_cast(float, 0xff800000u);
	float m = neg_inf, l = 0;
	float *ks = HC_SMEM;
	float *vs = ks + BK * HD;
	for (int t0 = 0; t0 <= maxpos; t0 += BK) {
		for (int e = tid; e < BK * HD; e += nt) {
			int j = e / HD, d = e % HD;
			float kx = 0, vx = 0;
			if (t0 + j <= maxpos) {
				long long slot = slot_of(t0 + j, a.block_table, a.nblocks, a.block_tokens, kv_dim);
				if (slot >= 0) {
					kx = load_elem(a.kcache, (u64)slot + (u64)(kvh * HD + d), a.dtype);
					vx = load_elem(a.vcache, (u64)slot + (u64)(kvh * HD + d), a.dtype);
				}
			}
			ks[e] = kx;
			vs[e] = vx;
		}
		hc_sync();
		if (live && t0 <= qpos) {
			// Unrolled over the head dim (not the tile), so q and the
			// accumulator stay in registers.
			int jn = qpos - t0 + 1 < BK ? qpos - t0 + 1 : BK;
			float s[BK];
			float tmax = neg_inf;
#pragma unroll 1
			for (int j = 0; j < BK; j++) {
				s[j] = j < jn ? hc_dot(qv, ks + j * HD, HD) * a.scale : neg_inf;
				tmax = s[j] > tmax ? s[j] : tmax;
			}
			float mnew = tmax > m ? tmax : m;
			float corr = (float)hc_exp((double)(m - mnew));
			l = l * corr;
#pragma unroll
			for (int d = 0; d < HD; d++) {
				acc[d] = acc[d] * corr;
			}
#pragma unroll 1
			for (int j = 0; j < BK; j++) {
				if (j < jn) {
					float p = (float)hc_exp((double)(s[j] - mnew));
					l = l + p;
#pragma unroll
					for (int d = 0; d < HD; d++) {
						acc[d] = acc[d] + p * vs[j * HD + d];
					}
				}
			}
			m = mnew;
		}
		hc_sync();
	}
	if (live) {
#pragma unroll
		for (int d = 0; d < HD; d++) {
			store_elem(a.out, ((u64)qi * a.heads + head) * HD + d, acc[d] / l, a.dtype);
		}
	}
}

// The head dims the attention kernel is built for; shared memory is
// 2 x HC_ATTN_BK(head_dim) x head_dim floats.
HC_KERNEL_BODY void attention_body(struct hc_attn_args a) {
	switch (a.head_dim) {
	case 16:
		attention_hd<16>(a);
		break;
	case 32:
		attention_hd<32>(a);
		break;
	case 64:
		attention_hd<64>(a);
		break;
	case 128:
		attention_hd<128>(a);
		break;
	}
}

// residual: x += y (+ bias), elementwise (bit-exact: the CPU adds the bias in
// its GEMM, then the output to the residual).
HC_KERNEL_BODY void residual_body(struct hc_residual_args a) {
	u64 total = (u64)a.n * (u64)a.hidden;
	for (u64 i = hc_first(); i < total; i += hc_stride()) {
		float y = a.y[i];
		if (a.bias) {
			y = y + a.bias[i % (u64)a.hidden];
		}
		a.x[i] = a.x[i] + y;
	}
}

// swiglu: out = silu(gate) * up, rounded to the model dtype (the CPU's
// float32 product to the bit; the rounding is the GEMM input's).
HC_KERNEL_BODY void swiglu_body(struct hc_swiglu_args a) {
	u64 total = (u64)a.n * (u64)a.inter;
	for (u64 i = hc_first(); i < total; i += hc_stride()) {
		u64 t = i / (u64)a.inter, j = i % (u64)a.inter;
		float g = a.gu[t * 2 * (u64)a.inter + j];
		float u = a.gu[t * 2 * (u64)a.inter + (u64)a.inter + j];
		store_elem(a.out, i, hc_silu(g) * u, a.dtype);
	}
}

// bias_act: out = act(a + bias), rounded to the model dtype. ReLU is Go's
// max(v, 0) (NaN stays NaN).
HC_KERNEL_BODY void bias_act_body(struct hc_bias_act_args a) {
	u64 total = (u64)a.n * (u64)a.cols;
	for (u64 i = hc_first(); i < total; i += hc_stride()) {
		float v = a.a[i];
		if (a.bias) {
			v = v + a.bias[i % (u64)a.cols];
		}
		if (a.act == HC_ACT_RELU) {
			v = (v != v || v > 0) ? v : 0.0f;
		} else if (a.act == HC_ACT_GELU_TANH) {
			v = hc_gelu_tanh(v);
		}
		store_elem(a.out, i, v, a.dtype);
	}
}

#ifndef HCACHE_HOST

HC_KERNEL void hc_project_scatter(const float *gemm, const float *bias, const float *rope, const int *positions,
	const int *block_table, int n, int nblocks, int block_tokens, int kv_heads, int head_dim, int interleaved,
	int dtype, void *kcache, void *vcache) {
	project_scatter_grid(gemm, bias, rope, positions, block_table, n, nblocks, block_tokens, kv_heads, head_dim,
		interleaved, dtype, kcache, vcache);
}

HC_KERNEL void hc_kv_scatter(const u32 *rows, const int *positions, const int *block_table, int n, int nblocks,
	int block_tokens, int row_words, u32 *kcache, u32 *vcache) {
	int tok = hc_block();
	if (tok >= n) {
		return;
	}
	kv_token(tok, hc_tid(), hc_ntid(), rows, positions, block_table, nblocks, block_tokens, row_words, kcache, vcache);
}

// The forward-pass kernels: one struct argument each.
#define HC_DEFINE(name, T, SYNC) \
	HC_KERNEL void hc_##name(struct T a) { name##_body(a); }
#else
// hc_host_grid runs a launch on the host: blocks in turn; a block's threads
// as pthreads meeting at a barrier when the kernel synchronises (sync),
// else one after another on the calling thread. Returns 0, or -1 when a
// thread cannot be started.
template <class F>
struct hc_job {
	F *f;
	hc_thread t;
};

template <class F>
static void *hc_thread_main(void *p) {
	hc_job<F> *j = (hc_job<F> *)p;
	hc_self = j->t;
	(*j->f)();
	return 0;
}

template <class F>
static int hc_host_grid(int blocks, int threads, long smem_bytes, int sync, F f) {
	if (blocks <= 0 || threads <= 0 || smem_bytes < 0) {
		return -1;
	}
	float *smem = (float *)malloc((size_t)smem_bytes + 16);
	pthread_t *ts = (pthread_t *)malloc(sizeof(pthread_t) * (size_t)threads);
	hc_job<F> *jobs = (hc_job<F> *)malloc(sizeof(hc_job<F>) * (size_t)threads);
	int rc = 0;
	for (int b = 0; b < blocks && rc == 0; b++) {
		memset(smem, 0xff, (size_t)smem_bytes + 16); // NaNs: unwritten shared memory shows
		if (!sync) {
			for (int t = 0; t < threads; t++) {
				hc_self = hc_thread{b, blocks, t, threads, 0, smem};
				f();
			}
			continue;
		}
		pthread_barrier_t bar;
		pthread_barrier_init(&bar, 0, (unsigned)threads);
		int started = 0;
		for (int t = 0; t < threads; t++) {
			jobs[t].f = &f;
			jobs[t].t = hc_thread{b, blocks, t, threads, &bar, smem};
			if (pthread_create(&ts[t], 0, hc_thread_main<F>, &jobs[t]) != 0) {
				rc = -1;
				break;
			}
			started++;
		}
		if (rc != 0) {
			// The started threads wait at the barrier for ever: cannot
			// recover; report it (tests use small blocks).
			abort();
		}
		for (int t = 0; t < started; t++) {
			pthread_join(ts[t], 0);
		}
		pthread_barrier_destroy(&bar);
	}
	hc_self = hc_thread{0, 0, 0, 0, 0, 0};
	free(jobs);
	free(ts);
	free(smem);
	return rc;
}

#define HC_LAYOUT(T, name) \
	out[i++] = (long long)__builtin_offsetof(S, name); \
	out[i++] = (long long)sizeof(((S *)0)->name);

// hc_host_launch_<name>(params, grid, threads, smem) takes what
// cuLaunchKernel would (params[0] points at the argument struct);
// hc_host_layout_<name>(out) writes each field's offset and size, then the
// struct's size, and returns the count written.
#define HC_DEFINE(name, T, SYNC) \
	extern "C" int hc_host_launch_##name(void **params, int grid, int threads, long smem) { \
		struct T a = *(struct T *)params[0]; \
		return hc_host_grid(grid, threads, smem, SYNC, [&] { name##_body(a); }); \
	}

#define HC_NAME(T, name) #name ","

// hc_host_fields_<name>() lists the field names, each followed by a comma.
#define HC_DEFINE_LAYOUT(name, S_, FIELDS) \
	extern "C" int hc_host_layout_##name(long long *out) { \
		typedef struct S_ S; \
		int i = 0; \
		FIELDS(HC_LAYOUT) \
		out[i++] = (long long)sizeof(S); \
		return i; \
	} \
	extern "C" const char *hc_host_fields_##name() { return FIELDS(HC_NAME); }
HC_DEFINE_LAYOUT(embed, hc_embed_args, HC_EMBED_FIELDS)
HC_DEFINE_LAYOUT(norm, hc_norm_args, HC_NORM_FIELDS)
HC_DEFINE_LAYOUT(qrope, hc_qrope_args, HC_QROPE_FIELDS)
HC_DEFINE_LAYOUT(attention, hc_attn_args, HC_ATTN_FIELDS)
HC_DEFINE_LAYOUT(residual, hc_residual_args, HC_RESIDUAL_FIELDS)
HC_DEFINE_LAYOUT(swiglu, hc_swiglu_args, HC_SWIGLU_FIELDS)
HC_DEFINE_LAYOUT(bias_act, hc_bias_act_args, HC_BIAS_ACT_FIELDS)

// hc_project_scatter's arguments as cuLaunchKernel passes them (one pointer
// per parameter), run over the grid as the device does.
extern "C" int hc_host_launch_project_scatter(void **params, int grid, int threads, long smem) {
	const float *gemm = *(const float **)params[0];
	const float *bias = *(const float **)params[1];
	const float *rope = *(const float **)params[2];
	const int *positions = *(const int **)params[3];
	const int *block_table = *(const int **)params[4];
	int n = *(int *)params[5], nblocks = *(int *)params[6], block_tokens = *(int *)params[7];
	int kv_heads = *(int *)params[8], head_dim = *(int *)params[9], interleaved = *(int *)params[10];
	int dtype = *(int *)params[11];
	void *kcache = *(void **)params[12];
	void *vcache = *(void **)params[13];
	return hc_host_grid(grid, threads, smem, 0, [&] {
		project_scatter_grid(gemm, bias, rope, positions, block_table, n, nblocks, block_tokens, kv_heads, head_dim,
			interleaved, dtype, kcache, vcache);
	});
}

// hc_kv_scatter's arguments as cuLaunchKernel passes them, over the grid.
extern "C" int hc_host_launch_kv_scatter(void **params, int grid, int threads, long smem) {
	const u32 *rows = *(const u32 **)params[0];
	const int *positions = *(const int **)params[1];
	const int *block_table = *(const int **)params[2];
	int n = *(int *)params[3], nblocks = *(int *)params[4], block_tokens = *(int *)params[5];
	int row_words = *(int *)params[6];
	u32 *kcache = *(u32 **)params[7];
	u32 *vcache = *(u32 **)params[8];
	return hc_host_grid(grid, threads, smem, 0, [&] {
		int tok = hc_block();
		if (tok < n) {
			kv_token(tok, hc_tid(), hc_ntid(), rows, positions, block_table, nblocks, block_tokens, row_words, kcache,
				vcache);
		}
	});
}

extern "C" float hc_host_silu(float x) { return hc_silu(x); }
extern "C" float hc_host_gelu_tanh(float x) { return hc_gelu_tanh(x); }
extern "C" double hc_host_exp(double x) { return hc_exp(x); }
// The widened bits (a float return would pass through float64 and quiet a
// signalling NaN).
extern "C" u32 hc_host_widen(u16 h, int dtype) { return f2u(load_elem(&h, 0, dtype)); }

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

HC_DEFINE(embed, hc_embed_args, 0)
HC_DEFINE(norm, hc_norm_args, 1)
HC_DEFINE(qrope, hc_qrope_args, 0)
HC_DEFINE(attention, hc_attn_args, 1)
HC_DEFINE(residual, hc_residual_args, 0)
HC_DEFINE(swiglu, hc_swiglu_args, 0)
HC_DEFINE(bias_act, hc_bias_act_args, 0)
