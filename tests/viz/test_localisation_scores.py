"""pointing_game / energy_in_box / box_area_fraction on hand-made maps with known answers."""

from __future__ import annotations

import pytest
import torch

from attnzoo.viz import box_area_fraction, energy_in_box, pointing_game


def hot(h: int, w: int, points: list[tuple[int, int]], value: float = 1.0) -> torch.Tensor:
    m = torch.zeros(h, w)
    for y, x in points:
        m[y, x] = value
    return m


def test_single_hot_pixel_in_and_out():
    box = [4, 2, 8, 6]  # x 4..7, y 2..5
    cams = torch.stack([hot(10, 12, [(3, 5)]), hot(10, 12, [(7, 5)]), hot(10, 12, [(3, 9)])])
    assert pointing_game(cams, torch.tensor([box] * 3)).tolist() == [True, False, False]


def test_exclusive_ends():
    box = torch.tensor([[4, 2, 8, 6]])
    inside_corner = hot(10, 12, [(5, 7)])[None]  # y1 - 1, x1 - 1: inside
    on_x1 = hot(10, 12, [(3, 8)])[None]  # x == x1: outside
    on_y1 = hot(10, 12, [(6, 5)])[None]  # y == y1: outside
    first = hot(10, 12, [(2, 4)])[None]  # (y0, x0): inside
    assert pointing_game(inside_corner, box).item()
    assert not pointing_game(on_x1, box).item()
    assert not pointing_game(on_y1, box).item()
    assert pointing_game(first, box).item()


def test_boxes_at_the_borders():
    cams = torch.stack([hot(8, 8, [(0, 0)]), hot(8, 8, [(7, 7)]), hot(8, 8, [(7, 0)])])
    boxes = torch.tensor([[0, 0, 1, 1], [7, 7, 8, 8], [0, 4, 2, 8]])
    assert pointing_game(cams, boxes).all()
    assert pointing_game(cams, boxes[[1, 2, 0]]).logical_not().all()


def test_flat_and_zero_maps_always_miss():
    flat = torch.full((3, 8, 8), 0.3)
    zero = torch.zeros(3, 8, 8)
    boxes = torch.tensor([[0, 0, 1, 1], [0, 0, 4, 8], [0, 0, 8, 8]])  # incl. the whole image
    assert not pointing_game(flat, boxes).any()
    assert not pointing_game(zero, boxes).any()
    assert not pointing_game(flat, boxes, tolerance=100).any()


def test_ties_need_at_least_half_of_the_maxima_inside():
    box = torch.tensor([[0, 0, 4, 4]])
    both_in = hot(8, 8, [(1, 1), (2, 3)])[None]
    half_in = hot(8, 8, [(1, 1), (6, 6)])[None]
    one_of_three = hot(8, 8, [(1, 1), (6, 6), (7, 7)])[None]
    two_of_three = hot(8, 8, [(1, 1), (2, 2), (7, 7)])[None]
    below_max_outside = hot(8, 8, [(1, 1)])[None] + hot(8, 8, [(6, 6)], 0.99)[None]
    # argmax would take the first maximum in memory order (top-left): (0, 0) is outside the
    # box below, (0, 1) inside, but most maxima lie outside -> miss; the reverse -> hit
    top_left_first = hot(8, 8, [(0, 1), (5, 5), (6, 6)])[None]
    top_left_out = hot(8, 8, [(0, 0), (1, 1), (2, 2)])[None]
    assert pointing_game(both_in, box).item()
    assert pointing_game(half_in, box).item()
    assert not pointing_game(one_of_three, box).item()
    assert pointing_game(two_of_three, box).item()
    assert pointing_game(below_max_outside, box).item()
    assert not pointing_game(top_left_first, torch.tensor([[1, 0, 4, 4]])).item()
    assert pointing_game(top_left_out, torch.tensor([[1, 1, 4, 4]])).item()


def test_border_plateau_of_an_upsampled_cam():
    # a 4x4 CAM peaking in its right border cell, resized to 32 px with a replicated border:
    # equal maxima at x = 28..31 on one row; a box ending at x1 = 31 holds 3 of the 4
    cam = torch.zeros(1, 32, 32)
    cam[0, 20, 28:32] = 1.0
    cam[0, 19, 28:32] = 0.9
    assert pointing_game(cam, torch.tensor([[18, 10, 31, 26]])).item()
    assert not pointing_game(cam, torch.tensor([[18, 10, 29, 26]])).item()  # 1 of 4


def test_negative_maps_use_the_maximum():
    m = torch.full((1, 6, 6), -5.0)
    m[0, 1, 1] = -1.0
    assert pointing_game(m, torch.tensor([[0, 0, 2, 2]])).item()


def test_tolerance_euclidean_distance_to_the_box():
    box = torch.tensor([[2, 2, 4, 4]])  # pixels 2..3
    right3 = hot(20, 20, [(3, 6)])[None]  # 3 px right of x = 3
    diag = hot(20, 20, [(6, 6)])[None]  # (3, 3) from the corner (3, 3): distance 4.24
    assert not pointing_game(right3, box).item()
    assert not pointing_game(right3, box, tolerance=2).item()
    assert pointing_game(right3, box, tolerance=3).item()
    assert not pointing_game(diag, box, tolerance=4).item()
    assert pointing_game(diag, box, tolerance=4.25).item()
    corner = hot(6, 6, [(0, 0)])[None]
    # the corner (0, 0) is sqrt(2) from the box pixel (1, 1): Euclidean, not Chebyshev
    assert pointing_game(corner, torch.tensor([[1, 1, 5, 5]]), tolerance=1.5).item()
    assert not pointing_game(corner, torch.tensor([[1, 1, 5, 5]]), tolerance=1).item()


def test_energy_known_values():
    cams = torch.zeros(4, 4, 4)
    cams[0, 1, 1] = 3.0
    cams[0, 3, 3] = 1.0  # 3 of 4 inside
    cams[1] = 1.0  # constant: area fraction 4 / 16
    cams[2, 3, 3] = 2.0  # all outside
    # cams[3] stays zero -> 0, not NaN
    boxes = torch.tensor([[0, 0, 2, 2]] * 4)
    out = energy_in_box(cams, boxes)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([0.75, 0.25, 0.0, 0.0]))
    torch.testing.assert_close(
        energy_in_box(cams[1:2], boxes[:1]), box_area_fraction(boxes[:1], 4, 4)
    )


def test_energy_exclusive_end_and_float64():
    cams = torch.zeros(1, 5, 5, dtype=torch.float64)
    cams[0, 2, 4] = 1.0
    cams[0, 4, 2] = 1.0
    out = energy_in_box(cams, torch.tensor([[0, 0, 4, 5]]))  # x 0..3: excludes column 4
    assert out.dtype == torch.float64
    assert out.tolist() == [0.5]


def test_energy_rejects_negative_maps():
    with pytest.raises(ValueError, match="energy_in_box.*non-negative"):
        energy_in_box(-torch.ones(1, 3, 3), torch.tensor([[0, 0, 1, 1]]))


def test_box_area_fraction():
    boxes = torch.tensor([[0, 0, 32, 32], [4, 8, 12, 10], [31, 31, 32, 32]])
    torch.testing.assert_close(
        box_area_fraction(boxes, 32, 32), torch.tensor([1.0, 16 / 1024, 1 / 1024])
    )
    torch.testing.assert_close(box_area_fraction([[0, 0, 3, 2]], 4, 6), torch.tensor([6 / 24]))


@pytest.mark.parametrize("fn", [pointing_game, energy_in_box])
@pytest.mark.parametrize(
    "cams, boxes, match",
    [
        (torch.zeros(2, 4), [[0, 0, 1, 1]] * 2, "cams must be a \\(B, H, W\\)"),
        (torch.zeros(2, 4, 4), [[0, 0, 1, 1]], "boxes must have shape \\(2, 4\\)"),
        (torch.zeros(1, 4, 4), [[0, 0, 1]], "boxes must have shape"),
        (torch.zeros(1, 4, 4), [[0.0, 0.0, 1.0, 1.0]], "boxes must hold integers"),
        (torch.zeros(1, 4, 6), [[0, 0, 7, 1]], "0 <= x0 < x1 <= W=6"),
        (torch.zeros(1, 4, 6), [[0, 0, 1, 5]], "y1 <= H=4"),
        (torch.zeros(1, 4, 4), [[2, 0, 2, 1]], "x0 < x1"),
        (torch.zeros(1, 4, 4), [[-1, 0, 2, 1]], "0 <= x0"),
        (torch.full((1, 4, 4), float("nan")), [[0, 0, 1, 1]], "finite"),
    ],
)
def test_validation(fn, cams, boxes, match):
    with pytest.raises(ValueError, match=match) as err:
        fn(cams, boxes)
    assert fn.__name__ in str(err.value)


def test_pointing_game_bad_tolerance():
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(torch.zeros(1, 3, 3), [[0, 0, 1, 1]], tolerance=-1)


def test_box_area_fraction_validation():
    with pytest.raises(ValueError, match="box_area_fraction.*H must be a positive int"):
        box_area_fraction([[0, 0, 1, 1]], 0, 4)
    with pytest.raises(ValueError, match="box_area_fraction.*boxes\\[1\\]"):
        box_area_fraction([[0, 0, 1, 1], [0, 0, 5, 1]], 4, 4)
