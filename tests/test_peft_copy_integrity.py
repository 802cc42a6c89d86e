"""The peft copy of a content encoder's LoRA (`best_model/peft/...`) is part of the adapter
checkpoint's checksums: loading the checkpoint refuses it damaged, naming the file."""

import pytest
import torch

from peftrec.adapters import LoRAConfig, get_adapted_model
from peftrec.adapters.checkpoint import AdapterCheckpointError, read_adapter_config
from peftrec.dataset_tools.integrity import recorded_checksums
from peftrec.downstream.transfer import save_target_model
from peftrec.modality_encoders import resolve_item_encoder_config
from peftrec.pretraining import RecommenderConfig, SequentialRecommender
from tests.helpers import TEXTS, save_bert, text_content

PEFT_WEIGHTS = "peft/item_encoder.encoder.model/adapter_model.safetensors"


def test_a_damaged_peft_copy_is_refused_by_name(tmp_path):
    encoder = save_bert(tmp_path / "bert")
    content = text_content(tmp_path, TEXTS)
    config = RecommenderConfig(
        num_items=len(TEXTS),
        backbone_config={"hidden_size": 8, "num_heads": 2, "ffn_size": 16, "max_len": 4},
        item_encoder="text",
        item_encoder_config=resolve_item_encoder_config(
            "text", {"encoder": str(encoder), "template": "{title}", "freeze": False}))
    torch.manual_seed(0)
    model = SequentialRecommender(config, content=content)
    lora = LoRAConfig(rank=2, adapt="item_encoder", layers="top:1", target_modules="query")
    get_adapted_model(model, lora)
    checkpoint = tmp_path / "best_model"
    save_target_model(model, checkpoint, lora, tmp_path / "base", "fingerprint")

    assert PEFT_WEIGHTS in recorded_checksums(checkpoint)
    read_adapter_config(checkpoint)  # whole: loads
    damaged = checkpoint / PEFT_WEIGHTS
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    with pytest.raises(AdapterCheckpointError, match=f"{damaged} is truncated or altered"):
        read_adapter_config(checkpoint)
