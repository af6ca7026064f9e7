/*
 * w4_linear_tiled.cu, the kernel source LLMCOMPRESS_KERNEL=tiled selects, not yet measured on a GPU
 * (docs/decisions/0004-0007): the default's fused kernel with its weights streamed through a cp.async
 * ring, a tiled mma.sync kernel for more than 16 tokens and, on Hopper (sm_90a), a wgmma kernel
 * in its place; the dequantizer as in the default. Notation and the layout contract:
 * w4_common.cuh.
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
 * whole K-slice, at least CHUNK + 8), else CHUNK + 8 (one chunk at a time); then the weight
 * ring, uint4 [WARPS][STAGES][32 lanes] words and records [WARPS][STAGES][32 lanes].
 *
 * Workspace: counters int32 [4 + tiles] zeroed once and left zeroed by every launch;
 * split_part float [S][Mpad][Npad]; t_part float [TI][Mpad][Rpad]; t_final T [Mpad][Rpad].
 *
 * The tiled kernel (w4_gemm_*_mt4/_mt8, for more than 16 tokens) takes the same work items,
 * workspace and epilogue, with tiles of 128 rows x 16*MT tokens (Mpad a multiple of 16*MT) and
 * x in prepacked column order (no perm), K % 8 == 0, 16-byte aligned. Shared memory: GEMM_STAGES
 * stages of [16*MT][72] T of x, uint4 [8 row tiles][32 lanes] words and records [8][8]; at
 * least [16*MT][CHUNK + 8] T for t, and with R > 0, [64][CHUNK + 8] T for the down-projection items.
 *
 * The wgmma kernel (w4_wgmma_*_mt8/_mt16/_mt32, sm_90a only) takes the tiled kernel's arguments,
 * with tiles of 128 rows x 8*MT tokens (Mpad a multiple of 8*MT). Shared memory: GEMM_STAGES
 * stages of x [8*MT/8][8 column chunks][8 tokens][8] T (core matrices, see wgmma_item), uint4
 * [8 row tiles][32 lanes] words and records [8][8]; at least [8*MT][CHUNK + 8] T for t.
 */
#include "w4_common.cuh"

namespace {

// Each warp keeps its next STAGES - 1 k-blocks of weights (and scale records) in flight through a
// shared-memory ring of cp.async copies. Registers would hold them too, but at 108 registers
// per thread only two blocks fit on an SM (docs/decisions/0003); the loader passes -DW4_STAGES.
#ifndef W4_STAGES
#define W4_STAGES 6
#endif
constexpr int STAGES = W4_STAGES;
static_assert(STAGES >= 2, "the ring needs a slot being read and one being filled");

// The PTX wrappers only this source uses (tests/cuda_emulator defines them too).
#ifndef W4_EMULATED_PTX
// Asynchronous global -> shared copies (sm_80+). A lane copies into, and later reads, only its
// own slots, so cp.async.wait_group alone orders the copy before the read: no barrier.
template <int BYTES>
__device__ __forceinline__ void cp_async(void* smem, const void* global) {
    const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    if (BYTES == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(address), "l"(global) : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(address), "l"(global), "n"(BYTES) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory"); }
// The same, writing zeros instead when !valid (global is then not read, but must be a valid address).
template <int BYTES>
__device__ __forceinline__ void cp_async_zfill(void* smem, const void* global, bool valid) {
    const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    const unsigned source_bytes = valid ? BYTES : 0;
    if (BYTES == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global), "r"(source_bytes) : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(address), "l"(global), "n"(BYTES), "r"(source_bytes)
                     : "memory");
}

// Warpgroup MMA (sm_90a: the loader builds the module for sm_90a on Hopper, and launches the
// w4_wgmma kernels only there; built for any other target, these trap). One wgmma.m64n64k16 with A
// from registers: warp w of the warpgroup holds rows 16w.. of A as mma.m16n8k16's A fragment, and
// d[j][0..3] as the C fragment of its rows for tokens 8j..8j+7, so the fused kernel's fragment
// layouts carry over. B (x, K-major) comes from shared memory through b_descriptor.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define W4_SM90A_ASM(...) asm volatile(__VA_ARGS__)
#else
#define W4_SM90A_ASM(...) __trap()
#endif
template <typename T>
__device__ __forceinline__ void wgmma_m64n64k16(float (&d)[8][4], const unsigned (&a)[4], unsigned long long b_descriptor);
template <>
__device__ __forceinline__ void wgmma_m64n64k16<__half>(float (&d)[8][4], const unsigned (&a)[4], unsigned long long b_descriptor) {
    W4_SM90A_ASM("wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, 1, 1, 1, 0;\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_descriptor));
}
template <>
__device__ __forceinline__ void wgmma_m64n64k16<__nv_bfloat16>(float (&d)[8][4], const unsigned (&a)[4], unsigned long long b_descriptor) {
    W4_SM90A_ASM("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, 1, 1, 1, 0;\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_descriptor));
}
__device__ __forceinline__ void wgmma_fence() { W4_SM90A_ASM("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { W4_SM90A_ASM("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int PENDING>
__device__ __forceinline__ void wgmma_wait() { W4_SM90A_ASM("wgmma.wait_group.sync.aligned %0;\n" ::"n"(PENDING) : "memory"); }
// The accumulators as the compiler sees them: it must not move their reads or writes across the
// asynchronous wgmmas that write them.
template <int MT>
__device__ __forceinline__ void wgmma_fence_operands(float (&acc)[1][MT][4]) {
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(acc[0][j][e])::"memory");
}
// Shared memory written by this thread's copies (the generic proxy), made visible to the wgmmas'
// reads (the async proxy); a barrier then extends that to the other threads' wgmmas.
__device__ __forceinline__ void fence_proxy_async() { W4_SM90A_ASM("fence.proxy.async.shared::cta;\n" ::: "memory"); }
#undef W4_SM90A_ASM
#endif  // W4_EMULATED_PTX

// The end of a work item whose warp holds acc[r][j] for row tile rts[r] (rows rts[r]*16..) and
// tokens mw + 8j.. (mw = m0 + warp_tokens, m0 the first token of the block's token_rows-token tile):
// with several K splits, the last split to finish the tile sums the splits' partials in split
// order (deterministic) and the others return; then the scale, B t through mma, the bias, and y.
template <typename T, int RPW, int MT>
__device__ void finish_item(float (&acc)[RPW][MT][4], const int (&rts)[RPW], int m0, int token_rows, int warp_tokens, int split,
                            int tile, const T* __restrict__ lr_b, const T* __restrict__ bias, T* __restrict__ y, const Problem& p,
                            T* xs, float* __restrict__ split_part, const T* __restrict__ t_final, int* counters) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int mw = m0 + warp_tokens;
    __shared__ int finisher;
    if (p.splits > 1) {
#pragma unroll
        for (int r = 0; r < RPW; ++r) {
            if (rts[r] >= p.RT) continue;
#pragma unroll
            for (int j = 0; j < MT; ++j)
                store_fragment(split_part + (size_t)split * p.Mpad * p.Npad, mw + 8 * j + 2 * t, rts[r] * 16 + g, p.Npad, acc[r][j]);
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
#pragma unroll
        for (int r = 0; r < RPW; ++r) {
            if (rts[r] >= p.RT) continue;
#pragma unroll
            for (int j = 0; j < MT; ++j) {
                size_t at[4];
                fragment_offsets(mw + 8 * j + 2 * t, rts[r] * 16 + g, p.Npad, at);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float sum = 0.0f;
                    for (int s = 0; s < p.splits; ++s) sum += __ldcg(split_part + (size_t)s * p.Mpad * p.Npad + at[e]);
                    acc[r][j][e] = sum;
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < RPW; ++r)
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[r][j][e] *= p.out_scale;

    if (p.R > 0) {
        if (threadIdx.x == 0)
            while (load_acquire(&counters[2]) == 0) __nanosleep(64);
        __syncthreads();
        // t rows m0.. of this token tile, staged like x (t_final was written by another block: read past L1).
        for (int i = threadIdx.x; i < token_rows * p.Rpad; i += THREADS) {
            int r = i / p.Rpad, c = i % p.Rpad;
            unsigned short bits = __ldcg(reinterpret_cast<const unsigned short*>(t_final) + (size_t)(m0 + r) * p.Rpad + c);
            xs[r * XSTRIDE + c] = bits_to<T>(bits);
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < RPW; ++r) {
            if (rts[r] >= p.RT) continue;
            // The up-projection B t: 16 rank columns per step (Rpad need not be a multiple of 64).
            const T* row_g = lr_b + (size_t)(rts[r] * 16 + g) * p.Rpad + 2 * t;
            const T* row_g8 = row_g + 8 * (size_t)p.Rpad;
            for (int k = 0; k < p.Rpad; k += 16) {
                unsigned a[4];
                load_dense_fragment(row_g, row_g8, k, a);
#pragma unroll
                for (int jt = 0; jt < MT; ++jt) {
                    unsigned b[4];
                    ldmatrix_x4(xs + (warp_tokens + 8 * jt + (lane & 7)) * XSTRIDE + k + ((lane >> 3) & 1) * 8, b);
                    mma16816<T>(acc[r][jt], a, b[0], b[1]);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
        if (rts[r] >= p.RT) continue;
#pragma unroll
        for (int j = 0; j < MT; ++j) {
            const int m = mw + 8 * j + 2 * t;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int mm = m + (e & 1), n = rts[r] * 16 + g + (e >> 1) * 8;
                if (mm < p.M && n < p.N) {
                    float v = acc[r][j][e] + (bias ? to_float<T>(bias[n]) : 0.0f);
                    y[(size_t)mm * p.N + n] = from_float<T>(v);
                }
            }
        }
    }
}

template <typename T, int KIND, int MT>
__device__ void main_item(int item, const T* __restrict__ x, const int* __restrict__ perm, const uint4* __restrict__ qweight,
                          const typename Record<KIND>::type* __restrict__ records, const T* __restrict__ lr_b,
                          const T* __restrict__ bias, T* __restrict__ y, const Problem& p, T* xs, unsigned char* ring,
                          float* __restrict__ split_part, const T* __restrict__ t_final, int* counters) {
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

    float acc[1][MT][4] = {};
    // The ring: per warp and slot, each lane's 16-byte word and its scale record.
    uint4* ring_words = reinterpret_cast<uint4*>(ring) + warp * STAGES * 32 + lane;
    R* ring_records = reinterpret_cast<R*>(ring + WARPS * STAGES * 32 * sizeof(uint4)) + warp * STAGES * 32 + lane;
    const size_t tile_kb0 = (size_t)(active ? rt : 0) * p.KB;
    // Every lane commits one group per k-block, empty past the split's end or for an idle warp,
    // so "k-block i has landed" is always "at most STAGES - 2 newer groups pending".
    auto fetch = [&](int kb, int slot) {
        if (active && kb < kb_end) {
            cp_async<16>(ring_words + slot * 32, qweight + (tile_kb0 + kb) * 32 + lane);
            cp_async<sizeof(R)>(ring_records + slot * 32, records + (tile_kb0 + kb) * 8 + g);
        }
        cp_async_commit();
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) fetch(kb_begin + s, s);
    // Up to 16 tokens, the block's whole K-slice of x fits in shared memory: stage it once, and
    // the loop below streams weights with no barrier. Larger tiles stage x chunk by chunk.
    constexpr bool WHOLE_SLICE = MT <= 2;
    const int stride = WHOLE_SLICE ? p.kb_per_split * KBLOCK + 8 : XSTRIDE;
    if (WHOLE_SLICE) {
        stage_x<T>(xs, x, perm, p, m0, 8 * MT, kb_begin * KBLOCK, (kb_end - kb_begin) * KBLOCK, stride);
        __syncthreads();
    }
    for (int kb = kb_begin, slot = 0; kb < kb_end; ++kb, slot = slot + 1 == STAGES ? 0 : slot + 1) {
        const int i = kb - kb_begin;
        if (!WHOLE_SLICE && i % CHUNK_KB == 0) {
            __syncthreads();
            stage_x<T>(xs, x, perm, p, m0, 8 * MT, kb * KBLOCK, min(CHUNK_KB, kb_end - kb) * KBLOCK);
            __syncthreads();
        }
        cp_async_wait<STAGES - 2>();
        const uint4 wq = ring_words[slot * 32];
        const R rec = ring_records[slot * 32];
        // The slot read one k-block ago is free again: refill it STAGES - 1 k-blocks ahead.
        fetch(kb + STAGES - 1, slot == 0 ? STAGES - 1 : slot - 1);
        if (!active) continue;
        const int x_col0 = WHOLE_SLICE ? i * KBLOCK : (i % CHUNK_KB) * KBLOCK;
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
            const int col = x_col0 + s2 * 16 + (lane >> 3) * 8;
#pragma unroll
            for (int jt = 0; jt < MT; ++jt) {
                unsigned b[4];
                ldmatrix_x4(xs + (8 * jt + (lane & 7)) * stride + col, b);
                mma16816<T>(acc[0][jt], a[s2], b[0], b[1]);
                mma16816<T>(acc[0][jt], a[s2 + 1], b[2], b[3]);
            }
        }
    }
    const int rts[1] = {rt};
    finish_item<T, 1, MT>(acc, rts, m0, 8 * MT, 0, split, tile, lr_b, bias, y, p, xs, split_part, t_final, counters);
}

// A block's work item, claimed in launch order: every claimed item belongs to a running block.
__device__ __forceinline__ int claim_item(int* counters) {
    __shared__ int item;
    if (threadIdx.x == 0) item = atomicAdd(&counters[0], 1);
    __syncthreads();
    return item;
}

// The last block to finish leaves the counters zeroed for the next launch.
__device__ __forceinline__ void release_counters(int* counters) {
    __syncthreads();
    if (threadIdx.x == 0 && atomicAdd(&counters[3], 1) == (int)gridDim.x - 1) {
        counters[0] = 0;
        counters[1] = 0;
        counters[2] = 0;
        __threadfence();
        counters[3] = 0;
    }
}

__device__ __forceinline__ void zero_shared(unsigned char* shared, int bytes) {
    for (int i = threadIdx.x; i < bytes / 16; i += THREADS) reinterpret_cast<uint4*>(shared)[i] = make_uint4(0, 0, 0, 0);
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
    const int x_bytes = 8 * MT * x_stride * (int)sizeof(T);  // x_stride % 8 == 0: whole 16-byte chunks
    zero_shared(shared_raw, x_bytes);
    unsigned char* ring = shared_raw + x_bytes;
    const int item = claim_item(counters);
    if (item < p.t_items)
        branch_down_item<T, KIND, MT>(item, x, perm, lr_a, p, xs, t_part, t_final, counters);
    else
        main_item<T, KIND, MT>(item - p.t_items, x, perm, qweight, records, lr_b, bias, y, p, xs, ring, split_part, t_final,
                               counters);
    release_counters(counters);
}

// The tiled path, for more than 16 tokens. A block owns 128 output rows (8 row tiles) x
// 16*MT tokens; warp (warp_n, warp_m) of a 4 x 2 grid owns row tiles 2*warp_n, 2*warp_n + 1
// and tokens warp_m*8*MT.. of them, so each decoded weight fragment feeds MT mmas and each x
// fragment loaded from shared memory feeds two row tiles. x, the weights and their records move
// global -> shared in GEMM_STAGES cp.async stages of one k-block each, GEMM_STAGES - 1 in
// flight, one barrier per k-block. x must be contiguous with K % 8 == 0, 16-byte aligned and
// already in prepacked column order (the host gathers an act-order layer's columns first).
constexpr int GEMM_STAGES = 4;
constexpr int GEMM_WARPS_N = 4;
constexpr int GEMM_WARPS_M = WARPS / GEMM_WARPS_N;
constexpr int GEMM_RPW = 2;  // row tiles per warp
constexpr int GEMM_ROW_TILES = GEMM_WARPS_N * GEMM_RPW;
constexpr int GEMM_XSTRIDE = KBLOCK + 8;  // one 16-byte pad per staged row, as XSTRIDE
static_assert(THREADS == GEMM_ROW_TILES * 32, "each thread copies one lane's word of one row tile per stage");

template <typename T, int KIND, int MT>
struct GemmTile {
    static constexpr int TOKENS = GEMM_WARPS_M * 8 * MT;
    static constexpr int X_BYTES = TOKENS * GEMM_XSTRIDE * (int)sizeof(T);
    static constexpr int W_BYTES = GEMM_ROW_TILES * 32 * (int)sizeof(uint4);
    static constexpr int R_BYTES = GEMM_ROW_TILES * 8 * (int)sizeof(typename Record<KIND>::type);
    static constexpr int STAGE_BYTES = X_BYTES + W_BYTES + R_BYTES;
};

template <int S> __device__ __forceinline__ unsigned step_word(const uint4& w) {
    return S == 0 ? w.x : (S == 1 ? w.y : (S == 2 ? w.z : w.w));
}

// 16-column steps S and S + 1 of one staged k-block: decode the warp's two row tiles' fragments,
// then per 8-token tile one ldmatrix and four mmas.
template <typename T, int KIND, int MT, int S>
__device__ __forceinline__ void gemm_steps(float (&acc)[GEMM_RPW][MT][4], const uint4 (&words)[GEMM_RPW],
                                           const typename Record<KIND>::type (&recs)[GEMM_RPW], const T* xs, const Problem& p) {
    const int lane = threadIdx.x & 31;
    unsigned a[GEMM_RPW][2][4];
#pragma unroll
    for (int r = 0; r < GEMM_RPW; ++r) {
        decode_step<T, KIND, S>(step_word<S>(words[r]), recs[r], p, a[r][0]);
        decode_step<T, KIND, S + 1>(step_word<S + 1>(words[r]), recs[r], p, a[r][1]);
    }
#pragma unroll
    for (int j = 0; j < MT; ++j) {
        unsigned b[4];
        ldmatrix_x4(xs + (8 * j + (lane & 7)) * GEMM_XSTRIDE + S * 16 + (lane >> 3) * 8, b);
#pragma unroll
        for (int r = 0; r < GEMM_RPW; ++r) {
            mma16816<T>(acc[r][j], a[r][0], b[0], b[1]);
            mma16816<T>(acc[r][j], a[r][1], b[2], b[3]);
        }
    }
}

template <typename T, int KIND, int MT>
__device__ void gemm_item(int item, const T* __restrict__ x, const uint4* __restrict__ qweight,
                          const typename Record<KIND>::type* __restrict__ records, const T* __restrict__ lr_b,
                          const T* __restrict__ bias, T* __restrict__ y, const Problem& p, unsigned char* smem,
                          float* __restrict__ split_part, const T* __restrict__ t_final, int* counters) {
    using Tile = GemmTile<T, KIND, MT>;
    using R = typename Record<KIND>::type;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2;
    const int warp_n = warp % GEMM_WARPS_N, warp_m = warp / GEMM_WARPS_N;
    const int split = item % p.splits, tile = item / p.splits;
    // A row block's token tiles are consecutive items, so the blocks running at once share its
    // weights through L2.
    const int mt = tile % p.m_tiles, rb = tile / p.m_tiles;
    const int rt0 = rb * GEMM_ROW_TILES, m0 = mt * Tile::TOKENS;
    const int kb_begin = split * p.kb_per_split, kb_end = min(p.KB, kb_begin + p.kb_per_split);

    // Every thread commits one group per k-block, empty past the split's end, so "k-block i has
    // landed" is always "at most GEMM_STAGES - 2 newer groups pending". Rows past M or N and
    // columns past K are zero-filled.
    auto fetch = [&](int kb, int stage) {
        if (kb < kb_end) {
            unsigned char* base = smem + stage * Tile::STAGE_BYTES;
            T* xs = reinterpret_cast<T*>(base);
            for (int i = threadIdx.x; i < Tile::TOKENS * (KBLOCK / 8); i += THREADS) {
                const int r = i / (KBLOCK / 8), c = (i % (KBLOCK / 8)) * 8;
                const int m = m0 + r, k = kb * KBLOCK + c;
                const bool valid = m < p.M && k < p.K;
                cp_async_zfill<16>(xs + r * GEMM_XSTRIDE + c, valid ? x + (size_t)m * p.K + k : x, valid);
            }
            const int rt = rt0 + warp;
            const bool valid = rt < p.RT;
            const size_t at = (size_t)(valid ? rt : 0) * p.KB + kb;
            cp_async_zfill<16>(reinterpret_cast<uint4*>(base + Tile::X_BYTES) + threadIdx.x, qweight + at * 32 + lane, valid);
            if (lane < 8)
                cp_async_zfill<sizeof(R)>(reinterpret_cast<R*>(base + Tile::X_BYTES + Tile::W_BYTES) + warp * 8 + lane,
                                          records + at * 8 + lane, valid);
        }
        cp_async_commit();
    };

    float acc[GEMM_RPW][MT][4] = {};
#pragma unroll
    for (int s = 0; s < GEMM_STAGES - 1; ++s) fetch(kb_begin + s, s);
    for (int kb = kb_begin, stage = 0; kb < kb_end; ++kb, stage = stage + 1 == GEMM_STAGES ? 0 : stage + 1) {
        cp_async_wait<GEMM_STAGES - 2>();
        // This k-block's stage is visible to every warp, and every warp is done with the stage
        // read one k-block ago, which is refilled next.
        __syncthreads();
        fetch(kb + GEMM_STAGES - 1, stage == 0 ? GEMM_STAGES - 1 : stage - 1);
        const unsigned char* base = smem + stage * Tile::STAGE_BYTES;
        const T* xs = reinterpret_cast<const T*>(base) + warp_m * 8 * MT * GEMM_XSTRIDE;
        const uint4* ws = reinterpret_cast<const uint4*>(base + Tile::X_BYTES);
        const R* rs = reinterpret_cast<const R*>(base + Tile::X_BYTES + Tile::W_BYTES);
        uint4 words[GEMM_RPW];
        R recs[GEMM_RPW];
#pragma unroll
        for (int r = 0; r < GEMM_RPW; ++r) {
            words[r] = ws[(warp_n * GEMM_RPW + r) * 32 + lane];
            recs[r] = rs[(warp_n * GEMM_RPW + r) * 8 + g];
        }
        gemm_steps<T, KIND, MT, 0>(acc, words, recs, xs, p);
        gemm_steps<T, KIND, MT, 2>(acc, words, recs, xs, p);
    }
    cp_async_wait<0>();
    __syncthreads();  // the stages are free for finish_item's staging of t
    const int rts[GEMM_RPW] = {rt0 + warp_n * GEMM_RPW, rt0 + warp_n * GEMM_RPW + 1};
    finish_item<T, GEMM_RPW, MT>(acc, rts, m0, Tile::TOKENS, warp_m * 8 * MT, split, tile, lr_b, bias, y, p,
                                 reinterpret_cast<T*>(smem), split_part, t_final, counters);
}

// The Hopper path (sm_90a), for more than 16 tokens: the tiled kernel's work items with warpgroup
// MMAs. A block owns 128 rows x 8*MT tokens (MT = 8, 16 or 32). Warp w decodes only row tile w of
// the block, into registers, and its warpgroup (warps 4q..4q+3: rows 64q..64q+63) multiplies those
// rows by x 64 tokens per wgmma, so each decoded fragment feeds MT/8 wgmmas and no two warps decode
// the same rows (the mma.sync tiled kernel decodes each fragment twice). x, the weights and their
// records move global -> shared in GEMM_STAGES cp.async stages of one k-block, as in gemm_item.
// x is staged K-major in core matrices of 8 tokens x 16 bytes, without swizzle, as wgmma reads
// it: column chunk c (8 columns) of token r at core matrix (r / 8) * 8 + c, row r % 8.
constexpr int WG_CORE = 128;                    // bytes of a core matrix; also the LBO (next 8 columns)
constexpr int WG_GROUP = KBLOCK / 8 * WG_CORE;  // bytes of 8 tokens' k-block; the SBO (next 8 tokens)

template <typename T, int KIND, int MT>
struct WgmmaTile {
    static constexpr int TOKENS = 8 * MT;
    static constexpr int X_BYTES = TOKENS * KBLOCK * (int)sizeof(T);
    static constexpr int W_BYTES = WARPS * 32 * (int)sizeof(uint4);
    static constexpr int R_BYTES = WARPS * 8 * (int)sizeof(typename Record<KIND>::type);
    static constexpr int STAGE_BYTES = X_BYTES + W_BYTES + R_BYTES;
    static_assert(sizeof(T) == 2 && X_BYTES % WG_GROUP == 0, "a k-block of 8 tokens is 8 core matrices");
};

// The shared memory descriptor of a K-major operand without swizzle (PTX ISA, "Matrix Descriptor
// Format"): start address, LBO (the next core matrix along K) and SBO (the next 8 rows), each >> 4.
__device__ __forceinline__ unsigned long long smem_descriptor(const void* smem) {
    const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    return (unsigned long long)((address & 0x3FFFF) >> 4) | ((unsigned long long)(WG_CORE >> 4) << 16) |
           ((unsigned long long)(WG_GROUP >> 4) << 32);
}

// The wgmmas of one 16-column step: 64 tokens each, from token 64Q of the staged k-block step xs.
template <typename T, int MT, int Q = 0>
__device__ __forceinline__ void wgmma_step(float (&acc)[1][MT][4], const unsigned (&a)[4], const unsigned char* xs) {
    wgmma_m64n64k16<T>(reinterpret_cast<float(&)[8][4]>(acc[0][8 * Q]), a, smem_descriptor(xs + Q * 8 * WG_GROUP));
    if constexpr (8 * (Q + 1) < MT) wgmma_step<T, MT, Q + 1>(acc, a, xs);
}

template <typename T, int KIND, int MT>
__device__ void wgmma_item(int item, const T* __restrict__ x, const uint4* __restrict__ qweight,
                           const typename Record<KIND>::type* __restrict__ records, const T* __restrict__ lr_b,
                           const T* __restrict__ bias, T* __restrict__ y, const Problem& p, unsigned char* smem,
                           float* __restrict__ split_part, const T* __restrict__ t_final, int* counters) {
    using Tile = WgmmaTile<T, KIND, MT>;
    using R = typename Record<KIND>::type;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2;
    const int split = item % p.splits, tile = item / p.splits;
    const int mt = tile % p.m_tiles, rb = tile / p.m_tiles;
    const int rt = rb * WARPS + warp, m0 = mt * Tile::TOKENS;
    const int kb_begin = split * p.kb_per_split, kb_end = min(p.KB, kb_begin + p.kb_per_split);

    // As gemm_item's fetch, x into core matrices: 8 consecutive threads fill one core matrix's 8
    // rows (no bank conflict), each copying 16 bytes of one token.
    auto fetch = [&](int kb, int stage) {
        if (kb < kb_end) {
            unsigned char* base = smem + stage * Tile::STAGE_BYTES;
            for (int i = threadIdx.x; i < Tile::TOKENS * (KBLOCK / 8); i += THREADS) {
                const int r = (i / 64) * 8 + (i & 7), c = (i >> 3) & 7;
                const int m = m0 + r, k = kb * KBLOCK + c * 8;
                const bool valid = m < p.M && k < p.K;
                cp_async_zfill<16>(base + ((r >> 3) * (KBLOCK / 8) + c) * WG_CORE + (r & 7) * 16, valid ? x + (size_t)m * p.K + k : x,
                                   valid);
            }
            const bool valid = rt < p.RT;
            const size_t at = (size_t)(valid ? rt : 0) * p.KB + kb;
            cp_async_zfill<16>(reinterpret_cast<uint4*>(base + Tile::X_BYTES) + threadIdx.x, qweight + at * 32 + lane, valid);
            if (lane < 8)
                cp_async_zfill<sizeof(R)>(reinterpret_cast<R*>(base + Tile::X_BYTES + Tile::W_BYTES) + warp * 8 + lane,
                                          records + at * 8 + lane, valid);
        }
        cp_async_commit();
    };

    float acc[1][MT][4] = {};
    // One k-block: decode its fragments into frag while the last k-block's wgmmas, which read the
    // other buffer, are still in flight; then wait for those and issue this one's.
    auto k_block = [&](int kb, unsigned (&frag)[4][4]) {
        const int stage = (kb - kb_begin) % GEMM_STAGES;
        cp_async_wait<GEMM_STAGES - 2>();
        // A warp's weights and records are its own lanes' copies: visible to the warp without
        // the block's barrier, so they are decoded before waiting for the last k-block's wgmmas.
        __syncwarp();
        const unsigned char* base = smem + stage * Tile::STAGE_BYTES;
        const uint4 words = reinterpret_cast<const uint4*>(base + Tile::X_BYTES)[threadIdx.x];
        const R rec = reinterpret_cast<const R*>(base + Tile::X_BYTES + Tile::W_BYTES)[warp * 8 + g];
        decode_step<T, KIND, 0>(words.x, rec, p, frag[0]);
        decode_step<T, KIND, 1>(words.y, rec, p, frag[1]);
        decode_step<T, KIND, 2>(words.z, rec, p, frag[2]);
        decode_step<T, KIND, 3>(words.w, rec, p, frag[3]);
        fence_proxy_async();
        // The last k-block's wgmmas are done with its stage (refilled below) and its fragments.
        wgmma_wait<0>();
        __syncthreads();  // every thread's copies of x for this k-block have landed
        fetch(kb + GEMM_STAGES - 1, stage == 0 ? GEMM_STAGES - 1 : stage - 1);
        wgmma_fence();
#pragma unroll
        for (int s = 0; s < 4; ++s) wgmma_step<T, MT>(acc, frag[s], base + s * 2 * WG_CORE);
        wgmma_commit();
    };
#pragma unroll
    for (int s = 0; s < GEMM_STAGES - 1; ++s) fetch(kb_begin + s, s);
    wgmma_fence_operands(acc);
    // The two fragment buffers are separate variables and each k-block pair names them
    // statically: PTX forbids changing a wgmma's A registers before the wait_group that covers
    // it, and with one array indexed by (kb & 1) the compiler gave both buffers the same registers,
    // so the decode overwrote the A of the wgmmas still in flight (SASS of sm_90a, docs/decisions/0007).
    unsigned even[4][4], odd[4][4];
    for (int kb = kb_begin; kb < kb_end; kb += 2) {
        k_block(kb, even);
        // A break, not a guarded call: the guard leaves a path (never taken) from even's wgmmas back
        // to even's decode with no wait on it, which tests/cuda_sass.py, following every path, rejects.
        if (kb + 1 == kb_end) break;
        k_block(kb + 1, odd);
    }
    wgmma_wait<0>();
    wgmma_fence_operands(acc);
    cp_async_wait<0>();
    __syncthreads();  // the stages are free for finish_item's staging of t
    const int rts[1] = {rt};
    finish_item<T, 1, MT>(acc, rts, m0, Tile::TOKENS, 0, split, tile, lr_b, bias, y, p, reinterpret_cast<T*>(smem), split_part,
                          t_final, counters);
}

// The kernels whose blocks own 128 rows: mma.sync (the tiled kernel, gemm_item) or wgmma
// (wgmma_item, sm_90a), and the 8-token mma tiles of one block's token tile for each.
enum RowBlockKernel { MMA_SYNC, WGMMA };
template <int KERNEL, int MT> struct RowBlockTiles { static constexpr int mma_tiles = KERNEL == WGMMA ? MT : 2 * MT; };

// One launch of a row-block kernel: down-projection items first, as in w4_linear (they stage x
// 64 tokens at a time through the fused kernel's code), then the tiles.
template <typename T, int KIND, int MT, int KERNEL>
__device__ void w4_row_blocks(const T* __restrict__ x, const uint4* __restrict__ qweight,
                              const typename Record<KIND>::type* __restrict__ records, const T* __restrict__ lr_a,
                              const T* __restrict__ lr_b, const T* __restrict__ bias, T* __restrict__ y, const Problem& p,
                              int* __restrict__ counters, float* __restrict__ split_part, float* __restrict__ t_part,
                              T* __restrict__ t_final) {
    extern __shared__ __align__(16) unsigned char shared_raw[];
    const int item = claim_item(counters);
    if (item < p.t_items) {
        constexpr int BRANCH_TILES = 8;  // 64 tokens; a block's token tile is a multiple of it
        zero_shared(shared_raw, 8 * BRANCH_TILES * XSTRIDE * (int)sizeof(T));
        Problem branch = p;
        branch.m_tiles = p.Mpad / (8 * BRANCH_TILES);
        branch_down_item<T, KIND, BRANCH_TILES>(item, x, nullptr, lr_a, branch, reinterpret_cast<T*>(shared_raw), t_part, t_final,
                                                counters);
    } else if constexpr (KERNEL == WGMMA) {
        wgmma_item<T, KIND, MT>(item - p.t_items, x, qweight, records, lr_b, bias, y, p, shared_raw, split_part, t_final, counters);
    } else {
        gemm_item<T, KIND, MT>(item - p.t_items, x, qweight, records, lr_b, bias, y, p, shared_raw, split_part, t_final, counters);
    }
    release_counters(counters);
}

}  // namespace

// One block per multiprocessor: the tiled kernel held to two spills 120 bytes of the 128-token
// tile's 183 registers in its inner loop, and the wgmma kernel holds 128 accumulators a thread
// at 256 tokens.
#define W4_ROW_BLOCKS(NAME, T, KIND, MT, KERNEL)                                                                               \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) NAME(                                                           \
        const T* x, const uint4* qweight, const Record<KIND>::type* records, const T* lr_a, const T* lr_b, const T* bias, T* y,  \
        int* counters, float* split_part, float* t_part, T* t_final, int M, int N, int K, int GS, int R, int splits,             \
        int kb_per_split, int t_items, float out_scale, int scale_shift) {                                                     \
        const Problem p = make_problem<RowBlockTiles<KERNEL, MT>::mma_tiles>(M, N, K, GS, R, splits, kb_per_split, t_items,   \
                                                                             out_scale, scale_shift);                          \
        w4_row_blocks<T, KIND, MT, KERNEL>(x, qweight, records, lr_a, lr_b, bias, y, p, counters, split_part, t_part, t_final); \
    }
// One variant: the fused kernel for each token tile, the tiled kernel for 64 and 128 tokens a
// tile, the wgmma kernel for 64, 128 and 256, and the dequantizer.
#define W4_VARIANT(SUFFIX, T, KIND)                 \
    W4_LINEAR(w4_linear_##SUFFIX##_mt1, T, KIND, 1) \
    W4_LINEAR(w4_linear_##SUFFIX##_mt2, T, KIND, 2) \
    W4_LINEAR(w4_linear_##SUFFIX##_mt4, T, KIND, 4) \
    W4_LINEAR(w4_linear_##SUFFIX##_mt8, T, KIND, 8) \
    W4_ROW_BLOCKS(w4_gemm_##SUFFIX##_mt4, T, KIND, 4, MMA_SYNC)    \
    W4_ROW_BLOCKS(w4_gemm_##SUFFIX##_mt8, T, KIND, 8, MMA_SYNC)    \
    W4_ROW_BLOCKS(w4_wgmma_##SUFFIX##_mt8, T, KIND, 8, WGMMA)      \
    W4_ROW_BLOCKS(w4_wgmma_##SUFFIX##_mt16, T, KIND, 16, WGMMA)    \
    W4_ROW_BLOCKS(w4_wgmma_##SUFFIX##_mt32, T, KIND, 32, WGMMA)    \
    W4_DEQUANT(w4_dequant_##SUFFIX, T, KIND)
W4_EXPAND(W4_SUFFIX, W4_T, W4_KIND)
