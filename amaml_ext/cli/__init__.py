"""The ``amaml-ext`` command (also ``python -m amaml_ext``).

    amaml-ext train --task cosmixture --method amaml --meta-steps 500 --seed 0 --out runs/amaml
    amaml-ext train ... --out runs/amaml --resume        # continue from the last checkpoint
    amaml-ext evaluate --run runs/amaml                   # meta-test curves -> eval.json, eval.png
    amaml-ext compare --task cosmixture --methods amaml,maml,maml1,fomaml,reptile,imaml \\
        --meta-steps 500 --out runs/compare               # train all, plot and table

``train`` writes the learned initialisation (a flat tensor) to ``OUT/theta.pt`` and its
checkpoints, metrics and settings under ``OUT`` (:func:`amaml_ext.train.meta_train`).
``compare`` trains every method from the same initial theta on the same tasks into
``OUT/<method>`` (continuing any run left unfinished there), meta-tests each on the same new
test tasks and writes ``OUT/compare.png``, ``OUT/compare.md`` and ``OUT/compare.json``.
Every option is checked before anything is written (the learners built, ``$AMAML_EXT_COMPILE``,
the first meta-step of a fresh run at the initial theta); a refusal is one line on stderr with
exit status 2 (a run that fails on the way: 1). A run directory is locked while a command uses
it (a second process is refused, named), and its stale temporary files are removed then.
Defaults follow the paper (Sec. 5.1): 50shot-50val, 100 training and 100 test tasks, inner
GD step 0.01, A-MAML T = 2 (200 steps; the others 200 GD steps, MAML 20), iMAML lambda = 1
with 5 CG steps, Adam lr 1e-3, meta-batch 5.
"""

from .main import build_parser, main

__all__ = ["main", "build_parser"]
