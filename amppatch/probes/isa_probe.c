/* amppatch ISA execution probe: runs one instruction family chosen by argv[1] and prints a checksum.
 * Compiled with -march=native; a feature the CPU advertises but does not execute dies here by SIGILL,
 * in this child, instead of inside llama.cpp. */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static volatile int32_t seed = 3;

#if defined(__AMX_TILE__)
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
struct tile_config {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};
static int amx_setup(void) {
    /* Linux hands out AMX state only on request; without it the first tile instruction faults anyway. */
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) {
        fprintf(stderr, "arch_prctl(ARCH_REQ_XCOMP_PERM) refused\n");
        return 0;
    }
    struct tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int i = 0; i < 3; i++) { cfg.rows[i] = 16; cfg.colsb[i] = 64; }
    _tile_loadconfig(&cfg);
    return 1;
}
#endif

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    const char *f = argv[1];
    int32_t out[16] = {0};
#if defined(__AVX2__)
    if (!strcmp(f, "avx2")) {
        __m256i a = _mm256_set1_epi32(seed);
        _mm256_storeu_si256((__m256i *)out, _mm256_add_epi32(a, a));
        printf("%d\n", out[0]); return 0;
    }
#endif
#if defined(__AVX512F__)
    if (!strcmp(f, "avx512f")) {
        __m512i a = _mm512_set1_epi32(seed);
        _mm512_storeu_si512(out, _mm512_add_epi32(a, a));
        printf("%d\n", out[0]); return 0;
    }
#endif
#if defined(__AVX512VNNI__)
    if (!strcmp(f, "avx512vnni")) {
        __m512i a = _mm512_set1_epi32(seed);
        _mm512_storeu_si512(out, _mm512_dpbusd_epi32(a, a, a));
        printf("%d\n", out[0]); return 0;
    }
#endif
#if defined(__AVX512BF16__)
    if (!strcmp(f, "avx512bf16")) {
        __m512 z = _mm512_set1_ps((float)seed);
        __m512bh b = _mm512_cvtne2ps_pbh(z, z);
        __m512 r = _mm512_dpbf16_ps(z, b, b);
        printf("%f\n", (double)_mm512_reduce_add_ps(r)); return 0;
    }
#endif
#if defined(__AVXVNNI__)
    if (!strcmp(f, "avxvnni")) {
        __m256i a = _mm256_set1_epi32(seed);
        _mm256_storeu_si256((__m256i *)out, _mm256_dpbusd_avx_epi32(a, a, a));
        printf("%d\n", out[0]); return 0;
    }
#endif
#if defined(__AMX_TILE__)
    if (!strcmp(f, "amx-tile")) {
        if (!amx_setup()) return 3;
        _tile_zero(0);
        _tile_stored(0, out, 64);
        _tile_release();
        printf("%d\n", out[0]); return 0;
    }
#endif
#if defined(__AMX_INT8__)
    if (!strcmp(f, "amx-int8")) {
        static int8_t buf[16 * 64];
        static int32_t acc[16 * 16];
        memset(buf, seed, sizeof buf);
        if (!amx_setup()) return 3;
        _tile_zero(0);
        _tile_loadd(1, buf, 64);
        _tile_loadd(2, buf, 64);
        _tile_dpbssd(0, 1, 2);
        _tile_stored(0, acc, 64);
        _tile_release();
        printf("%d\n", acc[0]); return 0;
    }
#endif
    fprintf(stderr, "feature %s not compiled into this probe\n", f);
    return 4;
}
