"""`scratchllm pretrain` end to end on a tiny model: the golden loss curve, exact resume, continuing
from a checkpoint, and clear errors for bad input."""

import json
import os

import pytest
import torch
from pretrain_helpers import SMALL_TOML, make_inputs, pretrain
from safetensors.torch import load_file, save_file

from scratchllm.common import ScratchError, env_flag

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "pretrain_loss.json")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    paths = make_inputs(root)
    (root / "run.toml").write_text(SMALL_TOML)
    paths["config"] = root / "run.toml"
    return paths


def base_args(inputs, out, steps=8):
    return ["--data", str(inputs["shards"]), "--tokenizer", str(inputs["tokenizer"]), "--config",
            str(inputs["config"]), "--out", str(out), "--max-steps", str(steps)]


def records(out, split="train"):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if f'"{split}"' in x]


def weights(out):
    return load_file(str(out / (out / "latest").read_text().strip() / "model.safetensors"))


def test_golden_loss_curve(inputs, tmp_path):
    """8 steps of a 2-layer GPT on the synthetic corpus against the committed tests/golden/pretrain_loss.json
    (which says how its numbers were made). After an intended numeric change, regenerate it as a separate
    step: `SCRATCHLLM_REGEN_GOLDEN=1 pytest tests/test_pretrain.py -k golden` writes the file and skips;
    review the diff, commit it, and run the test again without the variable. A missing file fails."""
    assert pretrain(*base_args(inputs, tmp_path / "run")) == 0
    losses = [r["loss"] for r in records(tmp_path / "run")]
    if env_flag("SCRATCHLLM_REGEN_GOLDEN"):
        write_golden(losses)
        pytest.skip(f"regenerated {GOLDEN}; nothing compared: run again without SCRATCHLLM_REGEN_GOLDEN")
    if not os.path.isfile(GOLDEN):
        pytest.fail(f"{GOLDEN} is missing: restore it from git, or regenerate it with SCRATCHLLM_REGEN_GOLDEN=1")
    with open(GOLDEN) as f:
        golden = json.load(f)["losses"]
    assert len(losses) == len(golden) == 8
    assert losses == pytest.approx(golden, abs=2e-4)
    assert losses[-1] < losses[0] - 1.0  # it learns (bytes of a 34-word language)


def write_golden(losses):
    golden = {"how": "tests/test_pretrain.py::test_golden_loss_curve with SCRATCHLLM_REGEN_GOLDEN=1: "
                     "scratchllm pretrain on tests/pretrain_helpers.py's synthetic corpus, byte-level "
                     "tokenizer, SMALL_TOML config (2 layers, 32 dims, block 32, batch 4, lr 1e-2, "
                     "fp32, CPU, seed 1234), 8 steps; train loss per step",
              "torch": torch.__version__, "losses": losses}
    with open(GOLDEN, "w") as f:
        json.dump(golden, f, indent=2)


def test_outputs_and_resume_from_a_checkpoint_is_exact(inputs, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert pretrain(*base_args(inputs, full)) == 0
    for name in ("config.toml", "metrics.jsonl", "loss.png", "report.md", "step_0000004", "step_0000008"):
        assert (full / name).exists(), name
    ckpt = full / "step_0000008"
    assert {p.name for p in ckpt.iterdir()} >= {"model.safetensors", "config.json", "tokenizer", "train_state.pt",
                                                 "meta.json"}
    from scratchllm.weights.checkpoint import load_model

    model, tok = load_model(full)  # the model engineer's loader reads our checkpoints
    assert tok.vocab_size == 257 and model.config.n_layer == 2
    # a second run, rewound to its step-4 checkpoint with only `--resume PATH`: steps 5..8 are
    # trained again (max_steps is part of the LR schedule, so the run keeps its 8) and must match
    assert pretrain(*base_args(inputs, part)) == 0
    (part / "metrics.jsonl").write_text((part / "metrics.jsonl").read_text().replace('"loss": ', '"loss": 1'))
    stale = part / "step_0000008" / "model.safetensors"  # the rewound run must write step 8 anew
    save_file({k: torch.zeros_like(v) for k, v in load_file(str(stale)).items()}, str(stale))
    assert pretrain("--resume", str(part / "step_0000004")) == 0
    for k, v in weights(full).items():
        assert torch.equal(v, weights(part)[k]), k
    strip = lambda rs: [(r["step"], r["loss"], r.get("grad_norm")) for r in rs]  # noqa: E731
    assert strip(records(full)[4:]) == strip(records(part)[4:])  # re-logged after the resume point
    assert strip(records(full, "val")[-1:]) == strip(records(part, "val")[-1:])


def test_samples_during_training(inputs, tmp_path, capsys):
    assert pretrain(*base_args(inputs, tmp_path / "run", steps=4), "--sample-every", "2", "--sample-tokens", "5",
                    "--sample-prompt", "the") == 0
    samples = [ln for ln in capsys.readouterr().out.splitlines() if "| sample: " in ln]
    assert [ln.split(" |")[0] for ln in samples] == ["step 2", "step 4"]
    assert all(ln.split("| sample: ")[1].startswith("'the") for ln in samples)


def test_continue_from_a_model_folder(inputs, tmp_path):
    assert pretrain(*base_args(inputs, tmp_path / "a", steps=4)) == 0
    start = weights(tmp_path / "a")
    args = ["--data", str(inputs["shards"]), "--model", str(tmp_path / "a"), "--out", str(tmp_path / "b"),
            "--max-steps", "1", "--precision", "fp32", "--device", "cpu", "--lr", "1e-9", "--min-lr", "0", "--warmup-steps", "0",
            "--batch-size", "2", "--block-size", "16", "--eval-every", "0"]
    assert pretrain(*args) == 0
    after = weights(tmp_path / "b")
    assert all(torch.allclose(start[k], after[k], atol=1e-6) for k in start)  # lr 1e-9: still the same weights


def test_bad_inputs_get_clear_errors(inputs, tmp_path):
    run = tmp_path / "run"
    assert pretrain(*base_args(inputs, run, steps=2)) == 0
    with pytest.raises(ScratchError, match="holds another run.*--resume.*--overwrite"):
        pretrain(*base_args(inputs, run, steps=2))
    with pytest.raises(ScratchError, match=r"config differs .* 2 field\(s\): train.batch_size: 4 -> 2; train.lr"):
        pretrain("--out", str(run), "--resume", "--batch-size", "2", "--lr", "0.5")
    assert pretrain(*base_args(inputs, run, steps=2), "--overwrite") == 0  # replaced, not refused
    with pytest.raises(ScratchError, match="--block-size 64 is larger than the model's block_size 32"):
        pretrain("--data", str(inputs["shards"]), "--model", str(run), "--out", str(tmp_path / "b"),
                 "--block-size", "64")
    with pytest.raises(ScratchError, match=r"batch_tokens 1000 is not divisible by .* 4 x 32 x 1 = 128"):
        pretrain(*base_args(inputs, tmp_path / "c"), "--batch-tokens", "1000")
    bad = tmp_path / "bad.toml"
    bad.write_text(SMALL_TOML.replace("[train]", "[train]\nlearning_rate = 1.0"))
    with pytest.raises(ScratchError, match=r"bad.toml: unknown config key\(s\) train.learning_rate"):
        pretrain("--data", str(inputs["shards"]), "--config", str(bad), "--out", str(tmp_path / "d"))
    from scratchllm.tokenizer import train_bpe

    other = train_bpe(["some other text entirely"], 260, special_tokens=["<|endoftext|>"], name="other")
    other.save(tmp_path / "other_tok")
    with pytest.raises(ScratchError, match="made with tokenizer 'bytes'.*prepare the data again"):
        pretrain("--data", str(inputs["shards"]), "--tokenizer", str(tmp_path / "other_tok"), "--config",
                 str(inputs["config"]), "--out", str(tmp_path / "e"))
    with pytest.raises(ScratchError, match="is not the tokenizer of --model .*drop --tokenizer"):
        pretrain("--data", str(inputs["shards"]), "--model", str(run), "--tokenizer", str(tmp_path / "other_tok"),
                 "--out", str(tmp_path / "f"))


def test_shards_remember_their_tokenizer(inputs, tmp_path):
    """`pretrain --data shards/` needs no --tokenizer: the shard folder remembers the one it was made with."""
    run = tmp_path / "run"
    assert pretrain("--data", str(inputs["shards"]), "--config", str(inputs["config"]), "--out", str(run),
                    "--max-steps", "2", "--eval-every", "0") == 0
    from scratchllm.tokenizer import Tokenizer

    saved = Tokenizer.load(run / "step_0000002" / "tokenizer")
    assert saved.fingerprint() == Tokenizer.load(inputs["tokenizer"]).fingerprint()


def test_sliding_windows_counted_in_epochs(inputs, tmp_path):
    """--sampler sliding --stride S --epochs E: max_steps = E x batches per epoch; each train line says
    its epoch; the Python function and the command are the same stage."""
    from scratchllm.configs import PretrainConfig, resolve
    from scratchllm.data.loaders import SlidingWindowSampler
    from scratchllm.data.shards import open_shards
    from scratchllm.train.pretrain import pretrain as pretrain_fn

    per_epoch = SlidingWindowSampler(open_shards(inputs["shards"]).train, 32, 4, stride=64).batches_per_epoch
    cfg = resolve(PretrainConfig, inputs["config"], {"data": str(inputs["shards"]), "out": str(tmp_path / "run"),
                                                     "sampler": "sliding", "stride": 64, "train.epochs": 2,
                                                     "train.eval_every": 0, "train.checkpoint_every": 0,
                                                     "eval_train": True})
    summary = pretrain_fn(cfg)
    on_train = records(tmp_path / "run", "train_eval")
    assert [r["step"] for r in on_train] == [summary["step"]] and on_train[0]["loss"] > 0
    assert summary["step"] == 2 * per_epoch and summary["exit_code"] == 0 and not summary["interrupted"]
    epochs = [r["epoch"] for r in records(tmp_path / "run")]
    assert epochs[0] == 0 and epochs[-1] == 2 and epochs == sorted(epochs)
    toml = (tmp_path / "run" / "config.toml").read_text()
    assert 'sampler = "sliding"' in toml and "stride = 64" in toml and "epochs = 2" in toml
    with pytest.raises(ScratchError, match="stride 8: give a stride >= 1 only with --sampler sliding"):
        pretrain(*base_args(inputs, tmp_path / "b"), "--stride", "8")


def test_overwrite_replaces_only_a_run_folder(inputs, tmp_path):
    mine = tmp_path / "u"
    mine.mkdir()
    (mine / "precious.doc").write_text("x")
    with pytest.raises(ScratchError, match=r"not a run folder of ours \(it holds precious.doc\).*refused"):
        pretrain(*base_args(inputs, mine, steps=1), "--overwrite")
    with pytest.raises(ScratchError, match=r"holds no run to resume \(it holds precious.doc\)"):
        pretrain(*base_args(inputs, mine, steps=1), "--resume")
    assert (mine / "precious.doc").read_text() == "x"
    (tmp_path / "empty").mkdir()
    assert pretrain(*base_args(inputs, tmp_path / "empty", steps=1), "--eval-every", "0") == 0


def test_a_closed_stdout_neither_stops_nor_fails_the_run(inputs, tmp_path):
    """`scratchllm pretrain ... | head -1`: once head has gone, output is dropped and training goes on to
    its last step and checkpoint, exit 0, without a traceback."""
    import shlex
    import subprocess
    import sys

    run = tmp_path / "run"
    cmd = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "scratchllm", "pretrain",
                                            *base_args(inputs, run, steps=6), "--eval-every", "1"])
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd} | head -1"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.splitlines()) == 1
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-2000:]
    assert (run / "latest").read_text().strip() == "step_0000006"
    assert [r["step"] for r in records(run)] == list(range(1, 7))


def test_model_shape_flags_reach_the_new_model(inputs, tmp_path):
    run = tmp_path / "run"
    assert pretrain(*base_args(inputs, run, steps=1), "--init", "torch", "--no-tie-embeddings", "--dropout", "0.1",
                    "--eval-every", "0") == 0
    config = json.loads((run / "step_0000001" / "config.json").read_text())
    assert (config["init"], config["tie_embeddings"], config["dropout"]) == ("torch", False, 0.1)
    assert "lm_head.weight" in weights(run)  # untied: saved on its own
    with pytest.raises(ScratchError, match=r"model options \(dropout\) shape a new model from --model-preset"):
        pretrain("--data", str(inputs["shards"]), "--model", str(run), "--out", str(tmp_path / "b"),
                 "--dropout", "0.2")
    with pytest.raises(ScratchError, match="dropout must be in"):
        pretrain(*base_args(inputs, tmp_path / "c", steps=1), "--dropout", "1.5")


def test_torch_init_with_a_tied_head_is_warned_about(inputs, tmp_path):
    with pytest.warns(UserWarning, match="--init torch with tied embeddings.*--no-tie-embeddings"):
        assert pretrain(*base_args(inputs, tmp_path / "run", steps=1), "--init", "torch", "--eval-every", "0") == 0
