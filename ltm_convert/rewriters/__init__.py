"""Block rewriters: one per block family, tried in order (see base.py)."""
from ltm_convert.rewriters.base import pick_rewriter, register_rewriter, rewriters

__all__ = ["pick_rewriter", "register_rewriter", "rewriters"]
