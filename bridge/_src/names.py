"""Name maps between a JAX model's module paths and torch module names, framework-neutral.

The default maps a Flax/NNX module to the dotted path of its parameters (``encoder.layer.0.attention.self.query``
for ``params["encoder"]["layer"]["0"]["attention"]["self"]["query"]``), which is exactly the torch name for
HF-style models whose Flax names mirror transformers'. Other conventions give rules: ordered ``(pattern,
replacement)`` regex rewrites (``re.sub``, each applied to the result of the previous one) or a callable, for
each direction. Every map used on a set of layers is checked: each name must map to exactly one name, no two
names to the same one, and, when both directions are given, each must come back to itself. A rule that rewrites
none of the names is almost always a typo (the names then pass through unchanged and PEFT finds no such module),
so it is reported naming the rule: a warning by default, an error with ``unused_rules="error"``, nothing with
``"ignore"`` (a library's ready rules, of which each model uses only some).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

Rules = Union[None, Sequence[Sequence[str]], Callable[[str], Optional[str]]]


UNUSED_RULES = ("error", "warn", "ignore")


class NameMapError(ValueError):
    """A name map that does not give every layer exactly one name (the message names the layers)."""


class _RuleList:
    """Ordered ``re.sub`` rules; ``used`` counts, per rule, the names it rewrote since the last ``reset``."""

    def __init__(self, compiled: list, what: str) -> None:
        self.compiled, self.what = compiled, what
        self.used = [0] * len(compiled)

    def reset(self) -> None:
        self.used = [0] * len(self.compiled)

    def __call__(self, name: str) -> str:
        for i, (pattern, replacement) in enumerate(self.compiled):
            name, count = pattern.subn(replacement, name)
            self.used[i] += count > 0
        return name

    def unused(self) -> list[str]:
        return [f"{self.what} rule {i} ({pattern.pattern!r} -> {replacement!r})"
                for i, ((pattern, replacement), n) in enumerate(zip(self.compiled, self.used)) if not n]


def _compile(rules: Rules, what: str) -> Optional[Callable[[str], Optional[str]]]:
    if rules is None:
        return None
    if callable(rules):
        return rules
    compiled = []
    for rule in rules:
        if isinstance(rule, str) or len(rule) != 2:
            raise NameMapError(f"{what} rule {rule!r} is not a (pattern, replacement) pair")
        try:
            compiled.append((re.compile(rule[0]), str(rule[1])))
        except re.error as error:
            raise NameMapError(f"{what} rule pattern {rule[0]!r} is not a regular expression: {error}") from None
    return _RuleList(compiled, what)


class NameMap:
    """How JAX module paths (dotted) and torch module names correspond.

    Args:
        to_torch: rules JAX name → torch name: ``[(pattern, replacement), ...]`` applied in order with
            ``re.sub``, or a callable returning the name (``None`` when it has none). ``None``: identity.
        to_flax: the same for torch name → JAX name. When absent and the JAX names are known (a params tree),
            the inverse is found by mapping those names forward.
        unused_rules: what a regex rule that rewrites none of the names it is applied to gives: ``"warn"``
            (default: a ``UserWarning`` naming the rule), ``"error"`` (a ``NameMapError`` naming it) or
            ``"ignore"``. Callables are not checked.

    Example:
        >>> names = NameMap(to_torch=[(r"layers_(\\d+)", r"layers.\\1"), (r"\\.attn\\.q$", ".self_attn.q_proj")])
        >>> names.to_torch_names(["layers_0.attn.q"])
        {'layers_0.attn.q': 'layers.0.self_attn.q_proj'}
        >>> names.to_flax_names(["layers.0.self_attn.q_proj"], known_flax=["layers_0.attn.q", "layers_0.attn.k"])
        {'layers.0.self_attn.q_proj': 'layers_0.attn.q'}
        >>> strict = NameMap(to_torch=[(r"layers_(\\d+)", r"layers.\\1"), (r"\\.attn\\.q$", ".self_attn.q_proj")],
        ...                  unused_rules="error")
        >>> strict.to_torch_names(["layers_0.attn.k"])
        Traceback (most recent call last):
        ...
        bridge._src.names.NameMapError: name map rule(s) matched none of the 1 name(s) ['layers_0.attn.k']: to_torch rule 1 ('\\\\.attn\\\\.q$' -> '.self_attn.q_proj')
    """

    def __init__(self, to_torch: Rules = None, to_flax: Rules = None, *, unused_rules: str = "warn") -> None:
        if unused_rules not in UNUSED_RULES:
            raise NameMapError(f"unused_rules must be one of {UNUSED_RULES}, got {unused_rules!r}")
        self._to_torch = _compile(to_torch, "to_torch")
        self._to_flax = _compile(to_flax, "to_flax")
        self.unused_rules = unused_rules

    @property
    def is_identity(self) -> bool:
        """True for the default map (no rules in either direction)."""
        return self._to_torch is None and self._to_flax is None

    @classmethod
    def parse(cls, text: Union[str, "os.PathLike[str]", None]) -> "NameMap":
        r"""A map from JSON (inline or a file): ``{"to_torch": [[pattern, replacement], ...], "to_flax": [...]}``.

        A bare list means ``to_torch`` rules. ``None`` gives the default map.

        Example:
            >>> NameMap.parse('[["_(\\\\d+)", ".\\\\1"]]').to_torch_names(["h_0"])
            {'h_0': 'h.0'}
        """
        if text is None:
            return cls()
        source = os.fspath(text)
        if os.path.isfile(source):
            with open(source, encoding="utf-8") as stream:
                source = stream.read()
        try:
            data = json.loads(source)
        except json.JSONDecodeError as error:
            raise NameMapError(
                f"name map {str(text)[:80]!r} is neither a JSON file nor JSON text "
                f'({{"to_torch": [[pattern, replacement], ...], "to_flax": [...]}}): {error}'
            ) from None
        if isinstance(data, list):
            data = {"to_torch": data}
        if not isinstance(data, dict) or set(data) - {"to_torch", "to_flax"}:
            raise NameMapError(f"name map must be a list of rules or an object with 'to_torch'/'to_flax', got {data!r}")
        return cls(data.get("to_torch"), data.get("to_flax"))

    def to_torch_names(self, flax_names: Iterable[str], *, check_rules: bool = True) -> dict[str, str]:
        """``{JAX name: torch name}`` for every name, checked to be one-to-one (and to round-trip if it can).

        ``flax_names`` should be all the names the map is meant for (every module an adapter writes): each
        ``to_torch`` rule must rewrite one of them (see ``unused_rules``). ``check_rules=False`` skips that
        check, for looking up a single name of a set already checked.
        """
        flax_names = list(flax_names)
        with self._checking(check_rules, flax_names, self._to_torch):
            return self._map(flax_names, self._to_torch, self._to_flax, "JAX", "torch")

    def to_flax_names(self, torch_names: Iterable[str], known_flax: Optional[Iterable[str]] = None, *,
                      check_rules: bool = True) -> dict[str, str]:
        """``{torch name: JAX name}``; without ``to_flax`` rules the JAX names are found among ``known_flax``.

        Raises ``NameMapError`` naming every torch name with no JAX name, or two torch names sharing one. The
        rules applied to the set (``to_flax`` to ``torch_names``, else ``to_torch`` to ``known_flax``) must each
        rewrite one name (see ``unused_rules``; ``check_rules=False`` skips it).
        """
        torch_names = list(torch_names)
        if self._to_flax is not None or self._to_torch is None:
            with self._checking(check_rules, torch_names, self._to_flax):
                mapped = self._map(torch_names, self._to_flax, self._to_torch, "torch", "JAX")
            if known_flax is not None:
                known = set(known_flax)
                missing = [f"{t!r} -> {f!r}" for t, f in mapped.items() if f not in known]
                if missing:
                    raise NameMapError(f"torch name(s) map to no module of the JAX model: {', '.join(missing)}")
            return mapped
        if known_flax is None:
            raise NameMapError(
                "the name map has only 'to_torch' rules and the JAX names are unknown here: give 'to_flax' rules too"
            )
        forward: dict[str, list[str]] = {}
        known_flax = list(known_flax)
        with self._checking(check_rules, known_flax, self._to_torch):
            for flax_name in known_flax:
                torch_name = self._to_torch(flax_name)
                if torch_name is not None:
                    forward.setdefault(torch_name, []).append(flax_name)
        problems = []
        out = {}
        for name in torch_names:
            candidates = forward.get(name, [])
            if not candidates:
                problems.append(f"{name!r} is the image of no JAX module")
            elif len(candidates) > 1:
                problems.append(f"{name!r} is the image of several JAX modules {candidates}")
            else:
                out[name] = candidates[0]
        if problems:
            raise NameMapError("name map is not one-to-one on the adapted modules: " + "; ".join(problems))
        return out

    @contextlib.contextmanager
    def _checking(self, check: bool, names: list[str], rules) -> Iterator[None]:
        """Count which of ``rules`` rewrite one of ``names`` while the body maps them; then act on the unused."""
        if not isinstance(rules, _RuleList):
            yield
            return
        rules.reset()
        yield
        unused = rules.unused()
        if not check or not unused or self.unused_rules == "ignore":
            return
        shown = names if len(names) <= 6 else names[:6] + [f"... {len(names) - 6} more"]
        message = f"name map rule(s) matched none of the {len(names)} name(s) {shown}: {'; '.join(unused)}"
        if self.unused_rules == "error":
            raise NameMapError(message)
        warnings.warn(message, UserWarning, stacklevel=4)

    @staticmethod
    def _map(names: list[str], forward, backward, source: str, target: str) -> dict[str, str]:
        out: dict[str, str] = {}
        problems: list[str] = []
        for name in names:
            try:
                mapped = name if forward is None else forward(name)
            except Exception as error:  # a user callable: report which name it failed on
                problems.append(f"{source} name {name!r}: the rule raised {type(error).__name__}: {error}")
                continue
            if not isinstance(mapped, str) or not mapped:
                problems.append(f"{source} name {name!r} maps to no {target} name")
                continue
            out[name] = mapped
        owners: dict[str, list[str]] = {}
        for name, mapped in out.items():
            owners.setdefault(mapped, []).append(name)
        for mapped, sources in owners.items():
            if len(sources) > 1:
                problems.append(f"{source} names {sources} all map to the {target} name {mapped!r}")
        if backward is not None and forward is not None:
            for name, mapped in out.items():
                try:
                    back = backward(mapped)
                except Exception as error:
                    back = f"<error {error}>"
                if back != name:
                    problems.append(f"{source} name {name!r} -> {mapped!r} comes back as {back!r}")
        if problems:
            raise NameMapError("name map does not give every adapted module exactly one name: " + "; ".join(problems))
        return out


def map_config_names(config, names: Mapping[str, str], layers: Mapping[str, int], saved: Sequence[str]):
    """A copy of ``config`` whose matching fields name ``names``' images explicitly.

    ``layers`` is ``{old layer name: n_frequency}``, ``saved`` the old ``modules_to_save`` names. The rules that
    found the layers (``target_modules`` patterns, ``layers_to_transform``, ``exclude_modules``) may not hold on
    the other side's names, so they become full names: PEFT then adapts exactly these layers.

    Example:
        >>> from bridge import FourierFTConfig
        >>> cfg = map_config_names(FourierFTConfig(n_frequency=4, target_modules=["q"]),
        ...                        {"l_0.q": "l.0.q_proj"}, {"l_0.q": 4}, [])
        >>> cfg.target_modules
        ['l.0.q_proj']
    """
    import dataclasses

    targets = sorted(names[name] for name in layers)
    pattern = {names[name]: n for name, n in sorted(layers.items()) if n != config.n_frequency}
    return dataclasses.replace(
        config,
        target_modules=targets,
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        n_frequency_pattern=pattern,
        modules_to_save=sorted(names[name] for name in saved) or None,
    )
