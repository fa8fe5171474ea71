"""``LayerSpec``: the static facts of one adapted Dense layer (shape, positions, scaling).

Hashable and compared by value, so it can sit inside a ``jax.jit`` static argument or a closure without ever
becoming a traced leaf; the positions are numpy constants derived from (shape, n, seed) and so take no part in
the hash.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

import bridge

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

    @property
    def name(self) -> str:
        """The torch-style dotted name (``encoder.layer.0.attention.self.query``)."""
        return dotted(self.path)

    @property
    def kernel_shape(self) -> tuple[int, int]:
        return (self.in_features, self.out_features)

    @functools.cached_property
    def torch_indices(self) -> np.ndarray:
        """PEFT's positions over the torch layout ``(out, in)``: int64 ``(2, n)``, rows then columns."""
        indices = bridge.spectral_indices(self.out_features, self.in_features, self.n_frequency, self.seed)
        indices.setflags(write=False)
        return indices

    def check_spectrum(self, shape: tuple[int, ...], adapter_name: str | None = None) -> None:
        """Raise ``ValueError`` naming the layer unless ``shape`` is ``(n_frequency,)``.

        Example:
            >>> LayerSpec(("q",), 8, 4, 3, 1.0, 0).check_spectrum((3,))
        """
        if tuple(shape) != (self.n_frequency,):
            owner = f" (adapter {adapter_name!r})" if adapter_name is not None else ""
            raise ValueError(
                f"fourierft_jax: spectrum of layer {self.name!r}{owner} has shape {tuple(shape)}, expected "
                f"({self.n_frequency},)"
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
        """The same positions over the Flax kernel ``(in, out)``: PEFT's rows and columns swapped (SPEC §3)."""
        return self.torch_indices[::-1]
