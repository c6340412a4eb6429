"""Groups of latent dimensions: index lists that partition the dimensions of a code."""

from __future__ import annotations

from collections.abc import Sequence


def check_partition(groups: Sequence[Sequence[int]], dim: int, *, at_least: int = 1) -> list[list[int]]:
    """``groups`` as lists of ints, checked to partition ``range(dim)`` into ``at_least`` or more groups.

    Errors name the argument ``groups`` and say which dimension is missing, repeated or out of range.
    """
    try:
        groups = [[int(i) for i in group] for group in groups]
    except TypeError:
        raise TypeError("groups must be a sequence of sequences of dimension indices") from None
    if len(groups) < at_least:
        raise ValueError(f"groups must hold at least {at_least} groups of latent dimensions, got {len(groups)}")
    owner: dict[int, int] = {}
    for g, group in enumerate(groups):
        if not group:
            raise ValueError(f"groups[{g}] is empty")
        for i in group:
            if not 0 <= i < dim:
                raise ValueError(f"groups[{g}] holds dimension {i}, outside [0, {dim})")
            if i in owner:
                raise ValueError(f"groups overlap: dimension {i} is in groups[{owner[i]}] and groups[{g}]")
            owner[i] = g
    missing = sorted(set(range(dim)) - set(owner))
    if missing:
        raise ValueError(f"groups must partition the {dim} latent dimensions; missing {missing}")
    return groups
