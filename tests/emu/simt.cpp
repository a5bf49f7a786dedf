// fastxent test support -- the SIMT runtime: runs a kernel compiled against simt.h on a
// grid, one block at a time, each CUDA thread a cooperative fiber, and checks what real
// hardware would not forgive. Built once by device.py (no sanitizer flags), loaded into
// the test process, called through fx_emu_launch().
//
// Scheduling. A block's threads are fibers with their own stacks (made with ucontext once
// per launch, then switched with _setjmp/_longjmp: swapcontext costs a system call, and
// a fiber switch happens at every warp sync of every lane). A fiber runs until it
// reaches a synchronising intrinsic (or exits); then the scheduler resumes another
// runnable fiber, chosen by the block's policy, drawn from the launch seed: the oldest,
// the newest (one warp runs ahead as far as it can) or a random one. The same fibers run
// the threads of every block of the launch, one block after the other. Blocks run
// in a seeded shuffled order and fibers released together (by a barrier or a warp sync)
// join the runnable list in a shuffled order, so an ordering real hardware does not
// promise gives a different result from one seed to the next.
//
// __syncthreads: a fiber waits; when no fiber is runnable and every live thread of the
// block waits at a __syncthreads called from one place, all are released. A thread that
// exited meanwhile, or two call sites, is reported.
//
// __syncwarp(mask), __shfl_sync, __shfl_xor_sync: the lanes of `mask` within the
// caller's warp wait for each other; when the last one arrives, each reads its source
// lane's value (PTX shfl.sync: idx and bfly modes, sections of `width` lanes) and all are
// released. As PTX says, lanes pair up at the next warp sync of the same kind and mask
// (the call site may differ); a caller outside its mask, lanes of the mask at different
// kinds/masks/widths, at __syncthreads or exited, or a read of a lane outside the mask
// is reported.
//
// Memory. Every load and store of kernel code calls __tsan_read*/__tsan_write* (g++
// instruments the kernel library, see simt.h). An access inside a staging buffer (device
// memory: the launch's arrays, copied by device.py with red zones around them) must lie
// within one pointer argument's bytes; a write must target a writable array; a 16-byte
// access (a uint4 copy, simt.h) must be 16-byte aligned; two blocks must not touch a
// byte that one of them writes (blocks have no way to synchronise within a launch;
// atomics aside). An access to __shared__ storage (the kernel library's .bss) must not
// read a byte no thread of this block wrote, and two threads must not touch a byte, one
// writing, without a __syncthreads between them. Addresses below 64 KiB are null
// pointers. Other addresses (fiber stacks, the arguments' values) are not checked.
// The first error stops the launch: the fiber that found it is abandoned, the message
// (kernel, block, thread, what) goes back to Python. A fatal signal (a wild pointer, a
// stack overflow) is caught and reported the same way.
#define FX_EMU_RUNTIME
#include "simt.h"

#include <dlfcn.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <setjmp.h>
#include <cstdarg>
#include <cstdio>
#include <deque>
#include <string>
#include <vector>

using fx_emu::Dim3;
using fx_emu::KernelInfo;

// ---------------------------------------------------------------------------
// The launch, as device.py fills it (ctypes mirrors these structs)
// ---------------------------------------------------------------------------

struct Extent { uint64_t lo, hi; int32_t arg, writable; };  // one pointer argument's bytes
struct Heap { uint64_t lo, hi; };                           // one staging buffer, red zones included
struct Launch {
    const KernelInfo* kernel;
    uint32_t grid[3], block[3];
    uint64_t seed;
    void** args;
    int32_t nextents, nheaps;
    const Extent* extents;
    const Heap* heaps;
    char* error;
    int32_t error_size;
};

extern "C" {
Dim3 fx_emu_thread_idx = {0, 0, 0}, fx_emu_block_idx = {0, 0, 0}, fx_emu_block_dim = {1, 1, 1}, fx_emu_grid_dim = {1, 1, 1};
}

namespace {

// Fiber stack above a guard page: 64 KiB. The kernels need less than 4 KiB (test_cupy.py
// passes with 4 KiB stacks); the rest is for formatting an error report on the fiber.
constexpr size_t kStack = 64 << 10;
constexpr uintptr_t kNullPage = 64 << 10;

enum State { RUNNABLE, AT_BARRIER, AT_WARP_SYNC, EXITED };
enum Op { SYNCWARP, SHFL_IDX, SHFL_BFLY };
const char* const kOpName[] = {"__syncwarp", "__shfl_sync", "__shfl_xor_sync"};
enum Policy { OLDEST, NEWEST, RANDOM };

struct Fiber {
    jmp_buf context;
    Dim3 tid;
    int linear;
    State state;
    const void* site;  // where it waits
    Op op;             // the warp sync it waits at, and its operands
    unsigned mask;
    int width, lane_arg, value, result;
};

// Lanes of one warp (bit = lane) waiting at a warp sync, at __syncthreads, or exited.
struct Warp { unsigned waiting, at_barrier, exited; };

// Per byte of __shared__ storage: the last writer and a reader (thread + 1; -1 several)
// with the barrier epoch of those accesses.
struct SharedByte { int writer, write_epoch, reader, read_epoch; };

const Launch* launch = nullptr;
int nthreads = 0;
std::vector<Fiber> fibers;
std::vector<Warp> warps;
Fiber* current = nullptr;
jmp_buf scheduler;
ucontext_t launcher;  // where a fiber being made returns to
std::deque<Fiber*> runnable;
Policy policy;
int epoch;        // __syncthreads completed by this block
int block_id;     // linear id of the running block
bool failed;
uint64_t rng_state;

char* stacks = nullptr;
size_t stacks_for = 0;
sigjmp_buf on_signal;

uintptr_t shared_lo, shared_hi, heap_lo, heap_hi;
std::vector<SharedByte> shared;
std::vector<std::vector<int32_t>> block_writer, block_reader;  // per heap, per byte: block + 1

uint64_t rng() {  // splitmix64
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

template <class T> void shuffle(std::vector<T>& v) {
    for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[rng() % i]);
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

Dim3 block_coords(int id) {
    const Dim3& g = fx_emu_grid_dim;
    return {(unsigned)(id % g.x), (unsigned)(id / g.x % g.y), (unsigned)(id / (g.x * g.y))};
}

std::string thread_name(const Fiber* f) {
    char s[48];
    snprintf(s, sizeof s, "thread (%u,%u,%u)", f->tid.x, f->tid.y, f->tid.z);
    return s;
}

std::string site_name(const void* site) {
    Dl_info info;
    char s[512];
    if (site != nullptr && dladdr(site, &info) && info.dli_fname != nullptr)
        snprintf(s, sizeof s, "%s+0x%lx", info.dli_fname, (unsigned long)((const char*)site - (const char*)info.dli_fbase));
    else
        snprintf(s, sizeof s, "%p", site);
    return s;
}

// Records the first error: "<kernel> block (x,y,z) thread (x,y,z): <what>".
void report(const char* format, ...) {
    if (failed) return;
    failed = true;
    const Dim3 b = block_coords(block_id);
    std::string head = std::string(launch->kernel->name) + " block (" + std::to_string(b.x) + "," +
                       std::to_string(b.y) + "," + std::to_string(b.z) + ")";
    if (current != nullptr) head += " " + thread_name(current);
    char what[1024];
    va_list args;
    va_start(args, format);
    vsnprintf(what, sizeof what, format, args);
    va_end(args);
    snprintf(launch->error, launch->error_size, "%s: %s", head.c_str(), what);
}

// Abandons the calling fiber (only fibers call it): the scheduler sees `failed` and stops.
[[noreturn]] void abandon() { _longjmp(scheduler, 1); }
#define FAIL(...)            \
    do {                     \
        report(__VA_ARGS__); \
        abandon();           \
    } while (0)

// ---------------------------------------------------------------------------
// Fibers and the scheduler
// ---------------------------------------------------------------------------

// Back to the scheduler; returns when the scheduler resumes this fiber.
void yield() {
    if (_setjmp(current->context) == 0) _longjmp(scheduler, 1);
}

std::vector<Fiber*> released;

void release(std::vector<Fiber*>& group) {
    shuffle(group);
    for (Fiber* f : group) {
        f->state = RUNNABLE;
        runnable.push_back(f);
    }
    group.clear();
}

Fiber* pick() {
    size_t i = policy == OLDEST ? 0 : runnable.size() - 1;
    if (policy == RANDOM) std::swap(runnable[rng() % runnable.size()], runnable.back());
    Fiber* f = runnable[i];
    if (i == 0) runnable.pop_front();
    else runnable.pop_back();
    return f;
}

Fiber& lane_fiber(const Fiber* f, int lane) { return fibers[(f->linear & ~31) + lane]; }
Warp& warp_of(const Fiber* f) { return warps[f->linear >> 5]; }

// A lane that leaves (exits, or waits at __syncthreads) must not be awaited at a warp sync.
void check_no_warp_waits_for(const Fiber* f, const char* leaving) {
    const int lane = f->linear & 31;
    for (unsigned w = warp_of(f).waiting; w != 0; w &= w - 1) {
        const Fiber& g = lane_fiber(f, __builtin_ctz(w));
        if (g.mask >> lane & 1u)
            FAIL("%s while %s waits for it at %s(mask 0x%08x) called from %s", leaving, thread_name(&g).c_str(),
                 kOpName[g.op], g.mask, site_name(g.site).c_str());
    }
}

// A fiber's life: made by make_fiber, it parks here; then it runs the kernel for one
// thread of each block the scheduler gives it.
Fiber* making;
void trampoline() {
    Fiber* self = making;
    if (_setjmp(self->context) == 0) setcontext(&launcher);
    for (;;) {
        launch->kernel->thunk(launch->args);
        self->state = EXITED;
        warp_of(self).exited |= 1u << (self->linear & 31);
        check_no_warp_waits_for(self, "exits");
        yield();
    }
}

void make_fiber(Fiber& f, int t) {
    ucontext_t start;
    getcontext(&start);
    start.uc_stack.ss_sp = stacks + (size_t)t * (kStack + 4096) + 4096;
    start.uc_stack.ss_size = kStack;
    start.uc_link = nullptr;
    makecontext(&start, trampoline, 0);
    making = &f;
    swapcontext(&launcher, &start);
}

// No fiber is runnable: release a complete __syncthreads, or report why there is none.
// Returns false when the block is over (all exited, or an error).
bool release_barrier() {
    std::vector<Fiber*> waiting;
    const Fiber* exited = nullptr;
    for (Fiber& f : fibers) {
        if (f.state == AT_BARRIER) waiting.push_back(&f);
        if (f.state == EXITED) exited = &f;
        if (f.state == AT_WARP_SYNC) {
            report("deadlock: %s waits forever at %s(mask 0x%08x) called from %s", thread_name(&f).c_str(),
                   kOpName[f.op], f.mask, site_name(f.site).c_str());
            return false;
        }
    }
    if (waiting.empty()) return false;
    if (exited != nullptr) {
        report("%s has exited while %s waits at __syncthreads() called from %s", thread_name(exited).c_str(),
               thread_name(waiting[0]).c_str(), site_name(waiting[0]->site).c_str());
        return false;
    }
    for (const Fiber* f : waiting) {
        if (f->site != waiting[0]->site) {
            report("%s waits at __syncthreads() called from %s, %s at the one called from %s",
                   thread_name(waiting[0]).c_str(), site_name(waiting[0]->site).c_str(), thread_name(f).c_str(),
                   site_name(f->site).c_str());
            return false;
        }
    }
    ++epoch;
    for (Warp& w : warps) w.at_barrier = 0;
    release(waiting);
    return true;
}

__attribute__((noinline)) void run_block(int id) {  // not inlined under sigsetjmp
    block_id = id;
    fx_emu_block_idx = block_coords(id);
    epoch = 0;
    std::fill(shared.begin(), shared.end(), SharedByte{0, 0, 0, 0});
    std::fill(warps.begin(), warps.end(), Warp{0, 0, 0});
    released.clear();  // what an abandoned launch may have left
    for (Fiber& f : fibers) released.push_back(&f);
    policy = (Policy)(rng() % 3);
    runnable.clear();
    release(released);
    while (!failed) {
        if (runnable.empty()) {
            if (!release_barrier()) break;
            continue;
        }
        current = pick();
        fx_emu_thread_idx = current->tid;
        if (_setjmp(scheduler) == 0) _longjmp(current->context, 1);
        current = nullptr;
    }
}

// A warp sync of kind `op`: waits for the lanes of `mask`, then exchanges values.
int warp_sync(Op op, unsigned mask, int value, int lane_arg, int width, const void* site) {
    Fiber* self = current;
    Warp& warp = warp_of(self);
    const int lane = self->linear & 31, lanes = std::min(32, nthreads - (self->linear & ~31));
    const char* name = kOpName[op];
    if (!(mask >> lane & 1u))
        FAIL("%s(mask 0x%08x) called from %s by lane %d, which its mask does not name", name, mask,
             site_name(site).c_str(), lane);
    if (op != SYNCWARP && (width < 1 || width > 32 || (width & (width - 1)) != 0))
        FAIL("%s width %d called from %s: not a power of two in [1, 32]", name, width, site_name(site).c_str());
    if (lanes < 32 && (mask >> lanes) != 0)
        FAIL("%s(mask 0x%08x) names lanes this warp of %d threads does not have", name, mask, lanes);
    const unsigned gone = mask & (warp.exited | warp.at_barrier);
    if (gone != 0) {
        const Fiber& g = lane_fiber(self, __builtin_ctz(gone));
        FAIL("%s(mask 0x%08x) called from %s waits for %s, which %s", name, mask, site_name(site).c_str(),
             thread_name(&g).c_str(), g.state == EXITED ? "has exited" : "waits at __syncthreads(): deadlock");
    }
    // Lanes pair up at the next warp sync of the same kind, mask and width (PTX shfl.sync,
    // bar.warp.sync); a waiting lane that expects this one, or that this one expects,
    // at another one is divergence.
    for (unsigned w = warp.waiting; w != 0; w &= w - 1) {
        const Fiber& g = lane_fiber(self, __builtin_ctz(w));
        if (((g.mask >> lane & 1u) || (mask >> (g.linear & 31) & 1u)) &&
            (g.op != op || g.mask != mask || g.width != width))
            FAIL("divergent warp sync: %s(mask 0x%08x, width %d) called from %s, while %s waits at %s(mask 0x%08x, "
                 "width %d) called from %s",
                 name, mask, width, site_name(site).c_str(), thread_name(&g).c_str(), kOpName[g.op], g.mask, g.width,
                 site_name(g.site).c_str());
    }
    self->state = AT_WARP_SYNC;
    self->op = op;
    self->mask = mask;
    self->width = width;
    self->lane_arg = lane_arg;
    self->value = value;
    self->site = site;
    warp.waiting |= 1u << lane;
    if ((warp.waiting & mask) == mask) {
        for (unsigned w = mask; w != 0; w &= w - 1) {
            const int l = __builtin_ctz(w);
            Fiber& g = lane_fiber(self, l);
            if (op != SYNCWARP) {
                // PTX shfl.sync with c = ((32 - width) << 8) | 31: sections of `width` lanes.
                const int first = l & ~(width - 1), last = first | (width - 1);
                int src = op == SHFL_IDX ? first | (g.lane_arg & (width - 1)) : l ^ g.lane_arg;
                if (src < 0 || src > last) src = l;  // bfly past the section: own value
                if (!(mask >> src & 1u))
                    FAIL("%s(mask 0x%08x) called from %s: lane %d reads lane %d, which the mask does not name", name,
                         mask, site_name(site).c_str(), l, src);
                g.result = lane_fiber(self, src).value;
            }
            released.push_back(&g);
        }
        warp.waiting &= ~mask;
        release(released);
    }
    yield();
    return self->result;
}

// ---------------------------------------------------------------------------
// Memory checks
// ---------------------------------------------------------------------------

void check_shared(uintptr_t address, size_t size, bool write) {
    const int me = current->linear + 1;
    for (uintptr_t a = address; a < address + size && a < shared_hi; ++a) {
        SharedByte& s = shared[a - shared_lo];
        if (!write && s.writer == 0)
            FAIL("reads __shared__ byte %lu, which no thread of this block has written", (unsigned long)(a - shared_lo));
        if (s.writer != 0 && s.writer != me && s.write_epoch == epoch)
            FAIL("%s __shared__ byte %lu, which %s wrote with no __syncthreads() between", write ? "writes" : "reads",
                 (unsigned long)(a - shared_lo), thread_name(&fibers[s.writer - 1]).c_str());
        if (write && s.reader != 0 && s.reader != me && s.read_epoch == epoch)
            FAIL("writes __shared__ byte %lu, which %s read with no __syncthreads() between",
                 (unsigned long)(a - shared_lo), s.reader < 0 ? "several threads" : thread_name(&fibers[s.reader - 1]).c_str());
        if (write) {
            s.writer = me;
            s.write_epoch = epoch;
        } else if (s.reader == 0 || s.read_epoch != epoch) {
            s.reader = me;
            s.read_epoch = epoch;
        } else if (s.reader != me) {
            s.reader = -1;
        }
    }
}

std::string block_name(int id) {
    const Dim3 b = block_coords(id);
    return "block (" + std::to_string(b.x) + "," + std::to_string(b.y) + "," + std::to_string(b.z) + ")";
}

// ", at byte N of argument #k" when `address` lies in an argument (for messages).
std::string describe(const void* p) {
    const uint64_t address = (uintptr_t)p;
    for (int e = 0; launch != nullptr && e < launch->nextents; ++e) {
        const Extent& x = launch->extents[e];
        if (address >= x.lo && address < x.hi)
            return ", at byte " + std::to_string(address - x.lo) + " of argument #" + std::to_string(x.arg);
    }
    return "";
}

void check_global(int h, uintptr_t address, size_t size, bool write, bool atomic) {
    const Extent* in = nullptr;
    const Extent* near = nullptr;
    uint64_t distance = ~0ull;
    for (int e = 0; e < launch->nextents; ++e) {
        const Extent& x = launch->extents[e];
        if (address >= x.lo && address + size <= x.hi) {
            in = &x;
            break;
        }
        const uint64_t d = address < x.lo ? x.lo - address : address + size - x.hi;
        if (x.lo >= launch->heaps[h].lo && x.hi <= launch->heaps[h].hi && d < distance) {
            distance = d;
            near = &x;
        }
    }
    const char* what = write ? "store" : "load";
    if (in == nullptr) {
        if (near == nullptr) FAIL("out-of-bounds %s of %zu bytes at %p", what, size, (void*)address);
        if (address < near->lo)
            FAIL("out-of-bounds %s of %zu bytes at %p, %lu bytes before argument #%d", what, size, (void*)address,
                 (unsigned long)(near->lo - address), near->arg);
        FAIL("out-of-bounds %s of %zu bytes at %p, at byte %lu of argument #%d, which has %lu", what, size,
             (void*)address, (unsigned long)(address - near->lo), near->arg, (unsigned long)(near->hi - near->lo));
    }
    if (write && !in->writable)
        FAIL("store of %zu bytes at byte %lu of argument #%d, a read-only array", size,
             (unsigned long)(address - in->lo), in->arg);
    if (atomic) return;
    // Bytes this launch's blocks wrote and read (block + 1; -1 several readers).
    int32_t* writer = block_writer[h].data() + (address - launch->heaps[h].lo);
    int32_t* reader = block_reader[h].data() + (address - launch->heaps[h].lo);
    const int32_t me = block_id + 1;
    for (size_t k = 0; k < size; ++k) {
        const bool written = writer[k] != 0 && writer[k] != me, read = reader[k] != 0 && reader[k] != me;
        if (written || (write && read))
            FAIL("%s at byte %lu of argument #%d, which %s %s in this launch (blocks cannot synchronise)", what,
                 (unsigned long)(address + k - in->lo), in->arg,
                 written ? block_name(writer[k] - 1).c_str() : reader[k] < 0 ? "several blocks" : block_name(reader[k] - 1).c_str(),
                 written ? "writes" : "reads");
        if (write) writer[k] = me;
        else reader[k] = reader[k] == 0 || reader[k] == me ? me : -1;
    }
}

void check(const void* p, size_t size, bool write, bool atomic = false) {
    if (current == nullptr) return;  // only kernel code on a fiber is checked
    const uintptr_t address = (uintptr_t)p;
    if (address < kNullPage)
        FAIL("%s of %zu bytes at %p: a null pointer", write ? "store" : "load", size, p);
    if (address >= shared_lo && address < shared_hi) return check_shared(address, size, write);
    if (address < heap_lo || address >= heap_hi) return;
    for (int h = 0; h < launch->nheaps; ++h)
        if (address >= launch->heaps[h].lo && address < launch->heaps[h].hi) return check_global(h, address, size, write, atomic);
}

// ---------------------------------------------------------------------------
// Fatal signals during a launch
// ---------------------------------------------------------------------------

const int kSignals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL};
struct sigaction saved_actions[4];
stack_t saved_stack;
char signal_stack[1 << 16];

void on_fatal_signal(int signal, siginfo_t* info, void*) {
    const uintptr_t address = (uintptr_t)info->si_addr;
    const bool guard = current != nullptr && stacks != nullptr && address >= (uintptr_t)stacks &&
                       address < (uintptr_t)stacks + stacks_for * (kStack + 4096) &&
                       (address - (uintptr_t)stacks) % (kStack + 4096) < 4096;
    report("signal %d (%s) at address %p%s", signal, strsignal(signal), info->si_addr,
           guard ? ": a fiber stack overflowed (kStack in tests/emu/simt.cpp)" : "");
    siglongjmp(on_signal, 1);
}

void catch_signals(bool on) {
    if (on) {
        stack_t alt = {};
        alt.ss_sp = signal_stack;
        alt.ss_size = sizeof signal_stack;
        sigaltstack(&alt, &saved_stack);
        struct sigaction action = {};
        action.sa_sigaction = on_fatal_signal;
        action.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
        for (int i = 0; i < 4; ++i) sigaction(kSignals[i], &action, &saved_actions[i]);
    } else {
        for (int i = 0; i < 4; ++i) sigaction(kSignals[i], &saved_actions[i], nullptr);
        sigaltstack(&saved_stack, nullptr);
    }
}

bool reserve_stacks(size_t count) {
    if (count <= stacks_for) return true;
    if (stacks != nullptr) munmap(stacks, stacks_for * (kStack + 4096));
    const size_t bytes = count * (kStack + 4096);
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        stacks = nullptr;
        stacks_for = 0;
        return false;
    }
    stacks = (char*)p;
    stacks_for = count;
    for (size_t i = 0; i < count; ++i) mprotect(stacks + i * (kStack + 4096), 4096, PROT_NONE);
    return true;
}

}  // namespace

// ---------------------------------------------------------------------------
// The C interface: intrinsics called by kernel code, and the launch
// ---------------------------------------------------------------------------

extern "C" void __syncthreads(void) {
    Fiber* self = current;
    self->site = __builtin_return_address(0);
    check_no_warp_waits_for(self, "waits at __syncthreads()");
    self->state = AT_BARRIER;
    warp_of(self).at_barrier |= 1u << (self->linear & 31);
    yield();
}

extern "C" void __syncwarp(unsigned mask) { warp_sync(SYNCWARP, mask, 0, 0, 32, __builtin_return_address(0)); }

int __shfl_sync(unsigned mask, int var, int src_lane, int width) {
    return warp_sync(SHFL_IDX, mask, var, src_lane, width, __builtin_return_address(0));
}

int __shfl_xor_sync(unsigned mask, int var, int lane_mask, int width) {
    return warp_sync(SHFL_BFLY, mask, var, lane_mask, width, __builtin_return_address(0));
}

extern "C" int atomicExch(int* address, int value) {
    check(address, sizeof(int), true, true);
    const int old = *address;
    *address = value;
    return old;
}

extern "C" void fx_emu_vector_access(const void* p) {
    if (current != nullptr) FAIL("misaligned 16-byte access at %p%s", p, describe(p).c_str());
}

// The calls g++ -fsanitize=thread puts before every access of kernel code.
#define FX_EMU_ACCESS(size)                                                                  \
    extern "C" void __tsan_read##size(void* p) { check(p, size, false); }                   \
    extern "C" void __tsan_write##size(void* p) { check(p, size, true); }                   \
    extern "C" void __tsan_unaligned_read##size(void* p) { check(p, size, false); }         \
    extern "C" void __tsan_unaligned_write##size(void* p) { check(p, size, true); }
FX_EMU_ACCESS(1)
FX_EMU_ACCESS(2)
FX_EMU_ACCESS(4)
FX_EMU_ACCESS(8)
FX_EMU_ACCESS(16)
extern "C" void __tsan_read_range(void* p, size_t size) { check(p, size, false); }
extern "C" void __tsan_write_range(void* p, size_t size) { check(p, size, true); }
extern "C" void __tsan_init(void) {}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit(void) {}

// Runs the whole grid; returns 0, or 1 with the first error in launch->error.
extern "C" int fx_emu_launch(const Launch* l) {
    launch = l;
    failed = false;
    current = nullptr;
    block_id = 0;
    rng_state = l->seed;
    fx_emu_grid_dim = {l->grid[0], l->grid[1], l->grid[2]};
    fx_emu_block_dim = {l->block[0], l->block[1], l->block[2]};
    nthreads = (int)(l->block[0] * l->block[1] * l->block[2]);
    const uint64_t nblocks = (uint64_t)l->grid[0] * l->grid[1] * l->grid[2];
    if (nthreads < 1 || nthreads > 1024 || l->block[2] > 64) {
        report("block (%u,%u,%u): CUDA allows 1 to 1024 threads, z <= 64", l->block[0], l->block[1], l->block[2]);
        return 1;
    }
    if (nblocks < 1 || l->grid[0] > 0x7fffffffu || l->grid[1] > 65535 || l->grid[2] > 65535 || nblocks > (1u << 24)) {
        report("grid (%u,%u,%u): outside CUDA's limits or above the emulator's 2^24 blocks", l->grid[0], l->grid[1],
               l->grid[2]);
        return 1;
    }
    if (!reserve_stacks((size_t)nthreads)) {
        report("cannot map %d fiber stacks", nthreads);
        return 1;
    }
    fibers.assign((size_t)nthreads, Fiber{});
    warps.assign((size_t)(nthreads + 31) / 32, Warp{0, 0, 0});
    shared_lo = (uintptr_t)l->kernel->bss_lo;
    shared_hi = (uintptr_t)l->kernel->bss_hi;
    shared.assign(shared_hi - shared_lo, SharedByte{0, 0, 0, 0});
    heap_lo = ~(uintptr_t)0;
    heap_hi = 0;
    block_writer.assign((size_t)l->nheaps, {});
    block_reader.assign((size_t)l->nheaps, {});
    for (int h = 0; h < l->nheaps; ++h) {
        heap_lo = std::min(heap_lo, (uintptr_t)l->heaps[h].lo);
        heap_hi = std::max(heap_hi, (uintptr_t)l->heaps[h].hi);
        block_writer[h].assign(l->heaps[h].hi - l->heaps[h].lo, 0);
        block_reader[h].assign(l->heaps[h].hi - l->heaps[h].lo, 0);
    }
    std::vector<int> order((size_t)nblocks);
    for (size_t b = 0; b < order.size(); ++b) order[b] = (int)b;
    shuffle(order);
    catch_signals(true);
    if (sigsetjmp(on_signal, 1) == 0) {
        const Dim3& d = fx_emu_block_dim;
        for (int t = 0; t < nthreads; ++t) {
            fibers[t].linear = t;
            fibers[t].tid = {(unsigned)(t % d.x), (unsigned)(t / d.x % d.y), (unsigned)(t / (d.x * d.y))};
            make_fiber(fibers[t], t);
        }
        for (int b : order) {
            run_block(b);
            if (failed) break;
        }
    }
    catch_signals(false);
    current = nullptr;
    launch = nullptr;
    return failed ? 1 : 0;
}
