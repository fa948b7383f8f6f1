"""Test tools: the process launcher (``launcher``: N gloo workers reused across calls, also what
the command line and the service start their ranks with) and the compiler-independent oracle of
the displaced-K/V methods (``oracle``).

May import the public API and ``runtime``; nothing in the compiler imports it.
"""
