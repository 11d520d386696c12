"""Peer defenses reimplemented from their descriptions, and the attack that undoes them, for benchmarks."""

from lightning_mergeguard.baselines.params_defense import (
    params_llama,
    params_mlp_chain,
    params_open_clip,
    realign_llama,
    realign_open_clip,
)

__all__ = ["params_llama", "params_mlp_chain", "params_open_clip", "realign_llama", "realign_open_clip"]
