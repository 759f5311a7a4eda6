"""Claim 6: byte-level BPE sits between characters and words: shorter sequences than characters, no
out-of-vocabulary tokens (unlike words), a vocabulary of a chosen size; and GPT-2's BPE, learned on
English web text, spends far more tokens per character on other scripts.

Measures: on Python's documentation (builtin:pydocs, English), a BPE of the package trained on the
first part, a character vocabulary and a word vocabulary (\\w+ runs and single punctuation marks) of
the same part; on the held-out rest: tokens per byte, vocabulary size, out-of-vocabulary rate (tokens
of the held-out text missing from the vocabulary). Then GPT-2's tokenizer on the first two articles of
the Universal Declaration of Human Rights in English, Chinese and Arabic (the UN's texts, quoted
below): tokens per character and per UTF-8 byte.
"""

from __future__ import annotations

import re
from pathlib import Path

from scratchllm.common import ScratchError
from scratchllm.lab.core import Result

NAME = "tokenization"
CLAIM = ("BPE gives shorter sequences than characters and no out-of-vocabulary tokens unlike words; GPT-2's BPE "
         "spends several times more tokens per character on Chinese or Arabic than on English.")

UDHR = {  # articles 1 and 2 of the Universal Declaration of Human Rights, the UN's official texts
    "English": "All human beings are born free and equal in dignity and rights. They are endowed with reason and "
               "conscience and should act towards one another in a spirit of brotherhood. Everyone is entitled to "
               "all the rights and freedoms set forth in this Declaration, without distinction of any kind, such as "
               "race, colour, sex, language, religion, political or other opinion, national or social origin, "
               "property, birth or other status.",
    "Chinese": "人人生而自由,在尊严和权利上一律平等。他们赋有理性和良心,并应以兄弟关系的精神相对待。人人有资格享有本宣言所载的"
               "一切权利和自由,不分种族、肤色、性别、语言、宗教、政治或其他见解、国籍或社会出身、财产、出生或其他身分等任何区别。",
    "Arabic": "يولد جميع الناس أحرارًا متساوين في الكرامة والحقوق. وقد وهبوا عقلاً وضميرًا وعليهم أن يعامل بعضهم بعضًا "
              "بروح الإخاء. لكل إنسان حق التمتع بكافة الحقوق والحريات الواردة في هذا الإعلان، دون أي تمييز، كالتمييز "
              "بسبب العنصر أو اللون أو الجنس أو اللغة أو الدين أو الرأي السياسي أو أي رأي آخر، أو الأصل الوطني أو "
              "الاجتماعي أو الثروة أو الميلاد أو أي وضع آخر.",
}
WORD = re.compile(r"\w+|[^\w\s]")


def run(quick: bool, out: Path) -> Result:
    from scratchllm.data.sources import pydocs_documents
    from scratchllm.tokenizer import train_bpe

    text = "\n\n".join(pydocs_documents())
    n_train, n_test = (60_000, 20_000) if quick else (400_000, 100_000)
    train, test = text[:n_train], text[n_train:n_train + n_test]
    test_bytes = len(test.encode("utf-8"))
    vocab_size = 512 if quick else 2048
    bpe = train_bpe([train], vocab_size=vocab_size)
    chars = set(train)
    words = set(WORD.findall(train))
    test_words = WORD.findall(test)
    rows = [
        {"tokens": "characters", "vocabulary": len(chars), "tokens per byte": len(test) / test_bytes,
         "OOV rate": sum(c not in chars for c in test) / len(test)},
        {"tokens": "words", "vocabulary": len(words), "tokens per byte": len(test_words) / test_bytes,
         "OOV rate": sum(w not in words for w in test_words) / len(test_words)},
        {"tokens": f"BPE ({vocab_size})", "vocabulary": bpe.vocab_size,
         "tokens per byte": len(bpe.encode(test)) / test_bytes, "OOV rate": 0.0},  # bytes are always in it
    ]
    notes, scripts = [], []
    try:
        from scratchllm.tokenizer import load_tokenizer

        gpt2 = load_tokenizer("gpt2")
        for lang, s in UDHR.items():
            n = len(gpt2.encode(s))
            scripts.append({"language": lang, "characters": len(s), "GPT-2 tokens": n, "tokens per character": n / len(s),
                            "tokens per byte": n / len(s.encode("utf-8"))})
    except ScratchError as e:
        notes.append(f"GPT-2's tokenizer is not available here, so the scripts part was skipped: {e}")
    rows += [{"tokens": f"GPT-2 on {r['language']}", "vocabulary": 50257, "tokens per byte": r["tokens per byte"],
              "OOV rate": 0.0, "tokens per character": r["tokens per character"]} for r in scripts]
    for r in rows[:3]:
        r["tokens per character"] = r["tokens per byte"] * test_bytes / len(test)
    ch, wd, bp = rows[:3]
    holds_en = wd["tokens per byte"] < bp["tokens per byte"] < ch["tokens per byte"] and wd["OOV rate"] > 0
    ratio = {r["language"]: r["tokens per character"] / scripts[0]["tokens per character"] for r in scripts[1:]}
    holds_scripts = bool(ratio) and min(ratio.values()) > 2
    verdict = "holds" if holds_en and holds_scripts else "depends"
    why = (f"On held-out English, BPE takes {bp['tokens per byte']:.3f} tokens per byte against {ch['tokens per byte']:.3f} "
           f"for characters and {wd['tokens per byte']:.3f} for words, whose vocabulary ({wd['vocabulary']:,}) misses "
           f"{wd['OOV rate']:.1%} of the held-out words (characters miss {ch['OOV rate']:.2%}). " +
           ("GPT-2 spends " + " and ".join(f"{v:.1f}x ({k})" for k, v in ratio.items()) +
            " the tokens per character it spends on English." if ratio else "The scripts part needs GPT-2's tokenizer."))

    def plot(fig):
        ax1 = fig.add_subplot(1, 2, 1)
        ax1.bar([r["tokens"] for r in rows[:3]], [r["tokens per byte"] for r in rows[:3]])
        ax1.set_ylabel("tokens per byte (held-out English)")
        if scripts:
            ax2 = fig.add_subplot(1, 2, 2)
            ax2.bar([r["language"] for r in scripts], [r["tokens per character"] for r in scripts])
            ax2.set_ylabel("GPT-2 tokens per character (UDHR 1-2)")

    return Result(NAME, CLAIM, {"train chars": n_train, "held-out chars": n_test, "BPE vocab": vocab_size,
                                "corpus": "builtin:pydocs"}, rows, verdict, why, plot, notes)
