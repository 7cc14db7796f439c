"""Summarise the `split` sweep (sweep.sh): per variant and --bn-stats mode, the first epoch of each seed.
Each step's summed loss is recovered from the running means that --log-every 0 prints after every step:
L_k = k * mean_k - (k - 1) * mean_(k-1). A run *diverged* if some step's loss exceeded 2 * (2 ln 10) = 9.21, twice
chance for the two-branch sum (2 ln 10 = 4.61, a uniform guess in each branch); the table also counts the runs whose
epoch-1 mean loss stayed above that chance level. Usage: python results/split-cpu/summarise.py runs/split > results/split-cpu/TABLE.md"""
import json
import math
import os
import re
import sys

root, chance = sys.argv[1], 2 * math.log(10)
runs = {}
for name in sorted(os.listdir(root)):
    m = re.fullmatch(r"(\w+)-(mixed|split|shared)-s(\d+)", name)
    log = os.path.join(root, name, "log.jsonl")
    if not m or not os.path.isfile(log):
        continue
    first = json.loads(open(log).readline())
    means = [float(x) for x in re.findall(r"step \d+/\d+  loss ([\d.e+-]+|nan|inf)", open(os.path.join(root, name + ".log")).read())]
    steps = [k * mk - (k - 1) * mp for k, (mk, mp) in enumerate(zip(means, [0.0] + means), start=1)]
    runs.setdefault((m[1], m[2]), []).append(dict(seed=int(m[3]), loss=first["train_loss"], branches=first["branch_loss"],
                                                   acc=first["test_acc"], max_step=max(steps, default=float("nan")),
                                                   steps=steps))
print("| variant | mode | seeds | diverged (a step > 9.21) | epoch-1 mean > 4.61 | epoch-1 loss, median [min, max] | "
      "clean / adversarial CE, median | worst step loss | test acc after epoch 1, median |")
print("|---|---|---|---|---|---|---|---|---|")
med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
for (variant, mode), rs in sorted(runs.items()):
    losses = [r["loss"] for r in rs]
    print(f"| {variant} | {mode} | {len(rs)} | {sum(r['max_step'] > 2 * chance for r in rs)} | "
          f"{sum(r['loss'] > chance for r in rs)} | {med(losses):.3f} [{min(losses):.3f}, {max(losses):.3f}] | "
          f"{med([r['branches'][0] for r in rs]):.3f} / {med([r['branches'][1] for r in rs]):.3f} | "
          f"{max(r['max_step'] for r in rs):.2f} (s{max(rs, key=lambda r: r['max_step'])['seed']}) | "
          f"{100 * med([r['acc'] for r in rs]):.1f} |")
