/* Kernel roofline probe for `amppatch roofline` (amppatch/roofline.py compiles it against one llama.cpp
 * build: the tree's ggml headers, the build's libggml / libggml-cpu / libggml-base).
 *
 *   roofline TYPE WIDTH THREADS CACHE_BYTES STREAM_BYTES REPEATS SECONDS BUFFER
 *
 * One ggml graph with one MUL_MAT: a weight matrix of ggml type TYPE, WIDTH columns (the model's row width)
 * and as many rows as fill CACHE_BYTES (small enough to stay cache-resident) or STREAM_BYTES (many times
 * the LLC, on 4 KiB pages: MADV_NOHUGEPAGE before the first touch), times one f32 activation column (n = 1,
 * token generation), computed by the CPU backend with THREADS threads. The weights live where llama.cpp
 * would put them: BUFFER "auto" asks every extra buffer type of the CPU device (CPU_REPACK, AMX) whether it
 * takes a MUL_MAT with these weights, exactly as llama.cpp's loader does, and falls back to the plain CPU
 * buffer; "cpu" forces the plain buffer (the vec_dot path), any other value names the buffer type.
 *
 * REPEATS rounds, each measuring both sizes (cache then stream, or stream then cache on odd rounds, so the
 * two interleave); a cache measurement first recomputes until the weights are back in cache. Each
 * measurement recomputes the graph for at least SECONDS (and at least 3 times) and reports weight bytes
 * per second. Output: JSON objects, one per line; at the end the process's /proc/self/smaps between
 * "#smaps-begin roofline" and "#smaps-end roofline" (amppatch reads the weights' page sizes from it).
 * Bad arguments: one line on stderr, exit 2.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <time.h>

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

#define MAX_ROWS_MULTIPLE 16 /* row counts are multiples of this (the repack layouts interleave 4 or 8 rows) */

static double clock_seconds(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double now(void) { return clock_seconds(CLOCK_MONOTONIC); }

static void fail(const char *msg, const char *arg) {
    fprintf(stderr, "roofline: %s%s\n", msg, arg ? arg : "");
    exit(2);
}

typedef struct {
    const char *label;
    int64_t rows;
    size_t bytes;
    struct ggml_context *ctx;
    ggml_backend_buffer_t wbuf, abuf;
    struct ggml_tensor *w, *x, *y;
    struct ggml_cgraph *graph;
} Set;

static enum ggml_type parse_type(const char *name) {
    for (int t = 0; t < GGML_TYPE_COUNT; t++) {
        const char *tn = ggml_type_name((enum ggml_type)t);
        if (tn && strcasecmp(tn, name) == 0 && ggml_blck_size((enum ggml_type)t) > 0) return (enum ggml_type)t;
    }
    fail("unknown ggml type ", name);
    return GGML_TYPE_COUNT;
}

/* Does buffer type `buft` take a MUL_MAT with weights shaped like `w`? (llama.cpp's weight_buft_supported) */
static int buft_takes(ggml_backend_dev_t dev, ggml_backend_buffer_type_t buft, enum ggml_type type, int64_t width,
                      int64_t rows) {
    struct ggml_init_params p = {ggml_tensor_overhead() * 8, NULL, true};
    struct ggml_context *ctx = ggml_init(p);
    struct ggml_tensor *w = ggml_new_tensor_2d(ctx, type, width, rows);
    struct ggml_tensor *b = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, width, 512);
    struct ggml_tensor *op = ggml_mul_mat(ctx, w, b);
    ggml_backend_buffer_t dummy = ggml_backend_buft_alloc_buffer(buft, 0);
    w->buffer = dummy;
    int ok = ggml_backend_dev_supports_op(dev, op);
    w->buffer = NULL;
    ggml_backend_buffer_free(dummy);
    ggml_free(ctx);
    return ok;
}

static ggml_backend_buffer_type_t choose_buft(ggml_backend_dev_t dev, const char *want, enum ggml_type type,
                                              int64_t width, int64_t rows) {
    ggml_backend_buffer_type_t cpu = ggml_backend_dev_buffer_type(dev);
    if (strcasecmp(want, "cpu") == 0) return cpu;
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    ggml_backend_dev_get_extra_bufts_t get_extra =
        (ggml_backend_dev_get_extra_bufts_t)ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    printf("{\"event\":\"buffers\",\"offered\":[");
    int first = 1;
    ggml_backend_buffer_type_t found = NULL;
    if (get_extra) {
        for (ggml_backend_buffer_type_t *e = get_extra(dev); e && *e; e++) {
            int takes = buft_takes(dev, *e, type, width, rows);
            printf("%s{\"name\":\"%s\",\"takes\":%d}", first ? "" : ",", ggml_backend_buft_name(*e), takes);
            first = 0;
            int named = strcasecmp(want, ggml_backend_buft_name(*e)) == 0;
            if (!found && ((strcasecmp(want, "auto") == 0 && takes) || named)) {
                if (named && !takes) {
                    printf("]}\n");
                    fail("this buffer type does not take these weights: ", want);
                }
                found = *e;
            }
        }
    }
    printf("]}\n");
    if (found) return found;
    if (strcasecmp(want, "auto") == 0) return cpu;
    fail("the CPU device offers no buffer type named ", want);
    return NULL;
}

static void no_huge_pages(void *data, size_t bytes) {
    uintptr_t lo = ((uintptr_t)data + 4095) & ~(uintptr_t)4095;
    uintptr_t hi = ((uintptr_t)data + bytes) & ~(uintptr_t)4095;
    if (hi > lo) madvise((void *)lo, hi - lo, MADV_NOHUGEPAGE);
}

static void setup(Set *s, ggml_backend_t backend, ggml_backend_buffer_type_t buft, enum ggml_type type, int64_t width,
                  int stream) {
    size_t ov = ggml_tensor_overhead() * 8 + ggml_graph_overhead();
    struct ggml_init_params p = {ov, NULL, true};
    s->ctx = ggml_init(p);
    s->w = ggml_new_tensor_2d(s->ctx, type, width, s->rows);
    ggml_set_name(s->w, "weights");
    s->x = ggml_new_tensor_2d(s->ctx, GGML_TYPE_F32, width, 1);
    s->y = ggml_mul_mat(s->ctx, s->w, s->x);
    s->bytes = ggml_nbytes(s->w);

    /* the weights alone in a buffer of `buft`, the activation and result in a plain CPU buffer */
    s->wbuf = ggml_backend_buft_alloc_buffer(buft, ggml_backend_buft_get_alloc_size(buft, s->w));
    if (!s->wbuf) fail("cannot allocate the weight buffer", NULL);
    ggml_backend_buffer_set_usage(s->wbuf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    if (stream) no_huge_pages(ggml_backend_buffer_get_base(s->wbuf), ggml_backend_buffer_get_size(s->wbuf));
    struct ggml_tallocr ta = ggml_tallocr_new(s->wbuf);
    ggml_tallocr_alloc(&ta, s->w);
    ggml_backend_buffer_type_t cpu = ggml_backend_get_default_buffer_type(backend);
    size_t abytes = ggml_backend_buft_get_alloc_size(cpu, s->x) + ggml_backend_buft_get_alloc_size(cpu, s->y) +
                    2 * ggml_backend_buft_get_alignment(cpu);
    s->abuf = ggml_backend_buft_alloc_buffer(cpu, abytes);
    struct ggml_tallocr tb = ggml_tallocr_new(s->abuf);
    ggml_tallocr_alloc(&tb, s->x);
    ggml_tallocr_alloc(&tb, s->y);

    /* values do not change the speed: quantize 64 rows of pseudo-random floats once and repeat them */
    const int64_t block_rows = 64;
    float *src = malloc(sizeof(float) * (size_t)(width * block_rows));
    size_t row_bytes = ggml_row_size(type, width);
    char *block = malloc(row_bytes * (size_t)block_rows);
    uint64_t state = 0x9E3779B97F4A7C15ull;
    for (int64_t i = 0; i < width * block_rows; i++) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        src[i] = (float)((int64_t)(state >> 33) - (1ll << 30)) / (float)(1ll << 30);
    }
    ggml_quantize_chunk(type, src, block, 0, block_rows, width, NULL);
    char *all = malloc(s->bytes);
    if (!src || !block || !all) fail("out of memory filling the weights", NULL);
    for (int64_t r = 0; r < s->rows; r += block_rows) {
        int64_t n = s->rows - r < block_rows ? s->rows - r : block_rows;
        memcpy(all + (size_t)r * row_bytes, block, (size_t)n * row_bytes);
    }
    ggml_backend_tensor_set(s->w, all, 0, s->bytes); /* a repack buffer converts the layout here */
    free(all);
    ggml_backend_tensor_set(s->x, src, 0, sizeof(float) * (size_t)width);
    free(block);
    free(src);

    s->graph = ggml_new_graph(s->ctx);
    ggml_build_forward_expand(s->graph, s->y);
}

static void compute(ggml_backend_t backend, Set *s) {
    if (ggml_backend_graph_compute(backend, s->graph) != GGML_STATUS_SUCCESS) fail("graph compute failed", NULL);
}

static void measure(ggml_backend_t backend, Set *s, int repeat, double seconds, int stream, int threads) {
    /* bring cache-resident weights back into cache (the other size evicted them); one pass otherwise */
    double t0 = now();
    int warm = 0;
    do { compute(backend, s); warm++; } while (!stream && (warm < 3 || now() - t0 < seconds / 4));
    int n = 0;
    t0 = now();
    double c0 = clock_seconds(CLOCK_PROCESS_CPUTIME_ID);
    double t;
    do { compute(backend, s); n++; t = now() - t0; } while (n < 3 || t < seconds);
    double cpu = clock_seconds(CLOCK_PROCESS_CPUTIME_ID) - c0;
    /* cpu_share: CPU time this process got over threads x wall time; below 1 when other processes took
     * the cores (the wall-clock rate is then depressed). */
    printf("{\"event\":\"sample\",\"label\":\"%s\",\"repeat\":%d,\"computes\":%d,\"seconds\":%.6f,"
           "\"cpu_seconds\":%.6f,\"cpu_share\":%.4f,\"bytes\":%zu,\"gbps\":%.4f}\n", s->label, repeat, n, t, cpu,
           cpu / (threads * t), s->bytes, (double)s->bytes * n / t / 1e9);
    fflush(stdout);
}

static int64_t rows_for(size_t bytes, size_t row_bytes) {
    int64_t rows = (int64_t)(bytes / row_bytes) / MAX_ROWS_MULTIPLE * MAX_ROWS_MULTIPLE;
    return rows < MAX_ROWS_MULTIPLE ? MAX_ROWS_MULTIPLE : rows;
}

int main(int argc, char **argv) {
    if (argc != 9) fail("usage: roofline TYPE WIDTH THREADS CACHE_BYTES STREAM_BYTES REPEATS SECONDS BUFFER", NULL);
    enum ggml_type type = parse_type(argv[1]);
    int64_t width = atoll(argv[2]);
    int threads = atoi(argv[3]);
    size_t cache_bytes = strtoull(argv[4], NULL, 10), stream_bytes = strtoull(argv[5], NULL, 10);
    int repeats = atoi(argv[6]);
    double seconds = atof(argv[7]);
    const char *want = argv[8];
    if (width <= 0 || width % ggml_blck_size(type) != 0) fail("WIDTH must be a positive multiple of the block size", NULL);
    if (threads <= 0 || repeats <= 0 || seconds <= 0 || cache_bytes == 0 || stream_bytes == 0) fail("bad arguments", NULL);
    if (ggml_quantize_requires_imatrix(type)) fail("this type needs an importance matrix to quantize: ", argv[1]);

    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (!dev) fail("this ggml has no CPU device", NULL);
    ggml_backend_t backend = ggml_backend_dev_init(dev, NULL);
    if (!backend) fail("cannot start the CPU backend", NULL);
    ggml_backend_cpu_set_n_threads(backend, threads);

    size_t row_bytes = ggml_row_size(type, width);
    Set sets[2] = {{.label = "cache"}, {.label = "stream"}};
    sets[0].rows = rows_for(cache_bytes, row_bytes);
    sets[1].rows = rows_for(stream_bytes, row_bytes);
    ggml_backend_buffer_type_t buft = choose_buft(dev, want, type, width, sets[0].rows);
    for (int i = 0; i < 2; i++) setup(&sets[i], backend, buft, type, width, i == 1);

    printf("{\"event\":\"setup\",\"type\":\"%s\",\"width\":%lld,\"threads\":%d,\"buffer\":\"%s\",\"sets\":[",
           ggml_type_name(type), (long long)width, threads, ggml_backend_buft_name(buft));
    for (int i = 0; i < 2; i++) {
        char *base = (char *)sets[i].w->data;
        printf("%s{\"label\":\"%s\",\"rows\":%lld,\"bytes\":%zu,\"start\":%llu,\"end\":%llu}", i ? "," : "",
               sets[i].label, (long long)sets[i].rows, sets[i].bytes, (unsigned long long)(uintptr_t)base,
               (unsigned long long)(uintptr_t)(base + sets[i].bytes));
    }
    printf("]}\n");
    fflush(stdout);

    for (int r = 0; r < repeats; r++) {
        int first = r % 2; /* 0: cache first, 1: stream first */
        for (int k = 0; k < 2; k++) {
            int i = k ^ first;
            measure(backend, &sets[i], r, seconds, i == 1, threads);
        }
    }

    FILE *f = fopen("/proc/self/smaps", "r");
    printf("#smaps-begin roofline\n");
    if (f) {
        char line[4096];
        while (fgets(line, sizeof line, f)) fputs(line, stdout);
        fclose(f);
    }
    printf("#smaps-end roofline\n");
    for (int i = 0; i < 2; i++) {
        ggml_backend_buffer_free(sets[i].wbuf);
        ggml_backend_buffer_free(sets[i].abuf);
        ggml_free(sets[i].ctx);
    }
    ggml_backend_free(backend);
    return 0;
}
