"""jumprelu on configs/realistic.yaml: the test's run with overrides, over seeds; one line of scores per seed.

python bench/jumprelu_search.py LABEL [--seeds 0,1] [--devices 4] [key=value ...]
Seeds set train.seed and data.seed; 4 fake CPU devices by default, as tests/test_arch_recovery.py runs. Each line
is also appended to /tmp/jumprelu_search.log; bench/results/jumprelu-search.md is the search it ran (issue 13).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax

p = argparse.ArgumentParser()
p.add_argument("label")
p.add_argument("sets", nargs="*")
p.add_argument("--seeds", default="0,1")
p.add_argument("--devices", type=int, default=4)
a = p.parse_args()
jax.config.update("jax_num_cpu_devices", a.devices)
jax.config.update("jax_platforms", "cpu")

from sae_jax.config import load_config  # noqa: E402
from sae_jax.run import train  # noqa: E402

REALISTIC = Path(__file__).resolve().parents[1] / "configs" / "realistic.yaml"
for seed in [int(s) for s in a.seeds.split(",")]:
    with tempfile.TemporaryDirectory() as d:
        t0 = time.time()
        sets = ["sae.architecture=jumprelu", *a.sets, f"train.seed={seed}", f"data.seed={seed}", f"run.out_dir={d}"]
        train(load_config(REALISTIC, sets), progress=False)
        ev = json.loads((Path(d) / "eval.json").read_text())
        g = ev["ground_truth"]
        vals = {
            "rec": g["recovered"],
            "mcc": g["mcc"],
            "l0": ev["l0"],
            "fvu": 1 - ev["explained_variance"],
            "dead": g["dead_fraction"],
            "shrink": g["shrinkage"],
        }
        line = f"{a.label}\tseed {seed}\t" + "\t".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in vals.items()
        )
        line += f"\t{time.time() - t0:.0f}s\t{' '.join(a.sets)}"
        print(line, flush=True)
        with open("/tmp/jumprelu_search.log", "a") as f:
            f.write(line + "\n")
