"""Samples and where they come from: schema, loaders, benchmark registry, synthetic generators."""

from vlm_mig.data.benchmarks import find_datasets_dir, get_benchmark, list_benchmarks, load_benchmark
from vlm_mig.data.loaders import (
    COUNT_QUESTION,
    FieldMap,
    LoadReport,
    SampleList,
    load_hf_dataset,
    load_jsonl,
    load_r1v_jsonl,
    load_superclevr,
)
from vlm_mig.data.schema import TASK_TYPES, DataError, Sample

__all__ = [
    "COUNT_QUESTION", "TASK_TYPES", "DataError", "FieldMap", "LoadReport", "Sample", "SampleList",
    "find_datasets_dir", "get_benchmark", "list_benchmarks", "load_benchmark", "load_hf_dataset", "load_jsonl",
    "load_r1v_jsonl", "load_superclevr",
]
