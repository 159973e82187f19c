"""higher's MAML example on Omniglot (``examples/maml-omniglot.py`` of facebookresearch/higher),
written as its users run it, on amaml_ext's Omniglot loader; the baseline of
``port_higher_maml_omniglot.py``, which differs from this file in 5 lines.

What is higher's: the net (three blocks of Conv 3x3 with 64 channels, BatchNorm with
``momentum=1``, ReLU and 2x2 max-pooling, then Flatten and Linear), Adam on the initial weights,
SGD inner loops through ``higher.innerloop_ctx(..., copy_initial_weights=False)`` (``lr=0.1``,
5 steps), the net in train mode also at test time (batch statistics), the query losses
backpropagated task by task, and the printed and logged per-step train and per-epoch test
accuracies.

What differs: the tasks come from :class:`omniglot_nshot.OmniglotNShot` over
``amaml_ext.data.images.Omniglot`` (seeded episodes, a fixed test set); the inner loop is one
function, :func:`adapt`, for train and test (higher's file repeats it and leaves a TODO to pull
it out); the budget (epochs, batches per epoch, meta-batch, 1-shot by default) is set on the
command line, the device is the CPU, and the log goes to JSON (``--log``) with the peak memory
instead of higher's pandas plot.

    AMAML_DATA_ROOT=../shared/data OMP_NUM_THREADS=1 .venv-peers/bin/python \\
        examples/higher_maml_omniglot.py --epochs 10 --train_iter 30 --log higher.json
"""

import argparse
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
import torch.optim as optim

import higher

import amaml_ext
from omniglot_nshot import OmniglotNShot, dump, reset_peak_memory


def main(argv=None):
    argparser = argparse.ArgumentParser()
    argparser.add_argument('--n_way', type=int, help='n way', default=5)
    argparser.add_argument('--k_spt', type=int, help='k shot for support set', default=1)
    argparser.add_argument('--k_qry', type=int, help='k shot for query set', default=15)
    argparser.add_argument('--task_num', type=int, help='meta batch size, namely task num', default=4)
    argparser.add_argument('--seed', type=int, help='random seed', default=1)
    argparser.add_argument('--epochs', type=int, default=10)
    argparser.add_argument('--train_iter', type=int, help='meta-steps per epoch', default=30)
    argparser.add_argument('--test_iter', type=int, help='test batches (the same each epoch)', default=4)
    argparser.add_argument('--n_inner_iter', type=int, default=5)
    argparser.add_argument('--inner_lr', type=float, default=1e-1)
    argparser.add_argument('--data_root', default=None, help='holds omniglot/ (default $AMAML_DATA_ROOT)')
    argparser.add_argument('--float64', action='store_true')
    argparser.add_argument('--log', default=None, help='JSON log')
    argparser.add_argument('--label', default=None, help='the run\'s name in the log (default: the script\'s)')
    args = argparser.parse_args(argv)

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    dtype = torch.float64 if args.float64 else torch.float32

    # Set up the Omniglot loader.
    device = torch.device('cpu')
    db = OmniglotNShot(amaml_ext.data.images.Omniglot(args.data_root), batchsz=args.task_num, n_way=args.n_way,
                       k_shot=args.k_spt, k_query=args.k_qry, device=device, seed=args.seed,
                       test_batches=args.test_iter, dtype=dtype)

    # A plain PyTorch net, adapted to each task by `adapt` below.
    net = make_net(args.n_way).to(device, dtype)

    # Adam meta-optimises the initial weights; SGD is the inner optimiser.
    meta_opt = optim.Adam(net.parameters(), lr=1e-3)
    inner_opt = torch.optim.SGD(net.parameters(), lr=args.inner_lr)

    log = []
    reset_peak_memory()
    for epoch in range(args.epochs):
        train(db, net, inner_opt, meta_opt, epoch, log, args)
        test(db, net, inner_opt, epoch, log, args)
        dump(log, args.log, label=args.label or __file__.rsplit('/', 1)[-1], args=vars(args), torch=torch.__version__)
    return net, log


def make_net(n_way):
    return nn.Sequential(
        nn.Conv2d(1, 64, 3),
        nn.BatchNorm2d(64, momentum=1, affine=True),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, 2),
        nn.Conv2d(64, 64, 3),
        nn.BatchNorm2d(64, momentum=1, affine=True),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, 2),
        nn.Conv2d(64, 64, 3),
        nn.BatchNorm2d(64, momentum=1, affine=True),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, 2),
        Flatten(),
        nn.Linear(64, n_way))


def adapt(net, inner_opt, x_spt, y_spt, n_inner_iter, track_higher_grads=True):
    """The net after ``n_inner_iter`` steps of ``inner_opt`` on the support set, its weights a
    function of ``net``'s: the query loss's gradient reaches them through the inner loop."""
    with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False, track_higher_grads=track_higher_grads) as (fnet, diffopt):
        for _ in range(n_inner_iter):
            diffopt.step(F.cross_entropy(fnet(x_spt), y_spt))
    return fnet


def train(db, net, inner_opt, meta_opt, epoch, log, args):
    net.train()
    n_train_iter = args.train_iter

    for batch_idx in range(n_train_iter):
        start_time, start_cpu = time.time(), time.process_time()
        # Sample a batch of support and query images and labels.
        x_spt, y_spt, x_qry, y_qry = db.next()
        task_num = x_spt.size(0)
        querysz = x_qry.size(1)

        qry_losses = []
        qry_accs = []
        meta_opt.zero_grad()
        for i in range(task_num):
            # Adapt the net to the support set, then score the adapted net on the query set.
            fnet = adapt(net, inner_opt, x_spt[i], y_spt[i], args.n_inner_iter)
            qry_logits = fnet(x_qry[i])
            qry_loss = F.cross_entropy(qry_logits, y_qry[i])
            qry_losses.append(qry_loss.detach())
            qry_accs.append((qry_logits.argmax(dim=1) == y_qry[i]).sum().item() / querysz)

            # The meta-gradient of this task's query loss, through the inner loop, into net's weights.
            qry_loss.backward()

        meta_opt.step()
        qry_losses = (sum(qry_losses) / task_num).item()
        qry_accs = 100. * sum(qry_accs) / task_num
        i = epoch + float(batch_idx) / n_train_iter
        iter_time = time.time() - start_time
        if batch_idx % 4 == 0:
            print(f'[Epoch {i:.2f}] Train Loss: {qry_losses:.2f} | Acc: {qry_accs:.2f} | Time: {iter_time:.2f}')

        log.append({
            'epoch': i,
            'step': epoch * n_train_iter + batch_idx + 1,
            'loss': qry_losses,
            'acc': qry_accs,
            'mode': 'train',
            'time': iter_time,
            'cpu': time.process_time() - start_cpu,
        })


def test(db, net, inner_opt, epoch, log, args):
    # As in higher's example: no fine-tuning stage, the net stays in train mode.
    net.train()
    n_test_iter = args.test_iter

    qry_losses = []
    qry_accs = []
    for batch_idx in range(n_test_iter):
        x_spt, y_spt, x_qry, y_qry = db.next('test')
        task_num = x_spt.size(0)

        for i in range(task_num):
            fnet = adapt(net, inner_opt, x_spt[i], y_spt[i], args.n_inner_iter, track_higher_grads=False)

            # The query loss and accuracy of the adapted net.
            qry_logits = fnet(x_qry[i]).detach()
            qry_loss = F.cross_entropy(qry_logits, y_qry[i], reduction='none')
            qry_losses.append(qry_loss.detach())
            qry_accs.append((qry_logits.argmax(dim=1) == y_qry[i]).detach())

    qry_losses = torch.cat(qry_losses).mean().item()
    qry_accs = 100. * torch.cat(qry_accs).float().mean().item()
    print(f'[Epoch {epoch + 1:.2f}] Test Loss: {qry_losses:.2f} | Acc: {qry_accs:.2f}')
    log.append({
        'epoch': epoch + 1,
        'step': (epoch + 1) * args.train_iter,
        'loss': qry_losses,
        'acc': qry_accs,
        'mode': 'test',
        'time': time.time(),
    })


class Flatten(nn.Module):
    def forward(self, input):
        return input.view(input.size(0), -1)


if __name__ == '__main__':
    main()
