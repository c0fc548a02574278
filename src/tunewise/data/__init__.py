"""The data stage: formats, validation, cleaning, splitting (see DESIGN.md)."""

from tunewise.data.formats import FORMATS, Problem, detect_format, read_examples
from tunewise.data.prepare import SPLITS, Collected, collect, load_split, write_dataset
from tunewise.data.records import Example, with_system

__all__ = [
    "FORMATS", "SPLITS", "Collected", "Example", "Problem", "collect", "detect_format",
    "load_split", "read_examples", "with_system", "write_dataset",
]
