"""Data: both on-disk layouts, lookup order, error message, augmentation, synthetic fallback."""

import json
import pickle

import numpy as np
import pytest
import torch

from mupp.lab import data
from mupp.lab.cli import main


def write_python_layout(root, n_per_batch=6, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        y = list(rng.integers(0, 10, n_per_batch))
        images[name] = (x, y)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": x, b"labels": y}, f)
    return images


def test_python_layout_is_read_exactly(tmp_path):
    images = write_python_layout(tmp_path)
    ds = data.load("cifar10", tmp_path)
    assert ds.train.x.shape == (30, 3, 32, 32) and ds.test.x.shape == (6, 3, 32, 32)
    x0, y0 = images["data_batch_1"]
    assert torch.equal(ds.train.x[0], torch.from_numpy(x0[0].reshape(3, 32, 32)))
    assert ds.train.y[:6].tolist() == [int(v) for v in y0]


def test_npz_layout(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    np.savez(
        tmp_path / "cifar10.npz",
        x_train=x,
        y_train=np.arange(10),
        x_test=x[:4],
        y_test=np.arange(4),
    )
    ds = data.load("cifar10", tmp_path)
    assert torch.equal(ds.train.x[3], torch.from_numpy(x[3]).permute(2, 0, 1))


def test_lookup_order_and_error_lists_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv("MUPP_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as e:
        data.load("cifar100", tmp_path / "explicit")
    msg = str(e.value)
    assert msg.index("explicit") < msg.index("env") < msg.index("cache")
    assert "mupp data download cifar100" in msg
    write_python_layout(tmp_path / "env")
    assert len(data.load("cifar10").train) == 30  # found through $MUPP_DATA_DIR


def test_augment_is_deterministic_and_crop_flip_valid():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    a = data.augment(x, torch.Generator().manual_seed(7))
    b = data.augment(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == x.shape
    same = data.augment(x, torch.Generator().manual_seed(0), pad=0)
    for i in range(2):
        assert torch.equal(same[i], x[i]) or torch.equal(same[i], x[i].flip(-1))


def test_batches_normalize_and_flatten():
    ds = data.synthetic(64, 16)
    xb, yb = next(data.batches(ds.train, 32, shuffle=False, flatten=True))
    assert xb.shape == (32, 3072) and yb.shape == (32,) and xb.dtype == torch.float32
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        next(data.batches(ds.train, 0, shuffle=False))


def test_data_info_cli_on_real_or_synthetic(capsys, tmp_path, datasets_dir):
    root = datasets_dir
    if root is None:  # no shared CIFAR-10: the standard layout written here
        write_python_layout(tmp_path)
        root = tmp_path
    assert main(["data", "info", "cifar10", "--data-dir", str(root)]) == 0
    out = json.loads(capsys.readouterr().out)
    if root == datasets_dir:
        assert out["train_size"] == 50000 and out["test_size"] == 10000
        assert out["train_per_class"] == [5000] * 10 and out["test_per_class"] == [1000] * 10
        assert out["train_mean"] == pytest.approx([0.4914, 0.4822, 0.4465], abs=2e-4)
    else:
        assert out["train_size"] == 30


def test_cifar100_python_layout(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for name, n in (("train", 7), ("test", 3)):
        with open(folder / name, "wb") as f:
            pickle.dump(
                {
                    b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                    b"fine_labels": list(range(90, 90 + n)),
                },
                f,
            )
    ds = data.load("cifar100", tmp_path)
    assert ds.num_classes == 100 and len(ds.train) == 7 and ds.test.y.tolist() == [90, 91, 92]


def test_download_without_network_fails_cleanly(tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise OSError("no network here")

    monkeypatch.setattr(data.urllib.request, "urlretrieve", no_network)
    with pytest.raises(OSError, match="no network"):
        data.load("cifar10", tmp_path, download=True)
    assert not list(tmp_path.glob("*.tar.gz"))  # nothing half-written left behind


def test_label_noise_flips_a_fixed_fraction_to_other_classes():
    from mupp.lab.config import TrainConfig
    from mupp.lab.data import synthetic, with_label_noise
    from mupp.lab.train import splits

    ds = synthetic(1000, 100, seed=0)
    noisy = with_label_noise(ds.train, 0.2, 10, seed=3)
    changed = noisy.y != ds.train.y
    assert int(changed.sum()) == 200  # exactly round(0.2 * N), never to the true class
    assert torch.equal(noisy.x, ds.train.x)
    assert torch.equal(with_label_noise(ds.train, 0.2, 10, seed=3).y, noisy.y)  # fixed by seed
    assert not torch.equal(with_label_noise(ds.train, 0.2, 10, seed=4).y, noisy.y)
    assert torch.bincount(noisy.y[changed], minlength=10).min() > 0  # spread over classes
    assert with_label_noise(ds.train, 0.0, 10).y is ds.train.y
    # from a run config: the training split only, the test split untouched
    cfg = TrainConfig(dataset="synthetic", label_noise=0.2, label_noise_seed=3, train_subset=500)
    tr, te = splits(cfg, ds)
    assert len(tr) == 500 and int((tr.y != ds.train.y[:500]).sum()) == 100
    assert torch.equal(te.y, ds.test.y)
    for bad in (1.0, -0.1, "0.2"):
        with pytest.raises(ValueError, match="label_noise must be a fraction"):
            TrainConfig(label_noise=bad).validate()


def test_label_noise_from_the_command_line(tmp_path):
    import json

    from mupp.lab.cli import main

    out = tmp_path / "run"
    argv = ["train", "--dataset", "synthetic", "--epochs", "1", "--width", "32", "--rho", "0"]
    assert main(argv + ["--set", "label_noise=0.4", "--out", str(out), "--no-progress"]) == 0
    cfg = json.loads((out / "result.json").read_text())["config"]
    assert cfg["label_noise"] == 0.4 and cfg["label_noise_seed"] == 0


# --------------------------------------------------------------------------------------------
# text: Tiny Shakespeare and any plain-text file
# --------------------------------------------------------------------------------------------

TEXT = "".join(f"To be, or not to be, line {i}: that is the question.\n" for i in range(200))


def test_text_split_is_90_10_in_windows_with_next_characters(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    ds = data.load("tinyshakespeare", text_file=path, block_size=16)
    vocab = "".join(sorted(set(TEXT)))
    assert ds.vocab == vocab and ds.num_classes == len(vocab)
    n_train = int(len(TEXT) * 0.9)
    ids = torch.tensor([vocab.index(c) for c in TEXT])
    assert ds.train.x.shape == ((n_train - 1) // 16, 16)
    assert torch.equal(ds.train.x[1], ids[16:32]) and torch.equal(ds.train.y[1], ids[17:33])
    assert torch.equal(ds.test.x[0], ids[n_train : n_train + 16])  # the last tenth validates
    x, y = next(data.batches(ds.train, 4, shuffle=False, name="tinyshakespeare"))
    assert x.dtype == torch.long and torch.equal(x, ds.train.x[:4])  # no image normalization


def test_the_named_corpus_is_checked_against_its_checksum(tmp_path):
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text(TEXT)
    with pytest.raises(ValueError, match="SHA-256 .* is not tinyshakespeare's .*text_file=PATH"):
        data.load("tinyshakespeare", tmp_path)
    assert data.load("tinyshakespeare", text_file=tmp_path / "tinyshakespeare" / "input.txt")


@pytest.mark.parametrize(
    "content, message",
    [(b"", "too few"), (b"\xff\xfe\x00abc" * 100, "not UTF-8"), (b"short", "too few")],
)
def test_an_empty_short_or_undecodable_file_is_refused(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        data.load("tinyshakespeare", text_file=path)


def test_missing_corpus_lists_places_and_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MUPP_DATA_DIR", str(tmp_path / "env"))
    with pytest.raises(
        FileNotFoundError, match="(?s)tinyshakespeare/input.txt.*mupp data download"
    ):
        data.load("tinyshakespeare", tmp_path / "nothing")


def test_the_real_tiny_shakespeare_when_present(capsys, datasets_dir):
    root = datasets_dir
    if root is None or not (root / "tinyshakespeare" / "input.txt").exists():
        pytest.skip("../shared/datasets/tinyshakespeare is absent")
    ds = data.load("tinyshakespeare", root, block_size=64)
    assert ds.num_classes == 65
    assert (len(ds.train) + 1) * 64 > int(1_115_394 * 0.9) >= len(ds.train) * 64
    assert main(["data", "info", "tinyshakespeare", "--data-dir", str(root)]) == 0
    assert '"vocab_size": 65' in capsys.readouterr().out
