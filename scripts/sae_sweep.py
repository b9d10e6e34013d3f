"""The SAE sweep behind the default study's SAE settings (docs/sae.md, "Choosing the SAE").

Trains every configuration of GRID from ONE pass over a cached activation set (mechvit.sae.train_saes) and
prints held-out EV, L0, dead and dense latents, plus the EV of PCA with 4, 8 and 16 components.

    # the base model's blocks.2 patch tokens on the study's mix (12,000 training images, half corrupted)
    python -m mechvit.sae --checkpoint checkpoints/fmnist_vit_base --hook blocks.2.hook_resid_post \\
        --tokens patches --images 12000 --samples 588000 --mix 0.5 --corruption gaussian_blur:4 \\
        --corruption gaussian_noise:4 --cache runs/acts/base_b2 --out runs/sae/base_b2
    python scripts/sae_sweep.py runs/acts/base_b2
"""

import argparse

import torch

from mechvit.sae.activations import CachedActivations
from mechvit.sae.metrics import reconstruction_metrics
from mechvit.sae.train import SAETrainingConfig, train_saes

GRID = {
    "x4 k8 lr1e-3 aux1/32 init0.1": dict(expansion_factor=4, k=8, aux_coefficient=1 / 32, lr=1e-3),
    "x4 k8 lr1e-3 aux1/2 init0.1": dict(expansion_factor=4, k=8, aux_coefficient=0.5, lr=1e-3),
    "x4 k8 lr3e-4 aux1/32 init0.1": dict(expansion_factor=4, k=8, aux_coefficient=1 / 32, lr=3e-4),
    "x2 k8 lr1e-3 aux1/32 init0.1": dict(expansion_factor=2, k=8, aux_coefficient=1 / 32, lr=1e-3),
    "x4 k8 lr1e-3 aux1/32 init0.5": dict(expansion_factor=4, k=8, aux_coefficient=1 / 32, lr=1e-3, decoder_init_norm=0.5),
    "x4 k8 lr1e-3 aux1/32 unit": dict(expansion_factor=4, k=8, aux_coefficient=1 / 32, lr=1e-3, decoder_init_norm=None),
    "x4 k8 lr3e-3 aux1/32 unit": dict(expansion_factor=4, k=8, aux_coefficient=1 / 32, lr=3e-3, decoder_init_norm=None),
    "x8 k8 lr1e-3 aux1/32 unit": dict(expansion_factor=8, k=8, aux_coefficient=1 / 32, lr=1e-3, decoder_init_norm=None),
    "x4 k4 lr1e-3 aux1/32 unit": dict(expansion_factor=4, k=4, aux_coefficient=1 / 32, lr=1e-3, decoder_init_norm=None),
    "x4 k16 lr1e-3 aux1/32 unit": dict(expansion_factor=4, k=16, aux_coefficient=1 / 32, lr=1e-3, decoder_init_norm=None),
}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("cache", help="an activation cache folder (mechvit.sae.cache_activations)")
    p.add_argument("--held-out", type=int, default=30_000, help="evaluate on the cache's last N rows")
    p.add_argument("--samples", type=int, default=None, help="training rows (default: the whole cache)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cache = CachedActivations(a.cache)
    n = len(cache)
    held = cache.rows(n - a.held_out, n).float()
    x = held.double() - held.double().mean(0)
    ev = torch.linalg.eigvalsh(x.T @ x).flip(0)
    print("PCA EV with 4, 8, 16 components:", [round(float(ev[:k].sum() / ev.sum()), 4) for k in (4, 8, 16)])
    total = (a.samples or n) // 1024 * 1024
    cfgs = {
        name: SAETrainingConfig(
            architecture="batchtopk", batch_size=1024, total_samples=total, seed=i + 1, **kw
        )
        for i, (name, kw) in enumerate(GRID.items())
    }
    trained = train_saes(cache.batches(1024, buffer_size=16384, seed=0, device="cpu"), cache.d_in, cfgs)
    for name, t in trained.items():
        m = reconstruction_metrics(t.sae, held)
        print(f"{name}: EV {m.explained_variance:.3f}, L0 {m.l0:.1f}, dead {m.dead_features}/{m.d_sae}, "
              f"dense {m.dense_features}")  # fmt: skip


if __name__ == "__main__":
    main()
