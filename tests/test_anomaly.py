"""The unsupervised path: preprocessing (crop, mask, HE), the split, the autoencoders, masked losses and scores."""

import ast
import inspect
import io
import json
import math
import re
import textwrap
import tokenize
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

import mura_helpers as mh

# ---------------------------------------------------------------- the masked loss and the scores


def test_masked_loss_matches_a_hand_computation():
    x = torch.tensor([[[[0.2, 0.8], [0.5, 0.0]]]])
    recon = torch.tensor([[[[0.1, 0.4], [0.5, 0.9]]]])
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 1.0]]]])
    hand = ((0.2 - 0.1) ** 2 + (0.8 - 0.4) ** 2 + (0.0 - 0.9) ** 2) / 3  # ||m (x - x_hat)||^2 / ||m||_1
    assert mh.masked_mse(x, recon, mask).item() == pytest.approx(hand)
    unmasked = mh.masked_mse(x, recon, torch.ones_like(mask)).item()
    assert unmasked == pytest.approx(torch.mean((x - recon) ** 2).item())  # an all-ones mask gives the plain MSE
    assert mh.masked_l1(x, recon, mask).item() == pytest.approx((0.1 + 0.4 + 0.9) / 3)  # alpha-GAN's loss


def test_scores_top_k_and_kld():
    x = torch.zeros(1, 1, 10, 10)
    recon = torch.zeros_like(x)
    recon[0, 0, 0, :5] = torch.tensor([0.5, 0.4, 0.3, 0.2, 0.1])
    mask = torch.ones_like(x)
    out = {"recon": recon, "mu": torch.zeros(1, 8), "logvar": torch.zeros(1, 8)}
    s = mh.reconstruction_scores(x, out, mask, top_k=2)
    assert s["mse_top2"].item() == pytest.approx((0.25 + 0.16) / 2)
    assert s["l1_top2"].item() == pytest.approx(0.45)
    assert s["kld"].item() == pytest.approx(0.0)  # the posterior equals the prior
    shifted = mh.kl_divergence(torch.ones(1, 4), torch.zeros(1, 4))
    assert shifted.item() == pytest.approx(2.0)  # 0.5 * sum(mu^2)
    out["mu"] = torch.ones(1, 8)  # KLD 4: per pixel (the suite) or raw (theirs, vaetorch.py:260-261) in the sums
    per_pixel = mh.reconstruction_scores(x, out, mask, top_k=2)
    raw = mh.reconstruction_scores(x, out, mask, top_k=2, kld_scale=1.0)
    assert per_pixel["l1+kld"].item() == pytest.approx(s["l1"].item() + 4 / 100)
    assert raw["l1+kld"].item() == pytest.approx(s["l1"].item() + 4)
    assert raw["mse+kld"].item() == pytest.approx(s["mse"].item() + 4)


# ---------------------------------------------------------------- preprocessing


def _tilted_plate(angle_deg, plate_value, outside_value, size=(300, 400)):
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    a = math.radians(angle_deg)
    u = (xx - 210) * math.cos(a) + (yy - 145) * math.sin(a)
    v = -(xx - 210) * math.sin(a) + (yy - 145) * math.cos(a)
    image = np.where((np.abs(u) < 130) & (np.abs(v) < 90), plate_value, outside_value).astype(float)
    image[(np.abs(u - 20) < 60) & (np.abs(v) < 15)] = 230  # a bright "hand" lying across the plate
    return np.clip(image + np.random.default_rng(0).normal(0, 4, image.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("plate, outside", [(120, 10), (40, 240)])  # plate brighter, or darker, than its surround
def test_carrier_crop_finds_a_tilted_plate(plate, outside, tmp_path):
    image = _tilted_plate(14, plate, outside)
    center, (w, h), angle = mh.find_carrier(image)
    assert math.degrees(angle) == pytest.approx(14, abs=2)
    assert (w, h) == (pytest.approx(260, rel=0.05), pytest.approx(180, rel=0.05))
    assert center == pytest.approx([210, 145], abs=4)
    crop = mh.PreprocessConfig(crop=True, segment=False, equalize=None, size=64)
    out = mh.preprocess_view(_save(tmp_path, image), crop)
    assert out["carrier_found"] and out["mask"].mean() == pytest.approx(180 / 260, abs=0.04)  # the plate only:
    assert (out["image"][out["mask"] == 0] == 0).all()  # not the surround beside the plate nor its rotated corners


def _save(folder, image):
    path = folder / "view.png"
    Image.fromarray(image).save(path)
    return path


def _hand_view(plate, outside, background, frame=None, size=(400, 300), seed=0):
    """A view: `outside` around a plate of `plate` (rows 40..360, cols 30..270) whose inner field (8% margins
    with a frame, else the whole plate) shows `background` around a hand: soft tissue (110) over bones (200),
    the forearm running from the field's bottom edge to four fingers."""
    image = np.full(size, outside, float)
    image[40:360, 30:270] = plate
    top, bottom, left, right = (40, 360, 30, 270) if frame is None else (66, 334, 50, 250)
    image[top:bottom, left:right] = background
    image[top + 100:bottom, 110:190] = 110  # the forearm's soft tissue ...
    image[top + 100:bottom, 125:140], image[top + 100:bottom, 160:175] = 200, 200  # ... over its two bones
    for x in (108, 130, 152, 174):  # the fingers
        image[top + 10:top + 100, x:x + 18] = 110
        image[top + 20:top + 100, x + 5:x + 13] = 200
    return np.clip(image + np.random.default_rng(seed).normal(0, 4, size), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("plate, outside, background, frame", [
    (25, 5, 25, None),  # a plate only a little brighter than its dark surround (Otsu alone splits hand from rest)
    (235, 5, 25, True),  # bright unexposed borders inside the plate: the field is the exposed part
    (25, 25, 25, True),  # ... with no plate edge at all: collimation on a dark scanner background
    (105, 75, 90, True),  # borders only a little lighter than the field (one Otsu class with it)
])
def test_carrier_crop_finds_the_exposed_field_and_the_mask_the_hand(plate, outside, background, frame, tmp_path):
    image = _hand_view(plate, outside, background, frame)
    if plate == outside:
        image[40:360, 30:270][np.pad(np.ones((268, 200), bool), ((26, 26), (20, 20))) == 0] = 235
    (cx, cy), (w, h), angle = mh.find_field(image)
    field = (320, 240) if frame is None else (268, 200)
    assert (h, w) == (pytest.approx(field[0], rel=0.05), pytest.approx(field[1], rel=0.05))
    assert (cx, cy) == (pytest.approx(150, abs=4), pytest.approx(200, abs=4)) and abs(angle) < 0.03
    out = mh.preprocess_view(_save(tmp_path, image), mh.PreprocessConfig(size=128))
    assert out["carrier_found"] and 0.15 < out["mask"].mean() < 0.4  # the hand: not the whole field nor its borders


@pytest.mark.parametrize("plate, outside", [(12, 4), (10, 4)])
def test_a_dark_plate_a_few_levels_above_a_black_surround_is_found(plate, outside):
    # the hand and its soft tissue take Otsu's first splits; the plate's step is found a few splits further down
    (cx, cy), (w, h), angle = mh.find_carrier(_hand_view(plate, outside, plate))
    assert (h, w) == (pytest.approx(320, rel=0.04), pytest.approx(240, rel=0.04)) and abs(angle) < 0.03
    assert (cx, cy) == (pytest.approx(150, abs=4), pytest.approx(200, abs=4))


@pytest.mark.parametrize("slope", [0.1, 0.3])
def test_a_heel_effect_gradient_is_no_plate(slope):
    image = _hand_view(100, 100, 100).astype(float)  # no plate: a background brightening from top to bottom ...
    image += slope * (np.mgrid[: image.shape[0], : image.shape[1]][0] - 200)
    assert mh.find_carrier(np.clip(image, 0, 255).astype(np.uint8)) is None  # ... whose Otsu halves have no rim


def test_the_field_is_found_inside_a_plate_rectangle_that_took_in_a_dark_surround():
    image = _hand_view(200, 8, 12, True)  # light borders (8% margins) around a dark field, on a black surround ...
    plate = (np.array([150.0, 200.0]), (256.0, 336.0), 0.0)  # ... the plate's rectangle 8 px too large all round
    (cx, cy), (w, h), angle = mh._collimated_field(image, plate)  # surround as dark as the field, then the border
    assert (h, w) == (pytest.approx(268, rel=0.04), pytest.approx(200, rel=0.04)) and angle == 0
    assert (cx, cy) == (pytest.approx(150, abs=3), pytest.approx(200, abs=3))


def test_the_field_is_found_where_the_plate_reaches_past_the_view():
    image = Image.fromarray(_hand_view(200, 8, 12, True)).rotate(6, Image.Resampling.BILINEAR, center=(150, 200),
                                                                 fillcolor=8)
    view = np.asarray(image)[:, 40:]  # the tilted plate's left border half beyond the view: no pixels there
    plate = (np.array([110.0, 200.0]), (240.0, 320.0), math.radians(-6))
    (cx, cy), (w, h), _ = mh._collimated_field(view, plate)
    assert (h, w) == (pytest.approx(268, rel=0.04), pytest.approx(200, rel=0.04))
    assert (cx, cy) == (pytest.approx(110, abs=3), pytest.approx(200, abs=3))


def test_a_plate_with_a_collimated_corner_is_still_found():
    image = _hand_view(25, 25, 25)
    plate = np.zeros(image.shape, bool)
    plate[12:388, 10:290] = True  # a dark plate filling most of the view, on a grey surround ...
    image[~plate] = 120
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    image[plate & ((yy - 12) + (xx - 10) < 150)] = 235  # ... whose top-left corner a bright wedge cuts off
    (cx, cy), (w, h), angle = mh.find_field(image)
    assert (h, w) == (pytest.approx(376, rel=0.04), pytest.approx(280, rel=0.04)) and abs(angle) < 0.03
    assert (cx, cy) == (pytest.approx(150, abs=4), pytest.approx(200, abs=4))


def test_background_beside_a_straight_finger_is_no_plate():
    image = np.full((300, 240), 20, np.uint8)
    image[:, 100:130] = 200  # a straight bright finger across the view: each side is a dark rectangle ...
    assert mh.find_carrier(image) is None  # ... but what lies outside it is as dark: not a plate standing out


def _capsule(shape, p0, p1, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(float)
    d = np.subtract(p1, p0, dtype=float)
    t = np.clip(((xx - p0[0]) * d[0] + (yy - p0[1]) * d[1]) / (d @ d), 0, 1)
    return np.hypot(xx - p0[0] - t * d[0], yy - p0[1] - t * d[1]) <= radius


def _drawn_hand(shape, cx, wrist_y, s=1.0):
    """(hand, bones) masks: a forearm from the bottom edge, a palm, four fingers and a thumb (s: scale)."""
    hand, bones = np.zeros(shape, bool), np.zeros(shape, bool)
    bottom = shape[0] + 20
    hand |= _capsule(shape, (cx, bottom), (cx, wrist_y), 34 * s)  # forearm
    hand |= _capsule(shape, (cx - 12 * s, wrist_y - 25 * s), (cx + 12 * s, wrist_y - 25 * s), 38 * s)  # palm
    bones |= _capsule(shape, (cx - 14 * s, bottom), (cx - 14 * s, wrist_y + 5 * s), 9 * s)  # radius
    bones |= _capsule(shape, (cx + 14 * s, bottom), (cx + 14 * s, wrist_y + 5 * s), 8 * s)  # ulna
    for i, dx in enumerate((-33, -11, 11, 32)):
        base = np.array([cx + dx * s, wrist_y - 55 * s])
        tip = base + [dx * 0.25 * s, -(95 - 8 * abs(i - 1.5)) * s]
        hand |= _capsule(shape, base, tip, 9.5 * s)
        bones |= _capsule(shape, base + [0, 40 * s], base, 5 * s) | _capsule(shape, base, tip + [0, 6 * s], 4.5 * s)
    thumb0 = np.array([cx - 38 * s, wrist_y - 15 * s])
    thumb1 = thumb0 + [-45 * s, -45 * s]
    hand |= _capsule(shape, thumb0, thumb1, 11 * s)
    bones |= _capsule(shape, thumb0 + [8 * s, 8 * s], thumb1 + [6 * s, 6 * s], 5 * s)
    return hand, bones & hand


def _radiograph(shape=(400, 300), background=20, soft=90, bone=200, noise=4.0, hands=((150, 250, 1.0),), seed=0):
    """A view of `background` around hands (soft tissue over textured bones), blurred and noisy; and the true
    hand mask."""
    rng = np.random.default_rng(seed)
    image, truth = np.full(shape, float(background)), np.zeros(shape, bool)
    for cx, wrist_y, s in hands:
        hand, bones = _drawn_hand(shape, cx, wrist_y, s)
        texture = ndimage.gaussian_filter(rng.normal(0, 1, shape), 1.5)
        image[hand] = soft
        image[bones] = bone + 0.12 * abs(bone - soft) * texture[bones] / texture.std()  # trabecular texture
        truth |= hand
    image = ndimage.gaussian_filter(image, 1.0) + rng.normal(0, noise, shape)
    return np.clip(image, 0, 255).astype(np.uint8), truth


def _warped(truth, out):
    return mh._warp(truth.astype(np.uint8) * 255, out["affine"].astype(float), out["mask"].shape[0]) >= 128


@pytest.mark.parametrize("background, soft, bone, inverted", [
    (165, 180, 225, False),  # 1: a light-grey background, not inverted: bones still brighter than soft tissue
    (120, 95, 40, True),  # 2: truly inverted on a mid-grey background: dark bones
])
def test_polarity_comes_from_the_content_not_the_background_level(background, soft, bone, inverted, tmp_path):
    image, truth = _radiograph(background=background, soft=soft, bone=bone)
    out = mh.preprocess_view(_save(tmp_path, image), mh.PreprocessConfig(size=128))
    assert out["inverted"] == inverted
    assert mh.mask_iou(out["mask"], out["affine"], truth) >= 0.85  # the hand, not the background


def test_a_faint_hand_in_the_grain_is_smoothed_before_its_levels_are_searched():
    ious = {True: [], False: []}
    for seed in range(3):  # soft tissue 2 grain SDs above the background, bone 7.5: a dim view at working size
        image, truth = _radiograph(shape=(128, 128), background=20, soft=28, bone=50, noise=4,
                                   hands=((64, 100, 0.33),), seed=seed)
        for smoothed in ious:
            rules = mh.MaskRules() if smoothed else mh.MaskRules(faint_noise=0.0)  # (0: no view is faint)
            mask, inverted = mh.hand_mask(image, np.ones(image.shape, bool), rules)
            assert not inverted
            ious[smoothed].append((mask & truth).sum() / (mask | truth).sum())
    assert np.mean(ious[True]) >= np.mean(ious[False]) + 0.1  # more of its soft tissue found
    assert min(ious[True]) >= 0.65


def test_a_low_contrast_plate_is_not_taken_for_the_hand():
    image, truth = _radiograph(shape=(128, 128), background=60, soft=70, bone=92, noise=2, hands=((64, 85, 0.4),))
    image[:3], image[-3:], image[:, :3], image[:, -3:] = 15, 15, 15, 15  # a thin dark margin around the plate
    mask, inverted = mh.hand_mask(image, np.ones(image.shape, bool))
    assert not inverted and mask.mean() < 0.3  # not the plate (0.88 of the square) ...
    assert (mask & truth).sum() / (mask | truth).sum() >= 0.8  # ... but the hand


@pytest.mark.parametrize("slope", [0.06, 0.1])
def test_a_heel_effect_is_flattened_from_the_background_not_the_rim(slope):
    image, truth = _radiograph(shape=(512, 512), background=22, soft=40, bone=80, noise=3, hands=((256, 400, 1.3),))
    image = image + slope * (np.mgrid[:512, :512][1] - 256.0)  # a heel effect across the view ...
    border = np.ones(truth.shape, bool)
    border[24:-24, 24:-24] = False
    image[border] = 110  # ... inside a uniform light border all along the rim, which says nothing of it
    mask, _ = mh.hand_mask(np.clip(image, 0, 255).astype(np.uint8), np.ones(truth.shape, bool))
    truth &= ~border
    assert (mask & truth).sum() / (mask | truth).sum() >= 0.85


def test_a_level_that_shows_the_plate_keeps_no_strip_beside_it():
    rng = np.random.default_rng(0)
    work = rng.normal(100, 10, (128, 128))  # textured everywhere, so only shape decides
    inside = np.ones(work.shape, bool)
    ring = inside & ~ndimage.binary_erosion(inside, iterations=6, border_value=0)
    fg = np.zeros(work.shape, bool)
    fg[28:120, 8:120] = True  # the field above the threshold (0.63 of the view), filled: the hand lies within it
    fg[12:20, 30:100] = True  # a border strip beside it, hand-sized
    assert not mh._hand_components(fg, work, ring, inside, 1.0, 50.0).any()  # this level shows no hand


def test_two_hands_are_both_masked_and_a_bright_plate_edge_is_not(tmp_path):
    image, truth = _radiograph(shape=(320, 440), background=25, soft=95, bone=200,
                               hands=((120, 190, 0.8), (320, 190, 0.8)))
    image[:, -10:] = 215  # a bright plate edge along the right side
    out = mh.preprocess_view(_save(tmp_path, image), mh.PreprocessConfig(size=128))
    mask = out["mask"].astype(bool)
    for half in (slice(0, 220), slice(220, 440)):  # each hand, alone
        one = np.zeros_like(truth)
        one[:, half] = truth[:, half]
        assert (mask & _warped(one, out)).sum() >= 0.85 * _warped(one, out).sum()
    edge = np.zeros(truth.shape, bool)
    edge[:, -10:] = True
    assert not (mask & _warped(edge, out)).any()
    assert mh.mask_iou(out["mask"], out["affine"], truth) >= 0.8


def test_the_field_is_not_a_dark_rectangle_beside_the_hand(tmp_path):
    image, truth = _radiograph(shape=(400, 420), background=160, soft=175, bone=225, hands=((320, 250, 0.9),))
    image[:, :230] = np.random.default_rng(1).normal(30, 3, (400, 230)).clip(0, 255)  # a dark rectangle, no hand
    truth[:, :230] = False
    out = mh.preprocess_view(_save(tmp_path, image), mh.PreprocessConfig(size=128))
    assert mh.mask_iou(out["mask"], out["affine"], truth) >= 0.85  # the crop keeps the hand


def test_a_marker_strip_along_an_edge_stays_out_of_the_mask(tmp_path):
    image, truth = _radiograph()
    strip = np.zeros(truth.shape, bool)
    strip[120:300, :62] = True  # a lead marker strip along the left edge, touching the thumb
    image[strip] = 235
    truth &= ~strip
    out = mh.preprocess_view(_save(tmp_path, image), mh.PreprocessConfig(size=128))
    assert (out["mask"].astype(bool) & _warped(strip, out)).sum() < 0.05 * _warped(strip, out).sum()
    assert mh.mask_iou(out["mask"], out["affine"], truth) >= 0.85


def _lead_tag(image, center, size, holder, lead, angle=0.0):
    """Draw a lead tag into `image` (float): a solid holder `size` (w, h) at `holder`, with a bold letter at `lead`;
    return its pixels."""
    w, h = size
    patch = Image.new("L", (w * 4, h * 4), 0)
    draw = ImageDraw.Draw(patch)
    font = ImageFont.load_default(size=int(w * 3))
    draw.text((w * 0.6, h * 0.2), "R", fill=255, font=font, stroke_width=int(w * 0.25), stroke_fill=255)
    letter = np.asarray(patch.resize((w, h), Image.Resampling.BOX), float) / 255
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    box = mh.rect_mask(image.shape, (np.asarray(center, float), (w, h), angle))
    y0, x0 = int(center[1] - h / 2 + 0.5), int(center[0] - w / 2 + 0.5)
    image[box] = holder
    image[y0:y0 + h, x0:x0 + w] += (lead - image[y0:y0 + h, x0:x0 + w]) * letter * box[y0:y0 + h, x0:x0 + w]
    return box


@pytest.mark.parametrize("background, soft, bone, holder, gap", [(20, 90, 200, 140, 6), (20, 90, 200, 140, 30),
                                                                  (150, 180, 230, 90, 8)])
def test_a_lead_tag_beside_the_hand_stays_out_of_the_mask(background, soft, bone, holder, gap, tmp_path):
    # a solid holder (lighter, or darker than a light-grey field) with a bold lead letter, off the little finger
    image, truth = _radiograph(background=background, soft=soft, bone=bone)
    image = image.astype(float)
    x_little = np.flatnonzero(truth[100:160].any(0))[-1]  # the little finger's side, beside the fingers
    tag = _lead_tag(image, (x_little + gap + 18, 130), (34, 70), holder, 250)
    out = mh.preprocess_view(_save(tmp_path, np.clip(image, 0, 255).astype(np.uint8)), mh.PreprocessConfig(size=128))
    in_square = _warped(tag, out)
    assert (out["mask"].astype(bool) & in_square).sum() <= 0.02 * in_square.sum()
    assert mh.mask_iou(out["mask"], out["affine"], truth & ~tag) >= 0.85


def test_a_dim_hand_wins_over_a_bright_tag(tmp_path):
    # a faint hand (soft tissue 10, bone 25 levels over the background), a lead tag the brightest thing in the view
    image, truth = _radiograph(background=20, soft=30, bone=45, noise=2)
    image = image.astype(float)
    tag = _lead_tag(image, (40, 60), (40, 80), 110, 250)
    out = mh.preprocess_view(_save(tmp_path, np.clip(image, 0, 255).astype(np.uint8)), mh.PreprocessConfig(size=128))
    assert not out["inverted"] and (out["mask"].astype(bool) & _warped(tag, out)).sum() == 0
    assert mh.mask_iou(out["mask"], out["affine"], truth & ~tag) >= 0.85


def test_a_narrow_close_up_keeps_its_hand(tmp_path):
    # a finger along a view four times as tall as wide, from its bottom side to a tip near the top, background
    # beside it: the finger covers more than a third of the view and much of its rim
    shape = (400, 100)
    finger = _capsule(shape, (50, 50), (55, 440), 28)
    bone = _capsule(shape, (50, 62), (55, 440), 12)
    rng = np.random.default_rng(3)
    image = np.where(finger, 90.0, 20.0)
    texture = ndimage.gaussian_filter(rng.normal(0, 1, shape), 1.5)
    image[bone] = 190 + 12 * (texture / texture.std())[bone]  # trabecular texture, as _radiograph's
    image = ndimage.gaussian_filter(image, 1.0) + rng.normal(0, 3, shape)
    out = mh.preprocess_view(_save(tmp_path, np.clip(image, 0, 255).astype(np.uint8)), mh.PreprocessConfig(size=128))
    assert mh.mask_iou(out["mask"], out["affine"], finger) >= 0.85


def test_tags_are_found_off_the_hand_and_bones_are_not_tags():
    rng = np.random.default_rng(0)
    small = np.full((128, 128), 20.0)
    small[30:100, 50:90] = 60  # soft tissue ...
    small[40:90, 62:72] = 150  # ... around a straight bone: a rectangle, but not on the background
    small[10:30, 10:22] = 140  # a tag on the background
    small[15:22, 13:19] = 240  # its letter
    small = ndimage.gaussian_filter(small, 0.7) + rng.normal(0, 1.5, small.shape)
    inside = np.ones(small.shape, bool)
    tags = mh._find_tags(small, inside, 20.0, 1.5, float(small.min()), 240.0, mh.MaskRules())
    assert tags[10:30, 10:22].mean() > 0.9 and not tags[30:100, 50:90].any()


def test_anomaly_cache_is_rebuilt_when_the_pipeline_changes(tiny_phantom, tmp_path, monkeypatch):
    paths = list(mh.studies_to_images(mh.load_studies(tiny_phantom, "train", "XR_HAND"))["image_path"][:3])
    cfg = mh.PreprocessConfig(size=32)
    first = mh.build_anomaly_cache(paths, cfg, tmp_path, workers=1, progress=False)
    assert mh.build_anomaly_cache(paths, cfg, tmp_path, workers=1, progress=False).folder == first.folder
    monkeypatch.setattr(mh, "ANOMALY_PIPELINE_VERSION", mh.ANOMALY_PIPELINE_VERSION + 1)
    assert mh.build_anomaly_cache(paths, cfg, tmp_path, workers=1, progress=False).folder != first.folder
    for rules in ({"crop_rules": replace(mh.CropRules(), step=4.0)},  # a changed rule: a new cache, no version bump
                  {"mask_rules": replace(mh.MaskRules(), hole_share=0.01)}):
        changed = mh.PreprocessConfig(size=32, **rules)
        assert mh.build_anomaly_cache(paths, changed, tmp_path, workers=1, progress=False).folder != first.folder
    with pytest.raises(mh.ConfigError, match="mask_rules must be a MaskRules"):
        mh.PreprocessConfig(mask_rules={"hole_share": 0.01})


# the crop's and the mask's functions: every threshold in them is a named rule (CropRules, MaskRules)
RULED_FUNCTIONS = ("_block_means", "_plate_thresholds", "_plate_candidates", "_plate_rect", "_holds_the_detail",
                   "_sides_are_steps", "find_carrier", "_border_band",
                   "_collimated_field", "find_field", "_class_thresholds", "_hand_components", "_commonest_level",
                   "_without_frame", "_background_level", "_hand_mask", "_find_tags", "_tag_shaped",
                   "_without_tag_shapes")


def _commented_lines(source: str) -> set[int]:
    return {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT}


def test_a_tag_shaped_piece_apart_from_the_hand_leaves_the_mask():
    found = np.zeros((128, 128), bool)
    found[30:110, 20:60] = True  # a hand (a forearm and palm) ...
    found[20:30, 25:30] = found[20:30, 35:40] = True  # ... with fingers
    found[40:60, 90:100] = True  # a tag: 10 x 20 px, apart from it (a letter or text broke its rim: not found)
    found[75:85, 80:84] = True
    found[75:79, 84:95] = True  # an L-shaped piece: no rectangle
    kept = mh._without_tag_shapes(found, np.ones_like(found), mh.MaskRules())
    assert not kept[40:60, 90:100].any()
    assert kept[30:110, 20:60].all() and kept[75:85, 80:84].all()
    second = found.copy()
    second[30:110, 80:120] = True  # a second hand, as large: kept
    assert (mh._without_tag_shapes(second, np.ones_like(found), mh.MaskRules()) == second).all()


def test_every_number_in_the_crop_and_mask_functions_is_a_named_rule():
    bare = []
    for name in RULED_FUNCTIONS:
        source = textwrap.dedent(inspect.getsource(getattr(mh, name)))
        commented = _commented_lines(source)
        for node in ast.walk(ast.parse(source)):
            if (isinstance(node, ast.Constant) and type(node.value) in (int, float) and node.value not in (0, 1, 2)
                    and node.lineno not in commented):  # a literal explains itself in a comment on its line
                bare.append(f"{name}: {node.value!r} in {source.splitlines()[node.lineno - 1].strip()!r}")
    assert not bare, "\n".join(bare)


@pytest.mark.parametrize("rules", [mh.CropRules, mh.MaskRules])
def test_every_rule_is_commented_and_used(rules):
    source = textwrap.dedent(inspect.getsource(rules))
    commented = _commented_lines(source)
    module = inspect.getsource(mh).replace(source, "")
    for f in fields(rules):
        line = next(i for i, text in enumerate(source.splitlines(), 1) if re.match(rf"\s*{f.name}:", text))
        assert line in commented, f"{rules.__name__}.{f.name} says nowhere what it measures and why its value"
        assert re.search(rf"rules\.{f.name}\b", module), f"{rules.__name__}.{f.name} is never used"


@pytest.mark.parametrize("grain", [6, 8])
def test_film_grain_raises_no_doubt_about_a_right_mask(grain, tmp_path):
    image, truth = _radiograph(background=20, soft=70, bone=190, noise=2, seed=1)
    blurred = ndimage.gaussian_filter(np.random.default_rng(5).normal(0, 1, image.shape), 2.0)  # grain over 2 px
    image = np.clip(image + grain * blurred / blurred.std(), 0, 255).astype(np.uint8)
    out = mh.preprocess_view(_save(tmp_path, image), mh.PreprocessConfig(size=128))
    assert mh.mask_iou(out["mask"], out["affine"], truth) >= 0.85
    assert all(out["doubts"][name] <= limit for name, limit in mh.MASK_DOUBT_LIMITS.items()), out["doubts"]


def test_mask_doubts_flag_a_cut_and_a_hand_left_out_not_grain():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:128, :128]
    hand, other = (np.abs(xx - 40) < 15) & (yy > 20), (np.abs(xx - 95) < 12) & (yy > 40)
    grain = ndimage.gaussian_filter(rng.normal(0, 1, hand.shape), 1.0)
    work = 20 + 50.0 * (hand | other) + 4 * grain / grain.std()
    above, inside = work > 35, np.ones(hand.shape, bool)  # the floor at 35: grain crosses it here and there
    ring = inside & ~ndimage.binary_erosion(inside, iterations=6, border_value=0)
    rules, limits = mh.MaskRules(), mh.MASK_DOUBT_LIMITS
    right = mh._mask_doubts(hand | other, above, above, inside, ring, rules)
    assert all(right[name] <= limit for name, limit in limits.items()), right
    cut = mh._mask_doubts((hand | other) & (yy > 70), above, above, inside, ring, rules)  # cut through both
    assert cut["cut"] > limits["cut"]
    left_out = mh._mask_doubts(hand, above, above, inside, ring, rules)  # the second hand missed
    assert left_out["missed"] > limits["missed"] and left_out["cut"] <= limits["cut"]


def test_suspect_masks_are_listed(tmp_path):
    masks = np.zeros((3, 10, 10), np.uint8)
    masks[0, :9], masks[1, :3] = 1, 1  # the whole field taken for the hand; a plausible hand; nothing
    for name, array in (("images", np.zeros_like(masks)), ("masks", masks), ("affines", np.zeros((3, 2, 3)))):
        np.save(tmp_path / f"{name}.npy", array)
    cache = mh.AnomalyCache(tmp_path, ["a.png", "b.png", "c.png"], mh.PreprocessConfig(size=10))
    suspects = mh.suspect_masks(cache)
    assert list(suspects["image_path"]) == ["a.png", "c.png"] and suspects["mask_share"].tolist() == [0.9, 0.0]
    assert "more than 45%" in suspects["problem"][0] and "under 2%" in suspects["problem"][1]
    unsegmented = mh.AnomalyCache(tmp_path, ["a.png", "b.png", "c.png"], mh.PreprocessConfig(size=10, segment=False))
    assert mh.suspect_masks(unsegmented).empty  # its mask is the view, not a hand


def test_suspect_masks_flag_doubtful_masks_of_a_plausible_size(tmp_path):
    masks = np.zeros((2, 10, 10), np.uint8)
    masks[:, :3] = 1  # both of a plausible share ...
    doubts = np.zeros((2, len(mh.MASK_DOUBTS)), np.float32)
    doubts[1, list(mh.MASK_DOUBTS).index("cut")] = 0.5  # ... but the second's edge cuts through foreground
    for name, array in (("images", np.zeros_like(masks)), ("masks", masks), ("affines", np.zeros((2, 2, 3))),
                        ("doubts", doubts)):
        np.save(tmp_path / f"{name}.npy", array)
    cache = mh.AnomalyCache(tmp_path, ["a.png", "b.png"], mh.PreprocessConfig(size=10))
    suspects = mh.suspect_masks(cache)
    assert list(suspects["image_path"]) == ["b.png"] and "cuts through foreground" in suspects["problem"][0]
    assert mh.suspect_masks(cache, limits=None).empty  # shares only


def test_carrier_search_skips_lines_and_specks():
    image = np.zeros((100, 80), np.uint8)
    image[:, 40] = 255  # a one-pixel line has no area: not a plate, and no error from the hull
    found = mh.find_carrier(image)  # (the dark half beside it is a fine rectangle)
    assert found is None or min(found[1]) > 2


def test_carrier_crop_falls_back_to_the_whole_view(tmp_path):
    noise = np.random.default_rng(1).integers(0, 255, (200, 160)).astype(np.uint8)
    assert mh.find_carrier(noise) is None
    path = tmp_path / "noise.png"
    Image.fromarray(noise).save(path)
    out = mh.preprocess_view(path, mh.PreprocessConfig(crop=True, segment=False, equalize=None, size=64))
    assert not out["carrier_found"] and out["mask"].mean() == pytest.approx(160 / 200, abs=0.03)  # content, padded


def test_affine_maps_original_pixels_onto_the_preprocessed_square(tmp_path):
    image = _tilted_plate(-9, 120, 10)
    image[100:104, 250:254] = 255  # a bright dot to follow
    path = tmp_path / "plate.png"
    Image.fromarray(image).save(path)
    out = mh.preprocess_view(path, mh.PreprocessConfig(crop=True, segment=False, equalize=None, size=128))
    assert out["carrier_found"]
    expected = out["affine"] @ np.array([251.5, 101.5, 1.0])
    found = np.unravel_index(np.argmax(out["image"]), out["image"].shape)[::-1]
    assert np.abs(np.array(found) - expected).max() <= 2


def test_hand_mask_on_the_phantom(tiny_phantom):
    findings = mh.load_phantom_findings(tiny_phantom)
    cfg = mh.PreprocessConfig(size=128)
    hits, shares = [], []
    for f in findings.itertuples():
        out = mh.preprocess_view(f.image_file, cfg)
        mask = out["mask"].astype(bool)
        shares.append(mask.mean())
        cx, cy = out["affine"] @ np.array([(f.x0 + f.x1) / 2, (f.y0 + f.y1) / 2, 1.0])
        hits.append(mask[int(round(cy)), int(round(cx))])
        assert (out["image"][~mask] == 0).all()  # "full": the background is removed
    assert np.mean(hits) >= 0.8  # the planted findings lie on bones, inside the hand
    assert 0.05 < np.median(shares) < 0.7


def test_a_small_square_has_the_mask_of_a_working_size_one(tiny_phantom):
    truth = mh.load_phantom_truth(tiny_phantom).head(16)
    ious = {size: [] for size in (128, 32)}
    for row in truth.itertuples():
        hand = mh.phantom_hand_mask(row.mask_file)
        for size in ious:
            out = mh.preprocess_view(row.image_file, mh.PreprocessConfig(size=size))
            ious[size].append(mh.mask_iou(out["mask"], out["affine"], hand))
    large, small = np.array(ious[128]), np.array(ious[32])
    assert np.median(small) >= np.median(large) - 0.05  # found at 128 px and averaged down, not found at 32
    assert (small[large >= 0.5] >= 0.5).all()  # no hand lost at 32 px that 128 px keeps


def test_variants_switch_steps_off():
    variants = mh.preprocess_variants(256)
    assert list(variants) == ["raw", "raw+HE", "crop", "crop+HE", "full", "full+HE"]
    assert variants["raw"] == mh.PreprocessConfig(crop=False, segment=False, equalize=None, size=256)
    with pytest.raises(ValueError, match="unknown preprocessing"):
        mh.preprocess_variants(256, ["cropped"])
    assert mh.preprocess_variants(256, ["full+CLAHE"])["full+CLAHE"].equalize == "clahe"


def test_clahe_and_he_spread_the_intensities_inside_the_hand(tiny_phantom):
    path = mh.studies_to_images(mh.load_studies(tiny_phantom, "train"))["image_path"].iloc[0]
    plain, he, clahe = (mh.preprocess_view(path, mh.preprocess_variants(128, [n])[n])
                        for n in ("full", "full+HE", "full+CLAHE"))
    inside = plain["mask"].astype(bool)
    assert he["image"][inside].std() > plain["image"][inside].std()  # equalised: a wider spread of grey levels
    assert clahe["image"].dtype == np.uint8 and (clahe["image"][~inside] == 0).all()


def test_min_area_rect_of_a_rotated_rectangle():
    a = math.radians(30)
    corners = np.array([[-50, -20], [50, -20], [50, 20], [-50, 20]]) @ np.array([[math.cos(a), math.sin(a)],
                                                                                [-math.sin(a), math.cos(a)]])
    center, (w, h), angle = mh.min_area_rect(corners + [100, 80])
    assert center == pytest.approx([100, 80]) and sorted([w, h]) == pytest.approx([40, 100])
    assert math.degrees(angle) % 90 == pytest.approx(30, abs=1e-6)


# ---------------------------------------------------------------- the split


def test_split_by_patient_as_in_the_paper(normal_heavy_phantom):
    studies = mh.anomaly_split(mh.load_studies(normal_heavy_phantom, "train"), seed=0)
    by_patient = studies.groupby("patient").agg(subset=("subset", "nunique"), positive=("label", "max"),
                                                where=("subset", "first"))
    assert (by_patient["subset"] == 1).all()  # each patient in one subset only
    assert not by_patient.loc[by_patient["where"] == "train", "positive"].any()  # training: normal patients only
    positives = by_patient[by_patient["positive"] == 1]
    counts = positives["where"].value_counts()
    assert set(counts.index) <= {"val", "test"} and abs(counts.get("val", 0) - counts.get("test", 0)) <= 1
    for subset in ("val", "test"):
        rows = by_patient[by_patient["where"] == subset]
        assert (rows["positive"] == 1).sum() == (rows["positive"] == 0).sum()  # as many normal patients
    one = pd.DataFrame({"body_part": ["XR_HAND"] * 4, "patient": ["p1", "p2", "p3", "p4"], "label": [1, 0, 0, 0]})
    with pytest.raises(mh.MuraDataError, match="at least 2 patients with an abnormal study"):
        mh.anomaly_split(one)
    with pytest.raises(mh.MuraDataError, match="more normal-only patients"):
        mh.anomaly_split(pd.DataFrame({"body_part": ["XR_HAND"] * 2, "patient": ["p1", "p2"], "label": [1, 0]}))


# ---------------------------------------------------------------- the models and training


def test_architectures_follow_the_paper():
    cae = mh.build_anomaly_model("cae", 512)
    with torch.no_grad():
        z = cae.encoder(torch.zeros(1, 1, 512, 512))
    assert z.shape == (1, 512, 16, 16)  # their Figure 5 bottleneck
    vae = mh.build_anomaly_model("vae", 512).eval()
    with torch.no_grad():
        h = vae.encoder(torch.zeros(1, 1, 512, 512))
        out = vae(torch.zeros(1, 1, 512, 512))
    assert h.shape == (1, 512, 2, 2) and len(vae.encoder) == 7  # seven stride-2 convolutions to 2x2x512
    assert vae.fc_mu.out_features == 1024 and out["recon"].shape == (1, 1, 512, 512)
    assert vae.decoder[-2].kernel_size == (6, 6)  # the last transposed convolution of their Figure 7
    for size in (64, 128):
        for name in ("cae", "vae"):
            out = mh.build_anomaly_model(name, size)(torch.zeros(2, 1, size, size))
            assert out["recon"].shape == (2, 1, size, size)


def test_gan_architectures_follow_the_paper():
    dcgan = mh.build_anomaly_model("dcgan", 512)
    shapes, x = [], torch.zeros(2, 128)
    with torch.no_grad():
        for layer in dcgan.generator.net[:-1]:  # each block (transposed convolution, BN, ReLU), not the sigmoid
            x = layer(x)
            shapes.append(tuple(x.shape[1:]))
    assert shapes[1:] == [  # their Figure 9, generator
        (1024, 4, 4), (512, 8, 8), (256, 16, 16), (128, 32, 32), (64, 64, 64), (32, 128, 128), (16, 256, 256),
        (1, 512, 512)]
    shapes = []
    with torch.no_grad():
        for block in dcgan.critic.features:
            x = block(x)
            shapes.append(tuple(x.shape[1:]))
        assert dcgan.minibatch(x.flatten(1)).shape == (2, 528) and dcgan.head.out_features == 1
    assert [s for s in shapes if len(s) == 3][:8] == [  # discriminator: 4 channels at 256x256 ... 512 at 1x1
        (4, 256, 256), (8, 128, 128), (16, 64, 64), (32, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 1, 1)]
    for kind, scores in [("dcgan", {"disc"}), ("bigan", {"disc"}), ("alphagan", {"disc", "code_disc", "c+d"})]:
        out = mh.build_anomaly_model(kind, 128).eval()(torch.rand(3, 1, 128, 128))
        assert set(out["scores"]) == scores and all(v.shape == (3,) and v.min() >= 0 and v.max() <= 1
                                                     for v in out["scores"].values())
        assert (out["recon"] is None) == (kind == "dcgan")
        assert out["recon"] is None or out["recon"].shape == (3, 1, 128, 128)
    with pytest.raises(ValueError, match="power-of-two"):
        mh.build_anomaly_model("bigan", 96)
    with pytest.raises(ValueError, match="not a score of dcgan"):
        mh.AnomalyConfig(model="dcgan", image_size=64, select_score="mse")
    assert mh.AnomalyConfig(model="bigan", image_size=64).selection_score == "disc"
    assert mh.AnomalyConfig(model="vae", image_size=64).selection_score == "mse"


def test_minibatch_discrimination_scores_a_view_alone_in_eval():
    torch.manual_seed(0)
    model = mh.build_anomaly_model("dcgan", 16)
    views = torch.rand(6, 1, 16, 16)
    model.train()
    with torch.no_grad():
        model.discriminate(views, remember=True)
        model.discriminate(views[:2], remember=True)  # a short last batch keeps the full reference
    assert int(model.minibatch.reference_size) == 6
    model.eval()
    with torch.no_grad():
        together = model(views)["scores"]["disc"]
        alone = torch.cat([model(views[i:i + 1])["scores"]["disc"] for i in range(6)])
    torch.testing.assert_close(together, alone)  # a score does not depend on the views scored beside it


@pytest.mark.slow
@pytest.mark.parametrize("kind", mh.GAN_MODELS)
def test_gan_discriminator_learns_to_call_noise_abnormal(kind):
    torch.manual_seed(0)
    model = mh.build_anomaly_model(kind, 16, latent=16)
    cfg = mh.AnomalyConfig(model=kind, image_size=16, gan_lr=1e-3)
    optimizers = mh.anomaly_optimizers(model, cfg, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    generator = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    hands = torch.stack([(0.8 - (xx - c) ** 2 - yy**2).clamp(0, 1) for c in torch.linspace(-0.2, 0.2, 8)])[:, None]
    mask = torch.ones_like(hands)
    model.train()
    for _ in range(25):
        losses = mh.gan_step(model, hands, mask, optimizers, scaler, None, generator)
    assert all(p.requires_grad for p in model.parameters())  # the discriminators are trainable again
    assert math.isfinite(float(losses["d_loss"])) and math.isfinite(float(losses["g_loss"]))
    model.eval()
    with torch.no_grad():
        normal = model(hands)["scores"]["disc"].mean()
        noise = model(torch.rand(8, 1, 16, 16))["scores"]["disc"].mean()
    assert noise > normal  # the anomaly score: 1 - D's probability that the view is a normal one


@pytest.mark.slow
def test_gan_training_resumes_exactly(normal_heavy_phantom, tmp_path):
    def config(out, epochs):
        return mh.AnomalyConfig(model="alphagan", data_dir=str(normal_heavy_phantom), output_dir=str(out),
                                cache_dir=str(tmp_path / "cache"), image_size=32, batch_size=8, epochs=epochs,
                                num_workers=0, gan_latent=16, max_steps_per_epoch=3)

    straight = mh.train_anomaly(config(tmp_path / "a", 2), progress=False)
    mh.train_anomaly(config(tmp_path / "b", 1), progress=False)
    resumed = mh.train_anomaly(config(tmp_path / "b", 2), progress=False)
    timing = ["epoch_time_s", "train_images_per_s"]
    np.testing.assert_array_equal(straight.drop(columns=timing).to_numpy(), resumed.drop(columns=timing).to_numpy())
    assert {"train_d_loss", "train_g_loss", "val_auroc_disc", "val_auroc_c+d", "val_auroc_mse"} <= set(straight)
    a, _ = mh.load_anomaly_model(tmp_path / "a" / "checkpoints" / "last.pt")
    b, cfg = mh.load_anomaly_model(tmp_path / "b" / "checkpoints" / "last.pt")
    assert cfg.model == "alphagan" and int(b.minibatch.reference_size) == 8
    with pytest.raises(ValueError, match="rotation_degrees"):  # a resumed run keeps its augmentation
        mh.train_anomaly(mh.AnomalyConfig(**{**mh._config_dict(config(tmp_path / "b", 3)), "rotation_degrees": 0}))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_training_lowers_the_masked_loss_and_resumes_exactly(normal_heavy_phantom, tmp_path):
    def config(out, epochs):
        return mh.AnomalyConfig(model="vae", data_dir=str(normal_heavy_phantom), output_dir=str(out),
                                cache_dir=str(tmp_path / "cache"), image_size=64, batch_size=8, epochs=epochs,
                                num_workers=1, lr=1e-3)  # a worker: its start must not shift the VAE's noise

    straight = mh.train_anomaly(config(tmp_path / "a", 3), progress=False)
    mh.train_anomaly(config(tmp_path / "b", 1), progress=False)
    resumed = mh.train_anomaly(config(tmp_path / "b", 3), progress=False)
    timing = ["epoch_time_s", "train_images_per_s"]
    np.testing.assert_array_equal(straight.drop(columns=timing).to_numpy(), resumed.drop(columns=timing).to_numpy())
    assert straight["train_loss"].iloc[-1] < straight["train_loss"].iloc[0]
    model, cfg = mh.load_anomaly_model(tmp_path / "a" / "checkpoints" / "last.pt")
    assert cfg.model == "vae" and not model.training
    assert {"val_auroc_mse", "val_auroc_kld", "val_auroc_mse+kld"} <= set(straight.columns)


def test_grid_scores_every_model_variant_by_variant(normal_heavy_phantom, tmp_path):
    base = mh.AnomalyConfig(data_dir=str(normal_heavy_phantom), output_dir=str(tmp_path / "grid"),
                            cache_dir=str(tmp_path / "cache"), image_size=64, batch_size=8, epochs=1, num_workers=0,
                            max_steps_per_epoch=2)
    results = mh.run_anomaly_grid(base, ["cae", "vae"], ["raw", "crop+HE"], progress=False)
    runs = results[["variant", "model"]].drop_duplicates().apply(tuple, axis=1).tolist()
    assert runs == [("raw", "CAE"), ("raw", "VAE"), ("raw", "no model"),  # cut short: both models and the floor
                    ("crop+HE", "CAE"), ("crop+HE", "VAE"), ("crop+HE", "no model")]
    assert results["roc_auc"].between(0, 1).all()
    assert (results["roc_auc_ci_low"] <= results["roc_auc"]).all()
    assert (results["roc_auc"] <= results["roc_auc_ci_high"]).all()
    table = mh.anomaly_results_table(results)
    assert list(table.columns) == ["raw", "crop+HE"] and ("VAE", "kld") in table.index and ("CAE", "mse") in table.index
    assert ("no model", "hand_area") in table.index
    labels = mh.anomaly_results_table(results, "roc_auc_ci")
    row = results[(results["model"] == "CAE") & (results["score"] == "mse") & (results["variant"] == "raw")].iloc[0]
    interval = f"{row.roc_auc:.3f} [{row.roc_auc_ci_low:.2f}, {row.roc_auc_ci_high:.2f}]"
    assert labels.loc[("CAE", "mse"), "raw"] == interval
    mh.plot_anomaly_table(table, labels=labels)
    for run_dir in results["run_dir"].unique():
        assert (Path(run_dir) / "test_scores.csv").is_file()
    by_finding = mh.anomaly_findings_table(results, mh.load_phantom_findings(normal_heavy_phantom))
    assert ("CAE", "mse") in by_finding.index and ("no model", "template_mse") in by_finding.index
    n_abnormal = results.loc[results["variant"] == "raw", "n_abnormal"].iloc[0]
    assert by_finding.columns[-1] == "all" and by_finding.attrs["n_abnormal"]["all"] == n_abnormal
    assert sum(n for kind, n in by_finding.attrs["n_abnormal"].items() if kind != "all") == n_abnormal
    assert by_finding.iloc[:, -1].to_numpy() == pytest.approx(table["raw"].loc[by_finding.index].to_numpy())


def test_reference_scores_against_a_hand_computation(tmp_path):
    images = np.zeros((4, 8, 8), np.uint8)
    masks = np.zeros_like(images)
    images[0], images[1] = 100, 200  # training views: the template is their mean, 150, where both are masked
    masks[:2, :4] = 1
    images[2], masks[2, :2] = 150, 1  # a test view that matches the template: error 0
    images[3, :4], masks[3, :4] = 255, 1  # a bright test view: error (255 - 150)^2 over its mask
    images[3, 0, 0] = 0
    for name, array in (("images", images), ("masks", masks), ("affines", np.zeros((4, 2, 3), np.float32))):
        np.save(tmp_path / f"{name}.npy", array)
    paths = [f"v{i}.png" for i in range(4)]
    cache = mh.AnomalyCache(tmp_path, paths, mh.PreprocessConfig(size=8))
    table = pd.DataFrame({"image_path": paths, "study_path": paths, "label": [0, 0, 0, 1]})
    scores = mh.reference_anomaly_scores(cache, table.iloc[[3, 2]], table.iloc[:2], top_k=4, chunk=1)
    assert list(scores["image_path"]) == ["v3.png", "v2.png"]  # in the order asked for
    bright = np.full(32, 105 / 255) ** 2
    bright[0] = (150 / 255) ** 2
    assert scores["template_mse"].tolist() == pytest.approx([bright.mean(), 0], abs=1e-6)
    assert scores["template_mse_top4"].tolist() == pytest.approx([np.sort(bright)[-4:].mean(), 0], abs=1e-6)
    assert scores["intensity"].tolist() == pytest.approx([255 * 31 / 32 / 255, 150 / 255], abs=1e-6)
    assert scores["hand_area"].tolist() == pytest.approx([0.5, 0.25])


def test_error_heatmaps_and_boxes_in_the_preprocessed_frame(normal_heavy_phantom, tmp_path):
    cfg = mh.AnomalyConfig(data_dir=str(normal_heavy_phantom), cache_dir=str(tmp_path), image_size=64)
    data = mh.prepare_anomaly_data(cfg, progress=False)
    findings = mh.load_phantom_findings(normal_heavy_phantom)
    boxes = mh.transform_boxes(findings, data["cache"])
    assert len(boxes) > 0 and (boxes["x1"] > boxes["x0"]).all() and (boxes[["x0", "y0", "x1", "y1"]] < 64).all().all()
    maps = mh.anomaly_heatmaps(mh.build_anomaly_model("cae", 64), data["cache"], list(boxes["image_file"][:3]), "cpu")
    for m in maps:
        assert m["cam"].shape == (64, 64) and m["cam"].max() == pytest.approx(1.0) and m["cam"].min() >= 0
        mask = data["cache"].masks[data["cache"].row_of[m["image_path"]]]
        far = mh.ndimage.distance_transform_edt(mask == 0) > 8  # beyond the smoothing's reach of the hand mask
        assert m["cam"][far].max() < 0.02  # the error is scored inside the mask only
    scored = mh.heatmap_localisation(maps, boxes)
    assert len(scored) >= 3 and scored["heat_in_box"].between(0, 1).all()
    none = mh.transform_boxes(findings.iloc[:0], data["cache"])  # no ground truth in this cache: same columns
    assert none.empty and list(none.columns) == list(boxes.columns)


def test_metrics_per_study_and_per_image():
    scores = pd.DataFrame({"study_path": ["a", "a", "b", "c"], "label": [1, 1, 0, 0], "image_path": list("wxyz"),
                           "patient": ["p", "p", "q", "r"], "mse": [0.9, 0.1, 0.3, 0.2]})
    study = mh.anomaly_metrics(scores)
    assert study.loc["mse", "roc_auc"] == 1.0 and study.loc["mse", "n"] == 3  # study a: mean 0.5 beats 0.3, 0.2
    image = mh.anomaly_metrics(scores, level="image")
    assert image.loc["mse", "roc_auc"] == 0.5 and image.loc["mse", "n"] == 4 and image.loc["mse", "n_patients"] == 3
    with pytest.raises(ValueError, match="by patient needs a 'patient' column"):
        mh.anomaly_metrics(scores.drop(columns="patient"))


def test_intervals_resample_patients_at_both_levels():
    rng = np.random.default_rng(0)
    rows = []
    for p in range(30):  # 30 patients, 2 studies of 2 views each; a patient's views share most of their score
        label, shift = p % 3 == 0, rng.normal()
        for st in range(2):
            for v in range(2):
                rows.append({"patient": f"p{p}", "study_path": f"p{p}/s{st}", "image_path": f"p{p}/s{st}/v{v}",
                             "label": int(label), "mse": shift + 0.6 * label + 0.1 * rng.normal()})
    scores = pd.DataFrame(rows)
    for level in ("image", "study"):
        table = mh.anomaly_metrics(scores, level, n_boot=500, seed=1)
        data = scores if level == "image" else mh.study_scores(scores)
        by_patient = mh.auroc_interval(data["label"], data["mse"], 500, 1, patients=data["patient"])
        by_row = mh.auroc_interval(data["label"], data["mse"], 500, 1)
        assert (table.loc["mse", "roc_auc_ci_low"], table.loc["mse", "roc_auc_ci_high"]) == pytest.approx(by_patient)
        assert table.loc["mse", "resampled"] == "patient" and table.loc["mse", "n_patients"] == 30
        rows_table = mh.anomaly_metrics(scores, level, n_boot=500, seed=1, resample="rows")
        assert (rows_table.loc["mse", "roc_auc_ci_low"], rows_table.loc["mse", "roc_auc_ci_high"]) == \
            pytest.approx(by_row)
        # views and studies of a patient move together: the honest interval is the wider one
        assert by_patient[1] - by_patient[0] > by_row[1] - by_row[0]


# ---------------------------------------------------------------- recipes: theirs ("paper") and ours ("suite")

def test_recipes_fill_what_is_not_given_and_explicit_values_win():
    cae = mh.AnomalyConfig(model="cae", recipe="paper", image_size=64)
    assert (cae.epochs, cae.batch_size, cae.lr) == (1000, 32, 1e-4)  # run_params.py BaselineAutoencoder
    assert cae.vflip and cae.rotation_degrees == 20 and cae.scale_range == (0.8, 1.2) and cae.augment_p == 0.5
    assert cae.hand_crop and cae.minmax and cae.architecture == "paper"
    suite = mh.AnomalyConfig(model="cae", image_size=64)
    assert (suite.epochs, suite.batch_size, suite.lr, suite.vflip, suite.hand_crop) == (20, 16, 5e-4, False, False)
    mine = mh.AnomalyConfig(model="dcgan", recipe="paper", image_size=64, batch_size=4, gan_lr=3e-3)
    assert (mine.batch_size, mine.gan_lr, mine.d_lr, mine.gan_latent) == (4, 3e-3, 1e-5, 2048)
    assert set(mine.explicit) == {"batch_size", "gan_lr"}
    again = mh._grid_config(mine, model="bigan")  # the grid: another model takes its own preset, keeps the given
    assert (again.batch_size, again.gan_lr, again.d_lr, again.gan_latent) == (4, 3e-3, 5e-6, 100)
    assert mh._grid_config(suite, model="dcgan", recipe="paper").batch_size == 80
    with pytest.raises(ValueError, match="recipe must be one of"):
        mh.AnomalyConfig(recipe="theirs")


def test_paper_recipe_is_their_last_commit_and_cites_it():
    expected = {  # run_params.py @ c801459 (and alphagan.py:373 for the code discriminator)
        "cae": {"epochs": 1000, "batch_size": 32, "lr": 1e-4, "rotation_degrees": 20.0, "augment_p": 0.5},
        "vae": {"epochs": 500, "batch_size": 32, "lr": 5e-5, "vae_latent": 1024, "vflip": True, "augment_p": 1.0},
        "dcgan": {"epochs": 500, "batch_size": 80, "gan_lr": 1e-3, "d_lr": 1e-5, "gan_latent": 2048,
                  "label_noise": 0.01},
        "bigan": {"epochs": 500, "batch_size": 16, "gan_lr": 1e-3, "d_lr": 5e-6, "gan_latent": 100},
        "alphagan": {"epochs": 500, "batch_size": 16, "gan_lr": 1e-3, "d_lr": 1e-4, "code_lr": 1e-6,
                     "gan_latent": 100, "recon_weight": 0.01, "masked_loss": False},
    }
    for model, values in expected.items():
        cfg = mh.AnomalyConfig(model=model, recipe="paper", image_size=64)
        assert {k: getattr(cfg, k) for k in values} == values, model
        assert cfg.input_range == ((0.0, 1.0) if model in ("cae", "vae") else (-1.0, 1.0))  # their normalisation
        assert (cfg.mask_from, cfg.minmax, cfg.hand_crop) == ("input", True, True)
    vae = mh.AnomalyConfig(model="vae", recipe="paper", image_size=64)
    assert (vae.vae_loss, vae.loss_reduction, vae.kld_in_sums, vae.masked_loss, vae.masked_scores, vae.smooth_l1) == \
        ("bce", "batch", "raw", False, False, True)
    suite = mh.AnomalyConfig(model="alphagan", image_size=64)
    assert (suite.input_range, suite.mask_from, suite.loss_reduction, suite.recon_weight) == ((0.0, 1.0), "hand",
                                                                                              "image", 10.0)
    # every paper value that differs from the suite's says where it comes from in their code (file:line)
    for model in mh.ANOMALY_MODELS:
        paper, ours = mh.recipe_settings("paper", model), mh.recipe_settings("suite", model)
        for key in mh.RECIPE_SETTINGS:
            if key != "architecture" and paper[key] != ours[key]:
                assert re.search(r"\.(py|csv):\d+", mh.paper_source(model, key)), (model, key)
    for text in (v for (_, recipe), v in mh.ARCHITECTURES.items() if recipe == "paper"):
        assert re.search(r"\.py:\d+", text)


def test_paper_autoencoders_are_their_code():
    suite = mh.build_anomaly_model("cae", 64)
    paper = mh.build_anomaly_model("cae", 64, architecture="paper")
    deconv = [m for m in paper.decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(m.kernel_size, m.stride) for m in deconv] == [((4, 4), (2, 2))] * 5 + [((3, 3), (1, 1))]
    assert deconv[-1].bias is None  # autoencoders.py:79-82: bias=not batch_normalisation, the last one too
    assert [type(m) for m in list(paper.decoder)[-2:]] == [torch.nn.ReLU, torch.nn.Tanh]  # ReLU, then Tanh
    assert not any(type(m) is torch.nn.Conv2d for m in paper.decoder.modules())
    assert sum(type(m) is torch.nn.Conv2d for m in suite.decoder.modules()) == 5  # four 3x3 blocks + the last
    assert isinstance(list(suite.decoder)[-1], torch.nn.Sigmoid)
    assert str(paper.encoder) == str(suite.encoder)  # the encoder matches
    vae = mh.build_anomaly_model("vae", 512, architecture="paper", vae_latent=1024)
    with torch.no_grad():
        h = vae.encoder(torch.zeros(1, 1, 512, 512))
    assert h.shape == (1, 512, 2, 2) and len(vae.encoder) == 7  # vaetorch.py:27 UnFlatten 512x2x2, h_dim 2048
    assert vae.fc_mu.in_features == 2048 and vae.fc_mu.out_features == 1024 and vae.decoder[-2].kernel_size == (6, 6)
    small = mh.build_anomaly_model("vae", 64, architecture="paper").eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():  # their forward draws z when scoring too (vaetorch.py:139); the suite's takes the mean
        assert not torch.equal(small(x)["recon"], small(x)["recon"])
        ours = mh.build_anomaly_model("vae", 64).eval()
        assert torch.equal(ours(x)["recon"], ours(x)["recon"])
    assert mh.AnomalyConfig(model="vae", image_size=128).vae_loss == "mse"


def test_loss_terms_and_their_reductions():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return {"recon": torch.full_like(x, 0.25), "mu": torch.ones(len(x), 3), "logvar": torch.zeros(len(x), 3)}
    x = torch.zeros(2, 1, 4, 4)
    x[:, :, :2] = 1
    out = Fixed()(x)
    ones = torch.ones_like(x)
    bce = (-math.log(0.25) - math.log(0.75)) / 2  # half the pixels 1, half 0, against 0.25
    kld = 0.5 * 3  # per image: mu = 1 in 3 dimensions
    # the suite ("image"): per-image means, the KLD per pixel; theirs ("batch"): BCE over all pixels (F.bce mean,
    # vaetorch.py:163) + the KLD summed over the batch and the code (vaetorch.py:165)
    assert float(mh.autoencoder_loss(x, out, ones, 1.0, "bce")) == pytest.approx(bce + kld / 16, rel=1e-5)
    assert float(mh.autoencoder_loss(x, out, ones, 1.0, "bce", "batch")) == pytest.approx(bce + 2 * kld, rel=1e-5)
    assert float(mh.autoencoder_loss(x, out, ones, 1.0, "mse")) == pytest.approx((0.75**2 + 0.25**2) / 2 + kld / 16)
    # the masked MSE (CAE): theirs sums errors over the batch over the mask's pixels summed over the batch
    # (autoencoders.py:35-37), so an image with a bigger hand weighs more; the suite averages per-image means
    mask = torch.zeros_like(x)
    mask[0, :, :2] = 1  # image 0: 8 pixels, error 0.75^2 each
    mask[1, :, :, :1] = 1  # image 1: 4 pixels, 2 with error 0.75^2, 2 with 0.25^2
    cae = {"recon": out["recon"], "mu": None, "logvar": None}
    per_image = (0.75**2 + (2 * 0.75**2 + 2 * 0.25**2) / 4) / 2
    pooled = (10 * 0.75**2 + 2 * 0.25**2) / 12
    assert float(mh.autoencoder_loss(x, cae, mask)) == pytest.approx(per_image)
    assert float(mh.autoencoder_loss(x, cae, mask, reduction="batch")) == pytest.approx(pooled)
    # alpha-GAN (alphagan.py:463): 0.01 x nn.L1Loss over every pixel: the paper step's encoder loss minus its C terms
    torch.manual_seed(0)
    net = mh.build_anomaly_model("alphagan", 16, 8, "paper").eval()  # eval: BN and spectral norm hold still
    cfg = mh.AnomalyConfig(model="alphagan", recipe="paper", image_size=16, gan_latent=8)
    views = torch.rand(4, 1, 16, 16) * 2 - 1
    optimizers = {k: torch.optim.SGD(v, lr=0.0) for k, v in net.parameter_groups().items()}
    torch.manual_seed(1)
    losses = mh.paper_gan_step(net, views, optimizers, torch.amp.GradScaler("cpu", enabled=False), None,
                               torch.Generator().manual_seed(0), cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        code = net.encode(views, sample=True)
        c = net.code_critic(code)[:, 0]
        l1 = 0.01 * (views - net.generator(code)).abs().mean()
        expected = l1 + mh._bce(c, 1) - mh._bce(c, 0)
    assert float(losses["encoder_loss"]) == pytest.approx(float(expected), rel=1e-4)


def test_smooth_l1_scores_rank_as_the_mse():
    x, recon = torch.rand(5, 1, 8, 8), torch.rand(5, 1, 8, 8)
    m = torch.ones_like(x)
    smooth = mh.reconstruction_scores(x, {"recon": recon, "mu": None, "logvar": None}, m, smooth_l1=True)
    assert smooth["l1"].numpy() == pytest.approx(smooth["mse"].numpy() / 2)  # errors below 1: 0.5 d^2


def test_their_dcgan():
    dcgan = mh.build_anomaly_model("dcgan", 64, 2048, "paper")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in dcgan.modules())  # run_params.py:79
    convs = [m for m in dcgan.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert all(torch.nn.utils.parametrize.is_parametrized(m, "weight") for m in convs)  # spectral norm on each
    slopes = {m.negative_slope for m in dcgan.modules() if isinstance(m, torch.nn.LeakyReLU)}
    assert slopes == {0.01} and not any(type(m) is torch.nn.ReLU for m in dcgan.modules())  # gans.py:98, 142
    assert isinstance(dcgan.generator[-1], torch.nn.Tanh) and dcgan.generator[1].in_channels == 2048  # gans.py:99
    assert len([m for m in dcgan.critic if isinstance(m, torch.nn.Conv2d)]) == 5  # 4 stride-2 at 64 px + to 512
    with torch.no_grad():
        assert dcgan.critic(torch.zeros(2, 1, 64, 64)).shape == (2, 512)
    assert dcgan.minibatch.projection.shape == (2048, 64 * 128) and dcgan.head.in_features == 528  # gans.py:170-173
    full = mh.build_anomaly_model("dcgan", 512, 2048, "paper")
    shapes, x = [], torch.zeros(1, 2048)
    with torch.no_grad():
        for layer in full.generator:
            x = layer(x)
            shapes.append(tuple(x.shape[1:]))
    assert shapes[-1] == (1, 512, 512) and (1024, 4, 4) in shapes and (16, 256, 256) in shapes  # gans.py:91-95
    # minibatch discrimination over rows of 4 samples (gans.py:177-178): sample 0's logit depends on sample 1 (its
    # row) but not on sample 4 (the next row); only each row's 4th sample gets the closeness features (the row's
    # last 528 values), so only sample 3's logit sees the other rows; a batch of 5 is completed by repetition
    torch.manual_seed(0)
    net = mh.build_anomaly_model("dcgan", 16, 8, "paper").eval()
    net.minibatch.projection.data *= 1e-3  # (closeness far from 0, so that mixing shows)
    views = torch.rand(8, 1, 16, 16)
    with torch.no_grad():
        base = net.discriminate(views)
        changed = views.clone()
        changed[1] = 1 - changed[1]
        assert not torch.allclose(net.discriminate(changed)[0], base[0])
        changed = views.clone()
        changed[4] = 1 - changed[4]
        now = net.discriminate(changed)
        torch.testing.assert_close(now[:3], base[:3])
        assert not torch.allclose(now[3], base[3])
        assert net.discriminate(views[:5]).shape == (5,)


def test_their_bigan_and_alpha_gan():
    for kind in ("bigan", "alphagan"):
        net = mh.build_anomaly_model(kind, 128, 100, "paper")
        attention = {name.split(".")[0] for name, m in net.named_modules() if isinstance(m, mh.SelfAttention)}
        assert attention == {"encoder", "critic", "generator"}
        assert sum(isinstance(m, mh.SelfAttention) for m in net.generator.modules()) == 2
        assert isinstance(net.generator.net[-1], torch.nn.Tanh)  # sagan.py:113, alphagan.py:113
        assert not any(isinstance(m, mh.SelfAttention) for m in mh.build_anomaly_model(kind, 128).modules())
    bigan = mh.build_anomaly_model("bigan", 128, 100, "paper")
    assert bigan.head[0].in_channels == 1536 and not hasattr(bigan, "minibatch")  # sagan.py:283 infer_joint
    alpha = mh.build_anomaly_model("alphagan", 32, 100, "paper").eval()  # (spectral norm iterates in training)
    assert alpha.minibatch.projection.shape == (256 * 16, 64 * 256)  # alphagan.py:261-264, at 32 px: 256 x 4 x 4
    assert alpha.head[0].in_channels == 256 + 4  # alphagan.py:266: the closeness as 4 more channels of 4x4
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(alpha.encode(x), alpha.encode(x))  # scoring: the mean
        assert not torch.equal(alpha.encode(x, sample=True), alpha.encode(x, sample=True))  # training: stochastic
    assert [m.out_features for m in alpha.code_critic if isinstance(m, torch.nn.Linear)] == [50, 25, 1]  # :306-318
    cfg = mh.AnomalyConfig(model="alphagan", recipe="paper", image_size=32)
    lrs = {k: o.param_groups[0]["lr"] for k, o in mh.anomaly_optimizers(alpha, cfg, torch.device("cpu")).items()}
    assert lrs == {"discriminator": 1e-4, "generator": 1e-3, "encoder": 1e-3, "code_discriminator": 1e-6}
    assert set(mh.anomaly_optimizers(bigan, mh.AnomalyConfig(model="bigan", recipe="paper", image_size=128),
                                     torch.device("cpu"))) == {"discriminator", "generator"}


def test_their_bigan_generator_and_encoder_also_descend_the_discriminator_loss():
    torch.manual_seed(0)
    net = mh.build_anomaly_model("bigan", 16, 8, "paper").eval()  # eval: BN and spectral norm hold still
    cfg = mh.AnomalyConfig(model="bigan", recipe="paper", image_size=16, gan_latent=8)
    views = torch.rand(4, 1, 16, 16) * 2 - 1
    optimizers = {k: torch.optim.SGD(v, lr=0.0) for k, v in net.parameter_groups().items()}
    losses = mh.paper_gan_step(net, views, optimizers, torch.amp.GradScaler("cpu", enabled=False), None,
                               torch.Generator().manual_seed(0), cfg)
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        real, fake = net.discriminate(views, net.encode(views)), net.discriminate(net.generator(z), z)
    d_loss = mh._bce(real, 1) + mh._bce(fake, 0)  # sagan.py:436-440: the log loss ('hinge')
    assert float(losses["discriminator_loss"]) == pytest.approx(float(d_loss), rel=1e-5)
    # sagan.py:449 and 478-480: D's backward leaves its gradient in G and E, theirs adds to it
    assert float(losses["generator_loss"]) == pytest.approx(float(mh._bce(fake, 1) + mh._bce(real, 0) + d_loss),
                                                            rel=1e-5)


@pytest.mark.parametrize("recipe", ["suite", "paper"])
def test_every_gan_sees_real_and_generated_views_in_one_range(recipe):
    views = torch.randint(30, 200, (4, 1, 16, 16), dtype=torch.uint8)
    views[:, :, 0, 0], views[:, :, -1, -1] = 0, 255  # (so that the range's ends are reached without min-max)
    for kind in mh.GAN_MODELS:
        cfg = mh.AnomalyConfig(model=kind, recipe=recipe, image_size=16, gan_latent=8)
        net = mh.anomaly_model_for(cfg).eval()
        x, _ = mh.anomaly_inputs(views, torch.ones_like(views), "cpu", cfg)  # as scored
        trained, _ = mh.anomaly_inputs(views, torch.ones_like(views), "cpu", cfg, torch.Generator().manual_seed(0))
        last = [m for m in net.generator.modules() if isinstance(m, torch.nn.ConvTranspose2d)][-1]
        ends = []
        for push in (-50.0, 50.0):  # drive the generator's last layer to either end: G's own range
            hook = last.register_forward_hook(lambda module, args, out, push=push: torch.full_like(out, push))
            with torch.no_grad():
                ends.append(float(net.generator(torch.randn(2, 8)).mean()))
            hook.remove()
        with torch.no_grad():
            drawn = net.generator(torch.randn(4, 8))
        assert ends == pytest.approx([float(x.min()), float(x.max())], abs=1e-6), (kind, cfg.input_range)
        assert x.min() <= drawn.min() and drawn.max() <= x.max()
        assert x.min() <= trained.min() and trained.max() <= x.max()  # augmented views stay in the range
        assert tuple(cfg.input_range) == (float(x.min()), float(x.max()))


def test_min_max_comes_after_the_augmentation_and_their_mask_is_the_nonzero_pixels():
    views = torch.full((2, 1, 8, 8), 100, dtype=torch.uint8)
    views[:, :, :4] = 200
    views[:, :, 0, 0] = 0
    masks = torch.ones_like(views)
    darker = {"rotation_degrees": 0.0, "hflip": False, "vflip": False, "scale_range": (1.0, 1.0),
              "intensity_range": (0.5, 0.5), "augment_p": 1.0}
    paper = mh.AnomalyConfig(model="cae", recipe="paper", image_size=32, **darker)
    x, m = mh.anomaly_inputs(views, masks, "cpu", paper, torch.Generator().manual_seed(0))
    assert float(x.max()) == 1.0 and float(x.min()) == 0.0  # train.py:70-74: augmentation, then min-max
    assert m.sum() == 2 * 63 and m[:, :, 0, 0].sum() == 0  # transforms.py:108: every pixel not 0
    suite = mh.AnomalyConfig(model="cae", image_size=32, **darker)
    x, m = mh.anomaly_inputs(views, masks, "cpu", suite, torch.Generator().manual_seed(0))
    assert float(x.max()) == pytest.approx(0.5 * 200 / 255) and m.sum() == 2 * 64  # the hand mask as given
    gan = mh.AnomalyConfig(model="bigan", recipe="paper", image_size=32)
    x, m = mh.anomaly_inputs(views, masks, "cpu", gan)
    assert (float(x.min()), float(x.max())) == (-1.0, 1.0)
    assert float(mh.to_unit_range(x, gan).min()) == 0.0 and float(mh.to_unit_range(x, gan).max()) == 1.0


@pytest.mark.parametrize("kind", mh.GAN_MODELS)
def test_a_paper_gan_step_updates_every_optimiser(kind):
    torch.manual_seed(0)
    net = mh.build_anomaly_model(kind, 16, 16 if kind != "dcgan" else 8, "paper")
    cfg = mh.AnomalyConfig(model=kind, recipe="paper", image_size=16, gan_latent=16 if kind != "dcgan" else 8)
    optimizers = mh.anomaly_optimizers(net, cfg, torch.device("cpu"))
    before = {name: [p.detach().clone() for p in group] for name, group in net.parameter_groups().items()}
    losses = mh.paper_gan_step(net, torch.rand(5, 1, 16, 16) * 2 - 1, optimizers,
                               torch.amp.GradScaler("cpu", enabled=False), None, torch.Generator().manual_seed(0), cfg)
    assert all(torch.isfinite(v) for v in losses.values()) and set(losses) == {f"{k}_loss" for k in optimizers}
    for name, group in net.parameter_groups().items():
        assert any(not torch.equal(a, b) for a, b in zip(before[name], group)), name
    assert sum(len(g) for g in net.parameter_groups().values()) == len(list(net.parameters()))  # none left out


@pytest.mark.slow
@pytest.mark.parametrize("kind", mh.GAN_MODELS)
def test_their_gans_score_abnormal_views_higher(kind):
    torch.manual_seed(0)
    cfg = mh.AnomalyConfig(model=kind, recipe="paper", image_size=16, gan_latent=8, gan_lr=1e-3, d_lr=1e-3,
                           code_lr=1e-3)  # their D rates learn nothing in 25 steps; the signs are what is tested
    net = mh.anomaly_model_for(cfg)
    optimizers = mh.anomaly_optimizers(net, cfg, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    generator = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    hands = torch.stack([(0.8 - (xx - c) ** 2 - yy**2).clamp(0, 1) for c in torch.linspace(-0.2, 0.2, 8)])[:, None]
    hands = hands * 2 - 1  # their (-1, 1)
    net.train()
    for _ in range(25):
        mh.paper_gan_step(net, hands, optimizers, scaler, None, generator, cfg)
    net.eval()
    with torch.no_grad():
        normal = net(hands)["scores"]["disc"].mean()
        noise = net(torch.rand(8, 1, 16, 16) * 2 - 1)["scores"]["disc"].mean()
    assert noise > normal  # higher = more abnormal: D(x) for their DCGAN (gans.py:359), 1 - D for the others


@pytest.mark.slow
def test_their_gans_run_through_the_grid(normal_heavy_phantom, tmp_path):
    base = mh.AnomalyConfig(model="dcgan", recipe="paper", data_dir=str(normal_heavy_phantom), image_size=16,
                            output_dir=str(tmp_path / "grid"), cache_dir=str(tmp_path / "cache"), epochs=1,
                            batch_size=6, num_workers=0, max_steps_per_epoch=2, gan_latent=8)
    results = mh.run_anomaly_grid(base, ["dcgan", "bigan"], ["full+HE"], progress=False)
    image = results[results["level"] == "image"]
    n = image.loc[image["model"] == "no model", "n"].iloc[0]
    assert (image.loc[image["model"] != "no model", "n"] == n).all()  # every test view scored (6: not 4k)
    assert {("DCGAN", "disc"), ("BiGAN", "disc"), ("BiGAN", "mse")} <= set(zip(image["model"], image["score"]))
    net, cfg = mh.load_anomaly_model(Path(image.loc[image["model"] == "BiGAN", "run_dir"].iloc[0]) / "checkpoints"
                                     / "best.pt")
    assert isinstance(net, mh.PaperGAN) and cfg.input_range == (-1.0, 1.0) and cfg.hand_crop
    assert mh.plot_gan_samples(results, device="cpu") is not None
    assert set(mh.published_comparison(results)["theirs"]) == {"theirs: manual masks (XR_HAND_PHOTOSHOP)"}


def test_deviations_are_generated_from_the_presets(monkeypatch):
    table = mh.recipe_deviations()
    rows = {(r.model, r.setting): r for r in table.itertuples()}
    assert rows[("CAE", "lr")].paper == 1e-4 and rows[("CAE", "lr")].suite == 5e-4 and rows[("CAE", "lr")].why
    assert rows[("CAE", "lr")].source == "run_params.py:40"
    assert rows[("alpha-GAN", "recon_weight")].paper == 0.01 and ("DCGAN", "label_noise") in rows
    assert rows[("BiGAN", "input_range")].paper == (-1.0, 1.0) and ("CAE", "input_range") not in rows
    assert ("VAE", "kld_weight") not in rows and ("VAE", "vae_latent") not in rows  # equal in both
    assert ("BiGAN", "batch_size") not in rows and ("alpha-GAN", "batch_size") not in rows  # 16 in both
    assert "autoencoders.py" in rows[("CAE", "architecture")].paper
    assert ("CAE", "gan_lr") not in rows and ("DCGAN", "mask_from") not in rows  # not a setting of that model
    assert {"hand detection", "split", "metric level", "augmentation"} <= set(
        table.loc[table["model"] == "all", "setting"])
    for r in table[table["model"] != "all"].itertuples():
        model = {v: k for k, v in mh.ANOMALY_MODEL_NAMES.items()}[r.model]
        assert r.why, r
        if r.setting != "architecture":  # (shown as a description)
            assert mh.recipe_settings("paper", model)[r.setting] == r.paper != r.suite, r
    # nothing stale: every reason explains a difference the table shows
    shown = set(zip(table["model"], table["setting"]))
    for key in mh.RECIPE_REASONS:
        model, setting = key if isinstance(key, tuple) else (None, key)
        names = [mh.ANOMALY_MODEL_NAMES[model]] if model else list(mh.ANOMALY_MODEL_NAMES.values())
        assert any((name, setting) in shown for name in names), key
    assert not any("6x6" in v or "bug" in v for v in mh.RECIPE_REASONS.values())
    monkeypatch.setitem(mh.ANOMALY_RECIPES["paper"]["vae"], "kld_weight", 2.0)
    assert ("VAE", "kld_weight") in set(zip(mh.recipe_deviations()["model"], mh.recipe_deviations()["setting"]))


def test_published_numbers_are_their_summary_csv():
    pub = mh.PUBLISHED_ANOMALY_AUROC
    assert len(pub) == 99 and pub["line"].between(2, 32).all() and pub["line"].nunique() == 31
    assert not pub.duplicated(["their_model", "data_source", "hist_equalisation", "their_score"]).any()

    def row(model, variant, score):
        found = pub[(pub["model"] == model) & (pub["variant"] == variant) & (pub["score"] == score)]
        assert len(found) == 1
        return found.iloc[0]
    cae = row("CAE", "full+HE", "mse")  # their best autoencoder: XR_HAND_PHOTOSHOP with HE, summary.csv:5
    assert (cae.roc_auc, cae.roc_auc_sd, cae.line, cae.data_source) == (0.57, 0.0185, 5, "XR_HAND_PHOTOSHOP")
    alpha = row("alpha-GAN", "full", "disc")
    assert (alpha.roc_auc, alpha.normalisation, alpha.hist_equalisation) == (0.6072, "-1 1", False)
    assert row("VAE", "full+HE", "kld").roc_auc == 0.5326 and row("BiGAN", "full", "disc").roc_auc == 0.5489
    assert row("DCGAN", "crop", "disc").data_source == "XR_HAND_CROPPED" and row("VAE", "raw", "l1+kld").line == 14
    assert math.isnan(row("BiGAN", "full+HE", "mse").roc_auc_sd)  # one run only: no SD
    assert set(pub["model"]) == {*mh.ANOMALY_MODEL_NAMES.values(), "their bottleneck AE"}
    assert set(pub.loc[pub["model"] != "their bottleneck AE", "score"]) <= {
        s for m in mh.ANOMALY_MODELS for s in mh.anomaly_score_names(m)}
    results = pd.DataFrame([{"recipe": r, "model": "CAE", "variant": v, "score": "mse", "level": "image", "seed": 0,
                             "roc_auc": 0.6, "roc_auc_ci_low": 0.5, "roc_auc_ci_high": 0.7}
                            for r in ("suite", "paper") for v in ("raw", "crop+HE", "full+HE", "full+CLAHE")])
    table = mh.published_comparison(results)
    assert len(table) == 6 and set(table["variant"]) == {"raw", "crop+HE", "full+HE"}  # no CLAHE row of theirs
    full = table[(table["variant"] == "full+HE") & (table["recipe"] == "paper")].iloc[0]
    assert full.theirs == "theirs: manual masks (XR_HAND_PHOTOSHOP)" and full.published_text == "0.5700 +- 0.0185"
    assert full.ours == "0.600 [0.50, 0.70]" and full.their_line == 5
    assert table.loc[table["variant"] == "raw", "theirs"].iloc[0] == "theirs: raw views (XR_HAND)"
    assert table.loc[table["variant"] == "crop+HE", "theirs"].iloc[0] == "theirs: SSD hand crops (XR_HAND_CROPPED)"


def test_hand_crops_one_per_hand_and_the_view_scores_its_worst(tmp_path):
    images = np.zeros((2, 32, 32), np.uint8)
    masks = np.zeros_like(images)
    masks[0, 4:12, 2:10], masks[0, 16:30, 18:26] = 1, 1  # two hands
    images[0][masks[0] == 1] = 100
    images[0, 20:24, 20:24] = 250  # the second hand is bright: the worse reconstructed
    masks[1, 8:20, 8:20], images[1, 8:20, 8:20] = 1, 50  # one hand
    for name, array in (("images", images), ("masks", masks),
                        ("affines", np.tile(np.eye(3)[:2], (2, 1, 1)).astype(np.float32))):
        np.save(tmp_path / f"{name}.npy", array)
    cache = mh.AnomalyCache(tmp_path, ["a.png", "b.png"], mh.PreprocessConfig(size=32))
    assert mh.hand_boxes(masks[0]) == [(18, 16, 26, 30), (2, 4, 10, 12)]  # (x0, y0, x1, y1), largest first
    crops = mh.build_hand_crops(cache, cache, progress=False)
    assert crops.image_paths == ["a.png", "a.png", "b.png"]
    assert crops.masks[0].sum() > 0.3 * 32 * 32 and crops.masks[0][:, 16].sum() == 32  # the tall box fills the height
    point = crops.affines[0] @ np.array([22, 23, 1.0])  # the box's centre lands in the crop's centre
    assert point == pytest.approx([16, 16], abs=0.5)

    class Zero(torch.nn.Module):
        def forward(self, x):
            return {"recon": torch.zeros_like(x), "mu": None, "logvar": None}
    table = pd.DataFrame({"image_path": crops.image_paths, "study_path": ["s", "s", "t"], "label": [1, 1, 0],
                          "cache_row": [0, 1, 2]})
    cfg = mh.AnomalyConfig(image_size=32)
    scores = mh.evaluate_anomaly(Zero(), crops, table, cfg, torch.device("cpu"))
    assert list(scores["image_path"]) == ["a.png", "b.png"]
    m = torch.from_numpy(crops.masks[:].astype(np.float32))
    x = torch.from_numpy(crops.images[:].astype(np.float32)) / 255
    crop_mse = ((x * m) ** 2).flatten(1).sum(1) / m.flatten(1).sum(1)
    assert scores["mse"].iloc[0] == pytest.approx(float(crop_mse[:2].max()), rel=1e-5)  # the view: its worst hand


def test_min_max_scaling_per_image():
    views = torch.tensor([[[[10, 20], [30, 60]]], [[[0, 0], [0, 255]]]], dtype=torch.uint8)
    x, _ = mh.anomaly_inputs(views, torch.ones_like(views), "cpu", mh.AnomalyConfig(image_size=64, minmax=True))
    assert x[0, 0].flatten().tolist() == pytest.approx([0, 0.2, 0.4, 1.0]) and x[1].max() == 1
    x, _ = mh.anomaly_inputs(views, torch.ones_like(views), "cpu", mh.AnomalyConfig(image_size=64))
    assert float(x[0, 0, 1, 1]) == pytest.approx(60 / 255)


def test_the_gallery_run_is_chosen_on_validation():
    results = pd.DataFrame({"score": ["mse"] * 4, "level": ["study", "study", "image", "study"],
                            "roc_auc": [0.9, 0.6, 0.99, 0.7], "val_roc_auc": [0.5, 0.8, 0.95, np.nan],
                            "run_dir": ["a", "b", "c", "d"]})
    assert mh.best_run(results, "mse")["run_dir"] == "b"  # not a (best on test), not c (image level)
    with pytest.raises(ValueError, match="no run"):
        mh.best_run(results, "kld")


def test_grid_at_both_levels_with_seeds_each_on_its_own_split(normal_heavy_phantom, tmp_path):
    base = mh.AnomalyConfig(data_dir=str(normal_heavy_phantom), output_dir=str(tmp_path / "grid"),
                            cache_dir=str(tmp_path / "cache"), image_size=64, batch_size=8, epochs=1, num_workers=0,
                            max_steps_per_epoch=1)
    results = mh.run_anomaly_grid(base, ["cae"], ["raw"], progress=False, seeds=[3, 5])
    assert set(results["level"]) == {"image", "study"} and set(results["seed"]) == {3, 5}
    cae = results[results["model"] == "CAE"]
    image, study = (cae[(cae["level"] == lv) & (cae["score"] == "mse")] for lv in ("image", "study"))
    assert (image["n"].to_numpy() > study["n"].to_numpy()).all() and image["val_roc_auc"].notna().all()
    for run in image.itertuples():  # each seed: its own split
        config = json.loads((Path(run.run_dir) / "config.json").read_text())
        assert config["seed"] == config["split_seed"] == run.seed
    splits = [pd.read_csv(Path(d) / "test_scores.csv")["study_path"].sort_values().tolist() for d in image["run_dir"]]
    assert splits[0] != splits[1]
    summary = mh.seed_summary(results, "image")
    row = summary[(summary["model"] == "CAE") & (summary["score"] == "mse")].iloc[0]
    assert row.n_seeds == 2 and row.seeds_mean == pytest.approx(image["roc_auc"].mean())
    assert row.seeds_sd == pytest.approx(image["roc_auc"].std())
    assert mh.anomaly_results_table(results, level="image").loc[("CAE", "mse"), "raw"] == image["roc_auc"].iloc[0]
    comparison = mh.published_comparison(results)  # their CAE on raw views without HE: summary.csv:6
    assert list(comparison["score"]) == ["mse", "mse_top200"] and (comparison["their_line"] == 6).all()
    assert comparison["ours_mean_sd"].str.endswith("(2 seeds)").all()
    assert (results.loc[results["model"] == "CAE", "resampled"] == "patient").all()
