"""Time and peak memory of one meta-gradient against the number of inner steps K: ours
(``adjoint_meta_grad``) against MAML unrolled, the authors' adjoints and torchdiffeq's
odeint_adjoint. Run ``python -m benchmarks.meta_grad --help``; docs/benchmarks.md explains
the methods and the measurements.

* :mod:`.problem`: the models and tasks; :mod:`.methods`: the methods compared;
  :mod:`.point`: one (method, K) point in a child process; :mod:`.check`: the correctness
  check; :mod:`.report`: the tables; ``__main__``: the options and the sweep.
"""
