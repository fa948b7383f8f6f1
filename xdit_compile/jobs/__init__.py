"""Worker-side jobs that every rank runs: a whole pipeline (``generate``) and a zoo model serially
against in parallel (``compare``). The command line, the service, tests and benchmarks launch them.

May import the public API, ``analysis``, ``runtime`` and ``models``; never ``cli`` or ``serve``.
"""
