"""The compiler core: from a model's forward to a runnable, printable program.

Holds capture (``capture``, ``specialize``), the pass driver (``driver``), the PipeFusion
compile path (``pipefusion``) and the Python-side state a captured graph depends on (``state``,
``watch``). May import the shared vocabulary (``plan``, ``placement``, ``latent``),
``xdit_compile.passes`` and ``xdit_compile.runtime``; never ``analysis``, the front ends
(``cli``, ``serve``, ``jobs``) or ``testing``.
"""
