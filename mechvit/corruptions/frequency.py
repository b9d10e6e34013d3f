"""Low- vs high-frequency corruption groups.

PROVISIONAL: the groups below are placeholders until the measured table (share of each corruption's spectral
change above half the Nyquist frequency, on real images) replaces them.
"""

from __future__ import annotations

LOW_FREQUENCY: tuple[str, ...] = ("gaussian_blur", "defocus_blur", "motion_blur", "zoom_blur", "glass_blur", "fog")
HIGH_FREQUENCY: tuple[str, ...] = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise")
