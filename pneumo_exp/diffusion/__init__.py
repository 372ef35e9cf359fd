"""The generative-augmentation stage: Stable Diffusion LoRA fine-tuning on the training split and class-conditioned
synthesis up to an augmentation target (the quality report is in `pneumo_exp.evaluation`).

stable_diffusion.py  where the base model comes from (hub id, folder, or the random-init `tiny` preset), loading,
                     LoRA files, sampling
train.py             train_diffusion_lora: the latent noise-prediction loss of diffusers' train_text_to_image_lora.py
generate.py          synthetic_counts (augmentation strategies), generate_synthetic (PNGs + manifest) and the
                     count-matched repeats of real images (augmentation.source=duplicate_real)
bank.py              the synthetic image bank: drawn once per generator, settings and seed, shared by the arms
bases.py             which base a run draws from: one per training split for the bases pretrained here
pretrain.py          task=pretrain_diffusion: a small base from scratch on the training split
settings.py          the training and generation settings (`diffusion_lora.training`, `diffusion_lora.generation`)
"""
