"""Pathology report text → stage-1 report targets with only what H&E shows (see README.md)."""

from data_recipes.tcga_reports.filter import (
    Dropped,
    FilteredReport,
    filter_report,
    report_units,
    split_sentences,
)
from data_recipes.tcga_reports.recipe import (
    PROMPTS,
    ReportInputError,
    ReportsResult,
    build_report_targets,
    load_reports,
    main,
    stage1_prompt,
    stage1_record,
)
from data_recipes.tcga_reports.rules import RULE_NAMES, SECTION_RULE_NAMES, SENTENCE_RULES, first_rule

__all__ = [
    "PROMPTS",
    "RULE_NAMES",
    "SECTION_RULE_NAMES",
    "SENTENCE_RULES",
    "Dropped",
    "FilteredReport",
    "ReportInputError",
    "ReportsResult",
    "build_report_targets",
    "filter_report",
    "first_rule",
    "load_reports",
    "main",
    "report_units",
    "split_sentences",
    "stage1_prompt",
    "stage1_record",
]
