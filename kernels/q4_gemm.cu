// q4_gemm.cu: out[M, N] = A[M, K] @ dequant(W)[N, K]^T (+ bias), fp32 accumulation.
//
// One kernel, two impls:
//  * simt: R output rows per warp and a tile of MT activation rows per block, so every decoded weight is
//    used MT times (once per activation row) and every activation load R times (once per weight row).
//    The launcher picks R so the grid still covers every SM, and MT from M.
//  * gemv (the classic baseline): R = 1, MT = 1, one block row per activation row: one warp per output
//    feature, no reuse across rows, M>1 re-reads and re-decodes the weights M times.
//
// Work split: a warp owns R consecutive weight rows and walks K in "slices" of 32 weights (16 bytes per
// row, one per lane per step), so a slice never straddles an absmax block (blocksize >= 32).
#include "q4_decode.h"

constexpr int Q4_WARPS = 4;  // warps per block: 128 threads (256 on wave64) keeps 4+ blocks per SM/CU

template <int DT, int R, int MT, bool NESTED>
__global__ void __launch_bounds__(Q4_WARPS * Q4_WARP)
q4_gemm_kernel(const void* __restrict__ A, Q4Weights w, const void* __restrict__ bias,
               void* __restrict__ out, int M) {
  __shared__ Q4Tables<NESTED> tables;
  q4_load_tables(tables, w);

  const int lane = threadIdx.x % Q4_WARP;
  const int warp = threadIdx.x / Q4_WARP;
  const int n0 = (blockIdx.x * Q4_WARPS + warp) * R;
  const int m0 = blockIdx.y * MT;
  const int K = w.K;
  const int slices = K / 32;
  const long row_bytes = K / 2;

  // Rows past N/M are clamped to a valid row (loads stay in bounds) and dropped at the store.
  const uint8_t* wrow[R];
#pragma unroll
  for (int r = 0; r < R; ++r) wrow[r] = w.packed + (long)min(n0 + r, w.N - 1) * row_bytes;
  const char* arow[MT];
  const int act_bytes = DT == Q4_F32 ? 4 : 2;
#pragma unroll
  for (int m = 0; m < MT; ++m) arow[m] = static_cast<const char*>(A) + (long)min(m0 + m, M - 1) * K * act_bytes;

  float acc[R][MT];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;

  // Software pipeline, two stages: while a lane decodes U slices of R rows, the 16-byte weight loads and
  // absmax loads of its next U slices are already in flight (2*U*R*16 bytes a lane, 4 KB a warp at R=2,
  // U=2). Without it every iteration exposed a full DRAM latency, and only more warps per SM hid it.
  constexpr int U = 2;
  constexpr int STEP = U * Q4_WARP;
  uint4 wq[U][R];
  Q4Scale sc[U][R];
  auto fetch = [&](int s0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int s = min(s0 + u * Q4_WARP, slices - 1);  // clamped: a valid address, the result unused
#pragma unroll
      for (int r = 0; r < R; ++r) {
        wq[u][r] = q4_load_stream16(wrow[r] + s * 16);
        sc[u][r] = q4_scale_load<NESTED>(w, ((long)min(n0 + r, w.N - 1) * K + s * 32) >> w.blocksize_log2);
      }
    }
  };
  fetch(lane);
  for (int s0 = lane; s0 < slices; s0 += STEP) {
    uint4 cw[U][R];
    Q4Scale cs[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < R; ++r) cw[u][r] = wq[u][r], cs[u][r] = sc[u][r];
    if (s0 + STEP < slices) fetch(s0 + STEP);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int s = s0 + u * Q4_WARP;
      if (s >= slices) break;
      float part[R][MT];
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) part[r][m] = 0.f;
#pragma unroll
      for (int c = 0; c < 4; ++c) {  // 8 weights (one 32-bit word per row) at a time bounds register use
        float wv[R][8];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const uint32_t word = c == 0 ? cw[u][r].x : c == 1 ? cw[u][r].y : c == 2 ? cw[u][r].z : cw[u][r].w;
          q4_decode8(tables.code, word, wv[r]);
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          float a[8];
          q4_load_act8<DT>(arow[m], s * 32 + c * 8, a);
#pragma unroll
          for (int r = 0; r < R; ++r)
#pragma unroll
            for (int j = 0; j < 8; ++j) part[r][m] = fmaf(wv[r][j], a[j], part[r][m]);
        }
      }
      // The absmax scales the slice's dot product once instead of each of its 32 weights.
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float scale = q4_scale_value(tables, w, cs[u][r]);
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[r][m] = fmaf(part[r][m], scale, acc[r][m]);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = q4_warp_sum(acc[r][m]);

  // Every lane holds every sum; lane i stores output i so the R*MT stores go out in one instruction.
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const int n = n0 + r, mm = m0 + m;
      if (lane == (r * MT + m) % Q4_WARP && n < w.N && mm < M) {
        float v = acc[r][m];
        if (bias) v += q4_load_act1<DT>(bias, n);
        q4_store1<DT>(out, (long)mm * w.N + n, v);
      }
    }
}

template <int DT, int R, int MT, bool NESTED>
static q4_err_t q4_launch(const void* A, const Q4Weights& w, const void* bias, void* out, int M, int grid_y,
                          q4_stream_t stream) {
  dim3 grid((w.N + Q4_WARPS * R - 1) / (Q4_WARPS * R), grid_y);
  q4_gemm_kernel<DT, R, MT, NESTED><<<grid, Q4_WARPS * Q4_WARP, 0, stream>>>(A, w, bias, out, M);
  return q4_get_last_error();
}

// Runtime (R, MT, nested) -> template instance.
template <int DT, bool NESTED>
static q4_err_t q4_dispatch(const void* A, const Q4Weights& w, const void* bias, void* out, int M, int R,
                            int MT, int grid_y, q4_stream_t s) {
#define Q4_CASE(r, mt) \
  if (R == r && MT == mt) return q4_launch<DT, r, mt, NESTED>(A, w, bias, out, M, grid_y, s);
  Q4_CASE(1, 1) Q4_CASE(1, 2) Q4_CASE(1, 4) Q4_CASE(1, 8)
  Q4_CASE(2, 1) Q4_CASE(2, 2) Q4_CASE(2, 4) Q4_CASE(2, 8)
  Q4_CASE(4, 1) Q4_CASE(4, 2) Q4_CASE(4, 4) Q4_CASE(4, 8)
#undef Q4_CASE
  return q4_invalid_value;  // a configuration outside the instantiated set
}

static q4_err_t q4_dispatch_all(int dtype, bool nested, const void* A, const Q4Weights& w, const void* bias,
                                void* out, int M, int R, int MT, int grid_y, q4_stream_t s) {
  switch (dtype * 2 + (nested ? 1 : 0)) {
    case Q4_F16 * 2: return q4_dispatch<Q4_F16, false>(A, w, bias, out, M, R, MT, grid_y, s);
    case Q4_F16 * 2 + 1: return q4_dispatch<Q4_F16, true>(A, w, bias, out, M, R, MT, grid_y, s);
    case Q4_BF16 * 2: return q4_dispatch<Q4_BF16, false>(A, w, bias, out, M, R, MT, grid_y, s);
    case Q4_BF16 * 2 + 1: return q4_dispatch<Q4_BF16, true>(A, w, bias, out, M, R, MT, grid_y, s);
    case Q4_F32 * 2: return q4_dispatch<Q4_F32, false>(A, w, bias, out, M, R, MT, grid_y, s);
    default: return q4_dispatch<Q4_F32, true>(A, w, bias, out, M, R, MT, grid_y, s);
  }
}

static int q4_sm_count() {
  int dev = 0, sms = 0;
  if (q4_get_device(&dev) != q4_success || q4_device_attribute(&sms, q4_attr_sm_count, dev) != q4_success)
    return 0;
  return sms;
}

extern "C" {

// The simt launch configuration: the most reuse R*MT (rows per warp times activation rows per block)
// whose grid still gives every SM/CU at least one block; ties go to more rows per warp. MT never exceeds
// M rounded up to a power of two. Fitted on an H100 sweep of every (R, MT) over N 512..16384, K 4096 and
// 14336, M 1..64 (docs/bench/h100_2026-11-26_simt_configs.csv): within 1.005x of the best configuration
// (geometric mean; worst 1.06x), where the earlier rule (R from N alone) was 1.23x off and 2.9x at worst.
void q4_simt_config(int N, int M, int sm_count, int* rows_per_warp, int* m_tile) {
  const int mt_max = M <= 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : 8;
  long best_blocks = -1;
  int best_reuse = 0;
  for (int R = 4; R >= 1; R /= 2)
    for (int MT = mt_max; MT >= 1; MT /= 2) {
      const long blocks = (long)((N + Q4_WARPS * R - 1) / (Q4_WARPS * R)) * ((M + MT - 1) / MT);
      const bool fills = blocks >= sm_count, best_fills = best_blocks >= sm_count;
      // Filling the GPU first; then more reuse; a grid that cannot fill it takes the most blocks.
      const bool better = fills ? !best_fills || R * MT > best_reuse : !best_fills && blocks > best_blocks;
      if (better) *rows_per_warp = R, *m_tile = MT, best_blocks = blocks, best_reuse = R * MT;
    }
}

// impl 0 = simt, 1 = gemv. rows_per_warp/m_tile > 0 override the simt launch configuration (for exploring:
// R in {1,2,4}, MT in {1,2,4,8}); 0 takes q4_simt_config's choice.
int q4_gemm(int impl, int dtype, int nested, const void* A, const uint8_t* packed, const void* absmax,
            const float* nested_absmax, const float* nested_code, float nested_offset, const float* code,
            const void* bias, void* out, int M, int N, int K, int blocksize, int rows_per_warp, int m_tile,
            void* stream) {
  Q4Weights w{packed, absmax, nested_absmax, nested_code, nested_offset, code, N, K, __builtin_ctz(blocksize)};
  q4_stream_t s = static_cast<q4_stream_t>(stream);
  if (impl == 1)  // gemv: one activation row per block row, no reuse
    return (int)q4_dispatch_all(dtype, nested, A, w, bias, out, M, 1, 1, M, s);
  static int sms = 0;
  if (sms == 0) sms = q4_sm_count();
  int R, MT;
  q4_simt_config(N, M, sms > 0 ? sms : 1, &R, &MT);
  if (rows_per_warp > 0) R = rows_per_warp;
  if (m_tile > 0) MT = m_tile;
  return (int)q4_dispatch_all(dtype, nested, A, w, bias, out, M, R, MT, (M + MT - 1) / MT, s);
}

}  // extern "C"
