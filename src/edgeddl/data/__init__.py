"""Datasets and their partitioning across fleet devices."""

from edgeddl.data.datasets import DATASET_NAMES, DatasetInfo, load_dataset
from edgeddl.data.partition import PARTITION_SCHEMES, partition
from edgeddl.data.sampler import ShardSampler

__all__ = [
    "DATASET_NAMES",
    "PARTITION_SCHEMES",
    "DatasetInfo",
    "ShardSampler",
    "load_dataset",
    "partition",
]
