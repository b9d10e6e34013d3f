"""PGD / FGSM: the loss rises, the perturbation stays in the eps-ball, images stay in [0, 1]."""

import pytest
import timm
import torch
import torch.nn.functional as F

from mechvit.training import fgsm, pgd

TINY = dict(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=1, num_heads=2)


@pytest.fixture
def model_and_batch():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 8, 8, generator=g)
    x[:4] = 0.0  # some images at the box edges: projection onto [0, 1] must hold there too
    x[4:8] = 1.0
    y = torch.randint(0, 3, (16,), generator=g)
    return model, x, y


@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_raises_the_loss_within_eps_and_the_box(model_and_batch, random_start):
    model, x, y = model_and_batch
    eps = 8 / 255
    adv = pgd(model, x, y, eps=eps, steps=5, step_size=2 / 255, random_start=random_start,
              generator=torch.Generator().manual_seed(1))  # fmt: skip
    with torch.no_grad():
        clean_loss = F.cross_entropy(model(x), y).item()
        adv_loss = F.cross_entropy(model(adv), y).item()
    assert adv_loss > clean_loss
    assert (adv - x).abs().max().item() <= eps + 1e-6
    assert adv.min().item() >= 0 and adv.max().item() <= 1
    assert not adv.requires_grad and adv.shape == x.shape


def test_more_steps_do_not_lower_the_loss_much_and_fgsm_is_one_step(model_and_batch):
    model, x, y = model_and_batch
    eps = 0.05
    one = fgsm(model, x, y, eps=eps)
    ref = pgd(model, x, y, eps=eps, steps=1, step_size=eps, random_start=False)
    assert torch.equal(one, ref)
    # FGSM moves every pixel with a nonzero gradient by exactly eps (unless clipped by the box)
    inside = (x > eps) & (x < 1 - eps)
    moved = (one - x).abs()[inside]
    assert torch.allclose(moved[moved > 0], torch.full_like(moved[moved > 0], eps), atol=1e-6)
    with torch.no_grad():
        l1 = F.cross_entropy(model(one), y).item()
        l10 = F.cross_entropy(
            model(pgd(model, x, y, eps=eps, steps=10, step_size=eps / 4, random_start=False)), y
        ).item()
    assert l10 >= l1 - 1e-3


def test_pgd_leaves_the_model_alone_and_is_seeded(model_and_batch):
    model, x, y = model_and_batch
    model.train()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    a = pgd(model, x, y, eps=0.03, steps=2, generator=torch.Generator().manual_seed(5))
    b = pgd(model, x, y, eps=0.03, steps=2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    assert torch.equal(pgd(model, x, y, eps=0.0, steps=3), x)  # eps = 0 is the identity


def test_pgd_rejects_bad_input(model_and_batch):
    model, x, y = model_and_batch
    with pytest.raises(ValueError, match="eps must be >= 0"):
        pgd(model, x, y, eps=-0.1)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        pgd(model, x, y, eps=0.1, steps=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pgd(model, x * 2 + 0.5, y, eps=0.1)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        pgd(model, x[0], y, eps=0.1)


def test_pgd_on_a_hooked_vit_matches_timm(model_and_batch):
    from mechvit import HookedViT

    model, x, y = model_and_batch
    hooked = HookedViT.from_timm(model).eval()
    a = pgd(model, x, y, eps=0.03, steps=3, random_start=False)
    b = pgd(hooked, x, y, eps=0.03, steps=3, random_start=False)
    # same model, same gradients up to float noise: the signed steps agree almost everywhere
    assert (a == b).float().mean().item() > 0.99
