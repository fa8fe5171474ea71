"""Mixed-adapter batches: each batch row runs its own FourierFT adapter (PEFT's ``adapter_names=``).

The math of one layer, for a batch whose row ``b`` uses adapter ``a_b`` (or none, ``"__base__"``), never builds
any ΔW. The spectral forward (``_spectral.py``) is, per token, a gather of the input's ``rfft`` at the plan's
terms, a multiplication by the coefficients and a scatter-add into the output's half spectrum: output bin ``r``
of row ``b`` is ``Σ_j c[a_b, j] · X[b, src_j]`` over the plan's terms ``j`` with ``bin_j = r`` (``X``
conjugated for the terms the plan conjugates). With ``X`` laid out one table row per (batch row, input bin),
all tokens of that row side by side, each output bin of each row is a weighted sum of table rows -- one
``embedding_bag`` call for the whole batch, its per-sample weights a ``(rows, terms)`` gather from the stacked
coefficients of the layer's adapters. So the cost does not depend on how many distinct adapters the batch
uses; adapters that share ``(n_frequency, seed)`` share the pattern (their positions), others form further
groups, one call each. The stack (``(adapters, n)``, scaling folded in) is kept on the layer and rebuilt only
when its adapters change; a row whose parameter was replaced or changed in place (its ``_version``) is copied
again when it is next used.

Inference only: the adapter's part carries no gradient (PEFT refuses ``adapter_names`` in training mode too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from ._layer import FourierFTLinear
    from ._spectral import SpectralPlan

BASE = "__base__"  # PEFT's name for "this row uses the base model"


def check_names(adapter_names: Any, loaded: Sequence[str]) -> list[str]:
    """``adapter_names`` as a list, checked: a list of str, each loaded or ``"__base__"`` (PEFT's rules).

    Example:
        >>> check_names(["a", "__base__"], ["a", "b"])
        ['a', '__base__']
        >>> check_names(["c"], ["a", "b"])
        Traceback (most recent call last):
        ...
        ValueError: Trying to infer with non-existing adapter(s): c; loaded adapters: ['a', 'b'] (and '__base__')
    """
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise TypeError(f"adapter_names must be a list of str (one per batch row), got {type(adapter_names).__name__}")
    names = list(adapter_names)
    bad = [name for name in names if not isinstance(name, str)]
    if bad:
        raise TypeError(f"adapter_names must be a list of str, got {bad[0]!r}")
    unknown = sorted({name for name in names if name != BASE} - set(loaded))
    if unknown:
        raise ValueError(
            f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}; loaded adapters: "
            f"{sorted(loaded)} (and {BASE!r})"
        )
    return names


def check_rows(x: torch.Tensor, adapter_names: Sequence[str], where: str) -> None:
    """PEFT's check: one name per row of ``x`` (its first axis)."""
    if x.dim() == 0 or x.shape[0] != len(adapter_names):
        rows = x.shape[0] if x.dim() else 0
        raise ValueError(
            f"{where}: Length of `adapter_names` should be the same as the number of inputs, but got "
            f"{len(adapter_names)} and {rows} respectively."
        )


def _inject(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]) -> tuple[tuple, dict]:
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


@contextlib.contextmanager
def adapter_names_hooks(
    modules: Sequence[nn.Module], adapter_names: list[str], encoder_modules: Sequence[nn.Module] = (),
    encoder_names: Optional[list[str]] = None,
) -> Iterator[None]:
    """Within the block, every module of ``modules`` is called with ``adapter_names=...`` (forward pre-hooks).

    ``encoder_modules`` get ``encoder_names`` instead (the encoder of an encoder-decoder model sees the rows
    before generate repeats them for beams). The hooks are removed on exit, also on an error.

    Example:
        >>> seen = []
        >>> class Echo(nn.Module):
        ...     def forward(self, x, adapter_names=None):
        ...         seen.append(adapter_names)
        ...         return x
        >>> echo = Echo()
        >>> with adapter_names_hooks([echo], ["a", "b"]):
        ...     _ = echo(torch.zeros(2))
        >>> _ = echo(torch.zeros(2)); seen
        [['a', 'b'], None]
    """
    handles = []
    try:
        for module in modules:
            hook = functools.partial(_inject, adapter_names=adapter_names)
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        for module in encoder_modules:
            hook = functools.partial(_inject, adapter_names=encoder_names)
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def generate_expansion(kwargs: dict, generation_config: Any) -> int:
    """How many rows ``generate`` makes of each input row: ``max(num_beams, num_return_sequences)`` (transformers).

    Example:
        >>> generate_expansion({"num_beams": 3}, None), generate_expansion({}, None)
        (3, 1)
    """
    config = kwargs.get("generation_config") or generation_config

    def value(name: str) -> int:
        found = kwargs.get(name, getattr(config, name, None))
        return int(found) if found else 1

    return max(value("num_beams"), value("num_return_sequences"), 1)


# ---------------------------------------------------------------------------------------------- the per-row map


@dataclasses.dataclass(frozen=True, eq=False)
class BlockPattern:
    """One row's block of ``M``, as bags: output bin ``r`` sums ``c_j · X[src_j]`` over its terms ``j``.

    Two classes of terms: ``[0]`` reads ``X`` as is, ``[1]`` its conjugate (the plan's ``sign < 0``). Per class:
    ``src`` (the input bin of each term, in bin order), ``coef`` (its coefficient) and ``starts`` (where each of
    the ``out//2+1`` bins' terms begin, ``out//2+2`` entries).
    """

    in_bins: int
    out_bins: int
    src: tuple[torch.Tensor, torch.Tensor]
    coef: tuple[torch.Tensor, torch.Tensor]
    starts: tuple[torch.Tensor, torch.Tensor]


def block_pattern(plan: SpectralPlan) -> BlockPattern:
    """The bags of ``plan``: term ``j`` adds ``c_j · X[src_j]`` (conjugated where ``sign_j < 0``) into ``bin_j``.

    Example:
        >>> import bridge
        >>> from fourierft_torch._spectral import make_plan
        >>> block_pattern(make_plan(bridge.spectral_indices(8, 6, 5, 777), 8, 6)).out_bins
        5
    """
    in_bins, out_bins = plan.in_features // 2 + 1, plan.out_features // 2 + 1
    src, coef, starts = [], [], []
    for chosen in (plan.sign > 0, plan.sign < 0):
        terms = torch.nonzero(chosen).flatten()
        terms = terms[torch.argsort(plan.bin[terms], stable=True)]
        begin = torch.zeros(out_bins + 1, dtype=torch.int64, device=plan.bin.device)
        begin[1:] = torch.bincount(plan.bin[terms], minlength=out_bins).cumsum(0)
        src.append(plan.src[terms])
        coef.append(plan.coef[terms])
        starts.append(begin)
    return BlockPattern(in_bins, out_bins, tuple(src), tuple(coef), tuple(starts))


def batch_pattern(pattern: BlockPattern, rows: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Per class: ``(offsets, indices)`` of ``embedding_bag`` over ``rows`` blocks (row ``b``'s bins, then ``b+1``)."""
    out = []
    for src, starts in zip(pattern.src, pattern.starts):
        block = torch.arange(rows, dtype=torch.int64, device=src.device)[:, None]
        offsets = (block * src.shape[0] + starts[None, :-1]).reshape(-1)
        indices = (block * pattern.in_bins + src[None, :]).reshape(-1)
        out.append((offsets, indices))
    return tuple(out)


def mixed_spectral_delta(
    x: torch.Tensor, coefficients: Sequence[torch.Tensor], patterns: Sequence[BlockPattern],
    patterns_for_rows: Sequence[tuple], out_features: int,
) -> torch.Tensor:
    """Per row ``b``: ``x[b] ΔW_bᵀ`` from the spectral form, for ``x`` of shape ``(rows, ..., in)``.

    ``coefficients[g]``: ``(rows, n_g)`` scaled coefficients of group ``g`` for each row (zeros for rows outside
    the group); ``patterns[g]`` its block, ``patterns_for_rows[g]`` that block repeated for the batch
    (``batch_pattern``). Float32 (float64 for a float64 ``x``), shape ``(rows, ..., out)``.

    Example:
        >>> import bridge
        >>> from fourierft_torch._spectral import make_plan, spectral_delta
        >>> plan = make_plan(bridge.spectral_indices(8, 6, 5, 777), 8, 6)
        >>> pattern, c, x = block_pattern(plan), torch.randn(2, 5), torch.randn(2, 3, 6)
        >>> scale = 0.5 * 2.0 / 6   # 0.5 · scaling / in
        >>> d = mixed_spectral_delta(x, [c * scale], [pattern], [batch_pattern(pattern, 2)], 8)
        >>> torch.allclose(d[1], spectral_delta(x[1], c[1], plan, 2.0), atol=1e-5)
        True
    """
    rows, in_features = x.shape[0], x.shape[-1]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    flat = x.reshape(rows, -1, in_features).to(dtype)
    tokens = flat.shape[1]
    # Bins first within each row: every (row, input bin) is one table row of all its tokens' (re, im), so each
    # output bin is a weighted sum of table rows -- embedding_bag, whose CPU kernel is made for exactly that.
    spectrum = torch.fft.rfft(flat, dim=-1).transpose(1, 2).contiguous()  # (rows, in//2+1, tokens)
    table = torch.view_as_real(spectrum).reshape(rows * spectrum.shape[1], 2 * tokens)
    total = None
    for values, pattern, classes in zip(coefficients, patterns, patterns_for_rows):
        for conj, (coef, (offsets, indices)) in enumerate(zip(pattern.coef, classes)):
            if coef.shape[0] == 0:
                continue
            weights = values.index_select(1, coef).reshape(-1).to(dtype)
            bags = torch.nn.functional.embedding_bag(indices, table, offsets, mode="sum", per_sample_weights=weights)
            bags = torch.view_as_complex(bags.view(rows, pattern.out_bins, tokens, 2))
            bags = bags.conj() if conj else bags
            total = bags.resolve_conj() if total is None else total.add_(bags)
    delta = torch.fft.irfft(total, n=out_features, dim=1)  # (rows, out, tokens)
    return delta.transpose(1, 2).reshape(*x.shape[:-1], out_features)


# ---------------------------------------------------------------------------------------------- the layer's bank


class _Group:
    """The adapters of one layer that share ``(n_frequency, seed)``: one plan, one stacked coefficient table."""

    def __init__(self, layer: FourierFTLinear, names: list[str], device: torch.device, dtype: torch.dtype) -> None:
        self.names = names
        self.index = {name: i for i, name in enumerate(names)}
        self.zero_row = len(names)  # the extra all-zero row: rows outside this group
        plan, _ = layer._plan(names[0], device)
        self.pattern = block_pattern(plan)
        self.scales = [0.5 * layer.fourierft_scaling[name] / layer.in_features for name in names]
        spectra = [layer.fourierft_spectrum[name] for name in names]
        with torch.no_grad(), torch.inference_mode(False):  # a normal tensor, updatable outside inference mode
            stack = torch.stack([p.detach().to(device=device, dtype=dtype) for p in spectra])
            scales = torch.tensor(self.scales, dtype=dtype, device=device)
            self.stack = torch.cat([stack * scales[:, None], stack.new_zeros(1, stack.shape[1])])
        self.params = spectra
        self.versions = [_version(p) for p in spectra]
        self.patterns: dict[int, tuple] = {}

    def refresh(self, spectra: nn.ParameterDict, names: set[str]) -> None:
        """Copy again the rows of ``names`` whose parameter was replaced or changed since it was stacked."""
        for name in names:
            i = self.index[name]
            param = spectra[name]
            version = _version(param)
            if self.params[i] is param and version is not None and self.versions[i] == version:
                continue
            with torch.no_grad(), torch.inference_mode(False):
                self.stack[i].copy_(param.detach().to(self.stack.dtype) * self.scales[i])
            self.params[i], self.versions[i] = param, version

    def for_rows(self, rows: int) -> tuple:
        cached = self.patterns.get(rows)
        if cached is None:
            if len(self.patterns) > 8:
                self.patterns.clear()
            cached = self.patterns[rows] = batch_pattern(self.pattern, rows)
        return cached


def _version(param: torch.Tensor) -> Optional[int]:
    try:
        return int(param._version)
    except Exception:  # inference tensors have no version counter: always copy again
        return None


class LayerBank:
    """Everything a layer needs for mixed batches on one device and dtype; rebuilt when its adapters change."""

    def __init__(self, layer: FourierFTLinear, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        by_key: dict[tuple[int, int], list[str]] = {}
        for name in layer.fourierft_spectrum:
            key = (layer.fourierft_n_frequency[name], layer.fourierft_random_loc_seed[name])
            by_key.setdefault(key, []).append(name)
        self.groups = [_Group(layer, names, device, dtype) for names in by_key.values()]
        self.group_of = {name: g for g, group in enumerate(self.groups) for name in group.names}
        self._route_key: Optional[tuple[str, ...]] = None
        self._route: list[tuple[_Group, torch.Tensor, set[str]]] = []

    def route(self, adapter_names: Sequence[str]) -> list[tuple[_Group, torch.Tensor, set[str]]]:
        """Per group present in the batch: ``(group, stack row of each batch row, names used)``."""
        key = tuple(adapter_names)
        if key == self._route_key:
            return self._route
        picks: dict[int, list[int]] = {}
        used: dict[int, set[str]] = {}
        for row, name in enumerate(key):
            g = self.group_of.get(name)  # "__base__" and adapters this layer does not have: no delta
            if g is None:
                continue
            if g not in picks:
                picks[g] = [self.groups[g].zero_row] * len(key)
                used[g] = set()
            picks[g][row] = self.groups[g].index[name]
            used[g].add(name)
        self._route = [
            (self.groups[g], torch.tensor(rows, dtype=torch.int64, device=self.device), used[g])
            for g, rows in sorted(picks.items())
        ]
        self._route_key = key
        return self._route


def layer_bank(layer: FourierFTLinear, device: torch.device, dtype: torch.dtype) -> LayerBank:
    bank = getattr(layer, "_mixed_bank", None)
    if bank is None or bank.device != device or bank.dtype != dtype:
        bank = LayerBank(layer, device, dtype)
        layer._mixed_bank = bank
    return bank


def layer_mixed_delta(layer: FourierFTLinear, x: torch.Tensor, adapter_names: Sequence[str]) -> Optional[torch.Tensor]:
    """The adapters' part of ``layer``'s output for a mixed batch (``None`` when no row has an adapter here)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        bank = layer_bank(layer, x.device, dtype)
        route = bank.route(adapter_names)
        if not route:
            return None
        coefficients, patterns, batch = [], [], []
        for group, stack_rows, used in route:
            group.refresh(layer.fourierft_spectrum, used)
            coefficients.append(group.stack.index_select(0, stack_rows))
            patterns.append(group.pattern)
            batch.append(group.for_rows(x.shape[0]))
        return mixed_spectral_delta(x, coefficients, patterns, batch, layer.out_features)
