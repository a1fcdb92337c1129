"""Data layer: readers (formats), the built-in dataset, 3-stage split + blend, tokenised cache, collators."""
from rlhf.data.blending import blend_stage_records, parse_split, split_indices
from rlhf.data.collate import collate_pairs, collate_prompts, collate_sft
from rlhf.data.datasets import TokenizedDataset
from rlhf.data.formats import DataError, Record, format_prompt, load_records, load_records_with_stats
from rlhf.data.pretrain import build_pretrain_data
from rlhf.data.stages import StageData, build_stage_data

__all__ = [
    "DataError", "Record", "StageData", "TokenizedDataset", "blend_stage_records", "build_pretrain_data",
    "build_stage_data", "collate_pairs", "collate_prompts", "collate_sft", "format_prompt", "load_records",
    "load_records_with_stats", "parse_split", "split_indices",
]
