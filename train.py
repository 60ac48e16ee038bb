"""Train an SAE: `python train.py --config configs/X.yaml [--set a.b=value ...]` (`sae-jax train`).

Rerunning the same command resumes from the newest checkpoint in run.out_dir.
"""

import sys

from sae_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], prog="train.py"))
