"""nn.Modules only (like timm.layers): the low-rank linear, and the layers later methods add."""
