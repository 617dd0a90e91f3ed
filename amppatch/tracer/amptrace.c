/*
 * amptrace: the LD_PRELOAD companion tracer of `amppatch profile`.
 *
 * What it records (all into memory reserved up front; one file is written at the end):
 *   - program counters of every thread, sampled on that thread's CPU time: a timer_create()
 *     CLOCK_THREAD_CPUTIME_ID timer per thread (SIGEV_THREAD_ID), armed in the main thread at load and in
 *     every thread started through pthread_create. CPU-time sampling works on VMs without hardware counters.
 *   - token boundaries: llama_decode / llama_process / llama_synchronize entry and exit, each decode or
 *     process call with the number of tokens in its batch (a generation step decodes one; a prompt or a
 *     context fill many), followed through llama_batch_ext_init / _free / _clear / _add / _add_token for
 *     llama_process.
 *   - memory regions: large mmap/munmap/posix_memalign, and ggml_backend_buffer_set_usage/_clear with the
 *     buffer's name, base and size (weights in CPU_Mapped / CPU / CPU_REPACK / AMX buffers, KV cache).
 *   - loaded modules (dl_iterate_phdr) and /proc/self/maps when the file is written.
 *
 * Rules it keeps: it never changes what the program computes (every wrapper forwards its arguments and
 * result unchanged and preserves errno); everything that runs in a signal handler is async-signal-safe
 * (raw syscalls, no malloc, no stdio, no locks); the file is written at exit, before exec, at _exit and on
 * fatal signals, after which the signal is re-raised so the crash is still reported with its signal.
 *
 * Configuration (environment):
 *   AMPTRACE_OUT          output path (unset: the tracer is inert)
 *   AMPTRACE_HZ           samples per second of thread CPU time (0: token and region hooks only; default 1000)
 *   AMPTRACE_CLOCK        "thread" (default: CPU time) or "monotonic" (wall time; used to calibrate the cost)
 *   AMPTRACE_MAX_SAMPLES  per-thread sample capacity (default 262144)
 *   AMPTRACE_MAX_THREADS  thread slots (default 4096; later threads run untraced and are counted)
 *   AMPTRACE_MIN_REGION   smallest mmap/posix_memalign recorded, bytes (default 1 MiB)
 *   AMPTRACE_SIGNAL       signal number used for samples (default SIGPROF)
 *   AMPTRACE_CHILDREN     1 (default): forked/exec'd children write <OUT>.<pid>; 0: children are untraced
 *   AMPTRACE_PARENT       pid of the process that launched the workload; its direct child writes <OUT>,
 *                         any other traced process <OUT>.<pid> (unset: the first to claim <OUT> wins)
 *   AMPTRACE_SELFTIME     1: measure the time spent inside the sample handler (for overhead reports)
 *
 * File format (little endian, version AMPTRACE_VERSION): "AMPTRACE" magic, u32 version, u32 header size,
 * then sections {u32 kind, u32 zero, u64 payload bytes, payload}, ending with kind 0xFFFFFFFF. The reader is
 * amppatch/tracer/reader.py; both sides must change together (bump the version).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <link.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h> /* rename() only; no stdio streams are used */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#define AMPTRACE_VERSION 2u
#define EXPORT __attribute__((visibility("default")))
#define TLS __thread __attribute__((tls_model("initial-exec")))

enum section_kind {
    SEC_META = 1, SEC_THREAD = 2, SEC_TOKENS = 3, SEC_REGIONS = 4, SEC_MODULES = 5, SEC_MAPS = 6, SEC_END = 0xFFFFFFFFu
};
enum token_kind {
    TOK_DECODE_BEGIN = 1, TOK_DECODE_END = 2, TOK_PROCESS_BEGIN = 3, TOK_PROCESS_END = 4,
    TOK_SYNC_BEGIN = 5, TOK_SYNC_END = 6
};
enum region_kind {
    REG_MMAP = 1, REG_MUNMAP = 2, REG_MEMALIGN = 3, REG_BUFFER_USAGE = 4, REG_BUFFER_CLEAR = 5
};

struct sample {            /* 24 bytes */
    uint64_t t_ns;         /* CLOCK_MONOTONIC */
    uint64_t pc;
    uint32_t weight;       /* 1 + timer overruns: ticks this sample stands for */
    uint32_t pad;
};
struct token_event {       /* 24 bytes */
    _Atomic uint32_t kind; /* stored last: 0 = slot reserved but not filled */
    uint32_t tid;
    uint64_t t_ns;
    int64_t arg;           /* BEGIN: tokens in the batch (-1: unknown); END: return value */
};
#define NAME_LEN 128
struct region_event {      /* 176 bytes */
    _Atomic uint32_t kind;
    uint32_t tid;
    uint64_t t_ns;
    uint64_t addr;
    uint64_t size;
    int64_t a;             /* mmap: prot; usage: usage enum; clear: value */
    int64_t b;             /* mmap: flags; memalign: alignment */
    char name[NAME_LEN];   /* mmap: file path; buffers: buffer name */
};
struct thread_header {     /* 64 bytes, followed by n_samples struct sample */
    uint32_t tid;
    uint32_t slot;
    uint32_t state;        /* 1 running at write time, 2 exited */
    uint32_t pad;
    uint64_t n_samples;
    uint64_t dropped;
    uint64_t start_ns;
    uint64_t end_ns;
    uint64_t cpu_ns;
    uint64_t handler_ns;
};
#define MAX_SEGS 4
struct module_rec {        /* 8 + 8 + 4*16 + 256 = 336 bytes */
    uint64_t base;
    uint64_t n_segs;
    uint64_t seg[MAX_SEGS][2];
    char path[256];
};

struct slot {
    _Atomic uint32_t state; /* 0 free, 1 running, 2 exited */
    uint32_t tid;
    uint64_t start_ns, end_ns, cpu_ns;
    struct sample *buf;
    uint64_t cap;
    _Atomic uint64_t n;     /* written only by the owning thread (in its handler) */
    uint64_t dropped;
    uint64_t handler_ns;
    timer_t timer;
    int has_timer;
};

/* ---- configuration and state ------------------------------------------------------------------ */
static int g_active;               /* AMPTRACE_OUT was set and init succeeded */
static long g_hz = 1000;
static int g_clock_monotonic;
static uint64_t g_max_samples = 262144;
static uint32_t g_max_threads = 4096;
static uint64_t g_min_region = 1u << 20;
static int g_signal = SIGPROF;
static int g_children = 1;
static int g_selftime;
static char g_base_path[PATH_MAX];
static char g_out_path[PATH_MAX + 32];
static pid_t g_pid;
static uint64_t g_start_ns;
static int g_cookie;               /* its address tags our timers' signals */

static struct slot *g_slots;       /* g_max_threads entries */
static _Atomic uint32_t g_nslots;
static _Atomic uint64_t g_untraced_threads;
static _Atomic int g_stop;         /* set while/after writing: handlers record nothing */
static _Atomic int g_writing;      /* first writer wins */
static pthread_key_t g_key;

#define MAX_TOKEN_EVENTS (1u << 20)
#define MAX_REGION_EVENTS (1u << 16)
static struct token_event *g_tok;
static _Atomic uint64_t g_ntok;
static struct region_event *g_reg;
static _Atomic uint64_t g_nreg;

/* counts of interposed calls (for cost per token) */
enum { C_MMAP, C_MUNMAP, C_MEMALIGN, C_USAGE, C_CLEAR, C_DECODE, C_PROCESS, C_SYNC, C_PTHREAD, C_EXEC, C_N };
static const char *const g_counter_names[C_N] = {
    "mmap", "munmap", "posix_memalign", "buffer_set_usage", "buffer_clear", "llama_decode", "llama_process",
    "llama_synchronize", "pthread_create", "exec"};
static _Atomic uint64_t g_calls[C_N];

static TLS struct slot *t_slot;
static TLS int t_hook_depth;

static int g_fatal_signals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGTRAP, SIGSYS,
                                SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGXCPU, SIGXFSZ};
#define N_FATAL ((int)(sizeof g_fatal_signals / sizeof g_fatal_signals[0]))
static struct sigaction g_prev_fatal[N_FATAL];
static _Atomic int g_crash_signal;
static uint64_t g_crash_pc;

/* ---- small async-signal-safe helpers ---------------------------------------------------------- */
static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}
static uint64_t clock_ns(clockid_t clk) {
    struct timespec ts;
    if (clock_gettime(clk, &ts) != 0) return 0;
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}
static TLS pid_t t_tid; /* cached: gettid is a real syscall (~100 ns on a VM), and every event needs it */
static pid_t my_tid(void) {
    if (!t_tid) t_tid = (pid_t)syscall(SYS_gettid);
    return t_tid;
}
static void *raw_mmap(size_t len) {
    /* Our own memory never goes through the interposed mmap (it must not appear as a program region).
       MAP_NORESERVE: capacity is reserved generously but only touched pages cost memory, also under strict
       overcommit accounting. */
    void *p = (void *)syscall(SYS_mmap, NULL, len, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}
static size_t str_len(const char *s) { size_t n = 0; while (s[n]) n++; return n; }
static void str_copy(char *dst, const char *src, size_t cap) {
    size_t i = 0;
    if (src) for (; src[i] && i + 1 < cap; i++) dst[i] = src[i];
    dst[i] = 0;
}
/* Appends to a fixed buffer; never overflows. */
struct sbuf { char *p; size_t n, cap; };
static void sb_str(struct sbuf *b, const char *s) {
    while (*s && b->n + 1 < b->cap) b->p[b->n++] = *s++;
    b->p[b->n] = 0;
}
static void sb_u64(struct sbuf *b, uint64_t v) {
    char tmp[24]; int i = 0;
    do { tmp[i++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (i && b->n + 1 < b->cap) b->p[b->n++] = tmp[--i];
    b->p[b->n] = 0;
}
static void sb_kv(struct sbuf *b, const char *k, uint64_t v) {
    sb_str(b, k); sb_str(b, "="); sb_u64(b, v); sb_str(b, "\n");
}
static uint64_t parse_u64(const char *s, uint64_t dflt) {
    if (!s || !*s) return dflt;
    uint64_t v = 0;
    for (; *s; s++) { if (*s < '0' || *s > '9') return dflt; v = v * 10 + (uint64_t)(*s - '0'); }
    return v;
}
static int write_all(int fd, const void *p, size_t n) {
    const char *c = p;
    while (n) {
        ssize_t w = write(fd, c, n);
        if (w < 0) { if (errno == EINTR) continue; return -1; }
        c += w; n -= (size_t)w;
    }
    return 0;
}
static int write_section(int fd, uint32_t kind, const void *payload, uint64_t len) {
    uint32_t h[2] = {kind, 0};
    if (write_all(fd, h, sizeof h) || write_all(fd, &len, sizeof len)) return -1;
    return len ? write_all(fd, payload, len) : 0;
}

/* ---- real functions ----------------------------------------------------------------------------- */
#define REAL(name) real_##name
#define RESOLVE(name) do { if (!REAL(name)) REAL(name) = (__typeof__(REAL(name)))dlsym(RTLD_NEXT, #name); } while (0)
static void *(*real_mmap)(void *, size_t, int, int, int, off_t);
static void *(*real_mmap64)(void *, size_t, int, int, int, off_t);
static int (*real_munmap)(void *, size_t);
static int (*real_posix_memalign)(void **, size_t, size_t);
static int (*real_pthread_create)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *);
static int (*real_execve)(const char *, char *const[], char *const[]);
static int (*real_execv)(const char *, char *const[]);
static int (*real_execvp)(const char *, char *const[]);
static int (*real_execvpe)(const char *, char *const[], char *const[]);
static void (*real__exit)(int) __attribute__((noreturn));
static void (*real__Exit)(int) __attribute__((noreturn));

/* ---- recording ---------------------------------------------------------------------------------- */
static void record_token(uint32_t kind, int64_t arg) {
    if (!g_active || !g_tok) return;
    uint64_t i = atomic_fetch_add_explicit(&g_ntok, 1, memory_order_relaxed);
    if (i >= MAX_TOKEN_EVENTS) return;
    struct token_event *e = &g_tok[i];
    e->tid = (uint32_t)my_tid();
    e->t_ns = now_ns();
    e->arg = arg;
    atomic_store_explicit(&e->kind, kind, memory_order_release);
}
static void record_region(uint32_t kind, uint64_t addr, uint64_t size, int64_t a, int64_t b, const char *name) {
    if (!g_active || !g_reg) return;
    uint64_t i = atomic_fetch_add_explicit(&g_nreg, 1, memory_order_relaxed);
    if (i >= MAX_REGION_EVENTS) return;
    struct region_event *e = &g_reg[i];
    e->tid = (uint32_t)my_tid();
    e->t_ns = now_ns();
    e->addr = addr;
    e->size = size;
    e->a = a;
    e->b = b;
    str_copy(e->name, name, NAME_LEN);
    atomic_store_explicit(&e->kind, kind, memory_order_release);
}

static void on_sample(int sig, siginfo_t *si, void *ucv) {
    (void)sig;
    int saved_errno = errno;
    struct slot *s = t_slot;
    if (s && si && si->si_code == SI_TIMER && si->si_value.sival_ptr == &g_cookie &&
        !atomic_load_explicit(&g_stop, memory_order_relaxed)) {
        uint64_t t0 = now_ns();
        ucontext_t *uc = ucv;
        uint64_t pc;
#if defined(__x86_64__)
        pc = (uint64_t)uc->uc_mcontext.gregs[REG_RIP];
#elif defined(__aarch64__)
        pc = (uint64_t)uc->uc_mcontext.pc;
#else
        pc = 0;
#endif
        uint64_t n = atomic_load_explicit(&s->n, memory_order_relaxed);
        if (n < s->cap) {
            s->buf[n].t_ns = t0;
            s->buf[n].pc = pc;
            s->buf[n].weight = 1u + (uint32_t)(si->si_overrun > 0 ? si->si_overrun : 0);
            s->buf[n].pad = 0;
            atomic_store_explicit(&s->n, n + 1, memory_order_release);
        } else {
            s->dropped++;
        }
        if (g_selftime) s->handler_ns += now_ns() - t0;
    }
    errno = saved_errno;
}

static int arm_timer(struct slot *s) {
    struct sigevent sev;
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = g_signal;
    sev.sigev_value.sival_ptr = &g_cookie;
    sev._sigev_un._tid = (pid_t)s->tid;
    clockid_t clk = g_clock_monotonic ? CLOCK_MONOTONIC : CLOCK_THREAD_CPUTIME_ID;
    if (timer_create(clk, &sev, &s->timer) != 0) return -1;
    long period = 1000000000L / g_hz;
    struct timespec every = {period / 1000000000L, period % 1000000000L};
    struct itimerspec its = {every, every};
    if (timer_settime(s->timer, 0, &its, NULL) != 0) { timer_delete(s->timer); return -1; }
    s->has_timer = 1;
    return 0;
}

/* Claims a slot for the calling thread and arms its sampling timer. Not called from signal handlers. */
static void register_thread(void) {
    if (!g_active || g_hz <= 0 || !g_slots) return;
    uint32_t i = atomic_fetch_add(&g_nslots, 1);
    if (i >= g_max_threads) { atomic_fetch_add(&g_untraced_threads, 1); return; }
    struct slot *s = &g_slots[i];
    memset((void *)s, 0, sizeof *s);
    s->tid = (uint32_t)my_tid();
    s->start_ns = now_ns();
    s->cap = g_max_samples;
    s->buf = raw_mmap(g_max_samples * sizeof(struct sample));
    if (!s->buf) { s->cap = 0; }
    atomic_store(&s->state, 1);
    t_slot = s;
    atomic_signal_fence(memory_order_seq_cst);
    if (s->buf) arm_timer(s);
    pthread_setspecific(g_key, s);
}

static void unregister_thread(void *arg) {
    struct slot *s = arg;
    if (!s) return;
    if (s->has_timer) { timer_delete(s->timer); s->has_timer = 0; }
    s->cpu_ns = clock_ns(CLOCK_THREAD_CPUTIME_ID);
    s->end_ns = now_ns();
    t_slot = NULL;
    atomic_signal_fence(memory_order_seq_cst);
    atomic_store(&s->state, 2);
}

/* ---- writing the file (async-signal-safe) ------------------------------------------------------- */
static struct module_rec g_modules[512];
static int g_nmodules;
static char g_maps[1 << 20];

static int module_cb(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size; (void)data;
    if (g_nmodules >= (int)(sizeof g_modules / sizeof g_modules[0])) return 1;
    struct module_rec *m = &g_modules[g_nmodules];
    memset(m, 0, sizeof *m);
    m->base = (uint64_t)info->dlpi_addr;
    for (int i = 0; i < info->dlpi_phnum && m->n_segs < MAX_SEGS; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type != PT_LOAD || !(ph->p_flags & PF_X)) continue;
        m->seg[m->n_segs][0] = info->dlpi_addr + ph->p_vaddr;
        m->seg[m->n_segs][1] = info->dlpi_addr + ph->p_vaddr + ph->p_memsz;
        m->n_segs++;
    }
    str_copy(m->path, info->dlpi_name, sizeof m->path);
    g_nmodules++;
    return 0;
}

static size_t read_file(const char *path, char *buf, size_t cap) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    size_t n = 0;
    while (n + 1 < cap) {
        ssize_t r = read(fd, buf + n, cap - 1 - n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        n += (size_t)r;
    }
    close(fd);
    buf[n] = 0;
    return n;
}

static void write_trace(const char *reason, int in_signal) {
    if (!g_active) return;
    if (atomic_exchange(&g_writing, 1)) return;
    atomic_store(&g_stop, 1);
    int saved_errno = errno;
    uint64_t end_ns = now_ns();
    static char tmp_path[PATH_MAX + 64];
    struct sbuf tp = {tmp_path, 0, sizeof tmp_path};
    sb_str(&tp, g_out_path); sb_str(&tp, ".tmp"); sb_u64(&tp, (uint64_t)getpid());
    int fd = open(tmp_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) { errno = saved_errno; return; }

    char head[16];
    memcpy(head, "AMPTRACE", 8);
    uint32_t ver = AMPTRACE_VERSION, hsz = 16;
    memcpy(head + 8, &ver, 4);
    memcpy(head + 12, &hsz, 4);
    write_all(fd, head, sizeof head);

    static char meta[16384];
    struct sbuf mb = {meta, 0, sizeof meta};
    sb_kv(&mb, "version", AMPTRACE_VERSION);
    sb_kv(&mb, "pid", (uint64_t)getpid());
    sb_kv(&mb, "ppid", (uint64_t)getppid());
    sb_kv(&mb, "hz", (uint64_t)g_hz);
    sb_str(&mb, "clock="); sb_str(&mb, g_clock_monotonic ? "monotonic" : "thread_cputime"); sb_str(&mb, "\n");
    sb_kv(&mb, "signal", (uint64_t)g_signal);
    sb_kv(&mb, "start_ns", g_start_ns);
    sb_kv(&mb, "end_ns", end_ns);
    sb_kv(&mb, "process_cpu_ns", clock_ns(CLOCK_PROCESS_CPUTIME_ID));
    sb_kv(&mb, "max_samples", g_max_samples);
    sb_kv(&mb, "min_region", g_min_region);
    sb_kv(&mb, "selftime", (uint64_t)g_selftime);
    sb_kv(&mb, "untraced_threads", atomic_load(&g_untraced_threads));
    sb_kv(&mb, "token_events", atomic_load(&g_ntok));
    sb_kv(&mb, "region_events", atomic_load(&g_nreg));
    sb_kv(&mb, "crash_signal", (uint64_t)atomic_load(&g_crash_signal));
    sb_kv(&mb, "crash_pc", g_crash_pc);
    sb_str(&mb, "reason="); sb_str(&mb, reason); sb_str(&mb, "\n");
    for (int i = 0; i < C_N; i++) { sb_str(&mb, "calls."); sb_kv(&mb, g_counter_names[i], atomic_load(&g_calls[i])); }
    static char exe[PATH_MAX];
    ssize_t el = readlink("/proc/self/exe", exe, sizeof exe - 1);
    exe[el > 0 ? el : 0] = 0;
    sb_str(&mb, "exe="); sb_str(&mb, exe); sb_str(&mb, "\n");
    static char cmdline[8192];
    size_t cl = read_file("/proc/self/cmdline", cmdline, sizeof cmdline);
    sb_str(&mb, "cmdline=");
    for (size_t i = 0; i < cl; i++) {
        char c[2] = {cmdline[i] ? (cmdline[i] == '\n' ? ' ' : cmdline[i]) : '\x1f', 0};
        sb_str(&mb, c);
    }
    sb_str(&mb, "\n");
    write_section(fd, SEC_META, meta, mb.n);

    uint32_t nslots = atomic_load(&g_nslots);
    if (nslots > g_max_threads) nslots = g_max_threads;
    for (uint32_t i = 0; g_slots && i < nslots; i++) {
        struct slot *s = &g_slots[i];
        uint32_t state = atomic_load(&s->state);
        if (state == 0) continue;
        struct thread_header th;
        memset(&th, 0, sizeof th);
        th.tid = s->tid;
        th.slot = i;
        th.state = state;
        th.n_samples = atomic_load_explicit(&s->n, memory_order_acquire);
        if (th.n_samples > s->cap) th.n_samples = s->cap;
        th.dropped = s->dropped;
        th.start_ns = s->start_ns;
        th.end_ns = state == 2 ? s->end_ns : end_ns;
        /* A live thread's CPU clock, named by tid (Linux: MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED)). */
        th.cpu_ns = state == 2 ? s->cpu_ns : clock_ns((clockid_t)(((~(uint32_t)s->tid) << 3) | 6u));
        th.handler_ns = s->handler_ns;
        uint64_t len = sizeof th + th.n_samples * sizeof(struct sample);
        uint32_t h[2] = {SEC_THREAD, 0};
        write_all(fd, h, sizeof h);
        write_all(fd, &len, sizeof len);
        write_all(fd, &th, sizeof th);
        if (th.n_samples) write_all(fd, s->buf, th.n_samples * sizeof(struct sample));
    }

    uint64_t ntok = atomic_load(&g_ntok);
    if (ntok > MAX_TOKEN_EVENTS) ntok = MAX_TOKEN_EVENTS;
    if (g_tok) write_section(fd, SEC_TOKENS, g_tok, ntok * sizeof(struct token_event));
    uint64_t nreg = atomic_load(&g_nreg);
    if (nreg > MAX_REGION_EVENTS) nreg = MAX_REGION_EVENTS;
    if (g_reg) write_section(fd, SEC_REGIONS, g_reg, nreg * sizeof(struct region_event));

    /* dl_iterate_phdr takes the loader lock, so it is skipped in a signal handler; the reader then uses
       /proc/self/maps (read with plain syscalls) to place samples in modules. */
    if (!in_signal) {
        g_nmodules = 0;
        dl_iterate_phdr(module_cb, NULL);
        write_section(fd, SEC_MODULES, g_modules, (uint64_t)g_nmodules * sizeof(struct module_rec));
    }
    size_t ml = read_file("/proc/self/maps", g_maps, sizeof g_maps);
    write_section(fd, SEC_MAPS, g_maps, ml);
    write_section(fd, SEC_END, NULL, 0);
    close(fd);
    rename(tmp_path, g_out_path);
    errno = saved_errno;
}

/* ---- fatal signals ------------------------------------------------------------------------------ */
static void on_fatal(int sig, siginfo_t *si, void *ucv) {
    int idx = -1;
    for (int i = 0; i < N_FATAL; i++) if (g_fatal_signals[i] == sig) idx = i;
    int expected = 0;
    atomic_compare_exchange_strong(&g_crash_signal, &expected, sig);
#if defined(__x86_64__)
    if (ucv) g_crash_pc = (uint64_t)((ucontext_t *)ucv)->uc_mcontext.gregs[REG_RIP];
#elif defined(__aarch64__)
    if (ucv) g_crash_pc = (uint64_t)((ucontext_t *)ucv)->uc_mcontext.pc;
#endif
    write_trace("signal", 1);
    /* Hand the signal back to whoever had it before us (normally the default action: the process dies
       with this very signal, so the parent sees the crash as if we were not here). */
    if (idx >= 0) {
        struct sigaction *prev = &g_prev_fatal[idx];
        sigaction(sig, prev, NULL);
        if ((prev->sa_flags & SA_SIGINFO) && prev->sa_sigaction) { prev->sa_sigaction(sig, si, ucv); return; }
        if (prev->sa_handler != SIG_DFL && prev->sa_handler != SIG_IGN && prev->sa_handler) {
            prev->sa_handler(sig);
            return;
        }
    } else {
        signal(sig, SIG_DFL);
    }
    /* Re-raise to this thread; it is blocked in this handler (no SA_NODEFER) and is delivered with the
       default action on return. A hardware fault would also re-fault on return. */
    syscall(SYS_tgkill, getpid(), my_tid(), sig);
}

static void install_fatal_handlers(void) {
    for (int i = 0; i < N_FATAL; i++) {
        struct sigaction old;
        if (sigaction(g_fatal_signals[i], NULL, &old) != 0) continue;
        /* An ignored signal stays ignored, and a handler the program already has stays in charge. */
        if (old.sa_handler != SIG_DFL || (old.sa_flags & SA_SIGINFO)) continue;
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_fatal;
        sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        g_prev_fatal[i] = old;
        sigaction(g_fatal_signals[i], &sa, NULL);
    }
}

/* ---- lifecycle ---------------------------------------------------------------------------------- */
static void set_out_path(int root) {
    struct sbuf b = {g_out_path, 0, sizeof g_out_path};
    sb_str(&b, g_base_path);
    if (!root) { sb_str(&b, "."); sb_u64(&b, (uint64_t)getpid()); }
}

static void after_fork_child(void) {
    if (!g_active) return;
    if (!g_children) {
        /* Cleanly untraced: the child has no timers (not inherited) and writes nothing. */
        g_active = 0;
        t_slot = NULL;
        t_tid = 0;
        return;
    }
    t_tid = 0; /* the child's only thread has a new tid */
    g_pid = getpid();
    set_out_path(0);
    /* The child starts empty: the parent's samples and events belong to the parent's file. */
    atomic_store(&g_stop, 0);
    atomic_store(&g_writing, 0);
    atomic_store(&g_ntok, 0);
    atomic_store(&g_nreg, 0);
    atomic_store(&g_crash_signal, 0);
    for (uint32_t i = 0; i < g_max_threads && i < atomic_load(&g_nslots); i++) atomic_store(&g_slots[i].state, 0);
    atomic_store(&g_nslots, 0);
    atomic_store(&g_untraced_threads, 0);
    for (int i = 0; i < C_N; i++) atomic_store(&g_calls[i], 0);
    g_start_ns = now_ns();
    t_slot = NULL;
    register_thread();
}

__attribute__((constructor)) static void amptrace_init(void) {
    const char *out = getenv("AMPTRACE_OUT");
    if (!out || !*out || str_len(out) >= sizeof g_base_path) return;
    str_copy(g_base_path, out, sizeof g_base_path);
    g_hz = (long)parse_u64(getenv("AMPTRACE_HZ"), 1000);
    if (g_hz > 100000) g_hz = 100000;
    const char *clk = getenv("AMPTRACE_CLOCK");
    g_clock_monotonic = clk && strcmp(clk, "monotonic") == 0;
    g_max_samples = parse_u64(getenv("AMPTRACE_MAX_SAMPLES"), g_max_samples);
    g_max_threads = (uint32_t)parse_u64(getenv("AMPTRACE_MAX_THREADS"), g_max_threads);
    g_min_region = parse_u64(getenv("AMPTRACE_MIN_REGION"), g_min_region);
    g_signal = (int)parse_u64(getenv("AMPTRACE_SIGNAL"), (uint64_t)g_signal);
    g_children = (int)parse_u64(getenv("AMPTRACE_CHILDREN"), 1);
    g_selftime = (int)parse_u64(getenv("AMPTRACE_SELFTIME"), 0);
    g_pid = getpid();
    g_start_ns = now_ns();

    int root;
    const char *parent = getenv("AMPTRACE_PARENT");
    if (parent && *parent) {
        root = (uint64_t)getppid() == parse_u64(parent, 0);
    } else {
        /* No launcher pid: the first process to create the file owns it. */
        int fd = open(g_base_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        root = fd >= 0;
        if (fd >= 0) close(fd);
    }
    if (!root && !g_children) return;
    set_out_path(root);

    g_tok = raw_mmap(MAX_TOKEN_EVENTS * sizeof(struct token_event));
    g_reg = raw_mmap(MAX_REGION_EVENTS * sizeof(struct region_event));
    if (g_hz > 0) {
        g_slots = raw_mmap((size_t)g_max_threads * sizeof(struct slot));
        if (!g_slots) g_hz = 0;
    }
    if (pthread_key_create(&g_key, unregister_thread) != 0) g_hz = 0;
    RESOLVE(mmap); RESOLVE(mmap64); RESOLVE(munmap); RESOLVE(posix_memalign); RESOLVE(pthread_create);
    RESOLVE(execve); RESOLVE(execv); RESOLVE(execvp); RESOLVE(execvpe);
    RESOLVE(_exit); RESOLVE(_Exit);
    if (g_hz > 0) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_sample;
        /* SA_RESTART: a sample landing in a blocking call must not make it fail with EINTR. */
        sa.sa_flags = SA_SIGINFO | SA_RESTART;
        sigemptyset(&sa.sa_mask);
        sigaction(g_signal, &sa, NULL);
    }
    install_fatal_handlers();
    pthread_atfork(NULL, NULL, after_fork_child);
    g_active = 1;
    register_thread();
}

__attribute__((destructor)) static void amptrace_fini(void) { write_trace("exit", 0); }

/* ---- interposed functions ----------------------------------------------------------------------- */
static void note_mapping(void *p, size_t len, int prot, int flags, int fd) {
    if (p == MAP_FAILED || len < g_min_region) return;
    char path[NAME_LEN] = {0};
    if (fd >= 0) {
        char link[40];
        struct sbuf b = {link, 0, sizeof link};
        sb_str(&b, "/proc/self/fd/"); sb_u64(&b, (uint64_t)fd);
        ssize_t n = readlink(link, path, sizeof path - 1);
        path[n > 0 ? n : 0] = 0;
    }
    record_region(REG_MMAP, (uint64_t)(uintptr_t)p, len, prot, flags, path);
}

EXPORT void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    RESOLVE(mmap);
    void *p = real_mmap ? real_mmap(addr, len, prot, flags, fd, off)
                        : (void *)syscall(SYS_mmap, addr, len, prot, flags, fd, off);
    if (g_active) {
        int e = errno;
        atomic_fetch_add_explicit(&g_calls[C_MMAP], 1, memory_order_relaxed);
        note_mapping(p, len, prot, flags, fd);
        errno = e;
    }
    return p;
}

EXPORT void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    RESOLVE(mmap64);
    void *p = real_mmap64 ? real_mmap64(addr, len, prot, flags, fd, off)
                          : (void *)syscall(SYS_mmap, addr, len, prot, flags, fd, off);
    if (g_active) {
        int e = errno;
        atomic_fetch_add_explicit(&g_calls[C_MMAP], 1, memory_order_relaxed);
        note_mapping(p, len, prot, flags, fd);
        errno = e;
    }
    return p;
}

EXPORT int munmap(void *addr, size_t len) {
    RESOLVE(munmap);
    int rc = real_munmap ? real_munmap(addr, len) : (int)syscall(SYS_munmap, addr, len);
    if (g_active) {
        int e = errno;
        atomic_fetch_add_explicit(&g_calls[C_MUNMAP], 1, memory_order_relaxed);
        if (rc == 0 && len >= g_min_region) record_region(REG_MUNMAP, (uint64_t)(uintptr_t)addr, len, 0, 0, "");
        errno = e;
    }
    return rc;
}

EXPORT int posix_memalign(void **ptr, size_t align, size_t size) {
    RESOLVE(posix_memalign);
    if (!real_posix_memalign) return ENOMEM;
    int rc = real_posix_memalign(ptr, align, size);
    if (g_active) {
        int e = errno;
        atomic_fetch_add_explicit(&g_calls[C_MEMALIGN], 1, memory_order_relaxed);
        if (rc == 0 && size >= g_min_region)
            record_region(REG_MEMALIGN, (uint64_t)(uintptr_t)*ptr, size, 0, (int64_t)align, "");
        errno = e;
    }
    return rc;
}

/* ggml buffers: the handle is opaque; its name, base and size come from ggml's own exported getters. */
typedef void *ggml_buffer;
static const char *(*g_buf_name)(ggml_buffer);
static void *(*g_buf_base)(ggml_buffer);
static size_t (*g_buf_size)(ggml_buffer);
static void note_buffer(uint32_t kind, ggml_buffer buf, int64_t a) {
    if (!g_buf_name) g_buf_name = (const char *(*)(ggml_buffer))dlsym(RTLD_DEFAULT, "ggml_backend_buffer_name");
    if (!g_buf_base) g_buf_base = (void *(*)(ggml_buffer))dlsym(RTLD_DEFAULT, "ggml_backend_buffer_get_base");
    if (!g_buf_size) g_buf_size = (size_t (*)(ggml_buffer))dlsym(RTLD_DEFAULT, "ggml_backend_buffer_get_size");
    const char *name = g_buf_name ? g_buf_name(buf) : "";
    uint64_t base = g_buf_base ? (uint64_t)(uintptr_t)g_buf_base(buf) : 0;
    uint64_t size = g_buf_size ? (uint64_t)g_buf_size(buf) : 0;
    record_region(kind, base, size, a, 0, name ? name : "");
}

EXPORT void ggml_backend_buffer_set_usage(ggml_buffer buf, int usage) {
    static void (*real)(ggml_buffer, int);
    if (!real) real = (void (*)(ggml_buffer, int))dlsym(RTLD_NEXT, "ggml_backend_buffer_set_usage");
    if (real) real(buf, usage);
    if (g_active && buf) {
        int e = errno;
        atomic_fetch_add_explicit(&g_calls[C_USAGE], 1, memory_order_relaxed);
        note_buffer(REG_BUFFER_USAGE, buf, usage);
        errno = e;
    }
}

EXPORT void ggml_backend_buffer_clear(ggml_buffer buf, uint8_t value) {
    static void (*real)(ggml_buffer, uint8_t);
    if (!real) real = (void (*)(ggml_buffer, uint8_t))dlsym(RTLD_NEXT, "ggml_backend_buffer_clear");
    if (real) real(buf, value);
    if (g_active && buf) {
        int e = errno;
        atomic_fetch_add_explicit(&g_calls[C_CLEAR], 1, memory_order_relaxed);
        note_buffer(REG_BUFFER_CLEAR, buf, value);
        errno = e;
    }
}

/* Mirror of the llama_batch ABI (passed by value): only n_tokens is read. */
struct amp_llama_batch {
    int32_t n_tokens;
    void *token, *embd, *pos, *n_seq_id, *seq_id, *logits;
};

EXPORT int32_t llama_decode(void *ctx, struct amp_llama_batch batch) {
    static int32_t (*real)(void *, struct amp_llama_batch);
    if (!real) real = (int32_t (*)(void *, struct amp_llama_batch))dlsym(RTLD_NEXT, "llama_decode");
    if (!real) abort(); /* unreachable: the program called it, so some later library defines it */
    int outer = t_hook_depth++ == 0;
    if (outer) {
        atomic_fetch_add_explicit(&g_calls[C_DECODE], 1, memory_order_relaxed);
        record_token(TOK_DECODE_BEGIN, batch.n_tokens);
    }
    int32_t rc = real(ctx, batch);
    int e = errno;
    if (outer) record_token(TOK_DECODE_END, rc);
    t_hook_depth--;
    errno = e;
    return rc;
}

/* llama_process takes an opaque llama_batch_ext, so its token count is followed through the calls that fill
 * it: each thread remembers the batch it last cleared or added to, and how many tokens that batch holds (an
 * add returns the new token's index). A batch filled some other way (llama_batch_ext_add_embd alone, or no
 * hooked add since its clear) is recorded as -1, unknown; so is one freed or allocated since (its address
 * may be reused). */
static TLS void *t_batch;
static TLS int64_t t_batch_tokens;

static void note_batch(void *batch, int64_t tokens) {
    t_batch = batch;
    t_batch_tokens = tokens;
}

static void forget_batch(void *batch) {
    if (batch == t_batch) t_batch = NULL;
}

EXPORT void *llama_batch_ext_init(void *ctx) {
    static void *(*real)(void *);
    if (!real) real = (void *(*)(void *))dlsym(RTLD_NEXT, "llama_batch_ext_init");
    if (!real) abort();
    void *batch = real(ctx);
    forget_batch(batch);
    return batch;
}

EXPORT void llama_batch_ext_free(void *batch) {
    static void (*real)(void *);
    if (!real) real = (void (*)(void *))dlsym(RTLD_NEXT, "llama_batch_ext_free");
    if (!real) abort();
    forget_batch(batch);
    real(batch);
}

EXPORT void llama_batch_ext_clear(void *batch) {
    static void (*real)(void *);
    if (!real) real = (void (*)(void *))dlsym(RTLD_NEXT, "llama_batch_ext_clear");
    if (!real) abort();
    real(batch);
    note_batch(batch, 0);
}

EXPORT int32_t llama_batch_ext_add(void *batch, int32_t seq_id) {
    static int32_t (*real)(void *, int32_t);
    if (!real) real = (int32_t (*)(void *, int32_t))dlsym(RTLD_NEXT, "llama_batch_ext_add");
    if (!real) abort();
    int32_t idx = real(batch, seq_id);
    if (idx >= 0) note_batch(batch, (int64_t)idx + 1);
    return idx;
}

EXPORT int32_t llama_batch_ext_add_token(void *batch, int32_t seq_id, int32_t token) {
    static int32_t (*real)(void *, int32_t, int32_t);
    if (!real) real = (int32_t (*)(void *, int32_t, int32_t))dlsym(RTLD_NEXT, "llama_batch_ext_add_token");
    if (!real) abort();
    int32_t idx = real(batch, seq_id, token);
    if (idx >= 0) note_batch(batch, (int64_t)idx + 1);
    return idx;
}

EXPORT int32_t llama_process(void *ctx, int type, void *batch) {
    static int32_t (*real)(void *, int, void *);
    if (!real) real = (int32_t (*)(void *, int, void *))dlsym(RTLD_NEXT, "llama_process");
    if (!real) abort();
    int outer = t_hook_depth++ == 0;
    if (outer) {
        atomic_fetch_add_explicit(&g_calls[C_PROCESS], 1, memory_order_relaxed);
        record_token(TOK_PROCESS_BEGIN, batch && batch == t_batch && t_batch_tokens > 0 ? t_batch_tokens : -1);
    }
    int32_t rc = real(ctx, type, batch);
    int e = errno;
    if (outer) record_token(TOK_PROCESS_END, rc);
    t_hook_depth--;
    errno = e;
    return rc;
}

EXPORT void llama_synchronize(void *ctx) {
    static void (*real)(void *);
    if (!real) real = (void (*)(void *))dlsym(RTLD_NEXT, "llama_synchronize");
    if (!real) abort();
    int outer = t_hook_depth++ == 0;
    if (outer) {
        atomic_fetch_add_explicit(&g_calls[C_SYNC], 1, memory_order_relaxed);
        record_token(TOK_SYNC_BEGIN, 0);
    }
    real(ctx);
    int e = errno;
    if (outer) record_token(TOK_SYNC_END, 0);
    t_hook_depth--;
    errno = e;
}

/* Threads: each new thread claims a slot and arms its own CPU-time timer before running the program's code. */
struct tramp { void *(*fn)(void *); void *arg; };
static void *trampoline(void *p) {
    struct tramp t = *(struct tramp *)p;
    free(p);
    register_thread();
    return t.fn(t.arg); /* the slot is released by the pthread key destructor, also on pthread_exit */
}

EXPORT int pthread_create(pthread_t *th, const pthread_attr_t *attr, void *(*fn)(void *), void *arg) {
    RESOLVE(pthread_create);
    if (!real_pthread_create) return EAGAIN;
    if (!g_active || g_hz <= 0 || !g_slots) return real_pthread_create(th, attr, fn, arg);
    atomic_fetch_add_explicit(&g_calls[C_PTHREAD], 1, memory_order_relaxed);
    struct tramp *t = malloc(sizeof *t);
    if (!t) return real_pthread_create(th, attr, fn, arg);
    t->fn = fn;
    t->arg = arg;
    int rc = real_pthread_create(th, attr, trampoline, t);
    if (rc != 0) free(t);
    return rc;
}

/* exec replaces the image without running destructors: write first. The new image (LD_PRELOAD is
   inherited) writes <OUT>.<pid>, or <OUT> if it is the launcher's direct child. A vfork child shares
   our memory and has another pid: it must not write, so only the owning pid flushes. */
static void before_exec(void) {
    if (!g_active || getpid() != g_pid) return;
    atomic_fetch_add(&g_calls[C_EXEC], 1);
    write_trace("exec", 0);
}
static void after_failed_exec(void) {
    if (!g_active || getpid() != g_pid) return;
    atomic_store(&g_writing, 0);
    atomic_store(&g_stop, 0);
}

EXPORT int execve(const char *path, char *const argv[], char *const envp[]) {
    RESOLVE(execve);
    before_exec();
    int rc = real_execve(path, argv, envp);
    int e = errno;
    after_failed_exec();
    errno = e;
    return rc;
}
EXPORT int execv(const char *path, char *const argv[]) {
    RESOLVE(execv);
    before_exec();
    int rc = real_execv(path, argv);
    int e = errno;
    after_failed_exec();
    errno = e;
    return rc;
}
EXPORT int execvp(const char *file, char *const argv[]) {
    RESOLVE(execvp);
    before_exec();
    int rc = real_execvp(file, argv);
    int e = errno;
    after_failed_exec();
    errno = e;
    return rc;
}
EXPORT int execvpe(const char *file, char *const argv[], char *const envp[]) {
    RESOLVE(execvpe);
    before_exec();
    int rc = real_execvpe(file, argv, envp);
    int e = errno;
    after_failed_exec();
    errno = e;
    return rc;
}

EXPORT void _exit(int status) {
    RESOLVE(_exit);
    if (g_active && getpid() == g_pid) write_trace("_exit", 0);
    if (real__exit) real__exit(status);
    syscall(SYS_exit_group, status);
    __builtin_unreachable();
}
EXPORT void _Exit(int status) {
    RESOLVE(_Exit);
    if (g_active && getpid() == g_pid) write_trace("_exit", 0);
    if (real__Exit) real__Exit(status);
    syscall(SYS_exit_group, status);
    __builtin_unreachable();
}
