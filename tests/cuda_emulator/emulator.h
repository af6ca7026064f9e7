/*
 * A CPU emulator of the CUDA subset that the kernel sources of kernels/ use, so that the kernels'
 * index arithmetic, fragment layouts, shared-memory pipelines and work-item protocol run in tests
 * on a machine without a GPU. It says nothing about speed, and nothing about memory ordering
 * between threads (everything here is sequentially consistent); a GPU run stays the real check.
 *
 * A kernel source (its included header inlined, as the loader does) compiles unchanged with g++,
 * except that the Python side (__init__.py) rewrites its `extern __shared__` declaration into a
 * call to dynamic_shared() and appends one EMU_KERNEL line per kernel. Its PTX wrappers (mma,
 * ldmatrix, cp.async, ld.acquire, wgmma) are skipped through W4_EMULATED_PTX and defined here instead.
 *
 * Execution: each CUDA thread is a ucontext fiber of one OS thread, switched only where CUDA
 * threads meet: __syncthreads, the warp-wide instructions (all 32 lanes must arrive at the same
 * one, or it is reported as divergence), the atomics and __nanosleep (a spin wait). Up to
 * `resident` blocks run together, each with its own shared memory; a block that finishes hands
 * its slot to the next block index, as a GPU's multiprocessors do. Each round gives every
 * resident block one pass over its ready threads, in slot order or (with a seed) in a shuffled
 * order, so the blocks' atomics and spin waits interleave differently from run to run of
 * different seeds. When no fiber can run, the launch reports a deadlock and where each thread
 * waits; a spin wait that outlasts a million spins while no block finishes is reported too.
 *
 * Checks a GPU would not report: dynamic shared memory is poisoned with 0xFF bytes (NaN in FP16,
 * BF16 and FP32) before each block, so a read of anything not written shows in the output;
 * ldmatrix and cp.async addresses must lie inside the block's dynamic shared memory and be
 * aligned; cp.async sources must lie inside an argument tensor; each tensor argument is copied
 * to memory that ends (within 16 bytes, keeping the original alignment) at an inaccessible page,
 * so a read or write past its end faults, and the slack is checked for writes.
 *
 * cp.async copies land either when cp.async.wait_group says they must (LATE, the default: a read
 * before its wait sees poison) or when issued (EARLY: a refill of a slot another warp still reads
 * overwrites it); fibers run in thread order or in reverse (REVERSE), so warps meet each other's
 * pipelines in both orders. Warpgroup MMAs (wgmma, sm_90a) land the same way: at the
 * wgmma.wait_group that covers them (LATE: they read their A registers and shared memory then,
 * and only then write the accumulators) or at issue (EARLY). A wgmma issued without a wgmma.fence
 * since the thread's last wait, or a block that ends with wgmmas not waited for, is reported.
 * cp.async writes through the generic proxy and wgmma reads through the async proxy, so a wgmma
 * must not read a byte whose cp.async landed after the copying thread's last fence.proxy.async:
 * each byte remembers the thread whose landed copy it holds until that thread's fence, and a
 * wgmma that reads such a byte, at issue or when it lands, is reported.
 */
#pragma once

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#define W4_EMULATED_PTX 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// ----------------------------------------------------------------------------- 16-bit floats

// FP16 and BF16 values as their bits (distinct types, as in CUDA), and their pairs.
template <int FORMAT> struct Bits16 {
    unsigned short bits;
};
template <typename H> struct Pair {
    H x, y;
    Pair() = default;
    Pair(H a, H b) : x(a), y(b) {}
};
using __half = Bits16<0>;
using __nv_bfloat16 = Bits16<1>;
using __half2 = Pair<__half>;
using __nv_bfloat162 = Pair<__nv_bfloat16>;
static_assert(sizeof(__half2) == 4 && sizeof(__nv_bfloat162) == 4, "pairs are one 32-bit register");

namespace emu {

inline unsigned float_bits(float v) {
    unsigned b;
    std::memcpy(&b, &v, 4);
    return b;
}
inline float bits_float(unsigned b) {
    float v;
    std::memcpy(&v, &b, 4);
    return v;
}

// Round to nearest even, as __float2half_rn: subnormals, overflow to infinity, NaN kept.
inline unsigned short half_from_float(float value) {
    const unsigned x = float_bits(value);
    const unsigned sign = (x >> 16) & 0x8000u, magnitude = x & 0x7FFFFFFFu;
    if (magnitude > 0x7F800000u) return (unsigned short)(sign | 0x7E00u);
    if (magnitude >= 0x47800000u) return (unsigned short)(sign | 0x7C00u);
    if (magnitude >= 0x38800000u) {  // a normal half: drop 13 mantissa bits, rounding
        unsigned h = ((((magnitude >> 23) - 112u) << 10) | ((magnitude & 0x7FFFFFu) >> 13));
        const unsigned rest = magnitude & 0x1FFFu;
        if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is right
        return (unsigned short)(sign | h);
    }
    const int exponent = (int)(magnitude >> 23);
    if (exponent < 102) return (unsigned short)sign;  // below 2^-25: rounds to zero
    const unsigned mantissa = (magnitude & 0x7FFFFFu) | 0x800000u;
    const int shift = 126 - exponent;  // units of 2^-24
    unsigned h = mantissa >> shift;
    const unsigned rest = mantissa & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (h & 1u))) ++h;
    return (unsigned short)(sign | h);
}

inline float half_to_float(unsigned short h) {
    const unsigned sign = (unsigned)(h & 0x8000u) << 16;
    const unsigned exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
    if (exponent == 0) {
        const float v = (float)mantissa * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    if (exponent == 31) return bits_float(sign | 0x7F800000u | (mantissa << 13));
    return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline unsigned short bfloat_from_float(float value) {
    const unsigned x = float_bits(value);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (unsigned short)((x >> 16) | 0x40u);
    return (unsigned short)((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}
inline float bfloat_to_float(unsigned short b) { return bits_float((unsigned)b << 16); }

}  // namespace emu

inline float __half2float(__half v) { return emu::half_to_float(v.bits); }
inline __half __float2half_rn(float v) { return __half{emu::half_from_float(v)}; }
inline float __bfloat162float(__nv_bfloat16 v) { return emu::bfloat_to_float(v.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return __nv_bfloat16{emu::bfloat_from_float(v)}; }

// The paired ops round each lane's exact result once: products of two 16-bit values are exact in
// float, and so are the differences the kernels take.
inline __half2 __hsub2(__half2 a, __half2 b) {
    return __half2(__float2half_rn(__half2float(a.x) - __half2float(b.x)), __float2half_rn(__half2float(a.y) - __half2float(b.y)));
}
inline __half2 __hmul2(__half2 a, __half2 b) {
    return __half2(__float2half_rn(__half2float(a.x) * __half2float(b.x)), __float2half_rn(__half2float(a.y) * __half2float(b.y)));
}
inline __nv_bfloat162 __hsub2(__nv_bfloat162 a, __nv_bfloat162 b) {
    return __nv_bfloat162(__float2bfloat16_rn(__bfloat162float(a.x) - __bfloat162float(b.x)),
                          __float2bfloat16_rn(__bfloat162float(a.y) - __bfloat162float(b.y)));
}
inline __nv_bfloat162 __hmul2(__nv_bfloat162 a, __nv_bfloat162 b) {
    return __nv_bfloat162(__float2bfloat16_rn(__bfloat162float(a.x) * __bfloat162float(b.x)),
                          __float2bfloat16_rn(__bfloat162float(a.y) * __bfloat162float(b.y)));
}

// ----------------------------------------------------------------------------- integer intrinsics

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline float __int_as_float(int v) { return emu::bits_float((unsigned)v); }
// PTX prmt in its default mode: result byte n is byte (s >> 4n) & 7 of the pair {y, x}.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    const unsigned long long pool = ((unsigned long long)y << 32) | x;
    unsigned result = 0;
    for (int n = 0; n < 4; ++n) result |= (unsigned)((pool >> (8 * ((s >> (4 * n)) & 7u))) & 0xFFu) << (8 * n);
    return result;
}
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
inline void __threadfence() {}

// ----------------------------------------------------------------------------- the machine

namespace emu {

enum class State { ready, barrier, warp, done, failed };
enum Flags { EARLY = 1, REVERSE = 2 };
enum class Op { none, mma_f16, mma_bf16, ldmatrix, wgmma_f16, wgmma_bf16, wgmma_commit, wgmma_wait, syncwarp };

struct Copy {
    unsigned char* destination;
    unsigned char data[16];
    int bytes;
};

struct Thread {
    ucontext_t context;
    dim3 index;
    State state = State::ready;
    std::vector<Copy> uncommitted;
    std::deque<std::vector<Copy>> groups;
    const void* collective = nullptr;  // this lane's operands while it waits in a warp-wide instruction
    bool wgmma_fenced = false;         // a wgmma.fence since its last wgmma.wait_group
    std::vector<std::pair<size_t, int>> unfenced;  // (shared offset, bytes) of its landed copies no fence.proxy.async has ordered
};

// One warp's share of a wgmma.m64n64k16 (its 16 rows of A and D), issued and not yet landed: each
// lane's accumulators and A registers, read when it lands, and where B lies in shared memory.
struct Wgmma {
    bool half;
    float* d[32];
    const unsigned* a[32];
    const unsigned char* b;
    size_t lbo, sbo;
};

struct Warp {
    Op op = Op::none;
    int arrived = 0;
    std::vector<Wgmma> uncommitted;
    std::deque<std::vector<Wgmma>> groups;
};

struct Buffer {
    unsigned char* start;
    size_t bytes;
    std::string name;  // what a fault on the inaccessible page after it is reported as
};

// One resident block: a slot of the launch, reused by the next block index when it finishes.
struct Block {
    dim3 index;
    bool running = false;
    std::vector<Thread> threads;
    std::vector<Warp> warps;
    std::vector<unsigned char*> stacks;
    unsigned char* shared = nullptr;                        // its dynamic shared memory
    std::vector<unsigned> generic_writer;                   // per byte of it: 1 + the thread whose unfenced copy it holds, or 0
    std::map<int, std::vector<std::max_align_t>> statics;  // its __shared__ variables, by declaration
};

struct Launch {
    dim3 grid, block_shape;
    int flags = 0;
    uint64_t random = 0;  // the slot order's xorshift state; 0 keeps slot order
    std::vector<Block> slots;
    unsigned next_block = 0;
    Block* running = nullptr;  // the block whose threads run now
    size_t stack_bytes = 0;
    size_t shared_bytes = 0;
    std::vector<Buffer> buffers;
    ucontext_t scheduler;
    int current = 0;
    bool in_fiber = false;
    std::vector<Buffer> guards;  // the inaccessible pages: after each tensor, after each shared memory, below each stack
    long long spins = 0;         // since a block last finished
    std::string error;
    std::function<void()> body;
    std::vector<std::pair<unsigned char*, size_t>> mappings;  // everything mmap gave this launch

    Launch() = default;
    Launch(const Launch&) = delete;
    Launch& operator=(const Launch&) = delete;
    ~Launch() {
        for (const auto& mapping : mappings) munmap(mapping.first, mapping.second);
    }
};

inline Launch*& active() {
    static Launch* launch = nullptr;
    return launch;
}
inline Thread& self() { return active()->running->threads[active()->current]; }

inline void switch_out() { swapcontext(&self().context, &active()->scheduler); }

// Keep the launch's first error, saying where it happened, and stop the current thread for good.
inline void record_failure(Launch& launch, const std::string& message) {
    Thread& thread = launch.running->threads[launch.current];
    if (launch.error.empty())
        launch.error = message + " (block " + std::to_string(launch.running->index.x) + ", thread " + std::to_string(thread.index.x) + ")";
    thread.state = State::failed;
}

// Fail the current thread: the scheduler abandons the launch.
[[noreturn]] inline void fail(const std::string& message) {
    record_failure(*active(), message);
    switch_out();
    __builtin_unreachable();
}

inline unsigned char* dynamic_shared() { return active()->running->shared; }

// A `__shared__ T name;` declaration of the kernel (the Python side numbers them): the running
// block's own variable, poisoned like shared memory when the block starts.
template <typename T>
inline T& block_static(int declaration) {
    std::vector<std::max_align_t>& storage = active()->running->statics[declaration];
    if (storage.empty()) {
        storage.resize((sizeof(T) + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t));
        std::memset(static_cast<void*>(storage.data()), 0xFF, storage.size() * sizeof(std::max_align_t));
    }
    return *reinterpret_cast<T*>(storage.data());
}

inline void check_shared(const void* address, size_t bytes, size_t alignment, const char* what) {
    const Launch& launch = *active();
    const unsigned char* shared = launch.running->shared;
    const auto* p = static_cast<const unsigned char*>(address);
    if (p < shared || p + bytes > shared + launch.shared_bytes)
        fail(std::string(what) + " outside the block's " + std::to_string(launch.shared_bytes) + " bytes of dynamic shared memory (offset " +
             std::to_string((long long)(p - shared)) + ")");
    if ((size_t)(p - shared) % alignment)
        fail(std::string(what) + " at shared offset " + std::to_string((long long)(p - shared)) + " is not " +
             std::to_string(alignment) + "-byte aligned");
}

inline void check_global(const void* address, size_t bytes, size_t alignment, const char* what) {
    const auto* p = static_cast<const unsigned char*>(address);
    if (reinterpret_cast<uintptr_t>(p) % alignment) fail(std::string(what) + " is not " + std::to_string(alignment) + "-byte aligned");
    for (const Buffer& buffer : active()->buffers)
        if (p >= buffer.start && p + bytes <= buffer.start + buffer.bytes) return;
    fail(std::string(what) + " lies outside every tensor argument");
}

// A warp-wide instruction: each lane leaves its operands and waits; the last lane to arrive
// computes every lane's result and releases the others.
template <typename Operands, typename Complete>
inline void collective(Op op, const Operands& mine, Complete complete) {
    Block& block = *active()->running;
    Thread& thread = self();
    const int warp_index = (int)thread.index.x / 32;
    Warp& warp = block.warps[warp_index];
    if (warp.arrived == 0) warp.op = op;
    if (warp.op != op) fail("lanes of warp " + std::to_string(warp_index) + " reached different warp-wide instructions (divergence)");
    thread.collective = &mine;
    if (++warp.arrived < 32) {
        thread.state = State::warp;
        switch_out();
        return;
    }
    const Operands* lanes[32];
    for (int lane = 0; lane < 32; ++lane) lanes[lane] = static_cast<const Operands*>(block.threads[warp_index * 32 + lane].collective);
    complete(static_cast<const Operands* const*>(lanes));
    warp.arrived = 0;
    warp.op = Op::none;
    for (int lane = 0; lane < 32; ++lane) {
        Thread& other = block.threads[warp_index * 32 + lane];
        other.collective = nullptr;
        if (other.state == State::warp) other.state = State::ready;
    }
}

// A cp.async copy lands: a write through the generic proxy, hidden from the async proxy until
// the copying thread's next fence.proxy.async.
inline void land(const Copy& copy) {
    std::memcpy(copy.destination, copy.data, copy.bytes);
    Block& block = *active()->running;
    Thread& thread = self();
    const size_t offset = (size_t)(copy.destination - block.shared);
    std::fill_n(block.generic_writer.begin() + offset, copy.bytes, thread.index.x + 1);
    thread.unfenced.emplace_back(offset, copy.bytes);
}
inline void land(const std::vector<Copy>& group) {
    for (const Copy& copy : group) land(copy);
}

inline void fiber_entry() {
    active()->body();
    self().state = State::done;
}  // returns to the scheduler through uc_link

struct Tally {
    int barrier = 0, done = 0;
};
inline Tally tally(const Block& block) {
    Tally counts;
    for (const Thread& thread : block.threads) {
        counts.barrier += thread.state == State::barrier;
        counts.done += thread.state == State::done;
    }
    return counts;
}

inline std::string describe_waits(const Block& block) {
    const Tally counts = tally(block);
    std::string warps;
    for (size_t w = 0; w < block.warps.size(); ++w)
        if (block.warps[w].arrived)
            warps += ", warp " + std::to_string(w) + " has " + std::to_string(block.warps[w].arrived) + " of 32 lanes at a warp-wide instruction";
    return "block " + std::to_string(block.index.x) + ": " + std::to_string(counts.barrier) + " threads at __syncthreads, " +
           std::to_string(counts.done) + " finished" + warps;
}

// Put block `index` in `block`'s slot: fresh fibers, poisoned shared memory and variables.
inline void start_block(Launch& launch, Block& block, unsigned index) {
    block.index = dim3{index, 0, 0};
    block.running = true;
    block.statics.clear();
    std::memset(block.shared, 0xFF, launch.shared_bytes);
    block.generic_writer.assign(launch.shared_bytes, 0);
    for (size_t i = 0; i < block.threads.size(); ++i) {
        Thread& thread = block.threads[i];
        thread.index = dim3{(unsigned)i, 0, 0};
        thread.state = State::ready;
        thread.uncommitted.clear();
        thread.groups.clear();
        thread.wgmma_fenced = false;
        thread.unfenced.clear();
        getcontext(&thread.context);
        thread.context.uc_stack.ss_sp = block.stacks[i];
        thread.context.uc_stack.ss_size = launch.stack_bytes;
        thread.context.uc_link = &launch.scheduler;
        makecontext(&thread.context, fiber_entry, 0);
    }
    for (Warp& warp : block.warps) warp = Warp{};
}

// Run each ready thread of `block` to its next switch, in thread order (or reversed), then
// release a barrier every unfinished thread has reached. Returns whether anything moved.
inline bool run_pass(Launch& launch, Block& block) {
    const int count = (int)block.threads.size();
    const bool reverse = launch.flags & REVERSE;
    launch.running = &block;
    bool moved = false;
    for (int k = 0; k < count; ++k) {
        const int i = reverse ? count - 1 - k : k;
        if (block.threads[i].state != State::ready) continue;
        launch.current = i;
        launch.in_fiber = true;
        swapcontext(&launch.scheduler, &block.threads[i].context);
        launch.in_fiber = false;
        moved = true;
        if (!launch.error.empty()) return moved;
    }
    const Tally counts = tally(block);
    if (counts.done == count) {
        for (const Warp& warp : block.warps)
            if (!warp.uncommitted.empty() || !warp.groups.empty()) {
                launch.error = "block " + std::to_string(block.index.x) + " finished with wgmmas it never waited for";
                return moved;
            }
        block.running = false;
        launch.spins = 0;
    } else if (counts.barrier && counts.barrier + counts.done == count) {  // threads that finished no longer take part
        for (Thread& thread : block.threads)
            if (thread.state == State::barrier) thread.state = State::ready;
        moved = true;
    }
    return moved;
}

inline void run_grid(Launch& launch) {
    std::vector<size_t> order(launch.slots.size());
    for (size_t s = 0; s < order.size(); ++s) {
        order[s] = s;
        if (launch.next_block < launch.grid.x) start_block(launch, launch.slots[s], launch.next_block++);
    }
    for (;;) {
        for (size_t s = order.size(); launch.random && s > 1; --s) {  // Fisher-Yates with xorshift64
            launch.random ^= launch.random << 13;
            launch.random ^= launch.random >> 7;
            launch.random ^= launch.random << 17;
            std::swap(order[s - 1], order[launch.random % s]);
        }
        bool any = false, moved = false;
        for (size_t s : order) {
            Block& block = launch.slots[s];
            if (!block.running) continue;
            any = true;
            moved |= run_pass(launch, block);
            if (!launch.error.empty()) return;
            if (!block.running && launch.next_block < launch.grid.x) start_block(launch, block, launch.next_block++);
        }
        if (!any) return;
        if (!moved) {
            launch.error = "deadlock";
            for (const Block& block : launch.slots)
                if (block.running) launch.error += "; " + describe_waits(block);
            return;
        }
    }
}

inline size_t page_bytes() { return (size_t)sysconf(_SC_PAGESIZE); }

// `bytes` (rounded up to pages, owned by the launch) followed by an inaccessible page, named
// `name` for a fault report; returns where the usable memory ends, or null.
inline unsigned char* map_with_guard(Launch& launch, size_t bytes, const std::string& name) {
    const size_t page = page_bytes();
    const size_t pages = (bytes + page - 1) / page + 1;
    void* base = mmap(nullptr, pages * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return nullptr;
    launch.mappings.emplace_back(static_cast<unsigned char*>(base), pages * page);
    unsigned char* guard = static_cast<unsigned char*>(base) + (pages - 1) * page;
    mprotect(guard, page, PROT_NONE);
    launch.guards.push_back(Buffer{guard, page, name});
    return guard;
}

// A fault inside a fiber (a read or write past a tensor, past shared memory, or a stack
// overflow) becomes the launch's error, and the scheduler abandons the launch. It runs on its
// own stack, since the fiber's may be the one that overflowed.
inline void on_fault(int signal, siginfo_t* info, void*) {
    Launch* launch = active();
    if (!launch || !launch->in_fiber) {  // not the kernel's fault: crash as usual
        ::signal(signal, SIG_DFL);
        return;
    }
    const auto* address = static_cast<const unsigned char*>(info->si_addr);
    std::string where = "an address outside every tensor argument and shared memory";
    for (const Buffer& guard : launch->guards)
        if (address >= guard.start && address < guard.start + guard.bytes) where = guard.name;
    record_failure(*launch, "a thread touched " + where);
    launch->in_fiber = false;
    setcontext(&launch->scheduler);
}

using Body = std::function<void(void* const* params)>;
struct Kernel {
    std::vector<bool> pointer;  // per parameter: a pointer (else a 4-byte scalar)
    Body body;
};
inline std::map<std::string, Kernel>& kernels() {
    static std::map<std::string, Kernel> registry;
    return registry;
}

template <typename... A, size_t... I>
inline void call_with(void (*kernel)(A...), void* const* params, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_reference_t<A>*>(params[I])...);
}

template <typename... A>
inline bool register_kernel(const char* name, void (*kernel)(A...)) {
    static_assert(((std::is_pointer_v<A> || sizeof(A) == 4) && ...), "kernel parameters are pointers or 4-byte scalars");
    kernels()[name] = Kernel{{std::is_pointer_v<A>...}, [kernel](void* const* params) { call_with(kernel, params, std::index_sequence_for<A...>{}); }};
    return true;
}

}  // namespace emu

#define EMU_KERNEL(NAME) static const bool NAME##_registered = ::emu::register_kernel(#NAME, &NAME);

#define threadIdx (::emu::self().index)
#define blockIdx (::emu::active()->running->index)
#define blockDim (::emu::active()->block_shape)
#define gridDim (::emu::active()->grid)

inline void __syncthreads() {
    emu::self().state = emu::State::barrier;
    emu::switch_out();
}

// Every lane of the warp arrives before any goes on (the full mask, the only one the kernel uses).
inline void __syncwarp() {
    struct Operands {};
    emu::collective(emu::Op::syncwarp, Operands{}, [](const Operands* const*) {});
}

inline void __nanosleep(unsigned) {
    if (++emu::active()->spins > 1000000) emu::fail("a spin wait never ended: a block waits on work that no resident block does");
    emu::switch_out();  // still ready: the other threads (and blocks) run first
}

// Atomic as written, since fibers switch only where they say so; each then lets the other
// threads (and blocks) run, so that the blocks' atomics interleave.
inline int atomicAdd(int* address, int value) {
    const int old = *address;
    *address = old + value;
    emu::switch_out();
    return old;
}
inline int atomicExch(int* address, int value) {
    const int old = *address;
    *address = value;
    emu::switch_out();
    return old;
}

// ----------------------------------------------------------------------------- PTX

namespace emu {

// The low (high = 0) or high 16-bit element of a fragment register, FP16 or BF16.
inline double fragment_element(unsigned word, int high, bool half) {
    const unsigned short bits = (unsigned short)(high ? word >> 16 : word & 0xFFFFu);
    return (double)(half ? half_to_float(bits) : bfloat_to_float(bits));
}

// Lane (g = lane / 4, t = lane % 4)'s A fragment a[0..3] of mma.m16n8k16, which is also each
// warp's share (its 16 rows) of a wgmma's A from registers: elements (g, 2t..2t+1), (g+8, 2t..),
// (g, 2t+8..), (g+8, 2t+8..).
inline void put_a_fragment(double (&A)[16][16], int lane, const unsigned* a, bool half) {
    const int g = lane / 4, t = lane % 4;
    for (int h = 0; h < 2; ++h) {
        A[g][2 * t + h] = fragment_element(a[0], h, half);
        A[g + 8][2 * t + h] = fragment_element(a[1], h, half);
        A[g][2 * t + 8 + h] = fragment_element(a[2], h, half);
        A[g + 8][2 * t + 8 + h] = fragment_element(a[3], h, half);
    }
}

}  // namespace emu

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: lane (g = lane / 4, t = lane % 4) holds A
// elements (g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..) in a[0..3], B elements
// (k = 2t..2t+1, n = g) and (k = 2t+8.., n = g) in b0, b1, and C/D (g, 2t), (g, 2t+1),
// (g+8, 2t), (g+8, 2t+1) in c[0..3] (the PTX ISA's fragment layouts).
template <typename T>
inline void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    struct Operands {
        float* c;
        unsigned a[4], b[2];
    };
    const Operands mine{c, {a[0], a[1], a[2], a[3]}, {b0, b1}};
    constexpr bool half = std::is_same_v<T, __half>;
    emu::collective(half ? emu::Op::mma_f16 : emu::Op::mma_bf16, mine, [](const Operands* const* lanes) {
        double A[16][16], B[16][8];
        for (int lane = 0; lane < 32; ++lane) {
            const int g = lane / 4, t = lane % 4;
            const Operands& o = *lanes[lane];
            emu::put_a_fragment(A, lane, o.a, half);
            for (int h = 0; h < 2; ++h) {
                B[2 * t + h][g] = emu::fragment_element(o.b[0], h, half);
                B[2 * t + 8 + h][g] = emu::fragment_element(o.b[1], h, half);
            }
        }
        float D[16][8];
        for (int i = 0; i < 16; ++i)
            for (int j = 0; j < 8; ++j) {
                const int lane = (i % 8) * 4 + j / 2, e = (i / 8) * 2 + j % 2;
                double sum = lanes[lane]->c[e];
                for (int k = 0; k < 16; ++k) sum += A[i][k] * B[k][j];
                D[i][j] = (float)sum;
            }
        for (int lane = 0; lane < 32; ++lane) {
            const int g = lane / 4, t = lane % 4;
            float* c = lanes[lane]->c;
            c[0] = D[g][2 * t];
            c[1] = D[g][2 * t + 1];
            c[2] = D[g + 8][2 * t];
            c[3] = D[g + 8][2 * t + 1];
        }
    });
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8j..8j+7 give the 16-byte rows of matrix j;
// lane l receives, in r[j], the 32-bit word l % 4 of row l / 4 of matrix j.
inline void ldmatrix_x4(const void* smem, unsigned (&r)[4]) {
    struct Operands {
        const unsigned char* row;
        unsigned* r;
    };
    emu::check_shared(smem, 16, 16, "an ldmatrix row address");
    const Operands mine{static_cast<const unsigned char*>(smem), r};
    emu::collective(emu::Op::ldmatrix, mine, [](const Operands* const* lanes) {
        for (int lane = 0; lane < 32; ++lane)
            for (int j = 0; j < 4; ++j) std::memcpy(&lanes[lane]->r[j], lanes[8 * j + lane / 4]->row + 4 * (lane % 4), 4);
    });
}

// cp.async.{ca,cg}.shared.global with an optional source size of 0 (zero fill).
template <int BYTES>
inline void cp_async_zfill(void* smem, const void* global, bool valid) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
    emu::check_shared(smem, BYTES, BYTES, "a cp.async destination");
    emu::Copy copy{static_cast<unsigned char*>(smem), {}, BYTES};
    if (valid) {
        emu::check_global(global, BYTES, BYTES, "a cp.async source");
        std::memcpy(copy.data, global, BYTES);
    }
    if (emu::active()->flags & emu::EARLY)
        emu::land(copy);
    else
        emu::self().uncommitted.push_back(copy);
}
template <int BYTES>
inline void cp_async(void* smem, const void* global) { cp_async_zfill<BYTES>(smem, global, true); }
inline void cp_async_commit() {
    emu::Thread& thread = emu::self();
    thread.groups.push_back(std::move(thread.uncommitted));
    thread.uncommitted.clear();
}
template <int PENDING>
inline void cp_async_wait() {
    emu::Thread& thread = emu::self();
    while ((int)thread.groups.size() > PENDING) {
        emu::land(thread.groups.front());
        thread.groups.pop_front();
    }
}


// The shared-memory address space of the running block: an offset into its dynamic shared memory.
inline size_t __cvta_generic_to_shared(const void* address) {
    emu::check_shared(address, 1, 1, "a shared-memory address");
    return (size_t)(static_cast<const unsigned char*>(address) - emu::dynamic_shared());
}

namespace emu {

// The async proxy reads a wgmma's B: no byte of it may hold a copy whose thread has not fenced it.
inline void check_visible_to_async_proxy(const Wgmma& op) {
    const Block& block = *active()->running;
    for (int n = 0; n < 8; ++n)
        for (int k = 0; k < 2; ++k) {
            const size_t start = (size_t)(op.b + n * op.sbo + k * op.lbo - block.shared);
            for (size_t offset = start; offset < start + 128; ++offset)
                if (block.generic_writer[offset])
                    fail("a wgmma reads shared offset " + std::to_string(offset) + ", which thread " +
                         std::to_string(block.generic_writer[offset] - 1) +
                         " wrote by cp.async and has not ordered for the async proxy (fence.proxy.async) since");
        }
}

inline void land(const Wgmma& op) {
    check_visible_to_async_proxy(op);
    double A[16][16], B[16][64];
    for (int lane = 0; lane < 32; ++lane) put_a_fragment(A, lane, op.a[lane], op.half);
    for (int k = 0; k < 16; ++k)
        for (int n = 0; n < 64; ++n) {
            unsigned short bits;
            std::memcpy(&bits, op.b + (n / 8) * op.sbo + (n % 8) * 16 + (k / 8) * op.lbo + (k % 8) * 2, 2);
            B[k][n] = fragment_element(bits, 0, op.half);
        }
    for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, t = lane % 4;
        for (int j = 0; j < 8; ++j)
            for (int e = 0; e < 4; ++e) {
                const int row = g + 8 * (e / 2), col = 8 * j + 2 * t + e % 2;
                double sum = op.d[lane][4 * j + e];
                for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
                op.d[lane][4 * j + e] = (float)sum;
            }
    }
}

inline Warp& own_warp() { return active()->running->warps[self().index.x / 32]; }

}  // namespace emu

// wgmma.mma_async.sync.aligned.m64n64k16.f32.{f16,bf16} with A from registers, B from shared memory
// through a K-major descriptor without swizzle (the only form the kernel uses; any other is
// refused): element (k, n) of B at start + (n / 8) * SBO + (n % 8) * 16 + (k / 8) * LBO + (k % 8) * 2
// bytes (PTX ISA, "Shared Memory Matrix Layout"). Each warp computes its own 16 rows, which depend
// only on its lanes' A and on B, so the warp, not the warpgroup, is the unit here. It lands at
// wgmma.wait_group (LATE: a read of d, or a change of a or of B, before the wait shows) or at
// issue (EARLY).
template <typename T>
inline void wgmma_m64n64k16(float (&d)[8][4], const unsigned (&a)[4], unsigned long long descriptor) {
    struct Operands {
        float* d;
        const unsigned* a;
        unsigned long long descriptor;
    };
    if (!emu::self().wgmma_fenced) emu::fail("a wgmma.mma_async without a wgmma.fence since the thread's last wgmma.wait_group");
    const Operands mine{&d[0][0], a, descriptor};
    constexpr bool half = std::is_same_v<T, __half>;
    emu::collective(half ? emu::Op::wgmma_f16 : emu::Op::wgmma_bf16, mine, [](const Operands* const* lanes) {
        const unsigned long long descriptor = lanes[0]->descriptor;
        for (int lane = 1; lane < 32; ++lane)
            if (lanes[lane]->descriptor != descriptor) emu::fail("the lanes of a wgmma gave different descriptors");
        if ((descriptor >> 62) || ((descriptor >> 49) & 7))
            emu::fail("a wgmma descriptor with a swizzle mode or a base offset: the emulator models only K-major without swizzle");
        emu::Wgmma op{half, {}, {}, emu::dynamic_shared() + ((descriptor & 0x3FFF) << 4), ((descriptor >> 16) & 0x3FFF) << 4,
                      ((descriptor >> 32) & 0x3FFF) << 4};
        for (int n = 0; n < 8; ++n)
            for (int k = 0; k < 2; ++k) emu::check_shared(op.b + n * op.sbo + k * op.lbo, 128, 16, "a wgmma core matrix of B");
        for (int lane = 0; lane < 32; ++lane) {
            op.d[lane] = lanes[lane]->d;
            op.a[lane] = lanes[lane]->a;
        }
        emu::check_visible_to_async_proxy(op);  // at issue, and again when it lands
        if (emu::active()->flags & emu::EARLY)
            emu::land(op);
        else
            emu::own_warp().uncommitted.push_back(op);
    });
}
inline void wgmma_fence() { emu::self().wgmma_fenced = true; }
inline void wgmma_commit() {
    struct Operands {};
    emu::collective(emu::Op::wgmma_commit, Operands{}, [](const Operands* const*) {
        emu::Warp& warp = emu::own_warp();
        warp.groups.push_back(std::move(warp.uncommitted));
        warp.uncommitted.clear();
    });
}
template <int PENDING>
inline void wgmma_wait() {
    struct Operands {};
    emu::self().wgmma_fenced = false;
    emu::collective(emu::Op::wgmma_wait, Operands{}, [](const Operands* const*) {
        emu::Warp& warp = emu::own_warp();
        while ((int)warp.groups.size() > PENDING) {
            for (const emu::Wgmma& op : warp.groups.front()) emu::land(op);
            warp.groups.pop_front();
        }
    });
}
template <int MT>
inline void wgmma_fence_operands(float (&)[1][MT][4]) {}
// fence.proxy.async.shared::cta: the thread's landed copies become visible to the async proxy.
inline void fence_proxy_async() {
    emu::Thread& thread = emu::self();
    emu::Block& block = *emu::active()->running;
    for (const auto& [start, bytes] : thread.unfenced)
        for (size_t offset = start; offset < start + bytes; ++offset)
            if (block.generic_writer[offset] == thread.index.x + 1) block.generic_writer[offset] = 0;
    thread.unfenced.clear();
}

inline unsigned load_acquire(const int* flag) { return (unsigned)*static_cast<const volatile int*>(flag); }

// ----------------------------------------------------------------------------- the entry point

// Run kernel `name` over `blocks` blocks of `threads` threads with `shared` bytes of dynamic
// shared memory, `resident` blocks at a time (slots visited in an order shuffled by `seed`, or in
// order for 0). Parameter i is a pointer (kinds[i] == 0: values[i] its address, 0 for null,
// sizes[i] its bytes) or a 4-byte scalar (kinds[i] == 1: values[i] its bits). Returns 0, or 1
// with the reason in `error`. The only symbol a build exports (__init__.py builds with
// -fvisibility=hidden): the builds of two sources define kernels of the same names, and their
// registries (static locals of inline functions, which g++ would otherwise bind once across every
// library loaded, RTLD_LOCAL or not) must stay apart.
extern "C" __attribute__((visibility("default"))) int emu_launch(const char* name, unsigned blocks, unsigned threads,
                                                                 unsigned shared, unsigned resident, unsigned seed, int count,
                                                                 const int* kinds, const uint64_t* values, const uint64_t* sizes,
                                                                 int flags, char* error, int error_bytes) {
    auto report = [&](const std::string& message) {
        std::snprintf(error, (size_t)error_bytes, "%s", message.c_str());
        return 1;
    };
    const auto found = emu::kernels().find(name);
    if (found == emu::kernels().end()) return report(std::string("no kernel named ") + name + " in this build");
    const emu::Kernel& kernel = found->second;
    if ((int)kernel.pointer.size() != count)
        return report(std::string(name) + " takes " + std::to_string(kernel.pointer.size()) + " arguments, not " + std::to_string(count));
    if (threads % 32) return report("the block size must be whole warps");
    if (resident == 0) return report("at least one block must be resident");

    emu::Launch launch;
    std::vector<void*> pointers(count, nullptr);
    std::vector<uint32_t> scalars(count, 0);
    std::vector<void*> params(count);
    std::vector<size_t> slack(count, 0);
    for (int i = 0; i < count; ++i) {
        if (kernel.pointer[i] != (kinds[i] == 0))
            return report(std::string(name) + ": argument " + std::to_string(i) + (kernel.pointer[i] ? " is a pointer" : " is a scalar"));
        if (kinds[i] == 1) {
            scalars[i] = (uint32_t)values[i];
            params[i] = &scalars[i];
            continue;
        }
        params[i] = &pointers[i];
        if (!values[i]) continue;
        unsigned char* end = emu::map_with_guard(launch, sizes[i] + 16, "the memory past the end of argument " + std::to_string(i));
        if (!end) return report("out of memory for argument " + std::to_string(i));
        unsigned char* start = end - sizes[i];
        start -= (uintptr_t)(start - (unsigned char*)(uintptr_t)values[i]) % 16;  // keep the caller's alignment
        std::memcpy(start, (const void*)(uintptr_t)values[i], sizes[i]);
        slack[i] = (size_t)(end - start) - sizes[i];
        std::memset(start + sizes[i], 0xA5, slack[i]);
        pointers[i] = start;
        launch.buffers.push_back(emu::Buffer{start, sizes[i]});
    }
    launch.stack_bytes = 256 * 1024;
    launch.shared_bytes = shared;
    launch.slots.resize(std::min(resident, std::max(blocks, 1u)));
    for (emu::Block& block : launch.slots) {
        unsigned char* shared_end = emu::map_with_guard(launch, shared + 128, "the memory past a block's dynamic shared memory");
        if (!shared_end) return report("out of memory for shared memory");
        block.shared = (unsigned char*)((uintptr_t)(shared_end - shared) & ~(uintptr_t)127);
        for (unsigned i = 0; i < threads; ++i) {
            unsigned char* stack_end = emu::map_with_guard(launch, launch.stack_bytes, "the memory above a thread's stack");
            if (!stack_end) return report("out of memory for the threads' stacks");
            // The stack grows down, toward a guard page of its own at the bottom of its mapping.
            unsigned char* bottom = stack_end - launch.stack_bytes;
            mprotect(bottom, emu::page_bytes(), PROT_NONE);
            launch.guards.push_back(emu::Buffer{bottom, emu::page_bytes(), "the end of a thread's stack (a stack overflow)"});
            block.stacks.push_back(bottom);
        }
        block.threads.resize(threads);
        block.warps.resize(threads / 32);
    }
    launch.grid = dim3{blocks, 1, 1};
    launch.block_shape = dim3{threads, 1, 1};
    launch.flags = flags;
    launch.random = seed ? 0x9E3779B97F4A7C15ull * seed : 0;
    launch.body = [&]() { kernel.body(params.data()); };
    std::vector<unsigned char> fault_stack(64 * 1024);
    stack_t alternate{}, previous_stack{};
    alternate.ss_sp = fault_stack.data();
    alternate.ss_size = fault_stack.size();
    sigaltstack(&alternate, &previous_stack);
    struct sigaction fault {}, previous_segv{}, previous_bus{};
    fault.sa_sigaction = emu::on_fault;
    fault.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigaction(SIGSEGV, &fault, &previous_segv);
    sigaction(SIGBUS, &fault, &previous_bus);
    emu::active() = &launch;
    emu::run_grid(launch);
    emu::active() = nullptr;
    sigaction(SIGSEGV, &previous_segv, nullptr);
    sigaction(SIGBUS, &previous_bus, nullptr);
    sigaltstack(&previous_stack, nullptr);
    for (int i = 0; i < count && launch.error.empty(); ++i) {
        if (!pointers[i]) continue;
        const unsigned char* start = static_cast<const unsigned char*>(pointers[i]);
        for (size_t s = 0; s < slack[i]; ++s)
            if (start[sizes[i] + s] != 0xA5) launch.error = std::string(name) + " wrote past the end of argument " + std::to_string(i);
        std::memcpy((void*)(uintptr_t)values[i], start, sizes[i]);
    }
    return launch.error.empty() ? 0 : report(launch.error);
}
