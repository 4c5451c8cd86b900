"""Flax module paths and PyTorch module names, and which kernels a PyTorch ``Linear`` can stand for.

A Flax path joins module names with ``/`` (``bert/encoder/layer/0/attention/self/query``), a
PyTorch name with ``.`` (``bert.encoder.layer.0.attention.self.query``). Hugging Face's Flax
and PyTorch models name their modules alike, so the built-in mapping only swaps the separator;
for other models the user passes a function (or a mapping) from Flax path to PyTorch name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from jadapters.kernels import KernelLayout

ModuleNames = Callable[[str], Any] | Mapping[str, str] | None


def hf_module_name(path: str) -> str:
    """The PyTorch module name of a Hugging Face-style Flax module path.

    >>> hf_module_name("bert/encoder/layer/0/attention/self/query")
    'bert.encoder.layer.0.attention.self.query'
    """
    return path.replace("/", ".")


def to_torch(module_names: ModuleNames, path: str) -> str | None:
    """``module_names`` applied to ``path``: ``None`` where the module has no PyTorch name.

    Raises:
      ValueError: for a result that is not a non-empty dotted name.
    """
    if module_names is None:
        name = hf_module_name(path)
    elif isinstance(module_names, Mapping):
        name = module_names.get(path)
    elif callable(module_names):
        name = module_names(path)
    else:
        raise ValueError(
            "module_names must be None (Hugging Face names: '/' becomes '.'), a function from "
            f"Flax module path to PyTorch module name, or a mapping of them; got {module_names!r}."
        )
    if name is None:
        return None
    if not isinstance(name, str) or not name or any(not part for part in name.split(".")):
        raise ValueError(
            f"module_names gave {name!r} for Flax module {path!r}; a PyTorch module name is a "
            "non-empty str of '.'-separated names such as 'encoder.layer.0.attention.self.query'."
        )
    return name


def module_paths(tree: Any) -> list[str]:
    """The paths of the modules that hold parameters directly, in a nested mapping of them
    (a Linen ``params`` dict or an NNX ``State``).

    >>> module_paths({"encoder": {"dense": {"kernel": 1, "bias": 2}}, "head": {"kernel": 3}})
    ['encoder/dense', 'head']
    """
    out: list[str] = []

    def walk(node: Mapping, prefix: tuple[str, ...]) -> None:
        if any(not isinstance(v, Mapping) for v in node.values()) and prefix:
            out.append("/".join(prefix))
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(value, (*prefix, str(key)))

    if isinstance(tree, Mapping):
        walk(tree, ())
    return out


def torch_names(module_names: ModuleNames, paths: Iterable[str]) -> dict[str, str]:
    """``{PyTorch name: Flax path}`` of ``paths``.

    Raises:
      ValueError: when two paths get the same name.
    """
    out: dict[str, str] = {}
    for path in paths:
        name = to_torch(module_names, path)
        if name is None:
            continue
        if name in out and out[name] != path:
            raise ValueError(
                f"module_names maps both {out[name]!r} and {path!r} to PyTorch module {name!r}; "
                "each module needs its own name."
            )
        out[name] = path
    return out


def peft_matches(entry: str, name: str, *, suffix_at_dot: bool = True) -> bool:
    """Whether a list entry of PEFT's ``target_modules`` (``suffix_at_dot``) or of IA3's
    ``feedforward_modules`` (a plain suffix) selects module ``name``, as PEFT matches them.

    >>> peft_matches("output.dense", "encoder.layer.0.attention.output.dense")
    True
    >>> peft_matches("query", "my_query"), peft_matches("query", "my_query", suffix_at_dot=False)
    (False, True)
    """
    if name == entry:
        return True
    return name.endswith(f".{entry}" if suffix_at_dot else entry)


def linear_layout_problem(layout: KernelLayout) -> str | None:
    """Why no PyTorch ``Linear`` computes what a host of this layout does, or ``None``.

    A LoRA flattens the kernel's input axes into ``in`` and its output axes into ``out``, in
    the kernel's axis order. A PyTorch ``Linear`` whose input is the host's input axes
    flattened (and whose output is unflattened into the host's output axes) in their own order
    is the same map only when the two orders agree.
    """
    if layout.einsum_str is None:
        axes = layout.x_axes
        if len(axes) > 1:
            if len({a < 0 for a in axes}) > 1:
                return f"its input axes {axes} mix negative and non-negative indices"
            if list(axes) != sorted(axes):
                return f"it contracts input axes {axes} out of their order in the input"
        return None
    lhs, _, out = layout.einsum_str.partition("->")
    x_subs, k_subs = lhs.split(",")
    shared = [c for c in k_subs if c in x_subs and c in out]
    if shared:
        return f"kernel axes {shared} of einsum {layout.einsum_str!r} are batch axes, not features"
    ins = [c for i, c in enumerate(k_subs) if i in layout.in_dims]
    outs = [c for i, c in enumerate(k_subs) if i not in layout.in_dims]
    if [x_subs.index(c) for c in ins] != sorted(x_subs.index(c) for c in ins):
        return f"einsum {layout.einsum_str!r} contracts the input's axes {ins} in another order"
    if any(c not in out for c in outs):
        return f"einsum {layout.einsum_str!r} sums over kernel axes that are not in its output"
    if [out.index(c) for c in outs] != sorted(out.index(c) for c in outs):
        return f"einsum {layout.einsum_str!r} writes the kernel's output axes {outs} reordered"
    return None
