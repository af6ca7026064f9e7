/*
 * w4_linear.cu, the default kernel source (measured on an H100: docs/decisions/0001-0003):
 * y = dequant(W) x + B (A x) + bias for a 4-bit weight (INT4 sym/asym, NVFP4, MXFP4), FP16 or BF16
 * activations, with the low-rank branch fused into the same launch, and the dequantizer of the
 * large-M path. Notation and the layout contract: w4_common.cuh.
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
#include "w4_common.cuh"

namespace {

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

}  // namespace

// One variant: the fused kernel for each token tile, and the dequantizer.
#define W4_VARIANT(SUFFIX, T, KIND)                 \
    W4_LINEAR(w4_linear_##SUFFIX##_mt1, T, KIND, 1) \
    W4_LINEAR(w4_linear_##SUFFIX##_mt2, T, KIND, 2) \
    W4_LINEAR(w4_linear_##SUFFIX##_mt4, T, KIND, 4) \
    W4_LINEAR(w4_linear_##SUFFIX##_mt8, T, KIND, 8) \
    W4_DEQUANT(w4_dequant_##SUFFIX, T, KIND)
W4_EXPAND(W4_SUFFIX, W4_T, W4_KIND)
