"""Checkpoints: the layout-free consolidated form and conversions to and from it."""
from megallama.checkpoint.consolidated import is_consolidated, load_consolidated, save_consolidated

__all__ = ["is_consolidated", "load_consolidated", "save_consolidated"]
