"""Our meta-gradients against the libraries users would pick instead (higher, TorchOpt,
learn2learn's MAML), unrolled MAML and the authors' approach, over a grid of models, meta-batch
sizes and inner steps K. Run ``make bench-peers`` (or ``python -m benchmarks.peers --help`` in
the peers' environment); docs/benchmarks.md, Peers, gives the method and the results.

* :mod:`.methods`: the peers' and the learners' methods (registered with the meta-gradient
  benchmark's, whose harness runs them); :mod:`.learn2learn_src`: learn2learn's MAML from its
  source package; :mod:`.report`: the ratio tables; ``__main__``: the grid.
"""
