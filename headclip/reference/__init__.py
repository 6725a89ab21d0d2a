"""Known-good images as a reference: a bank of their map-layer patch features per group,
nearest-neighbour distances to it, and the rule that combines them with the zero-shot maps."""

from .bank import POOLED, ReferenceBank, read_bank, write_bank
from .build import BankBuilder
from .combine import ReferenceScorer, combine_rule
from .coreset import greedy_coreset, random_subset
from .index import GroupSearch, IndexSettings, ListIndex, build_index
from .nearest import nearest_distances

__all__ = ["POOLED", "BankBuilder", "GroupSearch", "IndexSettings", "ListIndex", "ReferenceBank", "ReferenceScorer",
           "build_index", "combine_rule", "greedy_coreset", "nearest_distances", "random_subset", "read_bank",
           "write_bank"]
