"""The generative-augmentation stage: Stable Diffusion LoRA fine-tuning on the training split and class-conditioned
synthesis up to an augmentation target (the quality report is in `pneumo_exp.evaluation`).

stable_diffusion.py  where the base model comes from (hub id, folder, or the random-init `tiny` preset), loading,
                     LoRA files, sampling
train.py             train_diffusion_lora: the latent noise-prediction loss of diffusers' train_text_to_image_lora.py
generate.py          synthetic_counts (augmentation strategies) and generate_synthetic (PNGs + manifest)
settings.py          the training and generation settings (`diffusion_lora.training`, `diffusion_lora.generation`)
"""
