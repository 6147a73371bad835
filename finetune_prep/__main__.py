"""`python -m finetune_prep`: the CLI (finetune_prep.app.cli)."""

from finetune_prep.app.cli import main

if __name__ == "__main__":
    main()
