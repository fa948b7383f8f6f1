"""``xdit-compile serve``: the HTTP service over one process group, its client and the Ray Serve
replicas.

A front end: may import everything below it (``api``, ``analysis``, ``jobs``, ``testing``'s
launcher), never ``cli``.

Modules, each importing only those listed before it (``client`` and ``ray`` stand apart):

- ``options``: ``ServeOptions`` (what the command line parsed), ``ServeStats``, ``ApiError``,
  ``parse_size``; imports nothing of the package.
- ``metrics``: rank 0's counters and their Prometheus text (``GET /metrics``).
- ``scheduler``: ``Job``, the bounded queue that batches requests by signature, and what every
  rank must agree on: the next command, and at each step boundary which requests are aborted.
- ``state``: ``Service``, rank 0's state shared by the HTTP thread and the engine (queue,
  metrics, health, kept videos), and the validation that turns a request into a ``Job``.
- ``video``: video jobs as the API shows them, and their frames encoded (mp4, APNG, npy).
- ``engine``: what every rank runs: the pipeline loaded and parallelized (through
  ``jobs.generate``), warmed up, then the engine loop that runs one batch per turn.
- ``app``: the FastAPI application and its routes (one function per route group), served by
  uvicorn in a thread of rank 0.
- ``group``: the process group run two ways: ``serve_job`` (one rank under torchrun) and
  ``serve_main`` (rank 0 starting and supervising its child ranks, restarting them).
- ``client``: ``generate_images`` and ``wait_ready`` for a running service (standard library
  only).
- ``ray``: Ray Serve replicas of whole groups behind one endpoint.
"""
