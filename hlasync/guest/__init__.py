"""Guest images, memory layout and guest memory mappings."""

from .image import GuestImage, Segment, Symbol
from .layout import MemoryLayout, Region
from .memory import GuestMemory, MemoryImage

__all__ = [
    "GuestImage",
    "GuestMemory",
    "MemoryImage",
    "MemoryLayout",
    "Region",
    "Segment",
    "Symbol",
]
