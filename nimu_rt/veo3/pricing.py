"""What a generation costs, from the configured price table.

Google bills Veo 3 per generated second, by model, resolution and whether an
audio track is generated; safety-filtered and failed generations are not
billed. The table lives in config (``[pricing]``) because prices change more
often than code.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

from nimu_rt.config import Settings
from nimu_rt.errors import ValidationFailed
from nimu_rt.models import CostEstimate, GenerationOptions

CENT = Decimal("0.01")


def estimate_cost(settings: Settings, options: GenerationOptions) -> CostEstimate:
    """The price of ``options`` in USD, rounded to the cent.

    Raises :class:`ValidationFailed` when the table has no row for the model
    and resolution, since such a request cannot be priced or sent.
    """
    rows = settings.pricing.get(options.model)
    if rows is None:
        known = ", ".join(sorted(settings.pricing))
        raise ValidationFailed(
            [{"path": "$.model", "message": f"unknown model; known: {known}"}]
        )
    rate = rows.get(options.resolution)
    if rate is None:
        raise ValidationFailed(
            [
                {
                    "path": "$.resolution",
                    "message": f"{options.model} has no price for"
                    f" {options.resolution}; priced: {', '.join(sorted(rows))}",
                }
            ]
        )
    per_second = rate.audio if options.generate_audio else rate.silent
    # Decimal from str: 0.4 * 8 must be 3.20, not 3.2000000000000006.
    usd = (Decimal(str(per_second)) * options.duration_seconds).quantize(
        CENT, rounding=ROUND_HALF_UP
    )
    return CostEstimate(
        usd=float(usd),
        model=options.model,
        resolution=options.resolution,
        duration_seconds=options.duration_seconds,
        generate_audio=options.generate_audio,
        usd_per_second=per_second,
    )
