"""`publish.py`: upload a run folder to the Hugging Face Hub with a model card (a stage-2 run with its tokenizer).

    python publish.py --run runs/maskgit --repo you/maskgit-shapes
    python publish.py --run runs/maskgit --repo you/maskgit-shapes --dry-run runs/upload   # write, do not upload
"""

import argparse
from pathlib import Path

from .cli import fail
from .hub import HubError, publish, stage_for_upload
from .runs import RunFolderError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="publish.py", description="Upload a run folder to the Hugging Face Hub with a "
                                "model card; sample.py --checkpoint and train_maskgit.py --vq then take the repo id.")
    p.add_argument("--run", required=True, type=Path, help="run folder written by train_vq.py or train_maskgit.py")
    p.add_argument("--repo", required=True, help="Hub repository id, owner/name (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", help="branch to commit to (default: main)")
    p.add_argument("--dry-run", type=Path, metavar="DIR", help="write what would be uploaded into DIR and stop")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        if args.dry_run:
            staged = stage_for_upload(args.run, args.dry_run, args.repo)
            print(f"wrote the upload for {args.repo} to {staged} (nothing uploaded)")
            return
        url = publish(args.run, args.repo, private=args.private, revision=args.revision)
        print(f"published {args.run} as {args.repo}: {url}")
    except (HubError, RunFolderError) as err:
        fail(str(err))
