"""Non-meta reference predictors for the rating tasks, to calibrate the nRMSE numbers.

For each held-out test user of a setting (the test pool of ``amaml-ext compare``: the same users,
support ratings and query = all remaining ratings), three predictors that need no training:

* ``zero``: predict 0 (the middle of the scaled range);
* ``item mean``: the item's mean scaled rating over the meta-training users (all their ratings);
* ``item mean + user offset``: the item mean plus the mean residual of the user's support
  ratings (a baseline-predictor collaborative filter using only the k support ratings).

Printed per predictor: our nRMSE (``||pred - y|| / ||y||`` per task, mean over the tasks), the
RMSE in the dataset's own rating units, and the RMSE divided by the standard deviation of all
kept ratings (the "normalised RMSE" of the authors' public code for the synthetic tasks, which
standardises the targets). Run:

    AMAML_DATA_ROOT=../shared/data python -m benchmarks.rating_references \\
        --task movielens-100k jester --setting 10shot-15val 20shot-30val
"""

import argparse
import json

import torch

from amaml_ext.data.ratings import RATING_DATASETS, make_rating_dataset


def references(ds, setting: str, seed: int = 0):
    train, test = ds.pools(setting, seed=seed)
    rows = torch.searchsorted(ds.users, train.users)
    targets, rated = ds._targets[rows], ds._rated[rows]
    item_mean = torch.where(rated, targets, 0.0).sum(0) / rated.sum(0).clamp_min(1)      # [items]
    all_kept = ds._targets[ds._rated]
    sd = float(all_kept.std())
    m = test.query_mask.to(torch.float64)
    y = test.query_y.squeeze(2)
    base = item_mean[test.query_items]
    offset = (test.support_y.squeeze(2) - item_mean[test.support_items]).mean(1, keepdim=True)
    preds = {"zero": torch.zeros_like(y), "item mean": base, "item mean + user offset": base + offset}
    out = {}
    for name, p in preds.items():
        se = ((p - y) ** 2) * m
        nrmse = (se.sum(1).sqrt() / ((y ** 2) * m).sum(1).sqrt()).mean()
        rmse_scaled = float((se.sum() / m.sum()).sqrt())
        # scaled units -> rating units: (unscale(a) - unscale(b)) is linear in a - b
        unit = float(ds.unscale(torch.tensor(1.0)) - ds.unscale(torch.tensor(0.0)))
        out[name] = {"nrmse": float(nrmse), "rmse_rating_units": rmse_scaled * unit,
                     "rmse_over_sd": rmse_scaled / sd}
    return out, {"test_users": len(test), "query_ratings": int(m.sum()), "sd_scaled": sd}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.rating_references", description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", nargs="+", default=["movielens-100k", "jester"], choices=sorted(RATING_DATASETS))
    ap.add_argument("--setting", nargs="+", default=["10shot-15val", "20shot-30val"])
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    allout = {}
    print("| data | setting | predictor | nRMSE (ours) | RMSE (rating units) | RMSE / sd |")
    print("|---|---|---|---|---|---|")
    for task in args.task:
        ds = make_rating_dataset(task, args.data_root)
        for setting in args.setting:
            res, info = references(ds, setting)
            allout[f"{task} {setting}"] = {"info": info, "predictors": res}
            for name, r in res.items():
                print(f"| {task} | {setting} | {name} | {r['nrmse']:.3f} | {r['rmse_rating_units']:.3f} "
                      f"| {r['rmse_over_sd']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(allout, f, indent=1)


if __name__ == "__main__":
    main()
