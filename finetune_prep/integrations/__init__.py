"""Where a plan meets a trainer: wrapper name mapping (DDP, compile, FSDP, AveragedModel),
the runtime check, schedulers and the Lightning callback. Integrations import the core, never
the reverse (paramfile only calls `wrappers`)."""
