"""The layers (like timm.layers): the low-rank linear, its fused execution on CUDA (`fused_lowrank`, the Triton
kernel in `kernels/`), and the layers later methods add."""
