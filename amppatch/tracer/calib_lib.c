/* Empty stand-ins with llama's token-boundary signatures, for measuring what the tracer adds to a call
 * (calib.c calls them through calib_call_*, i.e. from inside this library through the PLT, exactly as
 * libllama-bench-impl calls into libllama). */
#include <stdint.h>

struct batch { int32_t n_tokens; void *p[6]; };

__attribute__((noinline)) int32_t llama_decode(void *ctx, struct batch b) { __asm__ volatile("" ::"r"(ctx)); return b.n_tokens - 1; }
__attribute__((noinline)) int32_t llama_process(void *ctx, int type, void *b) { __asm__ volatile("" ::"r"(ctx), "r"(b)); return type - 1; }
__attribute__((noinline)) void llama_synchronize(void *ctx) { __asm__ volatile("" ::"r"(ctx)); }

int32_t calib_call_decode(void *ctx, struct batch b) { return llama_decode(ctx, b); }
int32_t calib_call_process(void *ctx, int type, void *b) { return llama_process(ctx, type, b); }
void calib_call_synchronize(void *ctx) { llama_synchronize(ctx); }
