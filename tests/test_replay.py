"""What a trial records to be reproduced, read back from studies of either shape."""

from __future__ import annotations

from optuna.trial import create_trial

from tuner.replay import trial_seed


def test_a_trial_seed_is_read_from_its_provenance_or_the_older_seed_attribute() -> None:
    now = create_trial(value=1.0, user_attrs={"provenance": {"seed": 7, "torch": "2.13.0"}})
    before = create_trial(value=1.0, user_attrs={"seed": 5, "provenance": {"torch": "2.13.0"}})
    unrecorded = create_trial(value=1.0)

    assert (trial_seed(now, 0), trial_seed(before, 0), trial_seed(unrecorded, 9)) == (7, 5, 9)
