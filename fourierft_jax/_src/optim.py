"""An optax recipe: one learning rate for the spectra, another for trained biases and ``modules_to_save``."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import jax
import optax

from .adapter import SPECTRA

ScalarOrSchedule = Union[float, Callable[[Any], Any]]


def _labels(trainable: Mapping[str, Any]) -> Any:
    return {
        name: {group: jax.tree.map(lambda _: "spectra" if group == SPECTRA else "head", sub) for group, sub in state.items()}
        for name, state in trainable.items()
    }


def multi_lr(
    spectra_lr: ScalarOrSchedule = 5e-2,
    head_lr: ScalarOrSchedule = 5e-3,
    *,
    weight_decay: float = 0.0,
    make: Callable[..., optax.GradientTransformation] = optax.adamw,
) -> optax.GradientTransformation:
    """AdamW (or ``make``) with ``spectra_lr`` for spectra and ``head_lr`` for biases / ``modules_to_save``.

    The paper's ranges: 1e-2 … 1.2e-1 for spectra, 1e-3 … 1e-2 for a classifier head (docs/method.md, "Learning rates"); tiny spectra
    learning rates such as 1e-4 barely move the model.

    Example:
        >>> import jax.numpy as jnp
        >>> tx = multi_lr(5e-2, 5e-3)
        >>> state = tx.init({"default": {"spectra": {"q": jnp.zeros(3)}, "bias": {}, "modules_to_save": {}}})
    """
    return optax.multi_transform(
        {"spectra": make(spectra_lr, weight_decay=weight_decay), "head": make(head_lr, weight_decay=weight_decay)},
        _labels,
    )
