"""Placement flags shared by every adapter method: which layers, which sites.

Layer specs: `all`, `top:K` (the K layers nearest the output), `bottom:K` (the K layers
nearest the input), or a comma-separated list of indices (`0,2,5`). Site specs: a
comma-separated list of site names (`attn,ffn`), checked against the sites a model
declares in its `adapter_sites` mapping.
"""

from __future__ import annotations

from collections.abc import Iterable

LAYER_SPEC_HELP = "'all', 'top:K', 'bottom:K' or a comma-separated list of indices like '0,2'"


def check_layer_spec(spec: str) -> None:
    """Raise ValueError if `spec` is not a well-formed layer spec (no model needed)."""
    _parse(spec)


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """The sorted layer indices that `spec` selects in a model with `num_layers` layers."""
    kind, values = _parse(spec)
    if kind == "all":
        return list(range(num_layers))
    if kind in ("top", "bottom"):
        (k,) = values
        if not 1 <= k <= num_layers:
            raise ValueError(
                f"layer spec {spec!r}: K must be between 1 and {num_layers} "
                f"(the model has {num_layers} layers)"
            )
        return list(range(num_layers - k, num_layers)) if kind == "top" else list(range(k))
    for index in values:
        if index >= num_layers:
            raise ValueError(
                f"layer {index} is out of range: the model has {num_layers} layers "
                f"(valid indices 0..{num_layers - 1})"
            )
    return sorted(set(values))


def parse_sites(spec: str | Iterable[str], valid: Iterable[str] | None = None) -> tuple[str, ...]:
    """Site names from `attn,ffn` (or an iterable of names), in order, without duplicates.

    With `valid`, an unknown site raises ValueError listing the valid ones.
    """
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    sites = tuple(dict.fromkeys(name.strip() for name in names))
    if not sites or any(not site for site in sites):
        raise ValueError(f"malformed site spec {spec!r}; expected names like 'attn,ffn'")
    if valid is not None:
        check_known(sites, valid, "adapter site(s)", "valid sites")
    return sites


def check_known(names: Iterable[str], valid: Iterable[str], what: str, listing: str) -> None:
    """Raise one ValueError naming every unknown entry of `names` and the valid ones."""
    valid = tuple(valid)
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise ValueError(
            f"unknown {what} {', '.join(map(repr, unknown))}; {listing}: {', '.join(valid)}"
        )


def _parse(spec: str) -> tuple[str, tuple[int, ...]]:
    if not isinstance(spec, str):
        raise ValueError(f"layer spec must be a string ({LAYER_SPEC_HELP}), got {spec!r}")
    text = spec.strip().lower()
    if text == "all":
        return "all", ()
    head, sep, count = text.partition(":")
    if sep:
        if head not in ("top", "bottom") or not count.strip().isdigit():
            raise ValueError(f"malformed layer spec {spec!r}; expected {LAYER_SPEC_HELP}")
        k = int(count)
        if k < 1:
            raise ValueError(f"layer spec {spec!r}: K must be >= 1")
        return head, (k,)
    parts = [part.strip() for part in text.split(",")]
    if not parts or not all(part.isdigit() for part in parts):
        raise ValueError(f"malformed layer spec {spec!r}; expected {LAYER_SPEC_HELP}")
    return "list", tuple(int(part) for part in parts)
