"""One module per ``meshnode`` subcommand: ``add_arguments(parser)`` and ``run(args)``.

- ``generate``: local and mesh generation.
- ``bootstrap``: a DHT-only node.
- ``worker``: a block-serving worker.
- ``status``: coverage of a model's blocks.
- ``demo``: a whole local mesh in separate processes.
- ``bench``: local against mesh speed.
"""
