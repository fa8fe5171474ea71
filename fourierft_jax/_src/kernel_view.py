"""Where a kernel's elements sit in an array the model derived from it by layout-only operations.

A model rarely feeds a stored kernel straight into its matmul: it casts it, transposes it, reshapes it
(``DenseGeneral`` folds heads, ``jnp.einsum`` permutes operands), or a scan slices one layer out of a stack. Each
such array is a *view* of the kernel: every one of its axes is a row-major merge of *atoms*, and an atom is a
piece of one kernel axis -- ``(kernel axis, stride within that axis, size)``. Transposes permute the axes,
reshapes regroup the atoms (splitting an atom where a new axis boundary falls inside it), casts change nothing.

From the view at a ``dot_general`` we read which kernel axes the model contracts (the matrix's ``in``) and which
it keeps (``out``), and we can move any array between the view's layout and the kernel's ``(in, out)`` matrix
layout, where FourierFT's positions live, without ever materialising an index array of the kernel's size.

Example:
    >>> view = KernelView.identity((4, 2, 3)).reshape((4, 6))   # DenseGeneral's (D, N, H) -> (D, N*H)
    >>> view.axes
    (((0, 1, 4),), ((1, 1, 2), (2, 1, 3)))
    >>> view.transpose((1, 0)).shape
    (6, 4)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

Atom = tuple[int, int, int]  # (kernel axis, stride inside that axis, size); size > 1


@dataclasses.dataclass(frozen=True)
class KernelView:
    """The layout of an array derived from a kernel of shape ``root``: one tuple of atoms per array axis."""

    root: tuple[int, ...]
    axes: tuple[tuple[Atom, ...], ...]

    @classmethod
    def identity(cls, shape: Sequence[int]) -> "KernelView":
        """The kernel itself."""
        shape = tuple(int(d) for d in shape)
        return cls(shape, tuple(((a, 1, d),) if d != 1 else () for a, d in enumerate(shape)))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(math.prod(atom[2] for atom in axis) for axis in self.axes)

    @property
    def atoms(self) -> tuple[Atom, ...]:
        """Every atom in this array's row-major order."""
        return tuple(atom for axis in self.axes for atom in axis)

    def transpose(self, permutation: Sequence[int]) -> "KernelView":
        return KernelView(self.root, tuple(self.axes[p] for p in permutation))

    def reshape(self, new_sizes: Sequence[int]) -> Optional["KernelView"]:
        """The view after a row-major reshape, or None where the new axes do not fall on atom boundaries
        that a split can make (never for reshapes that merge or split axes)."""
        stream = list(self.atoms)
        axes: list[tuple[Atom, ...]] = []
        for size in new_sizes:
            size, group = int(size), []
            while size > 1:
                if not stream:
                    return None
                axis, stride, length = stream.pop(0)
                if length <= size:
                    if size % length:
                        return None
                    group.append((axis, stride, length))
                    size //= length
                else:
                    if length % size:
                        return None
                    # The major part of the atom ends this axis, the minor part starts the next.
                    minor = length // size
                    group.append((axis, stride * minor, size))
                    stream.insert(0, (axis, stride, minor))
                    size = 1
            axes.append(tuple(group))
        return None if stream else KernelView(self.root, tuple(axes))

    def squeeze(self, dimensions: Sequence[int]) -> "KernelView":
        return KernelView(self.root, tuple(a for i, a in enumerate(self.axes) if i not in set(dimensions)))

    def broadcast(self, shape: Sequence[int], broadcast_dimensions: Sequence[int]) -> Optional["KernelView"]:
        """The view after ``broadcast_in_dim`` when it only inserts size-1 axes (else None)."""
        axes: list[tuple[Atom, ...]] = [()] * len(shape)
        for source, target in enumerate(broadcast_dimensions):
            axes[target] = self.axes[source]
        view = KernelView(self.root, tuple(axes))
        return view if view.shape == tuple(int(d) for d in shape) else None

    def leading_axis(self) -> Optional[int]:
        """The kernel axis that this array's axis 0 is, whole (what a scan over it slices), or None."""
        if len(self.axes) == 0 or len(self.axes[0]) != 1:
            return None
        axis, stride, length = self.axes[0][0]
        return axis if stride == 1 and length == self.root[axis] else None

    def drop_leading(self) -> "KernelView":
        """The view of one slice along axis 0 (a whole kernel axis): that axis leaves the root."""
        gone = self.axes[0][0][0]
        renumber = lambda atom: (atom[0] - (atom[0] > gone), atom[1], atom[2])  # noqa: E731
        root = self.root[:gone] + self.root[gone + 1 :]
        return KernelView(root, tuple(tuple(renumber(a) for a in axis) for axis in self.axes[1:]))

    def canonical(self, kernel_axes: Sequence[int]) -> tuple[Atom, ...]:
        """The atoms of ``kernel_axes``, in kernel order (axis ascending, then major to minor)."""
        wanted = set(kernel_axes)
        return tuple(sorted((a for a in self.atoms if a[0] in wanted), key=lambda a: (a[0], -a[1])))

    def kernel_axes_of(self, dims: Sequence[int]) -> set[int]:
        """The kernel axes that have atoms in the array axes ``dims``."""
        return {atom[0] for d in dims for atom in self.axes[d]}


def arrange(array: jax.Array, lead: int, atoms: Sequence[Atom], target: Sequence[tuple[Atom, ...]]) -> jax.Array:
    """Move ``array`` (``lead`` leading axes, then one axis per atom of ``atoms`` merged row-major) into the
    layout ``target`` (one tuple of the same atoms per output axis), keeping the leading axes.

    Example:
        >>> a = jnp.arange(6.0).reshape(2, 3)                  # atoms x: size 2, y: size 3
        >>> x, y = (0, 1, 2), (1, 1, 3)
        >>> arrange(a, 0, (x, y), ((y,), (x,))).tolist()        # a transpose
        [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
    """
    lead_shape = array.shape[:lead]
    split = array.reshape(lead_shape + tuple(atom[2] for atom in atoms))
    order = [atom for axis in target for atom in axis]
    position = {atom: i for i, atom in enumerate(atoms)}
    perm = tuple(range(lead)) + tuple(lead + position[atom] for atom in order)
    moved = jnp.transpose(split, perm) if perm != tuple(range(len(perm))) else split
    return moved.reshape(lead_shape + tuple(math.prod(a[2] for a in axis) for axis in target))


def gather_atoms(array: jax.Array, lead: Sequence[int], dims: Sequence[int], view_axes: Sequence[tuple[Atom, ...]],
                 atoms: Sequence[Atom]) -> jax.Array:
    """``array`` with axes ``lead`` first (merged into one), then axes ``dims`` -- laid out like ``view_axes``
    (one tuple of atoms each) -- regrouped as the flat axis ``atoms`` (kernel order): ``(tokens, features)``.

    Example:
        >>> x = jnp.arange(12.0).reshape(2, 2, 3)             # (tokens, N, H) against a kernel (N, H, D)
        >>> gather_atoms(x, (0,), (1, 2), (((0, 1, 2),), ((1, 1, 3),)), ((0, 1, 2), (1, 1, 3))).shape
        (2, 6)
    """
    moved = jnp.transpose(array, tuple(lead) + tuple(dims))
    tokens = math.prod(array.shape[d] for d in lead)
    flat_in = moved.reshape((tokens,) + tuple(atom[2] for axis in view_axes for atom in axis))
    source = [atom for axis in view_axes for atom in axis]
    return arrange(flat_in, 1, source, (tuple(atoms),))
