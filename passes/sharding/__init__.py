"""Sharding propagation: the placement engine and its op rules.

``engine`` holds the rule registry (one rule per ATen op family, keyed by op) and the rule
context; ``rules_shape`` and ``rules_nn`` the rules; ``propagate`` the pass that walks the graph,
asks each node's rule for its placement and records sharding breaks. May import the shared
vocabulary and ``runtime``; never the compiler or anything above it.
"""
