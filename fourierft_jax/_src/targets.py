"""Which Dense kernels of a linen parameter tree a config adapts: the tree as ``bridge.ModuleInfo``s.

Every dict node becomes a module named by its dotted path. A node holding a 2-D ``kernel`` is a linear layer
(torch shape ``(out, in)`` = the kernel's shape reversed); other nodes get a descriptive kind so that a target
matching them raises ``bridge``'s "cannot adapt" error naming the path.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import bridge

from .layer import LayerSpec
from .tree import Path, dotted, iter_nodes


def _kind(node: Mapping[str, Any]) -> tuple[str, Optional[tuple[int, int]]]:
    kernel = node.get("kernel")
    if kernel is not None and not isinstance(kernel, Mapping):
        shape = tuple(getattr(kernel, "shape", ()))
        if len(shape) == 2:
            return bridge.LINEAR, (int(shape[1]), int(shape[0]))
        return f"{len(shape)}-D kernel {shape} (DenseGeneral/Conv; only 2-D Dense kernels can be adapted)", None
    if "embedding" in node and not isinstance(node["embedding"], Mapping):
        return "Embed", None
    return "module", None


def module_infos(params: Mapping[str, Any]) -> list[tuple[Path, bridge.ModuleInfo]]:
    """Every dict node of ``params`` (the ``params`` collection) as ``(path, bridge.ModuleInfo)``, in tree order.

    Example:
        >>> import numpy as np
        >>> tree = {"encoder": {"query": {"kernel": np.zeros((8, 4)), "bias": np.zeros(4)}}}
        >>> [(info.name, info.kind, info.shape) for _, info in module_infos(tree)][1:]
        [('encoder', 'module', None), ('encoder.query', 'linear', (4, 8))]
    """
    infos = []
    for path, node in iter_nodes(params):
        kind, shape = _kind(node)
        infos.append((path, bridge.ModuleInfo(dotted(path), kind, shape)))
    return infos


def select_layers(
    params: Mapping[str, Any],
    config: bridge.FourierFTConfig,
    *,
    model_type: Optional[str] = None,
    output_layer: Optional[str] = None,
) -> tuple[LayerSpec, ...]:
    """The ``LayerSpec`` of every Dense kernel ``config`` adapts in ``params`` (``bridge.select_targets``' rules).

    Example:
        >>> import numpy as np
        >>> tree = {"q": {"kernel": np.zeros((8, 4))}, "v": {"kernel": np.zeros((8, 4))}}
        >>> config = bridge.FourierFTConfig(n_frequency=5, target_modules=["q"])
        >>> [(l.name, l.kernel_shape, l.n_frequency) for l in select_layers(tree, config)]
        [('q', (8, 4), 5)]
    """
    infos = module_infos(params)
    paths = {info.name: path for path, info in infos}
    targets = bridge.select_targets(
        config, [info for _, info in infos], model_type=model_type, output_layer=output_layer
    )
    return tuple(
        LayerSpec(
            path=paths[target.name],
            in_features=target.in_features,
            out_features=target.out_features,
            n_frequency=target.n_frequency,
            scaling=float(config.scaling),
            seed=int(config.random_loc_seed),
        )
        for target in targets
    )
