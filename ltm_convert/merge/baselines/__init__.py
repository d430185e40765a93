"""Baseline merge methods behind the same ``convert(model, ratio, method=...)``.

* ``tome``: ToMe bipartite soft matching, size-weighted merge (training-free);
* ``tofu``: ToFu, pruning-like in the first blocks, norm-preserving MLERP merge later (training-free);
* ``ltmp``: LTMP's learned merge / prune thresholds, compiled into the static schedule.

All use the key-derived metric the LTM mask starts from, the same FLOPs-target schedule (they
produce exactly ``prefix + keep`` tokens) and the same save/load. Written from the papers'
descriptions; no code of the authors is used.
"""
from ltm_convert.merge.baselines.ltmp import LtmpMask
from ltm_convert.merge.baselines.tofu import ToFuMask
from ltm_convert.merge.baselines.tome import ToMeMask

__all__ = ["LtmpMask", "ToFuMask", "ToMeMask"]
