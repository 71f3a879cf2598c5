/* Force-included into llama.cpp's C++ sources when convllava-edge builds it with AMX (see buildflags.py).
 *
 * GCC 12's <amxtileintrin.h> declares _tile_loadconfig's memory operand as 8 bytes
 * ("m" (*((const void **)__config))), so the optimizer drops the stores that fill the other 56 bytes of
 * the 64-byte tile configuration it loads. llama.cpp's AMX kernels (ggml-cpu/amx/mmq.cpp) then run with
 * every tile unconfigured and the first tilezero raises #UD: SIGILL. Measured on a Xeon with AMX and
 * gcc 12.2: the configuration llama.cpp passes to ldtilecfg reads palette 1 and zero rows/columns.
 * The same instruction with the whole 64 bytes as its operand. */
#if defined(__x86_64__) && defined(__AMX_TILE__)
#include <immintrin.h>
#undef _tile_loadconfig
#define _tile_loadconfig(config) \
    __asm__ volatile("ldtilecfg\t%X0" :: "m"(*(const unsigned char (*)[64])(config)))
#endif
