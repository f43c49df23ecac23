// The task kernels for AVX2 + FMA (x86-64, Haswell and later), used only when the CPU has it (kernels.cpp checks at run
// time). Elsewhere this file compiles to nothing.
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC target("avx2,fma")
#endif
#define PYMAML_ISA avx2
#define PYMAML_VECTOR_BYTES 32
#define PYMAML_VECTOR_REGISTERS 16
#include "kernels_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
