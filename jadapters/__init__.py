"""jadapters: adapters for JAX and Flax.

Parameter-efficient fine-tuning of unmodified Linen and NNX models: adapter modules, pure
strategies that join them to the stream, NeMo's adapter API, frozen-base training with optax
and adapter-only checkpoints.
"""

from jadapters._adapter_set import AdapterSet as AdapterSet
from jadapters._adapter_set import AdapterSpec as AdapterSpec
from jadapters._chain import apply_adapter as apply_adapter
from jadapters.adapters.base import AdapterConfig as AdapterConfig
from jadapters.adapters.linear import LinearAdapter as LinearAdapter
from jadapters.adapters.linear import LinearAdapterConfig as LinearAdapterConfig
from jadapters.config import build_adapter as build_adapter
from jadapters.config import config_from_dict as config_from_dict
from jadapters.config import config_from_json as config_from_json
from jadapters.config import config_of as config_of
from jadapters.config import config_to_dict as config_to_dict
from jadapters.config import config_to_json as config_to_json
from jadapters.config import register_adapter as register_adapter
from jadapters.config import register_strategy as register_strategy
from jadapters.losses import AUX_LOSS_COLLECTION as AUX_LOSS_COLLECTION
from jadapters.losses import AdapterLoss as AdapterLoss
from jadapters.losses import total_auxiliary_loss as total_auxiliary_loss
from jadapters.nnx.mixins import AdapterFilter as AdapterFilter
from jadapters.nnx.mixins import AdapterModelMixin as AdapterModelMixin
from jadapters.nnx.mixins import AdapterModuleMixin as AdapterModuleMixin
from jadapters.nnx.mixins import freeze_batchnorm as freeze_batchnorm
from jadapters.nnx.shell import AdapterParam as AdapterParam
from jadapters.nnx.shell import NNXAdapter as NNXAdapter
from jadapters.strategies import AdapterStrategy as AdapterStrategy
from jadapters.strategies import ResidualAddStrategy as ResidualAddStrategy
from jadapters.strategies import ReturnResultStrategy as ReturnResultStrategy
from jadapters.strategies import ScaledAddStrategy as ScaledAddStrategy
from jadapters.strategies import StrategyOutput as StrategyOutput
from jadapters.strategies import residual_add as residual_add
from jadapters.strategies import scaled_add as scaled_add

__version__ = "0.1.0"

__all__ = [
    "AUX_LOSS_COLLECTION",
    "AdapterConfig",
    "AdapterFilter",
    "AdapterLoss",
    "AdapterModelMixin",
    "AdapterModuleMixin",
    "AdapterParam",
    "AdapterSet",
    "AdapterSpec",
    "AdapterStrategy",
    "LinearAdapter",
    "LinearAdapterConfig",
    "NNXAdapter",
    "ResidualAddStrategy",
    "ReturnResultStrategy",
    "ScaledAddStrategy",
    "StrategyOutput",
    "apply_adapter",
    "build_adapter",
    "config_from_dict",
    "config_from_json",
    "config_of",
    "config_to_dict",
    "config_to_json",
    "freeze_batchnorm",
    "register_adapter",
    "register_strategy",
    "residual_add",
    "scaled_add",
    "total_auxiliary_loss",
]
