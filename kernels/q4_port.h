// q4_port.h: where the vendor a kernel is compiled for is decided (Q4_AMD / Q4_NVIDIA).
//
// Every kernel in kernels/ is plain CUDA C++ that includes this header; hipcc (AMD, wave32 RDNA or wave64
// CDNA) and nvcc (NVIDIA) both build it. What differs per vendor lives here: the wavefront width, the
// cross-lane reduction, the cache hints on loads, and the error/stream types of the C interface. The one
// other vendor branch is q4_decode.h's table lookup, which each vendor's byte-permute instruction shapes.
#pragma once
#include <stdint.h>

#if defined(__HIPCC__) || defined(__HIP_PLATFORM_AMD__)
#include <hip/hip_runtime.h>
#include <hip/hip_fp16.h>
#define Q4_AMD 1
typedef hipStream_t q4_stream_t;
typedef hipError_t q4_err_t;
#define q4_success hipSuccess
#define q4_invalid_value hipErrorInvalidValue
#define q4_get_last_error hipGetLastError
#define q4_error_name hipGetErrorString
#define q4_get_device hipGetDevice
#define q4_device_attribute hipDeviceGetAttribute
#define q4_attr_sm_count hipDeviceAttributeMultiprocessorCount
#define q4_occupancy hipOccupancyMaxActiveBlocksPerMultiprocessor
#else
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#define Q4_NVIDIA 1
typedef cudaStream_t q4_stream_t;
typedef cudaError_t q4_err_t;
#define q4_success cudaSuccess
#define q4_invalid_value cudaErrorInvalidValue
#define q4_get_last_error cudaGetLastError
#define q4_error_name cudaGetErrorString
#define q4_get_device cudaGetDevice
#define q4_device_attribute cudaDeviceGetAttribute
#define q4_attr_sm_count cudaDevAttrMultiProcessorCount
#define q4_occupancy cudaOccupancyMaxActiveBlocksPerMultiprocessor
#endif

// Wavefront width. RDNA (gfx10xx/gfx11xx/gfx12xx) runs wave32 by default; CDNA (gfx9xx) only wave64.
// The device pass of hipcc defines __AMDGCN_WAVEFRONT_SIZE; the host pass never indexes lanes.
#if defined(Q4_AMD) && defined(__AMDGCN_WAVEFRONT_SIZE)
#define Q4_WARP __AMDGCN_WAVEFRONT_SIZE
#else
#define Q4_WARP 32
#endif

// Packed fp16 dot product into fp32, c + a.lo*b.lo + a.hi*b.hi in one VALU op (v_dot2_f32_f16, LLVM's
// dot7-insts): fp16 activations then feed the multiply as loaded, without the two widening converts a
// pair and with half the multiply instructions. Arch-guarded: gfx900/gfx90c/gfx1010 lack it (hipcc
// refuses the builtin there), and the host pass never multiplies. NVIDIA has no fp32-accumulating fp16
// dot in its SIMT pipes before sm_100, so it keeps the fp32 FMAs.
#if defined(Q4_AMD) && (defined(__gfx906__) || defined(__gfx908__) || defined(__gfx90a__) ||                \
                        defined(__gfx940__) || defined(__gfx941__) || defined(__gfx942__) ||                 \
                        defined(__gfx950__) || defined(__gfx1011__) || defined(__gfx1012__) ||               \
                        defined(__gfx1030__) || defined(__gfx1031__) || defined(__gfx1032__) ||              \
                        defined(__gfx1033__) || defined(__gfx1034__) || defined(__gfx1035__) ||              \
                        defined(__gfx1036__) || defined(__gfx1100__) || defined(__gfx1101__) ||              \
                        defined(__gfx1102__) || defined(__gfx1103__) || defined(__gfx1150__) ||              \
                        defined(__gfx1151__) || defined(__gfx1200__) || defined(__gfx1201__))
#define Q4_DOT2_F16 1
typedef _Float16 q4_half2_t __attribute__((ext_vector_type(2)));
__device__ __forceinline__ float q4_dot2_f16(uint32_t a, uint32_t b, float c) {
  return __builtin_amdgcn_fdot2(__builtin_bit_cast(q4_half2_t, a), __builtin_bit_cast(q4_half2_t, b), c, false);
}
#else
#define Q4_DOT2_F16 0
#endif

// Activation dtypes, numbered as the C interface passes them.
enum { Q4_F16 = 0, Q4_BF16 = 1, Q4_F32 = 2 };

// Streamed-once weight load: 16 bytes. On NVIDIA `ld.global.nc.L1::no_allocate` keeps the 4-bit stream
// out of L1, which stays free for the activations every warp of the SM re-reads, and `L2::256B` asks L2
// to fetch the whole 256-byte sector group, the next lanes' bytes, in one DRAM request. On AMD the
// nontemporal load sets the streaming (SLC/NT) bits for the same purpose.
__device__ __forceinline__ uint4 q4_load_stream16(const void* p) {
#if defined(Q4_NVIDIA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
#elif defined(Q4_AMD)
  const uint4* q = reinterpret_cast<const uint4*>(p);
  uint4 v;
  v.x = __builtin_nontemporal_load(&q->x);
  v.y = __builtin_nontemporal_load(&q->y);
  v.z = __builtin_nontemporal_load(&q->z);
  v.w = __builtin_nontemporal_load(&q->w);
  return v;
#else
  return *reinterpret_cast<const uint4*>(p);
#endif
}

// The same stream for one 4-byte word (the interleaved simt layout: a warp's 32 words are one line).
__device__ __forceinline__ uint32_t q4_load_stream4(const uint32_t* p) {
#if defined(Q4_NVIDIA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
#elif defined(Q4_AMD)
  return __builtin_nontemporal_load(p);
#else
  return *p;
#endif
}

// Re-read operands (activations, absmax): the read-only path, cached in L1 on both vendors.
template <typename T>
__device__ __forceinline__ T q4_load_cached(const T* p) {
#if defined(Q4_NVIDIA)
  return __ldg(p);
#else
  return *p;
#endif
}

// Sum over the wavefront; every lane gets the total.
#if defined(Q4_AMD)
// DPP row_ror:n (dpp_ctrl 0x120+n) rotates within each row of 16 lanes for free inside the VALU add, so
// the first four steps never touch the LDS crossbar that __shfl_xor (ds_bpermute) would use; only the
// cross-row steps (16, and 32 on wave64) need a real lane exchange.
__device__ __forceinline__ float q4_dpp_ror(float v, int n) {
  int x = __float_as_int(v), r;
  switch (n) {
    case 8: r = __builtin_amdgcn_update_dpp(x, x, 0x128, 0xF, 0xF, false); break;
    case 4: r = __builtin_amdgcn_update_dpp(x, x, 0x124, 0xF, 0xF, false); break;
    case 2: r = __builtin_amdgcn_update_dpp(x, x, 0x122, 0xF, 0xF, false); break;
    default: r = __builtin_amdgcn_update_dpp(x, x, 0x121, 0xF, 0xF, false); break;
  }
  return __int_as_float(r);
}
__device__ __forceinline__ float q4_warp_sum(float v) {
  v += q4_dpp_ror(v, 8);
  v += q4_dpp_ror(v, 4);
  v += q4_dpp_ror(v, 2);
  v += q4_dpp_ror(v, 1);
  v += __shfl_xor(v, 16);
#if Q4_WARP == 64
  v += __shfl_xor(v, 32);
#endif
  return v;
}
#else
// Butterfly over __shfl_xor_sync: five register-to-register exchanges, no shared memory, no barrier.
__device__ __forceinline__ float q4_warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
#endif

// Lane `src`'s value of v, for every lane (ds_bpermute on AMD, SHFL on NVIDIA).
__device__ __forceinline__ float q4_shfl(float v, int src) {
#if defined(Q4_AMD)
  return __shfl(v, src);
#else
  return __shfl_sync(0xffffffffu, v, src);
#endif
}

// Activation conversions. bf16 is handled as raw bits so the same code builds with HIP 5.x, which has
// no portable bf16 vector type: widening is a 16-bit shift, narrowing rounds to nearest even.
__device__ __forceinline__ float q4_bf16_to_float(uint32_t bits16) { return __int_as_float(bits16 << 16); }
__device__ __forceinline__ uint16_t q4_float_to_bf16(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN stays a quiet NaN
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Eight consecutive activations of one row, widened to fp32 (one 16-byte load for fp16/bf16, two for fp32).
template <int DT>
__device__ __forceinline__ void q4_load_act8(const void* row, int k, float a[8]) {
  if constexpr (DT == Q4_F32) {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(row) + k);
    float4 lo = q4_load_cached(p), hi = q4_load_cached(p + 1);
    a[0] = lo.x; a[1] = lo.y; a[2] = lo.z; a[3] = lo.w;
    a[4] = hi.x; a[5] = hi.y; a[6] = hi.z; a[7] = hi.w;
  } else {
    uint4 v = q4_load_cached(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(row) + k));
    uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (DT == Q4_BF16) {
        a[2 * i] = q4_bf16_to_float(w[i] & 0xffffu);
        a[2 * i + 1] = __int_as_float(w[i] & 0xffff0000u);  // high half is already in place
      } else {
        __half2 h = *reinterpret_cast<__half2*>(&w[i]);
        float2 f = __half22float2(h);
        a[2 * i] = f.x;
        a[2 * i + 1] = f.y;
      }
    }
  }
}

// Eight consecutive fp16 activations as loaded: four packed pairs, the operand form of q4_dot2_f16.
__device__ __forceinline__ uint4 q4_load_f16x8(const void* row, int k) {
  return q4_load_cached(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(row) + k));
}

template <int DT>
__device__ __forceinline__ float q4_load_act1(const void* p, long i) {
  if constexpr (DT == Q4_F32) return static_cast<const float*>(p)[i];
  else if constexpr (DT == Q4_BF16) return q4_bf16_to_float(static_cast<const uint16_t*>(p)[i]);
  else return __half2float(static_cast<const __half*>(p)[i]);
}

template <int DT>
__device__ __forceinline__ void q4_store1(void* p, long i, float v) {
  if constexpr (DT == Q4_F32) static_cast<float*>(p)[i] = v;
  else if constexpr (DT == Q4_BF16) static_cast<uint16_t*>(p)[i] = q4_float_to_bf16(v);
  else static_cast<__half*>(p)[i] = __float2half_rn(v);
}

// Eight consecutive outputs v*scale as one 16-byte store (two for fp32); i is a multiple of 8.
template <int DT>
__device__ __forceinline__ void q4_store8(void* p, long i, const float v[8], float scale) {
  if constexpr (DT == Q4_F32) {
    float4* q = reinterpret_cast<float4*>(static_cast<float*>(p) + i);
    q[0] = make_float4(v[0] * scale, v[1] * scale, v[2] * scale, v[3] * scale);
    q[1] = make_float4(v[4] * scale, v[5] * scale, v[6] * scale, v[7] * scale);
  } else {
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      uint32_t lo, hi;
      if constexpr (DT == Q4_BF16) {
        lo = q4_float_to_bf16(v[2 * k] * scale);
        hi = q4_float_to_bf16(v[2 * k + 1] * scale);
      } else {
        lo = __half_as_ushort(__float2half_rn(v[2 * k] * scale));
        hi = __half_as_ushort(__float2half_rn(v[2 * k + 1] * scale));
      }
      w[k] = lo | (hi << 16);
    }
    *reinterpret_cast<uint4*>(static_cast<uint16_t*>(p) + i) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}
