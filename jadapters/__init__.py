"""jadapters: adapters for JAX and Flax.

Parameter-efficient fine-tuning of unmodified Linen and NNX models: adapter modules, pure
strategies that join them to the stream, NeMo's adapter API, frozen-base training with optax
and adapter-only checkpoints.
"""

from jadapters._adapter_set import AdapterSet as AdapterSet
from jadapters._adapter_set import AdapterSpec as AdapterSpec
from jadapters._version import __version__ as __version__
from jadapters.adapters.bank import AdapterBank as AdapterBank
from jadapters.adapters.bank import AdapterBankConfig as AdapterBankConfig
from jadapters.adapters.base import AdapterConfig as AdapterConfig
from jadapters.adapters.fusion import AdapterFusion as AdapterFusion
from jadapters.adapters.fusion import AdapterFusionConfig as AdapterFusionConfig
from jadapters.adapters.ia3 import IA3 as IA3
from jadapters.adapters.ia3 import IA3Config as IA3Config
from jadapters.adapters.linear import LinearAdapter as LinearAdapter
from jadapters.adapters.linear import LinearAdapterConfig as LinearAdapterConfig
from jadapters.adapters.lora import LoRA as LoRA
from jadapters.adapters.lora import LoRAConfig as LoRAConfig
from jadapters.adapters.lora import lora_delta as lora_delta
from jadapters.adapters.parallel import ParallelAdapter as ParallelAdapter
from jadapters.adapters.parallel import ParallelAdapterConfig as ParallelAdapterConfig
from jadapters.checkpoint import AdapterCheckpointManager as AdapterCheckpointManager
from jadapters.checkpoint import RestoredCheckpoint as RestoredCheckpoint
from jadapters.checkpoint import abstract_adapters as abstract_adapters
from jadapters.checkpoint import adapter_metadata as adapter_metadata
from jadapters.checkpoint import load_adapters as load_adapters
from jadapters.checkpoint import read_adapter_metadata as read_adapter_metadata
from jadapters.checkpoint import save_adapters as save_adapters
from jadapters.compiled import linen_forward as linen_forward
from jadapters.compiled import nnx_forward as nnx_forward
from jadapters.composition import Average as Average
from jadapters.composition import BatchSplit as BatchSplit
from jadapters.composition import Fuse as Fuse
from jadapters.composition import Parallel as Parallel
from jadapters.composition import Stack as Stack
from jadapters.config import build_adapter as build_adapter
from jadapters.config import config_from_dict as config_from_dict
from jadapters.config import config_from_json as config_from_json
from jadapters.config import config_of as config_of
from jadapters.config import config_to_dict as config_to_dict
from jadapters.config import config_to_json as config_to_json
from jadapters.config import register_adapter as register_adapter
from jadapters.config import register_strategy as register_strategy
from jadapters.interop import export_peft as export_peft
from jadapters.interop import import_peft as import_peft
from jadapters.linen.transform import AdaptedLinen as AdaptedLinen
from jadapters.losses import AUX_LOSS_COLLECTION as AUX_LOSS_COLLECTION
from jadapters.losses import AdapterLoss as AdapterLoss
from jadapters.losses import total_auxiliary_loss as total_auxiliary_loss
from jadapters.merge import merge_adapters as merge_adapters
from jadapters.nnx.mixins import AdapterFilter as AdapterFilter
from jadapters.nnx.mixins import AdapterModelMixin as AdapterModelMixin
from jadapters.nnx.mixins import AdapterModuleMixin as AdapterModuleMixin
from jadapters.nnx.mixins import freeze_batchnorm as freeze_batchnorm
from jadapters.nnx.shell import NNXAdapter as NNXAdapter
from jadapters.optim import freeze_base as freeze_base
from jadapters.optim import param_labels as param_labels
from jadapters.optim import trainable_mask as trainable_mask
from jadapters.partition import AdapterSummary as AdapterSummary
from jadapters.partition import merge_variables as merge_variables
from jadapters.partition import split_model as split_model
from jadapters.partition import split_variables as split_variables
from jadapters.partition import summarize as summarize
from jadapters.routing import route as route
from jadapters.runtime import apply_adapter as apply_adapter
from jadapters.slots import SlotTable as SlotTable
from jadapters.slots import clear_slot as clear_slot
from jadapters.slots import load_slot as load_slot
from jadapters.slots import put_slot as put_slot
from jadapters.slots import slot_weights as slot_weights
from jadapters.storage import ADAPTER_COLLECTION as ADAPTER_COLLECTION
from jadapters.storage import AdapterParam as AdapterParam
from jadapters.strategies import AdapterStrategy as AdapterStrategy
from jadapters.strategies import ResidualAddStrategy as ResidualAddStrategy
from jadapters.strategies import ReturnResultStrategy as ReturnResultStrategy
from jadapters.strategies import ScaledAddStrategy as ScaledAddStrategy
from jadapters.strategies import StrategyOutput as StrategyOutput
from jadapters.strategies import residual_add as residual_add
from jadapters.strategies import scaled_add as scaled_add
from jadapters.targets import Target as Target
from jadapters.training import LinenTrainStep as LinenTrainStep
from jadapters.training import adapter_optimizer as adapter_optimizer
from jadapters.training import linen_train_step as linen_train_step
from jadapters.training import nnx_train_step as nnx_train_step
from jadapters.transform import adapter_transform as adapter_transform

__all__ = [
    "AdapterBank",
    "AdapterBankConfig",
    "route",
    "SlotTable",
    "clear_slot",
    "load_slot",
    "put_slot",
    "slot_weights",
    "AdapterCheckpointManager",
    "RestoredCheckpoint",
    "abstract_adapters",
    "adapter_metadata",
    "load_adapters",
    "read_adapter_metadata",
    "save_adapters",
    "merge_adapters",
    "export_peft",
    "import_peft",
    "IA3",
    "IA3Config",
    "LoRA",
    "LoRAConfig",
    "ParallelAdapter",
    "ParallelAdapterConfig",
    "lora_delta",
    "ADAPTER_COLLECTION",
    "AdaptedLinen",
    "AdapterSummary",
    "LinenTrainStep",
    "Target",
    "adapter_optimizer",
    "adapter_transform",
    "freeze_base",
    "linen_train_step",
    "linen_forward",
    "nnx_forward",
    "merge_variables",
    "nnx_train_step",
    "param_labels",
    "split_model",
    "split_variables",
    "summarize",
    "trainable_mask",
    "AUX_LOSS_COLLECTION",
    "AdapterConfig",
    "AdapterFilter",
    "AdapterLoss",
    "AdapterModelMixin",
    "AdapterModuleMixin",
    "AdapterParam",
    "AdapterSet",
    "Average",
    "BatchSplit",
    "Fuse",
    "AdapterFusion",
    "AdapterFusionConfig",
    "Parallel",
    "Stack",
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
