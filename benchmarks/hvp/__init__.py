"""Cost of one Hessian-vector product of the training loss, by implementation (double backward,
torch.func transforms, linearisation reuse, ``TaskFunctions.hvp``, torch.compile). Run
``python -m benchmarks.hvp --help``; docs/benchmarks.md explains the variants.

* :mod:`.problem`: the models and data; :mod:`.variants`: the implementations and their check;
  :mod:`.measure`: the in-process timing; :mod:`.children`: compile and crash-prone probes in
  child processes; :mod:`.report`: the tables; ``__main__``: the options and the run.
"""
