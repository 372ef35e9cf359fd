"""The ground floor: mechanics every stage shares, importing nothing from the stages.

files.py       atomic file writes, folder swaps, build-once folders, sha256 of a file
history.py     `.jsonl` histories (metrics.jsonl, diffusion/metrics.jsonl): one writer, one reader
seeds.py       the random generators' state (save and restore) and every derived seed
presets.py     random-init model presets built once into the cache, and their character tokenizer
checkpoint.py  training-state files (loaded without unpickling code), the last-checkpoint lookup
training.py    the training skeleton both trainers share: accelerator, epoch plan, optimizer step and gradient norm,
               device-side means, progress, the non-finite-loss watch
"""
