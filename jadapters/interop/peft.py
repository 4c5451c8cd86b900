"""Hugging Face PEFT's adapter format: jadapters' LoRA and IA3 out to it and back in.

A PEFT adapter is a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
Its tensors are named ``base_model.model.<PyTorch module name>.<parameter>``:

* LoRA: ``lora_A.weight`` of shape ``[r, in]`` and ``lora_B.weight`` of shape ``[out, r]``,
  the transposes of jadapters' ``A [in, r]`` and ``B [r, out]``; the update is
  ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``) times ``B A``.
* IA3: ``ia3_l`` of shape ``(out, 1)`` scales a module's output (jadapters' IA3 at
  ``insertion="output"``) and of shape ``(1, in)`` its input, on the modules listed in
  ``feedforward_modules`` (IA3 at ``insertion="input"``).
* A whole trained module (PEFT's ``modules_to_save``, such as a classification head):
  ``weight [out, in]`` and ``bias``.

Everything here goes through :func:`jadapters.view.view_of`, so Linen and NNX models are
handled by the same code. PEFT only warns about keys it cannot place, so a file with wrong
names loads there as a silent no-op; this module refuses such a file on import and checks on
export that every name it writes selects exactly the module meant.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jadapters._adapter_set import AdapterSpec, split_qualified_name
from jadapters._walks import shared
from jadapters.adapters.ia3 import IA3Config
from jadapters.adapters.lora import LoRAConfig
from jadapters.interop import files
from jadapters.interop import paths as _paths
from jadapters.interop.paths import ModuleNames
from jadapters.kernels import KernelLayout
from jadapters.registry import build_adapter
from jadapters.strategies import linear_factor
from jadapters.targets import closest_paths
from jadapters.view import AdapterView, AdapterWeights, requested_names, view_of

PREFIX = "base_model.model."
LORA_A, LORA_B, IA3_L = "lora_A.weight", "lora_B.weight", "ia3_l"
TASK_TYPES = (
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "CAUSAL_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)
# Task types for which PEFT wraps the model's head as a trained module and loads it from the file.
HEAD_TASK_TYPES = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")
DEFAULT_MAX_BYTES = 1 << 33
# PEFT config entries that change what the weights mean, and the values that leave it alone.
_NEUTRAL = {
    "LORA": {
        "bias": ("none",),
        "use_dora": (False, None),
        "lora_bias": (False, None),
        "rank_pattern": ({}, None),
        "alpha_pattern": ({}, None),
        "target_parameters": (None, []),
        "trainable_token_indices": (None, [], {}),
        "layer_replication": (None, []),
        "use_qalora": (False, None),
        "alora_invocation_tokens": (None, []),
        "use_bdlora": (None, False),
    },
    "IA3": {},
}


# ---- shared -----------------------------------------------------------------------------------


def _kind(spec: AdapterSpec) -> str:
    """``"LORA"`` or ``"IA3"``: the PEFT type that expresses ``spec``.

    Raises:
      ValueError: for an adapter no PEFT type expresses.
    """
    cfg, kind = spec.cfg, type(spec.cfg).__name__.removesuffix("Config")
    if isinstance(cfg, LoRAConfig) and spec.insertion == "weight":
        return "LORA"
    if isinstance(cfg, IA3Config) and spec.insertion in ("output", "input"):
        return "IA3"
    if isinstance(cfg, (LoRAConfig, IA3Config)):
        raise ValueError(
            f"adapter {spec.name!r} ({kind} at insertion {spec.insertion!r}) has no PEFT "
            "form: PEFT's LoRA changes a layer's weight (insertion 'weight') and its IA3 scales "
            "a layer's output or input (insertion 'output' or 'input')."
        )
    raise ValueError(
        f"adapter {spec.name!r} ({kind}) has no PEFT type: PEFT's format covers LoRA and IA3 "
        "here, and bottleneck adapters (LinearAdapter, ParallelAdapter) have none. Share it "
        "with jadapters.save_adapters for JAX users, or train a LoRA or IA3 for PyTorch users."
    )


def _param_name(spec: AdapterSpec, axes: tuple[str, ...]) -> str:
    """The name of the parameter of ``spec``'s type whose axes are ``axes`` (its schema)."""
    schema = build_adapter(spec.cfg).weight_axes
    for name, found in schema.items():
        if tuple(found) == axes:
            return name
    raise ValueError(f"adapter {spec.name!r} has no parameter with axes {axes}; got {schema}.")


def _get(params: Any, name: str) -> Any:
    for key in name.split("/"):
        params = params[key]
    return params


def _nest(name: str, value: Any) -> dict:
    keys = name.split("/")
    out: Any = value
    for key in reversed(keys):
        out = {key: out}
    return out


def _layout_of(
    where: str, kernel_shape: tuple[int, ...], layouts: Mapping[str, KernelLayout], fix: str
) -> KernelLayout:
    """The host's layout as a PyTorch ``Linear`` would see it, or a ``ValueError``."""
    layout = layouts.get(where)
    if layout is None:
        if len(kernel_shape) != 2:
            raise ValueError(
                f"host {where!r} has a kernel of shape {kernel_shape}: which of its axes meet "
                f"the input is not known here; {fix}."
            )
        layout = KernelLayout(tuple(kernel_shape), (0,), (-1,))
    problem = _paths.linear_layout_problem(layout)
    if problem is not None:
        raise ValueError(
            f"host {where!r} cannot be expressed as a PyTorch Linear layer: {problem}. Target "
            "a host whose kernel axes are in the order of its input and output."
        )
    return layout


def _ia3_width(where: str, kernel_shape: tuple[int, ...], layout, insertion: str) -> int:
    """The width PEFT's ``ia3_l`` has at a host: its output (or, at the input, input) width."""
    layout = layout or KernelLayout(tuple(kernel_shape), (0,), (-1,))  # by shape: (in, out)
    plain = _paths.linear_layout_problem(layout) is None and (
        layout.einsum_str is not None or tuple(layout.x_axes) == (-1,)
    )
    if len(kernel_shape) != 2 or not plain:
        raise ValueError(
            f"host {where!r} (kernel shape {kernel_shape}) cannot be expressed as a PyTorch "
            "Linear layer scaled by IA3: PEFT's ia3_l scales a Linear's whole output or input, "
            "jadapters' IA3 the last axis; target Dense/Linear hosts with 2-D kernels."
        )
    return layout.in_features if insertion == "input" else layout.out_features


def _known_names(view: AdapterView, module_names: ModuleNames) -> dict[str, str]:
    """``{PyTorch name: Flax path}`` of every module of the model that holds parameters."""
    return _paths.torch_names(module_names, _paths.module_paths(view.base_params()))


def _base_subtree(view: AdapterView, path: str) -> Any:
    node = view.base_params()
    for key in path.split("/"):
        if not isinstance(node, Mapping):
            return None
        if key not in node and key.isdigit() and int(key) in node:
            key = int(key)
        if key not in node:
            return None
        node = node[key]
    return node


# ---- export -----------------------------------------------------------------------------------


def _select(view: AdapterView, name: Any) -> list[AdapterSpec]:
    specs = list(view.specs())
    if not specs:
        raise ValueError("the model has no adapters to export; add one with add_adapter first.")
    requested = requested_names(name)
    if requested is None:
        return specs
    chosen = []
    for item in requested:
        group, sep, bare = item.rpartition(":")
        spec = next((s for s in specs if s.name == bare and (not sep or s.group == group)), None)
        if spec is None:
            available = [s.qualified_name for s in specs]
            raise ValueError(
                f"name {item!r} is not an adapter of the model; available: {available}."
            )
        chosen.append(spec)
    return chosen


def _common_lora(specs: Sequence[AdapterSpec]) -> dict[str, Any]:
    """The PEFT LoRA settings the adapters share, or a ``ValueError`` naming the difference."""
    settings = {}
    for spec in specs:
        cfg = spec.cfg
        alpha = cfg.rank if cfg.alpha is None else cfg.alpha
        settings[spec.name] = {
            "r": cfg.rank,
            "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
            "use_rslora": cfg.rslora,
            "lora_dropout": cfg.dropout,
        }
    distinct = {tuple(s.items()) for s in settings.values()}
    if len(distinct) > 1:
        raise ValueError(
            f"adapters {list(settings)} go into one PEFT adapter but differ in {settings}; "
            "export them one at a time (name=...), each to its own directory."
        )
    return next(iter(settings.values()))


def _factor(spec: AdapterSpec) -> float:
    try:
        return linear_factor(spec.cfg.adapter_strategy)
    except ValueError as err:
        raise ValueError(f"adapter {spec.name!r} cannot be exported: its strategy {err}") from None


def _export_weights(view, items, module_names, layouts, kind, fix):
    """``(tensors, {torch name: flax path} of targets, feed-forward names)``."""
    tensors: dict[str, np.ndarray] = {}
    targets: dict[str, str] = {}
    feedforward: list[str] = []
    for item in items:
        spec, factor = item.spec, _factor(item.spec)
        for where, params in item.hosts.items():
            torch = _paths.to_torch(module_names, where)
            if torch is None:
                raise ValueError(
                    f"module_names gave no PyTorch name for host {where!r} of adapter "
                    f"{spec.name!r}; every exported host needs one."
                )
            if torch in targets:
                raise ValueError(
                    f"PyTorch module {torch!r} (host {where!r}) carries more than one of the "
                    "adapters exported together; PEFT holds one per module: export them apart."
                )
            targets[torch] = where
            base = view.host_base(where)
            kernel = base.get("kernel") if isinstance(base, Mapping) else None
            if kernel is None:
                raise ValueError(
                    f"host {where!r} of adapter {spec.name!r} has no kernel; PEFT adapts "
                    "Linear layers: target Dense-like hosts."
                )
            shape = tuple(kernel.shape)
            key = PREFIX + torch
            if kind == "LORA":
                a = np.asarray(_get(params, _param_name(spec, ("in", "rank"))))
                b = np.asarray(_get(params, _param_name(spec, ("rank", "out"))))
                layout = _layout_of(where, shape, layouts, fix)
                if (a.shape[0], b.shape[1]) != (layout.in_features, layout.out_features):
                    raise ValueError(
                        f"adapter {spec.name!r} at host {where!r} has A {a.shape} and B "
                        f"{b.shape}, which do not fit the kernel {shape}."
                    )
                if factor != 1.0:
                    b = (b.astype(np.float32) * factor).astype(b.dtype)
                tensors[f"{key}.{LORA_A}"] = a.T
                tensors[f"{key}.{LORA_B}"] = b.T
            else:
                scale = np.asarray(_get(params, _param_name(spec, ("features",))))
                width = _ia3_width(where, shape, layouts.get(where), spec.insertion)
                if scale.shape != (width,):
                    raise ValueError(
                        f"adapter {spec.name!r} at host {where!r} has a scale of shape "
                        f"{scale.shape}; the host's {spec.insertion} width is {width}."
                    )
                if factor != 1.0:
                    scale = (1.0 + factor * (scale.astype(np.float32) - 1.0)).astype(scale.dtype)
                if spec.insertion == "input":
                    feedforward.append(torch)
                    tensors[f"{key}.{IA3_L}"] = scale.reshape(1, width)
                else:
                    tensors[f"{key}.{IA3_L}"] = scale.reshape(width, 1)
    return tensors, targets, feedforward


def _export_heads(view, heads, module_names, targets) -> tuple[dict[str, np.ndarray], list[str]]:
    tensors: dict[str, np.ndarray] = {}
    names = []
    for where in heads:
        params = _base_subtree(view, where)
        if not isinstance(params, Mapping):
            raise ValueError(
                f"modules_to_save names {where!r}, which is not a module of the model."
            )
        arrays = {str(k): np.asarray(v[...]) for k, v in params.items()}
        if set(arrays) - {"kernel", "bias"} or arrays.get("kernel", np.zeros(0)).ndim != 2:
            shapes = {k: v.shape for k, v in arrays.items()}
            raise ValueError(
                f"modules_to_save names {where!r} with parameters {shapes}; only Dense-like "
                "heads (a 2-D kernel [in, out] and a bias) are written as PyTorch Linear layers."
            )
        torch = _paths.to_torch(module_names, where)
        if torch is None or torch in targets:
            raise ValueError(
                f"modules_to_save module {where!r} needs a PyTorch name of its own, got {torch!r}."
            )
        tensors[f"{PREFIX}{torch}.weight"] = arrays["kernel"].T
        if "bias" in arrays:
            tensors[f"{PREFIX}{torch}.bias"] = arrays["bias"]
        names.append(torch)
    return tensors, names


def _check_selects_exactly(known: Mapping[str, str], targets, feedforward, heads) -> None:
    """Raises unless PEFT's name matching picks exactly the modules meant among the model's."""
    for entry in targets:
        extra = [n for n in known if n != entry and _paths.peft_matches(entry, n)]
        if extra:
            raise ValueError(
                f"target_modules entry {entry!r} would also select modules {extra} in PEFT, "
                "which matches names by suffix; give those modules other names (module_names)."
            )
    for name in targets:
        if name not in feedforward and any(
            _paths.peft_matches(f, name, suffix_at_dot=False) for f in feedforward
        ):
            raise ValueError(
                f"PEFT would treat {name!r} as a feed-forward module (its feedforward_modules "
                f"match plain suffixes: {feedforward}); give the modules other names."
            )
    for entry in heads:
        extra = [n for n in known if n != entry and _paths.peft_matches(entry, n)]
        if extra:
            raise ValueError(
                f"modules_to_save entry {entry!r} would also select modules {extra} in PEFT."
            )


@shared
def export_peft(
    path: Any,
    model: Any,
    variables: Any = None,
    *,
    name: str | Sequence[str] | None = None,
    module_names: ModuleNames = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    modules_to_save: Sequence[str] = (),
    inputs: Sequence[Any] | None = None,
) -> str:
    """Writes LoRA or IA3 adapters as a Hugging Face PEFT adapter directory.

    The directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (metadata
    ``{"format": "pt"}``), which ``peft.PeftModel.from_pretrained(torch_model, path)`` loads
    and serving stacks that read PEFT adapters take. ``target_modules`` lists full PyTorch
    module names, so that PEFT's suffix matching selects exactly the modules adapted.

    Args:
      path: the directory to write (created if needed; the two files are replaced).
      model: an adapted Linen model (give its ``variables``) or an adapted NNX model.
      variables: the Linen model's variables (at least ``{"params": ..., "adapters": ...}``).
      name: the adapter (``"name"`` or ``"group:name"``) or adapters to write as one PEFT
        adapter; ``None`` for every adapter of the model. Several LoRAs need the same rank,
        alpha, rsLoRA and dropout and distinct hosts; IA3 adapters at ``insertion="output"``
        and ``"input"`` together make one PEFT IA3 (the latter its ``feedforward_modules``).
      module_names: PyTorch module name of each Flax host path: ``None`` for Hugging
        Face-style models (``bert/encoder/layer/0/attention/self/query`` becomes
        ``bert.encoder.layer.0.attention.self.query``), a function of the path (return
        ``None`` for a module with no PyTorch counterpart) or a mapping.
      base_model_name_or_path: the base model's name or path, written for PyTorch users.
      task_type: PEFT's task type (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...), or ``None``.
        ``"SEQ_CLS"``, ``"TOKEN_CLS"`` and ``"QUESTION_ANS"`` make PEFT load the head from the
        file, so they need ``modules_to_save``.
      modules_to_save: Flax paths of Dense-like base modules trained with the adapter (a
        classification head), written whole as PEFT's ``modules_to_save``.
      inputs: Linen only: example positional inputs, needed when a LoRA host's kernel has more
        than two axes (``DenseGeneral``, ``Einsum``), so that the host is read in an abstract
        run. Such kernels are flattened to the PyTorch ``Linear`` layout; one whose axes are
        out of the order of its input or output cannot be, and is refused.

    Returns:
      The directory written.

    Raises:
      ValueError: for an adapter without a PEFT type (bottleneck adapters), adapters that
        cannot share one PEFT adapter, a host that is not a Linear layer in PyTorch's terms,
        names PEFT would match ambiguously, or a head task type without ``modules_to_save``.

    >>> import json, pathlib, tempfile, jax, jax.numpy as jnp, flax.linen as nn, jadapters
    >>> model = jadapters.adapter_transform(nn.Sequential([nn.Dense(4)]), "layers_0")
    >>> model = model.add_adapter("lora", jadapters.LoRAConfig(rank=2))
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> path = pathlib.Path(export_peft(tempfile.mkdtemp(), model, variables))
    >>> config = json.loads((path / "adapter_config.json").read_text())
    >>> config["peft_type"], config["r"], config["lora_alpha"], config["target_modules"]
    ('LORA', 2, 2, ['layers_0'])
    """
    view = view_of(model, variables)
    specs = _select(view, name)
    kinds = {s.name: _kind(s) for s in specs}
    if len(set(kinds.values())) > 1:
        raise ValueError(
            f"adapters {kinds} mix PEFT types; one PEFT adapter has one type: export them "
            "apart (name=...)."
        )
    kind = next(iter(kinds.values()))
    if task_type is not None and task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be None or one of {list(TASK_TYPES)}, got {task_type!r}.")
    heads = [modules_to_save] if isinstance(modules_to_save, str) else list(modules_to_save)
    if task_type in HEAD_TASK_TYPES and not heads:
        raise ValueError(
            f"task_type {task_type!r} makes PEFT load the model's head from the file as a "
            "trained module: pass modules_to_save=[<Flax path of the head>] if the head was "
            "trained with the adapter, or leave task_type=None (PyTorch users keep their head)."
        )
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise ValueError(
            f"base_model_name_or_path must be a str or None, got {base_model_name_or_path!r}."
        )
    fix = "pass inputs=(example inputs,) so that the host is read (Linen)"
    layouts = view.kernel_layouts(inputs)
    items = view.weights(specs)
    tensors, targets, feedforward = _export_weights(view, items, module_names, layouts, kind, fix)
    head_tensors, head_names = _export_heads(view, heads, module_names, targets)
    tensors.update(head_tensors)
    known = _known_names(view, module_names)
    _check_selects_exactly(known, targets, feedforward, head_names)
    config: dict[str, Any] = {
        "peft_type": kind,
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "target_modules": sorted(targets),
        # PyTorch's GPT-2 keeps these projections in Conv1D modules, stored (in, out).
        "fan_in_fan_out": bool(targets)
        and all(getattr(layouts.get(w), "out_first", False) for w in targets.values()),
        "modules_to_save": head_names or None,
    }
    if kind == "LORA":
        config.update(_common_lora(specs), bias="none")
    else:
        config.update(feedforward_modules=sorted(feedforward), init_ia3_weights=True)
    return files.write(path, config, tensors)


# ---- import -----------------------------------------------------------------------------------


@dataclasses.dataclass
class _Module:
    """One adapted PyTorch module of the file."""

    torch: str
    keys: dict[str, str]  # "A"/"B" (LoRA) or "l" (IA3) -> tensor name
    path: str = ""  # its Flax host path
    insertion: str = "weight"


def _read_settings(config: Mapping[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """``(peft_type, LoRAConfig/IA3Config fields)`` from ``adapter_config.json``."""
    kind = config.get("peft_type")
    if kind not in ("LORA", "IA3"):
        raise ValueError(
            f"{where}: peft_type is {kind!r}; jadapters imports PEFT adapters of type 'LORA' "
            "and 'IA3'."
        )
    for key, neutral in _NEUTRAL[kind].items():
        value = config.get(key, neutral[0])
        if value not in neutral:
            raise ValueError(
                f"{where}: {key}={value!r} changes what the weights mean and has no jadapters "
                f"counterpart; it must be one of {list(neutral)}."
            )
    targets = config.get("target_modules")
    if isinstance(targets, str):
        raise ValueError(
            f"{where}: target_modules is a regular expression ({targets!r}), which cannot be "
            "checked against the file's weights here; replace it with the list of module names "
            "the weights are for (the keys of adapter_model.safetensors name them)."
        )
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(
            f"{where}: target_modules must be a list of module names, got {targets!r}."
        )
    if kind == "IA3":
        return kind, {}
    # PEFT's own defaults for entries that are absent.
    fields = {
        "rank": config.get("r", 8),
        "alpha": config.get("lora_alpha", 8),
        "rslora": config.get("use_rslora", False),
        "dropout": config.get("lora_dropout", 0.0),
    }
    try:
        LoRAConfig(**fields)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return kind, fields


def _parse_keys(tensor_file: files.TensorFile, config, kind):
    """``({torch module: _Module}, [head keys])`` of the file's tensor names."""
    where = str(tensor_file.file)
    heads = config.get("modules_to_save") or []
    if not isinstance(heads, list) or not all(isinstance(h, str) for h in heads):
        raise ValueError(f"modules_to_save must be a list of names or null, got {heads!r}.")
    roles = {LORA_A: "A", LORA_B: "B"} if kind == "LORA" else {IA3_L: "l"}
    modules: dict[str, _Module] = {}
    head_keys = []
    for key in tensor_file.keys:
        if not key.startswith(PREFIX):
            raise ValueError(
                f"{where}: tensor {key!r} does not start with {PREFIX!r}, as every PEFT "
                "adapter tensor does."
            )
        body = key[len(PREFIX) :]
        suffix = next((s for s in roles if body.endswith("." + s)), None)
        if suffix is not None:
            torch = body[: -len(suffix) - 1]
            module = modules.setdefault(torch, _Module(torch, {}))
            module.keys[roles[suffix]] = key
            continue
        if any(re.search(rf"(^|\.){re.escape(h)}\.", body) for h in heads):
            head_keys.append(key)
            continue
        expected = ", ".join(f"<module>.{s}" for s in roles)
        raise ValueError(
            f"{where}: tensor {key!r} is not a {kind} weight ({expected}) nor one of "
            f"modules_to_save {heads}."
        )
    for module in modules.values():
        missing = sorted(set(roles.values()) - set(module.keys))
        if missing:
            names = {v: k for k, v in roles.items()}
            raise ValueError(
                f"{where}: module {module.torch!r} has no {[names[m] for m in missing]} "
                "(a missing key)."
            )
    return modules, head_keys


def _check_targets(config, modules: Mapping[str, _Module], known, where: str) -> None:
    """Every module with weights is a target, and every module of the model that PEFT would
    target has weights (unless PEFT's config narrows the targets further)."""
    targets = config["target_modules"]
    selected = lambda name: any(_paths.peft_matches(t, name) for t in targets)
    loose = [m for m in modules if not selected(m)]
    if loose:
        raise ValueError(
            f"{where}: the weights of modules {loose} are not selected by target_modules "
            f"{targets}; the file is inconsistent."
        )
    narrowed = any(config.get(k) for k in ("layers_to_transform", "layers_pattern"))
    if narrowed or config.get("exclude_modules"):
        return
    heads = config.get("modules_to_save") or []
    missing = [
        name
        for name in known
        if selected(name)
        and name not in modules
        and not any(_paths.peft_matches(h, name) or name.startswith(f"{h}.") for h in heads)
    ]
    if missing:
        raise ValueError(
            f"{where}: modules {missing} of the model are selected by target_modules "
            f"{targets} but have no weights in adapter_model.safetensors (missing keys)."
        )


def _ia3_insertions(tensor_file, modules: Mapping[str, _Module], config, where: str) -> None:
    ff = config.get("feedforward_modules") or []
    if isinstance(ff, str):
        try:
            pattern = re.compile(ff)
        except re.error as err:
            raise ValueError(
                f"{where}: feedforward_modules {ff!r} is not a valid regex: {err}."
            ) from None
        is_ff = lambda name: pattern.fullmatch(name) is not None
    elif isinstance(ff, list) and all(isinstance(f, str) for f in ff):
        is_ff = lambda name: any(_paths.peft_matches(f, name, suffix_at_dot=False) for f in ff)
    else:
        raise ValueError(f"{where}: feedforward_modules must be a list or null, got {ff!r}.")
    for module in modules.values():
        shape = tensor_file.shape(module.keys["l"])
        feedforward = is_ff(module.torch)
        if len(shape) != 2 or (1 not in shape) or (shape[0] != 1 and feedforward):
            kind = "(1, in) for a feed-forward module" if feedforward else "(out, 1)"
            raise ValueError(
                f"{where}: {module.keys['l']!r} has shape {shape}; PEFT's ia3_l is {kind}."
            )
        if shape[1] != 1 and not feedforward:
            raise ValueError(
                f"{where}: {module.keys['l']!r} has shape {shape}, the shape of a feed-forward "
                f"module's scale, but {module.torch!r} is not in feedforward_modules {ff!r}."
            )
        module.insertion = "input" if feedforward else "output"


def _resolve_names(view, name, insertions: set[str]) -> dict[str, tuple[str, str]]:
    """``{insertion: (group, bare name)}`` from ``name``."""
    if isinstance(name, str):
        if len(insertions) > 1:
            raise ValueError(
                "the PEFT IA3 adapter scales module outputs and (feedforward_modules) inputs, "
                "which are two jadapters adapters in two adapter modules: pass "
                "name={'output': 'group:name', 'input': 'group2:name2'}."
            )
        name = {insertion: name for insertion in insertions}
    if not isinstance(name, Mapping) or not all(isinstance(v, str) for v in name.values()):
        raise ValueError(f"name must be an adapter name or a mapping of them, got {name!r}.")
    missing = sorted(insertions - set(name))
    extra = sorted(set(name) - insertions)
    if missing or extra:
        raise ValueError(
            f"name maps insertions {sorted(name)}, but the file needs {sorted(insertions)}."
        )
    out = {}
    for insertion, qualified in name.items():
        out[insertion] = split_qualified_name(qualified, view.groups())
    if len({bare for _, bare in out.values()}) < len(out):
        raise ValueError(f"name gives one adapter name to several adapters: {dict(name)}.")
    return out


def _place(modules, known: Mapping[str, str], where: str) -> None:
    """Sets each module's Flax path; raises for a name that is no module of the model."""
    unknown = [m for m in modules if m not in known]
    if unknown:
        shown = {m: closest_paths(m, known, limit=3) for m in unknown[:5]}
        raise ValueError(
            f"{where}: modules {unknown} do not exist in the model (module_names maps its "
            f"modules to other PyTorch names; closest: {shown}). Pass module_names for a "
            "model whose names differ from PyTorch's."
        )
    for module in modules.values():
        module.path = known[module.torch]


def _expected_shape(view, module: _Module, rank: int | None, layouts) -> dict[str, tuple]:
    base = view.host_base(module.path)
    kernel = base.get("kernel") if isinstance(base, Mapping) else None
    if kernel is None:
        raise ValueError(
            f"host {module.path!r} (PyTorch {module.torch!r}) has no kernel; PEFT adapts Linear "
            "layers, which are Dense-like hosts here."
        )
    shape = tuple(kernel.shape)
    if module.insertion == "weight":
        fix = "import onto a host with a 2-D kernel, or into an NNX model, whose hosts are read"
        layout = _layout_of(module.path, shape, layouts, fix)
        return {"A": (rank, layout.in_features), "B": (layout.out_features, rank)}
    width = _ia3_width(module.path, shape, layouts.get(module.path), module.insertion)
    return {"l": (1, width) if module.insertion == "input" else (width, 1)}


def _param_dtype(tensor_file, modules) -> str:
    dtypes = {tensor_file.dtype(k) for m in modules for k in m.keys.values()}
    if len(dtypes) == 1 and next(iter(dtypes)) in ("F32", "BF16", "F16"):
        return files.DTYPES[next(iter(dtypes))]
    return "float32"


@shared
def import_peft(
    path: Any,
    model: Any,
    variables: Any = None,
    *,
    name: str | Mapping[str, str] = "peft",
    module_names: ModuleNames = None,
    skip_unadapted: bool = False,
    replace: bool = False,
    rngs: Any = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    inputs: Sequence[Any] | None = None,
) -> Any:
    """Loads a Hugging Face PEFT LoRA or IA3 adapter directory into an adapted model.

    The adapter becomes a jadapters :class:`~jadapters.LoRA` (``insertion="weight"``) or
    :class:`~jadapters.IA3` (``"output"``; ``"input"`` on PEFT's ``feedforward_modules``) in
    the adapter module (group) ``name`` names, with PEFT's rank, alpha, rsLoRA and dropout.
    Everything is read and checked before the model changes: every tensor must land on a
    host of that group, every host must get its weights, and every shape must match.
    PEFT itself only warns about names it cannot place; here each is an error.

    The files are untrusted input: ``adapter_config.json`` is read as plain JSON (at most
    1 MiB), ``adapter_model.safetensors`` through the ``safetensors`` package after its size
    is checked against ``max_bytes``, and each tensor's claimed shape and dtype are checked
    against the model before it is read. ``adapter_model.bin`` (a pickle) is refused.

    Args:
      path: the PEFT adapter directory.
      model: an adapted Linen model (give its ``variables``) or an adapted NNX model, whose
        targets (adapter module) cover the modules the PEFT adapter adapts.
      variables: the Linen model's variables (at least ``{"params": ...}``); ``None`` for NNX.
      name: the new adapter, ``"name"`` or ``"group:name"``. A PEFT IA3 adapter with both
        kinds of module makes two adapters, in two groups:
        ``{"output": "attn:ia3", "input": "ffn:ia3_ff"}``.
      module_names: as in :func:`export_peft`, from Flax path to PyTorch name.
      skip_unadapted: skip tensors of modules that are not hosts of the adapter's group (and
        of PEFT's ``modules_to_save``, whole trained modules such as a classification head,
        which jadapters does not load into the base) instead of refusing the file.
      replace: overwrite an adapter of the same name; else that is an error.
      rngs: NNX only: streams for the adapters' dropout; default ``nnx.Rngs(0)``.
      max_bytes: the largest ``adapter_model.safetensors`` read (default 8 GiB).
      inputs: Linen only: example inputs (a tuple of arguments), so that the hosts are read
        (needed for kernels that are not 2-D, and for Hugging Face's Flax GPT-2, whose
        ``FlaxConv1D`` kernels are stored ``(out, in)``); else the kernels' shapes are read.

    Returns:
      Linen: ``(new_model, new_variables)``; the inputs are unchanged. NNX: ``model``,
      changed in place.

    Raises:
      ValueError: for a missing or malformed directory, a ``peft_type`` other than LORA and
        IA3 or a setting with no jadapters counterpart (DoRA, rank patterns, trained biases),
        a ``target_modules`` regular expression, a tensor for a module that is no host of the
        group (without ``skip_unadapted``) or does not exist, a missing tensor, a host without
        weights (NNX; a Linen model reports it when it runs), or a shape that does not match.

    >>> import tempfile, jax, jax.numpy as jnp, flax.linen as nn, jadapters
    >>> base = nn.Sequential([nn.Dense(4)])
    >>> model = jadapters.adapter_transform(base, "layers_0")
    >>> model = model.add_adapter("lora", jadapters.LoRAConfig(rank=2, alpha=4.0))
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> path = jadapters.export_peft(tempfile.mkdtemp(), model, variables)
    >>> fresh = jadapters.adapter_transform(base, "layers_0")
    >>> fresh, new = import_peft(path, fresh, {"params": variables["params"]}, name="lora")
    >>> fresh.get_adapter_cfg("lora").alpha, sorted(new["adapters"]["layers_0"]["lora"])
    (4.0, ['a', 'b'])
    >>> import_peft("no/such/dir", fresh, new)
    Traceback (most recent call last):
    ...
    ValueError: path 'no/such/dir' is not a directory; pass the local directory that holds ...
    """
    view = view_of(model, variables)
    config = files.read_config(path)
    where = repr(str(path))
    kind, fields = _read_settings(config, repr(str(pathlib.Path(path) / files.CONFIG_NAME)))
    with files.open_tensors(path, max_bytes=max_bytes) as tensor_file:
        modules, head_keys = _parse_keys(tensor_file, config, kind)
        if not modules:
            raise ValueError(f"{where}: adapter_model.safetensors holds no {kind} weights.")
        known = _known_names(view, module_names)
        _place(modules, known, where)
        _check_targets(config, modules, known, where)
        if kind == "IA3":
            _ia3_insertions(tensor_file, modules, config, where)
        names = _resolve_names(view, name, {m.insertion for m in modules.values()})
        dtype = _param_dtype(tensor_file, modules.values())
        cfg = LoRAConfig(**fields, param_dtype=dtype) if kind == "LORA" else None
        specs = {}
        for insertion, (group, bare) in names.items():
            adapter_cfg = cfg if cfg is not None else IA3Config(param_dtype=dtype)
            specs[insertion] = AdapterSpec(bare, group, adapter_cfg, insertion)
        unadapted = [
            m.torch for m in modules.values() if not view.in_group(specs[m.insertion].group, m.path)
        ]
        if (unadapted or head_keys) and not skip_unadapted:
            found = []
            if unadapted:
                found.append(f"modules that are not hosts of the adapter's group: {unadapted}")
            if head_keys:
                trained = sorted({k[len(PREFIX) :].rpartition(".")[0] for k in head_keys})
                found.append(f"whole trained modules (PEFT's modules_to_save): {trained}")
            raise ValueError(
                f"{where}: the file has weights for {'; and for '.join(found)}. Adapt those "
                "modules too (adapter_transform's targets; jadapters does not load trained base "
                "modules), or pass skip_unadapted=True to leave them out."
            )
        kept = {t: m for t, m in modules.items() if t not in unadapted}
        if not kept:
            raise ValueError(f"{where}: no module of the file is a host of the adapter's group.")
        specs = {i: s for i, s in specs.items() if any(m.insertion == i for m in kept.values())}
        existing = view.specs()
        for spec in specs.values():
            if existing.get(spec.name) is not None and not replace:
                raise ValueError(
                    f"adapter {spec.name!r} already exists in the model; pass replace=True to "
                    "overwrite it or choose another name."
                )
            hosts = [m.path for m in kept.values() if m.insertion == spec.insertion]
            view.check_hosts(spec, hosts)
        layouts = view.kernel_layouts(inputs)
        rank = fields.get("rank")
        expected = {t: _expected_shape(view, m, rank, layouts) for t, m in kept.items()}
        wrong = [
            f"{m.keys[role]}: {tensor_file.shape(m.keys[role])}, expected {shape}"
            for t, m in kept.items()
            for role, shape in expected[t].items()
            if tensor_file.shape(m.keys[role]) != shape
        ]
        if wrong:
            raise ValueError(f"{where}: tensor shapes do not match the model: {wrong}.")
        loaded: dict[str, dict[str, Any]] = {insertion: {} for insertion in specs}
        for t, m in kept.items():
            spec = specs[m.insertion]
            arrays = {role: tensor_file.load(m.keys[role], expected[t][role]) for role in m.keys}
            loaded[m.insertion][m.path] = _to_params(spec, arrays, dtype)
    return view.insert([AdapterWeights(spec, loaded[i]) for i, spec in specs.items()], rngs=rngs)


def _to_params(spec: AdapterSpec, arrays: Mapping[str, np.ndarray], dtype: str) -> dict:
    cast = lambda x: jnp.asarray(np.asarray(x, np.float32)).astype(dtype)
    if "l" in arrays:
        scale = arrays["l"].reshape(-1)
        return _nest(_param_name(spec, ("features",)), cast(scale))
    params = _nest(_param_name(spec, ("in", "rank")), cast(arrays["A"].T))
    params.update(_nest(_param_name(spec, ("rank", "out")), cast(arrays["B"].T)))
    return params
