"""The unsupervised path's networks and training: the autoencoders and the suite's GANs, resumable training."""

import math

import numpy as np
import pytest
import torch

import mura_helpers as mh

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
    for _ in range(10):  # noise scored 0.24-0.86 above the hands after 10 steps, 0.32-1.0 after 25 (seeds 0-4, each
        # GAN); after 5, BiGAN's gap was 0.05-0.11
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
