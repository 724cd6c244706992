"""Data sets: `dataset_info(name, data_root)` and `build_dataset(name, data_root, split, ...)`.

Names are in the `DATASETS` registry (digits, npz, cifar100, imagenet, imagefolder, webdataset); see
fct/data/datasets.py for each one's layout, transforms and normalisation.
"""

from fct.data.datasets import DATASETS, DatasetInfo, DataSource, build_dataset, dataset_info

__all__ = ["DATASETS", "DataSource", "DatasetInfo", "build_dataset", "dataset_info"]
