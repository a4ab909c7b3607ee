"""From benchmark files to batches: `sources` (readers into one `Example` record), `splits` (seeded, disjoint
train / eval / calibration slices), `formats` (prompt / answer rendering, tokenisation with answer-only labels,
collation) and `tasks` (task and data settings, encoded features, calibration batches, the mixture sampler).
"""
