// q4_launch.h: the simt launcher's time model, its one home. q4_gemm.cu's q4_simt_config computes with
// these constants and q4lab/launch.py reads them from this file (one `constexpr TYPE NAME = VALUE;` a line).
// A block's work is groups * (R * row_ns[R] + MT * act_ns + R * MT * pair_ns) + block_ns for one warp
// alone, where a group is Q4_MODEL_GROUP weights of K; an SM runs its share of the grid in waves of its
// resident blocks, each wave slowed by max(1, resident warps / Q4_L1_WARPS).
#pragma once

constexpr int Q4_WARPS = 4;                  // warps per block: 128 threads (256 on wave64) keeps 4+ blocks per SM/CU
constexpr double Q4_MODEL_GROUP = 1024;      // weights of K per modelled group
constexpr double Q4_ROW_NS_R1 = 100;         // decode of one weight row when a warp holds 1 row,
constexpr double Q4_ROW_NS_R2 = 140;         // 2 rows: they share its issue slots and registers,
constexpr double Q4_ROW_NS_R4 = 190;         // 4 rows: so each costs more
constexpr double Q4_ACT_NS_16BIT = 100;      // activation loads of one row of the M tile, fp16/bf16
constexpr double Q4_ACT_NS_F32 = 275;        // fp32: its 8 activations a lane touch twice the cache lines
constexpr double Q4_PAIR_NS = 40;            // FMAs of one (weight row, activation row) pair
constexpr double Q4_BLOCK_NS = 50;           // a block's fixed cost
constexpr double Q4_L1_WARPS = 9;            // resident warps that saturate an SM's L1 data pipe
