"""Upload a run folder to the Hugging Face Hub with a model card.

    python publish.py --run runs/maskgit --repo you/maskgit-shapes

`python publish.py --help` lists every option; the work is done by `core.publish_cli.main`.
"""

from core.publish_cli import main

if __name__ == "__main__":
    main()
