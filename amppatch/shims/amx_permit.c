/* amppatch AMX permission shim (LD_PRELOAD): answers "granted" to the one request ggml's AMX buffer makes
 * before it registers, arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), and passes every other
 * syscall() through unchanged.
 *
 * Why: ggml compiles its AMX buffer (amx/mmq.cpp) only with -mamx-int8, and enables it at run time only
 * when the kernel grants AMX tile state. Its batch-1 kernels (tinygemm_kernel_vnni for quantized weights,
 * tinygemm_kernel_avx for F16) use AVX512(-VNNI) instructions only, so on a CPU without AMX they run
 * unchanged once the request is answered; that is how amppatch measures and patches them there. Tile
 * instructions (batch > 1) still raise SIGILL: runs of such a build use -ub 1.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdarg.h>
#include <sys/syscall.h>

#define AMPPATCH_ARCH_REQ_XCOMP_PERM 0x1023
#define AMPPATCH_XFEATURE_XTILEDATA 18

typedef long (*syscall_fn)(long, ...);

long syscall(long number, ...) {
    /* syscall() takes up to six word-sized arguments; reading six is what glibc's own wrapper does. */
    va_list ap;
    long a[6];
    va_start(ap, number);
    for (int i = 0; i < 6; i++) {
        a[i] = va_arg(ap, long);
    }
    va_end(ap);
#ifdef SYS_arch_prctl
    if (number == SYS_arch_prctl && a[0] == AMPPATCH_ARCH_REQ_XCOMP_PERM && a[1] == AMPPATCH_XFEATURE_XTILEDATA) {
        return 0;
    }
#endif
    static syscall_fn real;
    if (real == 0) {
        real = (syscall_fn)dlsym(RTLD_NEXT, "syscall");
    }
    return real(number, a[0], a[1], a[2], a[3], a[4], a[5]);
}
