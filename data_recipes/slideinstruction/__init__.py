"""SlideChat's SlideInstruction → PathChat conversations and features (see README.md)."""

from data_recipes.slideinstruction.convert import (
    SlideInstructionConfig,
    SlideInstructionError,
    SlideInstructionResult,
    convert_record,
    convert_slideinstruction,
    load_records,
    main,
    write_slide_h5,
)

__all__ = [
    "SlideInstructionConfig",
    "SlideInstructionError",
    "SlideInstructionResult",
    "convert_record",
    "convert_slideinstruction",
    "load_records",
    "main",
    "write_slide_h5",
]
