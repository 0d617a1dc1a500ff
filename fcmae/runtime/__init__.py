"""The runtime both stages share: errors and exit codes, options, the CLI runner, logging, distributed set-up,
atomic files, checkpoints and where a run starts, the optimiser step and the training loop."""
