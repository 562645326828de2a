// Small helpers shared by the kernel families.
#pragma once
#include "simt.h"

namespace lf {

__device__ __forceinline__ bool aligned_to(const void* p, unsigned bytes) {
    return reinterpret_cast<unsigned long long>(p) % bytes == 0;
}

}  // namespace lf
