"""Sample images from a trained stage-2 run: a PNG folder and an npz for FID, a preview grid, and every setting.

    python sample.py --checkpoint runs/maskgit --out samples/mg --num 50000 --cfg 1.0
    accelerate launch --multi_gpu --num_processes 8 sample.py --checkpoint runs/maskgit --out samples/mg --num 50000
    python sample.py --checkpoint runs/maskgit --out samples/edit --num 16 --init-image x.png --mask-box 8,8,24,24

`python sample.py --help` lists every option; the work is done by `maskgit.sample_cli.main`.
"""

from maskgit.sample_cli import main

if __name__ == "__main__":
    main()
