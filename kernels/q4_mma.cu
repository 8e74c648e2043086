// q4_mma.cu: out[M, N] = A[M, K] @ dequant(W)[N, K]^T (+ bias) on the tensor cores (impl "mma"), for
// fp16/bf16 activations and blocksize >= 64, fp32 accumulation.
//
// The product is computed transposed, out^T[N, M] = W[N, K] @ A^T[K, M], with mma.sync m16n8k16: the
// weight is the 16-row A operand and the batch the 8-column B operand, so M = 1..8 pays for one 8-wide
// tile, not a 16-wide one. Each 16-row tile of weights holds rows g and g + 8 for lane group g = lane / 4,
// and K is walked in 64-weight tiles, one absmax block (blocksize >= 64) each.
//
// K is permuted inside a tile, identically for weights and activations, so that every load is plain and
// contiguous: lane (g, t = lane % 4) holds bytes 8t..8t+7 of each of its two rows' 32-byte tile, i.e.
// weights 16t..16t+15, and mma step s (0..3) reads the fragment's logical k 2t, 2t+1 from byte 2s and
// 2t+8, 2t+9 from byte 2s+1. The activations then come as A[m][16t + 8h .. 16t + 8h + 7], one 16-byte
// load for steps 2h and 2h+1. Since all four lanes of a step read the same tile, one absmax block covers
// the step and the scale is applied once per tile to the tile's partial sums (more exact than scaling
// the weights before the mma, and 4 FMAs per 8-column tile instead of 16 multiplies).
//
// Decode: one shared-memory load per byte, i.e. per pair of weights, from a 256-entry table of packed
// fp16/bf16 pairs (the mma operand itself), held once per lane ([byte][lane]: every lane reads its own
// bank, so 32 random bytes never conflict). Batch tiles of 8 rows address a lookup with a PRMT (the byte
// alone) and one IMAD (times the 128-byte row, plus the table's base and the lane's column, held in one
// register); wider tiles, short of registers, with a shift and one LOP3, the compiler adding the base.
//
// Work split (stream-K): one resident block an SM, for the whole launch, fills the 32 KB table once. A team
// is one warp, or with SHARED_ACT the whole block. The work is the list of (item, K tile) pairs, an item
// being G row tiles (one a warp of the team, R 16-row tiles each) by an 8 * MT8-row batch tile, K tiles
// innermost, and team v of W takes the v-th W-th of that list: equal shares whatever the shape, no wave
// quantization. A warp walks its share with counters, not divisions, and addresses with 32-bit offsets: the
// ring's address arithmetic was a third of the instructions. A row tile whose K a team holds whole is stored
// directly; otherwise each warp on it writes its fp32 partial sums to its own workspace slot and the last to
// arrive (atomic ticket) sums the slots in team order (deterministic) and stores; it also resets the
// ticket, so the next launch needs no clearing.
//
// Pipeline: each warp streams its row tile's weights and absmax through its own ring of shared-memory
// stages with cp.async (16 bytes a lane, L1 bypassed), all stages but one in flight while it decodes one:
// the loads hold no registers, so the bytes in flight do not cost occupancy. A team of one keeps its own
// pace (a warp barrier a stage); a block team also copies its activation tiles into a ring of its own,
// each thread a 16-byte piece, and meets at one block barrier a stage, after which the slot consumed
// last is free for the next copies. In 16-warp blocks each warp issues its first stage alone before the
// table fill, so that every warp's first stage reaches DRAM ahead of all the later ones.
#include "q4_decode.h"

constexpr int Q4_MMA_MIN_TILES = 4;   // K tiles a team at least, before more teams are launched

// 16-row tiles an item. A stage copies U = 64 / (warps * R) K tiles of each of the item's rows, so fewer
// rows mean longer runs of each row: the L1 pays per line touched, and four 16-row tiles of one K tile
// touched 64 lines for 32 bytes each (and 64 more for 4 bytes of absmax). One tile at batch tiles of 8 and
// 64 rows (128-256 contiguous bytes a row), two at 16-32 rows, where each activation fragment then feeds
// two mmas.
__host__ __device__ constexpr int q4_mma_row_tiles(int mt8) { return mt8 == 2 || mt8 == 4 ? 2 : 1; }
// Warps a block: 16 at batch tiles of 8 rows, whose 128 registers a thread allow it (the decode's load
// latencies want the warps), else 8.
__host__ __device__ constexpr int q4_mma_warps(int mt8) { return mt8 == 1 ? 16 : 8; }
__host__ __device__ constexpr int q4_mma_stage_tiles(int mt8) { return 64 / q4_mma_warps(mt8) / q4_mma_row_tiles(mt8); }
// From 2 to 32 batch rows the block stages the activations once in shared memory (SHARED_ACT): its warps are
// one team on one K range, each on its own row tile, and read them with conflict-free LDS.128 instead of each
// warp loading 8 lines an instruction from L2. At one row the eight lane groups load one line, and warps that
// keep their own pace stream faster; 64-row tiles' activations do not fit beside the rings.
static bool q4_mma_shares_act(int M) { return M >= 2 && M <= 32; }
__host__ __device__ constexpr int q4_mma_team(int mt8, bool shared_act) { return shared_act ? q4_mma_warps(mt8) : 1; }
// Ring stages. Four for a warp of its own pace; three for a block team: four do not fit at 16-32 rows, and at
// 8 rows a block barrier over four stages streams slower.
__host__ __device__ constexpr int q4_mma_stages(bool shared_act) { return shared_act ? 3 : 4; }
// A ring row: U K tiles of one weight row, padded by 32 bytes so that the 8 rows a quarter-warp reads lie
// in distinct banks.
__host__ __device__ constexpr int q4_mma_row_bytes(int mt8) { return 32 * q4_mma_stage_tiles(mt8) + 32; }
// Dynamic shared memory of one block: per warp and stage, its item's rows of weights and of absmax words;
// per stage, the team's activation tiles (U K tiles of the batch tile's rows, 128 bytes each).
__host__ __device__ constexpr int q4_mma_ring_bytes(int mt8, bool shared_act) {
  return q4_mma_stages(shared_act) * (q4_mma_warps(mt8) * 16 * q4_mma_row_tiles(mt8) *
                                      (q4_mma_row_bytes(mt8) + 4 * q4_mma_stage_tiles(mt8)) +
                                      (shared_act ? q4_mma_stage_tiles(mt8) * 8 * mt8 * 128 : 0));
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

// A shared-memory load from a shared-window address that already holds the base.
__device__ __forceinline__ uint32_t q4_lds32(uint32_t address) {
  uint32_t v = 0;
#if defined(Q4_MMA_DEVICE)
  asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(address));
#endif
  return v;
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

// MT8 8-column batch tiles an item (M tile 8 * MT8).
template <int DT, int MT8, bool SHARED_ACT, bool NESTED>
__global__ void __launch_bounds__(q4_mma_warps(MT8) * 32, 1)
q4_mma_kernel(const void* __restrict__ A, Q4Weights w, const void* __restrict__ bias, void* __restrict__ out,
              int M, float* __restrict__ workspace, int* __restrict__ tickets) {
#if defined(Q4_MMA_DEVICE)
  constexpr int WARPS = q4_mma_warps(MT8), THREADS = WARPS * 32, R = q4_mma_row_tiles(MT8);
  constexpr int U = q4_mma_stage_tiles(MT8), ST = q4_mma_stages(SHARED_ACT), ROWS = 16 * R, COLS = 8 * MT8;
  constexpr int G = q4_mma_team(MT8, SHARED_ACT);
  static_assert(!SHARED_ACT || MT8 <= 4, "64-row activation tiles do not fit beside the rings");
  static_assert(THREADS % 256 == 0 && U * R * WARPS == 64, "table fill: whole byte values a thread; ring: 64 tile rows a stage");
  __shared__ uint32_t pair_table[256 * 32];  // [byte][lane]: the pair {code[byte >> 4], code[byte & 15]}
  __shared__ float nested_code[NESTED ? 256 : 1];
  extern __shared__ __align__(16) uint8_t q4_mma_ring[];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int K = w.K, KT = K / 64, row_blocks = K >> w.blocksize_log2;
  // An item is G row tiles of ROWS rows by a batch tile; warp `sub` of a team takes row tile `sub` of each.
  const int sub = warp % G, row_items = (w.N + ROWS - 1) / ROWS, team_rows = (row_items + G - 1) / G;
  const int T = (M + COLS - 1) / COLS * team_rows * KT;  // (item, K tile) pairs, K tiles innermost
  // W <= T teams share the pairs, each at least one (a team past W has none), so the teams on an item are
  // exactly team_of(its first pair) .. team_of(its last).
  const int W = min((int)gridDim.x * (WARPS / G), T), v = blockIdx.x * (WARPS / G) + warp / G;
  auto start_of = [&](int x) { return (int)((long)T * x / W); };              // first pair of team x
  auto team_of = [&](int i) { return (int)(((long)(i + 1) * W + T - 1) / T) - 1; };  // team holding pair i
  const int begin = v < W ? start_of(v) : T, end = v < W ? start_of(v + 1) : T;
  constexpr int ROW_BYTES = q4_mma_row_bytes(MT8);
  uint8_t* wring = q4_mma_ring + warp * ST * ROWS * ROW_BYTES;  // [stage][row][U tiles of 32 bytes, padding]
  uint32_t* sring = reinterpret_cast<uint32_t*>(q4_mma_ring + WARPS * ST * ROWS * ROW_BYTES) + warp * ST * ROWS * U;
  // [stage][U K tiles][COLS rows][8 chunks of 16 bytes, chunk c of row r at c ^ (r % 8): conflict-free reads]
  uint8_t* aring = q4_mma_ring + WARPS * ST * ROWS * (ROW_BYTES + 4 * U);

  // A place in the share: item (row item rt, batch item ct) and K tile kt, walked forward without divisions.
  struct Pos { int rt, ct, kt; };
  auto advance = [&](Pos p, int n) {
    for (p.kt += n; p.kt >= KT; p.kt -= KT)
      if (++p.rt == team_rows) p.rt = 0, ++p.ct;
    return p;
  };
  const Pos first = {begin / KT % team_rows, begin / KT / team_rows, begin % KT};
  // Offsets below are 32-bit: N * K / 2 weight bytes and M * K activations stay under 2^32 for any LLM layer.
  auto row_of = [&](const Pos& p, int r) { return (uint32_t)min((p.rt * G + sub) * ROWS + r, w.N - 1); };

  // Copy roles, per stage of U pairs (U * 32 bytes of each of ROWS rows, contiguous while the stage stays in
  // one item): in copy c lane l fetches 16 bytes at offset 16 * (l % (2U)) of row c * 32 / (2U) + l / (2U),
  // stored as fetched, a ring row per weight row. Absmax: ROWS x U words a stage, lane l
  // taking tile l % U of row l / U (+ 32 / U per copy). Rows past N read row N-1 (in bounds) and are
  // dropped at the store; so are batch rows past M. Nested absmax copies the aligned word that holds the
  // 8-bit code.
  constexpr int LANES_A_ROW = 2 * U, ROWS_A_COPY = 32 / LANES_A_ROW;
  const int copy_chunk = lane % LANES_A_ROW, copy_tile = copy_chunk / 2, copy_half = copy_chunk % 2;
  const int scale_tile = lane % U;
  const int act_row = threadIdx.x / 8 % COLS, act_chunk = threadIdx.x % 8, act_tile = threadIdx.x / (COLS * 8);
  const int act_column = 16 * (act_chunk ^ (act_row % 8));
  auto issue = [&](int stage, const Pos& at) {
    const int slot = stage % ST, i = begin + stage * U;
    if (i + copy_tile < end) {
      const Pos p = advance(at, copy_tile);
      const uint32_t column = p.kt * 32 + 16 * copy_half;
#pragma unroll
      for (int c = 0; c < ROWS / ROWS_A_COPY; ++c) {
        const int r = c * ROWS_A_COPY + lane / LANES_A_ROW;
        q4_cp_async16(wring + (slot * ROWS + r) * ROW_BYTES + 32 * copy_tile + 16 * copy_half,
                      w.packed + (row_of(p, r) * (uint32_t)(K / 2) + column));
      }
    }
    if (i + scale_tile < end) {
      const Pos p = advance(at, scale_tile);
      const uint32_t block = (p.kt * 64) >> w.blocksize_log2;
#pragma unroll
      for (int c = 0; c < ROWS * U / 32; ++c) {
        const int r = c * (32 / U) + lane / U;
        const uint32_t b = row_of(p, r) * (uint32_t)row_blocks + block;
        const void* src = NESTED ? static_cast<const void*>(static_cast<const uint8_t*>(w.absmax) + (b & ~3u))
                                 : static_cast<const void*>(static_cast<const float*>(w.absmax) + b);
        q4_cp_async4(sring + (slot * ROWS + r) * U + scale_tile, src);
      }
    }
    if constexpr (SHARED_ACT) {  // the team's activation tiles: thread x copies chunk x % 8 of row x / 8 % COLS
      constexpr int EVERY = THREADS / (COLS * 8);  // of every EVERY-th K tile of the stage
      Pos p = advance(at, act_tile);
#pragma unroll
      for (int u = act_tile; u < U; u += EVERY, p = advance(p, EVERY))
        if (i + u < end)
          q4_cp_async16(aring + ((slot * U + u) * COLS + act_row) * 128 + act_column,
                        static_cast<const uint16_t*>(A) + ((uint32_t)min(p.ct * COLS + act_row, M - 1) * (uint32_t)K + p.kt * 64 + 8 * act_chunk));
    }
    q4_cp_async_commit();  // an empty group past the end keeps the wait count uniform
  };

  const int stages = (end - begin + U - 1) / U;
  Pos issued = first;
  // 16-warp blocks issue the first stage alone before the fill, so that it reaches DRAM first; 8-warp blocks
  // issue all three together (their later stages would start late).
  constexpr int EARLY = WARPS == 16 ? 1 : ST - 1;
#pragma unroll
  for (int k = 0; k < EARLY; ++k) issue(k, issued), issued = advance(issued, U);
  {  // the table fill, while the first stages are in flight: byte x's pair to all 32 columns, each thread
     // starting at its own lane's column so that a warp's stores never share a bank
    constexpr int PARTS = THREADS / 256;
    const int x = threadIdx.x % 256, part = threadIdx.x / 256;
    const uint32_t pair = q4_half_bits<DT>(w.code[x >> 4]) | q4_half_bits<DT>(w.code[x & 15]) << 16;
#pragma unroll
    for (int c = part * 32 / PARTS; c < (part + 1) * 32 / PARTS; ++c) pair_table[x * 32 + ((c + lane) & 31)] = pair;
    if constexpr (NESTED)
      if (part == 0) nested_code[x] = w.nested_code[x];
  }
#pragma unroll
  for (int k = EARLY; k < ST - 1; ++k) issue(k, issued), issued = advance(issued, U);
  __syncthreads();

  // The four pairs of a 32-bit word of weights (byte b: weights 2b, 2b+1 of the word's eight).
  const uint32_t column = lane * 4, lane_column = (uint32_t)__cvta_generic_to_shared(pair_table) + column;
  auto decode = [&](uint32_t x, uint32_t (&p)[4]) {
    if constexpr (MT8 == 1) {
#pragma unroll
      for (int b = 0; b < 4; ++b) p[b] = q4_lds32(((uint32_t)__byte_perm(x, 0, 0x4440 + b) << 7) + lane_column);
    } else {
      const uint32_t at[4] = {x << 7, x >> 1, x >> 9, x >> 17};  // byte b at bits 7..14: its row of 128 bytes
#pragma unroll
      for (int b = 0; b < 4; ++b)
        p[b] = *reinterpret_cast<const uint32_t*>(reinterpret_cast<const char*>(pair_table) + ((at[b] & 0x7f80u) | column));
    }
  };

  auto scale_of = [&](uint32_t word, const Pos& p, int r) {
    if constexpr (NESTED) {
      const uint32_t b = row_of(p, r) * (uint32_t)row_blocks + ((p.kt * 64) >> w.blocksize_log2);
      return nested_code[(word >> (8 * (b & 3))) & 0xff] * q4_load_cached(w.nested_absmax + (b >> 8)) + w.nested_offset;
    } else {
      return __uint_as_float(word);
    }
  };

  float acc[R][MT8][4];
  // Fragment element e of acc[ri][j]: item row 16ri + g (+8 for e >= 2), item column 8j + 2t (+1 odd e).
  auto each_element = [&](auto&& f) {
#pragma unroll
    for (int ri = 0; ri < R; ++ri)
#pragma unroll
      for (int j = 0; j < MT8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) f(acc[ri][j][e], 16 * ri + g + (e >= 2 ? 8 : 0), 8 * j + 2 * t + (e & 1));
  };

  auto consume = [&](int slot, int u, const Pos& p) {
    const uint8_t* wt = wring + slot * ROWS * ROW_BYTES + 32 * u;
    const uint32_t* st = sring + slot * ROWS * U + u;
    uint4 act[2][MT8];  // chunk h feeds steps 2h, 2h+1
#pragma unroll
    for (int j = 0; j < MT8; ++j) {
      if constexpr (SHARED_ACT) {
        const uint8_t* a = aring + ((slot * U + u) * COLS + 8 * j + g) * 128;
        act[0][j] = *reinterpret_cast<const uint4*>(a + 16 * ((2 * t) ^ g));
        act[1][j] = *reinterpret_cast<const uint4*>(a + 16 * ((2 * t + 1) ^ g));
        continue;
      }
      const uint16_t* a = static_cast<const uint16_t*>(A) +
                          ((uint32_t)min(p.ct * COLS + 8 * j + g, M - 1) * (uint32_t)K + p.kt * 64 + 16 * t);
      act[0][j] = q4_load_cached(reinterpret_cast<const uint4*>(a));
      act[1][j] = q4_load_cached(reinterpret_cast<const uint4*>(a + 8));
    }
#pragma unroll
    for (int ri = 0; ri < R; ++ri) {
      const int r = 16 * ri + g;
      const uint2 cw = *reinterpret_cast<const uint2*>(wt + r * ROW_BYTES + 8 * t);
      const uint2 cw8 = *reinterpret_cast<const uint2*>(wt + (r + 8) * ROW_BYTES + 8 * t);
      const float scale = scale_of(st[r * U], p, r), scale8 = scale_of(st[(r + 8) * U], p, r + 8);
      float part[MT8][4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint32_t q[4], q8[4];
        decode(h ? cw.y : cw.x, q);
        decode(h ? cw8.y : cw8.x, q8);
#pragma unroll
        for (int s2 = 0; s2 < 2; ++s2) {
          const uint32_t a[4] = {q[2 * s2], q8[2 * s2], q[2 * s2 + 1], q8[2 * s2 + 1]};
#pragma unroll
          for (int j = 0; j < MT8; ++j) {
            if (h == 0 && s2 == 0) part[j][0] = part[j][1] = part[j][2] = part[j][3] = 0.f;
            q4_mma16816<DT>(part[j], a, s2 ? act[h][j].z : act[h][j].x, s2 ? act[h][j].w : act[h][j].y);
          }
        }
      }
#pragma unroll
      for (int j = 0; j < MT8; ++j) {
        acc[ri][j][0] = fmaf(part[j][0], scale, acc[ri][j][0]);
        acc[ri][j][1] = fmaf(part[j][1], scale, acc[ri][j][1]);
        acc[ri][j][2] = fmaf(part[j][2], scale8, acc[ri][j][2]);
        acc[ri][j][3] = fmaf(part[j][3], scale8, acc[ri][j][3]);
      }
    }
  };

  // An item's sums are complete: store them, or, when this warp held only part of its K, leave them in its
  // workspace slot (0: the segment its share starts with, 1: the one it ends with) for the last to arrive.
  auto flush = [&](const Pos& p, int first_pair, int last_pair) {
    const int tile = p.rt * G + sub, n0 = tile * ROWS, m0 = p.ct * COLS;
    if (G > 1 && n0 >= w.N) return;  // a team's row tile past N: every team on its item skips it alike
    const int item = p.ct * team_rows + p.rt, ticket = p.ct * row_items + tile;
    const int rows = min(ROWS, w.N - n0), cols = min(COLS, M - m0);
    if (first_pair % KT != 0 || last_pair % KT != KT - 1) {
      float* mine = workspace + ((long)(v * G + sub) * 2 + (first_pair == begin ? 0 : 1)) * ROWS * COLS;
      each_element([&](float& a, int r, int c) { if (c < cols) mine[r * COLS + c] = a; });
      __threadfence();  // partials visible device-wide before the ticket says so
      __syncwarp();
      int arrived = 0;
      if (lane == 0) arrived = atomicAdd(tickets + ticket, 1);
      const int first = team_of(item * KT), last = team_of(item * KT + KT - 1);
      if (__shfl_sync(0xffffffffu, arrived, 0) != last - first) return;
      __threadfence();
      each_element([&](float& a, int, int) { a = 0.f; });
      for (int x = first; x <= last; ++x) {
        const float* theirs = workspace + ((long)(x * G + sub) * 2 + (start_of(x) >= item * KT ? 0 : 1)) * ROWS * COLS;
        each_element([&](float& a, int r, int c) { if (c < cols) a += __ldcg(theirs + r * COLS + c); });  // L2: other SMs wrote it
      }
      if (lane == 0) tickets[ticket] = 0;  // ready for the next launch
    }
    each_element([&](float& a, int r, int c) {
      if (r >= rows || c >= cols) return;
      q4_store1<DT>(out, (long)(m0 + c) * w.N + n0 + r, bias ? a + q4_load_act1<DT>(bias, n0 + r) : a);
    });
  };

  Pos at = first;
  int first_pair = begin;
  for (int k = 0; k < stages; ++k) {
    if constexpr (SHARED_ACT) {
      q4_cp_async_wait<ST - 2>();  // this thread's copies of stage k have landed
      __syncthreads();  // the team's copies of stage k are visible, and slot (k - 1) % ST is free
      issue(k + ST - 1, issued);
    } else {
      __syncwarp();  // every lane is done with slot (k - 1) % ST before it is refilled
      issue(k + ST - 1, issued);
      q4_cp_async_wait<ST - 1>();
      __syncwarp();  // the other lanes' copies of stage k are visible
    }
    issued = advance(issued, U);
    const int i0 = begin + k * U;
    if (at.kt + U <= KT && i0 + U <= end) {
      // The stage's U pairs are K tiles of one item and the share: a segment can only start at the first
      // and end at the last, so the U tiles run straight, free for the compiler to interleave.
      if (i0 == begin || at.kt == 0) {
        first_pair = i0;
        each_element([&](float& a, int, int) { a = 0.f; });
      }
#pragma unroll(MT8 >= 8 ? 2 : U)  // 64-row batch tiles: two at a time, or their activations spill
      for (int u = 0; u < U; ++u) consume(k % ST, u, Pos{at.rt, at.ct, at.kt + u});
      const Pos last = {at.rt, at.ct, at.kt + U - 1};
      if (i0 + U == end || last.kt == KT - 1) flush(last, first_pair, i0 + U - 1);
      at = advance(at, U);
      continue;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {  // a stage across items or past the share: pair by pair
      const int i = i0 + u;
      if (i >= end) break;
      if (i == begin || at.kt == 0) {
        first_pair = i;
        each_element([&](float& a, int, int) { a = 0.f; });
      }
      consume(k % ST, u, at);
      if (i == end - 1 || at.kt == KT - 1) flush(at, first_pair, i);
      at = advance(at, 1);
    }
  }
  q4_cp_async_wait<0>();
#else
  __builtin_trap();  // AMD and pre-sm_80 NVIDIA: q4_mma_supported() says so before any launch
#endif
}

typedef void (*q4_mma_kernel_t)(const void*, Q4Weights, const void*, void*, int, float*, int*);

static int q4_mma_tiles8(int M) { return M <= 8 ? 1 : M <= 16 ? 2 : M <= 32 ? 4 : 8; }

template <int DT, bool NESTED>
static q4_mma_kernel_t q4_mma_instance(int M) {
  switch (q4_mma_tiles8(M)) {
    case 1: return q4_mma_shares_act(M) ? q4_mma_kernel<DT, 1, true, NESTED> : q4_mma_kernel<DT, 1, false, NESTED>;
    case 2: return q4_mma_kernel<DT, 2, true, NESTED>;
    case 4: return q4_mma_kernel<DT, 4, true, NESTED>;
    default: return q4_mma_kernel<DT, 8, false, NESTED>;
  }
}

// The instance that runs M batch rows.
static q4_mma_kernel_t q4_mma_instance_all(int dtype, bool nested, int M) {
  if (dtype == Q4_BF16) return nested ? q4_mma_instance<Q4_BF16, true>(M) : q4_mma_instance<Q4_BF16, false>(M);
  return nested ? q4_mma_instance<Q4_F16, true>(M) : q4_mma_instance<Q4_F16, false>(M);
}

static int q4_mma_smem_bytes(int M) { return q4_mma_ring_bytes(q4_mma_tiles8(M), q4_mma_shares_act(M)); }

// Blocks of M's instance resident per SM on the current device, its ring's shared memory allowed first.
static int q4_mma_residency(q4_mma_kernel_t kernel, int M) {
  int n = 0;
#if defined(Q4_NVIDIA)
  const void* entry = reinterpret_cast<const void*>(kernel);
  if (cudaFuncSetAttribute(entry, cudaFuncAttributeMaxDynamicSharedMemorySize, q4_mma_smem_bytes(M)) != q4_success ||
      q4_occupancy(&n, entry, q4_mma_warps(q4_mma_tiles8(M)) * 32, q4_mma_smem_bytes(M)) != q4_success)
    return 0;
#endif
  return n;
}

static int q4_mma_item_rows(int M) { return 16 * q4_mma_row_tiles(q4_mma_tiles8(M)); }

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

// The mma launch: the batch tile (8, 16, 32 or 64 rows: the smallest that holds M, 64 above) and the
// blocks, as many as stay resident (one an SM), fewer when that would leave a warp under
// Q4_MMA_MIN_TILES K tiles. *blocks > 0 on entry is kept (exploring). Host code: no GPU needed.
int q4_mma_config(int N, int M, int K, int sm_count, int blocks_per_sm, int* blocks, int* m_tile) {
  if (N <= 0 || M <= 0 || K <= 0 || K % 64 != 0 || sm_count <= 0 || blocks_per_sm <= 0) return (int)q4_invalid_value;
  const int mt8 = q4_mma_tiles8(M), rows = q4_mma_item_rows(M);
  *m_tile = 8 * mt8;
  if (*blocks > 0) return 0;
  const int team = q4_mma_team(mt8, q4_mma_shares_act(M)), teams = q4_mma_warps(mt8) / team;  // warps a team, teams a block
  const long team_rows = ((N + rows - 1) / rows + team - 1) / team;
  const long pairs = (long)((M + 8 * mt8 - 1) / (8 * mt8)) * team_rows * (K / 64);
  const long wanted = (pairs + Q4_MMA_MIN_TILES * teams - 1) / (Q4_MMA_MIN_TILES * teams);
  *blocks = (int)(wanted < (long)sm_count * blocks_per_sm ? wanted : (long)sm_count * blocks_per_sm);
  return 0;
}

// The scratch a launch of `blocks` needs: fp32 workspace (two item-sized slots a warp) and tickets (one an
// item), zero before the first launch (each launch leaves them zero).
int q4_mma_scratch(int N, int M, int blocks, long* workspace_floats, int* tickets) {
  if (N <= 0 || M <= 0 || blocks <= 0) return (int)q4_invalid_value;
  const int cols = 8 * q4_mma_tiles8(M), rows = q4_mma_item_rows(M);
  *workspace_floats = (long)blocks * q4_mma_warps(q4_mma_tiles8(M)) * 2 * rows * cols;
  *tickets = (N + rows - 1) / rows * ((M + cols - 1) / cols);
  return 0;
}

// q4_mma_config on the current device: its SM count and the instance's residency. Needs a GPU.
int q4_mma_plan(int dtype, int nested, int N, int M, int K, int* blocks, int* m_tile) {
  int dev = 0, sms = 0;
  if (q4_get_device(&dev) != q4_success || q4_device_attribute(&sms, q4_attr_sm_count, dev) != q4_success)
    return (int)q4_invalid_value;
  const int resident = q4_mma_residency(q4_mma_instance_all(dtype, nested != 0, M), M);
  return q4_mma_config(N, M, K, sms, resident > 0 ? resident : 1, blocks, m_tile);
}

// workspace and tickets as q4_mma_scratch sizes them for `blocks`.
int q4_mma_gemm(int dtype, int nested, const void* A, const uint8_t* packed, const void* absmax,
                const float* nested_absmax, const float* nested_code, float nested_offset, const float* code,
                const void* bias, void* out, int M, int N, int K, int blocksize, int blocks, float* workspace,
                int* tickets, void* stream) {
  if (dtype == Q4_F32 || blocksize < 64 || K % 64 != 0 || blocks < 1 || workspace == nullptr || tickets == nullptr ||
      (long)N * K / 2 >= (1L << 32) || (long)M * K >= (1L << 32))  // the kernel's 32-bit offsets
    return (int)q4_invalid_value;
  Q4Weights w{packed, absmax, nested_absmax, nested_code, nested_offset, code, N, K, __builtin_ctz(blocksize)};
  const q4_mma_kernel_t kernel = q4_mma_instance_all(dtype, nested != 0, M);
#if defined(Q4_NVIDIA)
  // The ring exceeds the 48 KB a launch gets without asking (per device: asked on every launch).
  cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize,
                       q4_mma_smem_bytes(M));
#endif
  kernel<<<blocks, q4_mma_warps(q4_mma_tiles8(M)) * 32, q4_mma_smem_bytes(M), static_cast<q4_stream_t>(stream)>>>(
      A, w, bias, out, M, workspace, tickets);
  return (int)q4_get_last_error();
}

}  // extern "C"
