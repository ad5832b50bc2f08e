"""Write a dataset split at training resolution as reference images for FID.

    python export_dataset.py --data cifar10 --split train --image-size 32 --out refs/cifar10-train

gives refs/cifar10-train/images/000000.png ... (lossless, one flat folder) and refs/cifar10-train/data.npz with
`arr_0` uint8 (n, h, w, 3) and, for labelled data, `labels` (n,). The work is done by `core.export_cli`.
"""

from core.export_cli import main

if __name__ == "__main__":
    main()
