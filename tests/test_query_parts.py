"""DotProductScorer.query on CPU encodes a batch in parts of at most CPU_QUERY_POSITIONS
positions (pretraining.scoring): the same states and metrics as one forward over the batch.

Each user's states depend on that user's inputs alone, so the parts give the same numbers;
the matrix products may be blocked differently for fewer rows, hence torch.testing's
float32 tolerance rather than bitwise equality (bitwise on the machine this was written
on), and ranks, which only compare scores, exactly equal."""

import pytest
import torch

import peftrec.pretraining.scoring as scoring
from peftrec.pretraining import RecommenderConfig, SequentialRecommender
from peftrec.pretraining.evaluation import chunked_target_ranks

NUM_ITEMS, LENGTH, USERS = 50, 10, 13
BACKBONE = {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "ffn_size": 32,
            "max_len": LENGTH, "dropout": 0.1}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return SequentialRecommender(RecommenderConfig(
        num_items=NUM_ITEMS, backbone_config=BACKBONE, repeat_bias=True)).eval()


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, NUM_ITEMS + 1, (USERS, LENGTH), generator=generator)
    input_ids[::3, :4] = 0  # left padding
    return {"input_ids": input_ids,
            "target_ids": torch.randint(1, NUM_ITEMS + 1, (USERS,), generator=generator)}


def test_query_encodes_a_cpu_batch_in_parts_with_the_whole_batchs_numbers(
        model, batch, monkeypatch):
    with torch.no_grad():
        whole = model.encode(batch["input_ids"])[:, -1]
        whole_ranks = chunked_target_ranks(model, model.query(batch), batch["target_ids"], 7)
    # 4 users a part: 13 users make three whole parts and a partial one.
    monkeypatch.setattr(scoring, "CPU_QUERY_POSITIONS", 4 * LENGTH)
    encoded_rows = []
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda ids: encoded_rows.append(len(ids)) or encode(ids))
    with torch.no_grad():
        query = model.query(batch)
        ranks = chunked_target_ranks(model, query, batch["target_ids"], 7)
    assert encoded_rows[:4] == [4, 4, 4, 1]
    torch.testing.assert_close(query.state, whole)
    assert torch.equal(query.input_ids, batch["input_ids"])
    assert torch.equal(ranks, whole_ranks)
