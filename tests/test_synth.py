"""The synthetic SAGE generator's physics and schedule (pure functions; no files written)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ingest.scene import SceneSpec, render_thermal
from ingest.synth import SynthConfig, air_celsius, plan_frames


def test_air_has_a_daily_cycle_in_local_solar_time():
    # Konza (lon -96.6): 15:00 local solar time is about 21:26 UTC, 03:00 about 09:26 UTC.
    afternoon = air_celsius(pd.Timestamp("2023-07-01 21:26", tz="UTC"), -96.6)
    before_dawn = air_celsius(pd.Timestamp("2023-07-01 09:26", tz="UTC"), -96.6)
    assert afternoon - before_dawn == pytest.approx(12.0, abs=0.01)
    # The same UTC instant half a world away is at the other end of its day.
    assert air_celsius(pd.Timestamp("2023-07-01 21:26", tz="UTC"), 83.4) == pytest.approx(before_dawn, abs=0.01)
    # And the seasonal cycle is still there: July is warmer than March at the same solar time.
    assert air_celsius(pd.Timestamp("2023-03-01 21:26", tz="UTC"), -96.6) < afternoon - 10


def test_sunlit_ground_has_more_thermal_contrast_than_at_night():
    def ground(sun_elevation_deg: float) -> np.ndarray:
        spec = SceneSpec(vsn="W056", azimuth=2, tilt=3, sun_elevation_deg=sun_elevation_deg, cloud_fraction=0.0,
                         air_celsius=15.0, seed=7)  # azimuth 2 has no building; tilt 3 sees only ground
        return render_thermal(spec, (48, 64), (0.2, 0.3, 0.8, 0.9))

    day, night = ground(45.0), ground(-20.0)
    assert day.mean() > night.mean() + 10
    assert day.std() > 2 * night.std()


def test_visits_have_the_configured_length():
    config = SynthConfig(nodes=1, frames=10, visit_frames=4, scale=0.1)
    times = np.array([spec.ts_ns for spec in plan_frames(config)])
    gaps = np.diff(times) / 1e9
    in_visit = gaps < 60
    assert len(times) == 10 and (~in_visit).sum() == 2  # visits of 4, 4 and 2 frames
    assert np.all((gaps[in_visit] > 19) & (gaps[in_visit] < 21))
    with pytest.raises(ValueError, match="visit_frames"):
        SynthConfig(visit_frames=0)
