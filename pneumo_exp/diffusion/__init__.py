"""The generative-augmentation stage: Stable Diffusion LoRA fine-tuning on the training split, class-conditioned
synthesis up to an augmentation target, and a quality report.

pipeline.py  where the base model comes from (hub id, folder, or the random-init `tiny` preset), loading, sampling
train.py     train_diffusion_lora: the latent noise-prediction loss of diffusers' train_text_to_image_lora.py
generate.py  synthetic_counts (augmentation strategies) and generate_synthetic (PNGs + manifest under synthetic/)
quality.py   per-class FID / KID in a caller-given feature space and nearest-real-neighbour distances
settings.py  the training and generation settings (`diffusion_lora.training`, `diffusion_lora.generation`)
"""
