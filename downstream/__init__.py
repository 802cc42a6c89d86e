"""Fine-tuning a pretrained recommender on a target domain.

Planned (see README, "What exists today"): load a pretrained run, rebuild the item
side for the target catalog, inject adapters, fine-tune with `pretraining.Trainer`.
"""
