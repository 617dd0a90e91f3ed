"""amppatch: compiler-guided software prefetching for llama.cpp's CPU kernels, measured and reproducible."""

__version__ = "0.1.0"
