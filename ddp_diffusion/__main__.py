"""`python -m ddp_diffusion` is the same as the `ddp-diffusion` command."""

from ddp_diffusion.cli import main

raise SystemExit(main())
