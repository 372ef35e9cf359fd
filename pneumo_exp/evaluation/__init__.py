"""Evaluation across stages: the `quality` stage, which judges the diffusion stage's synthetic images in the feature
space of the classifier the classify stage trained (so it may import both).

quality.py        per-class FID / KID in a caller-given feature space and nearest-real-neighbour distances
quality_stage.py  the stage: quality.json, synthetic_vs_real.png and the classification accuracy score
generator_study.py  task=generator_study: generators judged by a classifier trained on real images only
fidelity.py       precision / recall / density / coverage, the classifier two-sample test, FID and KID at matched sizes
filtering.py      the synthesize stage with a filter: bank images kept where a real-data judge agrees with the prompt
"""
