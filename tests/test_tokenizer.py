"""VQ tokenizer: upstream state-dict compatibility, quantization maths, gradients, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scan_core.model.config import VQ_PRESETS, vq_preset
from scan_core.tokenizer import vq as tokenizer
from scan_core.tokenizer.vq import AttentionBlock, Downsample, VQModel, entropy_loss

GOLDEN = Path(__file__).parent / "golden" / "llamagen_vq16_state_dict.txt"


def read_reference_shapes() -> dict[str, tuple[int, ...]]:
    """Parse 'key (d0, d1, ...)' lines of the upstream VQ-16 key list."""
    shapes = {}
    for line in GOLDEN.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape = line.split(" ", 1)
        shapes[key] = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
    return shapes


def random_model(name: str = "VQ-tiny", seed: int = 0, **changes) -> VQModel:
    torch.manual_seed(seed)
    return VQModel(vq_preset(name, **changes)).eval()


def random_images(batch: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=generator) * 2 - 1


# --- upstream compatibility (meta device: nothing is allocated) ---------------------------------


@pytest.mark.parametrize("name", sorted(VQ_PRESETS))
def test_parameter_count_matches_preset(name: str) -> None:
    config, expected = VQ_PRESETS[name]
    with torch.device("meta"):
        model = VQModel(config)
    assert sum(p.numel() for p in model.parameters()) == expected
    if name == "VQ-16":
        assert expected == 71_883_403


def test_vq16_state_dict_keys_and_shapes_equal_upstream() -> None:
    reference = read_reference_shapes()
    assert len(reference) == 344
    # The usage log is a training buffer the loader drops; we never register it.
    assert reference.pop("quantize.codebook_used") == (65536,)
    with torch.device("meta"):
        model = VQModel(vq_preset("VQ-16"))
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert ours == reference


def test_state_dict_round_trip_is_strict() -> None:
    source, target = random_model(seed=0), random_model(seed=1)
    target.load_state_dict(source.state_dict(), strict=True)
    images = random_images(2, 16, 16)
    assert torch.equal(source.encode(images), target.encode(images))


# --- shapes and the public API -----------------------------------------------------------------


@pytest.mark.parametrize(("name", "height", "width"), [("VQ-tiny", 16, 16), ("VQ-S", 32, 16)])
def test_encode_decode_shapes_and_code_range(name: str, height: int, width: int) -> None:
    model = random_model(name)
    factor = model.downsample_factor
    codes = model.encode(random_images(2, height, width))
    assert codes.shape == (2, height // factor, width // factor)
    assert codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < model.config.codebook_size
    with torch.no_grad():
        images = model.decode_codes(codes)
    assert images.shape == (2, 3, height, width)


def test_vq16_runs_on_a_small_input() -> None:
    model = random_model("VQ-16")
    codes = model.encode(random_images(1, 32, 32))
    assert codes.shape == (1, 2, 2)
    with torch.no_grad():
        assert model.decode_codes(codes).shape == (1, 3, 32, 32)


def test_batch_equals_single() -> None:
    model = random_model()
    images = random_images(3, 16, 16)
    batched = model.encode(images)
    for index in range(3):
        assert torch.equal(model.encode(images[index : index + 1])[0], batched[index])


def test_decode_codes_equals_decode_of_quantized_latents() -> None:
    model = random_model("VQ-S")
    with torch.no_grad():
        latents, codes = model.quantize(model.encode_to_latents(random_images(2, 32, 16)))
        from_latents = model.decode_latents(latents)
        assert torch.equal(model.codes_to_latents(codes), latents)
        assert torch.equal(model.decode_codes(codes), from_latents)
        flat = codes.reshape(2, -1)  # raster order, 8 x 4 grid
        assert torch.equal(model.decode_codes(flat, grid=(8, 4)), from_latents)


def test_flat_square_codes_infer_the_grid() -> None:
    model = random_model()
    codes = torch.randint(0, 64, (2, 8, 8))
    with torch.no_grad():
        assert torch.equal(model.decode_codes(codes.reshape(2, 64)), model.decode_codes(codes))


# --- quantization maths ------------------------------------------------------------------------


def brute_force_distances(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w), (K, C) -> (B*h*w, K) squared distances, computed pairwise."""
    rows = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    return ((rows[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)


@pytest.mark.parametrize("chunk", [tokenizer.SEARCH_CHUNK, 7])
def test_quantize_picks_nearest_normalised_codeword(chunk: int, monkeypatch) -> None:
    monkeypatch.setattr(tokenizer, "SEARCH_CHUNK", chunk)  # chunked search must not change codes
    model = random_model(seed=3)
    z = torch.randn(2, model.config.codebook_embed_dim, 3, 5)
    with torch.no_grad():
        z_q, codes = model.quantize(z)
    unit_codebook = F.normalize(model.quantize.embedding.weight, dim=-1)
    distances = brute_force_distances(F.normalize(z, dim=1), unit_codebook)
    chosen = distances.gather(1, codes.reshape(-1, 1)).squeeze(1)
    assert torch.all(chosen <= distances.min(1).values + 1e-6)
    assert torch.allclose(unit_codebook.norm(dim=-1), torch.ones(64))
    assert torch.equal(z_q, unit_codebook[codes].permute(0, 3, 1, 2))


def test_quantize_without_l2_norm_uses_raw_vectors() -> None:
    model = random_model(codebook_l2_norm=False)
    with torch.no_grad():
        model.quantize.embedding.weight.normal_()
        z = torch.randn(1, model.config.codebook_embed_dim, 4, 4)
        z_q, codes = model.quantize(z)
    distances = brute_force_distances(z, model.quantize.embedding.weight.detach())
    assert torch.equal(codes.reshape(-1), distances.argmin(1))
    assert torch.equal(z_q, model.quantize.embedding.weight[codes].permute(0, 3, 1, 2))


def test_entropy_loss_rewards_confident_and_diverse_assignments() -> None:
    confident_diverse = torch.eye(8) * 10.0  # each row sure of a different code
    collapsed = torch.zeros(8, 8)
    collapsed[:, 0] = 10.0  # every row sure of code 0
    assert entropy_loss(confident_diverse).item() == pytest.approx(-math.log(8), abs=1e-3)
    assert entropy_loss(collapsed).item() == pytest.approx(0.0, abs=1e-3)


# --- training path -----------------------------------------------------------------------------


def test_straight_through_gradient_reaches_the_encoder() -> None:
    model = random_model().train()
    reconstruction, losses = model(random_images(2, 16, 16))
    # Reconstruction alone: without the straight-through estimator the encoder would get nothing.
    reconstruction.square().mean().backward()
    encoder_grad = model.encoder.conv_in.weight.grad
    assert encoder_grad is not None and encoder_grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad is None  # codewords move only by the codebook loss


def test_vq_losses_are_finite_and_train_their_targets() -> None:
    model = random_model(entropy_loss_ratio=0.1).train()
    _, losses = model(random_images(2, 16, 16))
    assert set(losses) == {"codebook", "commitment", "entropy"}
    assert all(torch.isfinite(value) and value.ndim == 0 for value in losses.values())
    assert torch.allclose(losses["commitment"], model.config.commit_loss_beta * losses["codebook"])
    losses["codebook"].backward(retain_graph=True)
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    assert model.encoder.conv_in.weight.grad is None  # sg[z]: the codebook loss spares the encoder
    (losses["commitment"] + losses["entropy"]).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0


def test_entropy_term_is_zero_when_disabled() -> None:
    _, losses = random_model().train()(random_images(1, 16, 16))
    assert losses["entropy"].item() == 0.0


# --- architecture details ----------------------------------------------------------------------


def test_attention_block_is_single_head_softmax_over_positions() -> None:
    torch.manual_seed(0)
    block = AttentionBlock(32).eval()
    x = torch.randn(2, 32, 3, 4)
    with torch.no_grad():
        h = block.norm(x)
        q, k, v = (conv(h).flatten(2) for conv in (block.q, block.k, block.v))  # (B, C, N)
        weights = torch.softmax(q.transpose(1, 2) @ k * 32**-0.5, dim=-1)  # (B, N_query, N_key)
        expected = x + block.proj_out((v @ weights.transpose(1, 2)).reshape(2, 32, 3, 4))
        assert torch.allclose(block(x), expected, atol=1e-5)


def test_downsample_pads_only_right_and_bottom() -> None:
    block = Downsample(32)
    with torch.no_grad():
        block.conv.weight.fill_(1.0)
        block.conv.bias.zero_()
        out = block(torch.ones(1, 32, 4, 4))
    assert out.shape == (1, 32, 2, 2)
    # Top-left window lies fully inside the image (9 pixels); bottom-right covers 2x2 real pixels.
    assert out[0, 0, 0, 0].item() == 9 * 32
    assert out[0, 0, 1, 1].item() == 4 * 32


def test_group_norm_rejects_widths_not_divisible_by_32() -> None:
    with pytest.raises(ValueError, match="divisible by 32"):
        VQModel(vq_preset("VQ-tiny", base_channels=48))


# --- errors ------------------------------------------------------------------------------------


def test_image_errors_say_what_is_expected() -> None:
    model = random_model()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="multiples of 2"):
        model.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match="float images"):
        model.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


def test_code_errors_say_what_is_expected() -> None:
    model = random_model()
    for bad in (torch.full((1, 8, 8), 64), torch.full((1, 8, 8), -1)):
        with pytest.raises(ValueError, match=r"\[0, 64\)"):
            model.decode_codes(bad)
    with pytest.raises(ValueError, match="integer"):
        model.decode_codes(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="square grid"):
        model.decode_codes(torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="does not hold"):
        model.decode_codes(torch.zeros(1, 10, dtype=torch.long), grid=(3, 3))
