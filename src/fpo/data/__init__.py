"""Preference data: row formats, tokenization, collation and the Lightning data module."""

from fpo.data.collate import PreferenceCollator
from fpo.data.datamodule import PreferenceDataModule, PreferenceDataset
from fpo.data.formats import Columns, PreferencePair, parse_row
from fpo.data.tokenize import TemplateSettings, Truncation, tokenize_pair

__all__ = [
    "Columns",
    "PreferenceCollator",
    "PreferenceDataModule",
    "PreferenceDataset",
    "PreferencePair",
    "TemplateSettings",
    "Truncation",
    "parse_row",
    "tokenize_pair",
]
