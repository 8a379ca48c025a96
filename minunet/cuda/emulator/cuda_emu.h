// cuda_emu.h -- run CUDA C kernels on the CPU, to test them where there is no GPU.
//
// Included before a kernel file, this header turns the CUDA keywords into plain C++ and
// provides what a GPU provides: the built-in indices threadIdx/blockIdx/blockDim/gridDim,
// block-wide barriers, __shared__ memory and atomics. It is what a GPU does with a kernel,
// written out slowly:
//
// * A launch runs the grid's blocks one after another (a GPU runs many at once, in no
//   promised order, so a correct kernel cannot tell the difference).
// * The threads of a block are fibers: cooperative threads, each with its own stack, all on
//   one OS thread. The scheduler runs thread 0 until it reaches __syncthreads() or finishes,
//   then thread 1, and so on; when every thread waits at the barrier, all are released and
//   the round starts again. The schedule is the most unfavourable one for a missing barrier:
//   without it, thread 0 runs to the end before thread 1 has written anything, so a kernel
//   that forgets a __syncthreads() reads unwritten shared memory and computes wrong numbers,
//   every time. Every other block runs its threads in the reverse order (last thread
//   first), so that a kernel cannot pass by relying on lower threads having run first.
// * __shared__ variables become `static`: one copy shared by the fibers of the running block,
//   left over from the previous block like real shared memory, which is never cleared.
// * A barrier that some threads of a block reach while others have already returned (a
//   __syncthreads() inside a branch) is an error on a GPU; here the launch reports it.
//
// Compile a kernel file with it as: g++ -std=c++20 -x c++ -include cuda_emu.h kernel.cu ...
// The host side is emu::launch(), called through the EMU_EXPORT_KERNEL wrappers below.

#pragma once

#include <math.h>
#include <ucontext.h>

#include <atomic>
#include <cstdio>
#include <functional>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

// --- The CUDA keywords -------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
// The 16-byte vector types that kernels load in one instruction (aligned as on a GPU).
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) double2 {
    double x, y;
};

// --- The built-in indices: set by the scheduler before it resumes a thread ------------------
inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

namespace emu {

enum class State { ready, at_barrier, finished };

struct Fiber {
    ucontext_t context;
    std::unique_ptr<char[]> stack;
    uint3 index;
    State state;
};

constexpr std::size_t kStackBytes = 64 * 1024;

struct Block {
    ucontext_t scheduler;
    std::vector<Fiber> fibers;
    int running = 0;
    const std::function<void()>* body = nullptr;
};
inline thread_local Block* current_block = nullptr;
inline thread_local char error_message[256] = "";

inline void fiber_main() {
    Block& block = *current_block;
    (*block.body)();
    block.fibers[block.running].state = State::finished;
}  // returning resumes the scheduler (uc_link)

inline void syncthreads() {
    Block& block = *current_block;
    Fiber& self = block.fibers[block.running];
    self.state = State::at_barrier;
    swapcontext(&self.context, &block.scheduler);
}

// Run one block: round-robin over the threads, each up to its next barrier, in increasing
// thread order, or decreasing if `reverse` (so that neither order can hide a missing barrier:
// each thread runs before the threads it might wrongly rely on). Returns false (with a
// message) if the threads disagree about a barrier.
inline bool run_block(Block& block, bool reverse) {
    for (Fiber& fiber : block.fibers) {
        getcontext(&fiber.context);
        fiber.context.uc_stack.ss_sp = fiber.stack.get();
        fiber.context.uc_stack.ss_size = kStackBytes;
        fiber.context.uc_link = &block.scheduler;
        makecontext(&fiber.context, fiber_main, 0);
        fiber.state = State::ready;
    }
    for (;;) {
        const int count = static_cast<int>(block.fibers.size());
        for (int i = 0; i < count; ++i) {
            const int t = reverse ? count - 1 - i : i;
            if (block.fibers[t].state != State::ready) continue;
            block.running = t;
            threadIdx = block.fibers[t].index;
            swapcontext(&block.scheduler, &block.fibers[t].context);
        }
        std::size_t waiting = 0, finished = 0;
        for (Fiber& fiber : block.fibers) {
            waiting += fiber.state == State::at_barrier;
            finished += fiber.state == State::finished;
        }
        if (finished == block.fibers.size()) return true;
        if (finished > 0) {  // some returned while others wait: a GPU would hang or misbehave
            std::snprintf(error_message, sizeof error_message,
                          "__syncthreads() reached by %zu of the %zu threads of block (%u, %u, %u);"
                          " the others had returned",
                          waiting, block.fibers.size(), blockIdx.x, blockIdx.y, blockIdx.z);
            return false;
        }
        for (Fiber& fiber : block.fibers) fiber.state = State::ready;  // all arrived: release
    }
}

// Launch `body` (the kernel with its arguments bound) on a grid; 0 on success, else 1 with
// error_message set. The limits checked are those every CUDA GPU since compute capability
// 3.0 enforces ("invalid configuration argument").
inline int run_grid(dim3 grid, dim3 block_dim, const std::function<void()>& body) {
    error_message[0] = '\0';
    unsigned long long threads = 1ull * block_dim.x * block_dim.y * block_dim.z;
    if (threads == 0 || threads > 1024 || block_dim.z > 64 || grid.x == 0 || grid.y == 0 ||
        grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u) {
        std::snprintf(error_message, sizeof error_message,
                      "invalid configuration: grid (%u, %u, %u), block (%u, %u, %u)", grid.x,
                      grid.y, grid.z, block_dim.x, block_dim.y, block_dim.z);
        return 1;
    }
    Block block;
    block.body = &body;
    block.fibers.resize(threads);
    for (unsigned z = 0, t = 0; z < block_dim.z; ++z)
        for (unsigned y = 0; y < block_dim.y; ++y)
            for (unsigned x = 0; x < block_dim.x; ++x, ++t) {
                block.fibers[t].index = {x, y, z};
                block.fibers[t].stack.reset(new char[kStackBytes]);
            }
    Block* outer = current_block;
    current_block = &block;
    gridDim = grid;
    blockDim = block_dim;
    bool ok = true;
    for (unsigned z = 0; ok && z < grid.z; ++z)
        for (unsigned y = 0; ok && y < grid.y; ++y)
            for (unsigned x = 0; ok && x < grid.x; ++x) {
                blockIdx = {x, y, z};
                ok = run_block(block, (x + y + z) % 2 == 1);  // odd blocks: threads in reverse
            }
    current_block = outer;
    return ok ? 0 : 1;
}

// The host calls a kernel like CUDA's cuLaunchKernel: `args[i]` points to the i-th argument.
template <class... Args, std::size_t... I>
int launch_unpacked(void (*kernel)(Args...), dim3 grid, dim3 block, void** args,
                    std::index_sequence<I...>) {
    std::function<void()> body = [&] { kernel(*static_cast<std::decay_t<Args>*>(args[I])...); };
    return run_grid(grid, block, body);
}

template <class... Args>
int launch(void (*kernel)(Args...), dim3 grid, dim3 block, void** args) {
    return launch_unpacked(kernel, grid, block, args, std::index_sequence_for<Args...>());
}

// One letter per parameter, so that the caller can check the arguments it packs:
// p = pointer, i = int, f = float, d = double.
template <class T>
constexpr char type_code() {
    if constexpr (std::is_pointer_v<T>) return 'p';
    else if constexpr (std::is_same_v<T, int>) return 'i';
    else if constexpr (std::is_same_v<T, float>) return 'f';
    else if constexpr (std::is_same_v<T, double>) return 'd';
    else static_assert(!sizeof(T), "kernel parameter type not supported by the emulator");
}

template <class... Args>
const char* signature(void (*)(Args...)) {
    static const char codes[] = {type_code<std::decay_t<Args>>()..., '\0'};
    return codes;
}

}  // namespace emu

// --- What kernels may call ---------------------------------------------------------------
#ifdef MINUNET_OMIT_SYNC  // tests only: drop every barrier, to show that the tests notice
inline void __syncthreads() {}
#else
inline void __syncthreads() { emu::syncthreads(); }
#endif

template <class T>
T atomicAdd(T* address, T value) {  // fibers never run at the same time; atomic_ref for clarity
    return std::atomic_ref<T>(*address).fetch_add(value);
}

// Exports `emu_launch_NAME(grid[3], block[3], args)` and `emu_signature_NAME()` for ctypes.
#define EMU_EXPORT_KERNEL(name)                                                              \
    extern "C" int emu_launch_##name(const unsigned* grid, const unsigned* block,           \
                                     void** args) {                                          \
        return emu::launch(name, dim3{grid[0], grid[1], grid[2]},                            \
                           dim3{block[0], block[1], block[2]}, args);                        \
    }                                                                                        \
    extern "C" const char* emu_signature_##name() { return emu::signature(name); }

extern "C" const char* emu_error_message() { return emu::error_message; }
