// q4_capi.cu: what the library says about itself, for q4lab/kernels.py (ctypes) to check before use.
#include "q4_port.h"

#ifndef Q4_SOURCE_HASH
#define Q4_SOURCE_HASH "unknown"
#endif
#ifndef Q4_TARGETS
#define Q4_TARGETS "unknown"
#endif

extern "C" {
const char* q4_source_hash() { return Q4_SOURCE_HASH; }  // hash of kernels/ the library was built from
const char* q4_targets() { return Q4_TARGETS; }          // "sm_80,sm_90" or "gfx1100"
const char* q4_error_string(int err) { return q4_error_name(static_cast<q4_err_t>(err)); }
int q4_warp_size() { return Q4_WARP; }
}
