"""Split-K in the NF4 decode kernel follows the card's SM count (4 programs per SM), not a fixed 528."""

import pytest

pytest.importorskip("triton")

from slimtune.kernels.nf4_matmul import pick_config  # noqa: E402


def test_split_k_grows_with_sm_count():
    # one row of a 4096 x 4096 weight: BLOCK_N=2 gives 2048 programs, enough for 132 SMs (4 x 132 = 528)
    assert pick_config(1, 4096, 4096, sms=132)["SPLIT_K"] == 1
    # a card with 1024 SMs needs 4096 programs: split K in two
    assert pick_config(1, 4096, 4096, sms=1024)["SPLIT_K"] == 2
    # a narrow weight on a small card: 64 programs < 4 x 66 -> split K in four (bounded by K)
    assert pick_config(1, 128, 8192, sms=66)["SPLIT_K"] == 4
    assert pick_config(1, 128, 8192, sms=16)["SPLIT_K"] == 1
