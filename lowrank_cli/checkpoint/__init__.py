"""The lrc checkpoint: one self-describing safetensors file (format.py: what it says; io.py: save and load)."""

from lowrank_cli.checkpoint.io import CheckpointInfo, is_lrc_checkpoint, load, read_checkpoint, read_info, save

__all__ = ["CheckpointInfo", "is_lrc_checkpoint", "load", "read_checkpoint", "read_info", "save"]
