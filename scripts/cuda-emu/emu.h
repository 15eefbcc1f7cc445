// A tiny CPU emulation of the CUDA execution model, enough to run gradsift's kernels
// without a GPU, and a sanitizer for them (racecheck, synccheck, memcheck, initcheck).
//
// Execution: every thread of a block is a fiber on one OS thread (a 20-instruction stack
// switch on x86-64, ucontext elsewhere: glibc's swapcontext costs a syscall per switch); __syncthreads
// and the warp intrinsics are barriers that yield to a scheduler (warp intrinsics exchange
// through per-warp slots between two warp barriers); atomics are __atomic builtins. Blocks
// run one after another, so `static` (in a section of its own, "emu_shared") stands in for
// __shared__. The schedule is either fixed (blocks in order, threads round-robin) or, with
// emu_schedule_random(seed), seeded random: blocks in a random order, the threads of a
// block resumed in a fresh random order on every pass (so warps run out of lockstep, as on
// Volta and later) and a thread may be preempted at any atomic.
//
// Sanitizer: the harness is compiled with -fsanitize=thread but linked WITHOUT the TSan
// runtime: GCC then calls __tsan_read4(addr) / __tsan_write8(addr) / __tsan_read_range ...
// before every memory access of the compiled code, and this header defines those hooks.
// The kernels compile unchanged. While a kernel's thread runs, every access is classified:
//   - the fibers' stacks (registers and locals), the kernel parameters (copied to a param
//     block) and the special registers (threadIdx...) are ignored;
//   - the "emu_shared" section is shared memory: poisoned at each block start;
//   - a device allocation registered by the harness with emu_dev(); anything else, or an
//     access running past the end of its allocation, is a memcheck error.
// Per 4-byte granule the shadow keeps an init bit (initcheck: reading a granule that no
// kernel and no host copy/memset wrote is an error) and the last writer, two readers and
// two atomic accessors of the current epoch (racecheck). Two accesses of different threads
// conflict when one is a non-atomic write (or a plain access meets an atomic one) and they
// are not ordered: shared memory, same barrier interval of the block; global memory, same
// launch and either different blocks or the same block's same barrier interval
// (__syncthreads orders a block's global accesses too; launches are ordered).
// Synccheck: a __syncthreads completed while threads of the block had exited, threads of
// a block waiting at different __syncthreads, a warp intrinsic whose mask differs from the
// lanes that call it, and any deadlock (threads waiting for ones that never arrive).
// Every report names the kernel, the source line (addr2line on the binary) and the threads.
#pragma once
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cxxabi.h>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <ucontext.h>
#include <unistd.h>
#include <unordered_map>
#include <vector>

#define EMU_NS __attribute__((no_sanitize_thread))
#define EMU_NOINLINE __attribute__((noinline))
#define EMU_PC() ((uintptr_t)__builtin_return_address(0))

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

// Special registers live in one object the sanitizer ignores.
struct EmuRegs {
    dim3 tid, bid, bdim, gdim;
};
inline EmuRegs emu_regs;
#define threadIdx (emu_regs.tid)
#define blockIdx (emu_regs.bid)
#define blockDim (emu_regs.bdim)
#define gridDim (emu_regs.gdim)

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(n)

// ---- sanitizer state ---------------------------------------------------------------------

enum EmuKind { EMU_RACE = 0, EMU_SYNC = 1, EMU_MEM = 2, EMU_INIT = 3, EMU_NKINDS = 4 };
inline const char* const emu_kind_name[] = {"racecheck", "synccheck", "memcheck", "initcheck"};

constexpr uint32_t EMU_STRONG_READ = 0x80000000u;  // in EmuSlot::pc, see emu_access
struct EmuSlot {
    uint32_t tid = ~0u, iv = 0, pc = 0;  // global thread id, barrier interval, pc index
};
struct EmuCell {
    uint32_t epoch = 0;
    EmuSlot w, r1, r2, a1, a2;
};
struct EmuRegion {
    uintptr_t lo = 0, hi = 0;
    std::string name;
    std::vector<uint8_t> init;  // per granule
    std::vector<EmuCell> cells;  // per granule, allocated on first use by a kernel
    bool shared = false;
};

struct EmuSan {
    bool checks = true;  // the sanitizer's checks (off: plain emulation)
    bool active = false;  // a kernel thread is running
    int quiet = 0;  // inside the emulation's own code
    std::map<uintptr_t, EmuRegion> regions;  // by lo
    EmuRegion* last = nullptr;
    std::vector<EmuRegion*> shared;  // every __shared__ variable (a region each)
    bool shared_found = false;
    uintptr_t stack_lo = 0, stack_hi = 0, param_lo = 0, param_hi = 0;
    uint32_t launch_epoch = 0, block_epoch = 0, iv = 0, cur_tid = 0;
    const char* kernel = "?";
    unsigned long count[EMU_NKINDS] = {};
    std::set<std::tuple<int, uintptr_t, uintptr_t>> seen;
    unsigned printed = 0;
    std::vector<uintptr_t> pcs{0};
    std::unordered_map<uintptr_t, uint32_t> pc_index;
    // schedule
    bool random = false;
    std::mt19937_64 rng;
    unsigned long progress = 0;
};
inline EmuSan emu_san;

struct EmuQuiet {
    EMU_NS EmuQuiet() { ++emu_san.quiet; }
    EMU_NS ~EmuQuiet() { --emu_san.quiet; }
};

EMU_NS inline void emu_schedule_fixed() { emu_san.random = false; }
EMU_NS inline void emu_schedule_random(uint64_t seed) {
    emu_san.random = true;
    emu_san.rng.seed(seed);
}

EMU_NS inline uint32_t emu_pc_id(uintptr_t pc) {
    auto it = emu_san.pc_index.find(pc);
    if (it != emu_san.pc_index.end()) return it->second;
    uint32_t id = (uint32_t)emu_san.pcs.size();
    emu_san.pcs.push_back(pc);
    emu_san.pc_index.emplace(pc, id);
    return id;
}

// "file:line (function)" of a return address, innermost inline frame first.
EMU_NS inline std::string emu_where(uintptr_t pc) {
    static std::unordered_map<uintptr_t, std::string> cache;
    if (!pc) return "?";
    auto it = cache.find(pc);
    if (it != cache.end()) return it->second;
    char cmd[128];
    snprintf(cmd, sizeof cmd, "addr2line -C -i -f -e /proc/%d/exe 0x%lx 2>/dev/null", (int)getpid(),
             (unsigned long)(pc - 1));
    std::string out, fn;
    if (FILE* f = popen(cmd, "r")) {
        char line[1024];
        int n = 0;
        while (fgets(line, sizeof line, f)) {
            std::string s(line);
            while (!s.empty() && (s.back() == '\n' || s.back() == '\r')) s.pop_back();
            if (n % 2 == 0) {
                fn = s.substr(0, s.find('('));
            } else if (n < 6) {
                auto k = s.find(" (discriminator");
                if (k != std::string::npos) s.resize(k);
                auto sl = s.rfind("kernels/");
                if (sl == std::string::npos) sl = s.rfind('/') == std::string::npos ? 0 : s.rfind('/') + 1;
                out += (n > 1 ? " <- " : "") + s.substr(sl) + " (" + fn + ")";
            }
            ++n;
        }
        pclose(f);
    }
    if (out.empty()) {
        char b[32];
        snprintf(b, sizeof b, "pc 0x%lx", (unsigned long)pc);
        out = b;
    }
    return cache[pc] = out;
}

EMU_NS inline std::string emu_thread(uint32_t tid) {
    if (tid == ~0u) return "?";
    char b[64];
    snprintf(b, sizeof b, "block %u thread %u", tid / emu_regs.bdim.x, tid % emu_regs.bdim.x);
    return b;
}

// Counts an error; prints the first of each (kind, place, place) and at most 40 in all.
EMU_NS inline void emu_report(int kind, uintptr_t pc1, uintptr_t pc2, const std::string& msg) {
    ++emu_san.count[kind];
    if (!emu_san.seen.insert({kind, pc1, pc2}).second) return;
    if (++emu_san.printed > 40) return;
    printf("SANITIZER %s: kernel %s: %s\n", emu_kind_name[kind], emu_san.kernel, msg.c_str());
    fflush(stdout);
}

// Errors so far (all kinds); `emu_san_errors() - before` is a case's count.
EMU_NS inline unsigned long emu_san_errors() {
    unsigned long s = 0;
    for (auto c : emu_san.count) s += c;
    return s;
}

// ---- device allocations --------------------------------------------------------------------

// Registers [p, p + bytes) as a device allocation named `name`. init: its contents were
// written by the host (a copy or a memset), otherwise it is poisoned until a kernel writes
// it. Registering the same range again (a fresh memset/copy) re-marks it initialised.
EMU_NS inline void emu_dev_bytes(const void* p, size_t bytes, const char* name, bool init = true) {
    EmuQuiet q;
    uintptr_t lo = (uintptr_t)p, hi = lo + std::max<size_t>(bytes, 1);
    emu_san.last = nullptr;
    auto it = emu_san.regions.find(lo);
    if (it != emu_san.regions.end() && it->second.hi == hi) {
        it->second.name = name;
        if (init) std::fill(it->second.init.begin(), it->second.init.end(), 1);
        return;
    }
    // Drop every stale allocation overlapping the new one (the host freed it).
    for (auto j = emu_san.regions.begin(); j != emu_san.regions.end();) {
        if (j->second.lo < hi && lo < j->second.hi) j = emu_san.regions.erase(j);
        else ++j;
    }
    EmuRegion& r = emu_san.regions[lo];
    r.lo = lo;
    r.hi = hi;
    r.name = name;
    r.init.assign((hi - lo + 3) / 4, init ? 1 : 0);
}
template <typename T>
EMU_NS inline void emu_dev(const T* p, size_t count, const char* name, bool init = true) {
    emu_dev_bytes(p, count * sizeof(T), name, init);
}
EMU_NS inline void emu_dev_forget() {
    EmuQuiet q;
    for (auto j = emu_san.regions.begin(); j != emu_san.regions.end();) {
        if (!j->second.shared) j = emu_san.regions.erase(j);
        else ++j;
    }
    emu_san.last = nullptr;
}

// `static` stands in for __shared__, so the kernels' shared variables are the function-local
// statics of the binary (mangled _ZZ...) outside the emulation's own functions: found once
// in the symbol table, each becomes a region of its own (so shared accesses are
// bounds-checked per variable).
EMU_NS inline void emu_find_shared() {
    EmuQuiet q;
    EmuSan& S = emu_san;
    if (S.shared_found) return;
    S.shared_found = true;
    char cmd[128];
    snprintf(cmd, sizeof cmd, "nm -S --defined-only /proc/%d/exe 2>/dev/null", (int)getpid());
    FILE* f = popen(cmd, "r");
    if (!f) return;
    char line[2048];
    while (fgets(line, sizeof line, f)) {
        unsigned long addr, size;
        char type, name[1800];
        if (sscanf(line, "%lx %lx %c %1799s", &addr, &size, &type, name) != 4) continue;
        if (strncmp(name, "_ZZ", 3) != 0 || strstr(name, "emu_") || !strchr("bBdDvVuU", type)) continue;
        int st = 0;
        char* dm = abi::__cxa_demangle(name, nullptr, nullptr, &st);
        std::string n = st == 0 && dm ? dm : name;
        free(dm);
        if (n.rfind("std::", 0) == 0 || n.rfind("__", 0) == 0 || n.find("::__") != std::string::npos) continue;
        // "void f<float>(Args const&)::hist" -> "f<float>::hist"
        auto paren = n.find('(');
        auto sep = n.rfind("::");
        if (paren != std::string::npos && sep != std::string::npos && sep > paren) n = n.substr(0, paren) + n.substr(sep);
        if (n.rfind("void ", 0) == 0) n = n.substr(5);
        EmuRegion& r = S.regions[addr];
        r.lo = addr;
        r.hi = addr + std::max(size, 1ul);
        r.name = n;
        r.shared = true;
        r.init.assign((r.hi - r.lo + 3) / 4, 0);
        r.cells.assign(r.init.size(), EmuCell{});
        S.shared.push_back(&r);
    }
    pclose(f);
}

EMU_NS inline EmuRegion* emu_region_of(uintptr_t a) {
    EmuRegion* l = emu_san.last;
    if (l && a >= l->lo && a < l->hi) return l;
    auto it = emu_san.regions.upper_bound(a);
    if (it == emu_san.regions.begin()) return nullptr;
    --it;
    if (a >= it->second.hi) return nullptr;
    return emu_san.last = &it->second;
}

EMU_NS inline bool emu_conflicts(const EmuSlot& s, const EmuSlot& c, uint32_t bdim) {
    return s.tid != ~0u && s.tid != c.tid && (s.tid / bdim != c.tid / bdim || s.iv == c.iv);
}

// Keeps a concurrent accessor per slot pair: a slot of the same thread, or one ordered
// before `c` (same block, earlier interval), is replaced.
EMU_NS inline void emu_remember(EmuSlot& s1, EmuSlot& s2, const EmuSlot& c, uint32_t bdim) {
    auto stale = [&](const EmuSlot& s) {
        return s.tid == ~0u || s.tid == c.tid || (s.tid / bdim == c.tid / bdim && s.iv != c.iv);
    };
    if (stale(s1)) s1 = c;
    else if (stale(s2)) s2 = c;
}

EMU_NS inline void emu_race(const EmuRegion& r, uintptr_t addr, const char* what, const EmuSlot& other,
                            const char* other_what, const EmuSlot& c) {
    uintptr_t p1 = emu_san.pcs[c.pc & ~EMU_STRONG_READ], p2 = emu_san.pcs[other.pc & ~EMU_STRONG_READ];
    char b[256];
    snprintf(b, sizeof b, "%s race on %s+%lu: ", r.shared ? "shared" : "global", r.name.c_str(),
             (unsigned long)(addr - r.lo));
    emu_report(EMU_RACE, p1, p2,
               std::string(b) + what + " by " + emu_thread(c.tid) + " at " + emu_where(p1) + " vs " + other_what +
                   " by " + emu_thread(other.tid) + " at " + emu_where(p2));
}

// kind: 0 read, 1 write, 2 atomic read-modify-write, 3 volatile read, 4 volatile write.
EMU_NS inline void emu_access(uintptr_t addr, size_t size, int kind, uintptr_t pc) {
    EmuSan& S = emu_san;
    if (!S.active || S.quiet || !S.checks || size == 0) return;
    if (addr >= S.stack_lo && addr < S.stack_hi) return;
    if (addr >= S.param_lo && addr < S.param_hi) return;
    if (addr >= (uintptr_t)&emu_regs && addr < (uintptr_t)(&emu_regs + 1)) return;
    EmuQuiet quiet;  // the checks' own (instrumented) library code
    EmuRegion* r = emu_region_of(addr);
    static const char* const kn[] = {"read", "write", "atomic", "volatile read", "volatile write"};
    if (!r || addr + size > r->hi) {
        char b[256];
        if (r) {
            snprintf(b, sizeof b, "%s of %zu bytes at %s+%lu runs past its end (%lu bytes)", kn[kind], size,
                     r->name.c_str(), (unsigned long)(addr - r->lo), (unsigned long)(r->hi - r->lo));
        } else {
            // Name the allocation just below, the usual victim of an off-by-one.
            auto it = S.regions.upper_bound(addr);
            std::string near = "no allocation";
            if (it != S.regions.begin()) {
                --it;
                char n[160];
                snprintf(n, sizeof n, "%lu bytes past the end of %s", (unsigned long)(addr - it->second.hi),
                         it->second.name.c_str());
                near = n;
            }
            snprintf(b, sizeof b, "%s of %zu bytes at 0x%lx outside every allocation (%s)", kn[kind], size,
                     (unsigned long)addr, near.c_str());
        }
        emu_report(EMU_MEM, pc, 0, std::string(b) + " by " + emu_thread(S.cur_tid) + " at " + emu_where(pc));
        return;
    }
    const bool sh = r->shared;
    const uint32_t epoch = sh ? S.block_epoch : S.launch_epoch;
    const uint32_t bdim = emu_regs.bdim.x;
    if (r->cells.empty()) r->cells.resize(r->init.size());
    EmuSlot c{S.cur_tid, S.iv, emu_pc_id(pc)};
    for (size_t g = (addr - r->lo) / 4, g1 = (addr + size - 1 - r->lo) / 4; g <= g1; ++g) {
        if (kind != 1 && kind != 4 && !r->init[g]) {
            char b[200];
            snprintf(b, sizeof b, "%s of uninitialised %s memory %s+%lu by ", kn[kind], sh ? "shared" : "global",
                     r->name.c_str(), (unsigned long)(g * 4));
            emu_report(EMU_INIT, pc, 0, std::string(b) + emu_thread(c.tid) + " at " + emu_where(pc));
            r->init[g] = 1;  // once per word
        }
        if (kind != 0 && kind != 3) r->init[g] = 1;
        EmuCell& cell = r->cells[g];
        if (cell.epoch != epoch) cell = EmuCell{epoch};
        const uintptr_t a = r->lo + 4 * g;
        // Atomic slots hold atomics and volatile accesses (strong, in PTX's terms: two
        // strong accesses never race); EMU_STRONG_READ marks a volatile read among them.
        auto writes = [](const EmuSlot& s) { return !(s.pc & EMU_STRONG_READ); };
        if (kind == 0) {
            if (emu_conflicts(cell.w, c, bdim)) emu_race(*r, a, "read", cell.w, "write", c);
            else if (writes(cell.a1) && emu_conflicts(cell.a1, c, bdim)) emu_race(*r, a, "read", cell.a1, "atomic", c);
            else if (writes(cell.a2) && emu_conflicts(cell.a2, c, bdim)) emu_race(*r, a, "read", cell.a2, "atomic", c);
            emu_remember(cell.r1, cell.r2, c, bdim);
        } else if (kind == 1) {
            if (emu_conflicts(cell.w, c, bdim)) emu_race(*r, a, "write", cell.w, "write", c);
            else if (emu_conflicts(cell.r1, c, bdim)) emu_race(*r, a, "write", cell.r1, "read", c);
            else if (emu_conflicts(cell.r2, c, bdim)) emu_race(*r, a, "write", cell.r2, "read", c);
            else if (emu_conflicts(cell.a1, c, bdim)) emu_race(*r, a, "write", cell.a1, "atomic/volatile", c);
            else if (emu_conflicts(cell.a2, c, bdim)) emu_race(*r, a, "write", cell.a2, "atomic/volatile", c);
            cell.w = c;
        } else {
            const char* what = kind == 2 ? "atomic" : kind == 3 ? "volatile read" : "volatile write";
            if (emu_conflicts(cell.w, c, bdim)) emu_race(*r, a, what, cell.w, "write", c);
            else if (kind != 3 && emu_conflicts(cell.r1, c, bdim)) emu_race(*r, a, what, cell.r1, "read", c);
            else if (kind != 3 && emu_conflicts(cell.r2, c, bdim)) emu_race(*r, a, what, cell.r2, "read", c);
            EmuSlot cs = c;
            if (kind == 3) cs.pc |= EMU_STRONG_READ;
            emu_remember(cell.a1, cell.a2, cs, bdim);
        }
    }
}

// The hooks GCC's -fsanitize=thread instrumentation calls (no TSan runtime is linked).
extern "C" {
#define EMU_TSAN_HOOKS(n)                                                                              \
    EMU_NS void __tsan_read##n(void* a) { emu_access((uintptr_t)a, n, 0, EMU_PC()); }                 \
    EMU_NS void __tsan_write##n(void* a) { emu_access((uintptr_t)a, n, 1, EMU_PC()); }                \
    EMU_NS void __tsan_unaligned_read##n(void* a) { emu_access((uintptr_t)a, n, 0, EMU_PC()); }       \
    EMU_NS void __tsan_unaligned_write##n(void* a) { emu_access((uintptr_t)a, n, 1, EMU_PC()); }      \
    EMU_NS void __tsan_volatile_read##n(void* a) { emu_access((uintptr_t)a, n, 3, EMU_PC()); }        \
    EMU_NS void __tsan_volatile_write##n(void* a) { emu_access((uintptr_t)a, n, 4, EMU_PC()); }
EMU_TSAN_HOOKS(1)
EMU_TSAN_HOOKS(2)
EMU_TSAN_HOOKS(4)
EMU_TSAN_HOOKS(8)
EMU_TSAN_HOOKS(16)
EMU_NS void __tsan_read_range(void* a, unsigned long n) { emu_access((uintptr_t)a, n, 0, EMU_PC()); }
EMU_NS void __tsan_write_range(void* a, unsigned long n) { emu_access((uintptr_t)a, n, 1, EMU_PC()); }
EMU_NS void __tsan_init() {}
EMU_NS void __tsan_func_entry(void*) {}
EMU_NS void __tsan_func_exit() {}
EMU_NS void __tsan_vptr_update(void**, void*) {}
EMU_NS void __tsan_vptr_read(void**) {}
}

// ---- fibers and the scheduler --------------------------------------------------------------

struct EmuGroup {
    unsigned size = 0, arrived = 0, gen = 0, done = 0;
    uintptr_t pc = 0;  // where the first arrival waits
    uint32_t first = 0;  // and who
    uint32_t lanes = 0, masks[32] = {};  // warps: arrived lanes and their masks
    bool masked = false;
};
// Fiber contexts. x86-64: callee-saved registers, x87 control word and MXCSR pushed on the
// fiber's own stack, the stack pointer saved in `sp`.
#if defined(__x86_64__)
extern "C" void emu_ctx_switch(void** save_sp, void* to_sp);
asm(R"(
    .text
    .globl emu_ctx_switch
    .type emu_ctx_switch, @function
emu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $16, %rsp
    fnstcw (%rsp)
    stmxcsr 8(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    fldcw (%rsp)
    ldmxcsr 8(%rsp)
    addq $16, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_ctx_switch, .-emu_ctx_switch
)");
struct EmuCtx {
    void* sp = nullptr;
};
EMU_NS inline void emu_switch(EmuCtx& from, EmuCtx& to) { emu_ctx_switch(&from.sp, to.sp); }
// A fresh context that starts in fn() on [stack, stack + size).
EMU_NS inline void emu_ctx_make(EmuCtx& c, char* stack, size_t size, void (*fn)()) {
    uintptr_t top = ((uintptr_t)stack + size) & ~(uintptr_t)15;
    uint64_t* sp = (uint64_t*)(top - 80);
    std::memset(sp, 0, 80);
    sp[0] = 0x037F;  // x87 control word
    sp[1] = 0x1F80;  // MXCSR
    sp[8] = (uint64_t)fn;  // returned to with rsp = top - 8, as after a call
    c.sp = sp;
}
#else
struct EmuCtx {
    ucontext_t uc;
};
EMU_NS inline void emu_switch(EmuCtx& from, EmuCtx& to) { swapcontext(&from.uc, &to.uc); }
EMU_NS inline void emu_ctx_make(EmuCtx& c, char* stack, size_t size, void (*fn)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, fn, 0);
}
#endif

struct EmuFiber {
    EmuCtx ctx;
    dim3 tid;
    bool done = false;
    int quiet = 0;  // emu_san.quiet while this fiber is suspended
    EmuGroup* wait = nullptr;
    uintptr_t wait_pc = 0;
};
struct EmuBlock {
    std::vector<EmuFiber> fibers;
    EmuGroup block;
    std::vector<EmuGroup> warps;
    std::vector<std::array<uint64_t, 32>> slots;
    EmuCtx sched;
    bool abandoned = false;
};
inline EmuBlock* emu_block = nullptr;
inline EmuFiber* emu_cur = nullptr;

EMU_NS inline void emu_yield() { emu_switch(emu_cur->ctx, emu_block->sched); }

EMU_NS inline unsigned emu_lane() { return emu_regs.tid.x & 31u; }
EMU_NS inline unsigned emu_warp() { return emu_regs.tid.x >> 5; }

// Completes a group whose live members have all arrived.
EMU_NS inline void emu_complete(EmuGroup& g, bool is_block) {
    if (g.done && emu_san.checks) {
        char b[200];
        snprintf(b, sizeof b, "%s reached by %u of %u threads: %u exited without it; first waiter %s at ",
                 is_block ? "__syncthreads" : "warp intrinsic", g.arrived, g.size, g.done,
                 emu_thread(g.first).c_str());
        emu_report(EMU_SYNC, g.pc, 1, b + emu_where(g.pc));
    }
    if (g.masked && emu_san.checks) {
        for (unsigned l = 0; l < 32; ++l) {
            if (!((g.lanes >> l) & 1u) || g.masks[l] == g.lanes) continue;
            char b[200];
            snprintf(b, sizeof b, "warp intrinsic called with mask 0x%08x by lane %u but lanes 0x%08x call it; %s at ",
                     g.masks[l], l, g.lanes, emu_thread(g.first - (g.first & 31u) + l).c_str());
            emu_report(EMU_SYNC, g.pc, 2, b + emu_where(g.pc));
            break;
        }
    }
    g.arrived = 0;
    g.lanes = 0;
    g.masked = false;
    ++g.gen;
    ++emu_san.progress;
    if (is_block) ++emu_san.iv;
}

EMU_NS inline void emu_arrive(EmuGroup& g, uintptr_t pc, bool is_block, bool masked = false, unsigned mask = 0) {
    EmuQuiet q;
    const unsigned my = g.gen;
    ++emu_san.progress;
    if (g.arrived == 0) {
        g.pc = pc;
        g.first = emu_san.cur_tid;
    } else if (pc != g.pc && emu_san.checks && emu_where(pc) != emu_where(g.pc)) {
        std::string m = std::string(is_block ? "threads of a block wait at different __syncthreads"
                                             : "lanes of a warp wait at different intrinsics") +
                        ": " + emu_thread(emu_san.cur_tid) + " at " + emu_where(pc) + " vs " +
                        emu_thread(g.first) + " at " + emu_where(g.pc);
        emu_report(EMU_SYNC, pc, g.pc, m);
    }
    if (masked) {
        g.masked = true;
        g.lanes |= 1u << emu_lane();
        g.masks[emu_lane()] = mask;
    }
    if (++g.arrived + g.done == g.size) {
        emu_complete(g, is_block);
        return;
    }
    emu_cur->wait = &g;
    emu_cur->wait_pc = pc;
    while (g.gen == my && !emu_block->abandoned) emu_yield();
    emu_cur->wait = nullptr;
}

EMU_NOINLINE EMU_NS inline void __syncthreads() { emu_arrive(emu_block->block, EMU_PC(), true); }

template <typename T>
EMU_NS inline uint64_t emu_bits(T v) {
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <typename T>
EMU_NS inline T emu_from(uint64_t b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}

// Every lane publishes, all wait, each reads lane `src`, all wait again (slot reuse).
template <typename T>
EMU_NS inline T emu_shfl(unsigned mask, T v, int src, bool valid, uintptr_t pc) {
    EmuQuiet q;
    auto& slot = emu_block->slots[emu_warp()];
    auto& bar = emu_block->warps[emu_warp()];
    slot[emu_lane()] = emu_bits(v);
    emu_arrive(bar, pc, false, true, mask);
    T r = valid ? emu_from<T>(slot[src & 31]) : v;
    emu_arrive(bar, pc, false);
    return r;
}
template <typename T>
EMU_NOINLINE EMU_NS T __shfl_up_sync(unsigned mask, T v, unsigned o) {
    int l = (int)emu_lane();
    return emu_shfl(mask, v, l - (int)o, l >= (int)o, EMU_PC());
}
template <typename T>
EMU_NOINLINE EMU_NS T __shfl_down_sync(unsigned mask, T v, unsigned o) {
    int l = (int)emu_lane();
    return emu_shfl(mask, v, l + (int)o, l + (int)o < 32, EMU_PC());
}
template <typename T>
EMU_NOINLINE EMU_NS T __shfl_sync(unsigned mask, T v, int src) {
    return emu_shfl(mask, v, src, true, EMU_PC());
}
EMU_NOINLINE EMU_NS inline unsigned __ballot_sync(unsigned mask, bool p) {
    EmuQuiet q;
    const uintptr_t pc = EMU_PC();
    auto& slot = emu_block->slots[emu_warp()];
    auto& bar = emu_block->warps[emu_warp()];
    slot[emu_lane()] = p ? 1 : 0;
    emu_arrive(bar, pc, false, true, mask);
    unsigned m = 0;
    for (unsigned i = 0; i < bar.size; ++i) m |= (unsigned)slot[i] << i;
    emu_arrive(bar, pc, false);
    return m & mask;
}

// Atomics: recorded as such, and in a random schedule a preemption point.
EMU_NS inline void emu_atomic_point(const void* p, size_t size, uintptr_t pc) {
    emu_access((uintptr_t)p, size, 2, pc);
    EmuQuiet q;
    if (emu_san.random && emu_block && (emu_san.rng() & 1)) {
        ++emu_san.progress;
        emu_yield();
    }
}
EMU_NOINLINE EMU_NS inline unsigned atomicAdd(unsigned* p, unsigned v) {
    emu_atomic_point(p, 4, EMU_PC());
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
EMU_NOINLINE EMU_NS inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    emu_atomic_point(p, 8, EMU_PC());
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
EMU_NOINLINE EMU_NS inline unsigned atomicOr(unsigned* p, unsigned v) {
    emu_atomic_point(p, 4, EMU_PC());
    return __atomic_fetch_or(p, v, __ATOMIC_RELAXED);
}
EMU_NOINLINE EMU_NS inline unsigned atomicAnd(unsigned* p, unsigned v) {
    emu_atomic_point(p, 4, EMU_PC());
    return __atomic_fetch_and(p, v, __ATOMIC_RELAXED);
}
EMU_NOINLINE EMU_NS inline unsigned atomicMin(unsigned* p, unsigned v) {
    emu_atomic_point(p, 4, EMU_PC());
    unsigned cur = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (v < cur && !__atomic_compare_exchange_n(p, &cur, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return cur;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
inline unsigned __float_as_uint(float f) {
    unsigned u;
    __builtin_memcpy(&u, &f, 4);
    return u;
}
inline float __int_as_float(int i) {
    float f;
    __builtin_memcpy(&f, &i, 4);
    return f;
}
inline double __longlong_as_double(long long i) {
    double d;
    __builtin_memcpy(&d, &i, 8);
    return d;
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __uint_as_float(unsigned u) {
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}
using std::fabs;
using std::fmax;
inline float fabsf(float x) { return std::fabs(x); }
inline float fmaxf(float a, float b) { return std::fmax(a, b); }
inline float fminf(float a, float b) { return std::fmin(a, b); }
inline float copysignf(float a, float b) { return std::copysign(a, b); }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }

// ---- launches ------------------------------------------------------------------------------

constexpr size_t EMU_STACK = 128 * 1024;
constexpr unsigned EMU_MAX_THREADS = 1024;

template <typename A>
struct EmuEntry {
    static inline void (*kernel)(A) = nullptr;
    static inline const A* args = nullptr;
    EMU_NS static void run() {
        kernel(*args);
        emu_cur->done = true;
        emu_yield();  // never resumed
        abort();
    }
};

EMU_NS inline void emu_deadlock(EmuBlock& eb) {
    std::map<uintptr_t, std::pair<unsigned, uint32_t>> at;  // pc -> (threads, first)
    unsigned live = 0;
    for (auto& f : eb.fibers) {
        if (f.done) continue;
        ++live;
        auto& e = at[f.wait_pc];
        if (e.first++ == 0) e.second = blockIdx.x * blockDim.x + f.tid.x;
    }
    std::string m = "deadlock: " + std::to_string(live) + " threads wait forever:";
    for (auto& [pc, e] : at)
        m += " " + std::to_string(e.first) + " (e.g. " + emu_thread(e.second) + ") at " + emu_where(pc) + ";";
    emu_report(EMU_SYNC, at.begin()->first, 3, m);
}

// Launches `kernel(args)` over grid x block; `name` names it in reports.
template <typename A>
EMU_NS inline void emu_launch_named(const char* name, void (*kernel)(A), unsigned grid, unsigned block,
                                    const A& args) {
    static_assert(std::is_trivially_copyable_v<A>);
    EmuQuiet q;
    if (grid == 0) return;
    if (block > EMU_MAX_THREADS) abort();
    static char* stacks = new char[EMU_MAX_THREADS * EMU_STACK];
    EmuSan& S = emu_san;
    S.kernel = name;
    S.stack_lo = (uintptr_t)stacks;
    S.stack_hi = S.stack_lo + EMU_MAX_THREADS * EMU_STACK;
    emu_find_shared();
    ++S.launch_epoch;
    // The kernel parameters: a copy, in "param space" the checks ignore.
    std::unique_ptr<A> param(new A(args));
    S.param_lo = (uintptr_t)param.get();
    S.param_hi = S.param_lo + sizeof(A);
    emu_regs.gdim = {grid, 1, 1};
    emu_regs.bdim = {block, 1, 1};
    EmuEntry<A>::kernel = kernel;
    EmuEntry<A>::args = param.get();
    std::vector<unsigned> order(grid);
    for (unsigned b = 0; b < grid; ++b) order[b] = b;
    if (S.random) std::shuffle(order.begin(), order.end(), S.rng);
    std::vector<unsigned> pass;
    for (unsigned b : order) {
        EmuBlock eb;
        eb.fibers.resize(block);
        eb.block.size = block;
        unsigned nw = (block + 31) / 32;
        eb.warps.resize(nw);
        for (unsigned w = 0; w < nw; ++w) eb.warps[w].size = std::min(32u, block - 32 * w);
        eb.slots.resize(nw);
        emu_block = &eb;
        emu_regs.bid = {b, 0, 0};
        ++S.block_epoch;
        S.iv = 0;
        // Shared memory starts as garbage, poisoned.
        for (EmuRegion* r : S.shared) {
            memset((void*)r->lo, 0xA5, r->hi - r->lo);
            std::fill(r->init.begin(), r->init.end(), 0);
        }
        for (unsigned t = 0; t < block; ++t) {
            EmuFiber& f = eb.fibers[t];
            f.tid = {t, 0, 0};
            emu_ctx_make(f.ctx, stacks + (size_t)t * EMU_STACK, EMU_STACK, EmuEntry<A>::run);
        }
        pass.resize(block);
        for (unsigned t = 0; t < block; ++t) pass[t] = t;
        for (bool live = true; live;) {
            live = false;
            if (S.random) std::shuffle(pass.begin(), pass.end(), S.rng);
            const unsigned long before = S.progress;
            for (unsigned t : pass) {
                EmuFiber& f = eb.fibers[t];
                if (f.done) continue;
                emu_cur = &f;
                emu_regs.tid = f.tid;
                S.cur_tid = b * block + t;
                const int q0 = S.quiet;
                S.quiet = f.quiet;
                S.active = true;
                emu_switch(eb.sched, f.ctx);
                S.active = false;
                f.quiet = S.quiet;
                S.quiet = q0;
                if (f.done) {
                    ++S.progress;
                    // An exit may complete the barriers the others wait at (with an error).
                    eb.block.done++;
                    if (eb.block.arrived && eb.block.arrived + eb.block.done == eb.block.size)
                        emu_complete(eb.block, true);
                    EmuGroup& w = eb.warps[t >> 5];
                    w.done++;
                    if (w.arrived && w.arrived + w.done == w.size) emu_complete(w, false);
                }
                live |= !f.done;
            }
            if (live && S.progress == before) {
                emu_deadlock(eb);
                // Abandon the block: wake every waiter so its fiber can unwind... it cannot
                // (it would run on), so simply drop the fibers; their stacks are reused.
                break;
            }
        }
        emu_block = nullptr;
        emu_cur = nullptr;
    }
    S.param_lo = S.param_hi = 0;
}
#define emu_launch(kernel, ...) emu_launch_named(#kernel, kernel, __VA_ARGS__)

// ---- command line shared by the harnesses --------------------------------------------------
// [quick] [--schedule fixed|random] [--seeds N] [--seed0 S] [--only SUBSTRING] [--no-checks]
struct EmuOpts {
    bool quick = false;
    bool random = false;
    unsigned seeds = 1;
    uint64_t seed0 = 1;
    std::string only;
};
inline EmuOpts emu_opts;
EMU_NS inline void emu_parse_args(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        auto next = [&]() -> std::string {
            if (i + 1 >= argc) {
                fprintf(stderr, "%s needs a value\n", a.c_str());
                exit(2);
            }
            return argv[++i];
        };
        if (a == "quick") emu_opts.quick = true;
        else if (a == "--schedule") emu_opts.random = next() == "random";
        else if (a == "--seeds") emu_opts.seeds = (unsigned)std::stoul(next());
        else if (a == "--seed0") emu_opts.seed0 = std::stoull(next());
        else if (a == "--only") emu_opts.only = next();
        else if (a == "--no-checks") emu_san.checks = false;
        else {
            fprintf(stderr, "unknown argument %s\n", a.c_str());
            exit(2);
        }
    }
}
// The schedules every case runs under: the fixed one, or --seeds random ones.
EMU_NS inline std::vector<std::pair<std::string, uint64_t>> emu_schedules() {
    if (!emu_opts.random) return {{"", 0}};
    std::vector<std::pair<std::string, uint64_t>> v;
    for (unsigned s = 0; s < emu_opts.seeds; ++s)
        v.push_back({" [random schedule seed " + std::to_string(emu_opts.seed0 + s) + "]", emu_opts.seed0 + s});
    return v;
}
EMU_NS inline void emu_use_schedule(uint64_t seed) {
    if (emu_opts.random) emu_schedule_random(seed);
    else emu_schedule_fixed();
}
