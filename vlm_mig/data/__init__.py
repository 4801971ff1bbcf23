"""Samples and where they come from: schema, loaders, benchmark registry, synthetic generators."""

from vlm_mig.data.schema import TASK_TYPES, DataError, Sample

__all__ = ["TASK_TYPES", "DataError", "Sample"]
