"""Few-shot image classification task families of the paper (Sec. 5.4): Omniglot and Mini-ImageNet.

The paper follows the standard protocol of MAML / iMAML (Finn et al. 2017; Rajeswaran et al.
2019; Vinyals et al. 2016): Omniglot 20-way 1-shot and Mini-ImageNet 5-way 1-shot with the
:class:`~amaml_ext.models.Conv4` net. A dataset object decodes the images once into a uint8
tensor in memory and draws N-way K-shot tasks as a :class:`~amaml_ext.tasks.TaskBatch`:

    >>> om = Omniglot("/data")                       # or root=None: $AMAML_DATA_ROOT  # doctest: +SKIP
    >>> b = om.sample("train", n_tasks=16, ways=20, shots=1, query_shots=1, seed=0)  # doctest: +SKIP
    >>> b.support[0].shape, b.support[1].shape       # x [B, N*K, 1, 28, 28], y [B, N*K] int64  # doctest: +SKIP
    (torch.Size([16, 20, 1, 28, 28]), torch.Size([16, 20]))

Data layout (``root`` is the data root, default ``$AMAML_DATA_ROOT``; nothing is copied):

* ``root/omniglot/images_background`` and ``root/omniglot/images_evaluation``: each either the
  released zip (``images_background.zip``, members
  ``images_background/<Alphabet>/characterNN/XXXX_YY.png``) or the unpacked folder
  (``images_background/<Alphabet>/characterNN/XXXX_YY.png``). When both exist the zip is read.
* ``root/miniimagenet/{train,val,test}.csv`` (Ravi & Larochelle 2017, header ``filename,label``)
  and ``root/miniimagenet/images/`` holding ``<filename>`` (flat, as released) or
  ``<label>/<filename>``.

Preprocessing:

* Omniglot: each PNG (105x105, 1-bit) is converted to 8-bit greyscale and resized to
  ``image_size`` (28) with Pillow's Lanczos filter (``resample="lanczos"``: anti-aliased grey
  levels). Note that MAML's resize script calls ``resize(..., LANCZOS)`` on the 1-bit image, for
  which Pillow silently uses nearest-neighbour; ``resample="nearest"`` reproduces those binary
  images exactly. Pixels are floats in [0, 1], **inverted** as in MAML (``1 - v / 255``:
  strokes are 1, background 0); ``invert=False`` keeps the file's polarity (strokes 0).
* Classes are characters times rotations: each of ``rotations`` (default 0, 90, 180, 270 degrees,
  counter-clockwise, ``torch.rot90`` on the resized image) makes a new class (Santoro et al. 2016;
  Vinyals et al. 2016), so 1,623 characters give 6,492 classes. The split is by *character*: all
  rotations of a character are in the same split.
* Split ``class_split="shuffled"`` (default; MAML's): the 1,623 characters of both folders, in
  sorted order (background first, then evaluation; alphabet; character), are shuffled with
  ``random.Random(split_seed).shuffle`` (MAML calls ``random.seed(1); random.shuffle(...)``; its
  list comes from ``os.listdir`` so its exact order can't be reproduced); the first ``n_train``
  (1,200) characters are for meta-training (4,800 classes), the rest (423 characters, 1,692
  classes) for meta-test. ``n_val`` > 0 moves the last ``n_val`` of the ``n_train`` characters
  to a ``"val"`` split (MAML: ``n_val=100``). ``class_split="background"`` is Lake et al.'s
  split: ``images_background`` (964 characters, 30 alphabets) for training, ``images_evaluation``
  (659 characters, 20 alphabets) for test.
* Mini-ImageNet: images converted to RGB and resized to ``image_size`` x ``image_size`` (84)
  with Lanczos, like Ravi & Larochelle's script (the aspect ratio is not kept); floats in [0, 1],
  channels first. The three CSVs are the train/val/test class splits (64/16/20 classes, 600
  images each). A split's images are decoded the first time it is used (``preload=True``: at
  construction); the train split takes ~0.8 GB as uint8.

Sampling (:meth:`FewShotImages.sample`): for each task, ``ways`` distinct classes of the split
in a random order (the order is the labels: label ``i`` is the ``i``-th drawn class, so labels are
randomly permuted per task), and for each class ``shots + query_shots`` distinct images of its
``images_per_class``: the first ``shots`` go to the support set, the others to the query set.
The support is class-major: ``y = [0]*K + [1]*K + ...``. Everything is drawn on the CPU from a
``torch.Generator`` (``seed=`` or ``generator=``), so a seed gives the same tasks everywhere.

``cache_dir`` (optional, never inside the repository: the data terms forbid copies there) keeps the
decoded uint8 tensors in a ``.pt`` file keyed by the files' names, sizes and CRCs / mtimes and the
preprocessing settings; the next construction loads it instead of decoding again.
"""

from ..root import ENV_ROOT, data_root
from .episodes import EpisodePool
from .fewshot import FewShotImages, TaskIndex
from .miniimagenet import MiniImageNet
from .omniglot import Omniglot

__all__ = ["FewShotImages", "Omniglot", "MiniImageNet", "TaskIndex", "EpisodePool", "data_root", "ENV_ROOT"]
