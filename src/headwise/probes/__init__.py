"""Probes: the inputs a head is scored on, and what a head of each kind should attend to.

Every probe is a deterministic function of (tokenizer, settings, seed) returning a Probe:
equal-length token sequences plus the settings needed to reproduce them.
"""

from .base import Probe, adds_bos, content_token_ids
from .images import ImageProbe, image_probe
from .ordinal import ORDINAL_SEQUENCES, OrdinalPrompts, OrdinalTask, ordinal_prompts, ordinal_tasks
from .repeated import repeated_tokens
from .text import bundled_text_files, load_text, natural_text

__all__ = ["Probe", "ImageProbe", "image_probe", "adds_bos", "content_token_ids", "repeated_tokens", "natural_text",
           "load_text", "bundled_text_files", "ORDINAL_SEQUENCES", "OrdinalPrompts", "OrdinalTask", "ordinal_prompts",
           "ordinal_tasks"]
