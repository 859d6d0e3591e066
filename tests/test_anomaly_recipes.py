"""The recipes: theirs ("paper", from Valentyn1997/xray at HEAD) and ours ("suite"), their GANs and published table."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import mura_helpers as mh

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
                           code_lr=1e-3)  # their D rates learn nothing in 8 steps; the signs are what is tested
    net = mh.anomaly_model_for(cfg)
    optimizers = mh.anomaly_optimizers(net, cfg, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    generator = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    hands = torch.stack([(0.8 - (xx - c) ** 2 - yy**2).clamp(0, 1) for c in torch.linspace(-0.2, 0.2, 8)])[:, None]
    hands = hands * 2 - 1  # their (-1, 1)
    net.train()
    for _ in range(8):  # noise scored 0.44-0.79 above the hands after 8 steps, 0.63-0.93 after 25 (seeds 0-4, each
        # of DCGAN and alpha-GAN; 28 and 34 million parameters at 16 px: 1.5-1.8 s a step on one CPU thread)
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
