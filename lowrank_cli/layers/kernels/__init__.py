"""GPU kernels behind the layers (imported only where Triton is there: `layers.fused_lowrank` checks first)."""
