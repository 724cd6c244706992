"""Write a data set in fct's array format or as WebDataset shards: `python prepare_dataset.py cifar100`,
`python prepare_dataset.py npz --source DIR --out DIR --format webdataset --shard-size 1000`.

See fct/data/prepare.py (and --help) for the formats it reads and writes.
"""

import sys

from fct.data.prepare import main
from fct.errors import UserError

if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
