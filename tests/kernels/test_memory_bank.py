import math

import torch
import torch.nn.functional as F

from kernels.memory_bank import (
    average_across_ranks,
    gather_rows,
    init_memory_bank,
    sample_negatives,
    update_memory_bank,
    write_embedding_memory,
)


def reference_update(bank, indices, embeddings, momentum):
    """NPID's proximal update written as a float64 loop over the batch."""
    bank = bank.double().clone()
    for i, row in enumerate(indices.tolist()):
        v = momentum * bank[row] + (1 - momentum) * embeddings[i].double()
        bank[row] = v / math.sqrt(sum(float(t) ** 2 for t in v))
    return bank


def test_init_is_unit_norm_uniform_and_reproducible():
    bank = init_memory_bank(5000, 16, generator=torch.Generator().manual_seed(0), device="cpu")
    assert bank.shape == (5000, 16) and bank.dtype == torch.float32
    torch.testing.assert_close(bank.norm(dim=1), torch.ones(5000))
    again = init_memory_bank(5000, 16, generator=torch.Generator().manual_seed(0), device="cpu")
    assert torch.equal(bank, again)
    # Normalised uniform draws: every coordinate symmetric around 0, none beyond 1.
    assert bank.mean(dim=0).abs().max() < 0.02
    half = init_memory_bank(10, 16, generator=torch.Generator().manual_seed(0), device="cpu", dtype=torch.float16)
    assert half.dtype == torch.float16


def test_update_touches_only_the_batch_rows_and_keeps_unit_norm():
    generator = torch.Generator().manual_seed(1)
    bank = init_memory_bank(100, 8, generator=generator, device="cpu")
    before = bank.clone()
    indices = torch.tensor([3, 97, 42, 0])
    embeddings = torch.randn(4, 8, generator=generator)
    returned = update_memory_bank(bank, indices, embeddings, momentum=0.5)
    assert returned is bank  # in place
    untouched = torch.ones(100, dtype=torch.bool)
    untouched[indices] = False
    assert torch.equal(bank[untouched], before[untouched])
    assert not torch.allclose(bank[indices], before[indices])
    torch.testing.assert_close(bank.norm(dim=1), torch.ones(100))


def test_update_matches_float64_loop_reference():
    generator = torch.Generator().manual_seed(2)
    bank = init_memory_bank(50, 6, generator=generator, device="cpu", dtype=torch.float64)
    indices = torch.randperm(50, generator=generator)[:10]
    embeddings = torch.randn(10, 6, generator=generator).to(torch.bfloat16)  # autocast output
    expected = reference_update(bank, indices, embeddings, momentum=0.9)
    update_memory_bank(bank, indices, embeddings, momentum=0.9)
    torch.testing.assert_close(bank, expected, atol=1e-12, rtol=1e-12)


def test_negatives_in_range_shape_and_reproducible():
    negatives = sample_negatives(37, 8, 500, generator=torch.Generator().manual_seed(3), device="cpu")
    assert negatives.shape == (8, 500) and negatives.dtype == torch.int64
    assert negatives.min() >= 0 and negatives.max() < 37
    assert len(negatives.unique()) == 37  # 4,000 uniform draws reach every index
    again = sample_negatives(37, 8, 500, generator=torch.Generator().manual_seed(3), device="cpu")
    assert torch.equal(negatives, again)


def test_gather_rows_is_the_indexed_read():
    bank = torch.arange(30.0).view(10, 3)
    index = torch.tensor([[1, 2, 9], [0, 0, 5]])
    rows = gather_rows(bank, index)
    assert rows.shape == (2, 3, 3)
    assert torch.equal(rows[1, 2], bank[5]) and torch.equal(rows[0, 2], bank[9])


def test_average_across_ranks_is_identity_on_one_process():
    bank = torch.randn(4, 3)
    assert torch.equal(average_across_ranks(bank.clone()), bank)


def test_write_embedding_memory_writes_the_batch_positions_of_every_crop():
    memory = torch.zeros(2, 6, 4)
    embeddings = F.normalize(torch.randn(2, 3, 4), dim=2).half()
    positions = torch.tensor([4, 1, 2])
    write_embedding_memory(memory, positions, embeddings)
    torch.testing.assert_close(memory[:, positions], embeddings.float())
    assert torch.equal(memory[:, [0, 3, 5]], torch.zeros(2, 3, 4))
