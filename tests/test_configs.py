"""configs.resolve reading --config: every way the file can be wrong is a message naming it, never a
traceback (a folder, a device, bytes that are not UTF-8, a scalar where a table belongs)."""

import os

import pytest

from scratchllm.common import ScratchError
from scratchllm.configs import PretrainConfig, resolve

FLAGS = {"data": "shards", "model_preset": "tiny", "out": "runs/x"}


def test_a_folder_or_a_device_as_config(tmp_path):
    with pytest.raises(ScratchError, match=r"--config .* is a folder; give a TOML file"):  # was IsADirectoryError
        resolve(PretrainConfig, tmp_path, FLAGS)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for path in ("/dev/zero", fifo):  # reading either would never end
        with pytest.raises(ScratchError, match="is not a regular file"):
            resolve(PretrainConfig, path, FLAGS)
    with pytest.raises(ScratchError, match="nope.toml: file not found"):
        resolve(PretrainConfig, tmp_path / "nope.toml", FLAGS)


def test_bytes_that_are_not_utf8(tmp_path):
    f = tmp_path / "run.toml"
    f.write_bytes(b"out = \"x\"\n\xff\xfe")
    with pytest.raises(ScratchError, match=r"run.toml: not UTF-8 text \(byte offset 10\)"):
        resolve(PretrainConfig, f, FLAGS)


def test_a_scalar_where_a_table_belongs_and_a_flag_below_it(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text("train = 5\n")
    with pytest.raises(ScratchError, match=r"run.toml: train: expected a table \[train\], got 5"):
        resolve(PretrainConfig, f, {**FLAGS, "train.lr": 1e-3})  # was TypeError: 'int' object ...
    with pytest.raises(ScratchError, match=r"train: expected a table \[train\], got 5"):
        resolve(PretrainConfig, f, FLAGS)


def test_the_cli_prints_one_line(tmp_path, capsys):
    from scratchllm.cli import main

    assert main(["pretrain", "--data", "shards", "--model-preset", "tiny", "--out", str(tmp_path / "r"),
                 "--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --config") and "is a folder" in err and "Traceback" not in err
