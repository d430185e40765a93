"""Model families (one file each) and their registry; see base.py."""
from ltm_convert.rewriters.base import (
    CostModel,
    Family,
    Site,
    builtin_family,
    families,
    family_named,
    plan_for,
    register_family,
    unregister_family,
)

__all__ = ["CostModel", "Family", "Site", "builtin_family", "families", "family_named", "plan_for", "register_family", "unregister_family"]
