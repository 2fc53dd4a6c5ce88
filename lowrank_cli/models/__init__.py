"""MODEL source <-> nn.Module: specs, builders (timm, transformers), the Hub, weights files, inputs, structure."""
