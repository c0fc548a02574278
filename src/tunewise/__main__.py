"""`python -m tunewise` (what `torchrun -m tunewise train ...` runs on every process)."""

from tunewise.cli import main

main()
