"""Every subcommand's main failure modes, run in-process through `scratchllm.cli.main`: missing files,
the wrong kind of path (a folder where a file is expected and the reverse), bad numbers and corrupt
inputs. Each must exit with status 2 and an `error: ` line that names the file or value, with no
traceback, and must leave the files of the folder it runs in alone.

`CASES` maps every leaf subcommand of `build_parser()` to its failure cases; a new subcommand without
an entry fails `test_every_subcommand_has_failure_cases`. A case is (id, argv, text the error must
contain): `{w}` in argv is the folder of prepared inputs (see `world`).
"""

import argparse
import json
import shutil
from types import SimpleNamespace

import pytest
import torch

import scratchllm.io.download as download_mod
from scratchllm.cli import build_parser, main
from scratchllm.model import GPT, ModelConfig
from scratchllm.tokenizer import train_bpe
from scratchllm.train.checkpointing import save_checkpoint
from scratchllm.weights.checkpoint import save_model, write_model_files

TOK, RUN, SHARDS = "{w}/tok", "{w}/run", "{w}/shards"
GEN = "generate --prompt hi --max-new-tokens 2 --device cpu"
CHAT = "generate --chat hi --max-new-tokens 2 --device cpu"
PRE = f"pretrain --data {SHARDS} --model-preset tiny --max-steps 1 --device cpu --no-compile"
CLS = "classify train --model {w}/run --out {w}/c --device cpu --no-compile --data"
SFT = "sft --model {w}/chatbase --out {w}/s --device cpu --no-compile --max-steps 1 --data"
EGEN = "eval generate --device cpu --out {w}/answers.jsonl --max-new-tokens 2 --model"
ELOSS = "eval loss --device cpu --model"
QUICK = "--device cpu --no-compile --max-steps 1"
RWD = f"reward train --model {{w}}/chatbase --out {{w}}/r {QUICK} --data"
DPO = f"dpo --model {{w}}/chatbase --out {{w}}/d {QUICK} --data"
PPO = f"ppo --model {{w}}/chatbase --out {{w}}/p {QUICK} --prompts {{w}}/instr.json"
RULE = "--reward scratchllm.train.rules:short_answer"
CASES = {
    ("tokenizer", "train"): [
        ("missing input", "tokenizer train --input {w}/nope.txt --vocab-size 300 --out {w}/o", "nope.txt"),
        ("folder without text", "tokenizer train --input {w}/emptydir --vocab-size 300 --out {w}/o", "emptydir"),
        ("not UTF-8", "tokenizer train --input {w}/bad.bin --vocab-size 300 --out {w}/o", "bad.bin"),
        ("vocab not a number", "tokenizer train --input {w}/text.txt --vocab-size abc --out {w}/o", "'abc'"),
        ("vocab too small", "tokenizer train --input {w}/text.txt --vocab-size 10 --out {w}/o",
               "--vocab-size 10"),
        ("out is a file", "tokenizer train --input {w}/text.txt --vocab-size 300 --out {w}/file.txt", "file.txt"),
        ("out under a file", "tokenizer train --input {w}/text.txt --vocab-size 300 --out {w}/file.txt/t",
               "file.txt"),
    ],
    ("tokenizer", "encode"): [
        ("missing tokenizer", "tokenizer encode --tokenizer {w}/nope hi", "nope"),
        ("tokenizer is a file", "tokenizer encode --tokenizer {w}/file.txt hi", "file.txt"),
        ("tokenizer.json not JSON", "tokenizer encode --tokenizer {w}/badjson hi", "badjson/tokenizer.json"),
        ("special_tokens a list", "tokenizer encode --tokenizer {w}/listspec hi", "listspec/tokenizer.json"),
        ("corrupted ranks", "tokenizer encode --tokenizer {w}/badranks hi", "badranks/ranks.tiktoken"),
        ("missing --file", f"tokenizer encode --tokenizer {TOK} --file {{w}}/nope.txt", "nope.txt"),
        ("--file a folder", f"tokenizer encode --tokenizer {TOK} --file {{w}}/emptydir", "emptydir"),
    ],
    ("tokenizer", "decode"): [
        ("id out of range", f"tokenizer decode --tokenizer {TOK} 99999", "99999"),
        ("id not a number", f"tokenizer decode --tokenizer {TOK} x", "'x'"),
        ("missing tokenizer", "tokenizer decode --tokenizer {w}/nope 1", "nope"),
    ],
    ("tokenizer", "stats"): [
        ("missing --file", f"tokenizer stats --tokenizer {TOK} --file {{w}}/nope.txt", "nope.txt"),
        ("--file a folder", f"tokenizer stats --tokenizer {TOK} --file {{w}}/emptydir", "emptydir"),
    ],
    ("prepare",): [
        ("missing input", f"prepare --input {{w}}/nope.txt --tokenizer {TOK} --out {{w}}/p", "nope.txt"),
        ("missing tokenizer", "prepare --input {w}/text.txt --tokenizer {w}/nope --out {w}/p", "nope"),
        ("not UTF-8", f"prepare --input {{w}}/bad.bin --tokenizer {TOK} --out {{w}}/p", "bad.bin"),
        ("a device", f"prepare --input /dev/zero --tokenizer {TOK} --out {{w}}/p", "/dev/zero"),
        ("hf: folder that is no dataset", f"prepare --input hf:{{w}}/emptydir --tokenizer {TOK} --out {{w}}/p",
               "emptydir"),
        ("val fraction 2", f"prepare --input {{w}}/text.txt --tokenizer {TOK} --out {{w}}/p --val-fraction 2",
         "--val-fraction"),
        ("zero workers", f"prepare --input {{w}}/text.txt --tokenizer {TOK} --out {{w}}/p --workers 0", "--workers"),
        ("out is a file", f"prepare --input {{w}}/text.txt --tokenizer {TOK} --out {{w}}/file.txt", "file.txt"),
        ("overwrite the current folder", f"prepare --input {{w}}/text.txt --tokenizer {TOK} --out . "
               "--overwrite", "current folder"),
    ],
    ("data", "list"): [
        ("unexpected argument", "data list extra", "extra"),
    ],
    ("data", "get"): [
        ("unknown dataset", "data get nosuch", "nosuch"),
        ("offline", "data get the-verdict --quiet", "the-verdict.txt"),
    ],
    ("model", "info"): [
        ("unknown preset", "model info --preset nope", "nope"),
        ("missing model", "model info --model {w}/nope", "nope"),
        ("model is a file", "model info --model {w}/file.txt", "file.txt"),
        ("batch 0", "model info --preset tiny --batch 0", "--batch"),
        ("batch not a number", "model info --preset tiny --batch x", "'x'"),
        ("bad config value", "model info --model {w}/badval", "badval/step_0000001/config.json"),
        ("unknown model name", "model info --model nope-model", "model list"),
        ("not a GGUF file", "model info --model {w}/bad.gguf", "bad.gguf"),
        ("HF config we cannot represent", "model info --model {w}/hfsliding", "sliding_window"),
    ],
    ("model", "list"): [
        ("unexpected argument", "model list --nope", "--nope"),
    ],
    ("download",): [
        ("unknown size", "download gpt2 --size 5M", "5M"),
        ("dest is a file", "download gpt2 --dest {w}/file.txt --quiet", "file.txt"),
        ("offline", "download gpt2 --dest {w}/g --quiet", "nothing was downloaded"),
        ("unknown model name", "download nope-model --quiet", "smollm2-135m-instruct"),
        ("registry model offline", "download smollm2-135m --quiet", "nothing was downloaded"),
        ("--size with a registry model", "download smollm2-135m --size 355M", "--size"),
    ],
    ("export",): [
        ("missing model", "export --model {w}/nope --out {w}/e", "nope"),
        ("model is a file", "export --model {w}/file.txt --out {w}/e", "file.txt"),
        ("folder that is no model", "export --model {w}/emptydir --out {w}/e", "emptydir"),
        ("corrupted weights", "export --model {w}/corrupt --out {w}/e", "corrupt/step_0000001/model.safetensors"),
        ("empty files table", "export --model {w}/emptyfiles --out {w}/e", "emptyfiles/step_0000001/meta.json"),
        ("weights not safetensors", "export --model {w}/garbage --out {w}/e", "garbage/step_0000001/model.safetensors"),
        ("out is a file", f"export --model {RUN} --out {{w}}/file.txt", "file.txt"),
        ("out under a file", f"export --model {RUN} --out {{w}}/file.txt/e", "file.txt"),
        ("unknown format", f"export --model {RUN} --format gguf --out {{w}}/e", "gguf"),
    ],
    ("pretrain",): [
        ("missing data", "pretrain --data {w}/nope --model-preset tiny --out {w}/r", "nope"),
        ("data is a file", "pretrain --data {w}/file.txt --model-preset tiny --out {w}/r", "file.txt"),
        ("lr inf", f"{PRE} --out {{w}}/r --lr inf", "inf"),
        ("lr nan", f"{PRE} --out {{w}}/r --lr nan", "nan"),
        ("negative weight decay", f"{PRE} --out {{w}}/r --weight-decay -1", "weight_decay"),
        ("max steps not a number", f"{PRE} --out {{w}}/r --max-steps x", "'x'"),
        ("max steps 0", f"{PRE} --out {{w}}/r --max-steps 0", "max_steps"),
        ("block size 0", f"{PRE} --out {{w}}/r --block-size 0", "(got 0)"),
        ("config is a folder", f"{PRE} --out {{w}}/r --config {{w}}/emptydir", "emptydir"),
        ("config not TOML", f"{PRE} --out {{w}}/r --config {{w}}/bad.toml", "bad.toml"),
        ("out is a file", f"{PRE} --out {{w}}/file.txt", "file.txt"),
        ("unknown preset", "pretrain --data {w}/shards --model-preset nope --out {w}/r", "nope"),
        ("corrupted --model", f"pretrain --data {SHARDS} --model {{w}}/corrupt --out {{w}}/r --max-steps 1",
         "corrupt/step_0000001/model.safetensors"),
        ("resume a folder with no run", f"{PRE} --out . --resume", "no run to resume"),
        ("overwrite the current folder", f"{PRE} --out . --overwrite", "current folder"),
    ],
    ("classify", "train"): [
        ("missing data", f"{CLS} {{w}}/nope.tsv", "nope.tsv"),
        ("one class only", f"{CLS} {{w}}/oneclass.tsv", "oneclass.tsv: the label column holds one class only"),
        ("empty text", f"{CLS} {{w}}/emptytext.tsv", "emptytext.tsv:3: empty text"),
        ("mixed delimiters", f"{CLS} {{w}}/mixed.tsv", "mixed.tsv:3: no TAB"),
        ("more than 2**16 classes", f"{CLS} {{w}}/manyclasses.tsv", "manyclasses.tsv: 65537 distinct labels"),
        ("split not summing to 1", f"{CLS} {{w}}/toy.tsv --split 0.5 0.2 0.2", "--split 0.5 0.2 0.2"),
        ("split with no test part", f"{CLS} {{w}}/toy.tsv --split 0.8 0.2 0", "needs validation and test examples"),
        ("unknown --train", f"{CLS} {{w}}/toy.tsv --train everything", "'everything'"),
        ("--val-data without --test-data", f"{CLS} {{w}}/toy.tsv --val-data {{w}}/toy.tsv", "--test-data"),
        ("val label absent from train", f"{CLS} {{w}}/toy.tsv --val-data {{w}}/val_extra.tsv --test-data {{w}}/toy.tsv",
         "val_extra.tsv:2: the val split holds label 'eggs'"),
        ("batch larger than the training split", f"{CLS} {{w}}/toy.tsv --batch-size 64 --out {{w}}/c_batch",
         "28 training examples"),
        ("--train-blocks past the model's", f"{CLS} {{w}}/toy.tsv --train-blocks 3", "--train-blocks 3"),
        ("--model is a classifier", "classify train --model {w}/clf --out {w}/c --data {w}/toy.tsv",
         "is a text classifier"),
    ],
    ("classify", "eval"): [
        ("missing run", "classify eval --model {w}/nope", "nope"),
        ("a language model run", "classify eval --model {w}/run", "run/step_0000001 holds no classifier.json"),
        ("tokenizer deleted", "classify eval --model {w}/clf_notok", "clf_notok/best/tokenizer"),
        ("no test.jsonl beside it", "classify eval --model {w}/clf", "pass --data FILE"),
        ("a label it never learned", "classify eval --model {w}/clf --data {w}/val_extra.tsv", "eggs"),
        ("missing --data", "classify eval --model {w}/clf --data {w}/nope.tsv", "nope.tsv"),
    ],
    ("classify", "predict"): [
        ("tokenizer deleted", "classify predict --model {w}/clf_notok hi", "clf_notok/best/tokenizer"),
        ("damaged classifier.json", "classify predict --model {w}/clf_badspec hi", "clf_badspec/best/classifier.json"),
        ("texts and --file", "classify predict --model {w}/clf hi --file {w}/text.txt", "not both"),
        ("no texts", "classify predict --model {w}/clf", "--file FILE"),
        ("missing --file", "classify predict --model {w}/clf --file {w}/nope.txt", "nope.txt"),
        ("--file not UTF-8", "classify predict --model {w}/clf --file {w}/bad.bin", "bad.bin"),
        ("batch size 0", "classify predict --model {w}/clf --batch-size 0 hi", "--batch-size"),
    ],
    ("merge",): [
        ("not a LoRA run", "merge --model {w}/run --out {w}/m", "holds no adapter.json"),
        ("missing model", "merge --model {w}/nope --out {w}/m", "nope"),
        ("out exists", "merge --model {w}/clf --out {w}/file.txt", "file.txt exists"),
    ],
    ("generate",): [
        ("a classifier run", f"{GEN} --model {{w}}/clf", "is a text classifier"),
        ("missing model", f"{GEN} --model {{w}}/nope", "nope"),
        ("model is a file", f"{GEN} --model {{w}}/file.txt", "file.txt"),
        ("folder that is no model", f"{GEN} --model {{w}}/emptydir", "emptydir"),
        ("latest points nowhere", f"{GEN} --model {{w}}/badlatest", "badlatest/latest"),
        ("corrupted weights", f"{GEN} --model {{w}}/corrupt", "corrupt/step_0000001/model.safetensors"),
        ("empty files table", f"{GEN} --model {{w}}/emptyfiles", "emptyfiles/step_0000001/meta.json"),
        ("weights not safetensors", f"{GEN} --model {{w}}/garbage", "garbage/step_0000001/model.safetensors"),
        ("config.json not JSON", f"{GEN} --model {{w}}/badcfg", "badcfg/step_0000001/config.json"),
        ("config value of a wrong kind", f"{GEN} --model {{w}}/badval", "badval/step_0000001/config.json"),
        ("HF config value of a wrong kind", f"{GEN} --model {{w}}/hfbad", "hfbad/config.json"),
        ("weights do not fit the config", f"{GEN} --model {{w}}/misfit", "misfit/step_0000001/model.safetensors"),
        ("corrupt tokenizer of the model", f"{GEN} --model {{w}}/badtok", "badtok/step_0000001/tokenizer"),
        ("missing --tokenizer", f"{GEN} --model {RUN} --tokenizer {{w}}/nope", "nope"),
        ("--tokenizer a file", f"{GEN} --model {RUN} --tokenizer {{w}}/file.txt", "file.txt"),
        ("--tokenizer too big", f"{GEN} --model {RUN} --tokenizer {{w}}/bigtok", "bigtok"),
        ("max new tokens -1", f"{GEN} --model {RUN} --max-new-tokens -1", "-1"),
        ("max new tokens not a number", f"{GEN} --model {RUN} --max-new-tokens x", "'x'"),
        ("temperature -1", f"{GEN} --model {RUN} --temperature -1", "temperature=-1"),
        ("unknown weights format", f"{GEN} --model {RUN} --weights int3", "'int3'"),
        ("int4 weights with bf16 compute", f"{GEN} --model {RUN} --weights int4 --precision bf16",
         "--weights int4 computes in fp32"),
        ("fp32 weights with bf16 compute", f"{GEN} --model {RUN} --weights fp32 --precision bf16",
         "--weights fp32 with --precision bf16"),
        ("top-p 2", f"{GEN} --model {RUN} --top-p 2", "top_p=2"),
        ("unknown device", f"generate --prompt hi --model {RUN} --device nope", "nope"),
        ("unknown model name", f"{GEN} --model nope-model", "smollm2-135m-instruct"),
        ("model name not available offline", f"{GEN} --model smollm2-135m", "scratchllm download smollm2-135m"),
        ("not a GGUF file", f"{GEN} --model {{w}}/bad.gguf", "bad.gguf"),
        ("empty GGUF file", f"{GEN} --model {{w}}/empty.gguf", "empty.gguf"),
        ("HF folder with a missing shard", f"{GEN} --model {{w}}/hfshard", "model-00002-of-00002.safetensors"),
        ("HF config we cannot represent", f"{GEN} --model {{w}}/hfsliding", "sliding_window"),
        ("HF tokenizer.json not BPE", f"{GEN} --model {{w}}/hfunigram", "Unigram"),
        ("--chat without a chat format", f"{CHAT} --model {RUN}", "--chat-format"),
        ("--system without --chat", f"{GEN} --model {RUN} --system x", "--system"),
        ("--prompt and --chat", f"{GEN} --chat hi --model {RUN}", "--chat"),
    ],
    ("sft",): [
        ("missing data", f"{SFT} {{w}}/nope.json", "nope.json: file not found"),
        ("data is a folder", f"{SFT} {{w}}/emptydir", "emptydir is a folder"),
        ("data neither .json nor .jsonl", f"{SFT} {{w}}/text.txt", "text.txt: expected a .json file"),
        ("a line that is no JSON", f"{SFT} {{w}}/badinstr.jsonl", "badinstr.jsonl:2: not valid JSON"),
        ("a record without output", f"{SFT} {{w}}/nooutput.json", "nooutput.json[1]: no 'output' field"),
        ("a chat with no answer", f"{SFT} {{w}}/noanswer.jsonl", "noanswer.jsonl:1: no assistant message"),
        ("split not summing to 1", f"{SFT} {{w}}/instr.json --split 0.5 0.2 0.2", "--split 0.5 0.2 0.2"),
        ("--val-data without --test-data", f"{SFT} {{w}}/instr.json --val-data {{w}}/instr.json", "--test-data"),
        ("a format the tokenizer lacks", "sft --model {w}/run --out {w}/s --data {w}/instr.json --template chatml",
         "--add-tokens"),
        ("every answer past --max-length", f"{SFT} {{w}}/instr.json --max-length 4",
         "no train example has a trained token within --max-length 4"),
        ("batch larger than the training split", f"{SFT} {{w}}/instr.json --batch-size 64", "fewer than one global batch"),
        ("no --model", "sft --data {w}/instr.json --out {w}/s", "--model is required"),
        ("--pack without --max-length", f"{SFT} {{w}}/instr.json --pack", "--pack needs --max-length"),
        ("--pack rows fewer than a batch", f"{SFT} {{w}}/instr.json --pack --max-length 60 --batch-size 8",
         "fewer than one global batch of 8 rows"),
        ("--model is a classifier", "sft --model {w}/clf --out {w}/s --data {w}/instr.json", "is a text classifier"),
        ("LoRA on the head", f"{SFT} {{w}}/instr.json --lora-rank 2 --lora-targets lm_head", "lm_head cannot be one"),
        ("unknown template", f"{SFT} {{w}}/instr.json --template vicuna", "'vicuna'"),
        ("--show-mask without --data", "sft --model {w}/chatbase --show-mask 1", "--show-mask needs --model"),
        ("out is a file", "sft --model {w}/chatbase --data {w}/instr.json --out {w}/file.txt", "file.txt"),
        ("resume a folder with no run", "sft --model {w}/chatbase --data {w}/instr.json --out . --resume",
         "no run to resume"),
    ],
    ("reward", "train"): [
        ("missing data", f"{RWD} {{w}}/nope.json", "nope.json"),
        ("a record without rejected", f"{RWD} {{w}}/norejected.json", "norejected.json[1]: no 'rejected' field"),
        ("chosen not a string", f"{RWD} {{w}}/badchosen.json", "badchosen.json[0]: field 'chosen' must be a string"),
        ("every pair identical", f"{RWD} {{w}}/identical.json", "chosen == rejected"),
        ("no prompt", f"{RWD} {{w}}/noprompt.jsonl", "noprompt.jsonl:1: no prompt"),
        ("no --model", "reward train --data {w}/prefs.json --out {w}/r", "--model is required"),
        ("--model is a classifier", "reward train --model {w}/clf --out {w}/r --data {w}/prefs.json",
         "is a text classifier"),
        ("too many blocks", f"{RWD} {{w}}/prefs.json --train last-block --train-blocks 9", "--train-blocks 9"),
        ("out is a file", "reward train --model {w}/chatbase --data {w}/prefs.json --out {w}/file.txt", "file.txt"),
    ],
    ("reward", "score"): [
        ("missing model", "reward score --model {w}/nope --data {w}/prefs.json", "nope"),
        ("a text classifier", "reward score --model {w}/clf --data {w}/prefs.json", "not a reward model"),
        ("missing data", "reward score --model {w}/rm --data {w}/nope.json", "nope.json"),
        ("records with nothing to score", "reward score --model {w}/rm --data {w}/noanswer.jsonl",
         "noanswer.jsonl:1: no 'response'"),
    ],
    ("dpo",): [
        ("missing data", f"{DPO} {{w}}/nope.json", "nope.json"),
        ("a record without rejected", f"{DPO} {{w}}/norejected.json", "norejected.json[1]: no 'rejected' field"),
        ("every pair identical", f"{DPO} {{w}}/identical.json", "chosen == rejected"),
        ("beta 0", f"{DPO} {{w}}/prefs.json --beta 0", "--beta must be > 0"),
        ("label smoothing with ipo", f"{DPO} {{w}}/prefs.json --loss ipo --label-smoothing 0.1", "--label-smoothing"),
        ("--model is a reward model", "dpo --model {w}/rm --out {w}/d --data {w}/prefs.json", "is a reward model"),
        ("lm_head as a LoRA target", f"{DPO} {{w}}/prefs.json --lora-rank 2 --lora-targets lm_head", "lm_head"),
    ],
    ("ppo",): [
        ("no reward", PPO, "give exactly one of --reward-model"),
        ("two rewards", f"{PPO} {RULE} --reward-model {{w}}/rm", "give exactly one of --reward-model"),
        ("rule not module:function", f"{PPO} --reward short_answer", "expected module:function"),
        ("rule module missing", f"{PPO} --reward no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("rule function missing", f"{PPO} --reward json:no_such_fn", "has no function 'no_such_fn'"),
        ("missing prompts", f"ppo --model {{w}}/chatbase --out {{w}}/p {RULE} --prompts {{w}}/nope.jsonl", "nope.jsonl"),
        ("a chat with no user message", f"ppo --model {{w}}/chatbase --out {{w}}/p {RULE} --prompts "
                                        "{w}/onlyanswer.jsonl", "onlyanswer.jsonl:1: the prompt's messages must end"),
        ("batch not a multiple of the mini-batch", f"{PPO} {RULE} --batch-size 3 --mini-batch-size 2", "multiple of"),
        ("value init without a reward model", f"{PPO} {RULE} --value-head separate --value-init reward",
         "--value-init reward needs"),
        ("reward model is a classifier", f"{PPO} --reward-model {{w}}/clf", "not a reward model"),
        ("reward model with another tokenizer", f"ppo --model {{w}}/run --out {{w}}/p {QUICK} --prompts "
                                                "{w}/instr.json --reward-model {w}/rm --max-new-tokens 8", "another tokenizer"),
        ("no room for a prompt", f"{PPO} {RULE} --max-new-tokens 64", "leaves no room for a prompt"),
    ],
    ("eval", "generate"): [
        ("no --data and no test.jsonl", f"{EGEN} {{w}}/chatbase", "pass --data FILE"),
        ("missing data", f"{EGEN} {{w}}/chatbase --data {{w}}/nope.json", "nope.json"),
        ("a record without output", f"{EGEN} {{w}}/chatbase --data {{w}}/nooutput.json", "nooutput.json[1]"),
        ("out is a folder", "eval generate --model {w}/chatbase --data {w}/instr.json --out {w}/emptydir", "emptydir"),
        ("max new tokens 0", "eval generate --model {w}/chatbase --data {w}/instr.json --out {w}/a.jsonl "
         "--max-new-tokens 0", "--max-new-tokens"),
        ("missing model", f"{EGEN} {{w}}/nope --data {{w}}/instr.json", "nope"),
        ("a classifier run", f"{EGEN} {{w}}/clf --data {{w}}/instr.json", "is a text classifier"),
        ("a format the tokenizer lacks", f"{EGEN} {{w}}/run --data {{w}}/instr.json --template chatml",
         "instr.json[0]: the chatml chat format needs the special token"),
        ("temperature -1", f"{EGEN} {{w}}/chatbase --data {{w}}/instr.json --temperature -1", "temperature=-1"),
    ],
    ("eval", "loss"): [
        ("no --data and no test.jsonl", f"{ELOSS} {{w}}/chatbase", "pass --data FILE"),
        ("missing data", f"{ELOSS} {{w}}/chatbase --data {{w}}/nope.json", "nope.json"),
        ("a line that is no JSON", f"{ELOSS} {{w}}/chatbase --data {{w}}/badinstr.jsonl", "badinstr.jsonl:2"),
        ("every answer past --max-length", f"{ELOSS} {{w}}/chatbase --data {{w}}/instr.json --max-length 4",
         "no example has a trained token within 4 tokens"),
        ("corrupted weights", f"{ELOSS} {{w}}/corrupt --data {{w}}/instr.json", "corrupt/step_0000001/model.safetensors"),
        ("a classifier run", f"{ELOSS} {{w}}/clf --data {{w}}/instr.json", "is a text classifier"),
    ],
    ("eval", "judge"): [
        ("missing responses", "eval judge {w}/nope.jsonl --judge-url http://127.0.0.1:9 --judge-model m", "nope.jsonl"),
        ("responses not JSON", "eval judge {w}/badinstr.jsonl --judge-url http://127.0.0.1:9 --judge-model m",
         "badinstr.jsonl:2: not valid JSON"),
        ("a JSON array, not lines", "eval judge {w}/nooutput.json --judge-url http://127.0.0.1:9 --judge-model m",
         "nooutput.json:1: expected a JSON object"),
        ("url not http", "eval judge {w}/answers-ok.jsonl --judge-url ftp://x --judge-model m", "ftp://x"),
        ("timeout 0", "eval judge {w}/answers-ok.jsonl --judge-url http://127.0.0.1:9 --judge-model m --timeout 0",
         "--timeout"),
        ("server does not answer", "eval judge {w}/answers-ok.jsonl --judge-url http://127.0.0.1:9 --judge-model m "
         "--retries 0 --timeout 2 --cache {w}/judge-cache.jsonl --out {w}/j.jsonl --report {w}/j.md",
         "http://127.0.0.1:9"),
    ],
    ("chat",): [
        ("no chat format", "chat --model {w}/run --message hi --device cpu", "--chat-format"),
        ("missing model", "chat --model {w}/nope --message hi --device cpu", "nope"),
        ("a classifier run", "chat --model {w}/clf --message hi --device cpu", "is a text classifier"),
        ("temperature -1", "chat --model {w}/chatbase --message hi --temperature -1", "temperature=-1"),
        ("unknown chat format", "chat --model {w}/run --chat-format vicuna", "'vicuna'"),
        ("int8 weights with bf16 compute", "chat --model {w}/chatbase --message hi --weights int8 --precision bf16",
         "--weights int8 computes in fp32"),
    ],
    ("serve",): [
        ("missing model", "serve --model {w}/nope --device cpu", "nope"),
        ("a classifier run", "serve --model {w}/clf --device cpu", "is a text classifier"),
        ("port out of range", "serve --model {w}/run --port 70000", "--port must be <= 65535"),
        ("port not a number", "serve --model {w}/run --port http", "'http'"),
        ("no slots", "serve --model {w}/run --max-batch 0", "--max-batch must be >= 1"),
        ("max tokens limit 0", "serve --model {w}/run --max-tokens-limit 0", "--max-tokens-limit must be >= 1"),
        ("unknown chat format", "serve --model {w}/run --chat-format vicuna", "'vicuna'"),
        ("unknown weights format", "serve --model {w}/run --weights q4", "'q4'"),
    ],
    ("lab", "list"): [
        ("an extra argument", "lab list extra", "unrecognized arguments: extra"),
    ],
    ("lab", "run"): [
        ("unknown experiment", "lab run nope --quick", "the experiments are: norm-position"),
        ("out is a file", "lab run weight-tying --quick --out {w}/file.txt", "file.txt is a file"),
        ("out holds other files", "lab run weight-tying --quick --out {w}/emptydir/..", "not a lab result"),
    ],
    ("demo",): [
        ("out is a file", "demo --out {w}/file.txt --max-steps 1", "file.txt"),
        ("vocab too small", "demo --out {w}/d --vocab-size 10 --max-steps 1", "--vocab-size 10"),
        ("vocab not a number", "demo --out {w}/d --vocab-size x", "'x'"),
        ("max steps -1", "demo --out {w}/d --max-steps -1", "-1"),
    ],
}


def leaf_commands(parser, prefix=()):
    """('tokenizer', 'train'), ('prepare',), ...: every runnable subcommand of the parser."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [prefix]
    return [leaf for name, sub in subs[0].choices.items() for leaf in leaf_commands(sub, (*prefix, name))]


def test_every_subcommand_has_failure_cases():
    leaves = set(leaf_commands(build_parser()))
    assert {("generate",), ("tokenizer", "train")} <= leaves
    assert not leaves - set(CASES), f"subcommands without failure cases in CASES: {sorted(leaves - set(CASES))}"
    assert not set(CASES) - leaves, f"CASES for subcommands that no longer exist: {sorted(set(CASES) - leaves)}"
    assert all(CASES.values())


# --------------------------------------------------------------------------------------------- inputs
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The folder of inputs every case names: good ones (tok, shards, run) and broken ones."""
    w = tmp_path_factory.mktemp("world")
    tok = train_bpe(["hello world, hello there. the cat sat on the mat. " * 20], vocab_size=280,
                    special_tokens=["<|endoftext|>"])
    tok.save(w / "tok")
    (w / "text.txt").write_text("hello world. the cat sat on the mat.\n" * 100)
    (w / "file.txt").write_text("a plain file\n")
    (w / "bad.bin").write_bytes(b"\xff\xfe\x00 not UTF-8")
    (w / "bad.toml").write_text("lr = [\n")
    (w / "emptydir").mkdir()
    (w / "badjson").mkdir()
    (w / "badjson" / "tokenizer.json").write_text("{oops")
    for name, edit in [("listspec", lambda m: {**m, "special_tokens": list(m["special_tokens"])}),
                       ("badranks", None)]:
        tok.save(w / name)
        if edit:
            (w / name / "tokenizer.json").write_text(json.dumps(edit(json.loads((w / name / "tokenizer.json").read_text()))))
        else:
            (w / name / "ranks.tiktoken").write_text("not base64 ranks\n")
    big = train_bpe([" ".join(f"w{i} x{i * 7}" for i in range(400))], vocab_size=320, special_tokens=["<|endoftext|>"])
    big.save(w / "bigtok")
    assert main(["prepare", "--input", str(w / "text.txt"), "--tokenizer", str(w / "tok"), "--out",
                 str(w / "shards"), "--quiet"]) == 0

    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny", vocab_size=300, block_size=32, n_layer=1))
    save_checkpoint(w / "run", 1, lambda f: write_model_files(model, tok, f), {}, {}, keep_last=1)

    def broken(name, edit):
        shutil.copytree(w / "run", w / name)
        edit(w / name / "step_0000001")

    def flip(c):
        data = bytearray((c / "model.safetensors").read_bytes())
        data[len(data) // 2] ^= 1
        (c / "model.safetensors").write_bytes(bytes(data))

    def edit_json(path, change):
        path.write_text(json.dumps(change(json.loads(path.read_text()))))

    def unchecked(c):  # no meta.json: a plain model folder, so the file itself is what is read
        (c / "meta.json").unlink()
        return c

    classify_inputs(w, model, tok)
    sft_inputs(w)
    broken("corrupt", flip)
    broken("emptyfiles", lambda c: edit_json(c / "meta.json", lambda m: {**m, "files": {}}))
    broken("garbage", lambda c: (unchecked(c) / "model.safetensors").write_bytes(b"garbage" * 10))
    broken("badcfg", lambda c: (unchecked(c) / "config.json").write_text("{oops"))
    broken("badval", lambda c: edit_json(unchecked(c) / "config.json", lambda d: {**d, "dropout": "x"}))
    broken("misfit", lambda c: edit_json(unchecked(c) / "config.json", lambda d: {**d, "n_embd": 64}))
    broken("badtok", lambda c: (unchecked(c) / "tokenizer" / "tokenizer.json").write_text("[1]"))
    broken("badlatest", lambda c: (c.parent / "latest").write_text("step_0000009\n"))
    (w / "hfbad").mkdir()
    (w / "hfbad" / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10, "n_positions": 8,
                                                         "n_embd": "x", "n_layer": 1, "n_head": 1}))
    (w / "hfbad" / "model.safetensors").write_bytes(b"")
    (w / "bad.gguf").write_bytes(b"NOTGGUF!" + bytes(64))
    (w / "empty.gguf").write_bytes(b"")
    llama = ModelConfig(block_size=32, vocab_size=300, n_layer=1, n_head=2, n_embd=16, bias=False, norm="rmsnorm",
                        positions="rope", mlp="swiglu")
    from scratchllm.weights.hf import export_hf

    export_hf(GPT(llama), tok, w / "hfunigram")
    fast = json.loads((w / "hfunigram" / "tokenizer.json").read_text())
    fast["model"] = {"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0], ["a", -1.0]]}
    (w / "hfunigram" / "tokenizer.json").write_text(json.dumps(fast))
    shutil.copytree(w / "hfunigram", w / "hfsliding")
    edit_json(w / "hfsliding" / "config.json", lambda d: {**d, "model_type": "mistral", "sliding_window": 16})
    shutil.copytree(w / "hfunigram", w / "hfshard")
    (w / "hfshard" / "model.safetensors").rename(w / "hfshard" / "model-00001-of-00002.safetensors")
    keys = json.loads((w / "hfshard" / "model-00001-of-00002.safetensors").read_bytes()[8:].split(b"}}")[0] + b"}}")
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    names = sorted(k for k in keys if k != "__metadata__")
    index = {"metadata": {}, "weight_map": {k: shards[i % 2] for i, k in enumerate(names)}}
    (w / "hfshard" / "model.safetensors.index.json").write_text(json.dumps(index))
    return w


def sft_inputs(w):
    """Instruction files (a good one, broken ones) and `chatbase`: a model folder whose tokenizer has the
    ChatML specials and whose chat.json says chatml (the `run` model's tokenizer has neither)."""
    from scratchllm.tokenizer.chat import FORMATS

    good = [{"instruction": f"Say {w_}.", "input": "", "output": w_} for w_ in ("yes", "no", "hi", "ok") * 5]
    (w / "instr.json").write_text(json.dumps(good))
    (w / "nooutput.json").write_text(json.dumps([good[0], {"instruction": "Say yes."}]))
    (w / "badinstr.jsonl").write_text(json.dumps(good[0]) + "\n{oops\n")
    (w / "answers-ok.jsonl").write_text(json.dumps({"instruction": "Say yes.", "input": "", "output": "yes",
                                                     "response": "yes"}) + "\n")
    (w / "noanswer.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    chat_tok = train_bpe(["<|im_start|>user\nSay yes.<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>\n" * 20],
                         vocab_size=280, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    model = GPT(ModelConfig.from_preset("tiny", vocab_size=280, block_size=64, n_layer=1, n_embd=32, n_head=2))
    save_model(model, chat_tok, w / "chatbase", chat=FORMATS["chatml"])
    pairs = [{"instruction": f"Say {w_}.", "input": "", "chosen": w_, "rejected": "no"} for w_ in ("yes", "hi", "ok") * 7]
    (w / "prefs.json").write_text(json.dumps(pairs))
    (w / "norejected.json").write_text(json.dumps([pairs[0], {"instruction": "Say yes.", "chosen": "yes"}]))
    (w / "badchosen.json").write_text(json.dumps([{**pairs[0], "chosen": 3}]))
    (w / "identical.json").write_text(json.dumps([{**p, "rejected": p["chosen"]} for p in pairs]))
    (w / "noprompt.jsonl").write_text(json.dumps({"chosen": "a", "rejected": "b"}) + "\n")
    (w / "onlyanswer.jsonl").write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}) + "\n")
    assert main(["reward", "train", "--model", str(w / "chatbase"), "--data", str(w / "prefs.json"), "--out",
                 str(w / "rm"), "--max-steps", "1", "--device", "cpu", "--no-compile", "--precision", "fp32"]) == 0


def classify_inputs(w, model, tok):
    """Labelled files (a good one, broken ones) and `clf`: a classify run folder of `model` under a random
    2-class head, its best/ holding every tensor (no training needed), plus copies with damage."""
    from safetensors.torch import save_file

    from scratchllm.infer.classifier import ClassifierSpec
    from scratchllm.model.heads import SequenceClassifier
    from scratchllm.weights.state import state_to_save

    (w / "toy.tsv").write_text("".join(f"{'spam' if i % 2 else 'ham'}\tsome words {i}\n" for i in range(40)))
    (w / "oneclass.tsv").write_text("ham\thello\nham\tthere\n")
    (w / "emptytext.tsv").write_text("ham\thello\nspam\tbuy\nham\t   \n")
    (w / "mixed.tsv").write_text("ham\thello\nspam\tbuy\nham,see you\n")
    (w / "manyclasses.tsv").write_text("".join(f"c{i}\ttext {i}\n" for i in range(2**16 + 1)))
    (w / "val_extra.tsv").write_text("ham\thello\neggs\tbacon\n")
    clf = SequenceClassifier(model, 2)

    def write(folder):
        save_file({k: v.contiguous() for k, v in state_to_save(clf).items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(model.config.to_dict()))
        tok.save(folder / "tokenizer")
        ClassifierSpec(labels=["ham", "spam"], base=str(w / "run")).save(folder)

    save_checkpoint(w / "clf", 1, write, {}, {}, keep_last=1)
    shutil.copytree(w / "clf" / "step_0000001", w / "clf" / "best")
    shutil.copytree(w / "clf", w / "clf_notok")
    shutil.rmtree(w / "clf_notok" / "best" / "tokenizer")
    shutil.copytree(w / "clf", w / "clf_badspec")
    (w / "clf_badspec" / "best" / "classifier.json").write_text(json.dumps({"labels": "ham", "base": 3}))


@pytest.fixture()
def cwd(world, tmp_path, monkeypatch):
    """Each case runs in a folder holding a file of the user's, which must survive it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "precious.doc").write_text("mine")
    monkeypatch.setenv("SCRATCHLLM_MIRROR", "http://127.0.0.1:9")  # nothing listens there: offline
    monkeypatch.setenv("SCRATCHLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(download_mod, "time", SimpleNamespace(sleep=lambda s: None))  # no waits between retries
    return tmp_path


ALL = [pytest.param(cmd, *c.values, marks=c.marks, id=f"{' '.join(cmd)}: {c.values[0]}") if hasattr(c, "marks")
       else pytest.param(cmd, *c, id=f"{' '.join(cmd)}: {c[0]}") for cmd, cases in CASES.items() for c in cases]


@pytest.mark.parametrize("cmd, name, argv, names", ALL)
def test_failure_is_a_clear_error(world, cwd, capfd, cmd, name, argv, names):
    args = argv.format(w=world).split()
    assert tuple(args[:len(cmd)]) == cmd, f"case {name!r} is listed under {cmd} but runs {args[:len(cmd)]}"
    try:
        code = main(args)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    except BaseException as e:  # the CLI would show this to the user as a traceback
        pytest.fail(f"scratchllm {' '.join(args)}: traceback reaches the user: {type(e).__name__}: {e}")
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert code == 2, f"exit code {code}, stderr:\n{err}"
    lines = err.splitlines()
    first = next((i for i, line in enumerate(lines) if "error: " in line), None)
    assert first is not None, f"no `error: ` line in stderr:\n{err}"
    message = "\n".join(lines[first:])
    assert names.format(w=world) in message, f"the error does not name {names!r}:\n{message}"
    assert (cwd / "precious.doc").read_text() == "mine"
