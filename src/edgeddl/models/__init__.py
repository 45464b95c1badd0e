"""Model zoo and per-sample model cost measurement."""

from edgeddl.models.cost import ModelCost, cached_model_cost, model_cost
from edgeddl.models.zoo import MODEL_NAMES, CifarResNet, build_model

__all__ = [
    "MODEL_NAMES",
    "CifarResNet",
    "ModelCost",
    "build_model",
    "cached_model_cost",
    "model_cost",
]
