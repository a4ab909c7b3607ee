"""The one training loop (`train`: task loss + the method's regulariser, accumulation, clipping, schedule, DDP) and its
exact-resume checkpoints (`checkpoints`)."""
