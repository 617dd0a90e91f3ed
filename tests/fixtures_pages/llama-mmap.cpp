// A stand-in for llama.cpp's weight mapping, written for amppatch's tests: the same shape of code the
// huge-page lever edits (a POSIX `llama_mmap::impl` whose constructor maps the file read-only), small enough
// to compile and run in a test. Built with -DFX_MAIN it maps the file named on the command line and prints
// how many bytes of that mapping the kernel maps with PMDs.
#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define LLAMA_LOG_WARN(...) fprintf(stderr, __VA_ARGS__)
#define LLAMA_LOG_INFO(...) fprintf(stderr, __VA_ARGS__)

static std::string format(const char * fmt, ...) {
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    return buf;
}

struct llama_file {
    int fd;
    size_t bytes;
    size_t size() const { return bytes; }
    int file_id() const { return fd; }
};

struct llama_mmap {
    struct impl;
};

struct llama_mmap::impl {
#ifdef _POSIX_MAPPED_FILES
    void * addr = nullptr;
    size_t size = 0;

    impl(struct llama_file * file, size_t prefetch) {
        size = file->size();
        int fd = file->file_id();
        int flags = MAP_SHARED;
#ifdef __linux__
        if (prefetch) { flags |= MAP_POPULATE; }
#endif
        addr = mmap(NULL, file->size(), PROT_READ, flags, fd, 0);
        if (addr == MAP_FAILED) {
            throw std::runtime_error(format("mmap failed: %s", strerror(errno)));
        }
    }

    ~impl() { munmap(addr, size); }
#endif
};

#ifdef FX_MAIN
static size_t pmd_kib(const void * addr) {
    FILE * f = fopen("/proc/self/smaps", "r");
    char line[512];
    bool inside = false;
    size_t kib = 0;
    while (f && fgets(line, sizeof(line), f)) {
        unsigned long lo = 0, hi = 0;
        if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2) {
            inside = lo <= (unsigned long) addr && (unsigned long) addr < hi;
        } else if (inside && sscanf(line, "FilePmdMapped: %zu kB", &kib) == 1) {
            break;
        }
    }
    if (f) fclose(f);
    return kib;
}

int main(int argc, char ** argv) {
    int fd = open(argv[1], O_RDONLY);
    struct stat st;
    fstat(fd, &st);
    llama_file file{fd, (size_t) st.st_size};
    llama_mmap::impl map(&file, argc > 2 ? 0 : 1);
    unsigned long sum = 0;
    for (size_t i = 0; i < map.size; i += 4096) sum += ((const unsigned char *) map.addr)[i];
    printf("pmd_kib=%zu sum=%lu\n", pmd_kib(map.addr), sum);
    return 0;
}
#endif
