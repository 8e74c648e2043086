// q4_decode.h: how a 4-bit weight becomes a number, shared by the fused GEMM and the dequantize kernel.
//
// Layout (bitsandbytes'): W[N, K] flattened row-major, two codes a byte, the even element in the HIGH
// nibble; one absmax per `blocksize` consecutive elements. Nested: absmax is a uint8 index into the signed
// 8-bit dynamic code, scaled per 256 absmax blocks by nested_absmax and shifted back by nested_offset.
#pragma once
#include "q4_port.h"

struct Q4Weights {
  const uint8_t* packed;        // N*K/2 bytes
  const void* absmax;           // float[nblocks], or uint8[nblocks] when nested
  const float* nested_absmax;   // float[ceil(nblocks/256)]   (nested only)
  const float* nested_code;     // float[256]                  (nested only)
  float nested_offset;          //                              (nested only)
  const float* code;            // float[16]: the NF4 or FP4 table the weight was quantized with
  int N, K;
  int blocksize_log2;           // blocksize is a power of two: block index is a shift, not a division
};

// The 16-entry code table lives in shared memory: 16 floats sit in 16 distinct banks, so a warp's 32
// random lookups are conflict-free (same entry = broadcast) and cost one LDS each, where constant memory
// would serialize on divergent indices. The 256-entry nested code is only read once per 32 weights.
template <bool NESTED>
struct __align__(256) Q4Tables {  // 256-aligned: q4_decode8 ORs the code offset into the base address
  float code[16];
  float nested_code[NESTED ? 256 : 1];
#if Q4_DOT2_F16
  uint16_t code_f16[16];  // the table rounded to fp16 (2^-12 relative), for q4_decode8_f16x2
#endif
};

template <bool NESTED>
__device__ __forceinline__ void q4_load_tables(Q4Tables<NESTED>& t, const Q4Weights& w) {
  for (int i = threadIdx.x; i < 16; i += blockDim.x) {
    t.code[i] = w.code[i];
#if Q4_DOT2_F16
    t.code_f16[i] = __half_as_ushort(__float2half_rn(w.code[i]));
#endif
  }
  if constexpr (NESTED)
    for (int i = threadIdx.x; i < 256; i += blockDim.x) t.nested_code[i] = w.nested_code[i];
  __syncthreads();
}

// A block's scale is fetched (q4_scale_load) apart from being decoded (q4_scale_value), so a kernel can
// issue the fetch together with its weight loads, a pipeline stage ahead, instead of paying a second
// dependent DRAM round trip when it decodes.
struct Q4Scale {
  float absmax;   // the float32 absmax, or when nested the float32 nested_absmax of its group of 256
  uint32_t code;  // nested only: the 8-bit code of the absmax
};

template <bool NESTED>
__device__ __forceinline__ Q4Scale q4_scale_load(const Q4Weights& w, long b) {
  if constexpr (NESTED)
    return {q4_load_cached(w.nested_absmax + (b >> 8)), q4_load_cached(static_cast<const uint8_t*>(w.absmax) + b)};
  else
    return {q4_load_cached(static_cast<const float*>(w.absmax) + b), 0u};
}

template <bool NESTED>
__device__ __forceinline__ float q4_scale_value(const Q4Tables<NESTED>& t, const Q4Weights& w, Q4Scale s) {
  if constexpr (NESTED) return t.nested_code[s.code] * s.absmax + w.nested_offset;
  else return s.absmax;
}

// The 8 weights of a 32-bit word (byte j/2, even j in the high nibble), decoded through the table.
// Two mask-and-shift ops turn all 8 codes into byte offsets (code*4) at once. On NVIDIA one byte permute
// (PRMT) per weight then builds the whole shared-memory address: the offset byte from the codes and the
// upper three bytes from the table's 256-byte-aligned base, so no add is needed before the LDS (1.25
// integer ops a weight, down from a shift, a mask and an add). On AMD v_perm_b32 lifts the offset and
// the base goes into ds_read's immediate offset field.
#if defined(Q4_AMD)
// Byte b of x, zero-extended, in one v_perm_b32 (selector 0x0c: a zero byte). HIP's __byte_perm is
// written in plain C and clang 15 lowers it to a shift and a mask: two ops a weight instead of one.
__device__ __forceinline__ uint32_t q4_byte(uint32_t x, int b) { return __builtin_amdgcn_perm(0u, x, 0x0c0c0c00u + b); }
#endif

__device__ __forceinline__ void q4_decode8(const float* code, uint32_t word, float v[8]) {
  const uint32_t even4 = (word >> 2) & 0x3c3c3c3cu;  // high nibbles (elements 0,2,4,6) times 4
  const uint32_t odd4 = (word << 2) & 0x3c3c3c3cu;   // low nibbles (elements 1,3,5,7) times 4
#if defined(Q4_NVIDIA)
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(code));
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    const uint32_t ea = __byte_perm(even4, base, 0x7650 + b), oa = __byte_perm(odd4, base, 0x7650 + b);
    asm("ld.shared.f32 %0, [%1];" : "=f"(v[2 * b]) : "r"(ea));
    asm("ld.shared.f32 %0, [%1];" : "=f"(v[2 * b + 1]) : "r"(oa));
  }
#else
  const char* base = reinterpret_cast<const char*>(code);
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    v[2 * b] = *reinterpret_cast<const float*>(base + q4_byte(even4, b));
    v[2 * b + 1] = *reinterpret_cast<const float*>(base + q4_byte(odd4, b));
  }
#endif
}

#if Q4_DOT2_F16
// The same 8 weights as 4 packed fp16 pairs (element 2b in the low half of pair b), the operand form of
// q4_dot2_f16. The fp16 table is 32 bytes in 8 banks: two different codes of one dword are a broadcast,
// so a wave's lookups stay conflict-free. On RDNA the high half of each pair loads straight into the
// upper half of its register (ds_load_u16_d16_hi): a pair costs its two LDS reads and nothing more. CDNA
// (gfx90a/gfx940, where sramecc forbids the half-register write) adds one v_lshl_or_b32 a pair.
__device__ __forceinline__ void q4_decode8_f16x2(const uint16_t* code, uint32_t word, uint32_t v[4]) {
  const char* base = reinterpret_cast<const char*>(code);
  const uint32_t even2 = (word >> 3) & 0x1e1e1e1eu;  // high nibbles (elements 0,2,4,6) times 2
  const uint32_t odd2 = (word << 1) & 0x1e1e1e1eu;   // low nibbles (elements 1,3,5,7) times 2
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    const q4_half2_t pair = {*reinterpret_cast<const _Float16*>(base + q4_byte(even2, b)),
                             *reinterpret_cast<const _Float16*>(base + q4_byte(odd2, b))};
    v[b] = __builtin_bit_cast(uint32_t, pair);
  }
}
#endif
