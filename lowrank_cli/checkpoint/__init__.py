"""The lrc checkpoint: one self-describing safetensors file (format.py: what it says; io.py: save and load)."""

from lowrank_cli.checkpoint.format import SCHEMA, CheckpointInfo, is_lrc_checkpoint, read_info
from lowrank_cli.checkpoint.io import load, read_checkpoint, save

__all__ = ["SCHEMA", "CheckpointInfo", "is_lrc_checkpoint", "load", "read_checkpoint", "read_info", "save"]
