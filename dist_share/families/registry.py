"""The families by name."""

from __future__ import annotations

from typing import Any

from dist_share.config.schema import FAMILIES
from dist_share.errors import ConfigError, hint
from dist_share.families.base import Family
from dist_share.families.multiview import MultiviewFamily
from dist_share.families.siamese import SiameseFamily
from dist_share.families.triplet import TripletFamily
from dist_share.families.two_tower import TwoTowerFamily

REGISTRY: dict[str, Family] = {
    f.name: f for f in (SiameseFamily(), TripletFamily(), MultiviewFamily(), TwoTowerFamily())
}
assert tuple(REGISTRY) == FAMILIES, "the schema's family names and the registry disagree"


def get_family(name: Any, path: str = "model.family") -> Family:
    """The family called ``name``; a ConfigError naming ``path`` otherwise."""
    if name not in REGISTRY:
        extra = hint(name, FAMILIES) if isinstance(name, str) else ""
        extra = extra if "did you mean" in extra else ""
        raise ConfigError(path, f"got {name!r}, expected one of {', '.join(FAMILIES)}{extra}")
    return REGISTRY[name]
