"""Stage 2: train the masked token transformer on the code grids of a trained tokenizer.

    python train_maskgit.py --vq runs/vq --preset tiny --out runs/maskgit
    python train_maskgit.py --vq runs/vq --critic self --class-cond --out runs/maskgit-critic
    accelerate launch --multi_gpu --num_processes 2 train_maskgit.py --vq runs/vq --preset cifar10 --out runs/mg
    python train_maskgit.py --out runs/maskgit --resume      # continue an interrupted run

`python train_maskgit.py --help` lists every option; the loop itself is `maskgit.train.main`.
"""

from maskgit.train import run_cli

if __name__ == "__main__":
    run_cli()
