"""``python -m lit_moe_rl.cli``: the ``lit-moe-rl`` console script."""

from lit_moe_rl.cli.app import main

main()
