/* Huge-page probe for `amppatch doctor` (amppatch/doctor.py compiles it on first use and runs it).
 *
 *   hugepage_probe DIR MIB
 *
 * file_thp       a MIB-MiB file written in DIR (unlinked at once, so nothing is left behind even on a crash),
 *                fdatasync'ed, its cached pages dropped (POSIX_FADV_DONTNEED), mapped read-only and shared
 *                as llama.cpp maps a model, advised MADV_HUGEPAGE, touched page by page. If the kernel did
 *                not place the mapping on a 2 MiB boundary, a second mapping at an aligned address is tried
 *                (file_thp_aligned).
 * collapse_anon  MADV_COLLAPSE of a touched, 2 MiB-aligned private anonymous range.
 * collapse_file  MADV_COLLAPSE of a read-only file mapping whose pages are already in the page cache
 *                (written with write(), not dropped).
 *
 * Each test prints one JSON object per line on stdout, then this process's /proc/self/smaps between
 * "#smaps-begin NAME" and "#smaps-end NAME" while the test's mapping is still in place; amppatch reads the
 * huge-page bytes of the mapping's address range from that text. Errors of a test go into its JSON object
 * ("error"); the exit status is non-zero only when the probe itself cannot run.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif

#define PMD_SIZE ((size_t)2 << 20)
#define PAGE 4096

static void dump_smaps(const char *name) {
    FILE *f = fopen("/proc/self/smaps", "r");
    printf("#smaps-begin %s\n", name);
    if (f) {
        char line[4096];
        while (fgets(line, sizeof line, f)) fputs(line, stdout);
        fclose(f);
    }
    printf("#smaps-end %s\n", name);
    fflush(stdout);
}

static const char *errname(int e) {
    switch (e) {
    case 0: return "";
    case EINVAL: return "EINVAL";
    case EAGAIN: return "EAGAIN";
    case ENOMEM: return "ENOMEM";
    case EPERM: return "EPERM";
    case EACCES: return "EACCES";
    case EBUSY: return "EBUSY";
    case EFAULT: return "EFAULT";
    case ENOSPC: return "ENOSPC";
    case EIO: return "EIO";
    default: return "errno";
    }
}

/* A file of `bytes` bytes in `dir`, already unlinked; -1 with errno on failure. */
static int make_file(const char *dir, const char *tag, size_t bytes) {
    char path[4096];
    snprintf(path, sizeof path, "%s/.amppatch-%s-%ld", dir, tag, (long)getpid());
    int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) return -1;
    unlink(path);
    char *chunk = malloc(1 << 20);
    if (!chunk) { close(fd); errno = ENOMEM; return -1; }
    for (size_t i = 0; i < (1u << 20); i++) chunk[i] = (char)(i * 131u + 7u);
    for (size_t done = 0; done < bytes; done += 1u << 20) {
        size_t n = bytes - done < (1u << 20) ? bytes - done : (1u << 20);
        if (write(fd, chunk, n) != (ssize_t)n) { int e = errno; free(chunk); close(fd); errno = e ? e : EIO; return -1; }
    }
    free(chunk);
    if (fdatasync(fd) != 0) { int e = errno; close(fd); errno = e; return -1; }
    return fd;
}

/* A PROT_NONE reservation of bytes + 2 MiB; returns the first 2 MiB boundary inside it. */
static char *aligned_reservation(size_t bytes, void **base, size_t *base_len) {
    *base_len = bytes + PMD_SIZE;
    *base = mmap(NULL, *base_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (*base == MAP_FAILED) return NULL;
    return (char *)(((uintptr_t)*base + PMD_SIZE - 1) & ~(uintptr_t)(PMD_SIZE - 1));
}

static unsigned long touch(const char *p, size_t bytes) {
    volatile unsigned long sum = 0;
    for (size_t off = 0; off < bytes; off += PAGE) sum += (unsigned char)p[off];
    return sum;
}

/* Bytes of the mapping that mincore() says are in the page cache. */
static size_t resident(void *p, size_t bytes) {
    size_t pages = bytes / PAGE, n = 0;
    unsigned char *vec = malloc(pages);
    if (!vec) return 0;
    if (mincore(p, bytes, vec) == 0)
        for (size_t i = 0; i < pages; i++) n += vec[i] & 1;
    free(vec);
    return n * PAGE;
}

static void file_thp(const char *dir, size_t bytes, int force_aligned, const char *name) {
    int fd = make_file(dir, "thp-probe", bytes);
    if (fd < 0) {
        int e = errno;
        printf("{\"test\":\"%s\",\"bytes\":%zu,\"error\":\"cannot write a %zu-byte file in %s: %s\"}\n", name,
               bytes, bytes, dir, strerror(e));
        return;
    }
    int fadv = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    void *base = NULL;
    size_t base_len = 0;
    char *want = NULL;
    if (force_aligned) want = aligned_reservation(bytes, &base, &base_len);
    char *p = mmap(want, bytes, PROT_READ, MAP_SHARED | (want ? MAP_FIXED : 0), fd, 0);
    if (p == MAP_FAILED) {
        int e = errno;
        printf("{\"test\":\"%s\",\"bytes\":%zu,\"error\":\"mmap: %s\"}\n", name, bytes, strerror(e));
        if (base) munmap(base, base_len);
        close(fd);
        return;
    }
    size_t cached_before = resident(p, bytes);
    int adv = madvise(p, bytes, MADV_HUGEPAGE);
    int adv_errno = adv ? errno : 0;
    unsigned long sum = touch(p, bytes);
    printf("{\"test\":\"%s\",\"bytes\":%zu,\"start\":%llu,\"end\":%llu,\"aligned\":%d,\"fadvise_rc\":%d,"
           "\"cached_before_touch\":%zu,\"madvise_rc\":%d,\"madvise_errno\":\"%s\",\"checksum\":%lu,"
           "\"error\":\"\"}\n",
           name, bytes, (unsigned long long)(uintptr_t)p, (unsigned long long)(uintptr_t)(p + bytes),
           ((uintptr_t)p % PMD_SIZE) == 0, fadv, cached_before, adv, errname(adv_errno), sum);
    fflush(stdout);
    dump_smaps(name);
    int was_aligned = ((uintptr_t)p % PMD_SIZE) == 0;
    if (base) munmap(base, base_len); else munmap(p, bytes);
    close(fd);
    if (!force_aligned && !was_aligned) file_thp(dir, bytes, 1, "file_thp_aligned");
}

static void collapse_anon(void) {
    const char *name = "collapse_anon";
    size_t bytes = 2 * PMD_SIZE;
    void *base;
    size_t base_len;
    char *want = aligned_reservation(bytes, &base, &base_len);
    if (!want) { printf("{\"test\":\"%s\",\"error\":\"mmap: %s\"}\n", name, strerror(errno)); return; }
    char *p = mmap(want, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    if (p == MAP_FAILED) { printf("{\"test\":\"%s\",\"error\":\"mmap: %s\"}\n", name, strerror(errno)); return; }
    madvise(p, bytes, MADV_NOHUGEPAGE);  /* faults take 4 KiB pages, so only a collapse can make a PMD */
    for (size_t off = 0; off < bytes; off += PAGE) p[off] = (char)off;
    madvise(p, bytes, MADV_HUGEPAGE);
    int rc = madvise(p, bytes, MADV_COLLAPSE);
    int e = rc ? errno : 0;
    printf("{\"test\":\"%s\",\"bytes\":%zu,\"start\":%llu,\"end\":%llu,\"rc\":%d,\"errno\":\"%s\",\"error\":\"\"}\n",
           name, bytes, (unsigned long long)(uintptr_t)p, (unsigned long long)(uintptr_t)(p + bytes), rc, errname(e));
    fflush(stdout);
    dump_smaps(name);
    munmap(base, base_len);
}

static void collapse_file(const char *dir) {
    const char *name = "collapse_file";
    size_t bytes = 2 * PMD_SIZE;
    int fd = make_file(dir, "collapse-probe", bytes);
    if (fd < 0) {
        printf("{\"test\":\"%s\",\"bytes\":%zu,\"error\":\"cannot write a file in %s: %s\"}\n", name, bytes, dir,
               strerror(errno));
        return;
    }
    void *base;
    size_t base_len;
    char *want = aligned_reservation(bytes, &base, &base_len);
    char *p = want ? mmap(want, bytes, PROT_READ, MAP_SHARED | MAP_FIXED, fd, 0) : MAP_FAILED;
    if (p == MAP_FAILED) {
        printf("{\"test\":\"%s\",\"error\":\"mmap: %s\"}\n", name, strerror(errno));
        close(fd);
        return;
    }
    size_t cached = resident(p, bytes);
    unsigned long sum = touch(p, bytes);
    int rc = madvise(p, bytes, MADV_COLLAPSE);
    int e = rc ? errno : 0;
    printf("{\"test\":\"%s\",\"bytes\":%zu,\"start\":%llu,\"end\":%llu,\"cached_before_touch\":%zu,\"rc\":%d,"
           "\"errno\":\"%s\",\"checksum\":%lu,\"error\":\"\"}\n",
           name, bytes, (unsigned long long)(uintptr_t)p, (unsigned long long)(uintptr_t)(p + bytes), cached, rc,
           errname(e), sum);
    fflush(stdout);
    dump_smaps(name);
    munmap(base, base_len);
    close(fd);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: hugepage_probe DIR MIB\n");
        return 2;
    }
    long mib = atol(argv[2]);
    if (mib < 4 || mib > 1024) {
        fprintf(stderr, "hugepage_probe: MIB must be 4..1024\n");
        return 2;
    }
    struct stat st;
    if (stat(argv[1], &st) != 0 || !S_ISDIR(st.st_mode)) {
        fprintf(stderr, "hugepage_probe: %s is not a directory\n", argv[1]);
        return 2;
    }
    setvbuf(stdout, NULL, _IOFBF, 1 << 16);
    file_thp(argv[1], (size_t)mib << 20, 0, "file_thp");
    collapse_anon();
    collapse_file(argv[1]);
    fflush(stdout);
    return 0;
}
