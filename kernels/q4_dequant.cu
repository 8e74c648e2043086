// q4_dequant.cu: packed 4-bit W[N, K] -> dense W[N, K] in the activation dtype, for dequantize+BLAS.
#include "q4_decode.h"

template <int DT, bool NESTED>
__global__ void __launch_bounds__(256) q4_dequant_kernel(Q4Weights w, void* __restrict__ out) {
  __shared__ Q4Tables<NESTED> tables;
  q4_load_tables(tables, w);
  const long group = (long)blockIdx.x * blockDim.x + threadIdx.x;  // 8 weights, 4 packed bytes
  if (group >= (long)w.N * w.K / 8) return;
  // Consecutive threads take consecutive 4-byte words: a warp reads 128 contiguous bytes and writes
  // 512 (fp16/bf16) as 16-byte stores, both fully coalesced.
  const uint32_t word = q4_load_cached(reinterpret_cast<const uint32_t*>(w.packed) + group);
  const float scale = q4_scale_value(tables, w, q4_scale_load<NESTED>(w, group * 8 >> w.blocksize_log2));
  float v[8];
  q4_decode8(tables.code, word, v);
  q4_store8<DT>(out, group * 8, v, scale);
}

template <int DT, bool NESTED>
static q4_err_t q4_dequant_launch(const Q4Weights& w, void* out, q4_stream_t s) {
  const long groups = (long)w.N * w.K / 8;
  q4_dequant_kernel<DT, NESTED><<<(unsigned)((groups + 255) / 256), 256, 0, s>>>(w, out);
  return q4_get_last_error();
}

extern "C" int q4_dequantize(int dtype, int nested, const uint8_t* packed, const void* absmax,
                             const float* nested_absmax, const float* nested_code, float nested_offset,
                             const float* code, void* out, int N, int K, int blocksize, void* stream) {
  Q4Weights w{packed, absmax, nested_absmax, nested_code, nested_offset, code, N, K, __builtin_ctz(blocksize)};
  q4_stream_t s = static_cast<q4_stream_t>(stream);
  switch (dtype * 2 + (nested ? 1 : 0)) {
    case Q4_F16 * 2: return (int)q4_dequant_launch<Q4_F16, false>(w, out, s);
    case Q4_F16 * 2 + 1: return (int)q4_dequant_launch<Q4_F16, true>(w, out, s);
    case Q4_BF16 * 2: return (int)q4_dequant_launch<Q4_BF16, false>(w, out, s);
    case Q4_BF16 * 2 + 1: return (int)q4_dequant_launch<Q4_BF16, true>(w, out, s);
    case Q4_F32 * 2: return (int)q4_dequant_launch<Q4_F32, false>(w, out, s);
    default: return (int)q4_dequant_launch<Q4_F32, true>(w, out, s);
  }
}
