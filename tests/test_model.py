"""The network: sizes, state-dict names, RoPE details, causality, KV cache vs full forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import random_model, tiny_config
from raster_reference import raster_layout

from scan_core.model.config import MODEL_PRESETS
from scan_core.model.kv_cache import KVCache
from scan_core.model.layers import rope_2d_table
from scan_core.model.network import SLOT_CLASS, SLOT_POSITION, Transformer
from scan_core.model.sequence import block_causal_mask, scan_layout

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_preset_parameter_counts_on_meta(name):
    config, expected = MODEL_PRESETS[name]
    with torch.device("meta"):
        model = Transformer(config)
    assert model.num_parameters() == expected
    assert all(p.is_meta for p in model.parameters())


def test_scan_l_state_dict_matches_upstream_names_and_shapes():
    expected = {}
    for line in (GOLDEN / "scan_L_state_dict.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split(" ", 1)
        expected[key] = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
    with torch.device("meta"):
        model = Transformer(MODEL_PRESETS["SCAN-L"][0])
    found = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert found == expected


def test_llamagen_and_randar_archs_drop_the_right_parameters():
    with torch.device("meta"):
        randar = Transformer(tiny_config(arch="randar"))
        llamagen = Transformer(tiny_config(arch="llamagen"))
    scan_keys = set(Transformer(tiny_config()).state_dict())
    assert scan_keys - set(randar.state_dict()) == {"dis_norm.weight", "dis_output.weight"}
    assert scan_keys - set(llamagen.state_dict()) == {
        "dis_norm.weight",
        "dis_output.weight",
        "pos_instruct_embeddings",
    }


def test_rope_table_uses_rows_then_columns():
    angles = rope_2d_table(grid_size=4, head_dim=16)  # 8 pairs: 4 row-pairs then 4 col-pairs
    freqs = 10000.0 ** (-torch.arange(4, dtype=torch.float64) * 2 / 8)
    cell = 2 * 4 + 3  # row 2, column 3
    torch.testing.assert_close(angles[cell, :4].double(), 2 * freqs, rtol=1e-6, atol=0)
    torch.testing.assert_close(angles[cell, 4:].double(), 3 * freqs, rtol=1e-6, atol=0)


def test_class_token_query_and_key_are_exactly_zero(tiny_model):
    seen = {}

    def grab(module, inputs, output):
        seen["qkv"] = output

    tiny_model.layers[0].attention.wqkv.register_forward_hook(grab)
    layout = _random_layout(tiny_model.config, batch=1, seed=1)
    tiny_model(layout.kinds, layout.values, layout.cells, layout.mask())
    # Rotation happens after wqkv, so check the rotated vectors through a direct call instead.
    from scan_core.model.layers import apply_rope, rope_cos_sin

    cos, sin = rope_cos_sin(tiny_model.rope_angles(), layout.cells)
    q = seen["qkv"][..., : tiny_model.config.dim].view(1, -1, 4, 16)
    rotated = apply_rope(q, cos, sin)
    assert torch.count_nonzero(rotated[0, 0]) == 0
    assert torch.count_nonzero(rotated[0, 1:]) > 0


def test_position_instruction_embedding_is_rotated_per_cell(tiny_model):
    kinds = torch.tensor([[SLOT_POSITION, SLOT_POSITION]])
    cos, sin = (torch.ones(1, 2, 8), torch.zeros(1, 2, 8))
    from scan_core.model.layers import rope_cos_sin

    cos, sin = rope_cos_sin(tiny_model.rope_angles(), torch.tensor([[0, 5]]))
    out = tiny_model.embed(kinds, torch.zeros(1, 2, dtype=torch.long), None, cos, sin)
    base = tiny_model.pos_instruct_embeddings[0]
    torch.testing.assert_close(out[0, 0], base)  # cell 0 has angle 0: no rotation
    assert not torch.allclose(out[0, 1], base)
    torch.testing.assert_close(out[0, 1].norm(), base.norm())  # a rotation keeps the length


def _random_layout(config, batch, seed, set_sizes=None):
    generator = torch.Generator().manual_seed(seed)
    n = config.num_tokens
    codes = torch.randint(0, config.vocab_size, (batch, n), generator=generator)
    order = torch.stack([torch.randperm(n, generator=generator) for _ in range(batch)])
    classes = torch.randint(0, config.num_classes + 1, (batch,), generator=generator)
    return scan_layout(classes, codes, order, set_sizes or [1, 2, 3, 4, 6])


def test_block_causal_mask_shape_and_rule():
    blocks = torch.tensor([0, 1, 1, 2, 2, 3])
    mask = block_causal_mask(blocks, blocks)
    assert mask[1, 2] and mask[2, 1]  # inside a block: bidirectional
    assert mask[3, 2] and not mask[2, 3]  # later blocks see earlier ones, not the reverse
    assert mask[:, 0].all()  # everyone sees the class token


def test_later_codes_never_change_earlier_outputs(tiny_model):
    layout = _random_layout(tiny_model.config, batch=2, seed=3)
    hidden = tiny_model(layout.kinds, layout.values, layout.cells, layout.mask())
    changed = layout.values.clone()
    last_set = layout.code_slots[-6:]  # x slots of the last set (size 6)
    changed[:, last_set] = (changed[:, last_set] + 7) % tiny_model.config.vocab_size
    hidden2 = tiny_model(layout.kinds, changed, layout.cells, layout.mask())
    first_affected = int(last_set.min())
    torch.testing.assert_close(hidden[:, :first_affected], hidden2[:, :first_affected])
    assert not torch.allclose(hidden[:, first_affected:], hidden2[:, first_affected:])


@pytest.mark.parametrize("set_sizes", [[1, 2, 3, 4, 6], [5, 1, 1, 9], [16], [1] * 16])
def test_chunked_kv_cache_forward_equals_full_forward(set_sizes):
    model = random_model(tiny_config(), seed=4)
    layout = _random_layout(model.config, batch=3, seed=5, set_sizes=set_sizes)
    full = model(layout.kinds, layout.values, layout.cells, layout.mask())
    cache = KVCache.allocate(model.config, batch_size=3, capacity=layout.kinds.shape[1])
    chunked = torch.zeros_like(full)
    # Chunk k is [x(set k-1)][p(set k)]: the first is [C][p(set1)], one more scores set K.
    starts = [0] + [int(layout.code_slots[s]) for s in _set_starts(set_sizes)]
    ends = starts[1:] + [layout.kinds.shape[1]]
    for start, end in zip(starts, ends, strict=True):
        positions = torch.arange(start, end)
        mask = block_causal_mask(layout.blocks[positions], layout.blocks).unsqueeze(0)
        chunk = [t[:, positions] for t in (layout.kinds, layout.values, layout.cells)]
        chunked[:, positions] = model(*chunk, mask, cache, positions)
    assert (chunked - full).abs().max() <= 1e-4
    token_full = model.token_logits(full[:, layout.position_slots])
    token_chunked = model.token_logits(chunked[:, layout.position_slots])
    quality_full = model.quality_logits(full[:, layout.code_slots])
    quality_chunked = model.quality_logits(chunked[:, layout.code_slots])
    assert (token_full - token_chunked).abs().max() <= 1e-4
    assert (quality_full - quality_chunked).abs().max() <= 1e-4


def _set_starts(set_sizes):
    starts, total = [], 0
    for size in set_sizes:
        starts.append(total)
        total += size
    return starts


def test_llamagen_model_is_causal_and_has_no_quality_head():
    model = random_model(tiny_config(arch="llamagen"), seed=6)
    codes = torch.randint(0, 64, (2, 16))
    layout = raster_layout(torch.tensor([1, 2]), codes)
    assert layout.kinds[0, 0] == SLOT_CLASS and layout.kinds.shape[1] == 16
    hidden = model(layout.kinds, layout.values, layout.cells, layout.mask())
    changed = layout.values.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 64
    hidden2 = model(layout.kinds, changed, layout.cells, layout.mask())
    torch.testing.assert_close(hidden[:, :10], hidden2[:, :10])
    assert model.token_logits(hidden).shape == (2, 16, 64)
    with pytest.raises(RuntimeError, match="no quality head"):
        model.quality_logits(hidden)


def test_a_cache_knows_its_size_even_without_layers():
    cache = KVCache.allocate(tiny_config(n_layer=0), batch_size=3, capacity=11)
    assert (cache.batch_size, cache.capacity, cache.nbytes()) == (3, 11, 0)
    cache = KVCache.allocate(tiny_config(), batch_size=2, capacity=5)
    assert cache.keys[0].shape == (2, 4, 5, 16) and cache.capacity == 5
