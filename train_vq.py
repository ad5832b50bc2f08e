"""Stage 1: train the VQ-VAE tokenizer.

    python train_vq.py --data shapes --preset tiny --out runs/vq
    accelerate launch --multi_gpu --num_processes 2 train_vq.py --data cifar10 --preset cifar10 --out runs/vq
    python train_vq.py --out runs/vq --resume            # continue an interrupted run

`python train_vq.py --help` lists every option; the loop itself is `vqvae.train.main`.
"""

from vqvae.train import run_cli

if __name__ == "__main__":
    run_cli()
