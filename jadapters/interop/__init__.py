"""Exchanging adapters with the PyTorch ecosystem: Hugging Face PEFT's adapter format.

:func:`export_peft` writes LoRA and IA3 adapters of a Linen or NNX model as a PEFT adapter
directory that ``peft.PeftModel.from_pretrained`` loads; :func:`import_peft` reads one back.
Reading and writing the weights needs the ``safetensors`` package:
``pip install 'jadapters[interop]'``.
"""

from jadapters.interop.peft import export_peft as export_peft
from jadapters.interop.peft import import_peft as import_peft

__all__ = ["export_peft", "import_peft"]
