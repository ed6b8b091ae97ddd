"""The adversarial term of VQ tokenizer training (``scan_core.training.vq.train``), as in taming.

A PatchGAN discriminator, its hinge loss, and the adaptive weight that balances the generator's
GAN loss against the reconstruction loss at the decoder's last layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming): 4x4 convs, stride 2 then 1; one real/fake logit per patch.

    Shapes: images (B, 3, H, W) -> logits (B, 1, H / 2^num_down - 2, same).
    """

    def __init__(self, channels: int = 64, num_down: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for index in range(1, num_down + 1):
            stride = 2 if index < num_down else 1
            layers += [
                nn.Conv2d(width, 2 * width, 4, stride, 1, bias=False),
                nn.GroupNorm(32, 2 * width),  # batch-independent, unlike taming's BatchNorm
                nn.LeakyReLU(0.2),
            ]
            width *= 2
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        return self.layers(images)


def hinge_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_gan_weight(recon_loss: Tensor, gan_loss: Tensor, last_layer: Tensor) -> Tensor:
    """||grad recon|| / ||grad gan|| at the decoder's last layer (taming-transformers)."""
    recon_grad = torch.autograd.grad(recon_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (recon_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()
