/*
 * w4_linear.cu: y = dequant(W) x + B (A x) + bias for a 4-bit weight (INT4 sym/asym, NVFP4,
 * MXFP4), FP16 or BF16 activations, with the low-rank branch fused into the same launch.
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
 *
 * Work decomposition, one launch of 256-thread blocks (8 warps, one 16-row tile each): the
 * blocks claim work items in order from a counter (so every claimed item belongs to a running
 * block). Items [0, TI) compute partial sums of x A^T over ceil(KB/TI) k-blocks each (the
 * branch's down-projection; the host sizes them, see launch.fused_plan); the last of them
 * to finish reduces the partials into t = x A^T (in T, like the reference). The remaining
 * items each own 128 output rows x one split of K x one tile of up to 8*MT tokens. With more
 * than one split, the last split to finish a tile sums the splits' partials in split order
 * (deterministic). The finishing block waits for t (it was claimed earlier by a running block,
 * so it cannot deadlock), adds B t through mma, the bias, and stores y.
 *
 * Shared memory: x staged as [8*MT][stride] T, stride = kb_per_split*64 + 8 for MT <= 2 (the
 * whole K-slice, at least CHUNK + 8), else CHUNK + 8 (one chunk at a time).
 *
 * Workspace: counters int32 [4 + tiles] zeroed once and left zeroed by every launch;
 * split_part float [S][Mpad][Npad]; t_part float [TI][Mpad][Rpad]; t_final T [Mpad][Rpad].
 */
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

template <typename T, int KIND, int MT>
__device__ void main_item(int item, const T* __restrict__ x, const int* __restrict__ perm, const uint4* __restrict__ qweight,
                          const typename Record<KIND>::type* __restrict__ records, const T* __restrict__ lr_b,
                          const T* __restrict__ bias, T* __restrict__ y, const Problem& p, T* xs, float* __restrict__ split_part,
                          const T* __restrict__ t_final, int* counters) {
    using P = typename Types<T>::pair;
    using R = typename Record<KIND>::type;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int row_blocks = (p.RT + WARPS - 1) / WARPS;
    const int split = item % p.splits;
    const int tile = item / p.splits;  // = m_tile * row_blocks + row_block
    const int rb = tile % row_blocks, mt = tile / row_blocks;
    const int rt = rb * WARPS + warp;
    const bool active = rt < p.RT;
    const int m0 = mt * 8 * MT;
    const int kb_begin = split * p.kb_per_split;
    const int kb_end = min(p.KB, kb_begin + p.kb_per_split);

    float acc[MT][4] = {};
    // Two register buffers of one chunk's weights and scale records: the next chunk's loads
    // are in flight while this one is computed.
    uint4 words[2][CHUNK_KB];
    R recs[2][CHUNK_KB];
    auto load_chunk = [&](int kb0, uint4 (&w)[CHUNK_KB], R (&r)[CHUNK_KB]) {
#pragma unroll
        for (int i = 0; i < CHUNK_KB; ++i) {
            if (active && kb0 + i < kb_end) {
                const size_t at = (size_t)rt * p.KB + kb0 + i;
                w[i] = __ldg(qweight + at * 32 + lane);
                r[i] = __ldg(records + at * 8 + g);
            }
        }
    };
    load_chunk(kb_begin, words[0], recs[0]);
    // Up to 16 tokens, the block's whole K-slice of x fits in shared memory: stage it once, and
    // the loop below streams weights with no barrier. Larger tiles stage x chunk by chunk.
    constexpr bool WHOLE_SLICE = MT <= 2;
    const int stride = WHOLE_SLICE ? p.kb_per_split * KBLOCK + 8 : XSTRIDE;
    if (WHOLE_SLICE) {
        stage_x<T>(xs, x, perm, p, m0, 8 * MT, kb_begin * KBLOCK, (kb_end - kb_begin) * KBLOCK, stride);
        __syncthreads();
    }
    int buffer = 0;
    for (int kb0 = kb_begin; kb0 < kb_end; kb0 += CHUNK_KB, buffer ^= 1) {
        const int nkb = min(CHUNK_KB, kb_end - kb0);
        if (kb0 + CHUNK_KB < kb_end) {
            if (buffer) load_chunk(kb0 + CHUNK_KB, words[0], recs[0]);
            else load_chunk(kb0 + CHUNK_KB, words[1], recs[1]);
        }
        if (!WHOLE_SLICE) {
            __syncthreads();
            stage_x<T>(xs, x, perm, p, m0, 8 * MT, kb0 * KBLOCK, nkb * KBLOCK);
            __syncthreads();
        }
        const int x_col0 = WHOLE_SLICE ? (kb0 - kb_begin) * KBLOCK : 0;
        if (!active) continue;
#pragma unroll
        for (int i = 0; i < CHUNK_KB; ++i) {
            if (i >= nkb) break;
            const uint4 wq = buffer ? words[1][i] : words[0][i];
            const R rec = buffer ? recs[1][i] : recs[0][i];
            const unsigned wv[4] = {wq.x, wq.y, wq.z, wq.w};
            unsigned a[4][4];
            T sg, sg8, zg, zg8;
            record_params<T, KIND, 0>(rec, p.scale_shift, sg, sg8, zg, zg8);
            decode_word<T, KIND>(wv[0], P(sg, sg), P(sg8, sg8), P(zg, zg), P(zg8, zg8), a[0]);
            record_params<T, KIND, 1>(rec, p.scale_shift, sg, sg8, zg, zg8);
            decode_word<T, KIND>(wv[1], P(sg, sg), P(sg8, sg8), P(zg, zg), P(zg8, zg8), a[1]);
            record_params<T, KIND, 2>(rec, p.scale_shift, sg, sg8, zg, zg8);
            decode_word<T, KIND>(wv[2], P(sg, sg), P(sg8, sg8), P(zg, zg), P(zg8, zg8), a[2]);
            record_params<T, KIND, 3>(rec, p.scale_shift, sg, sg8, zg, zg8);
            decode_word<T, KIND>(wv[3], P(sg, sg), P(sg8, sg8), P(zg, zg), P(zg8, zg8), a[3]);
#pragma unroll
            for (int s2 = 0; s2 < 4; s2 += 2) {
                const int col = x_col0 + i * KBLOCK + s2 * 16 + (lane >> 3) * 8;
#pragma unroll
                for (int jt = 0; jt < MT; ++jt) {
                    unsigned b[4];
                    ldmatrix_x4(xs + (8 * jt + (lane & 7)) * stride + col, b);
                    mma16816<T>(acc[jt], a[s2], b[0], b[1]);
                    mma16816<T>(acc[jt], a[s2 + 1], b[2], b[3]);
                }
            }
        }
    }

    __shared__ int finisher;
    if (p.splits > 1) {
        if (active) {
#pragma unroll
            for (int j = 0; j < MT; ++j)
                store_fragment(split_part + (size_t)split * p.Mpad * p.Npad, m0 + 8 * j + 2 * t, rt * 16 + g, p.Npad, acc[j]);
        }
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) {
            finisher = atomicAdd(&counters[4 + tile], 1) == p.splits - 1;
            if (finisher) counters[4 + tile] = 0;
        }
        __syncthreads();
        if (!finisher) return;
        __threadfence();
        if (active) {
#pragma unroll
            for (int j = 0; j < MT; ++j) {
                size_t at[4];
                fragment_offsets(m0 + 8 * j + 2 * t, rt * 16 + g, p.Npad, at);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float sum = 0.0f;
                    for (int s = 0; s < p.splits; ++s) sum += __ldcg(split_part + (size_t)s * p.Mpad * p.Npad + at[e]);
                    acc[j][e] = sum;
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] *= p.out_scale;

    if (p.R > 0) {
        if (threadIdx.x == 0)
            while (load_acquire(&counters[2]) == 0) __nanosleep(64);
        __syncthreads();
        // t rows m0.. of this token tile, staged like x (t_final was written by another block: read past L1).
        for (int i = threadIdx.x; i < 8 * MT * p.Rpad; i += THREADS) {
            int r = i / p.Rpad, c = i % p.Rpad;
            unsigned short bits = __ldcg(reinterpret_cast<const unsigned short*>(t_final) + (size_t)(m0 + r) * p.Rpad + c);
            xs[r * XSTRIDE + c] = bits_to<T>(bits);
        }
        __syncthreads();
        if (active) {
            // The up-projection B t: 16 rank columns per step (Rpad need not be a multiple of 64).
            const T* row_g = lr_b + (size_t)(rt * 16 + g) * p.Rpad + 2 * t;
            const T* row_g8 = row_g + 8 * (size_t)p.Rpad;
            for (int k = 0; k < p.Rpad; k += 16) {
                unsigned a[4];
                load_dense_fragment(row_g, row_g8, k, a);
#pragma unroll
                for (int jt = 0; jt < MT; ++jt) {
                    unsigned b[4];
                    ldmatrix_x4(xs + (8 * jt + (lane & 7)) * XSTRIDE + k + ((lane >> 3) & 1) * 8, b);
                    mma16816<T>(acc[jt], a, b[0], b[1]);
                }
            }
        }
    }
    if (!active) return;
#pragma unroll
    for (int j = 0; j < MT; ++j) {
        const int m = m0 + 8 * j + 2 * t;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int mm = m + (e & 1), n = rt * 16 + g + (e >> 1) * 8;
            if (mm < p.M && n < p.N) {
                float v = acc[j][e] + (bias ? to_float<T>(bias[n]) : 0.0f);
                y[(size_t)mm * p.N + n] = from_float<T>(v);
            }
        }
    }
}

template <typename T, int KIND, int MT>
__device__ void w4_linear(const T* __restrict__ x, const int* __restrict__ perm, const uint4* __restrict__ qweight,
                          const typename Record<KIND>::type* __restrict__ records, const T* __restrict__ lr_a,
                          const T* __restrict__ lr_b, const T* __restrict__ bias, T* __restrict__ y, const Problem& p,
                          int* __restrict__ counters, float* __restrict__ split_part, float* __restrict__ t_part,
                          T* __restrict__ t_final) {
    extern __shared__ __align__(16) unsigned char shared_raw[];
    T* xs = reinterpret_cast<T*>(shared_raw);
    // Rows past M are never staged: zero them (all rows) once.
    const int x_stride = MT <= 2 ? max(p.kb_per_split * KBLOCK + 8, XSTRIDE) : XSTRIDE;
    for (int i = threadIdx.x; i < 8 * MT * x_stride * (int)sizeof(T) / 16; i += THREADS)
        reinterpret_cast<uint4*>(xs)[i] = make_uint4(0, 0, 0, 0);
    __shared__ int item;
    if (threadIdx.x == 0) item = atomicAdd(&counters[0], 1);
    __syncthreads();
    if (item < p.t_items)
        branch_down_item<T, KIND, MT>(item, x, perm, lr_a, p, xs, t_part, t_final, counters);
    else
        main_item<T, KIND, MT>(item - p.t_items, x, perm, qweight, records, lr_b, bias, y, p, xs, split_part, t_final, counters);
    __syncthreads();
    if (threadIdx.x == 0 && atomicAdd(&counters[3], 1) == (int)gridDim.x - 1) {
        // Every other block has finished with the counters: leave them zeroed for the next launch.
        counters[0] = 0;
        counters[1] = 0;
        counters[2] = 0;
        __threadfence();
        counters[3] = 0;
    }
}

// Dequantize the prepacked weight into dense W [N][K] (in prepacked column order) for the
// large-M path (cuBLAS does the product). One thread per word.
template <typename T, int KIND, int S>
__device__ __forceinline__ void dequant_step(unsigned word, const typename Record<KIND>::type& rec, const Problem& p, unsigned (&a)[4]) {
    using P = typename Types<T>::pair;
    T sg, sg8, zg, zg8;
    record_params<T, KIND, S>(rec, p.scale_shift, sg, sg8, zg, zg8);
    decode_word<T, KIND>(word, P(sg, sg), P(sg8, sg8), P(zg, zg), P(zg8, zg8), a);
}

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
        case 0: dequant_step<T, KIND, 0>(qweight[word], rec, p, a); break;
        case 1: dequant_step<T, KIND, 1>(qweight[word], rec, p, a); break;
        case 2: dequant_step<T, KIND, 2>(qweight[word], rec, p, a); break;
        default: dequant_step<T, KIND, 3>(qweight[word], rec, p, a); break;
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
// One variant: the fused kernel for each token tile, and the dequantizer.
#define W4_VARIANT(SUFFIX, T, KIND)                 \
    W4_LINEAR(w4_linear_##SUFFIX##_mt1, T, KIND, 1) \
    W4_LINEAR(w4_linear_##SUFFIX##_mt2, T, KIND, 2) \
    W4_LINEAR(w4_linear_##SUFFIX##_mt4, T, KIND, 4) \
    W4_LINEAR(w4_linear_##SUFFIX##_mt8, T, KIND, 8) \
    W4_DEQUANT(w4_dequant_##SUFFIX, T, KIND)
#define W4_EXPAND(SUFFIX, T, KIND) W4_VARIANT(SUFFIX, T, KIND)

#ifndef W4_SUFFIX
// The loader compiles one variant at a time (-DW4_SUFFIX=int4_f16 -DW4_T=__half -DW4_KIND=INT4),
// and so does .ci/run, for each of launch.VARIANTS. A plain `nvcc -c` of this file builds INT4
// with FP16 activations: 10 s on a 2-core CPU, where all eight variants take 75 s.
#define W4_SUFFIX int4_f16
#define W4_T __half
#define W4_KIND INT4
#endif
W4_EXPAND(W4_SUFFIX, W4_T, W4_KIND)
