"""The data stage: formats, validation, cleaning, splitting, statistics (see DESIGN.md)."""

from tunewise.data.formats import (
    FORMATS,
    Problem,
    detect_format,
    parse_mapping,
    read_examples,
)
from tunewise.data.prepare import (
    SPLITS,
    DataSettings,
    Prepared,
    load_split,
    prepare,
    preview_rows,
    write_prepared,
)
from tunewise.data.records import Example, with_system

__all__ = [
    "FORMATS", "SPLITS", "DataSettings", "Example", "Prepared", "Problem", "detect_format", "load_split",
    "parse_mapping", "prepare", "preview_rows", "read_examples", "with_system", "write_prepared",
]
