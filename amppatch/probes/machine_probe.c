/* Machine probe for `amppatch profile` (amppatch/machine.py compiles it with -O2 -march=native).
 *
 *   machine_probe latency MIB THP          pointer chase over a random cycle of 64-byte lines
 *   machine_probe stream MIB MAXTHREADS THP SECONDS DIST...
 *                                          stream-read bandwidth at 1..MAXTHREADS threads, each DIST
 *                                          ("0" = no software prefetch, "D:H" = prefetch D bytes ahead with
 *                                          locality hint H) measured for about SECONDS
 *
 * THP=1 asks for transparent huge pages with madvise(MADV_HUGEPAGE), THP=0 forbids them (MADV_NOHUGEPAGE).
 * Every result is one JSON object per line on stdout.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void *alloc(size_t bytes, int thp) {
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) { perror("mmap"); exit(1); }
    madvise(p, bytes, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    return p;
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rng(void) { /* splitmix64 */
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static int latency(size_t mib, int thp) {
    size_t bytes = mib << 20, n = bytes / 64;
    uint64_t *buf = alloc(bytes, thp);
    uint32_t *order = malloc(n * sizeof *order);
    for (size_t i = 0; i < n; i++) order[i] = (uint32_t)i;
    for (size_t i = n - 1; i > 0; i--) { /* Sattolo: one cycle through every line */
        size_t j = rng() % i;
        uint32_t t = order[i]; order[i] = order[j]; order[j] = t;
    }
    for (size_t i = 0; i < n; i++) buf[(size_t)order[i] * 8] = (uint64_t)order[(i + 1) % n] * 8;
    free(order);
    size_t steps = n < 4000000 ? n : 4000000;
    uint64_t p = 0;
    for (size_t i = 0; i < steps / 8; i++) p = buf[p]; /* warm the page tables a little */
    double t0 = now();
    for (size_t i = 0; i < steps; i++) p = buf[p];
    double dt = now() - t0;
    printf("{\"kind\": \"latency\", \"mib\": %zu, \"thp\": %d, \"steps\": %zu, \"ns\": %.2f, \"sink\": %llu}\n",
           mib, thp, steps, dt * 1e9 / (double)steps, (unsigned long long)(p & 1));
    return 0;
}

typedef long long v8 __attribute__((vector_size(64)));

struct job {
    const char *base;
    size_t bytes;
    long dist;
    int hint;
    v8 sink;
};

#define READ_LOOP(HINT)                                                                       \
    for (size_t off = 0; off < j->bytes; off += 256) {                                        \
        if (j->dist) {                                                                        \
            __builtin_prefetch(p + off + j->dist, 0, HINT);                                   \
            __builtin_prefetch(p + off + j->dist + 64, 0, HINT);                              \
            __builtin_prefetch(p + off + j->dist + 128, 0, HINT);                             \
            __builtin_prefetch(p + off + j->dist + 192, 0, HINT);                             \
        }                                                                                     \
        a0 += *(const v8 *)(p + off);                                                         \
        a1 += *(const v8 *)(p + off + 64);                                                    \
        a2 += *(const v8 *)(p + off + 128);                                                   \
        a3 += *(const v8 *)(p + off + 192);                                                   \
    }

static void read_once(struct job *j) {
    const char *p = j->base;
    v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    switch (j->hint) { /* the hint must be a compile-time constant */
    case 0: READ_LOOP(0) break;
    case 1: READ_LOOP(1) break;
    case 2: READ_LOOP(2) break;
    default: READ_LOOP(3) break;
    }
    j->sink += a0 + a1 + a2 + a3;
}

static pthread_barrier_t start_b, stop_b;
static struct job jobs[256];
static volatile int quit;
static int nthreads_active;

static void *worker(void *arg) {
    long id = (long)arg;
    for (;;) {
        pthread_barrier_wait(&start_b);
        if (quit) return NULL;
        if (id < nthreads_active) read_once(&jobs[id]);
        pthread_barrier_wait(&stop_b);
    }
}

static int stream(size_t mib, int maxthreads, int thp, double seconds, int ndist, char **dists) {
    size_t bytes = mib << 20;
    char *buf = alloc(bytes, thp);
    memset(buf, 1, bytes);
    if (maxthreads > 256) maxthreads = 256;
    pthread_barrier_init(&start_b, NULL, (unsigned)maxthreads + 1);
    pthread_barrier_init(&stop_b, NULL, (unsigned)maxthreads + 1);
    pthread_t th[256];
    for (long i = 0; i < maxthreads; i++) pthread_create(&th[i], NULL, worker, (void *)i);
    for (int t = 1; t <= maxthreads; t++) {
        for (int d = 0; d < ndist; d++) {
            long dist = 0;
            int hint = 3;
            sscanf(dists[d], "%ld:%d", &dist, &hint);
            size_t chunk = (bytes / (size_t)t) & ~(size_t)4095;
            for (int i = 0; i < t; i++) {
                jobs[i].base = buf + (size_t)i * chunk;
                /* stop early enough that the prefetches stay inside the buffer */
                jobs[i].bytes = chunk - (size_t)(dist + 256 + 4095) / 4096 * 4096;
                jobs[i].dist = dist;
                jobs[i].hint = hint;
            }
            nthreads_active = t;
            double best = 0, total = 0;
            int passes = 0;
            while (total < seconds || passes < 3) {
                double t0 = now();
                pthread_barrier_wait(&start_b);
                pthread_barrier_wait(&stop_b);
                double dt = now() - t0;
                double gbps = (double)jobs[0].bytes * t / dt / 1e9;
                if (gbps > best) best = gbps;
                total += dt;
                passes++;
            }
            printf("{\"kind\": \"stream\", \"threads\": %d, \"thp\": %d, \"distance\": %ld, \"hint\": %d, "
                   "\"gbps\": %.3f, \"passes\": %d, \"bytes_per_pass\": %zu}\n",
                   t, thp, dist, hint, best, passes, jobs[0].bytes * (size_t)t);
            fflush(stdout);
        }
    }
    quit = 1;
    pthread_barrier_wait(&start_b);
    for (int i = 0; i < maxthreads; i++) pthread_join(th[i], NULL);
    long long s = 0;
    for (int i = 0; i < maxthreads; i++) s += jobs[i].sink[0];
    fprintf(stderr, "sink %lld\n", s);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 4 && !strcmp(argv[1], "latency")) return latency((size_t)atol(argv[2]), atoi(argv[3]));
    if (argc >= 7 && !strcmp(argv[1], "stream"))
        return stream((size_t)atol(argv[2]), atoi(argv[3]), atoi(argv[4]), atof(argv[5]), argc - 6, argv + 6);
    fprintf(stderr, "usage: %s latency MIB THP | stream MIB MAXTHREADS THP SECONDS DIST[:HINT]...\n", argv[0]);
    return 2;
}
