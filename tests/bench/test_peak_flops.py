"""The MFU peak comes from the card's name, with a documented fallback for cards not in the table."""

from slimtune.bench.run import FALLBACK_PEAK_FLOPS, card_peak_flops


def test_peak_flops_read_from_the_card_name():
    assert card_peak_flops("NVIDIA H100 80GB HBM3") == 989e12  # SXM
    assert card_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert card_peak_flops("NVIDIA H200") == 989e12
    assert card_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert card_peak_flops("cpu") == FALLBACK_PEAK_FLOPS == 790e12
