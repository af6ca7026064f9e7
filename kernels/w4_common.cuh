/*
 * w4_common.cuh: what the kernel sources share (w4_linear.cu, the default, and w4_linear_tiled.cu):
 * the layout contract, the weight decoders, the PTX wrappers both use, the x staging, the branch's
 * down-projection items and the dequantizer. Each source includes it; the loader
 * (llmcompress/cuda/launch.py, kernel_text) inlines it into the text it hands NVRTC, so that CuPy's
 * binary cache, keyed by that text, sees a change here too.
 *
 * Notation: M tokens (batch rows of x), N output features, K input features, G = groups of
 * GS input features each (GS in {16, 32} or a multiple of 64), R = branch rank (0 = none).
 * T is the activation type (__half or __nv_bfloat16); the kernels are instantiated for both.
 *
 * Layout contract (the "prepacked" layout, built from the canonical checkpoint layout by
 * llmcompress/cuda/prepack.py at load time; the checkpoint itself stays canonical):
 *   Npad = ceil(N/16)*16, Kpad = ceil(K/64)*64, RT = Npad/16 row tiles, KB = Kpad/64 k-blocks.
 *   qweight  int32 [RT][KB][32 lanes][4 steps]: word (rt, kb, lane, s) holds the 8 codes that
 *            lane (g = lane/4, t = lane%4) feeds to mma.m16n8k16 as its A fragment for rows
 *            rt*16 + {g, g+8} and columns kb*64 + s*16 + {2t, 2t+1, 2t+8, 2t+9}. Codes are
 *            zero-padded past N and K (x is zero there, so they contribute nothing).
 *            Fragment element e (a0..a7 of the PTX ISA) sits in nibble INT_NIBBLE[e] (INT4:
 *            pair p = nibbles p and p+4) or FP4_NIBBLE[e] (FP4: chosen so one byte permute
 *            decodes a pair), see decode_word below.
 *   records  [RT][KB][8]: the scales (and zero points) lane g of a k-block needs, loaded with
 *            its weights. GPB = groups per k-block (1 for GS >= 64, 2 for GS = 32, 4 for 16).
 *            INT4: T [2][GPB] scales for rows g, g+8 of the tile, then T [2][GPB] of
 *            (magic + zero point), where magic is what the decoder ORs the code into (1024 for
 *            FP16, 128 for BF16); symmetric layers store zero point 8. 8 bytes, 16 for GS = 32.
 *            NVFP4: uint8 E4M3 bits [2][4]. MXFP4: uint8 E8M0 exponents [2][2], padded to 8 bytes.
 *   perm     int32 [Kpad] or null: x's column feeding prepacked column k (act-order g_idx).
 *   lr_a     T [Rpad][Kpad] (A, permuted like W, zero-padded), lr_b T [Npad][Rpad], Rpad % 16 == 0.
 *   bias     T [N] or null.   x: T [M][K], row-major, contiguous.   y: T [M][N].
 *   out_scale: float multiplying the low-bit product (NVFP4: 256 / global scale; MXFP4:
 *            2^scale_shift, see record_params; INT4: 1).
 */
#ifndef W4_COMMON_CUH
#define W4_COMMON_CUH

#include <cuda_fp16.h>
#include <cuda_bf16.h>

// One variant per compile leaves the other activation type's and weight kinds' helpers unused:
// without this, nvcc warns (#177) about each of them.
#pragma nv_diag_suppress 177

namespace {

constexpr int WARPS = 8;
constexpr int THREADS = WARPS * 32;
constexpr int KBLOCK = 64;
constexpr int CHUNK_KB = 4;
constexpr int CHUNK = CHUNK_KB * KBLOCK;
// One 16-byte pad per row of the staged x keeps ldmatrix's eight row reads in distinct banks.
constexpr int XSTRIDE = CHUNK + 8;

enum Kind { INT4 = 0, INT4_G32 = 1, NVFP4 = 2, MXFP4 = 3 };

// Groups per 64-column k-block, and the per-(row tile, k-block, g) scale record a lane loads
// with its weights: INT4 [scale][GPB] for rows g and g+8, then [magic + zero][GPB] likewise,
// in T; FP4 [scale byte][GPB] for rows g and g+8 (MXFP4 padded to 8 bytes).
template <int KIND> struct Record { using type = uint2; static constexpr int GPB = KIND == NVFP4 ? 4 : (KIND == MXFP4 ? 2 : 1); };
template <> struct Record<INT4_G32> { using type = uint4; static constexpr int GPB = 2; };

template <typename T> struct Types;
template <> struct Types<__half> {
    using pair = __half2;
    static constexpr bool IS_HALF = true;
    static constexpr unsigned MAGIC = 0x64006400u;  // 1024.0 in each half: 1024 + code is exact
};
template <> struct Types<__nv_bfloat16> {
    using pair = __nv_bfloat162;
    static constexpr bool IS_HALF = false;
    static constexpr unsigned MAGIC = 0x43004300u;  // 128.0 in each half: 128 + code is exact
};

__device__ __forceinline__ unsigned as_u32(__half2 v) { return *reinterpret_cast<unsigned*>(&v); }
__device__ __forceinline__ unsigned as_u32(__nv_bfloat162 v) { return *reinterpret_cast<unsigned*>(&v); }
template <typename P> __device__ __forceinline__ P from_u32(unsigned v) { return *reinterpret_cast<P*>(&v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T bits_to(unsigned short b) {
    return *reinterpret_cast<T*>(&b);
}

// Scales (and zero points) of 16-column step S for rows g and g+8, from the k-block's record.
// E4M3 bits map onto FP16 bits exactly (subnormals included) at 2^-8 of their value; out_scale
// carries the 2^8 back. E8M0 exponents e mean 2^(e-127): the host picks scale_shift so the
// layer's largest scale maps to 1 (out_scale = 2^scale_shift), and FP16 then holds every scale
// within 2^-24 of the largest; smaller ones flush to zero.
template <typename T, int KIND, int S>
__device__ __forceinline__ void record_params(const typename Record<KIND>::type& record, int scale_shift, T& scale_g, T& scale_g8,
                                              T& zero_g, T& zero_g8) {
    constexpr int GPB = Record<KIND>::GPB;
    constexpr int j = S * 16 * GPB / KBLOCK;
    if (KIND == INT4 || KIND == INT4_G32) {
        const T* values = reinterpret_cast<const T*>(&record);
        scale_g = values[j];
        scale_g8 = values[GPB + j];
        zero_g = values[2 * GPB + j];
        zero_g8 = values[3 * GPB + j];
    } else {
        const unsigned char* bytes = reinterpret_cast<const unsigned char*>(&record);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const unsigned b = bytes[h * GPB + j];
            T value;
            if (KIND == NVFP4) {
                value = from_float<T>(__half2float(bits_to<__half>((unsigned short)(((b & 0x80u) << 8) | ((b & 0x7Fu) << 7)))));
            } else {
                const int e = (int)b - scale_shift;
                value = from_float<T>(e <= 0 ? 0.0f : __int_as_float(min(e, 254) << 23));
            }
            (h ? scale_g8 : scale_g) = value;
        }
        zero_g = zero_g8 = from_float<T>(0.0f);
    }
}

// The 8 weights of one A fragment, as 4 pairs (a0a1, a2a3, a4a5, a6a7), each scaled.
// INT4: pair p is nibbles p and p+4: (w >> 4p) & 0x000F000F, OR-ed into the magic number's
// mantissa, minus (magic + zero): exact small integers, times the scale.
// FP4 (E2M1): pairs 0/1 are nibbles 1,3 / 5,7 of w, pairs 2/3 the same of w << 4. A byte
// permute looks the magnitudes up in a table of T's high (and for BF16 low) bytes; a second
// permute moves the two sign bits to bits 15 and 31.
template <typename T, int KIND>
__device__ __forceinline__ void decode_word(unsigned w, typename Types<T>::pair scale_g, typename Types<T>::pair scale_g8,
                                            typename Types<T>::pair zero_g, typename Types<T>::pair zero_g8, unsigned (&out)[4]) {
    using P = typename Types<T>::pair;
    if (KIND == INT4 || KIND == INT4_G32) {
#pragma unroll
        for (int p = 0; p < 4; ++p) {
            unsigned v = ((w >> (4 * p)) & 0x000F000Fu) | Types<T>::MAGIC;
            P exact = __hsub2(from_u32<P>(v), (p & 1) ? zero_g8 : zero_g);
            out[p] = as_u32(__hmul2(exact, (p & 1) ? scale_g8 : scale_g));
        }
    } else {
        const bool half = Types<T>::IS_HALF;
        // E2M1 magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6 as T's bytes.
        const unsigned hi_lo = half ? 0x3E3C3800u : 0x3F3F3F00u, hi_hi = half ? 0x46444240u : 0x40404040u;
        const unsigned lo_lo = 0xC0800000u, lo_hi = 0xC0804000u;
        const unsigned shifted = w << 4;
#pragma unroll
        for (int p = 0; p < 4; ++p) {
            unsigned src = (p < 2) ? w : shifted;
            unsigned sel = ((p & 1) ? (src >> 16) : src) & 0x7070u;
            unsigned mag = __byte_perm(hi_lo, hi_hi, sel);
            if (!half) mag |= __byte_perm(lo_lo, lo_hi, sel >> 4);
            unsigned sign = __byte_perm(src, 0u, (p & 1) ? 0x3424u : 0x1404u) & 0x80008000u;
            P value = from_u32<P>(mag | sign);
            out[p] = as_u32(__hmul2(value, (p & 1) ? scale_g8 : scale_g));
        }
    }
}

// The PTX wrappers. tests/cuda_emulator defines the same functions on the CPU (with W4_EMULATED_PTX),
// so that the tests run these kernels where no GPU is lent.
#ifndef W4_EMULATED_PTX
template <typename T> __device__ __forceinline__ void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1);
template <> __device__ __forceinline__ void mma16816<__half>(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldmatrix_x4(const void* smem, unsigned (&r)[4]) {
    unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
}

__device__ __forceinline__ unsigned load_acquire(const int* flag) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(flag) : "memory");
    return v;
}
#endif  // W4_EMULATED_PTX

struct Problem {
    int M, N, K, GS, R;
    int Npad, Kpad, Rpad, Mpad;
    int RT, KB;
    int splits, kb_per_split, m_tiles, t_items;
    float out_scale;
    int scale_shift;
};

// Everything derived from the launch arguments (CuPy passes scalars, not structs).
template <int MT>
__device__ __forceinline__ Problem make_problem(int M, int N, int K, int GS, int R, int splits, int kb_per_split, int t_items,
                                                float out_scale, int scale_shift) {
    Problem p;
    p.M = M; p.N = N; p.K = K; p.GS = GS; p.R = R;
    p.Npad = (N + 15) / 16 * 16; p.Kpad = (K + KBLOCK - 1) / KBLOCK * KBLOCK; p.Rpad = (R + 15) / 16 * 16;
    p.m_tiles = (M + 8 * MT - 1) / (8 * MT); p.Mpad = p.m_tiles * 8 * MT;
    p.RT = p.Npad / 16; p.KB = p.Kpad / KBLOCK;
    p.splits = splits; p.kb_per_split = kb_per_split; p.t_items = t_items;
    p.out_scale = out_scale; p.scale_shift = scale_shift;
    return p;
}

// Stage x[m0 : m0 + rows, k0 : k0 + width] into xs (row stride XSTRIDE), zero past K. Rows at
// or past M are skipped: the caller zeroed them once (or they only feed outputs never stored).
template <typename T>
__device__ void stage_x(T* xs, const T* __restrict__ x, const int* __restrict__ perm, const Problem& p, int m0, int rows, int k0,
                        int width, int stride = XSTRIDE) {
    rows = max(0, min(rows, p.M - m0));
    const bool vector = perm == nullptr && (p.K % 8) == 0 && (reinterpret_cast<size_t>(x) % 16) == 0;
    if (vector) {
        const int per_row = width / 8;
        for (int i = threadIdx.x; i < rows * per_row; i += THREADS) {
            int r = i / per_row, c = (i % per_row) * 8;
            int m = m0 + r, k = k0 + c;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (m < p.M && k < p.K) v = __ldg(reinterpret_cast<const uint4*>(x + (size_t)m * p.K + k));
            *reinterpret_cast<uint4*>(xs + r * stride + c) = v;
        }
    } else {
        for (int i = threadIdx.x; i < rows * width; i += THREADS) {
            int r = i / width, c = i % width;
            int m = m0 + r, k = k0 + c;
            T v = from_float<T>(0.0f);
            if (m < p.M && k < p.K) v = x[(size_t)m * p.K + (perm ? perm[k] : k)];
            xs[r * stride + c] = v;
        }
    }
}

// Where a lane's four mma accumulators (rows n, n+8 of the output tile; tokens m, m+1) sit in a
// row-major [tokens][stride] float matrix.
__device__ __forceinline__ void fragment_offsets(int m, int n, int stride, size_t (&at)[4]) {
    at[0] = (size_t)m * stride + n;
    at[1] = (size_t)(m + 1) * stride + n;
    at[2] = (size_t)m * stride + n + 8;
    at[3] = (size_t)(m + 1) * stride + n + 8;
}

__device__ __forceinline__ void store_fragment(float* __restrict__ out, int m, int n, int stride, const float (&acc)[4]) {
    size_t at[4];
    fragment_offsets(m, n, stride, at);
#pragma unroll
    for (int e = 0; e < 4; ++e) out[at[e]] = acc[e];
}

// A lane's A fragment of one 16-column step k from a plain row-major T matrix (rows g, g+8 at
// row_g, row_g8, already offset by 2t).
template <typename T>
__device__ __forceinline__ void load_dense_fragment(const T* row_g, const T* row_g8, int k, unsigned (&frag)[4]) {
    frag[0] = __ldg(reinterpret_cast<const unsigned*>(row_g + k));
    frag[1] = __ldg(reinterpret_cast<const unsigned*>(row_g8 + k));
    frag[2] = __ldg(reinterpret_cast<const unsigned*>(row_g + k + 8));
    frag[3] = __ldg(reinterpret_cast<const unsigned*>(row_g8 + k + 8));
}

// One warp: acc[j] += A_tile(16 rows at a_row0) x xs^T over chunk columns [0, nkb*64), with A
// a plain row-major T matrix of row stride lda (the branch's factors).
template <typename T, int MT>
__device__ __forceinline__ void dense_tile_mma(float (&acc)[MT][4], const T* __restrict__ a, int lda, int a_row0, int a_col0,
                                               const T* xs, int nkb) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const T* row_g = a + (size_t)(a_row0 + g) * lda + a_col0 + 2 * t;
    const T* row_g8 = row_g + 8 * (size_t)lda;
    for (int s16 = 0; s16 < nkb * 4; s16 += 2) {
        unsigned frag[2][4];
        load_dense_fragment(row_g, row_g8, s16 * 16, frag[0]);
        load_dense_fragment(row_g, row_g8, (s16 + 1) * 16, frag[1]);
#pragma unroll
        for (int j = 0; j < MT; ++j) {
            unsigned b[4];
            ldmatrix_x4(xs + (8 * j + (lane & 7)) * XSTRIDE + s16 * 16 + (lane >> 3) * 8, b);
            mma16816<T>(acc[j], frag[0], b[0], b[1]);
            mma16816<T>(acc[j], frag[1], b[2], b[3]);
        }
    }
}

template <typename T, int KIND, int MT>
__device__ void branch_down_item(int item, const T* __restrict__ x, const int* __restrict__ perm, const T* __restrict__ lr_a,
                                 const Problem& p, T* xs, float* __restrict__ t_part, T* __restrict__ t_final, int* counters) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int item_kb = (p.KB + p.t_items - 1) / p.t_items;
    const int item_begin = item * item_kb, item_end = min(p.KB, item_begin + item_kb);
    for (int mt = 0; mt < p.m_tiles; ++mt) {
        const int m0 = mt * 8 * MT;
        for (int rt0 = 0; rt0 < p.Rpad / 16; rt0 += WARPS) {
            const int rt = rt0 + warp;
            float acc[MT][4] = {};
            for (int kb0 = item_begin; kb0 < item_end; kb0 += CHUNK_KB) {
                const int nkb = min(CHUNK_KB, item_end - kb0);
                __syncthreads();
                stage_x<T>(xs, x, perm, p, m0, 8 * MT, kb0 * KBLOCK, nkb * KBLOCK);
                __syncthreads();
                if (rt < p.Rpad / 16) dense_tile_mma<T, MT>(acc, lr_a, p.Kpad, rt * 16, kb0 * KBLOCK, xs, nkb);
            }
            if (rt < p.Rpad / 16) {
#pragma unroll
                for (int j = 0; j < MT; ++j)
                    store_fragment(t_part + (size_t)item * p.Mpad * p.Rpad, m0 + 8 * j + 2 * t, rt * 16 + g, p.Rpad, acc[j]);
            }
        }
    }
    __threadfence();
    __syncthreads();
    __shared__ int last;
    if (threadIdx.x == 0) last = atomicAdd(&counters[1], 1) == p.t_items - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int i = threadIdx.x; i < p.Mpad * p.Rpad; i += THREADS) {
        float sum = 0.0f;
        for (int it = 0; it < p.t_items; ++it) sum += __ldcg(t_part + (size_t)it * p.Mpad * p.Rpad + i);
        t_final[i] = from_float<T>(sum);
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) atomicExch(&counters[2], 1);
}

// The scaled A fragment of 16-column step S of a k-block, from its word and record (the
// dequantizer's decode, and w4_linear_tiled.cu's tiled and wgmma kernels').
template <typename T, int KIND, int S>
__device__ __forceinline__ void decode_step(unsigned word, const typename Record<KIND>::type& rec, const Problem& p, unsigned (&a)[4]) {
    using P = typename Types<T>::pair;
    T sg, sg8, zg, zg8;
    record_params<T, KIND, S>(rec, p.scale_shift, sg, sg8, zg, zg8);
    decode_word<T, KIND>(word, P(sg, sg), P(sg8, sg8), P(zg, zg), P(zg8, zg8), a);
}

// Dequantize the prepacked weight into dense W [N][K] (in prepacked column order) for the
// large-M path (cuBLAS does the product). One thread per word.
template <typename T, int KIND>
__device__ void w4_dequant(const unsigned* __restrict__ qweight, const typename Record<KIND>::type* __restrict__ records,
                           T* __restrict__ w, const Problem& p) {
    using P = typename Types<T>::pair;
    const size_t word = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (word >= (size_t)p.RT * p.KB * 128) return;
    const int s = word & 3, lane = (word >> 2) & 31;
    const size_t tile = word >> 7;
    const int kb = tile % p.KB, rt = tile / p.KB;
    const int g = lane >> 2, t = lane & 3;
    const typename Record<KIND>::type rec = records[tile * 8 + g];
    unsigned a[4];
    switch (s) {
        case 0: decode_step<T, KIND, 0>(qweight[word], rec, p, a); break;
        case 1: decode_step<T, KIND, 1>(qweight[word], rec, p, a); break;
        case 2: decode_step<T, KIND, 2>(qweight[word], rec, p, a); break;
        default: decode_step<T, KIND, 3>(qweight[word], rec, p, a); break;
    }
    const int row = rt * 16 + g, col = kb * KBLOCK + s * 16 + 2 * t;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const int r = row + (q & 1) * 8, c = col + (q >> 1) * 8;
        if (r >= p.N || c >= p.K) continue;
        const P v = from_u32<P>(a[q]);
        const T lo = from_float<T>(to_float<T>(v.x) * p.out_scale), hi = from_float<T>(to_float<T>(v.y) * p.out_scale);
        w[(size_t)r * p.K + c] = lo;
        if (c + 1 < p.K) w[(size_t)r * p.K + c + 1] = hi;
    }
}

}  // namespace

#define W4_LINEAR(NAME, T, KIND, MT)                                                                                           \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(                                                              \
        const T* x, const int* perm, const uint4* qweight, const Record<KIND>::type* records, const T* lr_a, const T* lr_b,  \
        const T* bias, T* y, int* counters, float* split_part, float* t_part, T* t_final, int M, int N, int K, int GS, int R, \
        int splits, int kb_per_split, int t_items, float out_scale, int scale_shift) {                                       \
        const Problem p = make_problem<MT>(M, N, K, GS, R, splits, kb_per_split, t_items, out_scale, scale_shift);           \
        w4_linear<T, KIND, MT>(x, perm, qweight, records, lr_a, lr_b, bias, y, p, counters, split_part, t_part, t_final);    \
    }
#define W4_DEQUANT(NAME, T, KIND)                                                                                              \
    extern "C" __global__ void NAME(const unsigned* qweight, const Record<KIND>::type* records, T* w, int N, int K, int GS,  \
                                    float out_scale, int scale_shift) {                                                        \
        const Problem p = make_problem<1>(1, N, K, GS, 0, 1, 0, 0, out_scale, scale_shift);                                   \
        w4_dequant<T, KIND>(qweight, records, w, p);                                                                           \
    }
// Each source defines W4_VARIANT, its kernels for one (activation type, weight kind), and ends with
// W4_EXPAND(W4_SUFFIX, W4_T, W4_KIND).
#define W4_EXPAND(SUFFIX, T, KIND) W4_VARIANT(SUFFIX, T, KIND)

#ifndef W4_SUFFIX
// The loader compiles one variant at a time (-DW4_SUFFIX=int4_f16 -DW4_T=__half -DW4_KIND=INT4),
// and so does .ci/run, for each of launch.SOURCES and launch.VARIANTS. A plain `nvcc -c` of a source
// builds INT4 with FP16 activations: 10 s on a 2-core CPU for w4_linear.cu, where its eight variants take 75 s.
#define W4_SUFFIX int4_f16
#define W4_T __half
#define W4_KIND INT4
#endif

#endif  // W4_COMMON_CUH
