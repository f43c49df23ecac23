// The task kernels for any CPU: the compiler's baseline target (SSE2 on x86-64, NEON on arm64).
#define PYMAML_ISA generic
#define PYMAML_VECTOR_BYTES 16
#define PYMAML_VECTOR_REGISTERS 16
#include "kernels_impl.h"
