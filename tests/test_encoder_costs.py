"""``llark plan --encoder``: each encoder's FLOPs per clip from its architecture, GPU time and disk."""

from __future__ import annotations

import math

import llark.cli
from pipeline.encoders.costs import (
    block_flops,
    encoder_costs,
    htsat_window_flops,
    mert_window_flops,
    storage_per_clip,
    whisper_window_flops,
)


def test_flops_follow_the_architectures():
    # One block: the projections and feed-forward (2 FLOP per weight per token) and the attention.
    assert block_flops(10, 8, 32) == 2 * 10 * (4 * 64 + 2 * 8 * 32) + 4 * 10 * 10 * 8
    mert95, frames = mert_window_flops(768, 12)
    assert frames == 374  # 5 s at 24 kHz through the 7 convolutions
    # The transformer holds about 85M weights: 2 FLOP each per frame, plus the CNN and attention.
    assert 2 * 85e6 * frames < mert95 < 2 * 85e6 * frames * 2
    # Whisper large-v3's encoder holds about 635M weights, applied to 1500 frames per 30 s window.
    assert 2 * 600e6 * 1500 < whisper_window_flops() < 2 * 700e6 * 1500 * 1.3
    assert 5e9 < htsat_window_flops() < 20e9  # Swin-T at 256 x 256: about 6 G multiply-adds


def test_the_table_compares_every_encoder_with_jukebox(capsys):
    costs = {c.label: c for c in encoder_costs()}
    jukebox = costs["Jukebox-5B, layer 36"]
    assert math.isclose(jukebox.flop_per_clip(25.0), 82e12)
    assert jukebox.flop_per_clip(25.0) / costs["MERT-v1-330M"].flop_per_clip(25.0) > 10
    assert costs["Whisper large-v3 encoder"].flop_per_clip(25.0) == costs["Whisper large-v3 encoder"].flop_per_clip(30.0)
    assert storage_per_clip(costs["MERT-v1-95M"], "one") == 250 * 768 * 2
    assert storage_per_clip(costs["MERT-v1-330M"], "all") == 25 * 250 * 1024 * 2
    assert storage_per_clip(costs["CLAP HTSAT (clap-htsat)"], "one") == 80 * 768 * 2  # 3.2 Hz
    assert llark.cli.main(["plan", "--encoder", "mert", "--tracks", "1000"]) == 0
    out = capsys.readouterr().out
    assert "embedding 1,000 clips of 25 s" in out and "Jukebox-5B, layer 36" in out and "MERT-v1-95M" in out
    assert "Whisper" not in out
    assert llark.cli.main(["plan", "--encoder", "all", "--gpu-utilization", "0"]) == 2
