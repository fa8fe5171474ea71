"""``LayerSpec``: the static facts of one adapted Dense kernel (shape, positions, scaling, layer stack).

Hashable and compared by value, so it can sit inside a ``jax.jit`` static argument or a closure without ever
becoming a traced leaf; the positions are numpy constants derived from (shape, n, seed) and so take no part in
the hash.

A *stacked* kernel (``nn.scan``/``nnx.scan``/MaxText-style parameter trees) holds ``stack_size`` layers'
``(in, out)`` kernels along ``stack_axis``. Every layer of a stack has the same shape and seed, hence the same
positions; the adapter keeps one spectrum row per adapted layer (``stack_ids``), shape ``(len(stack_ids), n)``.
Torch-style, layer ``i`` is named with ``i`` inserted after the first ``stack_depth`` path entries
(``encoder.layer`` + ``attention.self.query`` → ``encoder.layer.3.attention.self.query``), which is how PEFT
names the same layer of an unrolled model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import numpy as np

import bridge
from bridge._src.targets import stack_row_path

from .tree import Path, dotted


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One adapted Dense layer. The kernel is ``(in_features, out_features)``; ``ΔW`` is PEFT's, transposed.

    Example:
        >>> layer = LayerSpec(("encoder", "query"), in_features=8, out_features=4, n_frequency=3, scaling=2.0,
        ...                   seed=777)
        >>> layer.name, layer.kernel_shape, layer.kernel_indices.shape
        ('encoder.query', (8, 4), (2, 3))
    """

    path: Path
    in_features: int
    out_features: int
    n_frequency: int
    scaling: float
    seed: int
    stack_axis: Optional[int] = None
    stack_size: int = 0
    stack_ids: tuple[int, ...] = ()
    stack_depth: int = 0
    kernel_leaf: str = "kernel"
    kernel_dims: tuple[int, ...] = ()
    in_axes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kernel_dims or self.in_axes:
            dims, axes = self.kernel_dims, self.in_axes
            if (not axes or list(axes) != sorted(set(axes)) or axes[0] < 0 or axes[-1] >= len(dims)
                    or len(axes) == len(dims)):
                raise ValueError(f"LayerSpec {self.name!r}: contracted axes {axes} of a kernel {dims} must be sorted, "
                                 "distinct, and leave at least one kept axis")
            if (math.prod(dims[a] for a in axes) != self.in_features
                    or math.prod(dims[a] for a in self.out_axes) != self.out_features):
                raise ValueError(f"LayerSpec {self.name!r}: kernel {dims} contracted on {axes} is not an "
                                 f"({self.in_features}, {self.out_features}) matrix")
        if self.stack_axis is None:
            return
        if self.stack_axis not in (0, 1, 2) or not 0 < self.stack_depth <= len(self.path):
            raise ValueError(f"LayerSpec {self.name!r}: bad stack_axis {self.stack_axis} / depth {self.stack_depth}")
        if not self.stack_ids or list(self.stack_ids) != sorted(set(self.stack_ids)) or not (
            0 <= self.stack_ids[0] and self.stack_ids[-1] < self.stack_size
        ):
            raise ValueError(
                f"LayerSpec {self.name!r}: stack_ids {self.stack_ids} must be sorted, distinct and below "
                f"stack_size {self.stack_size}"
            )

    @property
    def name(self) -> str:
        """The dotted parameter path (for a stack: without a layer index), the key of this layer's spectrum."""
        return dotted(self.path)

    @property
    def stacked(self) -> bool:
        """Whether the kernel is a stack of layers (``stack_axis`` is set)."""
        return self.stack_axis is not None

    @property
    def torch_names(self) -> tuple[str, ...]:
        """The torch-style name of every adapted layer: ``(name,)``, or one ``prefix.<i>.rest`` per stack row.

        Example:
            >>> LayerSpec(("layers", "mlp", "fc"), 8, 4, 3, 1.0, 0, stack_axis=0, stack_size=4, stack_ids=(0, 2),
            ...           stack_depth=1).torch_names
            ('layers.0.mlp.fc', 'layers.2.mlp.fc')
        """
        if not self.stacked:
            return (self.name,)
        return tuple(dotted(stack_row_path(self.path, self.stack_depth, i)) for i in self.stack_ids)

    @property
    def unstacked(self) -> "LayerSpec":
        """The same layer without its stack: what one row of the stack is (same positions, ``(n,)`` spectrum).

        Example:
            >>> LayerSpec(("s", "fc"), 8, 4, 3, 1.0, 0, stack_axis=0, stack_size=2, stack_ids=(0, 1),
            ...           stack_depth=1).unstacked.spectrum_shape
            (3,)
        """
        return dataclasses.replace(self, stack_axis=None, stack_size=0, stack_ids=(), stack_depth=0)

    @property
    def kernel_shape(self) -> tuple[int, int]:
        """One layer's kernel as a matrix ``(in, out)`` (for a stack: one row of it; N-D: its 2-D view)."""
        return (self.in_features, self.out_features)

    @property
    def dims(self) -> tuple[int, ...]:
        """One layer's kernel as stored: ``kernel_dims`` for an N-D kernel, else ``kernel_shape``."""
        return self.kernel_dims or self.kernel_shape

    @property
    def contracted(self) -> tuple[int, ...]:
        """The axes of ``dims`` that the model contracts with its input (the matrix's ``in``)."""
        return self.in_axes or (0,)

    @property
    def out_axes(self) -> tuple[int, ...]:
        """The axes of ``dims`` the contraction keeps (the matrix's ``out``), in kernel order."""
        return tuple(a for a in range(len(self.dims)) if a not in self.contracted)

    @property
    def is_matrix(self) -> bool:
        """Whether one layer's kernel is stored as the plain ``(in, out)`` matrix (a Dense kernel)."""
        return self.dims == self.kernel_shape and self.contracted == (0,)

    @property
    def kernel_path(self) -> Path:
        """Where the kernel array sits: ``path + (kernel_leaf,)``, or ``path`` itself for a bare array leaf."""
        return self.path + (self.kernel_leaf,) if self.kernel_leaf else self.path

    @property
    def flat(self) -> "LayerSpec":
        """This layer as the plain ``(in, out)`` matrix of its 2-D view (same positions and spectrum).

        Example:
            >>> LayerSpec(("q",), 8, 12, 3, 1.0, 0, kernel_dims=(8, 3, 4), in_axes=(0,)).flat.param_shape
            (8, 12)
        """
        return dataclasses.replace(self, kernel_dims=(), in_axes=())

    @property
    def param_shape(self) -> tuple[int, ...]:
        """The kernel as stored in the parameter tree: ``kernel_shape`` with ``stack_size`` at ``stack_axis``.

        Example:
            >>> LayerSpec(("layers", "fc"), 8, 4, 3, 1.0, 0, stack_axis=1, stack_size=5, stack_ids=(0, 1, 2, 3, 4),
            ...           stack_depth=1).param_shape
            (8, 5, 4)
        """
        shape = list(self.dims)
        if self.stacked:
            shape.insert(self.stack_axis, self.stack_size)
        return tuple(shape)

    @property
    def spectrum_shape(self) -> tuple[int, ...]:
        """``(n,)``, or ``(len(stack_ids), n)`` for a stack: one spectrum per adapted layer."""
        return (len(self.stack_ids), self.n_frequency) if self.stacked else (self.n_frequency,)

    @functools.cached_property
    def torch_indices(self) -> np.ndarray:
        """PEFT's positions over the torch layout ``(out, in)``: int64 ``(2, n)``, rows then columns."""
        indices = bridge.spectral_indices(self.out_features, self.in_features, self.n_frequency, self.seed)
        indices.setflags(write=False)
        return indices

    def check_spectrum(self, shape: tuple[int, ...], adapter_name: str | None = None) -> None:
        """Raise ``ValueError`` naming the layer unless ``shape`` is ``spectrum_shape``.

        Example:
            >>> LayerSpec(("q",), 8, 4, 3, 1.0, 0).check_spectrum((3,))
        """
        if tuple(shape) != self.spectrum_shape:
            owner = f" (adapter {adapter_name!r})" if adapter_name is not None else ""
            raise ValueError(
                f"fourierft_jax: spectrum of layer {self.name!r}{owner} has shape {tuple(shape)}, expected "
                f"{self.spectrum_shape}"
            )

    def check_input(self, shape: tuple[int, ...]) -> None:
        """Raise ``ValueError`` naming the layer unless the last axis of ``shape`` is ``in_features``.

        Example:
            >>> LayerSpec(("q",), 8, 4, 3, 1.0, 0).check_input((2, 8))
        """
        if shape[-1] != self.in_features:
            raise ValueError(
                f"fourierft_jax: layer {self.name!r} expects inputs with {self.in_features} features, got shape "
                f"{tuple(shape)}"
            )

    @property
    def kernel_indices(self) -> np.ndarray:
        """The same positions over the Flax kernel ``(in, out)``: PEFT's rows and columns swapped (docs/method.md)."""
        return self.torch_indices[::-1]
