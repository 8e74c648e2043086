// q4_gemm.cu: out[M, N] = A[M, K] @ dequant(W)[N, K]^T (+ bias), fp32 accumulation.
//
// One kernel, two impls:
//  * simt: R output rows per warp and a tile of MT activation rows per block, so every decoded weight is
//    used MT times (once per activation row) and every activation load R times (once per weight row).
//    The launcher (q4_simt_config, below) picks R and MT.
//  * gemv (the classic baseline): R = 1, MT = 1, one block row per activation row: one warp per output
//    feature, no reuse across rows, M>1 re-reads and re-decodes the weights M times.
//
// Work split: a warp owns R consecutive weight rows and walks K in groups of G = 32 * Q4_WARP weights
// (512 bytes a row on wave32), four 8-weight words per lane and row. Two lane layouts:
//  * interleaved (simt): in step c of a group lane l decodes word c * Q4_WARP + l, so a step's lanes cover
//    8 * Q4_WARP consecutive weights. Its weight words (4 bytes a lane) and its activations (8 a lane) are
//    both contiguous across the warp: one activation load touches 4 cache lines (bf16; 8 for fp32) where
//    the sliced layout touches 16 (32): the L1 data pipe is what binds this kernel (docs/PERF.md, v6).
//    A lane's four words lie in four absmax blocks (blocksize < 1024), so each lane fetches one block's
//    absmax of the group and the lanes trade them by shuffle.
//  * sliced (gemv, the classic design): lane l owns the 16 contiguous bytes 16l..16l+15 of the group, one
//    16-byte load, 32 weights inside one absmax block (blocksize >= 32).
// The multiply: fp32 FMAs on weights decoded to fp32, except fp16 activations on AMD targets with
// v_dot2_f32_f16 (Q4_DOT2_F16, q4_port.h), which multiply packed fp16 pairs, still accumulating in fp32.
#include <atomic>

#include "q4_decode.h"
#include "q4_launch.h"

// MT == 1 is held to 128 registers, 4 blocks an SM: with 3, a one-wave grid spills into a second wave.
template <int DT, int R, int MT, bool NESTED, bool INTERLEAVED>
__global__ void __launch_bounds__(Q4_WARPS * Q4_WARP, MT == 1 ? 4 : 1)
q4_gemm_kernel(const void* __restrict__ A, Q4Weights w, const void* __restrict__ bias,
               void* __restrict__ out, int M) {
  __shared__ Q4Tables<NESTED> tables;

  const int lane = threadIdx.x % Q4_WARP;
  const int warp = threadIdx.x / Q4_WARP;
  const int n0 = (blockIdx.x * Q4_WARPS + warp) * R;
  const int m0 = blockIdx.y * MT;
  const int K = w.K;
  constexpr int G = 32 * Q4_WARP;  // weights a group
  const int groups = (K + G - 1) / G;  // K % G != 0: the last group is partial
  const int row_blocks = K >> w.blocksize_log2;

  // Rows past N/M are clamped to a valid row (loads stay in bounds) and dropped at the store.
  const uint8_t* wrow[R];
#pragma unroll
  for (int r = 0; r < R; ++r) wrow[r] = w.packed + (long)min(n0 + r, w.N - 1) * (K / 2);
  const char* arow[MT];
  const int act_bytes = DT == Q4_F32 ? 4 : 2;
#pragma unroll
  for (int m = 0; m < MT; ++m) arow[m] = static_cast<const char*>(A) + (long)min(m0 + m, M - 1) * K * act_bytes;

  // Interleaved: the absmax block lane l fetches for a group is the group's (l mod blocks-a-group)-th, and
  // step c takes its own from lane src[c]. A group starts on a block boundary whenever blocksize <= G;
  // a larger block covers the whole group (mask 0, src 0).
  const int group_block_mask = max(G >> w.blocksize_log2, 1) - 1;
  int src[4] = {};
  if constexpr (INTERLEAVED)
#pragma unroll
    for (int c = 0; c < 4; ++c) src[c] = ((c * Q4_WARP + lane) * 8) >> w.blocksize_log2;

  // Software pipeline, two stages: while a lane decodes U groups of R rows, the weight and absmax loads of
  // its next U groups are already in flight (U*R*16 bytes a lane, twice that held in registers). Without
  // it every iteration exposed a full DRAM latency, and only more warps per SM hid it. fp32 with MT >= 4
  // keeps one group a stage: its 8 MT rows of fp32 activations already fill the registers (docs/PERF.md,
  // v7).
  constexpr int U = DT == Q4_F32 && MT >= 4 ? 1 : 2;
  uint4 wq[U][R];
  Q4Scale sc[U][R];
  auto fetch = [&](int g0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int g = min(g0 + u, groups - 1);  // clamped: a valid address, the result unused
#pragma unroll
      for (int r = 0; r < R; ++r) {
        int b;
        if constexpr (INTERLEAVED) {
          // Four 4-byte words, Q4_WARP words apart: each load is one contiguous line across the warp.
          const int first = g * (G / 8) + lane, last = K / 8 - 1;  // word indices in the row
          const uint32_t* row = reinterpret_cast<const uint32_t*>(wrow[r]);
          wq[u][r] = make_uint4(q4_load_stream4(row + min(first, last)),
                                q4_load_stream4(row + min(first + Q4_WARP, last)),
                                q4_load_stream4(row + min(first + 2 * Q4_WARP, last)),
                                q4_load_stream4(row + min(first + 3 * Q4_WARP, last)));
          b = ((g * G) >> w.blocksize_log2) + (lane & group_block_mask);
        } else {
          wq[u][r] = q4_load_stream16(wrow[r] + min(g * (G / 2) + 16 * lane, K / 2 - 16));
          b = (g * G + 32 * lane) >> w.blocksize_log2;
        }
        sc[u][r] = q4_scale_load<NESTED>(w, (long)min(n0 + r, w.N - 1) * row_blocks + min(b, row_blocks - 1));
      }
    }
  };

  float acc[R][MT];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;

  // One group of R rows: per step, R words decoded through the table, used by MT activation rows; the
  // absmax scales each 8-weight partial sum. Past K (the last group when K % G != 0) the lanes keep in
  // step on clamped loads, and the absmax block they fetched, past the row's last, reads as 0.
  auto consume = [&](const uint4 (&cw)[R], const Q4Scale (&cs)[R], int g) {
    const int fetched = INTERLEAVED ? ((g * G) >> w.blocksize_log2) + (lane & group_block_mask)
                                    : (g * G + 32 * lane) >> w.blocksize_log2;
    float mine[R];
#pragma unroll
    for (int r = 0; r < R; ++r) mine[r] = fetched < row_blocks ? q4_scale_value(tables, w, cs[r]) : 0.f;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int k = min(INTERLEAVED ? g * G + (c * Q4_WARP + lane) * 8 : g * G + lane * 32 + c * 8, K - 8);
      auto word = [&](int r) { return c == 0 ? cw[r].x : c == 1 ? cw[r].y : c == 2 ? cw[r].z : cw[r].w; };
      auto scale = [&](int r) { return INTERLEAVED ? q4_shfl(mine[r], src[c]) : mine[r]; };
#if Q4_DOT2_F16
      if constexpr (DT == Q4_F16) {  // fp16 activations on AMD: packed pairs straight into v_dot2_f32_f16
        uint32_t wp[R][4];
#pragma unroll
        for (int r = 0; r < R; ++r) q4_decode8_f16x2(tables.code_f16, word(r), wp[r]);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const uint4 a = q4_load_f16x8(arow[m], k);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const float part = q4_dot2_f16(wp[r][3], a.w, q4_dot2_f16(wp[r][2], a.z,
                               q4_dot2_f16(wp[r][1], a.y, q4_dot2_f16(wp[r][0], a.x, 0.f))));
            acc[r][m] = fmaf(part, scale(r), acc[r][m]);
          }
        }
        continue;
      }
#endif
      float wv[R][8];
#pragma unroll
      for (int r = 0; r < R; ++r) q4_decode8(tables.code, word(r), wv[r]);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        float a[8];
        q4_load_act8<DT>(arow[m], k, a);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float part = wv[r][0] * a[0];
#pragma unroll
          for (int j = 1; j < 8; ++j) part = fmaf(wv[r][j], a[j], part);
          acc[r][m] = fmaf(part, scale(r), acc[r][m]);
        }
      }
    }
  };

  fetch(0);
  q4_load_tables(tables, w);  // after the first weight loads are out, so its round trip hides under theirs
  for (int g0 = 0; g0 < groups; g0 += U) {
    uint4 cw[U][R];
    Q4Scale cs[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < R; ++r) cw[u][r] = wq[u][r], cs[u][r] = sc[u][r];
    if (g0 + U < groups) fetch(g0 + U);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int g = g0 + u;
      if (g >= groups) break;
      consume(cw[u], cs[u], g);
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

typedef void (*q4_kernel_t)(const void*, Q4Weights, const void*, void*, int);

// Runtime (impl, R, MT, nested) -> template instance; nullptr outside the instantiated set. gemv is the one
// sliced instance, R = MT = 1.
template <int DT, bool NESTED>
static q4_kernel_t q4_instance(bool gemv, int R, int MT) {
  if (gemv) return q4_gemm_kernel<DT, 1, 1, NESTED, false>;
#define Q4_CASE(r, mt) \
  if (R == r && MT == mt) return q4_gemm_kernel<DT, r, mt, NESTED, true>;
  Q4_CASE(1, 1) Q4_CASE(1, 2) Q4_CASE(1, 4) Q4_CASE(1, 8)
  Q4_CASE(2, 1) Q4_CASE(2, 2) Q4_CASE(2, 4) Q4_CASE(2, 8)
  Q4_CASE(4, 1) Q4_CASE(4, 2) Q4_CASE(4, 4) Q4_CASE(4, 8)
#undef Q4_CASE
  return nullptr;
}

static q4_kernel_t q4_instance_all(int dtype, bool nested, bool gemv, int R, int MT) {
  switch (dtype * 2 + (nested ? 1 : 0)) {
    case Q4_F16 * 2: return q4_instance<Q4_F16, false>(gemv, R, MT);
    case Q4_F16 * 2 + 1: return q4_instance<Q4_F16, true>(gemv, R, MT);
    case Q4_BF16 * 2: return q4_instance<Q4_BF16, false>(gemv, R, MT);
    case Q4_BF16 * 2 + 1: return q4_instance<Q4_BF16, true>(gemv, R, MT);
    case Q4_F32 * 2: return q4_instance<Q4_F32, false>(gemv, R, MT);
    default: return q4_instance<Q4_F32, true>(gemv, R, MT);
  }
}

constexpr int Q4_CONFIGS = 12;      // (R, MT) in {1,2,4} x {1,2,4,8}, indexed log2(R) * 4 + log2(MT)
constexpr int Q4_MAX_DEVICES = 64;  // devices whose facts are cached; others are asked at every launch

// SM/CU count of the current device (0 without one), asked of the runtime once per device.
static int q4_sm_count() {
  static std::atomic<int> cached[Q4_MAX_DEVICES];  // 0: not asked yet
  int dev = 0, sms = 0;
  if (q4_get_device(&dev) != q4_success) return 0;
  if (dev < Q4_MAX_DEVICES && (sms = cached[dev].load(std::memory_order_relaxed)) > 0) return sms;
  if (q4_device_attribute(&sms, q4_attr_sm_count, dev) != q4_success) return 0;
  if (dev < Q4_MAX_DEVICES) cached[dev].store(sms, std::memory_order_relaxed);
  return sms;
}

// Resident blocks per SM/CU of each simt instance on the current device into out[Q4_CONFIGS], asked of
// the runtime once per (device, dtype, nested): registers decide it, and the compiler's register counts
// differ by arch and dtype.
// Threads racing to fill an entry store the same numbers.
static void q4_blocks_per_sm(int dtype, bool nested, int* out) {
  static std::atomic<int> cached[Q4_MAX_DEVICES][3][2][Q4_CONFIGS];  // 0: not asked yet
  int dev = 0;
  if (q4_get_device(&dev) != q4_success) dev = Q4_MAX_DEVICES;
  std::atomic<int>* t = dev < Q4_MAX_DEVICES ? cached[dev][dtype][nested ? 1 : 0] : nullptr;
  for (int c = 0; c < Q4_CONFIGS; ++c) {
    out[c] = t ? t[c].load(std::memory_order_relaxed) : 0;
    if (out[c] > 0) continue;
    int n = 0;
    const q4_kernel_t kernel = q4_instance_all(dtype, nested, false, 1 << (c / 4), 1 << (c % 4));
    const void* entry = reinterpret_cast<const void*>(kernel);
    out[c] = q4_occupancy(&n, entry, Q4_WARPS * Q4_WARP, 0) == q4_success && n > 0 ? n : 1;
    if (t) t[c].store(out[c], std::memory_order_relaxed);
  }
}

extern "C" {

// The simt launch configuration: the (R, MT) whose modelled time (q4_launch.h) is least, the busiest SM
// running ceil(blocks / SMs) blocks in waves of `blocks_per_sm[config]`. MT never exceeds M rounded up to
// a power of two; ties go to more rows per warp, then the larger M tile. The constants are fitted on H100
// sweeps of all 12 configurations (docs/PERF.md).
// On entry *rows_per_warp / *m_tile > 0 fix that choice (exploring) and the model picks the other; returns
// 0, or q4_invalid_value when no instantiated configuration matches what was fixed.
int q4_simt_config(int N, int M, int K, int dtype, int sm_count, const int* blocks_per_sm, int* rows_per_warp,
                   int* m_tile) {
  const int fixed_R = *rows_per_warp, fixed_MT = *m_tile;
  const int mt_max = M <= 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : 8;
  const double act_ns = dtype == Q4_F32 ? Q4_ACT_NS_F32 : Q4_ACT_NS_16BIT;
  double best_ns = -1;
  for (int r = 2; r >= 0; --r)
    for (int mt = 3; mt >= 0; --mt) {
      const int R = 1 << r, MT = 1 << mt, resident = blocks_per_sm[r * 4 + mt];
      if ((fixed_R > 0 && R != fixed_R) || (fixed_MT > 0 ? MT != fixed_MT : MT > mt_max)) continue;
      const long blocks = (long)((N + Q4_WARPS * R - 1) / (Q4_WARPS * R)) * ((M + MT - 1) / MT);
      const long per_sm = (blocks + sm_count - 1) / sm_count;  // the busiest SM's share
      const long waves = per_sm / resident, rest = per_sm % resident;
      const double row_ns = R == 1 ? Q4_ROW_NS_R1 : R == 2 ? Q4_ROW_NS_R2 : Q4_ROW_NS_R4;
      const double block_ns = K / Q4_MODEL_GROUP * (R * row_ns + MT * act_ns + R * MT * Q4_PAIR_NS) + Q4_BLOCK_NS;
      const double ns = block_ns * (waves * fmax(1.0, Q4_WARPS * resident / Q4_L1_WARPS) +
                                    (rest ? fmax(1.0, Q4_WARPS * rest / Q4_L1_WARPS) : 0.0));
      if (best_ns < 0 || ns < best_ns) *rows_per_warp = R, *m_tile = MT, best_ns = ns;
    }
  return best_ns < 0 ? (int)q4_invalid_value : 0;
}

// Resident blocks per SM/CU of the 12 simt configurations (index log2(R) * 4 + log2(MT)) on the current
// device; 0 on success. Needs a GPU.
int q4_simt_blocks_per_sm(int dtype, int nested, int* out) {
  if (q4_sm_count() == 0) return (int)q4_invalid_value;
  q4_blocks_per_sm(dtype, nested != 0, out);
  return 0;
}

// impl 0 = simt, 1 = gemv. rows_per_warp/m_tile > 0 fix that part of the simt launch configuration (for
// exploring: R in {1,2,4}, MT in {1,2,4,8}); 0 takes q4_simt_config's choice.
int q4_gemm(int impl, int dtype, int nested, const void* A, const uint8_t* packed, const void* absmax,
            const float* nested_absmax, const float* nested_code, float nested_offset, const float* code,
            const void* bias, void* out, int M, int N, int K, int blocksize, int rows_per_warp, int m_tile,
            void* stream) {
  Q4Weights w{packed, absmax, nested_absmax, nested_code, nested_offset, code, N, K, __builtin_ctz(blocksize)};
  const bool gemv = impl == 1;
  int R = 1, MT = 1, grid_y = M;  // gemv: one activation row per block row, no reuse
  if (!gemv) {
    const int sms = q4_sm_count();
    int resident[Q4_CONFIGS];
    q4_blocks_per_sm(dtype, nested != 0, resident);
    R = rows_per_warp, MT = m_tile;
    if (q4_simt_config(N, M, K, dtype, sms > 0 ? sms : 1, resident, &R, &MT) != 0)
      return (int)q4_invalid_value;
    grid_y = (M + MT - 1) / MT;
  }
  const q4_kernel_t kernel = q4_instance_all(dtype, nested != 0, gemv, R, MT);
  if (kernel == nullptr) return (int)q4_invalid_value;
  const dim3 grid((N + Q4_WARPS * R - 1) / (Q4_WARPS * R), grid_y);
  kernel<<<grid, Q4_WARPS * Q4_WARP, 0, static_cast<q4_stream_t>(stream)>>>(A, w, bias, out, M);
  return (int)q4_get_last_error();
}

}  // extern "C"
