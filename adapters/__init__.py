"""Parameter-efficient adapters (Houlsby, LoRA, prefix, diffusion-step).

Planned (see README, "What exists today"): one module per method registered by
name and applied by one call. Backbones already declare their adapter sites
(`pretraining.sasrec.SASRec.adapter_sites`).
"""
