import math

import pytest

from sop_lightning.schedules import cosine_at, cosine_schedule, epoch_warmup_at

# ALGORITHMS.md §10.1 reference values: T = 1000, 10 iterations / epoch.


def test_lr_reference_values():
    lr = cosine_schedule(1e-3, 1e-6, 1000, warmup_steps=100)
    assert lr[0] == 0.0
    assert lr[99] == pytest.approx(1e-3, abs=1e-15)
    assert lr[100] == pytest.approx(1e-3, abs=1e-15)
    assert lr[550] == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * 450 / 900)), rel=1e-12)
    assert lr[550] == pytest.approx(5.005e-4, rel=1e-9)
    # warm-up is linspace(0, base, 100) with endpoints included
    assert lr[50] == pytest.approx(1e-3 * 50 / 99, rel=1e-12)


def test_weight_decay_momentum_and_temperature():
    wd = cosine_schedule(0.04, 0.4, 1000)
    assert wd[0] == pytest.approx(0.04) and wd[500] == pytest.approx(0.22)
    m = cosine_schedule(0.996, 1.0, 1000)
    assert m[0] == pytest.approx(0.996) and m[500] == pytest.approx(0.998)
    tau = cosine_schedule(0.07, 0.07, 1000, warmup_steps=300, start_warmup=0.04)
    assert tau[0] == pytest.approx(0.04) and tau[299] == pytest.approx(0.07) and tau[999] == pytest.approx(0.07)
    assert all(tau[i] <= tau[i + 1] + 1e-15 for i in range(999))


def test_last_value_is_not_final_and_is_held():
    n = 100
    last = 0.0 + 0.5 * (1.0 - 0.0) * (1 + math.cos(math.pi * 99 / 100))
    assert cosine_at(99, 1.0, 0.0, n) == pytest.approx(last)
    assert cosine_at(5000, 1.0, 0.0, n) == pytest.approx(last)


def test_epoch_warmup():
    assert epoch_warmup_at(0, 0.04, 0.07, 30) == pytest.approx(0.04)
    assert epoch_warmup_at(29, 0.04, 0.07, 30) == pytest.approx(0.07)
    assert epoch_warmup_at(15, 0.04, 0.07, 30) == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert epoch_warmup_at(100, 0.04, 0.07, 30) == 0.07
    assert epoch_warmup_at(0, 0.04, 0.07, 0) == 0.07


def test_bad_arguments():
    with pytest.raises(ValueError, match="total_steps"):
        cosine_at(0, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_at(0, 1.0, 0.0, 10, warmup_steps=11)


def test_epoch_warmup_with_a_start_epoch():
    got = [epoch_warmup_at(e, 0.04, 0.07, 4, start_epoch=3) for e in range(9)]
    expected = [0.04] * 3 + [0.04, 0.05, 0.06, 0.07] + [0.07] * 2  # ones(3)·0.04, linspace(0.04, 0.07, 4), ...
    assert got == pytest.approx(expected)


@pytest.mark.parametrize("m0, m1, total", [(0.99, 1.0, 450), (0.9, 0.99, 37), (0.5, 0.5, 5)])
def test_ema_profile_matches_a_brute_force_ema(m0, m1, total):
    from sop_lightning.schedules import ema_profile

    # EMA of one-hot "sources": index 0 the random start, index 1 + i the student after step i
    teacher = [1.0] + [0.0] * total
    for i in range(total):
        m = m1 + 0.5 * (m0 - m1) * (1 + math.cos(math.pi * i / total))
        teacher = [m * t for t in teacher]
        teacher[1 + i] += 1 - m
    centre = sum(i * w for i, w in enumerate(teacher[1:])) / sum(teacher[1:]) / total
    initial, got_centre = ema_profile(m0, m1, total)
    assert initial == pytest.approx(teacher[0], rel=1e-9) and got_centre == pytest.approx(centre, rel=1e-9)
