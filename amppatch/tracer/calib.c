/* Calibration for the tracer's own cost (amppatch/tracer/overhead.py runs it with and without the tracer).
 *
 *   calib spin ITERS        a fixed dependent integer chain; prints the thread CPU time it took
 *   calib signals N SIG     N signals sent to this thread (tgkill) and handled by whatever handler SIG has
 *                           (under the tracer: its sample handler); prints ns per signal round trip.
 *                           Without a handler for SIG it installs an empty one (the baseline)
 *   calib calls N LIB       N calls each of llama_decode / llama_process / llama_synchronize in LIB (a shared
 *                           library, so the calls cross the PLT like libllama's do) and of posix_memalign+free;
 *                           prints ns per call of each
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint64_t ns(clockid_t c) {
    struct timespec ts;
    clock_gettime(c, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

struct batch { int32_t n_tokens; void *p[6]; };

static void empty_handler(int sig, siginfo_t *si, void *uc) { (void)sig; (void)si; (void)uc; }

int main(int argc, char **argv) {
    if (argc >= 3 && !strcmp(argv[1], "spin")) {
        long iters = atol(argv[2]);
        uint64_t t0 = ns(CLOCK_THREAD_CPUTIME_ID), w0 = ns(CLOCK_MONOTONIC);
        volatile uint64_t x = 1;
        uint64_t y = x;
        for (long i = 0; i < iters; i++) y = y * 6364136223846793005ull + 1442695040888963407ull;
        x = y;
        printf("{\"cpu_ns\": %llu, \"wall_ns\": %llu, \"iters\": %ld}\n",
               (unsigned long long)(ns(CLOCK_THREAD_CPUTIME_ID) - t0), (unsigned long long)(ns(CLOCK_MONOTONIC) - w0),
               iters);
        return 0;
    }
    if (argc >= 4 && !strcmp(argv[1], "signals")) {
        long n = atol(argv[2]);
        int sig = atoi(argv[3]);
        struct sigaction old;
        sigaction(sig, NULL, &old);
        int had = (old.sa_flags & SA_SIGINFO) || (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN);
        if (!had) {
            struct sigaction sa;
            memset(&sa, 0, sizeof sa);
            sa.sa_sigaction = empty_handler;
            sa.sa_flags = SA_SIGINFO | SA_RESTART;
            sigaction(sig, &sa, NULL);
        }
        pid_t pid = getpid(), tid = (pid_t)syscall(SYS_gettid);
        /* thread CPU time, not wall time: other processes on the machine must not inflate the figure */
        uint64_t t0 = ns(CLOCK_THREAD_CPUTIME_ID);
        for (long i = 0; i < n; i++) syscall(SYS_tgkill, pid, tid, sig);
        uint64_t t1 = ns(CLOCK_THREAD_CPUTIME_ID);
        printf("{\"ns_per_signal\": %.1f, \"handler\": \"%s\"}\n", (double)(t1 - t0) / n, had ? "installed" : "empty");
        return 0;
    }
    if (argc >= 4 && !strcmp(argv[1], "calls")) {
        long n = atol(argv[2]);
        void *lib = dlopen(argv[3], RTLD_NOW | RTLD_GLOBAL);
        if (!lib) { fprintf(stderr, "%s\n", dlerror()); return 1; }
        int32_t (*decode)(void *, struct batch) = (int32_t (*)(void *, struct batch))dlsym(lib, "calib_call_decode");
        int32_t (*process)(void *, int, void *) = (int32_t (*)(void *, int, void *))dlsym(lib, "calib_call_process");
        void (*sync)(void *) = (void (*)(void *))dlsym(lib, "calib_call_synchronize");
        struct batch b = {1, {0}};
        const clockid_t c = CLOCK_THREAD_CPUTIME_ID;
        uint64_t t0 = ns(c);
        for (long i = 0; i < n; i++) decode(0, b);
        uint64_t t1 = ns(c);
        for (long i = 0; i < n; i++) process(0, 1, &b);
        uint64_t t2 = ns(c);
        for (long i = 0; i < n; i++) sync(0);
        uint64_t t3 = ns(c);
        for (long i = 0; i < n; i++) { void *p; if (posix_memalign(&p, 64, 256) == 0) free(p); }
        uint64_t t4 = ns(c);
        printf("{\"llama_decode\": %.2f, \"llama_process\": %.2f, \"llama_synchronize\": %.2f, "
               "\"posix_memalign\": %.2f}\n",
               (double)(t1 - t0) / n, (double)(t2 - t1) / n, (double)(t3 - t2) / n, (double)(t4 - t3) / n);
        return 0;
    }
    fprintf(stderr, "usage: calib spin ITERS | calib calls N LIB\n");
    return 2;
}
