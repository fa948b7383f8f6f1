"""``xdit-compile serve``: the HTTP service over one process group, its client and the Ray Serve
replicas.

A front end: may import everything below it (``api``, ``analysis``, ``jobs``, ``testing``'s
launcher), never ``cli``.
"""
