"""The merge engine: pure per-tensor merge functions, mergekit-compatible configs, and streaming merges.

Example:
    >>> import torch
    >>> from lightning_mergeguard.merging import merge
    >>> cfg = {"merge_method": "ties", "base_model": "base", "parameters": {"normalize": True},
    ...        "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.5}}]}
    >>> merge(cfg, {"a": {"w": torch.tensor([1.0, 0.1])}}, {"w": torch.zeros(2)})["w"]
    tensor([1., 0.])
"""

from lightning_mergeguard.merging.adamerging import adamerging, prediction_entropy
from lightning_mergeguard.merging.config import MergeConfig, ModelEntry
from lightning_mergeguard.merging.engine import check_compatible, iter_merge, merge
from lightning_mergeguard.merging.lora import LoraSource  # registers mergekit's BASE+ADAPTER with open_source
from lightning_mergeguard.merging.methods.breadcrumbs import breadcrumbs_merge
from lightning_mergeguard.merging.methods.consensus import sign_consensus_mask
from lightning_mergeguard.merging.methods.dare import dare_merge
from lightning_mergeguard.merging.methods.generalized import generalized_task_arithmetic
from lightning_mergeguard.merging.methods.linear import linear_merge
from lightning_mergeguard.merging.methods.slerp import slerp
from lightning_mergeguard.merging.methods.sparsify import magnitude_outliers_prune, magnitude_prune, random_prune
from lightning_mergeguard.merging.methods.task_arithmetic import task_arithmetic_merge
from lightning_mergeguard.merging.methods.ties import ties_merge
from lightning_mergeguard.merging.registry import METHODS, get_method, register_method
from lightning_mergeguard.merging.sources import SafetensorsSource, StateDictSource, WeightSource, open_source
from lightning_mergeguard.merging.spec import REQUIRED, MethodSpec, TensorContext
from lightning_mergeguard.merging.task_vectors import (
    add_task_vector,
    task_vector,
    task_vector_cosine,
    task_vector_norm,
)

__all__ = [
    "METHODS",
    "REQUIRED",
    "LoraSource",
    "MergeConfig",
    "MethodSpec",
    "ModelEntry",
    "SafetensorsSource",
    "StateDictSource",
    "TensorContext",
    "WeightSource",
    "adamerging",
    "add_task_vector",
    "breadcrumbs_merge",
    "check_compatible",
    "dare_merge",
    "generalized_task_arithmetic",
    "get_method",
    "iter_merge",
    "linear_merge",
    "magnitude_outliers_prune",
    "magnitude_prune",
    "merge",
    "open_source",
    "prediction_entropy",
    "random_prune",
    "register_method",
    "sign_consensus_mask",
    "slerp",
    "task_arithmetic_merge",
    "task_vector",
    "task_vector_cosine",
    "task_vector_norm",
    "ties_merge",
]
