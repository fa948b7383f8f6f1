"""What a compiled program costs and says: the report ``explain`` prints, the cost model and
the planner that ranks plans with it.

May import the shared vocabulary, ``compiler``, ``passes`` and ``runtime``; never the front
ends (``cli``, ``serve``, ``jobs``) or ``testing``.
"""
