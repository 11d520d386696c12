"""Peer defenses reimplemented from their descriptions, for comparison benchmarks."""

from lightning_mergeguard.baselines.params import params_llama, params_mlp_chain

__all__ = ["params_llama", "params_mlp_chain"]
