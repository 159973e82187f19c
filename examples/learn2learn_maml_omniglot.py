"""learn2learn's MAML example on Omniglot (``examples/vision/maml_omniglot.py`` of
learnables/learn2learn 0.2.0), written as its users run it; the baseline of
``port_learn2learn_maml_omniglot.py``.

What is learn2learn's: ``OmniglotFC`` (784-256-128-64-64, BatchNorm, then Linear), the
``l2l.algorithms.MAML`` wrapper (second order, ``fast_lr=0.5``, 1 adaptation step), Adam on
``maml.parameters()``, the ``fast_adapt`` split (even samples adapt, odd ones evaluate), a
validation task beside each training task, gradients averaged over the meta-batch, and the meta-
test at the end.

What differs: ``learn2learn`` comes from ``l2l_omniglot_shim`` (its pure-Python MAML and models
from the source package, and our Omniglot behind ``get_tasksets``: learn2learn 0.2.0 does not
install on Python 3.11); the budget is set on the command line, the device is the CPU, one line
is printed per iteration, and the log (train and validation accuracy per iteration, the
meta-test) goes to JSON (``--log``) with the peak memory.

    AMAML_DATA_ROOT=../shared/data OMP_NUM_THREADS=1 .venv-peers/bin/python \\
        examples/learn2learn_maml_omniglot.py --num_iterations 300 --log l2l.json
"""

import argparse
import random

import numpy as np
import torch

import l2l_omniglot_shim  # noqa: F401  (learn2learn's pure-Python parts, our Omniglot)
import learn2learn as l2l

from torch import nn, optim

from omniglot_nshot import dump, reset_peak_memory


def accuracy(predictions, targets):
    predictions = predictions.argmax(dim=1).view(targets.shape)
    return (predictions == targets).sum().float() / targets.size(0)


def fast_adapt(batch, learner, loss, adaptation_steps, shots, ways, device):
    data, labels = batch
    data, labels = data.to(device), labels.to(device)

    # Separate data into adaptation/evaluation sets
    adaptation_indices = np.zeros(data.size(0), dtype=bool)
    adaptation_indices[np.arange(shots * ways) * 2] = True
    evaluation_indices = torch.from_numpy(~adaptation_indices)
    adaptation_indices = torch.from_numpy(adaptation_indices)
    adaptation_data, adaptation_labels = data[adaptation_indices], labels[adaptation_indices]
    evaluation_data, evaluation_labels = data[evaluation_indices], labels[evaluation_indices]

    # Adapt the model
    for step in range(adaptation_steps):
        train_error = loss(learner(adaptation_data), adaptation_labels)
        learner.adapt(train_error)

    # Evaluate the adapted model
    predictions = learner(evaluation_data)
    valid_error = loss(predictions, evaluation_labels)
    valid_accuracy = accuracy(predictions, evaluation_labels)
    return valid_error, valid_accuracy


def main(ways=5, shots=1, meta_lr=0.003, fast_lr=0.5, meta_batch_size=32, adaptation_steps=1,
         num_iterations=60000, seed=42, log_path=None, label=None):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    device = torch.device('cpu')

    # Load train/validation/test tasksets using the benchmark interface
    tasksets = l2l.vision.benchmarks.get_tasksets('omniglot', train_ways=ways, train_samples=2 * shots,
                                                  test_ways=ways, test_samples=2 * shots, num_tasks=20000,
                                                  root='~/data')

    # Create model
    model = l2l.vision.models.OmniglotFC(28 ** 2, ways)
    model.to(device)
    maml = l2l.algorithms.MAML(model, lr=fast_lr, first_order=False)
    opt = optim.Adam(maml.parameters(), meta_lr)
    loss = nn.CrossEntropyLoss(reduction='mean')

    log = []
    reset_peak_memory()
    for iteration in range(num_iterations):
        opt.zero_grad()
        meta_train_error = 0.0
        meta_train_accuracy = 0.0
        meta_valid_error = 0.0
        meta_valid_accuracy = 0.0
        for task in range(meta_batch_size):
            # Compute meta-training loss
            learner = maml.clone()
            batch = tasksets.train.sample()
            evaluation_error, evaluation_accuracy = fast_adapt(batch, learner, loss, adaptation_steps, shots, ways,
                                                               device)
            evaluation_error.backward()
            meta_train_error += evaluation_error.item()
            meta_train_accuracy += evaluation_accuracy.item()

            # Compute meta-validation loss
            learner = maml.clone()
            batch = tasksets.validation.sample()
            evaluation_error, evaluation_accuracy = fast_adapt(batch, learner, loss, adaptation_steps, shots, ways,
                                                               device)
            meta_valid_error += evaluation_error.item()
            meta_valid_accuracy += evaluation_accuracy.item()

        # Print some metrics
        m = meta_batch_size
        print(f'Iteration {iteration} | Meta Train Error {meta_train_error / m:.4f} Accuracy '
              f'{meta_train_accuracy / m:.4f} | Meta Valid Error {meta_valid_error / m:.4f} Accuracy '
              f'{meta_valid_accuracy / m:.4f}')
        log.append({'step': iteration + 1, 'mode': 'train', 'loss': meta_train_error / m,
                    'acc': 100 * meta_train_accuracy / m})
        log.append({'step': iteration + 1, 'mode': 'valid', 'loss': meta_valid_error / m,
                    'acc': 100 * meta_valid_accuracy / m})

        # Average the accumulated gradients and optimize
        for p in maml.parameters():
            p.grad.data.mul_(1.0 / meta_batch_size)
        opt.step()
        if (iteration + 1) % 50 == 0:
            dump(log, log_path, label=label or __file__.rsplit('/', 1)[-1], torch=torch.__version__)

    meta_test_error = 0.0
    meta_test_accuracy = 0.0
    for task in range(meta_batch_size):
        # Compute meta-testing loss
        learner = maml.clone()
        batch = tasksets.test.sample()
        evaluation_error, evaluation_accuracy = fast_adapt(batch, learner, loss, adaptation_steps, shots, ways,
                                                           device)
        meta_test_error += evaluation_error.item()
        meta_test_accuracy += evaluation_accuracy.item()
    print('Meta Test Error', meta_test_error / meta_batch_size)
    print('Meta Test Accuracy', meta_test_accuracy / meta_batch_size)
    log.append({'step': num_iterations, 'mode': 'test', 'loss': meta_test_error / meta_batch_size,
                'acc': 100 * meta_test_accuracy / meta_batch_size})
    dump(log, log_path, label=label or __file__.rsplit('/', 1)[-1], torch=torch.__version__)
    return maml, log


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--num_iterations', type=int, default=300)
    ap.add_argument('--meta_batch_size', type=int, default=32)
    ap.add_argument('--seed', type=int, default=42)
    ap.add_argument('--log', default=None)
    ap.add_argument('--label', default=None)
    a = ap.parse_args()
    main(meta_batch_size=a.meta_batch_size, num_iterations=a.num_iterations, seed=a.seed, log_path=a.log,
         label=a.label)
