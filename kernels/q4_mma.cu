// q4_mma.cu: out[M, N] = A[M, K] @ dequant(W)[N, K]^T (+ bias) on the tensor cores (impl "mma"), for
// fp16/bf16 activations and blocksize >= 64, fp32 accumulation.
//
// The product is computed transposed, out^T[N, M] = W[N, K] @ A^T[K, M], with mma.sync m16n8k16: the
// weight is the 16-row A operand and the batch the 8-column B operand, so M = 1..8 pays for one 8-wide
// tile, not a 16-wide one. A warp owns 16 weight rows (n0 + g and n0 + g + 8 for lane group g = lane / 4)
// and walks K in 64-weight tiles, one absmax block (blocksize >= 64) each.
//
// K is permuted inside a tile, identically for weights and activations, so that every load is plain and
// contiguous: lane (g, t = lane % 4) holds bytes 8t..8t+7 of each of its two rows' 32-byte tile, i.e.
// weights 16t..16t+15, and mma step s (0..3) reads the fragment's logical k 2t, 2t+1 from byte 2s and
// 2t+8, 2t+9 from byte 2s+1. The activations then come as A[m][16t + 8h .. 16t + 8h + 7], one 16-byte
// load for steps 2h and 2h+1. Since all four lanes of a step read the same tile, one absmax block covers
// the step and the scale is applied once per tile to the tile's partial sums (more exact than scaling
// the weights before the mma, and 4 FMAs per 8-column tile instead of 16 multiplies).
//
// Decode: the 16-entry code table, as fp16/bf16 split into its low and high bytes, sits in 8 registers of
// every thread and is looked up four codes at a time with PRMT: the ALU pipe only, no shared-memory
// table to fill or to queue on (a per-lane 256-entry pair table in shared memory measured slower:
// docs/PERF.md).
//
// Pipeline: each warp streams its rows' weight tiles and absmax through its own ring of Q4_MMA_STAGES
// shared-memory stages with cp.async (16 bytes a lane, L1 bypassed), Q4_MMA_STAGES - 1 stages in flight
// while it decodes one: the loads hold no registers, so the bytes in flight do not cost occupancy.
//
// Split K: shapes with too few 64-row tiles to fill the GPU split K across gridDim.z blocks; each writes
// fp32 partials to a workspace and the last block of a tile to arrive (atomic ticket) sums them in
// split order (deterministic) and stores; it also resets the ticket so the workspace needs no clearing.
#include "q4_decode.h"

constexpr int Q4_MMA_WARPS = 4;      // warps a block, each on its own 16 rows: 64 rows a block
constexpr int Q4_MMA_ROWS = 16 * Q4_MMA_WARPS;
constexpr int Q4_MMA_MAX_SPLIT = 16;
constexpr int Q4_MMA_STAGES = 4;      // ring stages a warp: three in flight while one is decoded

// K tiles a pipeline stage: 4 (2 KB of weights a warp) while the batch tile is small, 2 at 32-64 rows, whose
// accumulators and activations take the registers.
__host__ __device__ constexpr int q4_mma_stage_tiles(int mt8) { return mt8 <= 2 ? 4 : 2; }
// Dynamic shared memory of one block: a ring per warp of 512 weight bytes and 16 absmax words a tile.
__host__ __device__ constexpr int q4_mma_ring_bytes(int mt8) {
  return Q4_MMA_WARPS * Q4_MMA_STAGES * q4_mma_stage_tiles(mt8) * (512 + 64);
}

#if defined(Q4_NVIDIA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define Q4_MMA_DEVICE 1
#endif

// Asynchronous copies into shared memory: the weight stream bypasses L1 (.cg) and asks L2 for the whole
// 256-byte sector group of the row, which the next tiles read; the 4-byte absmax words go through L1.
__device__ __forceinline__ void q4_cp_async16(void* smem, const void* gmem) {
#if defined(Q4_MMA_DEVICE)
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;"
               :: "r"((uint32_t)__cvta_generic_to_shared(smem)), "l"(gmem));
#endif
}
__device__ __forceinline__ void q4_cp_async4(void* smem, const void* gmem) {
#if defined(Q4_MMA_DEVICE)
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" :: "r"((uint32_t)__cvta_generic_to_shared(smem)), "l"(gmem));
#endif
}
__device__ __forceinline__ void q4_cp_async_commit() {
#if defined(Q4_MMA_DEVICE)
  asm volatile("cp.async.commit_group;");
#endif
}
template <int PENDING>
__device__ __forceinline__ void q4_cp_async_wait() {
#if defined(Q4_MMA_DEVICE)
  asm volatile("cp.async.wait_group %0;" :: "n"(PENDING));
#endif
}

template <int DT>
__device__ __forceinline__ void q4_mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(Q4_MMA_DEVICE)
  if constexpr (DT == Q4_BF16)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <int DT>
__device__ __forceinline__ uint32_t q4_half_bits(float v) {
  if constexpr (DT == Q4_BF16) return q4_float_to_bf16(v);
  else return __half_as_ushort(__float2half_rn(v));
}

// PRMT with PTX's own selector semantics: bit 3 of a selector nibble sign-fills the byte (CUDA's
// __byte_perm documents only three index bits, so the mask below is not left to it).
__device__ __forceinline__ uint32_t q4_prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

struct Q4PrmtTable {
  uint32_t lo[4], hi[4];  // low / high bytes of the 16 fp16/bf16 codes, four a register
};

template <int DT, bool NESTED>
__device__ __forceinline__ void q4_mma_fill(const Q4Tables<NESTED>& t, Q4PrmtTable& r) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    uint32_t lo = 0, hi = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t h = q4_half_bits<DT>(t.code[4 * q + j]);
      lo |= (h & 0xffu) << (8 * j);
      hi |= (h >> 8) << (8 * j);
    }
    r.lo[q] = lo, r.hi[q] = hi;
  }
}

// The four packed pairs of one 32-bit word (bytes 0..3), each {even weight, odd weight}: the mma operand.
__device__ __forceinline__ void q4_mma_decode(const Q4PrmtTable& r, uint32_t x, uint32_t (&p)[4]) {
  // PRMT reads 3 index bits a selector nibble (its 4th bit would sign-fill): codes 0-7 and 8-15 are looked
  // up separately and merged by a byte mask made from each code's bit 3 (a sign-filling PRMT of x and
  // x << 4, which puts every nibble's top bit in a byte's sign bit). Selector nibble i is code i of the
  // half word: odd weight first (bitsandbytes' low nibble).
  const uint32_t idx = x & 0x77777777u, x4 = x << 4;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const uint32_t sel = half ? idx >> 16 : idx;
    const uint32_t mask = q4_prmt(x, x4, half ? 0xbfae : 0x9d8c);
    const uint32_t lo = (q4_prmt(r.lo[0], r.lo[1], sel) & ~mask) | (q4_prmt(r.lo[2], r.lo[3], sel) & mask);
    const uint32_t hi = (q4_prmt(r.hi[0], r.hi[1], sel) & ~mask) | (q4_prmt(r.hi[2], r.hi[3], sel) & mask);
    p[2 * half] = q4_prmt(lo, hi, 0x4051);      // byte 2*half: {code of nibble 1, code of nibble 0}
    p[2 * half + 1] = q4_prmt(lo, hi, 0x6273);  // byte 2*half+1
  }
}

// MT8 8-column batch tiles a block (M tile 8 * MT8).
template <int DT, int MT8, bool NESTED>
__global__ void __launch_bounds__(Q4_MMA_WARPS * 32)
q4_mma_kernel(const void* __restrict__ A, Q4Weights w, const void* __restrict__ bias, void* __restrict__ out,
              int M, float* __restrict__ workspace, int* __restrict__ tickets) {
#if defined(Q4_MMA_DEVICE)
  __shared__ Q4Tables<NESTED> tables;
  extern __shared__ __align__(16) uint8_t q4_mma_ring[];
  Q4PrmtTable prmt_table;
  constexpr int U = q4_mma_stage_tiles(MT8), ST = Q4_MMA_STAGES;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int n0 = blockIdx.x * Q4_MMA_ROWS + warp * 16;
  const int m0 = blockIdx.y * 8 * MT8;
  const int K = w.K, split = gridDim.z;
  const int tiles = K / 64, row_blocks = K >> w.blocksize_log2;
  const int tile_begin = (int)((long)blockIdx.z * tiles / split), tile_end = (int)((long)(blockIdx.z + 1) * tiles / split);
  uint8_t* wring = q4_mma_ring + warp * ST * U * 512;  // [stage][tile][16 rows][32 bytes]
  uint32_t* sring = reinterpret_cast<uint32_t*>(q4_mma_ring + Q4_MMA_WARPS * ST * U * 512) + warp * ST * U * 16;

  // Copy roles, per stage of U tiles (U * 32 contiguous bytes of each of the warp's 16 rows): in copy c,
  // lane l fetches 16 bytes at offset 16 * (l % (2 * U)) of row 4c + l / (2U) (U = 4: 8 lanes a row, four
  // whole 128-byte lines an instruction), stored tile-major so the decoding lanes read as if per tile.
  // Absmax: 16 rows x U words a stage, lane l taking tile l % U of row l / U (+ 32 / U per copy), so each
  // row's U words are one request. Rows past N read row N-1 (in bounds) and are dropped at the store; so
  // are batch rows past M. Nested absmax copies the aligned word that holds the 8-bit code.
  constexpr int LANES_A_ROW = 2 * U, ROWS_A_COPY = 32 / LANES_A_ROW;
  const int copy_chunk = lane % LANES_A_ROW, copy_tile = copy_chunk / 2, copy_half = copy_chunk % 2;
  const int scale_tile = lane % U;
  auto issue = [&](int stage) {
    const int slot = stage % ST, tile0 = tile_begin + stage * U;
    if (tile0 + copy_tile < tile_end)
#pragma unroll
      for (int c = 0; c < 16 / ROWS_A_COPY; ++c) {
        const int r = c * ROWS_A_COPY + lane / LANES_A_ROW;
        const uint8_t* src = w.packed + (long)min(n0 + r, w.N - 1) * (K / 2) + (tile0 + copy_tile) * 32 + 16 * copy_half;
        q4_cp_async16(wring + (slot * U + copy_tile) * 512 + r * 32 + 16 * copy_half, src);
      }
    if (tile0 + scale_tile < tile_end)
#pragma unroll
      for (int c = 0; c < 16 * U / 32; ++c) {
        const int r = c * (32 / U) + lane / U;
        const long b = (long)min(n0 + r, w.N - 1) * row_blocks + (((tile0 + scale_tile) * 64) >> w.blocksize_log2);
        const void* src = NESTED ? static_cast<const void*>(static_cast<const uint8_t*>(w.absmax) + (b & ~3L))
                                 : static_cast<const void*>(static_cast<const float*>(w.absmax) + b);
        q4_cp_async4(sring + (slot * U + scale_tile) * 16 + r, src);
      }
    q4_cp_async_commit();  // an empty group past the end keeps the wait count uniform
  };

  const int rows[2] = {min(n0 + g, w.N - 1), min(n0 + g + 8, w.N - 1)};
  const uint16_t* arow[MT8];
#pragma unroll
  for (int j = 0; j < MT8; ++j)
    arow[j] = static_cast<const uint16_t*>(A) + (long)min(m0 + 8 * j + g, M - 1) * K + 16 * t;

  float acc[MT8][4];
#pragma unroll
  for (int j = 0; j < MT8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;

  auto scale_of = [&](uint32_t word, int h, int tile) {
    if constexpr (NESTED) {
      const long b = (long)rows[h] * row_blocks + ((tile * 64) >> w.blocksize_log2);
      return tables.nested_code[(word >> (8 * (b & 3))) & 0xff] * q4_load_cached(w.nested_absmax + (b >> 8)) +
             w.nested_offset;
    } else {
      return __uint_as_float(word);
    }
  };

  auto consume = [&](int slot, int u, int tile) {
    const uint8_t* wt = wring + (slot * U + u) * 512;
    const uint2 cw[2] = {*reinterpret_cast<const uint2*>(wt + g * 32 + 8 * t),
                         *reinterpret_cast<const uint2*>(wt + (g + 8) * 32 + 8 * t)};
    const uint32_t* st = sring + (slot * U + u) * 16;
    const float scale_g = scale_of(st[g], 0, tile), scale_g8 = scale_of(st[g + 8], 1, tile);
    float part[MT8][4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // steps 2h, 2h+1 use word h of each row and activation chunk h
      uint4 act[MT8];
#pragma unroll
      for (int j = 0; j < MT8; ++j) act[j] = q4_load_cached(reinterpret_cast<const uint4*>(arow[j] + tile * 64 + 8 * h));
      uint32_t pg[4], pg8[4];
      q4_mma_decode(prmt_table, h ? cw[0].y : cw[0].x, pg);
      q4_mma_decode(prmt_table, h ? cw[1].y : cw[1].x, pg8);
#pragma unroll
      for (int s2 = 0; s2 < 2; ++s2) {
        const uint32_t a[4] = {pg[2 * s2], pg8[2 * s2], pg[2 * s2 + 1], pg8[2 * s2 + 1]};
#pragma unroll
        for (int j = 0; j < MT8; ++j) {
          if (h == 0 && s2 == 0) part[j][0] = part[j][1] = part[j][2] = part[j][3] = 0.f;
          q4_mma16816<DT>(part[j], a, s2 ? act[j].z : act[j].x, s2 ? act[j].w : act[j].y);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < MT8; ++j) {
      acc[j][0] = fmaf(part[j][0], scale_g, acc[j][0]);
      acc[j][1] = fmaf(part[j][1], scale_g, acc[j][1]);
      acc[j][2] = fmaf(part[j][2], scale_g8, acc[j][2]);
      acc[j][3] = fmaf(part[j][3], scale_g8, acc[j][3]);
    }
  };

  const int stages = (tile_end - tile_begin + U - 1) / U;
#pragma unroll
  for (int k = 0; k < ST - 1; ++k) issue(k);
  q4_load_tables(tables, w);  // while the first stages are in flight
  q4_mma_fill<DT, NESTED>(tables, prmt_table);
  for (int k = 0; k < stages; ++k) {
    __syncwarp();  // every lane is done with slot (k - 1) % ST before it is refilled
    issue(k + ST - 1);
    q4_cp_async_wait<ST - 1>();
    __syncwarp();  // the other lanes' copies of stage k are visible
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int tile = tile_begin + k * U + u;
      if (tile >= tile_end) break;
      consume(k % ST, u, tile);
    }
  }
  q4_cp_async_wait<0>();

  // Fragment element e of batch tile j: weight row n0 + g (+8 for e >= 2), batch row m0 + 8j + 2t (+1 odd e).
  auto index = [&](int j, int e, int& n, int& m) { n = n0 + g + (e >= 2 ? 8 : 0), m = m0 + 8 * j + 2 * t + (e & 1); };
  if (split > 1) {
    float* mine = workspace + (long)blockIdx.z * M * w.N;
#pragma unroll
    for (int j = 0; j < MT8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        int n, m;
        index(j, e, n, m);
        if (n < w.N && m < M) mine[(long)m * w.N + n] = acc[j][e];
      }
    __threadfence();  // partials visible device-wide before the ticket says so
    __syncthreads();
    __shared__ int last;
    int* ticket = tickets + blockIdx.y * gridDim.x + blockIdx.x;
    if (threadIdx.x == 0) last = atomicAdd(ticket, 1) == split - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
#pragma unroll
    for (int j = 0; j < MT8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        int n, m;
        index(j, e, n, m);
        if (n >= w.N || m >= M) continue;
        float v = 0.f;
        for (int z = 0; z < split; ++z) v += __ldcg(workspace + ((long)z * M + m) * w.N + n);  // L2: other SMs wrote it
        acc[j][e] = v;
      }
    if (threadIdx.x == 0) *ticket = 0;  // ready for the next launch
  }
#pragma unroll
  for (int j = 0; j < MT8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      int n, m;
      index(j, e, n, m);
      if (n >= w.N || m >= M) continue;
      float v = acc[j][e];
      if (bias) v += q4_load_act1<DT>(bias, n);
      q4_store1<DT>(out, (long)m * w.N + n, v);
    }
#else
  __builtin_trap();  // AMD and pre-sm_80 NVIDIA: q4_mma_supported() says so before any launch
#endif
}

typedef void (*q4_mma_kernel_t)(const void*, Q4Weights, const void*, void*, int, float*, int*);

static int q4_mma_tiles8(int M) { return M <= 8 ? 1 : M <= 16 ? 2 : M <= 32 ? 4 : 8; }

template <int DT, bool NESTED>
static q4_mma_kernel_t q4_mma_instance(int mt8) {
  switch (mt8) {
    case 1: return q4_mma_kernel<DT, 1, NESTED>;
    case 2: return q4_mma_kernel<DT, 2, NESTED>;
    case 4: return q4_mma_kernel<DT, 4, NESTED>;
    default: return q4_mma_kernel<DT, 8, NESTED>;
  }
}

static q4_mma_kernel_t q4_mma_instance_all(int dtype, bool nested, int mt8) {
  if (dtype == Q4_BF16) return nested ? q4_mma_instance<Q4_BF16, true>(mt8) : q4_mma_instance<Q4_BF16, false>(mt8);
  return nested ? q4_mma_instance<Q4_F16, true>(mt8) : q4_mma_instance<Q4_F16, false>(mt8);
}

// Blocks of one instance resident per SM on the current device, its ring's shared memory allowed first.
static int q4_mma_residency(q4_mma_kernel_t kernel, int mt8) {
  int n = 0;
#if defined(Q4_NVIDIA)
  const void* entry = reinterpret_cast<const void*>(kernel);
  if (cudaFuncSetAttribute(entry, cudaFuncAttributeMaxDynamicSharedMemorySize, q4_mma_ring_bytes(mt8)) != q4_success ||
      q4_occupancy(&n, entry, Q4_MMA_WARPS * 32, q4_mma_ring_bytes(mt8)) != q4_success)
    return 0;
#endif
  return n;
}

extern "C" {

// 1 where this library's device code has the mma path (NVIDIA sm_80 and later), else 0.
int q4_mma_supported() {
#if defined(Q4_NVIDIA)
  int dev = 0, major = 0;
  if (q4_get_device(&dev) != q4_success || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != q4_success)
    return 0;
  return major >= 8 && q4_mma_residency(q4_mma_instance_all(Q4_BF16, false, 1), 1) > 0;
#else
  return 0;
#endif
}

// The mma launch: the batch tile (8, 16, 32 or 64 rows: the smallest that holds M, 64 above) and the K
// split. Modelled per SM: its share of blocks, ceil(blocks * split / SMs), each costing its K tiles plus
// two tiles of fixed cost (table fill, pipeline ramp, epilogue), run `blocks_per_sm` at a time and slowed
// while fewer than 4 blocks (16 warps) share the SM, too few loads in flight to stream at full bandwidth.
// The least modelled time wins among splits that leave each block two pipeline stages of K; a split must
// beat the smaller ones by 2%. *split > 0 on entry is kept (exploring). Host code: no GPU needed.
int q4_mma_config(int N, int M, int K, int sm_count, int blocks_per_sm, int* split, int* m_tile) {
  if (N <= 0 || M <= 0 || K <= 0 || K % 64 != 0 || sm_count <= 0 || blocks_per_sm <= 0) return (int)q4_invalid_value;
  const int mt8 = q4_mma_tiles8(M);
  *m_tile = 8 * mt8;
  if (*split > 0) return *split <= Q4_MMA_MAX_SPLIT && *split <= K / 64 ? 0 : (int)q4_invalid_value;
  const long blocks = (long)((N + Q4_MMA_ROWS - 1) / Q4_MMA_ROWS) * ((M + 8 * mt8 - 1) / (8 * mt8));
  const int tiles = K / 64, max_split = tiles / (2 * q4_mma_stage_tiles(mt8));
  const double saturating = fmin(4.0, blocks_per_sm);
  double best = 0;
  *split = 1;
  for (int s = 1; s <= Q4_MMA_MAX_SPLIT && s <= (max_split > 1 ? max_split : 1); ++s) {
    const long per_sm = (blocks * s + sm_count - 1) / sm_count;
    const long full_waves = per_sm / blocks_per_sm, rest = per_sm % blocks_per_sm;
    const double block = (double)tiles / s + 2.0;  // a block's work in tiles
    const double wave = blocks_per_sm * block / (fmin(blocks_per_sm, saturating) / saturating);
    const double cost = full_waves * wave + (rest ? rest * block / (fmin((double)rest, saturating) / saturating) : 0.0);
    if (s == 1 || cost < best * 0.98) best = cost, *split = s;
  }
  return 0;
}

// q4_mma_config on the current device: its SM count and the instance's residency. Needs a GPU.
int q4_mma_plan(int dtype, int nested, int N, int M, int K, int* split, int* m_tile) {
  int dev = 0, sms = 0;
  if (q4_get_device(&dev) != q4_success || q4_device_attribute(&sms, q4_attr_sm_count, dev) != q4_success)
    return (int)q4_invalid_value;
  const int mt8 = q4_mma_tiles8(M), resident = q4_mma_residency(q4_mma_instance_all(dtype, nested != 0, mt8), mt8);
  return q4_mma_config(N, M, K, sms, resident > 0 ? resident : 1, split, m_tile);
}

// split == 1: workspace and tickets unused (may be null). split > 1: workspace holds split * M * N floats,
// tickets ceil(N / 64) * ceil(M / m_tile) ints, zero before the first launch (each launch leaves them zero).
int q4_mma_gemm(int dtype, int nested, const void* A, const uint8_t* packed, const void* absmax,
                const float* nested_absmax, const float* nested_code, float nested_offset, const float* code,
                const void* bias, void* out, int M, int N, int K, int blocksize, int split, float* workspace,
                int* tickets, void* stream) {
  if (dtype == Q4_F32 || blocksize < 64 || K % 64 != 0 || split < 1 || split > Q4_MMA_MAX_SPLIT ||
      (split > 1 && (workspace == nullptr || tickets == nullptr)))
    return (int)q4_invalid_value;
  Q4Weights w{packed, absmax, nested_absmax, nested_code, nested_offset, code, N, K, __builtin_ctz(blocksize)};
  const int mt8 = q4_mma_tiles8(M);
  const q4_mma_kernel_t kernel = q4_mma_instance_all(dtype, nested != 0, mt8);
#if defined(Q4_NVIDIA)
  // The ring can exceed the 48 KB a launch gets without asking (per device: asked on every launch).
  cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize,
                       q4_mma_ring_bytes(mt8));
#endif
  const dim3 grid((N + Q4_MMA_ROWS - 1) / Q4_MMA_ROWS, (M + 8 * mt8 - 1) / (8 * mt8), split);
  kernel<<<grid, Q4_MMA_WARPS * 32, q4_mma_ring_bytes(mt8), static_cast<q4_stream_t>(stream)>>>(
      A, w, bias, out, M, workspace, tickets);
  return (int)q4_get_last_error();
}

}  // extern "C"
