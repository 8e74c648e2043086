"""The Python launch model: the launcher's picks and the wave model's numbers."""
import re

import pytest

from q4lab import launch


def test_wave_model():
    # the launcher's choices where the H100 sweep agrees (data/experiments, experiment v6_rule): two rows a
    # warp at M=1 on a large N, one where N is small, the full M tile at M=8 and three tiles of 4 at M=12
    assert launch.simt_launch(28672, 1, 8192) == (2, 1) and launch.simt_launch(1024, 1, 4096) == (1, 1)
    assert launch.simt_launch(28672, 8, 8192) == (4, 8) and launch.simt_launch(16384, 12, 4096) == (4, 4)
    assert launch.simt_launch(512, 3, 4096)[1] <= 4  # never an M tile past M rounded up to a power of two
    # fp32 activations cost 275 ns a row, not 100: the fp32 sweep (experiment v6rule_configs_fp32)
    # has the lm_head at M=1 on 4 rows a warp (r4m1 145.5 us against r2m1's 167.4)
    assert launch.simt_launch(128256, 1, 4096) == (2, 1)
    assert launch.simt_launch(128256, 1, 4096, dtype="fp32") == (4, 1)
    assert launch.simt_block_ns(2, 1, 8192, "fp32") - launch.simt_block_ns(2, 1, 8192) == 8 * 175
    # 3584 blocks, 28 on the busiest of 132 SMs: 7 waves of 4 blocks (16 warps, 16/9 crowding), each block
    # 8 groups x (2 x 140 + 100 + 2 x 40) + 50 ns
    assert launch.simt_model_ns(28672, 1, 8192, 2, 1, 132, 4) == pytest.approx(7 * 16 / 9 * 3730)
    assert launch.wave_slowdown(28672, 1, 8192, "sm_90") == pytest.approx(28 / (3584 / 132))
    assert launch.wave_slowdown(28672, 1, 8192, "sm_90", sm_count=128) == 1.0  # 28 blocks on every SM
    assert launch.wave_slowdown(512, 1, 65536, "sm_90") == pytest.approx(132 * 5 * 9 / (128 * 20))
    assert launch.wave_slowdown(4096, 1, 4096, "unknown_arch") is None
    assert launch.wave_slowdown(4096, 1, 4096, "unknown_arch", sm_count=64, blocks_per_sm=4) == 1.0


def test_the_model_reads_its_constants_from_the_kernel_header(tmp_path):
    c = launch.constants()
    assert {"Q4_WARPS", "Q4_MODEL_GROUP", "Q4_ROW_NS_R1", "Q4_ROW_NS_R2", "Q4_ROW_NS_R4", "Q4_ACT_NS_16BIT",
            "Q4_ACT_NS_F32", "Q4_PAIR_NS", "Q4_BLOCK_NS", "Q4_L1_WARPS"} <= set(c)
    header = (launch.KERNEL_DIR / launch.LAUNCH_HEADER).read_text()
    (tmp_path / launch.LAUNCH_HEADER).write_text(header.replace("Q4_ACT_NS_F32 = 275;", "Q4_ACT_NS_F32 = 300;"))
    assert launch.constants(tmp_path)["Q4_ACT_NS_F32"] == 300 and c["Q4_ACT_NS_F32"] == 275
    with pytest.raises(FileNotFoundError, match="Q4LAB_KERNELS"):
        launch.constants(tmp_path / "none")


def test_the_kernel_takes_its_model_from_the_header_alone():
    # q4_simt_config names the header's constants; none of their values is written into it a second time
    gemm = (launch.KERNEL_DIR / "q4_gemm.cu").read_text()
    assert '#include "q4_launch.h"' in gemm
    config = gemm[gemm.index("int q4_simt_config("):gemm.index("int q4_simt_blocks_per_sm(")]
    for name in ("Q4_ROW_NS_R1", "Q4_ROW_NS_R2", "Q4_ROW_NS_R4", "Q4_ACT_NS_F32", "Q4_ACT_NS_16BIT", "Q4_PAIR_NS",
                 "Q4_BLOCK_NS", "Q4_L1_WARPS", "Q4_MODEL_GROUP"):
        assert name in config
    assert not re.search(r"\b(100|140|190|275|1024\.0|9\.0)\b", config)
