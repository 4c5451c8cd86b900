"""The :class:`~jadapters.view.AdapterView` of a Linen model: its ``variables``, read and
rebuilt functionally.

Adapter weights live in ``variables["adapters"]`` nested by host path, then adapter name:
``{"blocks_0": {"mlp": {"task": {...}}}}``. A weight is identified by its exact position: the
key ``name`` under the node at path ``host`` holds adapter ``name``'s weights at ``host``
exactly when ``host`` is a target path of that adapter's group; any other key is a module
on the way to deeper hosts. So an adapter may share its name with any module on its hosts'
paths (adapter ``mlp`` at host ``blocks_0/mlp``). The one position that cannot be told apart
(:func:`ambiguous_position`) is refused when the model runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.core
import jax

from jadapters._adapter_set import AdapterSet, AdapterSpec
from jadapters._trees import drop_in, path_keys, set_in, subtree
from jadapters.adapters.base import apply_rule, derive_weight_names, is_box, unbox
from jadapters.kernels import may_hold_transposed_kernels
from jadapters.registry import build_adapter
from jadapters.storage import ADAPTER_COLLECTION
from jadapters.targets import Target, layer_gate, path_str, pattern_matches
from jadapters.view import FROZEN, TRAINABLE, AdapterWeights

# (adapter name, host path) -> whether ``host`` is a target path of that adapter's group
IsSite = Callable[[str, str], bool]


def site_rule(specs: AdapterSet, groups: Sequence[tuple[str, Sequence[Target]]]) -> IsSite:
    """The position rule of ``specs`` under ``groups``: ``is_site(name, host)``.

    >>> from jadapters import LinearAdapterConfig, Target
    >>> spec = AdapterSpec("mlp", "g", LinearAdapterConfig(dim=2), "output")
    >>> is_site = site_rule(AdapterSet((spec,)), [("g", (Target(pattern="b_[0-9]/mlp"),))])
    >>> is_site("mlp", "b_0/mlp"), is_site("mlp", "b_0"), is_site("other", "b_0/mlp")
    (True, False, False)
    """
    rules = dict(groups)
    group_of = {s.name: s.group for s in specs}
    cache: dict[tuple[str, str], bool] = {}

    def is_site(name: str, host: str) -> bool:
        if not host or name not in group_of:  # the root is the model, never a host
            return False
        key = (name, host)
        if key not in cache:
            cache[key] = pattern_matches(rules.get(group_of[name], ()), host)
        return cache[key]

    return is_site


def owner_of(keys: Sequence[Any], is_site: IsSite) -> tuple[str, str] | None:
    """``(host path, adapter name)`` owning the leaf at ``keys`` in the ``"adapters"``
    collection, or ``None``: the first position from the root that is a site.

    >>> owner_of(["blocks_0", "mlp", "mlp", "up", "kernel"], lambda n, h: h == "blocks_0/mlp")
    ('blocks_0/mlp', 'mlp')
    """
    keys = [str(getattr(k, "key", k)) for k in keys]
    for i, name in enumerate(keys):
        host = path_str(keys[:i])
        if is_site(name, host):
            return host, name
    return None


def adapter_subtrees(adapters: Any, is_site: IsSite) -> dict[str, dict[str, Any]]:
    """``{adapter name: {host path: params}}`` of the ``"adapters"`` collection.

    >>> tree = {"blocks_0": {"mlp": {"mlp": {"w": 1}, "other": {"w": 2}}}}
    >>> adapter_subtrees(tree, lambda name, host: host == "blocks_0/mlp")
    {'mlp': {'blocks_0/mlp': {'w': 1}}, 'other': {'blocks_0/mlp': {'w': 2}}}
    """
    found: dict[str, dict[str, Any]] = {}

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        host = path_str(prefix)
        for key, value in node.items():
            if is_site(str(key), host):
                found.setdefault(str(key), {})[host] = value
            elif isinstance(value, Mapping):
                walk(value, (*prefix, str(key)))

    walk(adapters, ())
    return found


def ambiguous_position(
    host: str, specs: AdapterSet, groups: Sequence[tuple[str, Sequence[Target]]]
) -> str | None:
    """Why the weights stored at ``host`` could be mistaken for another adapter's, or ``None``.

    They could when a module on ``host``'s path (``prefix/name``, the host itself included)
    is called like an adapter ``name`` whose group targets ``prefix``: then the key ``name``
    under ``prefix`` would hold both that adapter's weights and the module's subtree.

    >>> from jadapters import LinearAdapterConfig, Target
    >>> spec = AdapterSpec("mlp", "g", LinearAdapterConfig(dim=2), "output")
    >>> ambiguous_position("b_0/mlp", AdapterSet((spec,)), [("g", (Target(pattern=".*"),))])
    "adapter name 'mlp' equals module 'b_0/mlp' on host path 'b_0/mlp', ..."
    >>> ambiguous_position("b_0/mlp", AdapterSet((spec,)), [("g", (Target(pattern="b_0/mlp"),))])
    """
    is_site = site_rule(specs, groups)
    keys = path_keys(host)
    for i, name in enumerate(keys):
        prefix = path_str(keys[:i])
        if is_site(name, prefix):
            spec = specs.get(name)
            patterns = [r.pattern for r in dict(groups)[spec.group]]
            return (
                f"adapter name {name!r} equals module {path_str(keys[: i + 1])!r} on host path "
                f"{host!r}, and {prefix!r} is a target path of its group {spec.group!r} "
                f"(patterns {patterns}), so the adapter's weights at {prefix!r} could not be "
                "told apart from that module's. Rename the adapter, or narrow the group's "
                "patterns so they do not match that path."
            )
    return None


def _plain(tree: Any) -> Any:
    return flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else tree


def _rebox(old: Any, new: Any) -> Any:
    """``new`` in the axis metadata boxes of ``old`` (``nn.Partitioned``, ...) where ``old``
    has them in the same structure; ``new`` as it is otherwise."""
    if old is None or not any(is_box(x) for x in jax.tree.leaves(old, is_leaf=is_box)):
        return new
    old_leaves, treedef = jax.tree.flatten(old, is_leaf=is_box)
    new_leaves, new_def = jax.tree.flatten(new)
    if len(old_leaves) != len(new_leaves) or treedef != new_def:
        return new
    pairs = zip(old_leaves, new_leaves, strict=True)
    boxed = [o.replace_boxed(n) if is_box(o) else n for o, n in pairs]
    return jax.tree.unflatten(treedef, boxed)


def _keys(host: str, name: str) -> list[str]:
    return [*path_keys(host), name]


class LinenView:
    """The view of an :class:`~jadapters.AdaptedLinen` and its ``variables``."""

    framework = "linen"

    def __init__(self, model: Any, variables: Any):
        if variables is None:
            raise ValueError(
                "variables is required for a Linen model: pass the AdaptedLinen's variables "
                "(at least {'params': ..., 'adapters': ...}), got None."
            )
        if not isinstance(variables, Mapping) or "params" not in variables:
            got = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
            raise ValueError(
                "variables must be the Linen model's variables with a 'params' collection (the "
                f"base) and an 'adapters' collection, got {got}."
            )
        self.model = model
        self.variables = variables

    def specs(self) -> AdapterSet:
        return self.model.adapters

    def groups(self) -> list[str]:
        return self.model.adapter_module_names

    def _in_group(self, group: str, path: str) -> bool:
        return pattern_matches(dict(self.model.groups).get(group, ()), path)

    def in_group(self, group: str, path: str) -> bool:
        return self._in_group(group, path)

    def _is_site(self) -> IsSite:
        return site_rule(self.specs(), self.model.groups)

    def _found(self, adapters: Any, specs: Sequence[AdapterSpec]) -> dict[str, dict[str, Any]]:
        found = adapter_subtrees(adapters, self._is_site())
        return {
            spec.name: {
                host: unbox(_plain(value))
                for host, value in found.get(spec.name, {}).items()
                if isinstance(value, Mapping)
            }
            for spec in specs
        }

    def weights(self, specs: Sequence[AdapterSpec]) -> list[AdapterWeights]:
        found = self._found(self.variables.get(ADAPTER_COLLECTION, {}), specs)
        out = []
        for spec in specs:
            if not found[spec.name]:
                raise ValueError(
                    f"adapter {spec.name!r} has no weights in variables['adapters']: initialize "
                    "them with model.init(...) or model.init_adapters(rng, variables, *inputs)."
                )
            out.append(AdapterWeights(spec, found[spec.name]))
        return out

    def layer_flags(self, path: str, spec: AdapterSpec, size: int) -> tuple[bool, ...] | None:
        rules = dict(self.model.groups).get(spec.group, ())
        return layer_gate(rules, path, size)

    def host_base(self, path: str) -> Any:
        return unbox(_plain(subtree(self.variables["params"], path))) or {}

    def base_params(self) -> Any:
        return self.variables["params"]

    def kernel_layouts(self, inputs: Sequence[Any] | None) -> dict[str, Any]:
        """``{host path: KernelLayout}`` read from the real hosts in one abstract run on
        ``inputs``; empty without inputs (shapes then tell the layout).

        Raises:
          ValueError: without inputs, for a model that holds Hugging Face's Flax GPT-2: its
            ``FlaxConv1D`` kernels are stored ``(out, in)``, which shapes cannot tell from a
            square Dense kernel's ``(in, out)``.
        """
        if inputs is not None:
            return self.model.kernel_layouts(self.variables, *inputs)
        if may_hold_transposed_kernels(self.model.model):
            raise ValueError(
                f"{type(self.model.model).__name__} holds Hugging Face's Flax GPT-2, whose "
                "FlaxConv1D kernels are stored (out_features, in_features): from shapes alone "
                "a square one cannot be told from a Dense kernel's (in_features, "
                "out_features). Pass inputs=(example inputs,) so that the hosts themselves "
                "are read."
            )
        return {}

    def replace_base(self, hosts: Mapping[str, Mapping[str, Any]]) -> dict:
        params = _plain(dict(self.variables["params"]))
        for path, new in hosts.items():
            old = subtree(params, path)
            new = {k: _rebox(old.get(k), v) for k, v in new.items()}
            params = set_in(params, path_keys(path), {**old, **new})
        return params

    def labels(self) -> dict:
        enabled, is_site = set(self.specs().enabled_names()), self._is_site()

        def label(path: Any, _: Any) -> str:
            owner = owner_of(path, is_site)
            return TRAINABLE if owner is not None and owner[1] in enabled else FROZEN

        def label_collection(name: str, tree: Any) -> Any:
            if name != ADAPTER_COLLECTION:
                return jax.tree.map(lambda _: FROZEN, tree)
            return jax.tree_util.tree_map_with_path(label, tree)

        return {name: label_collection(name, tree) for name, tree in self.variables.items()}

    def check_hosts(self, spec: AdapterSpec, paths: Sequence[str]) -> None:
        specs = AdapterSet((*(s for s in self.specs() if s.name != spec.name), spec))
        for path in paths:
            if not self._in_group(spec.group, path):
                patterns = [r.pattern for r in dict(self.model.groups).get(spec.group, ())]
                raise ValueError(
                    f"host {path!r} of adapter {spec.name!r} is not a target of adapter module "
                    f"{spec.group!r} in this model (patterns {patterns})."
                )
            clash = ambiguous_position(path, specs, self.model.groups)
            if clash is not None:
                raise ValueError(f"cannot load adapter {spec.name!r} at host {path!r}: {clash}")
        unsaved = self._unsaved_hosts(spec.group, paths)
        if unsaved:
            raise ValueError(
                f"adapter {spec.name!r} was saved at hosts {list(paths)}, but adapter module "
                f"{spec.group!r} of this model also targets {unsaved}, which hold base "
                "parameters and would have no weights of it (trained and fresh adapter weights "
                "mixed). Load it into a model whose targets match the saved hosts."
            )

    def _unsaved_hosts(self, group: str, paths: Sequence[str]) -> list[str]:
        """Module paths of ``params`` that ``group`` targets but ``paths`` lack. Only rules
        without ``module_types`` count: a path alone cannot tell a module's type."""
        rules = [r for r in dict(self.model.groups).get(group, ()) if not r.module_types]
        saved, out = set(paths), []

        def walk(node: Mapping, prefix: tuple[str, ...]) -> None:
            for key, value in node.items():
                if isinstance(value, Mapping):
                    path = path_str((*prefix, str(key)))
                    if path not in saved and pattern_matches(rules, path):
                        out.append(path)
                    walk(value, (*prefix, str(key)))

        walk(_plain(self.variables["params"]), ())
        return out

    def _boxed(self, model: Any, spec: AdapterSpec, host: str, params: Any) -> Any:
        """Loaded ``params`` of an adapter new to these variables, boxed as ``init`` would box
        them: with axis names derived from the host's kernel when it is boxed with names (a
        Dense-like ``[in, out]`` kernel); as they are otherwise."""
        kernel = subtree(_plain(self.variables).get("params", {}), f"{host}/kernel")
        names = getattr(kernel, "names", None)
        if not is_box(kernel) or names is None or len(names) != 2:
            return params
        adapter = build_adapter(spec.cfg)
        derived = derive_weight_names(adapter, params, names, (0,), spec.insertion)
        derived = apply_rule(getattr(model, "sharding", None), host, spec.name, params, derived)
        return jax.tree.map(lambda v, n: kernel.replace(value=v, names=n), params, derived)

    def insert(self, loaded: Sequence[AdapterWeights], *, rngs: Any = None) -> tuple[Any, dict]:
        """``(new_model, new_variables)`` with the loaded adapters; the inputs are unchanged."""
        del rngs
        model = self.model
        variables = _plain(self.variables)
        adapters = _plain(variables.get(ADAPTER_COLLECTION, {}))
        for item in loaded:
            spec = item.spec
            existing = model.adapters.get(spec.name)
            boxes: dict[str, Any] = {}
            if existing is not None:
                boxes = {h: subtree(adapters, f"{h}/{spec.name}") for h in item.hosts}
                for host in self._found(adapters, [existing])[existing.name]:
                    adapters = drop_in(adapters, _keys(host, existing.name))
                # Validate through the public API, then keep the old chain position.
                trial = model.remove_adapter(existing.name).add_adapter(
                    spec.qualified_name, spec.cfg, insertion=spec.insertion
                )
                new_spec = trial.adapters.get(spec.name)
                specs = tuple(new_spec if s.name == spec.name else s for s in model.adapters)
                model = model.clone(adapters=AdapterSet(specs))
            else:
                model = model.add_adapter(spec.qualified_name, spec.cfg, insertion=spec.insertion)
            model = model.set_enabled_adapters(spec.name, spec.enabled)
            for host, params in item.hosts.items():
                old = boxes.get(host)
                params = (
                    _rebox(old, params)
                    if old is not None
                    else self._boxed(model, spec, host, params)
                )
                adapters = set_in(adapters, _keys(host, spec.name), params)
        return model, {**variables, ADAPTER_COLLECTION: adapters}
