// hcache's codec kernel: fp8 E4M3 rows (state/codec) decoded into the model
// dtype on the device, after the copy has moved the fp8 bytes. Compiled like
// hcache.cu: to PTX by clang-19 without a CUDA installation (go generate in
// gpu/cuda), and for the host (HCACHE_HOST) as a shared library the tests
// check against state/codec.Transcode to the bit. -ffp-contract=off in both.
//
// A stored row is segs segments, then zeros up to row_bytes (a multiple of
// 64); a segment of vals values is vals E4M3 codes, then ceil(vals / block)
// little-endian float32 scales (block = vals for the per-token codec, 128 for
// the per-block one). Segment g (row g / segs, segment g % segs) decodes to
// elements g*vals .. g*vals+vals-1 of dst. A value decodes as
// e4m3(code) * scale (one float32 multiply), rounded to the dtype. A NaN
// code (0x7f, 0xff) or a scale that is negative or not finite is not an
// encoding: the kernel sets *bad and writes 0, and the host refuses the
// rows.

#ifdef HCACHE_HOST
#define HC_DEVICE static inline
#else
#define HC_KERNEL extern "C" __attribute__((global))
#define HC_DEVICE static __attribute__((device)) inline
#endif

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef unsigned long long u64;

#define HC_F16 0
#define HC_BF16 1
#define HC_F32 2

HC_DEVICE u32 cf2u(float f) { return __builtin_bit_cast(u32, f); }
HC_DEVICE float cu2f(u32 u) { return __builtin_bit_cast(float, u); }

// f32 -> fp16 and bf16, round to nearest even: hcache.cu's conversions
// (internal/half's algorithm), repeated here so that this module stands
// alone; the host test checks them against internal/half.
HC_DEVICE u16 c_f32_to_f16(float f) {
	u32 b = cf2u(f);
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

HC_DEVICE u16 c_f32_to_bf16(float f) {
	u32 b = cf2u(f);
	if ((b & 0x7fffffffu) > 0x7f800000u) {
		return (u16)((b >> 16) | 0x40u);
	}
	b += 0x7fffu + ((b >> 16) & 1u);
	return (u16)(b >> 16);
}

// e4m3 is a code's value (finite codes only): normals by their bits, the
// subnormals m x 2^-9 exactly.
HC_DEVICE float e4m3(u8 q) {
	u32 e = (q >> 3) & 15u, m = q & 7u;
	u32 sign = (u32)(q & 0x80u) << 24;
	if (e == 0) {
		return cu2f(cf2u((float)m * (1.0f / 512.0f)) | sign);
	}
	return cu2f(sign | ((e + 120u) << 23) | (m << 20));
}

// fp8_value decodes value i of segment seg into dst (element seg*vals + i).
HC_DEVICE void fp8_value(const u8 *src, void *dst, int seg, int i, int segs, int vals, int block, int seg_bytes,
	int row_bytes, int dtype, int *bad) {
	const u8 *s = src + (u64)(seg / segs) * (u64)row_bytes + (u64)(seg % segs) * (u64)seg_bytes;
	const u8 *sp = s + vals + 4 * (i / block);
	u32 sb = (u32)sp[0] | ((u32)sp[1] << 8) | ((u32)sp[2] << 16) | ((u32)sp[3] << 24);
	float scale = cu2f(sb);
	u8 q = s[i];
	float v = 0.0f;
	if ((q & 0x7fu) == 0x7fu || !(scale >= 0.0f) || (sb & 0x7f800000u) == 0x7f800000u) {
		*bad = 1;
	} else {
		v = e4m3(q) * scale;
	}
	u64 idx = (u64)seg * (u64)vals + (u64)i;
	if (dtype == HC_F32) {
		((float *)dst)[idx] = v;
	} else if (dtype == HC_BF16) {
		((u16 *)dst)[idx] = c_f32_to_bf16(v);
	} else {
		((u16 *)dst)[idx] = c_f32_to_f16(v);
	}
}

#ifndef HCACHE_HOST
// One block per segment, its threads striding over the values.
HC_KERNEL void hc_fp8_dequant(const u8 *src, void *dst, int nseg, int segs, int vals, int block, int seg_bytes,
	int row_bytes, int dtype, int *bad) {
	int seg = __nvvm_read_ptx_sreg_ctaid_x() + __nvvm_read_ptx_sreg_ctaid_y() * __nvvm_read_ptx_sreg_nctaid_x();
	if (seg >= nseg) {
		return;
	}
	for (int i = __nvvm_read_ptx_sreg_tid_x(); i < vals; i += __nvvm_read_ptx_sreg_ntid_x()) {
		fp8_value(src, dst, seg, i, segs, vals, block, seg_bytes, row_bytes, dtype, bad);
	}
}
#else
// hc_fp8_dequant's arguments as cuLaunchKernel passes them (one pointer per
// parameter), over a one-dimensional grid as the device runs it: block seg,
// threads in turn.
extern "C" int hc_host_launch_fp8_dequant(void **params, int grid, int threads, long smem) {
	const u8 *src = *(const u8 **)params[0];
	void *dst = *(void **)params[1];
	int nseg = *(int *)params[2], segs = *(int *)params[3], vals = *(int *)params[4], block = *(int *)params[5];
	int seg_bytes = *(int *)params[6], row_bytes = *(int *)params[7], dtype = *(int *)params[8];
	int *bad = *(int **)params[9];
	if (grid <= 0 || threads <= 0 || smem < 0) {
		return -1;
	}
	for (int seg = 0; seg < grid; seg++) {
		if (seg >= nseg) {
			continue;
		}
		for (int tid = 0; tid < threads; tid++) {
			for (int i = tid; i < vals; i += threads) {
				fp8_value(src, dst, seg, i, segs, vals, block, seg_bytes, row_bytes, dtype, bad);
			}
		}
	}
	return 0;
}

// The same body over the grid, threads in turn.
extern "C" void hc_host_fp8_dequant(const u8 *src, void *dst, int nseg, int segs, int vals, int block,
	int seg_bytes, int row_bytes, int dtype, int *bad, int nthreads) {
	for (int seg = 0; seg < nseg; seg++) {
		for (int tid = 0; tid < nthreads; tid++) {
			for (int i = tid; i < vals; i += nthreads) {
				fp8_value(src, dst, seg, i, segs, vals, block, seg_bytes, row_bytes, dtype, bad);
			}
		}
	}
}
#endif
